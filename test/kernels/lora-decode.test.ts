import { describe, expect, it } from 'vitest';
import { loraDecode, loraDownProducts, loraNormDownProducts } from '../../src/kernels/lora-decode';
import { rmsnormRef } from '../../src/kernels/rmsnorm.ref';
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

  // The norm fused with the A products: K below, at and above the 64-thread workgroup,
  // rows past a group of 8, with and without a pending B product folded into the input.
  for (const sg of [true, false]) {
    it(`RMSNorm + A products (${sg ? 'subgroupAdd' : 'the workgroup-memory tree'}) match f64: h and u, with and without a pending B product`, async (ctx) => {
      const g = gpu();
      console.log(`adapter: ${g.caps.adapterName} (subgroups ${g.caps.subgroups ? 'yes' : 'no'})`);
      if (sg && !g.caps.subgroups) {
        console.log(`skipped: adapter ${g.caps.adapterName} lacks subgroups`);
        ctx.skip();
      }
      const eps = 1e-5;
      for (const [N, K, R, nA, withPending] of [
        [1, 48, 4, 3, false],
        [3, 7, 3, 2, true],
        [11, 65, 5, 1, false],
        [9, 131, 2, 3, true],
      ] as const) {
        const rng = new Rng(N * 31 + K + nA);
        const x = rng.f32(N * K);
        const nw = rng.f32(K, 0.5).map((v) => 1 + v);
        const As = Array.from({ length: nA }, () => rng.f32(R * K));
        const scales = As.map((_, p) => 0.5 + p);
        const pu = rng.f32(N * R);
        const pb = rng.f32(K * R);
        // x' = x (+ pu pb^T), in f64
        const xin = Float64Array.from(x);
        if (withPending) {
          const add = matmulRef(pu, pb, N, K, R, { transB: true });
          for (let i = 0; i < N * K; i++) xin[i]! += add[i]!;
        }
        const hRef = rmsnormRef(xin, nw, N, K, eps).out;
        const tx = g.upload(x, [N, K]);
        const tw = g.upload(nw, [K]);
        const th = g.empty([N, K]);
        const tAs = As.map((A) => g.upload(A, [R, K]));
        const pending = withPending ? { u: g.upload(pu, [N, R]), B: g.upload(pb, [K, R]) } : null;
        const u = loraNormDownProducts(g, th, tx, tw, eps, N, K, tAs.map((A, p) => ({ A, scale: scales[p]! })), pending, { subgroups: sg });
        const label = `N=${N} K=${K} R=${R} nA=${nA}${withPending ? ' pending' : ''}`;
        expectClose(await g.readF32(th), hRef, { atol: 1e-5, rtol: 1e-4, label: `${label} h` });
        const uGot = await g.readF32(u);
        As.forEach((A, p) => {
          const uRef = matmulRef(hRef, A, N, R, K, { transB: true }).map((v) => scales[p]! * v);
          expectClose(uGot.subarray(p * N * R, (p + 1) * N * R), uRef, { atol: 1e-4, rtol: 1e-4, label: `${label} u${p}` });
        });
        for (const t of [tx, tw, th, u, ...tAs, ...(pending ? [pending.u, pending.B] : [])]) t.release();
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
