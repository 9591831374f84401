// Runs kernels on the browser's own WebGPU and compares them with their float64
// references, reporting the worst error to the test driving this page.
import { acquireGpu } from '../../src/gpu/gpu';
import { rmsnormForward } from '../../src/kernels/rmsnorm';
import { rmsnormRef } from '../../src/kernels/rmsnorm.ref';
import { Rng } from '../helpers/numeric';

interface Report { adapter: string; checks: { name: string; maxErr: number }[]; error?: string }

async function run(): Promise<Report> {
  const gpu = await acquireGpu();
  const checks: Report['checks'] = [];
  try {
    const [N, C] = [7, 300];
    const rng = new Rng(11);
    const x = rng.f32(N * C, 2);
    const w = rng.f32(C);
    const tx = gpu.upload(x, [N, C]);
    const tw = gpu.upload(w, [C]);
    const out = gpu.empty([N, C]);
    const rstd = gpu.empty([N]);
    rmsnormForward(gpu, out, rstd, tx, tw, N, C, 1e-5);
    const got = await gpu.readF32(out);
    const ref = rmsnormRef(x, w, N, C, 1e-5).out;
    checks.push({ name: 'rmsnorm', maxErr: got.reduce((m, v, i) => Math.max(m, Math.abs(v - ref[i]!)), 0) });
    return { adapter: gpu.caps.adapterName, checks };
  } finally {
    gpu.destroy();
  }
}

const w = window as unknown as { __report?: Report };
run()
  .then((r) => (w.__report = r))
  .catch((e: unknown) => (w.__report = { adapter: '', checks: [], error: e instanceof Error ? e.message : String(e) }));
