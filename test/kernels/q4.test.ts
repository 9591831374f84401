import { describe, expect, it } from 'vitest';
import { Q4_GEMV_MAX_N, q4Matmul, q4MatmulBackward, type Q4GemvTuning } from '../../src/kernels/q4';
import { releaseQ4, uploadQ4 } from '../../src/kernels/q4-layout';
import { dequantizeQ4Ref, quantizeQ4Ref } from '../../src/kernels/q4.ref';
import { dequantizeQ4 } from '../../src/kernels/quantize';
import { useGpu, withoutSubgroups } from '../helpers/gpu';
import { Rng, expectClose } from '../helpers/numeric';
import { q4MatmulBackwardRef, q4MatmulRef, randomWeights } from '../helpers/q4-fixtures';

interface Case {
  N: number;
  M: number;
  K: number;
  zeros: boolean;
  rowStart?: number;
  rowCount?: number;
  accumulate?: boolean;
  /** forces several shards when set */
  maxShardBytes?: number;
  kernel?: 'gemv' | 'gemm';
  tuning?: Q4GemvTuning;
}

const name = (c: Case) =>
  `N=${c.N} M=${c.M} K=${c.K}${c.zeros ? ' zeros' : ''}` +
  `${c.rowStart !== undefined ? ` rows=[${c.rowStart},${c.rowStart + c.rowCount!})` : ''}` +
  `${c.accumulate ? ' +=' : ''}${c.maxShardBytes ? ' sharded' : ''}${c.kernel ? ` ${c.kernel}` : ''}` +
  `${c.tuning ? ` ${JSON.stringify(c.tuning)}` : ''}`;

// K=64 has 2 blocks (32 bytes) per row, so 256-byte shards hold 8 rows.
const SHARD = 256;

const forwardCases: Case[] = [
  { N: 1, M: 1, K: 32, zeros: true },
  { N: 1, M: 37, K: 64, zeros: false, tuning: { lanes: 32, groups: 2, rowsPerThread: 4 } },
  { N: 1, M: 13, K: 100, zeros: true },
  { N: 3, M: 20, K: 40, zeros: true },
  { N: 3, M: 64, K: 96, zeros: false, rowStart: 5, rowCount: 40, accumulate: true, tuning: { lanes: 32, groups: 2, rowsPerThread: 4 } },
  { N: 8, M: 70, K: 100, zeros: false, tuning: { lanes: 32, groups: 2, rowsPerThread: 2 } },
  { N: 8, M: 9, K: 256, zeros: true, accumulate: true },
  { N: 3, M: 40, K: 64, zeros: true, rowStart: 5, rowCount: 24, maxShardBytes: SHARD },
  { N: 1, M: 40, K: 64, zeros: false, rowStart: 7, rowCount: 2, maxShardBytes: SHARD, accumulate: true },
  { N: 9, M: 1, K: 40, zeros: true },
  { N: 33, M: 70, K: 100, zeros: true },
  { N: 70, M: 130, K: 64, zeros: false, accumulate: true },
  { N: 33, M: 40, K: 64, zeros: false, rowStart: 5, rowCount: 24, maxShardBytes: SHARD },
  { N: 70, M: 40, K: 64, zeros: true, rowStart: 3, rowCount: 37, maxShardBytes: SHARD, accumulate: true },
  { N: 3, M: 50, K: 72, zeros: true, kernel: 'gemm' },
  { N: 5, M: 45, K: 160, zeros: true, tuning: { lanes: 8, groups: 4, rowsPerThread: 1 } },
  { N: 2, M: 45, K: 96, zeros: false, tuning: { lanes: 64, groups: 1, rowsPerThread: 3 } },
  { N: 8, M: 30, K: 1024, zeros: true, tuning: { lanes: 128, groups: 2, rowsPerThread: 1 } },
];

const backwardCases: Case[] = [
  { N: 1, M: 1, K: 32, zeros: true },
  { N: 1, M: 37, K: 40, zeros: false },
  { N: 3, M: 20, K: 100, zeros: true, accumulate: true },
  { N: 8, M: 64, K: 96, zeros: false, rowStart: 5, rowCount: 40 },
  { N: 33, M: 70, K: 100, zeros: true },
  { N: 70, M: 45, K: 160, zeros: false, accumulate: true },
  { N: 3, M: 40, K: 64, zeros: true, rowStart: 5, rowCount: 24, maxShardBytes: SHARD },
  { N: 70, M: 40, K: 64, zeros: false, rowStart: 3, rowCount: 37, maxShardBytes: SHARD, accumulate: true },
];

