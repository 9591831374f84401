import { describe, expect, it } from 'vitest';
import { f16ToF32, f32ToF16 } from '../../src/gpu/gpu';
import { downloadQ4, q4ShardRows, releaseQ4, type Q4Weight } from '../../src/kernels/q4-layout';
import { dequantizeQ4Ref, quantizeQ4Ref, type Q4Packed } from '../../src/kernels/q4.ref';
import { dequantizeQ4, quantizeQ4, type Q4SourceType } from '../../src/kernels/quantize';
import type { Gpu } from '../../src/gpu/gpu';
import { useGpu } from '../helpers/gpu';
import { Rng, expectClose } from '../helpers/numeric';
import { bf16ToF32, edgeBlocks, randomWeights, toBf16Bits, toF16Bits, upload16 } from '../helpers/q4-fixtures';

/** Uploads `w` as the given source type; returns the tensor and the f32 values it holds. */
function source(g: Gpu, w: Float32Array, type: Q4SourceType) {
  if (type === 'f32') return { t: g.upload(w, [w.length]), values: w };
  const bits = type === 'f16' ? toF16Bits(w) : toBf16Bits(w);
  return { t: upload16(g, bits), values: type === 'f16' ? f16ToF32(bits) : bf16ToF32(bits) };
}

function firstDifference(a: ArrayLike<number>, b: ArrayLike<number>): string {
  for (let i = 0; i < Math.max(a.length, b.length); i++) if (a[i] !== b[i]) return `first difference at [${i}]: ${a[i]} vs ${b[i]}`;
  return 'identical';
}

async function expectSameBytes(g: Gpu, W: Q4Weight, ref: Q4Packed, label: string): Promise<void> {
  const got = await downloadQ4(g, W);
  expect(firstDifference(got.scales, ref.scales), `${label}: scales`).toBe('identical');
  expect(firstDifference(got.zeros ?? [], ref.zeros ?? []), `${label}: zero points`).toBe('identical');
  expect(firstDifference(got.qweight, ref.qweight), `${label}: qweight`).toBe('identical');
}

describe('quantizeQ4', () => {
  const gpu = useGpu();

  const types: Q4SourceType[] = ['f32', 'f16', 'bf16'];
  it.each(types.flatMap((t) => [true, false].map((z) => [t, z] as const)))(
    'edge-case blocks match quantizeQ4Ref bit for bit (%s, zeros=%s)',
    async (type, zeros) => {
      const g = gpu();
      const w = edgeBlocks(new Rng(11));
      const M = w.length / 32;
      const { t, values } = source(g, w, type);
      const W = quantizeQ4(g, t, M, 32, { srcType: type, zeros });
      await expectSameBytes(g, W, quantizeQ4Ref(values, M, 32, zeros), `${type} edge blocks`);
      t.release();
      releaseQ4(W);
    },
  );

  it.each(types.flatMap((t) => [[t, 13, 100, true], [t, 6, 40, false], [t, 5, 7, true], [t, 9, 256, false]] as const))(
    'random weights match quantizeQ4Ref bit for bit (%s, M=%i, K=%i, zeros=%s)',
    async (type, M, K, zeros) => {
      const g = gpu();
      const w = randomWeights(new Rng(M * K), M, K);
      const { t, values } = source(g, w, type);
      const W = quantizeQ4(g, t, M, K, { srcType: type, zeros });
      await expectSameBytes(g, W, quantizeQ4Ref(values, M, K, zeros), `${type} [${M}, ${K}]`);
      t.release();
      releaseQ4(W);
    },
  );

  it('wide-range random blocks match quantizeQ4Ref bit for bit (f32, both rules)', async () => {
    const g = gpu();
    const rng = new Rng(99);
    const M = 96;
    const K = 160;
    const w = new Float32Array(M * K);
    for (let r = 0; r < M; r++) {
      const mag = 2 ** rng.uniform(-28, 8);
      for (let k = 0; k < K; k++) w[r * K + k] = rng.normal() * mag * (rng.next() < 0.05 ? 2 ** rng.uniform(-20, 4) : 1);
    }
    const t = g.upload(w, [M * K]);
    for (const zeros of [true, false]) {
      const W = quantizeQ4(g, t, M, K, { srcType: 'f32', zeros });
      await expectSameBytes(g, W, quantizeQ4Ref(w, M, K, zeros), `wide-range zeros=${zeros}`);
      releaseQ4(W);
    }
    t.release();
  });

  it.each(types)('shards like uploadQ4, binds the source in pieces and round-trips through dequantizeQ4 (%s)', async (type) => {
    const g = gpu();
    const M = 45;
    const K = 72; // 3 blocks (48 bytes) per row
    const maxShardBytes = 48 * 16;
    const w = randomWeights(new Rng(3), M, K);
    const { t, values } = source(g, w, type);
    // small source bindings too: several dispatches per shard, at unaligned source offsets
    const W = quantizeQ4(g, t, M, K, { srcType: type, zeros: true, maxShardBytes, maxSourceBytes: 1000 });
    const rowsPer = q4ShardRows(M, K, maxShardBytes);
    expect(W.shards.map((s) => [s.rowStart, s.rows])).toEqual([
      [0, rowsPer],
      [rowsPer, rowsPer],
      [2 * rowsPer, M - 2 * rowsPer],
    ]);
    const ref = quantizeQ4Ref(values, M, K, true);
    await expectSameBytes(g, W, ref, `${type} sharded`);
    const out = g.empty([M, K]);
    dequantizeQ4(g, out, W, 0, M);
    expectClose(await g.readF32(out), dequantizeQ4Ref(ref), { atol: 0, rtol: 0, label: 'dequantized' });
    out.release();
    t.release();
    releaseQ4(W);
  });

  it('edge blocks include scales where rounding f32(hi - lo) / 15 once in f32 differs from the reference', () => {
    // Guards the fixture: a quantizer computing the scale in plain f32 must fail it.
    const w = edgeBlocks(new Rng(11));
    const ref = quantizeQ4Ref(w, w.length / 32, 32, true);
    let differ = 0;
    for (let b = 0; b < w.length / 32; b++) {
      let lo = 0;
      let hi = 0;
      for (let j = 0; j < 32; j++) {
        lo = Math.min(lo, w[b * 32 + j]!);
        hi = Math.max(hi, w[b * 32 + j]!);
      }
      const naive = f32ToF16([Math.fround(Math.fround(hi - lo) / 15)])[0]!;
      if (naive !== ref.scales[b]) differ++;
    }
    expect(differ).toBeGreaterThan(0);
  });
});
