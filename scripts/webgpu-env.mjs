#!/usr/bin/env node
// Runs a command with Dawn (WebGPU for Node) pointed at a Vulkan driver.
//   WEBGPU_ADAPTER=swiftshader  SwiftShader from Debian's chromium package (f32 kernels, subgroups of 4)
//   WEBGPU_ADAPTER=lavapipe     Mesa 25 lavapipe (shader-f16, subgroups of 8, 128 MiB bindings)
//   WEBGPU_ADAPTER=system       whatever the system Vulkan loader finds (a real GPU)
// Unset: a machine with a GPU device node uses the system loader; one without uses
// SwiftShader when chromium is installed, else lavapipe.
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';

const env = { ...process.env };
const chromiumDir = '/usr/lib/chromium';
const drivers = {
  swiftshader: `${chromiumDir}/vk_swiftshader_icd.json`,
  lavapipe: '/usr/share/vulkan/icd.d/lvp_icd.json',
};
const hasLoader = ['/usr/lib/x86_64-linux-gnu/libvulkan.so.1', '/usr/lib/aarch64-linux-gnu/libvulkan.so.1', '/usr/lib/libvulkan.so.1'].some(existsSync);
const hasGpuNode = (existsSync('/dev/dri') && readdirSync('/dev/dri').some((f) => f.startsWith('renderD'))) || existsSync('/dev/nvidia0');

let choice = env.WEBGPU_ADAPTER;
if (!choice && process.platform === 'linux' && !env.VK_ICD_FILENAMES) {
  choice = hasGpuNode ? 'system' : existsSync(drivers.swiftshader) ? 'swiftshader' : existsSync(drivers.lavapipe) ? 'lavapipe' : 'system';
}
if (choice && choice !== 'system') {
  const icd = drivers[choice];
  if (!icd) {
    console.error(`webgpu-env: WEBGPU_ADAPTER=${choice} is not one of swiftshader, lavapipe, system.`);
    process.exit(2);
  }
  if (!existsSync(icd)) {
    console.error(`webgpu-env: the ${choice} Vulkan driver (${icd}) is not installed; node scripts/test-setup.mjs installs it (as root).`);
    process.exit(1);
  }
  env.VK_ICD_FILENAMES = icd;
  // SwiftShader's driver needs chromium's own libvulkan when the system has no loader.
  if (choice === 'swiftshader' && !hasLoader) env.LD_LIBRARY_PATH = [chromiumDir, env.LD_LIBRARY_PATH].filter(Boolean).join(':');
}
if (choice) env.WEBGPU_ADAPTER = choice;

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
