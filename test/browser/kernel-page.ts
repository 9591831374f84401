// Runs kernels on the browser's own WebGPU and compares them with their float64
// references, reporting the worst error of each check to the test driving this page.
import { acquireGpu, type Gpu } from '../../src/gpu/gpu';
import { attentionForward } from '../../src/kernels/attention';
import { attentionRef } from '../../src/kernels/attention.ref';
import { matmulRef } from '../../src/kernels/matmul.ref';
import { q4Matmul } from '../../src/kernels/q4';
import { downloadQ4, releaseQ4 } from '../../src/kernels/q4-layout';
import { dequantizeQ4Ref, quantizeQ4Ref } from '../../src/kernels/q4.ref';
import { quantizeQ4 } from '../../src/kernels/quantize';
import { rmsnormForward } from '../../src/kernels/rmsnorm';
import { rmsnormRef } from '../../src/kernels/rmsnorm.ref';
import { Rng } from '../helpers/numeric';

interface Check { name: string; maxErr: number }
interface Report { adapter: string; checks: Check[]; error?: string }

const maxErr = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  let m = a.length === b.length ? 0 : Infinity;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
};

async function rmsnorm(gpu: Gpu, rng: Rng): Promise<Check> {
  const [N, C] = [7, 300];
  const x = rng.f32(N * C, 2);
  const w = rng.f32(C);
  const out = gpu.empty([N, C]);
  rmsnormForward(gpu, out, gpu.empty([N]), gpu.upload(x, [N, C]), gpu.upload(w, [C]), N, C, 1e-5);
  return { name: 'rmsnorm', maxErr: maxErr(await gpu.readF32(out), rmsnormRef(x, w, N, C, 1e-5).out) };
}

/** GPU quantizer -> bytes equal the CPU rule; 4-bit GEMV and GEMM equal the dequantized matmul. */
async function q4(gpu: Gpu, rng: Rng): Promise<Check[]> {
  const [M, K] = [40, 100];
  const w = rng.f32(M * K);
  const W = quantizeQ4(gpu, gpu.upload(w, [M, K]), M, K, { srcType: 'f32' });
  const got = await downloadQ4(gpu, W);
  const ref = quantizeQ4Ref(w, M, K);
  const checks: Check[] = [{ name: 'quantize bytes', maxErr: maxErr(got.qweight, ref.qweight) + maxErr(got.scales, ref.scales) }];
  const dense = dequantizeQ4Ref(ref);
  for (const N of [1, 33]) {
    const x = rng.f32(N * K);
    const y = gpu.empty([N, M]);
    q4Matmul(gpu, y, gpu.upload(x, [N, K]), W, N);
    checks.push({ name: `q4 matmul N=${N}`, maxErr: maxErr(await gpu.readF32(y), matmulRef(x, dense, N, M, K, { transB: true })) });
  }
  releaseQ4(W);
  return checks;
}

async function attention(gpu: Gpu, rng: Rng): Promise<Check> {
  const [B, T, H, HK, D] = [2, 9, 4, 2, 16];
  const q = rng.f32(B * T * H * D);
  const k = rng.f32(B * T * HK * D);
  const v = rng.f32(B * T * HK * D);
  const out = gpu.empty([B, T, H, D]);
  const lse = gpu.empty([B, H, T]);
  attentionForward(gpu, out, lse, gpu.upload(q, [B, T, H, D]), gpu.upload(k, [B, T, HK, D]), gpu.upload(v, [B, T, HK, D]), B, T, T, H, HK, D);
  return { name: 'attention', maxErr: maxErr(await gpu.readF32(out), attentionRef(q, k, v, B, T, T, H, HK, D).out) };
}

async function run(): Promise<Report> {
  const gpu = await acquireGpu();
  try {
    const rng = new Rng(11);
    const checks = [await rmsnorm(gpu, rng), ...(await q4(gpu, rng)), await attention(gpu, rng)];
    return { adapter: gpu.caps.adapterName, checks };
  } finally {
    gpu.destroy();
  }
}

const w = window as unknown as { __report?: Report };
run()
  .then((r) => (w.__report = r))
  .catch((e: unknown) => (w.__report = { adapter: '', checks: [], error: e instanceof Error ? `${e.message}\n${e.stack}` : String(e) }));
