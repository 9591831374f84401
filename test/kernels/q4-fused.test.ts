import { describe, expect, it } from 'vitest';
import { loraDownProducts, loraNormDownProducts } from '../../src/kernels/lora-decode';
import { rmsnormRef } from '../../src/kernels/rmsnorm.ref';
import { matmulRef } from '../../src/kernels/matmul.ref';
import type { Q4GemvTuning } from '../../src/kernels/q4';
import { Q4_FUSED_MAX_BINDINGS, q4FusedBindings, q4FusedGemv, q4FusedUnsupported, type Q4FusedMode } from '../../src/kernels/q4-fused';
import { releaseQ4, uploadQ4 } from '../../src/kernels/q4-layout';
import { dequantizeQ4Ref, quantizeQ4Ref } from '../../src/kernels/q4.ref';
import { useGpu } from '../helpers/gpu';
import { Rng, expectClose } from '../helpers/numeric';
import { q4MatmulRef, randomWeights } from '../helpers/q4-fixtures';

interface Case {
  mode: Q4FusedMode;
  N: number;
  K: number;
  /** rows of each projection */
  Ms: number[];
  zeros: boolean;
  /** LoRA rank, 0 = not adapted */
  R: number;
  accumulate?: boolean;
  /** all projections as row ranges of one packed weight */
  packed?: boolean;
  tuning?: Q4GemvTuning;
  /** rank of LoRA A products computed by extra workgroups of the dispatch (rows mode) */
  down?: number;
  /** reduction path: subgroups (true), workgroup-memory trees (false), default the device's */
  subgroups?: boolean;
}

const cases: Case[] = [
  { mode: 'rows', N: 1, K: 64, Ms: [24, 8, 8], zeros: true, R: 0 },
  { mode: 'rows', N: 3, K: 100, Ms: [13, 5, 7], zeros: false, R: 0 },
  { mode: 'rows', N: 8, K: 96, Ms: [40, 9, 9], zeros: false, R: 4, tuning: { lanes: 8, groups: 4, rowsPerThread: 2 } },
  { mode: 'rows', N: 11, K: 72, Ms: [17, 3, 3], zeros: true, R: 3, packed: true },
  { mode: 'rows', N: 5, K: 160, Ms: [37], zeros: false, R: 2, accumulate: true },
  { mode: 'rows', N: 20, K: 40, Ms: [19], zeros: true, R: 0, accumulate: true },
  { mode: 'rows', N: 2, K: 96, Ms: [24, 8, 8], zeros: true, R: 4, packed: true },
  { mode: 'rows', N: 9, K: 100, Ms: [13, 6, 6], zeros: false, R: 0, packed: true },
  // The A products beside a residual GEMV (o, down in a decode step), with or without the previous B product.
  { mode: 'rows', N: 11, K: 72, Ms: [37], zeros: true, R: 3, accumulate: true, down: 3 },
  { mode: 'rows', N: 1, K: 96, Ms: [24], zeros: false, R: 0, accumulate: true, down: 5, tuning: { lanes: 8, groups: 3, rowsPerThread: 2 } },
  { mode: 'rows', N: 32, K: 64, Ms: [40], zeros: true, R: 4, accumulate: true, down: 4 },
  { mode: 'rows', N: 6, K: 100, Ms: [13, 5, 7], zeros: false, R: 2, packed: true, down: 2 },
  { mode: 'swiglu', N: 4, K: 72, Ms: [22, 22], zeros: true, R: 3, packed: true },
  { mode: 'swiglu', N: 1, K: 64, Ms: [30, 30], zeros: true, R: 0 },
  { mode: 'swiglu', N: 3, K: 100, Ms: [21, 21], zeros: false, R: 4 },
  { mode: 'swiglu', N: 9, K: 96, Ms: [45, 45], zeros: true, R: 2, tuning: { lanes: 16, groups: 2, rowsPerThread: 3 } },
  // Both reduction paths forced, row groups of 2..32 lanes on subgroups of 4 and 8: the
  // defaults above take the subgroup path wherever the adapter has subgroups.
  { mode: 'rows', N: 3, K: 100, Ms: [13, 5, 7], zeros: false, R: 2, subgroups: false },
  { mode: 'rows', N: 1, K: 96, Ms: [24], zeros: false, R: 0, accumulate: true, down: 5, tuning: { lanes: 8, groups: 3, rowsPerThread: 2 }, subgroups: false },
  { mode: 'swiglu', N: 3, K: 100, Ms: [21, 21], zeros: false, R: 4, subgroups: false },
  { mode: 'rows', N: 5, K: 72, Ms: [11, 3], zeros: true, R: 0, down: 3, tuning: { lanes: 2, groups: 5, rowsPerThread: 1 }, subgroups: true },
  { mode: 'swiglu', N: 2, K: 160, Ms: [9, 9], zeros: false, R: 0, tuning: { lanes: 4, groups: 4, rowsPerThread: 2 }, subgroups: true },
];

