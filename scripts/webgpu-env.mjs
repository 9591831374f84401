#!/usr/bin/env node
// Runs a command with Dawn able to find a Vulkan driver. With a system Vulkan loader
// and a GPU driver nothing changes; without (CI, GPU-less boxes) it uses the
// SwiftShader driver that Debian's chromium package ships. WEBGPU_ADAPTER=swiftshader
// forces SwiftShader.
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';

const env = { ...process.env };
const chromiumDir = '/usr/lib/chromium';
const swiftshaderIcd = `${chromiumDir}/vk_swiftshader_icd.json`;
const icdDirs = ['/usr/share/vulkan/icd.d', '/etc/vulkan/icd.d', '/usr/local/share/vulkan/icd.d'];
const hasSystemIcd = icdDirs.some((d) => existsSync(d) && readdirSync(d).some((f) => f.endsWith('.json')));
const hasLoader = ['/usr/lib/x86_64-linux-gnu/libvulkan.so.1', '/usr/lib/aarch64-linux-gnu/libvulkan.so.1', '/usr/lib/libvulkan.so.1'].some(existsSync);

if (process.platform === 'linux' && existsSync(swiftshaderIcd)) {
  const force = env.WEBGPU_ADAPTER === 'swiftshader';
  if (force || !hasSystemIcd) env.VK_ICD_FILENAMES ??= swiftshaderIcd;
  if (force || !hasLoader) env.LD_LIBRARY_PATH = [chromiumDir, env.LD_LIBRARY_PATH].filter(Boolean).join(':');
} else if (process.platform === 'linux' && !hasSystemIcd) {
  console.error('webgpu-env: no Vulkan driver found; install a GPU driver or Debian\'s chromium package (SwiftShader).');
}

const [cmd, ...args] = process.argv.slice(2);
if (!cmd) {
  console.error('usage: node scripts/webgpu-env.mjs <command> [args...]');
  process.exit(2);
}
const r = spawnSync(cmd, args, { stdio: 'inherit', env, shell: false });
if (r.error) {
  console.error(`webgpu-env: could not run ${cmd}: ${r.error.message}`);
  process.exit(1);
}
process.exit(r.status ?? 1);
