/**
 * The non-finite count quantizeQ4 takes on request (quantize.ts) against the CPU
 * reference that decodes every value to a float64 (finite.ref.ts): random bit
 * patterns (so NaN and infinities of both signs occur by chance) plus the edge cases
 * around them, odd sizes whose padding half is a NaN that must not be counted, sources
 * split over several dispatches and shards, and several tensors' slots in one counts
 * buffer. Counting leaves the quantized bytes unchanged.
 */
import { describe, expect, it } from 'vitest';
import { f32ToBf16 } from '../../src/formats/safetensors';
import { f32ToF16, type Gpu } from '../../src/gpu/gpu';
import { downloadQ4, releaseQ4 } from '../../src/kernels/q4-layout';
import { quantizeQ4, type Q4SourceType, type QuantizeQ4Options } from '../../src/kernels/quantize';
import { countNonFiniteRef } from '../../src/kernels/finite.ref';
import { useGpu } from '../helpers/gpu';
import { expectSameBytes } from '../helpers/model-files';
import { Rng } from '../helpers/numeric';

/** Edge patterns per type: max finite, +-inf, quiet and signalling NaN, subnormal, +-0, NaN with sign, 1. */
const EDGES: Record<Q4SourceType, number[]> = {
  f32: [0x7f7fffff, 0x7f800000, 0xff800000, 0x7fc00000, 0x7f800001, 0x00000001, 0x00000000, 0x80000000, 0xffffffff, 0x3f800000],
  f16: [0x7bff, 0x7c00, 0xfc00, 0x7e00, 0x7c01, 0x0001, 0x0000, 0x8000, 0xffff, 0x3c00],
  bf16: [0x7f7f, 0x7f80, 0xff80, 0x7fc0, 0x7f81, 0x0001, 0x0000, 0x8000, 0xffff, 0x3f80],
};
const NAN: Record<Q4SourceType, number> = { f32: 0x7fc00000, f16: 0x7e00, bf16: 0x7fc0 };

/** `count` raw values (padded to whole words with a NaN): random bits with the edge patterns scattered in. */
function rawValues(rng: Rng, type: Q4SourceType, count: number): Uint8Array {
  const size = type === 'f32' ? 4 : 2;
  const bytes = new Uint8Array(Math.ceil((count * size) / 4) * 4);
  const view = new DataView(bytes.buffer);
  const edges = EDGES[type];
  for (let i = 0; i < bytes.length / size; i++) {
    const bits = i >= count ? NAN[type] : rng.next() < 0.05 ? edges[rng.int(edges.length)]! : Math.floor(rng.next() * 2 ** (8 * size));
    if (size === 4) view.setUint32(4 * i, bits, true);
    else view.setUint16(2 * i, bits, true);
  }
  return bytes;
}

function upload(g: Gpu, bytes: Uint8Array) {
  return g.upload(new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4), [bytes.byteLength / 4], 'u32');
}

/** Quantizes raw [M, K] values counting into counts[slot]; returns the counts. */
async function countOf(g: Gpu, bytes: Uint8Array, M: number, K: number, type: Q4SourceType, opts: Partial<QuantizeQ4Options> = {}, slot = 1): Promise<number[]> {
  const src = upload(g, bytes);
  const counts = g.zeros([3], 'u32');
  const w = quantizeQ4(g, src, M, K, { srcType: type, ...opts, nonFinite: { counts, slot } });
  const got = [...((await g.read(counts)) as Uint32Array)];
  releaseQ4(w);
  src.release();
  counts.release();
  return got;
}

