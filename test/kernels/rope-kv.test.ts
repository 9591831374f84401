import { describe, expect, it } from 'vitest';
import { f16ToF32, f32ToF16 } from '../../src/gpu/gpu';
import type { KvDtype } from '../../src/kernels/attention';
import { ropeInvFreq } from '../../src/kernels/rope';
import { ropeKvWrite } from '../../src/kernels/rope-kv';
import { ropeRef } from '../../src/kernels/rope.ref';
import { useGpu } from '../helpers/gpu';
import { Rng, expectClose } from '../helpers/numeric';

const LLAMA3 = { type: 'llama3', factor: 32, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 } as const;

describe('RoPE fused with the KV-cache write (one dispatch per decode step)', () => {
  const gpu = useGpu();

  it.for([
    // B, H, HK, D, Smax, cache dtype
    [1, 2, 1, 4, 3, 'f32'],
    [3, 6, 2, 16, 9, 'f32'],
    [4, 4, 4, 64, 5, 'f32'],
    [3, 6, 2, 16, 9, 'f16'],
    [2, 3, 1, 128, 4, 'f16'],
  ] as const)('q, cache k and v match the f64 reference (B=%i H=%i HK=%i D=%i Smax=%i %s)', async ([B, H, HK, D, Smax, kv], ctx) => {
    const g = gpu();
    if (kv === 'f16' && !g.caps.f16) {
      console.log(`skipped: adapter ${g.caps.adapterName} lacks shader-f16`);
      ctx.skip('adapter lacks shader-f16');
    }
    const rng = new Rng(B * 1000 + D * 10 + H);
    const W = (H + 2 * HK) * D;
    const qkv = rng.f32(B * W);
    // Row 0 at position 0; the last row's offset is past the cache (its write is dropped).
    const offsets = Uint32Array.from({ length: B }, (_, b) => (b === B - 1 && B > 1 ? Smax : b % Smax));
    const positions = Uint32Array.from({ length: B }, (_, b) => (b === 0 ? 0 : 7 + offsets[b]! + rng.int(20000)));
    const invFreq = ropeInvFreq(D, 500000, D >= 64 ? LLAMA3 : null);
    const row = HK * D;
    const cache0 = rng.f32(B * Smax * row);
    const tqkv = g.upload(qkv, [B, W]);
    const tf = g.upload(invFreq, [D / 2]);
    const tp = g.upload(positions, [B], 'u32');
    const to = g.upload(offsets, [B], 'u32');
    const tq = g.empty([B, H, D]);
    const upload = (a: Float32Array) => (kv === 'f16' ? g.upload(f32ToF16(a), [B, Smax, HK, D], 'f16') : g.upload(a, [B, Smax, HK, D]));
    const kc = upload(cache0);
    const vc = upload(cache0);
    const before = g.dispatches;
    ropeKvWrite(g, tq, kc, vc, tqkv, tf, tp, to, { B, H, HK, D, Smax });
    expect(g.dispatches - before).toBe(1);

    // Split the reference input into its q, k, v heads.
    const part = (first: number, heads: number) => {
      const out = new Float32Array(B * heads * D);
      for (let b = 0; b < B; b++) out.set(qkv.subarray(b * W + first * D, b * W + (first + heads) * D), b * heads * D);
      return out;
    };
    const qRef = ropeRef(part(0, H), invFreq, positions, B, H, D);
    const kRef = ropeRef(part(H, HK), invFreq, positions, B, HK, D);
    const vIn = part(H + HK, HK);
    const round = (a: ArrayLike<number>) => (kv === 'f16' ? f16ToF32(f32ToF16(a)) : Float32Array.from(a));
    const kExp = Float64Array.from(round(cache0));
    const vExp = Float64Array.from(round(cache0));
    const kRounded = round(kRef);
    const vRounded = round(vIn);
    for (let b = 0; b < B; b++) {
      if (offsets[b]! >= Smax) continue;
      const o = (b * Smax + offsets[b]!) * row;
      kExp.set(kRounded.subarray(b * row, (b + 1) * row), o);
      vExp.set(vRounded.subarray(b * row, (b + 1) * row), o);
    }
    expectClose(await g.readF32(tq), qRef, { atol: 1.5e-6, rtol: 1e-6, label: 'q' });
    // f16: one rounding of a value within 1.5e-6 of the reference may land one f16 step away.
    const kTol = kv === 'f16' ? { atol: 1e-3, rtol: 1e-3 } : { atol: 1.5e-6, rtol: 1e-6 };
    expectClose(await g.readF32(kc), kExp, { ...kTol, label: 'k cache' });
    expect(Array.from(await g.readF32(vc))).toEqual(Array.from(vExp));
    for (const t of [tqkv, tf, tp, to, tq, kc, vc]) t.release();
  });

  it('refuses mismatched cache types and short inputs with a clear message', () => {
    const g = gpu();
    const dims = { B: 1, H: 2, HK: 1, D: 4, Smax: 2 };
    const q = g.zeros([1, 2, 4]);
    const kc = g.zeros([1, 2, 1, 4]);
    const qkv = g.zeros([1, 16]);
    const short = g.zeros([1, 8]);
    const f = g.zeros([2]);
    const u = g.zeros([1], 'u32');
    expect(() => ropeKvWrite(g, q, kc, kc, short, f, u, u, dims)).toThrow(/qkv .* is smaller/);
    expect(() => ropeKvWrite(g, q, kc, kc, qkv, f, u, u, { ...dims, D: 6 })).toThrow(/multiple of 4/);
    if (g.caps.f16) {
      const half = g.zeros([1, 2, 1, 4], 'f16' as KvDtype);
      expect(() => ropeKvWrite(g, q, kc, half, qkv, f, u, u, dims)).toThrow(/must both be f32 or both f16/);
      half.release();
    }
    for (const t of [q, kc, qkv, short, f, u]) t.release();
  });
});
