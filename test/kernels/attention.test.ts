import { describe, expect, it } from 'vitest';
import type { Gpu } from '../../src/gpu/gpu';
import type { Tensor } from '../../src/gpu/tensor';
import {
  attentionBackward,
  attentionDecode,
  attentionForward,
  attentionWorkgroupBytes,
  defaultAttentionTiles,
  defaultDecodeTiles,
  decodeWorkgroupBytes,
  kvCacheWrite,
  type AttentionOptions,
  type DecodeTiles,
} from '../../src/kernels/attention';
import { attentionBackwardRef, attentionDecodeRef, attentionRef } from '../../src/kernels/attention.ref';
import { useGpu } from '../helpers/gpu';
import { Rng, expectClose, finiteDiff, toF64 } from '../helpers/numeric';

interface Shape {
  B: number;
  T: number;
  S: number;
  H: number;
  HK: number;
  D: number;
}

const shapeName = ({ B, T, S, H, HK, D }: Shape) => `B=${B} T=${T} S=${S} H=${H} HK=${HK} D=${D}`;

function inputs(s: Shape, seed: number, scale = 1) {
  const rng = new Rng(seed);
  return {
    q: rng.f32(s.B * s.T * s.H * s.D, scale),
    k: rng.f32(s.B * s.S * s.HK * s.D, scale),
    v: rng.f32(s.B * s.S * s.HK * s.D),
    dout: rng.f32(s.B * s.T * s.H * s.D),
  };
}

function upload(g: Gpu, s: Shape, x: ReturnType<typeof inputs>) {
  return {
    q: g.upload(x.q, [s.B, s.T, s.H, s.D]),
    k: g.upload(x.k, [s.B, s.S, s.HK, s.D]),
    v: g.upload(x.v, [s.B, s.S, s.HK, s.D]),
    dout: g.upload(x.dout, [s.B, s.T, s.H, s.D]),
    out: g.empty([s.B, s.T, s.H, s.D]),
    lse: g.empty([s.B, s.H, s.T]),
  };
}

function releaseAll(...ts: Tensor[]): void {
  for (const t of ts) t.release();
}

describe('attention tiles', () => {
  it('defaults fit 16 KiB of workgroup memory and 128 threads for Llama head dims', () => {
    for (const D of [8, 16, 64, 128]) {
      for (const kind of ['forward', 'dq', 'dkdv'] as const) {
        const t = defaultAttentionTiles(kind, D);
        expect(attentionWorkgroupBytes(kind, D, t)).toBeLessThanOrEqual(16384);
        expect(t.rows * t.tpr).toBeLessThanOrEqual(128);
        expect((D / 4) % t.tpr).toBe(0);
      }
      for (const G of [1, 3, 4, 8]) expect(decodeWorkgroupBytes(D, G, defaultDecodeTiles(D, G))).toBeLessThanOrEqual(16384);
    }
  });
});

describe('attention forward', () => {
  const gpu = useGpu();

  const cases: [Shape, AttentionOptions | undefined][] = [
    [{ B: 1, T: 1, S: 1, H: 4, HK: 2, D: 8 }, undefined],
    [{ B: 2, T: 7, S: 7, H: 4, HK: 2, D: 16 }, undefined],
    [{ B: 1, T: 37, S: 37, H: 8, HK: 1, D: 16 }, undefined],
    [{ B: 2, T: 37, S: 50, H: 4, HK: 4, D: 8 }, undefined],
    [{ B: 2, T: 1, S: 13, H: 4, HK: 2, D: 16 }, undefined],
    [{ B: 1, T: 7, S: 19, H: 4, HK: 2, D: 64 }, undefined],
    [{ B: 1, T: 9, S: 12, H: 3, HK: 1, D: 128 }, undefined],
    // Ragged tiles: blocks that split a group of heads, keys tiles that straddle S.
    [{ B: 2, T: 37, S: 41, H: 4, HK: 2, D: 16 }, { forward: { rows: 3, cols: 5, tpr: 4 } }],
    [{ B: 1, T: 37, S: 37, H: 8, HK: 1, D: 16 }, { forward: { rows: 4, cols: 4, tpr: 2 } }],
    [{ B: 1, T: 11, S: 11, H: 2, HK: 2, D: 64 }, { forward: { rows: 16, cols: 2, tpr: 8 } }],
  ];

  it.each(cases)('matches the f64 reference (%o, tiles %o)', async (s, opts) => {
    const g = gpu();
    const x = inputs(s, s.T * 7 + s.D, 1.5);
    const t = upload(g, s, x);
    attentionForward(g, t.out, t.lse, t.q, t.k, t.v, s.B, s.T, s.S, s.H, s.HK, s.D, opts);
    const ref = attentionRef(x.q, x.k, x.v, s.B, s.T, s.S, s.H, s.HK, s.D);
    expectClose(await g.readF32(t.out), ref.out, { atol: 2e-5, rtol: 1e-4, label: `out ${shapeName(s)}` });
    expectClose(await g.readF32(t.lse), ref.lse, { atol: 2e-5, rtol: 1e-5, label: `lse ${shapeName(s)}` });
    releaseAll(t.q, t.k, t.v, t.dout, t.out, t.lse);
  });
});

