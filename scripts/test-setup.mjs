#!/usr/bin/env node
// Set-up for `npm test` on a Debian machine: the tests need Debian's chromium (the browser
// for the UI tests, and the SwiftShader Vulkan driver it ships: f32 kernels) and Mesa 25's
// lavapipe Vulkan driver from bookworm-backports (shader-f16 and subgroups). As root, what
// is missing is installed; otherwise the exact commands to run are printed and the run stops.
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';

const SWIFTSHADER_ICD = '/usr/lib/chromium/vk_swiftshader_icd.json';
const LAVAPIPE_ICD = '/usr/share/vulkan/icd.d/lvp_icd.json';
const SOURCES = '/etc/apt/sources.list.d/debian.sources';
const MIN_MESA_MAJOR = 25;

function mesaMajor() {
  const r = spawnSync('dpkg-query', ['-W', '-f=${Version}', 'mesa-vulkan-drivers'], { encoding: 'utf8' });
  if (r.status !== 0) return 0;
  const m = /^(?:\d+:)?(\d+)\./.exec(r.stdout.trim());
  return m ? Number(m[1]) : 0;
}

const needChromium = !existsSync('/usr/bin/chromium') || !existsSync(SWIFTSHADER_ICD);
const needLavapipe = !existsSync(LAVAPIPE_ICD) || mesaMajor() < MIN_MESA_MAJOR;
if (process.platform !== 'linux' || (!needChromium && !needLavapipe)) process.exit(0);

const commands = [];
if (needLavapipe) {
  commands.push(`sed -i '0,/^Suites:/s/^Suites: .*/& bookworm-backports/' ${SOURCES}`);
}
commands.push('apt-get update');
if (needChromium) commands.push('apt-get install -y chromium');
if (needLavapipe) commands.push('apt-get install -y -t bookworm-backports mesa-vulkan-drivers');

const isRoot = typeof process.getuid === 'function' && process.getuid() === 0;
const hasApt = existsSync('/usr/bin/apt-get');
if (!isRoot || !hasApt || (needLavapipe && !existsSync(SOURCES))) {
  const missing = [needChromium && 'Debian\'s chromium (browser and SwiftShader Vulkan driver)', needLavapipe && `Mesa >= ${MIN_MESA_MAJOR} lavapipe (mesa-vulkan-drivers from bookworm-backports)`].filter(Boolean).join(' and ');
  console.error(`test-setup: the tests need ${missing}. Run as root:\n${commands.map((c) => `  ${c}`).join('\n')}`);
  process.exit(1);
}

console.log('test-setup: installing what the tests need (chromium, Mesa lavapipe)...');
if (needLavapipe) {
  // Append the backports suite to the first Suites line of Debian's sources file.
  const text = readFileSync(SOURCES, 'utf8');
  if (!/^Suites:.*\bbookworm-backports\b/m.test(text)) {
    writeFileSync(SOURCES, text.replace(/^Suites: (.*)$/m, 'Suites: $1 bookworm-backports'));
  }
}
const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
function run(args) {
  const r = spawnSync('apt-get', args, { stdio: ['ignore', 'ignore', 'inherit'], env });
  if (r.status !== 0) {
    console.error(`test-setup: apt-get ${args.join(' ')} failed (exit ${r.status}); run the commands above by hand:\n${commands.map((c) => `  ${c}`).join('\n')}`);
    process.exit(1);
  }
}
run(['update', '-qq']);
if (needChromium) run(['install', '-y', '-qq', 'chromium']);
if (needLavapipe) run(['install', '-y', '-qq', '-t', 'bookworm-backports', 'mesa-vulkan-drivers']);
if (!existsSync(SWIFTSHADER_ICD) || !existsSync(LAVAPIPE_ICD)) {
  console.error('test-setup: the packages installed but a Vulkan driver file is still missing: ' + [SWIFTSHADER_ICD, LAVAPIPE_ICD].filter((f) => !existsSync(f)).join(', '));
  process.exit(1);
}
console.log('test-setup: done');
