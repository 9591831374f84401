#!/usr/bin/env node
// `npm test`: set-up (scripts/test-setup.mjs), typecheck, the whole suite on SwiftShader
// (f32 fallbacks; the UI tests drive Debian's chromium), then the GPU suites and the
// lavapipe-only files on Mesa lavapipe (shader-f16 and subgroup paths, 128 MiB bindings).
// Arguments go to vitest and narrow both passes, e.g. `npm test -- test/kernels`.
import { spawnSync } from 'node:child_process';

const GPU_SUITES = ['test/gpu', 'test/kernels', 'test/model', 'test/autodiff'];
// Run on lavapipe only: the micro model's learning run and soak are many tiny dispatches, about ten
// times slower on SwiftShader (they would take most of the CI budget there).
const LAVAPIPE_ONLY = ['test/selfplay/learning-micro.test.ts', 'test/selfplay/soak.test.ts'];
const extra = process.argv.slice(2);

function step(name, cmd, args, env = {}) {
  const t0 = Date.now();
  console.log(`\n== ${name}`);
  const r = spawnSync(cmd, args, { stdio: 'inherit', env: { ...process.env, ...env } });
  const s = ((Date.now() - t0) / 1000).toFixed(0);
  if (r.status !== 0) {
    console.error(`\n== ${name}: failed (exit ${r.status ?? r.signal}) after ${s} s`);
    process.exit(r.status || 1);
  }
  console.log(`== ${name}: ok in ${s} s`);
}

step('set-up', process.execPath, ['scripts/test-setup.mjs']);
step('typecheck', 'npx', ['tsc', '--noEmit', '-p', 'tsconfig.json']);
const excludes = [...LAVAPIPE_ONLY.flatMap((f) => ['--exclude', f]), ...(extra.length > 0 ? ['--passWithNoTests'] : [])];
step('suite on SwiftShader', process.execPath, ['scripts/webgpu-env.mjs', 'npx', 'vitest', 'run', ...excludes, ...extra], { WEBGPU_ADAPTER: 'swiftshader' });
const onLavapipe = [...GPU_SUITES, ...LAVAPIPE_ONLY];
const lavapipeTargets = extra.length > 0 ? extra.filter((a) => a.startsWith('-') || onLavapipe.some((s) => a.startsWith(s) || s.startsWith(a))) : onLavapipe;
if (extra.length === 0 || lavapipeTargets.some((a) => !a.startsWith('-'))) {
  // Cold lavapipe compiles each pipeline with LLVM on first use: longer time-outs.
  step('GPU suites on lavapipe', process.execPath, ['scripts/webgpu-env.mjs', 'npx', 'vitest', 'run', '--testTimeout=300000', '--hookTimeout=300000', ...lavapipeTargets], { WEBGPU_ADAPTER: 'lavapipe' });
}
