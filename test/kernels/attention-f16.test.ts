/**
 * f16 KV cache paths (shader-f16): the f32 <-> f16 conversion, the cache write into an
 * f16 cache, and decode attention over an f16 cache and f16 shared prefix, against the
 * float64 reference. Two bounds are stated:
 *   - against the reference fed the same f16-rounded K/V: atol 2e-5 + rtol 1e-4, the f32
 *     decode kernel's own bound (the arithmetic after the f16 load is f32);
 *   - against the reference fed the unrounded f32 K/V: atol 2e-3, the f16 storage error
 *     (relative 2^-11 per element, carried through the softmax weights and the sum).
 * Skips, with the reason printed, on adapters without shader-f16 (SwiftShader).
 */
import { describe, expect, it } from 'vitest';
import { f16ToF32, f32ToF16, type Gpu } from '../../src/gpu/gpu';
import type { Tensor } from '../../src/gpu/tensor';
import { attentionDecode, kvCacheWrite } from '../../src/kernels/attention';
import { attentionDecodeRef } from '../../src/kernels/attention.ref';
import { convertCopy } from '../../src/kernels/convert';
import { useGpu } from '../helpers/gpu';
import { Rng, expectClose } from '../helpers/numeric';

const releaseAll = (...ts: Tensor[]) => ts.forEach((t) => t.release());
const roundF16 = (a: Float32Array): Float32Array => f16ToF32(f32ToF16(a));

/** Skips (printing why) unless the device has shader-f16; prints the adapter either way. */
function needF16(g: Gpu, skip: () => void): void {
  console.log(`adapter: ${g.caps.adapterName} (shader-f16 ${g.caps.f16 ? 'yes' : 'no'})`);
  if (!g.caps.f16) {
    console.log(`skipped: adapter ${g.caps.adapterName} lacks shader-f16`);
    skip();
  }
}

describe('f16 KV cache', () => {
  const gpu = useGpu();

  it('refuses an f16 cache in plain words where shader-f16 is missing', (ctx) => {
    const g = gpu();
    console.log(`adapter: ${g.caps.adapterName}`);
    if (g.caps.f16) {
      console.log('skipped: this adapter has shader-f16 (the refusal is for adapters without it)');
      ctx.skip();
    }
    const a = g.empty([8], 'f32');
    const b = g.empty([8], 'f16');
    expect(() => convertCopy(g, b, a)).toThrow(/shader-f16/);
    releaseAll(a, b);
  });

  it('convertCopy rounds f32 to nearest f16 and widens back exactly, at element offsets', async (ctx) => {
    const g = gpu();
    needF16(g, () => ctx.skip());
    const rng = new Rng(3);
    const n = 1000;
    const x = rng.f32(n, 10);
    x[0] = 65504; // largest f16
    x[1] = 1e-7; // subnormal in f16
    x[2] = -0;
    const src = g.upload(x, [n]);
    const half = g.zeros([n + 8], 'f16');
    convertCopy(g, half, src, n - 4, 4, 8);
    // Read back widened (exact): equal to the host's round-to-nearest-even bits, widened.
    const want = new Uint16Array(n + 8);
    want.set(f32ToF16(x.subarray(4, n)), 8);
    expect(Array.from(await g.readF32(half))).toEqual(Array.from(f16ToF32(want)));
    const back = g.empty([n], 'f32');
    convertCopy(g, back, half, n, 0, 0);
    expect(Array.from(await g.readF32(back))).toEqual(Array.from(f16ToF32(want.subarray(0, n))));
    // The first elements through a whole-tensor copy too.
    const full = g.empty([n], 'f16');
    convertCopy(g, full, src);
    expect(Array.from(await g.readF32(full))).toEqual(Array.from(roundF16(x)));
    expect(() => convertCopy(g, full, src, 6)).toThrow(/multiple of 4/);
    expect(() => convertCopy(g, back, src)).toThrow(/nothing to convert/);
    releaseAll(src, half, back, full);
  });

  it('kvCacheWrite into an f16 cache, then decode over f16 prefix + cache vs the float64 reference', async (ctx) => {
    const g = gpu();
    needF16(g, () => ctx.skip());
    // Ragged rows, a shared prefix, G = 3 query heads per kv head, several key chunks.
    const [B, Smax, H, HK, D, P] = [3, 40, 6, 2, 32, 21];
    const lengths = [1, 17, 40];
    const rng = new Rng(11);
    const row = HK * D;
    const k = rng.f32(B * Smax * row);
    const v = rng.f32(B * Smax * row);
    const pk = rng.f32(P * row);
    const pv = rng.f32(P * row);
    const q = rng.f32(B * H * D);
    // The cache arrives as it does in decoding: f32 rows written into f16 storage.
    const tk = g.upload(k, [B, Smax, HK, D]);
    const tv = g.upload(v, [B, Smax, HK, D]);
    const kc = g.zeros([B, Smax, HK, D], 'f16');
    const vc = g.zeros([B, Smax, HK, D], 'f16');
    const zeros = g.upload(new Uint32Array(B), [B], 'u32');
    kvCacheWrite(g, kc, vc, tk, tv, zeros, B, Smax, Smax, HK, D);
    expect(Array.from(await g.readF32(kc))).toEqual(Array.from(roundF16(k)));
    expect(Array.from(await g.readF32(vc))).toEqual(Array.from(roundF16(v)));
    const tpk = g.upload(f32ToF16(pk), [P, HK, D], 'f16');
    const tpv = g.upload(f32ToF16(pv), [P, HK, D], 'f16');
    const tq = g.upload(q, [B, H, D]);
    const tl = g.upload(Uint32Array.from(lengths), [B], 'u32');
    const out = g.empty([B, H, D]);
    attentionDecode(g, out, tq, kc, vc, tl, { k: tpk, v: tpv, P }, B, Smax, H, HK, D);
    const got = await g.readF32(out);
    const rounded = attentionDecodeRef(q, roundF16(k), roundF16(v), lengths, { k: roundF16(pk), v: roundF16(pv), P }, B, Smax, H, HK, D);
    const exact = attentionDecodeRef(q, k, v, lengths, { k: pk, v: pv, P }, B, Smax, H, HK, D);
    let maxErr = 0;
    for (let i = 0; i < got.length; i++) maxErr = Math.max(maxErr, Math.abs(got[i]! - exact[i]!));
    console.log(`f16 KV decode: max |err| vs the f32-input float64 reference ${maxErr.toExponential(2)} (bound 2e-3)`);
    expectClose(got, rounded, { atol: 2e-5, rtol: 1e-4, label: 'f16 decode vs reference on rounded K/V' });
    expectClose(got, exact, { atol: 2e-3, rtol: 0, label: 'f16 decode vs reference on f32 K/V' });

    // An f32 prefix with an f16 cache (the element types are per binding).
    const tpk32 = g.upload(pk, [P, HK, D]);
    const tpv32 = g.upload(pv, [P, HK, D]);
    attentionDecode(g, out, tq, kc, vc, tl, { k: tpk32, v: tpv32, P }, B, Smax, H, HK, D);
    const mixed = attentionDecodeRef(q, roundF16(k), roundF16(v), lengths, { k: pk, v: pv, P }, B, Smax, H, HK, D);
    expectClose(await g.readF32(out), mixed, { atol: 2e-5, rtol: 1e-4, label: 'f32 prefix + f16 cache' });
    expect(() => attentionDecode(g, out, tq, kc, tv, tl, null, B, Smax, H, HK, D)).toThrow(/one element type/);
    releaseAll(tk, tv, kc, vc, zeros, tpk, tpv, tq, tl, out, tpk32, tpv32);
  });
});