function setup(c: Case, seed: number) {
  const rng = new Rng(seed);
  const w = randomWeights(rng, c.M, c.K);
  const packed = quantizeQ4Ref(w, c.M, c.K, c.zeros);
  return { rng, packed, wq: dequantizeQ4Ref(packed) };
}

describe('q4Matmul', () => {
  const gpu = useGpu();

  it.each(forwardCases.map((c) => [name(c), c] as const))('forward matches the f64 reference (%s)', async (_, c) => {
    const g = gpu();
    const { rng, packed, wq } = setup(c, c.N * 1000 + c.M * 10 + c.K);
    const W = uploadQ4(g, packed, c.M, c.K, c.maxShardBytes);
    if (c.maxShardBytes) expect(W.shards.length).toBeGreaterThan(2);
    const rowStart = c.rowStart ?? 0;
    const rowCount = c.rowCount ?? c.M;
    const x = rng.f32(c.N * c.K);
    const y0 = rng.f32(c.N * rowCount);
    const tx = g.upload(x, [c.N, c.K]);
    const ty = g.upload(y0, [c.N, rowCount]);
    q4Matmul(g, ty, tx, W, c.N, { rowStart, rowCount, accumulate: c.accumulate, kernel: c.kernel, tuning: c.tuning });
    const ref = q4MatmulRef(x, wq, c.N, c.K, rowStart, rowCount);
    if (c.accumulate) ref.forEach((v, i) => (ref[i] = v + y0[i]!));
    expectClose(await g.readF32(ty), ref, { atol: 2e-5 * Math.sqrt(c.K), rtol: 1e-4, label: 'y' });
    tx.release();
    ty.release();
    releaseQ4(W);
  });

  // Row groups of 1..128 lanes against subgroups of 4 (SwiftShader) and 8 (lavapipe):
  // groups inside one subgroup (butterfly only) and groups over several (span sums
  // combined in workgroup memory); odd K leaves lanes with no block, odd M clamps rows.
  const laneCases: Case[] = [
    { N: 3, M: 7, K: 40, zeros: true, tuning: { lanes: 1, groups: 8, rowsPerThread: 1 } },
    { N: 1, M: 9, K: 100, zeros: false, tuning: { lanes: 2, groups: 4, rowsPerThread: 2 } },
    { N: 2, M: 11, K: 160, zeros: true, tuning: { lanes: 4, groups: 3, rowsPerThread: 1 } },
    { N: 5, M: 13, K: 288, zeros: false, tuning: { lanes: 8, groups: 2, rowsPerThread: 2 } },
    { N: 3, M: 37, K: 100, zeros: true, accumulate: true, tuning: { lanes: 32, groups: 2, rowsPerThread: 2 } },
    { N: 1, M: 5, K: 1000, zeros: false, tuning: { lanes: 128, groups: 1, rowsPerThread: 1 } },
  ];
  for (const sg of [true, false]) {
    it(`GEMV lane sums with ${sg ? 'subgroup shuffles' : 'the workgroup-memory tree'} match the f64 reference`, async (ctx) => {
      const g = gpu();
      console.log(`adapter: ${g.caps.adapterName} (subgroups ${g.caps.subgroups ? 'yes' : 'no'})`);
      if (sg && !g.caps.subgroups) {
        console.log(`skipped: adapter ${g.caps.adapterName} lacks subgroups`);
        ctx.skip();
      }
      for (const c of laneCases) {
        const { rng, packed, wq } = setup(c, c.N * 1000 + c.M * 10 + c.K + 1);
        const W = uploadQ4(g, packed, c.M, c.K);
        const x = rng.f32(c.N * c.K);
        const y0 = rng.f32(c.N * c.M);
        const tx = g.upload(x, [c.N, c.K]);
        const ty = g.upload(y0, [c.N, c.M]);
        q4Matmul(g, ty, tx, W, c.N, { accumulate: c.accumulate, kernel: 'gemv', tuning: c.tuning, subgroups: sg });
        const ref = q4MatmulRef(x, wq, c.N, c.K, 0, c.M);
        if (c.accumulate) ref.forEach((v, i) => (ref[i] = v + y0[i]!));
        expectClose(await g.readF32(ty), ref, { atol: 2e-5 * Math.sqrt(c.K), rtol: 1e-4, label: name(c) });
        tx.release();
        ty.release();
        releaseQ4(W);
      }
    });
  }

  it('refuses subgroup sums in plain words where the feature is missing', async () => {
    await withoutSubgroups((g) => {
      const c: Case = { N: 1, M: 1, K: 32, zeros: false };
      const W = uploadQ4(g, setup(c, 1).packed, c.M, c.K);
      const t = g.empty([32]);
      expect(() => q4Matmul(g, t, t, W, 1, { subgroups: true })).toThrow(/subgroups feature/);
      t.release();
      releaseQ4(W);
    });
  });

  it.each(backwardCases.map((c) => [name(c), c] as const))('backward matches the f64 reference (%s)', async (_, c) => {
    const g = gpu();
    const { rng, packed, wq } = setup(c, c.N * 7 + c.M * 3 + c.K);
    const W = uploadQ4(g, packed, c.M, c.K, c.maxShardBytes);
    const rowStart = c.rowStart ?? 0;
    const rowCount = c.rowCount ?? c.M;
    const dy = rng.f32(c.N * rowCount);
    const dx0 = rng.f32(c.N * c.K);
    const tdy = g.upload(dy, [c.N, rowCount]);
    const tdx = g.upload(dx0, [c.N, c.K]);
    q4MatmulBackward(g, tdx, tdy, W, c.N, { rowStart, rowCount, accumulate: c.accumulate });
    const ref = q4MatmulBackwardRef(dy, wq, c.N, c.K, rowStart, rowCount);
    if (c.accumulate) ref.forEach((v, i) => (ref[i] = v + dx0[i]!));
    expectClose(await g.readF32(tdx), ref, { atol: 2e-5 * Math.sqrt(rowCount), rtol: 1e-4, label: 'dx' });
    tdy.release();
    tdx.release();
    releaseQ4(W);
  });

  it('an empty row range writes zeros in the backward and leaves y alone in the forward', async () => {
    const g = gpu();
    const { rng, packed } = setup({ N: 2, M: 8, K: 32, zeros: true }, 5);
    const W = uploadQ4(g, packed, 8, 32);
    const tdx = g.upload(rng.f32(64), [2, 32]);
    const tdy = g.zeros([2, 1]);
    q4MatmulBackward(g, tdx, tdy, W, 2, { rowStart: 4, rowCount: 0 });
    expect(Array.from(await g.readF32(tdx))).toEqual(new Array(64).fill(0));
    expect(() => q4Matmul(g, tdy, tdx, W, 2, { rowStart: 4, rowCount: 5 })).toThrow(/outside/);
    expect(() => q4Matmul(g, tdy, tdx, W, Q4_GEMV_MAX_N + 1, { kernel: 'gemv' })).toThrow();
    tdx.release();
    tdy.release();
    releaseQ4(W);
  });
});

describe('dequantizeQ4', () => {
  const gpu = useGpu();

  it.each([
    [12, 100, true, 0, 12, undefined],
    [40, 64, false, 5, 30, SHARD],
    [40, 64, true, 9, 1, SHARD],
  ] as const)('matches the reference exactly (M=%i K=%i zeros=%s rows [%i, +%i))', async (M, K, zeros, rowStart, rows, shard) => {
    const g = gpu();
    const rng = new Rng(M + K);
    const packed = quantizeQ4Ref(randomWeights(rng, M, K), M, K, zeros);
    const W = uploadQ4(g, packed, M, K, shard);
    const out = g.empty([rows, K]);
    dequantizeQ4(g, out, W, rowStart, rows);
    const ref = dequantizeQ4Ref(packed).subarray(rowStart * K, (rowStart + rows) * K);
    expectClose(await g.readF32(out), ref, { atol: 0, rtol: 0, label: 'dequantized' });
    out.release();
    releaseQ4(W);
  });
});