describe('attention backward', () => {
  const gpu = useGpu();

  it('the analytic f64 reference backward matches finite differences', () => {
    const s = { B: 2, T: 3, S: 5, H: 4, HK: 2, D: 4 };
    const x = inputs(s, 11);
    const grads = attentionBackwardRef(x.dout, x.q, x.k, x.v, s.B, s.T, s.S, s.H, s.HK, s.D);
    const fd = fdGrads(s, x);
    expectClose(grads.dq, fd.dq, { atol: 1e-7, rtol: 1e-6, label: 'ref dq' });
    expectClose(grads.dk, fd.dk, { atol: 1e-7, rtol: 1e-6, label: 'ref dk' });
    expectClose(grads.dv, fd.dv, { atol: 1e-7, rtol: 1e-6, label: 'ref dv' });
  });

  const cases: [Shape, AttentionOptions | undefined][] = [
    [{ B: 1, T: 5, S: 5, H: 4, HK: 2, D: 8 }, undefined],
    [{ B: 2, T: 3, S: 6, H: 2, HK: 2, D: 8 }, undefined],
    [{ B: 1, T: 6, S: 9, H: 8, HK: 1, D: 8 }, undefined],
    [{ B: 1, T: 1, S: 4, H: 2, HK: 1, D: 16 }, undefined],
    [{ B: 1, T: 7, S: 7, H: 4, HK: 2, D: 16 }, { dq: { rows: 3, cols: 2, tpr: 2 }, dkdv: { rows: 3, cols: 5, tpr: 4 } }],
    [{ B: 2, T: 5, S: 8, H: 3, HK: 1, D: 8 }, { dq: { rows: 5, cols: 3, tpr: 1 }, dkdv: { rows: 2, cols: 3, tpr: 2 } }],
  ];

  it.each(cases)('matches finite differences of the f64 reference (%o, tiles %o)', async (s, opts) => {
    const g = gpu();
    const x = inputs(s, 3 + s.T * s.S);
    const fd = fdGrads(s, x);
    const t = upload(g, s, x);
    const dq = g.empty([s.B, s.T, s.H, s.D]);
    const dk = g.empty([s.B, s.S, s.HK, s.D]);
    const dv = g.empty([s.B, s.S, s.HK, s.D]);
    attentionForward(g, t.out, t.lse, t.q, t.k, t.v, s.B, s.T, s.S, s.H, s.HK, s.D, opts);
    attentionBackward(g, dq, dk, dv, t.dout, t.out, t.lse, t.q, t.k, t.v, s.B, s.T, s.S, s.H, s.HK, s.D, opts);
    const tol = { atol: 5e-5, rtol: 5e-4 };
    expectClose(await g.readF32(dq), fd.dq, { ...tol, label: `dq ${shapeName(s)}` });
    expectClose(await g.readF32(dk), fd.dk, { ...tol, label: `dk ${shapeName(s)}` });
    expectClose(await g.readF32(dv), fd.dv, { ...tol, label: `dv ${shapeName(s)}` });
    releaseAll(t.q, t.k, t.v, t.dout, t.out, t.lse, dq, dk, dv);
  });

  it('D=64 and D=128 with default tiles match the analytic reference', async () => {
    const g = gpu();
    for (const s of [
      { B: 1, T: 13, S: 17, H: 4, HK: 2, D: 64 },
      { B: 1, T: 9, S: 9, H: 3, HK: 1, D: 128 },
    ]) {
      const x = inputs(s, s.D);
      const ref = attentionBackwardRef(x.dout, x.q, x.k, x.v, s.B, s.T, s.S, s.H, s.HK, s.D);
      const t = upload(g, s, x);
      const dq = g.empty([s.B, s.T, s.H, s.D]);
      const dk = g.empty([s.B, s.S, s.HK, s.D]);
      const dv = g.empty([s.B, s.S, s.HK, s.D]);
      attentionForward(g, t.out, t.lse, t.q, t.k, t.v, s.B, s.T, s.S, s.H, s.HK, s.D);
      attentionBackward(g, dq, dk, dv, t.dout, t.out, t.lse, t.q, t.k, t.v, s.B, s.T, s.S, s.H, s.HK, s.D);
      const tol = { atol: 5e-5, rtol: 5e-4 };
      expectClose(await g.readF32(dq), ref.dq, { ...tol, label: `dq ${shapeName(s)}` });
      expectClose(await g.readF32(dk), ref.dk, { ...tol, label: `dk ${shapeName(s)}` });
      expectClose(await g.readF32(dv), ref.dv, { ...tol, label: `dv ${shapeName(s)}` });
      releaseAll(t.q, t.k, t.v, t.dout, t.out, t.lse, dq, dk, dv);
    }
  });

  it('T=2048: forward and backward match the f64 reference', async () => {
    const g = gpu();
    const s = { B: 1, T: 2048, S: 2048, H: 2, HK: 1, D: 16 };
    const x = inputs(s, 2048, 1.5);
    const t = upload(g, s, x);
    const dq = g.empty([s.B, s.T, s.H, s.D]);
    const dk = g.empty([s.B, s.S, s.HK, s.D]);
    const dv = g.empty([s.B, s.S, s.HK, s.D]);
    attentionForward(g, t.out, t.lse, t.q, t.k, t.v, s.B, s.T, s.S, s.H, s.HK, s.D);
    attentionBackward(g, dq, dk, dv, t.dout, t.out, t.lse, t.q, t.k, t.v, s.B, s.T, s.S, s.H, s.HK, s.D);
    const ref = attentionRef(x.q, x.k, x.v, s.B, s.T, s.S, s.H, s.HK, s.D);
    expectClose(await g.readF32(t.out), ref.out, { atol: 2e-5, rtol: 1e-4, label: 'out T=2048' });
    expectClose(await g.readF32(t.lse), ref.lse, { atol: 2e-5, rtol: 1e-5, label: 'lse T=2048' });
    const grads = attentionBackwardRef(x.dout, x.q, x.k, x.v, s.B, s.T, s.S, s.H, s.HK, s.D);
    const tol = { atol: 1e-4, rtol: 1e-3 };
    expectClose(await g.readF32(dq), grads.dq, { ...tol, label: 'dq T=2048' });
    expectClose(await g.readF32(dk), grads.dk, { ...tol, label: 'dk T=2048' });
    expectClose(await g.readF32(dv), grads.dv, { ...tol, label: 'dv T=2048' });
    releaseAll(t.q, t.k, t.v, t.dout, t.out, t.lse, dq, dk, dv);
  });
});