const name = (c: Case) =>
  `${c.mode} N=${c.N} K=${c.K} M=[${c.Ms}]${c.zeros ? ' zeros' : ''}${c.R ? ` lora r=${c.R}` : ''}${c.accumulate ? ' +=' : ''}${c.packed ? ' packed' : ''}${c.down ? ` A products r=${c.down}` : ''}${c.tuning ? ` ${JSON.stringify(c.tuning)}` : ''}` +
  `${c.subgroups === undefined ? '' : c.subgroups ? ' subgroups' : ' workgroup-memory trees'}`;

const silu = (g: number) => g / (1 + Math.exp(-g));

describe('fused 4-bit GEMV (q/k/v in one dispatch; gate, up and SwiGLU in one; LoRA B in the epilogue)', () => {
  const gpu = useGpu();

  it.for(cases.map((c) => [name(c), c] as const))('matches the f64 reference (%s)', { timeout: 240_000 /* lavapipe compiles each variant with LLVM on first use */ }, async ([, c], ctx) => {
    const g = gpu();
    console.log(`adapter: ${g.caps.adapterName} (subgroups ${g.caps.subgroups ? 'yes' : 'no'})`);
    if (c.subgroups && !g.caps.subgroups) {
      console.log(`skipped: adapter ${g.caps.adapterName} lacks subgroups`);
      ctx.skip();
    }
    const need = q4FusedBindings(c.Ms.length, c.zeros, c.R > 0, c.packed ? 1 : c.Ms.length, c.down !== undefined);
    const limit = Math.min(g.caps.maxStorageBuffersPerShaderStage, Q4_FUSED_MAX_BINDINGS);
    if (need > limit) {
      const why = `adapter allows ${g.caps.maxStorageBuffersPerShaderStage} storage bindings per stage (the kernel ${Q4_FUSED_MAX_BINDINGS}), this group needs ${need}`;
      console.log(`skipped: ${why}`);
      ctx.skip(why);
    }
    const rng = new Rng(c.N * 131 + c.K * 7 + c.Ms[0]!);
    const x = rng.f32(c.N * c.K);
    const weights = c.Ms.map((M) => {
      const packed = quantizeQ4Ref(randomWeights(rng, M, c.K), M, c.K, c.zeros);
      return { M, packed, wq: dequantizeQ4Ref(packed), W: c.packed ? null : uploadQ4(g, packed, M, c.K) };
    });
    // Packed: the projections' rows stacked in one weight (quantization is per row, so the bytes are the same).
    const Mtot = c.Ms.reduce((a, m) => a + m, 0);
    const stack = <T extends Uint8Array | Uint16Array>(parts: T[], make: (n: number) => T): T => {
      const out = make(parts.reduce((a, x) => a + x.length, 0));
      let o = 0;
      for (const x of parts) {
        out.set(x, o);
        o += x.length;
      }
      return out;
    };
    const packedW = c.packed
      ? uploadQ4(
          g,
          {
            qweight: stack(weights.map((w) => w.packed.qweight), (n) => new Uint8Array(n)),
            scales: stack(weights.map((w) => w.packed.scales), (n) => new Uint16Array(n)),
            zeros: c.zeros ? stack(weights.map((w) => w.packed.zeros!), (n) => new Uint8Array(n)) : null,
          },
          Mtot,
          c.K,
        )
      : null;
    const Bs = c.R ? c.Ms.map((M) => rng.f32(M * c.R, 0.5)) : [];
    const u = c.R ? rng.f32(c.Ms.length * c.N * c.R) : null;
    const swiglu = c.mode === 'swiglu';
    const offsets: number[] = [];
    let cols = 0;
    for (const M of c.Ms) {
      offsets.push(cols);
      cols += M;
    }
    const yStride = swiglu ? c.Ms[0]! + 3 : cols + 2; // padded rows prove the stride and offsets
    const yOffset0 = swiglu ? 2 : 0;
    const y0 = rng.f32(c.N * yStride);
    const tx = g.upload(x, [c.N, c.K]);
    const ty = g.upload(y0, [c.N, yStride]);
    const tu = u ? g.upload(u, [c.Ms.length, c.N, c.R]) : null;
    const tB = Bs.map((b, p) => g.upload(b, [c.Ms[p]!, c.R]));
    const segs = weights.map((w, p) => ({
      W: packedW ?? w.W!,
      rowStart: packedW ? offsets[p]! : 0,
      rows: w.M,
      yOffset: swiglu ? yOffset0 : offsets[p]!,
      B: tB[p] ?? null,
    }));
    const RA = c.down ?? 0;
    const A = RA ? rng.f32(RA * c.K) : null;
    const scaleA = -1.75;
    const down = A ? { A: g.upload(A, [RA, c.K]), scale: scaleA, u: g.upload(rng.f32(c.N * RA), [c.N, RA]) } : null;
    expect(q4FusedUnsupported(g, segs, c.N, down !== null)).toBeNull();
    const before = g.dispatches;
    q4FusedGemv(g, ty, tx, c.N, segs, { mode: c.mode, yStride, accumulate: c.accumulate, u: tu, R: c.R, tuning: c.tuning, down, subgroups: c.subgroups });
    expect(g.dispatches - before).toBe(1);
    if (down) {
      const expectedU = matmulRef(x, A!, c.N, RA, c.K, { transB: true }).map((v) => scaleA * v);
      expectClose(await g.readF32(down.u), expectedU, { atol: 1e-5 * Math.sqrt(c.K), rtol: 1e-4, label: 'A products' });
      down.A.release();
      down.u.release();
    }

    // float64 reference: base products, the LoRA term sum_r u[p, n, r] B_p[j, r], the epilogue
    const proj = weights.map((w, p) => {
      const base = q4MatmulRef(x, w.wq, c.N, c.K, 0, w.M);
      if (c.R) {
        for (let n = 0; n < c.N; n++) {
          for (let j = 0; j < w.M; j++) {
            let s = 0;
            for (let r = 0; r < c.R; r++) s += u![(p * c.N + n) * c.R + r]! * Bs[p]![j * c.R + r]!;
            base[n * w.M + j] += s;
          }
        }
      }
      return base;
    });
    const expected = Float64Array.from(y0);
    for (let n = 0; n < c.N; n++) {
      if (swiglu) {
        const F = c.Ms[0]!;
        for (let j = 0; j < F; j++) expected[n * yStride + yOffset0 + j] = silu(proj[0]![n * F + j]!) * proj[1]![n * F + j]!;
      } else {
        proj.forEach((pr, p) => {
          const M = c.Ms[p]!;
          for (let j = 0; j < M; j++) {
            const o = n * yStride + offsets[p]! + j;
            expected[o] = (c.accumulate ? expected[o]! : 0) + pr[n * M + j]!;
          }
        });
      }
    }
    expectClose(await g.readF32(ty), expected, { atol: 3e-5 * Math.sqrt(c.K + c.R), rtol: 1e-4, label: 'y' });
    tx.release();
    ty.release();
    tu?.release();
    for (const b of tB) b.release();
    for (const w of weights) if (w.W) releaseQ4(w.W);
    if (packedW) releaseQ4(packedW);
  });

  it('the packed LoRA A products feed the epilogue: u[p] = scale_p x A_p^T in one dispatch', async () => {
    const g = gpu();
    const rng = new Rng(77);
    const N = 5;
    const K = 72;
    const R = 4;
    const x = rng.f32(N * K);
    const tx = g.upload(x, [N, K]);
    const As = [0, 1, 2].map(() => rng.f32(R * K));
    const tA = As.map((a) => g.upload(a, [R, K]));
    const scales = [0.5, -2, 1.25];
    const before = g.dispatches;
    const u = loraDownProducts(g, tx, N, K, tA.map((A, p) => ({ A, scale: scales[p]! })));
    expect(g.dispatches - before).toBe(1);
    expect(u.shape).toEqual([3, N, R]);
    const expected = new Float64Array(3 * N * R);
    As.forEach((A, p) => matmulRef(x, A, N, R, K, { transB: true }).forEach((v, i) => (expected[p * N * R + i] = scales[p]! * v)));
    expectClose(await g.readF32(u), expected, { atol: 1e-5 * Math.sqrt(K), rtol: 1e-4, label: 'u' });
    for (const t of [tx, u, ...tA]) t.release();
  });

  it('RMSNorm fused with the A products: h = rmsnorm(x), u[p] = scale_p h A_p^T in one dispatch', async () => {
    const g = gpu();
    const rng = new Rng(91);
    const [N, K, R, eps] = [11, 100, 3, 1e-5];
    const x = rng.f32(N * K, 2);
    const nw = rng.f32(K);
    const As = [0, 1].map(() => rng.f32(R * K));
    const scales = [0.75, -1.5];
    const tx = g.upload(x, [N, K]);
    const tw = g.upload(nw, [K]);
    const tA = As.map((a) => g.upload(a, [R, K]));
    const th = g.empty([N, K]);
    const before = g.dispatches;
    const u = loraNormDownProducts(g, th, tx, tw, eps, N, K, tA.map((A, p) => ({ A, scale: scales[p]! })));
    expect(g.dispatches - before).toBe(1);
    const { out: h } = rmsnormRef(x, nw, N, K, eps);
    expectClose(await g.readF32(th), h, { atol: 1e-5, rtol: 1e-5, label: 'h' });
    const expected = new Float64Array(2 * N * R);
    As.forEach((A, p) => matmulRef(h, A, N, R, K, { transB: true }).forEach((v, i) => (expected[p * N * R + i] = scales[p]! * v)));
    expectClose(await g.readF32(u), expected, { atol: 1e-5 * Math.sqrt(K), rtol: 1e-4, label: 'u' });
    for (const t of [tx, tw, th, u, ...tA]) t.release();
  });

  it('RMSNorm of x + u_p B_p^T (a deferred LoRA B product, x not written) fused with the A products', async () => {
    const g = gpu();
    const rng = new Rng(93);
    const [N, K, R, eps] = [13, 72, 4, 1e-5];
    const x = rng.f32(N * K, 2);
    const nw = rng.f32(K);
    const As = [0, 1, 2].map(() => rng.f32(R * K));
    const pu = rng.f32(N * R);
    const pb = rng.f32(K * R, 0.5);
    const scales = [0.5, -1, 2];
    const tx = g.upload(x, [N, K]);
    const tw = g.upload(nw, [K]);
    const tA = As.map((a) => g.upload(a, [R, K]));
    const pending = { u: g.upload(pu, [N, R]), B: g.upload(pb, [K, R]) };
    const th = g.empty([N, K]);
    const before = g.dispatches;
    const u = loraNormDownProducts(g, th, tx, tw, eps, N, K, tA.map((A, p) => ({ A, scale: scales[p]! })), pending);
    expect(g.dispatches - before).toBe(1);
    const xp = Float64Array.from(x);
    const ub = matmulRef(pu, pb, N, K, R, { transB: true });
    for (let i = 0; i < N * K; i++) xp[i] += ub[i]!;
    const { out: h } = rmsnormRef(xp, nw, N, K, eps);
    expectClose(await g.readF32(th), h, { atol: 1e-5, rtol: 1e-5, label: 'h' });
    expectClose(await g.readF32(tx), x, { atol: 0, rtol: 0, label: 'x unchanged' });
    const expected = new Float64Array(3 * N * R);
    As.forEach((A, p) => matmulRef(h, A, N, R, K, { transB: true }).forEach((v, i) => (expected[p * N * R + i] = scales[p]! * v)));
    expectClose(await g.readF32(u), expected, { atol: 1e-5 * Math.sqrt(K), rtol: 1e-4, label: 'u' });
    const wrongRank = g.zeros([K, R + 1]);
    expect(() => loraNormDownProducts(g, th, tx, tw, eps, N, K, [{ A: tA[0]!, scale: 1 }], { u: pending.u, B: wrongRank })).toThrow(/one rank/);
    for (const t of [tx, tw, th, u, pending.u, pending.B, wrongRank, ...tA]) t.release();
  });

  it('names why a group cannot be fused (sharded weight, mixed adaptation, too many bindings, rows)', () => {
    const g = gpu();
    const rng = new Rng(3);
    const mk = (M: number, K: number, shard?: number) => uploadQ4(g, quantizeQ4Ref(randomWeights(rng, M, K), M, K, true), M, K, shard);
    const a = mk(16, 64);
    const b = mk(16, 64);
    const sharded = mk(40, 64, 256);
    const other = mk(16, 32);
    const B = g.zeros([16, 2]);
    expect(q4FusedUnsupported(g, [{ W: sharded, yOffset: 0 }], 1)).toMatch(/shards/);
    expect(q4FusedUnsupported(g, [{ W: a, yOffset: 0 }, { W: other, yOffset: 16 }], 1)).toMatch(/input widths/);
    expect(q4FusedUnsupported(g, [{ W: a, yOffset: 0, B }, { W: b, yOffset: 16 }], 1)).toMatch(/only some/);
    expect(q4FusedUnsupported(g, [{ W: a, yOffset: 0 }], 33)).toMatch(/N=33/);
    const need = q4FusedBindings(3, true, true);
    expect(need).toBe(15);
    expect(q4FusedBindings(3, true, true, 1)).toBe(9); // one packed weight: its buffers are bound once
    const c = mk(16, 64);
    expect(q4FusedUnsupported(g, [a, b, c].map((W, i) => ({ W, yOffset: 16 * i, B })), 1)).toMatch(/15 storage bindings/);
    expect(q4FusedUnsupported(g, [{ W: a, rowStart: 10, rows: 8, yOffset: 0 }], 1)).toMatch(/outside a weight/);
    expect(q4FusedUnsupported(g, [0, 8].map((r) => ({ W: a, rowStart: r, rows: 8, yOffset: r, B: null })), 1)).toBeNull();
    const y = g.zeros([1, 16]);
    const x = g.zeros([1, 64]);
    expect(() => q4FusedGemv(g, y, x, 1, [{ W: sharded, yOffset: 0 }], { yStride: 40 })).toThrow(/cannot fuse a weight split/);
    for (const t of [B, y, x]) t.release();
    for (const w of [a, b, c, sharded, other]) releaseQ4(w);
  });
});
