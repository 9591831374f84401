import { describe, expect, it } from 'vitest';
import { ropeBackward, ropeForward, ropeInvFreq } from '../../src/kernels/rope';
import { ropeRef } from '../../src/kernels/rope.ref';
import { useGpu } from '../helpers/gpu';
import { Rng, expectClose, finiteDiff, toF64 } from '../helpers/numeric';

const LLAMA3 = { type: 'llama3', factor: 32, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 } as const;

describe('ropeInvFreq', () => {
  it('matches theta^(-2i/d) without scaling', () => {
    const f = ropeInvFreq(64, 10000);
    expect(f.length).toBe(32);
    expect(f[0]).toBe(1);
    expect(f[1]).toBe(Math.fround(10000 ** (-2 / 64)));
    expect(f[31]).toBe(Math.fround(10000 ** (-62 / 64)));
  });

  // head_dim 128, theta 500000, factor 32, low 1, high 4, original 8192:
  //   high_wl = 8192 / 4 = 2048, low_wl = 8192 / 1 = 8192, wavelen_i = 2 pi 500000^(i/64)
  //   i <= 28: wavelen < 2048 (keep); i >= 35: wavelen > 8192 (divide by 32);
  //   29..34: s = (8192 / wavelen - 1) / 3, f = (1 - s) inv / 32 + s inv.
  // e.g. i = 32: inv = 500000^-0.5 = 1.4142135624e-3, wavelen = 4442.8829, s = 0.2812829,
  //   f = inv (0.7187171 / 32 + 0.2812829) = 4.2955679656e-4.
  it.each([
    [0, 1.0, 'keep'],
    [1, 8.1461723386e-1, 'keep'],
    [20, 1.6560440081e-2, 'keep'],
    [28, 3.2114459948e-3, 'keep'],
    [29, 2.1184069968e-3, 'interpolate (s = 0.8036)'],
    [31, 7.6254120336e-4, 'interpolate (s = 0.4212)'],
    [32, 4.2955679656e-4, 'interpolate (s = 0.2813)'],
    [34, 9.7082878026e-5, 'interpolate (s = 0.0745)'],
    [35, 2.3890530885e-5, 'divide'],
    [50, 1.1028836686e-6, 'divide'],
    [63, 7.6723149723e-8, 'divide'],
  ])('llama3 scaling, i = %i: %f (%s)', (i, expected) => {
    const f = ropeInvFreq(128, 500000, LLAMA3);
    expect(f.length).toBe(64);
    expect(Math.abs(f[i]! - expected) / expected).toBeLessThan(1e-7);
  });
});

describe('rope kernels', () => {
  const gpu = useGpu();

  it.each([
    // N, heads, D, max position
    [1, 1, 2, 5],
    [5, 3, 8, 40],
    [7, 4, 64, 9000],
    [3, 2, 128, 131000],
  ])('forward matches the f64 reference (N=%i, heads=%i, D=%i, positions < %i)', async (N, heads, D, maxPos) => {
    const g = gpu();
    const rng = new Rng(N * 100 + D);
    const x = rng.f32(N * heads * D);
    const pos = Uint32Array.from({ length: N }, (_, n) => (n === 0 ? 0 : rng.int(maxPos)));
    const invFreq = ropeInvFreq(D, 500000, D >= 64 ? LLAMA3 : null);
    const tx = g.upload(x, [N, heads, D]);
    const tf = g.upload(invFreq, [D / 2]);
    const tp = g.upload(pos, [N], 'u32');
    const out = g.empty([N, heads, D]);
    ropeForward(g, out, tx, tf, tp, N, heads, D);
    const ref = ropeRef(x, invFreq, pos, N, heads, D);
    expectClose(await g.readF32(out), ref, { atol: 1.5e-6, rtol: 1e-6, label: 'rope out' });
    // In place: the same tensor as input and output.
    ropeForward(g, tx, tx, tf, tp, N, heads, D);
    expectClose(await g.readF32(tx), ref, { atol: 1.5e-6, rtol: 1e-6, label: 'rope in place' });
    for (const t of [tx, tf, tp, out]) t.release();
  });

  it('backward matches finite differences of the reference, out of place and in place', async () => {
    const g = gpu();
    const [N, heads, D] = [4, 2, 16];
    const rng = new Rng(5);
    const x = rng.f32(N * heads * D);
    const dout = rng.f32(N * heads * D);
    const pos = Uint32Array.from([0, 3, 1000, 77]);
    const invFreq = ropeInvFreq(D, 10000);
    const loss = (xx: Float64Array) => {
      const out = ropeRef(xx, invFreq, pos, N, heads, D);
      let s = 0;
      for (let i = 0; i < out.length; i++) s += out[i]! * dout[i]!;
      return s;
    };
    const x64 = toF64(x);
    const dxRef = new Float64Array(x.length).map((_, i) => finiteDiff(loss, x64, i));
    const tdout = g.upload(dout, [N, heads, D]);
    const tf = g.upload(invFreq, [D / 2]);
    const tp = g.upload(pos, [N], 'u32');
    const dx = g.empty([N, heads, D]);
    ropeBackward(g, dx, tdout, tf, tp, N, heads, D);
    expectClose(await g.readF32(dx), dxRef, { atol: 1e-5, rtol: 1e-4, label: 'dx' });
    ropeBackward(g, tdout, tdout, tf, tp, N, heads, D);
    expectClose(await g.readF32(tdout), dxRef, { atol: 1e-5, rtol: 1e-4, label: 'dx in place' });
    for (const t of [tdout, tf, tp, dx]) t.release();
  });
});