/** Gradients of sum(out * dout) by central differences of the f64 reference. */
function fdGrads(s: Shape, x: ReturnType<typeof inputs>) {
  const q = toF64(x.q);
  const k = toF64(x.k);
  const v = toF64(x.v);
  const loss = () => {
    const { out } = attentionRef(q, k, v, s.B, s.T, s.S, s.H, s.HK, s.D);
    let acc = 0;
    for (let i = 0; i < out.length; i++) acc += out[i]! * x.dout[i]!;
    return acc;
  };
  return {
    dq: q.map((_, i) => finiteDiff(loss, q, i)),
    dk: k.map((_, i) => finiteDiff(loss, k, i)),
    dv: v.map((_, i) => finiteDiff(loss, v, i)),
  };
}

describe('attention decode and KV cache', () => {
  const gpu = useGpu();

  it('kvCacheWrite places rows at per-row offsets and drops rows past Smax', async () => {
    const g = gpu();
    const [B, T, Smax, HK, D] = [3, 4, 10, 2, 8];
    const rng = new Rng(1);
    const k = rng.f32(B * T * HK * D);
    const v = rng.f32(B * T * HK * D);
    const kInit = rng.f32(B * Smax * HK * D);
    const offsets = Uint32Array.from([0, 3, 8]);
    const tk = g.upload(k, [B, T, HK, D]);
    const tv = g.upload(v, [B, T, HK, D]);
    const kc = g.upload(kInit, [B, Smax, HK, D]);
    const vc = g.upload(kInit, [B, Smax, HK, D]);
    const to = g.upload(offsets, [B], 'u32');
    kvCacheWrite(g, kc, vc, tk, tv, to, B, T, Smax, HK, D);
    const expK = Float32Array.from(kInit);
    const expV = Float32Array.from(kInit);
    const row = HK * D;
    for (let b = 0; b < B; b++) {
      for (let t = 0; t < T; t++) {
        const pos = offsets[b]! + t;
        if (pos >= Smax) continue;
        expK.set(k.subarray((b * T + t) * row, (b * T + t + 1) * row), (b * Smax + pos) * row);
        expV.set(v.subarray((b * T + t) * row, (b * T + t + 1) * row), (b * Smax + pos) * row);
      }
    }
    expect(Array.from(await g.readF32(kc))).toEqual(Array.from(expK));
    expect(Array.from(await g.readF32(vc))).toEqual(Array.from(expV));
    releaseAll(tk, tv, kc, vc, to);
  });

  it('writes and decodes one layer of a cache buffer that holds two layers', async () => {
    const g = gpu();
    const [B, Smax, H, HK, D] = [2, 8, 4, 2, 16];
    const layer = B * Smax * HK * D; // 2048 bytes: a valid storage-binding offset
    const rng = new Rng(21);
    const k = rng.f32(B * Smax * HK * D);
    const v = rng.f32(B * Smax * HK * D);
    const q = rng.f32(B * H * D);
    const lengths = Uint32Array.from([8, 3]);
    const kAll = g.zeros([2, B, Smax, HK, D]);
    const vAll = g.zeros([2, B, Smax, HK, D]);
    const slice = (t: Tensor) => ({ buffer: t.buffer, offset: layer * 4, size: layer * 4 });
    const tk = g.upload(k, [B, Smax, HK, D]);
    const tv = g.upload(v, [B, Smax, HK, D]);
    const zeros = g.upload(new Uint32Array(B), [B], 'u32');
    kvCacheWrite(g, slice(kAll), slice(vAll), tk, tv, zeros, B, Smax, Smax, HK, D);
    const tq = g.upload(q, [B, H, D]);
    const tl = g.upload(lengths, [B], 'u32');
    const out = g.empty([B, H, D]);
    attentionDecode(g, out, tq, slice(kAll), slice(vAll), tl, null, B, Smax, H, HK, D);
    const ref = attentionDecodeRef(q, k, v, lengths, null, B, Smax, H, HK, D);
    expectClose(await g.readF32(out), ref, { atol: 2e-5, rtol: 1e-4, label: 'decode from layer 1' });
    expect((await g.readF32(kAll)).subarray(0, layer).every((x) => x === 0)).toBe(true);
    releaseAll(kAll, vAll, tk, tv, zeros, tq, tl, out);
  });

  const cases: [string, { B: number; Smax: number; H: number; HK: number; D: number; P: number; lengths: number[] }, DecodeTiles | undefined][] = [
    ['no prefix', { B: 3, Smax: 40, H: 4, HK: 2, D: 16, P: 0, lengths: [1, 17, 40] }, undefined],
    ['no prefix, small chunks', { B: 3, Smax: 40, H: 4, HK: 2, D: 16, P: 0, lengths: [1, 17, 40] }, { chunk: 8, tpr: 2, threads: 32, prefixRows: 1 }],
    ['prefix', { B: 3, Smax: 30, H: 4, HK: 2, D: 16, P: 11, lengths: [1, 5, 29] }, undefined],
    ['prefix, small chunks, prefix groups of 2 rows (last one partial)', { B: 3, Smax: 30, H: 8, HK: 1, D: 8, P: 11, lengths: [1, 5, 29] }, { chunk: 4, tpr: 1, threads: 16, prefixRows: 2 }],
    ['prefix, G=1, one prefix group for all rows', { B: 5, Smax: 12, H: 2, HK: 2, D: 16, P: 21, lengths: [12, 1, 2, 7, 3] }, undefined],
    ['prefix, G=3, D=128', { B: 2, Smax: 70, H: 6, HK: 2, D: 128, P: 5, lengths: [70, 3] }, undefined],
    ['H=HK, D=64, long prefix', { B: 2, Smax: 9, H: 2, HK: 2, D: 64, P: 150, lengths: [9, 1] }, undefined],
  ];

  it.each(cases)('matches the f64 reference (%s)', async (_name, c, tiles) => {
    const g = gpu();
    const rng = new Rng(c.Smax + c.P);
    const q = rng.f32(c.B * c.H * c.D, 1.5);
    const kc = rng.f32(c.B * c.Smax * c.HK * c.D, 1.5);
    const vc = rng.f32(c.B * c.Smax * c.HK * c.D);
    const pk = rng.f32(Math.max(1, c.P) * c.HK * c.D, 1.5);
    const pv = rng.f32(Math.max(1, c.P) * c.HK * c.D);
    const lengths = Uint32Array.from(c.lengths);
    const tq = g.upload(q, [c.B, c.H, c.D]);
    const tkc = g.upload(kc, [c.B, c.Smax, c.HK, c.D]);
    const tvc = g.upload(vc, [c.B, c.Smax, c.HK, c.D]);
    const tl = g.upload(lengths, [c.B], 'u32');
    const tpk = g.upload(pk, [Math.max(1, c.P), c.HK, c.D]);
    const tpv = g.upload(pv, [Math.max(1, c.P), c.HK, c.D]);
    const out = g.empty([c.B, c.H, c.D]);
    const prefix = c.P > 0 ? { k: tpk, v: tpv, P: c.P } : null;
    const before = g.dispatches;
    attentionDecode(g, out, tq, tkc, tvc, tl, prefix, c.B, c.Smax, c.H, c.HK, c.D, { tiles });
    expect(g.dispatches - before).toBe(2); // prefix and cache chunks in one dispatch, then the combine
    const ref = attentionDecodeRef(q, kc, vc, lengths, prefix ? { k: pk, v: pv, P: c.P } : null, c.B, c.Smax, c.H, c.HK, c.D);
    expectClose(await g.readF32(out), ref, { atol: 2e-5, rtol: 1e-4, label: 'decode out' });
    // A maxLength hint bounding every row gives the same result with fewer splits.
    attentionDecode(g, out, tq, tkc, tvc, tl, prefix, c.B, c.Smax, c.H, c.HK, c.D, { tiles, maxLength: Math.max(...c.lengths) });
    expectClose(await g.readF32(out), ref, { atol: 2e-5, rtol: 1e-4, label: 'decode out (maxLength)' });
    releaseAll(tq, tkc, tvc, tl, tpk, tpv, out);
  });

  it.each([
    [0, undefined],
    [4, undefined],
    [5, { chunk: 4, tpr: 2, threads: 16, prefixRows: 3 }],
  ] as [number, DecodeTiles | undefined][])(
    'decoding token t over a cache filled by kvCacheWrite equals row t of the prefill forward (prefix %i)',
    async (P, tiles) => {
      const g = gpu();
      const [T, H, HK, D] = [9, 4, 2, 16];
      const S = P + T;
      const s = { B: 1, T, S, H, HK, D };
      const x = inputs(s, 99 + P, 1.5);
      const t = upload(g, s, x);
      attentionForward(g, t.out, t.lse, t.q, t.k, t.v, 1, T, S, H, HK, D);
      const prefill = await g.readF32(t.out);
      // One decode row per token t: the same cache (keys P .. S-1), valid up to t.
      const B = T;
      const row = HK * D;
      const ownK = new Float32Array(B * T * row);
      const ownV = new Float32Array(B * T * row);
      for (let b = 0; b < B; b++) {
        ownK.set(x.k.subarray(P * row, S * row), b * T * row);
        ownV.set(x.v.subarray(P * row, S * row), b * T * row);
      }
      const tk = g.upload(ownK, [B, T, HK, D]);
      const tv = g.upload(ownV, [B, T, HK, D]);
      const kCache = g.zeros([B, T, HK, D]);
      const vCache = g.zeros([B, T, HK, D]);
      const zeros = g.upload(new Uint32Array(B), [B], 'u32');
      kvCacheWrite(g, kCache, vCache, tk, tv, zeros, B, T, T, HK, D);
      const pk = g.upload(x.k.slice(0, Math.max(1, P) * row), [Math.max(1, P), HK, D]);
      const pv = g.upload(x.v.slice(0, Math.max(1, P) * row), [Math.max(1, P), HK, D]);
      const q = g.upload(x.q, [B, H, D]); // q [1, T, H, D] read as T rows of [H, D]
      const lengths = g.upload(Uint32Array.from({ length: B }, (_, b) => b + 1), [B], 'u32');
      const out = g.empty([B, H, D]);
      attentionDecode(g, out, q, kCache, vCache, lengths, P > 0 ? { k: pk, v: pv, P } : null, B, T, H, HK, D, { tiles });
      expectClose(await g.readF32(out), prefill, { atol: 1e-5, rtol: 1e-5, label: 'decode vs prefill' });
      releaseAll(t.q, t.k, t.v, t.dout, t.out, t.lse, tk, tv, kCache, vCache, zeros, pk, pv, q, lengths, out);
    },
  );
});
