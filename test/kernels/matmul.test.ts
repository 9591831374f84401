import { describe, it } from 'vitest';
import { f16ToF32, f32ToF16 } from '../../src/gpu/gpu';
import { matmul } from '../../src/kernels/matmul';
import { matmulRef } from '../../src/kernels/matmul.ref';
import { useGpu } from '../helpers/gpu';
import { Rng, expectClose } from '../helpers/numeric';

describe('matmul', () => {
  const gpu = useGpu();

  async function check(M: number, N: number, K: number, o: { transA?: boolean; transB?: boolean; alpha?: number; accumulate?: boolean; splitK?: number }) {
    const g = gpu();
    const rng = new Rng(M * 1009 + N * 31 + K + (o.transA ? 7 : 0) + (o.transB ? 13 : 0));
    const a = rng.f32(M * K);
    const b = rng.f32(K * N);
    const c0 = rng.f32(M * N);
    const ta = g.upload(a, o.transA ? [K, M] : [M, K]);
    const tb = g.upload(b, o.transB ? [N, K] : [K, N]);
    const tc = g.upload(c0, [M, N]);
    matmul(g, tc, ta, tb, M, N, K, o);
    const ref = matmulRef(a, b, M, N, K, { ...o, c: o.accumulate ? c0 : undefined });
    // f32 products summed over K terms of unit-normal data: error ~ sqrt(K) * 6e-8 * |terms|.
    expectClose(await g.readF32(tc), ref, { atol: 2e-5 * Math.sqrt(K + 1), rtol: 1e-5, label: `C ${M}x${N}x${K}` });
    for (const t of [ta, tb, tc]) t.release();
  }

  const combos = [
    [false, false],
    [true, false],
    [false, true],
    [true, true],
  ] as const;

  for (const [transA, transB] of combos) {
    it.each([
      [1, 1, 1],
      [1, 70, 33],
      [37, 19, 50],
      [20, 30, 1],
      [65, 130, 70],
      [96, 8, 40],
    ])(`transA=${transA} transB=${transB}: %i x %i x %i matches the f64 reference`, async (M, N, K) => {
      await check(M, N, K, { transA, transB });
    });
  }

  it.each(combos)('accumulate with alpha (transA=%s, transB=%s)', async (transA, transB) => {
    await check(37, 19, 50, { transA, transB, alpha: -0.37, accumulate: true });
    await check(3, 67, 17, { transA, transB, alpha: 2.5 });
  });

  it.each(combos)('split-K matches (transA=%s, transB=%s), with and without accumulate', async (transA, transB) => {
    await check(9, 21, 301, { transA, transB, splitK: 5 });
    await check(9, 21, 301, { transA, transB, splitK: 4, accumulate: true, alpha: 0.5 });
    // more splits requested than K allows: falls back to fewer, non-empty splits
    await check(2, 3, 20, { transA, transB, splitK: 16 });
  });

  it('LoRA shapes: x A^T, (x A^T) B^T and both weight gradients (split-K by default)', async () => {
    const g = gpu();
    const rng = new Rng(5);
    const [N, K, R, O] = [600, 64, 8, 48]; // N >= 2 * 256: the weight gradients split K
    const x = rng.f32(N * K);
    const A = rng.f32(R * K); // lora_A [R, K]
    const Bw = rng.f32(O * R); // lora_B [O, R]
    const dy = rng.f32(N * O);
    const tx = g.upload(x, [N, K]);
    const tA = g.upload(A, [R, K]);
    const tB = g.upload(Bw, [O, R]);
    const tdy = g.upload(dy, [N, O]);
    const u = g.empty([N, R]);
    const y = g.empty([N, O]);
    const dB = g.zeros([O, R]);
    const du = g.empty([N, R]);
    const dA = g.zeros([R, K]);
    matmul(g, u, tx, tA, N, R, K, { transB: true });
    matmul(g, y, u, tB, N, O, R, { transB: true, alpha: 2 });
    matmul(g, dB, tdy, u, O, R, N, { transA: true, accumulate: true, alpha: 2 });
    matmul(g, du, tdy, tB, N, R, O, { alpha: 2 });
    matmul(g, dA, du, tx, R, K, N, { transA: true, accumulate: true });
    const uRef = matmulRef(x, A, N, R, K, { transB: true });
    const yRef = matmulRef(uRef, Bw, N, O, R, { transB: true, alpha: 2 });
    const dBRef = matmulRef(dy, uRef, O, R, N, { transA: true, alpha: 2 });
    const duRef = matmulRef(dy, Bw, N, R, O, { alpha: 2 });
    const dARef = matmulRef(duRef, x, R, K, N, { transA: true });
    expectClose(await g.readF32(u), uRef, { atol: 1e-4, rtol: 1e-5, label: 'u' });
    expectClose(await g.readF32(y), yRef, { atol: 2e-4, rtol: 1e-5, label: 'y' });
    expectClose(await g.readF32(dB), dBRef, { atol: 2e-3, rtol: 1e-5, label: 'dB' });
    expectClose(await g.readF32(du), duRef, { atol: 2e-4, rtol: 1e-5, label: 'du' });
    expectClose(await g.readF32(dA), dARef, { atol: 2e-3, rtol: 1e-5, label: 'dA' });
    for (const t of [tx, tA, tB, tdy, u, y, dB, du, dA]) t.release();
  });

  it('element offsets select a slice of B and of C', async () => {
    const g = gpu();
    const rng = new Rng(11);
    const [M, N, K, rows0] = [5, 7, 9, 3];
    const a = rng.f32(M * K);
    const w = rng.f32((rows0 + N + 2) * K); // [rows, K], use rows rows0 .. rows0 + N
    const ta = g.upload(a, [M, K]);
    const tw = g.upload(w, [rows0 + N + 2, K]);
    const tc = g.zeros([M * N + 4]);
    matmul(g, tc, ta, tw, M, N, K, { transB: true, bOffset: rows0 * K, cOffset: 4 });
    const ref = matmulRef(a, w.subarray(rows0 * K), M, N, K, { transB: true });
    const got = await g.readF32(tc);
    expectClose(got.subarray(0, 4), [0, 0, 0, 0], { label: 'untouched prefix' });
    expectClose(got.subarray(4), ref, { atol: 1e-4, rtol: 1e-5, label: 'C slice' });
    for (const t of [ta, tw, tc]) t.release();
  });

  it('f16 storage (shader-f16) matches the reference on f16-rounded inputs', async (ctx) => {
    const g = gpu();
    if (!g.caps.f16) {
      console.log(`skipped: ${g.caps.adapterName} has no shader-f16`);
      ctx.skip();
    }
    const rng = new Rng(3);
    for (const [transA, transB] of combos) {
      const [M, N, K] = [37, 19, 50];
      const a = f16ToF32(f32ToF16(rng.f32(M * K)));
      const b = f16ToF32(f32ToF16(rng.f32(K * N)));
      const c0 = f16ToF32(f32ToF16(rng.f32(M * N)));
      const ta = g.upload(f32ToF16(a), [M, K], 'f16');
      const tb = g.upload(f32ToF16(b), [K, N], 'f16');
      const tc = g.upload(f32ToF16(c0), [M, N], 'f16');
      matmul(g, tc, ta, tb, M, N, K, { transA, transB, accumulate: true, alpha: 0.5, dtype: 'f16' });
      const ref = matmulRef(a, b, M, N, K, { transA, transB, alpha: 0.5, c: c0 });
      // one f16 rounding of the output (2^-11 relative) after an f32 accumulation
      expectClose(await g.readF32(tc), ref, { atol: 1e-3, rtol: 1e-3, label: `f16 tA=${transA} tB=${transB}` });
      const tp = g.empty([M, N], 'f16');
      matmul(g, tp, ta, tb, M, N, K, { transA, transB, dtype: 'f16', splitK: 3 });
      expectClose(await g.readF32(tp), matmulRef(a, b, M, N, K, { transA, transB }), { atol: 1e-3, rtol: 1e-3, label: 'f16 split-K' });
      for (const t of [ta, tb, tc, tp]) t.release();
    }
  });
});
