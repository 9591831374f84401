import { describe, expect, it } from 'vitest';
import { loraDecode } from '../../src/kernels/lora-decode';
import { matmulRef } from '../../src/kernels/matmul.ref';
import { useGpu } from '../helpers/gpu';
import { Rng, expectClose } from '../helpers/numeric';

describe('batched LoRA decode products (A products of several projections in one dispatch)', () => {
  const gpu = useGpu();

  it.each([
    [1, 64, 4, [48]],
    [3, 100, 8, [40, 24, 24]],
    [8, 256, 16, [64, 32]],
    [21, 96, 4, [17, 9, 33]],
  ])('y_p += scale_p (x A_p^T) B_p^T matches f64 (N=%i K=%i R=%i M=%j)', async (N, K, R, Ms) => {
    const g = gpu();
    const rng = new Rng(N * 7 + K);
    const x = rng.f32(N * K);
    const tx = g.upload(x, [N, K]);
    const terms = Ms.map((M, p) => {
      const A = rng.f32(R * K);
      const B = rng.f32(M * R);
      const y0 = rng.f32(N * M);
      return { A, B, y0, M, scale: 0.5 + p, tA: g.upload(A, [R, K]), tB: g.upload(B, [M, R]), ty: g.upload(y0, [N, M]) };
    });
    const before = g.dispatches;
    loraDecode(g, tx, N, K, terms.map((t) => ({ A: t.tA, B: t.tB, scale: t.scale, y: t.ty, M: t.M })));
    expect(g.dispatches - before).toBe(1 + Ms.length);
    for (const [p, t] of terms.entries()) {
      const u = matmulRef(x, t.A, N, R, K, { transB: true });
      const lora = matmulRef(u, t.B, N, t.M, R, { transB: true });
      const expected = Float64Array.from(t.y0, (v, i) => v + t.scale * lora[i]!);
      expectClose(await g.readF32(t.ty), expected, { atol: 1e-4, rtol: 1e-4, label: `y${p}` });
      for (const b of [t.tA, t.tB, t.ty]) b.release();
    }
    tx.release();
  });

  it('refuses mismatched ranks and too many rows with a clear message', () => {
    const g = gpu();
    const x = g.zeros([2, 32]);
    const a4 = g.zeros([4, 32]);
    const a8 = g.zeros([8, 32]);
    const b4 = g.zeros([16, 4]);
    const b8 = g.zeros([16, 8]);
    const y = g.zeros([2, 16]);
    expect(() => loraDecode(g, x, 2, 32, [{ A: a4, B: b4, scale: 1, y, M: 16 }, { A: a8, B: b8, scale: 1, y, M: 16 }])).toThrow(/need one rank/);
    expect(() => loraDecode(g, x, 40, 32, [{ A: a4, B: b4, scale: 1, y, M: 16 }])).toThrow(/N <= 32/);
    for (const t of [x, a4, a8, b4, b8, y]) t.release();
  });
});