describe('quantizeQ4: non-finite count', () => {
  const gpu = useGpu();

  it.each([
    ['f32', 1, 1],
    ['f32', 37, 100],
    ['f32', 300, 64],
    ['f16', 1, 1],
    ['f16', 3, 33],
    ['f16', 301, 64],
    ['bf16', 1, 3],
    ['bf16', 37, 100],
    ['bf16', 300, 64],
  ] as [Q4SourceType, number, number][])('%s [%i, %i]: the count matches the float64 reference', async (type, M, K) => {
    const g = gpu();
    const bytes = rawValues(new Rng(M * 131 + K + type.length), type, M * K);
    const want = countNonFiniteRef(bytes, type, M * K);
    if (M * K > 1000) expect(want).toBeGreaterThan(0);
    expect(await countOf(g, bytes, M, K, type)).toEqual([0, want, 0]);
  });

  it('the same count when the source is split over dispatches and the weight over shards', async () => {
    const g = gpu();
    const [M, K] = [200, 96];
    for (const type of ['f32', 'bf16'] as const) {
      const bytes = rawValues(new Rng(5), type, M * K);
      const want = countNonFiniteRef(bytes, type, M * K);
      expect(await countOf(g, bytes, M, K, type, { maxSourceBytes: 4096, maxShardBytes: 1024 }, 2)).toEqual([0, 0, want]);
    }
  });

  it('counting leaves the quantized bytes unchanged (edge values included: 3.3e38 is infinite in f16 only)', async () => {
    const g = gpu();
    const [M, K] = [40, 70];
    const rng = new Rng(9);
    const values = rng.f32(M * K, 0.5);
    values[3] = 3.3e38;
    values[4] = -1e-40;
    values[5] = -0;
    for (const type of ['f32', 'f16', 'bf16'] as const) {
      const data = type === 'f32' ? values : type === 'f16' ? f32ToF16(values) : f32ToBf16(values);
      const bytes = new Uint8Array(Math.ceil(data.byteLength / 4) * 4);
      bytes.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
      const src = upload(g, bytes);
      const counts = g.zeros([1], 'u32');
      const plain = quantizeQ4(g, src, M, K, { srcType: type });
      const counted = quantizeQ4(g, src, M, K, { srcType: type, nonFinite: { counts, slot: 0 } });
      const a = await downloadQ4(g, plain);
      const b = await downloadQ4(g, counted);
      expectSameBytes(b.qweight, a.qweight, `${type} qweight`);
      expectSameBytes(b.scales, a.scales, `${type} scales`);
      expectSameBytes(b.zeros!, a.zeros!, `${type} zeros`);
      expect([...((await g.read(counts)) as Uint32Array)]).toEqual([type === 'f16' ? 1 : 0]);
      expect(countNonFiniteRef(bytes, type, M * K)).toBe(type === 'f16' ? 1 : 0);
      releaseQ4(plain);
      releaseQ4(counted);
      src.release();
      counts.release();
    }
  });

  it('tensors add into their own slots, row blocks into the same one; a slot outside the buffer is refused', async () => {
    const g = gpu();
    const rng = new Rng(3);
    const a = rawValues(rng, 'bf16', 50 * 64);
    const b = rawValues(rng, 'f32', 30 * 32);
    const ta = upload(g, a);
    const tb = upload(g, b);
    const counts = g.zeros([4], 'u32');
    const ws = [
      quantizeQ4(g, ta, 50, 64, { srcType: 'bf16', nonFinite: { counts, slot: 0 } }),
      quantizeQ4(g, tb, 30, 32, { srcType: 'f32', nonFinite: { counts, slot: 2 } }),
      quantizeQ4(g, tb, 30, 32, { srcType: 'f32', nonFinite: { counts, slot: 2 } }),
    ];
    expect([...((await g.read(counts)) as Uint32Array)]).toEqual([countNonFiniteRef(a, 'bf16', 50 * 64), 0, 2 * countNonFiniteRef(b, 'f32', 30 * 32), 0]);
    expect(() => quantizeQ4(g, tb, 30, 32, { srcType: 'f32', nonFinite: { counts, slot: 4 } })).toThrow(/slot 4/);
    ws.forEach(releaseQ4);
    for (const t of [ta, tb, counts]) t.release();
  });
});
