import { describe, expect, it } from 'vitest';
import { loraDecode, loraDownProducts } from '../../src/kernels/lora-decode';
import { matmulRef } from '../../src/kernels/matmul.ref';
import type { Gpu } from '../../src/gpu/gpu';
import { useGpu } from '../helpers/gpu';
import { Rng, expectClose } from '../helpers/numeric';

/** One projection per width in Ms: A [R, K], B [M, R], the output's starting value [N, M], scale 0.5 + p; host copies and uploads. */
function makeTerms(g: Gpu, rng: Rng, N: number, K: number, R: number, Ms: readonly number[]) {
  return Ms.map((M, p) => {
    const A = rng.f32(R * K);
    const B = rng.f32(M * R);
    const y0 = rng.f32(N * M);
    return { A, B, y0, M, scale: 0.5 + p, tA: g.upload(A, [R, K]), tB: g.upload(B, [M, R]), ty: g.upload(y0, [N, M]) };
  });
}

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
    const terms = makeTerms(g, rng, N, K, R, Ms);
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

  // Input rows past a group of 8 and ragged, K below, at and above the 64-thread workgroup.
  for (const sg of [true, false]) {
    it(`A products reduced with ${sg ? 'subgroupAdd' : 'the workgroup-memory tree'} match f64`, async (ctx) => {
      const g = gpu();
      console.log(`adapter: ${g.caps.adapterName} (subgroups ${g.caps.subgroups ? 'yes' : 'no'})`);
      if (sg && !g.caps.subgroups) {
        console.log(`skipped: adapter ${g.caps.adapterName} lacks subgroups`);
        ctx.skip();
      }
      for (const [N, K, R, Ms] of [
        [3, 7, 3, [5, 9]],
        [11, 65, 5, [13]],
        [9, 131, 2, [7, 3, 11]],
      ] as const) {
        const rng = new Rng(N * 13 + K);
        const x = rng.f32(N * K);
        const tx = g.upload(x, [N, K]);
        const terms = makeTerms(g, rng, N, K, R, Ms);
        loraDecode(g, tx, N, K, terms.map((t) => ({ A: t.tA, B: t.tB, scale: t.scale, y: t.ty, M: t.M })), { subgroups: sg });
        const u = loraDownProducts(g, tx, N, K, terms.map((t) => ({ A: t.tA, scale: t.scale })), { subgroups: sg });
        const uGot = await g.readF32(u);
        for (const [p, t] of terms.entries()) {
          const label = `N=${N} K=${K} R=${R} projection ${p}`;
          const uRef = matmulRef(x, t.A, N, R, K, { transB: true });
          expectClose(uGot.subarray(p * N * R, (p + 1) * N * R), uRef.map((v) => t.scale * v), { atol: 1e-5, rtol: 1e-4, label: `${label} packed u` });
          const lora = matmulRef(uRef, t.B, N, t.M, R, { transB: true });
          const expected = Float64Array.from(t.y0, (v, i) => v + t.scale * lora[i]!);
          expectClose(await g.readF32(t.ty), expected, { atol: 1e-4, rtol: 1e-4, label: `${label} y` });
          for (const b of [t.tA, t.tB, t.ty]) b.release();
        }
        u.release();
        tx.release();
      }
    });
  }

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
