import { describe, expect, it } from 'vitest';
import type { Gpu } from '../../src/gpu/gpu';
import type { Tensor } from '../../src/gpu/tensor';
import { embeddingForward, embeddingForwardF32, scatterAddRowsF32 } from '../../src/kernels/embedding';
import { embeddingRef } from '../../src/kernels/embedding.ref';
import { Q4_BLOCK_BYTES, q4Blocks, releaseQ4, uploadQ4 } from '../../src/kernels/q4-layout';
import { dequantizeQ4Ref, quantizeQ4Ref } from '../../src/kernels/q4.ref';
import { useGpu } from '../helpers/gpu';
import { Rng, expectClose } from '../helpers/numeric';

const SENTINEL = -777.25;
const V = 37;

/** Ids touching both ends of every 8-row shard, random ids, and out-of-range ids. */
function makeIds(rng: Rng): Uint32Array {
  const ids: number[] = [];
  for (let r = 0; r < V; r += 8) ids.push(r, Math.min(V - 1, r + 7));
  for (let i = 0; i < 20; i++) ids.push(rng.int(V));
  ids.push(V, V + 5, 0xffffffff, 0x80000000);
  for (let i = ids.length - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [ids[i], ids[j]] = [ids[j]!, ids[i]!];
  }
  return Uint32Array.from(ids);
}

/** An output pre-filled with a sentinel, so an unwritten row (or slack) shows. */
function sentinelOut(g: Gpu, N: number, C: number): Tensor {
  const t = g.empty([N, C]);
  g.write(t, new Float32Array(t.buffer.size / 4).fill(SENTINEL));
  return t;
}

async function expectRows(g: Gpu, out: Tensor, expected: Float64Array, label: string) {
  const all = new Float32Array(await g.readBytes(out.buffer, 0, out.buffer.size));
  // Dequantization is (q - zero) * f16 scale: exact in f32, so the match must be exact.
  expectClose(all.subarray(0, expected.length), expected, { atol: 0, rtol: 0, label });
  expect(all.subarray(expected.length).every((v) => v === SENTINEL), `${label}: wrote past [N, C]`).toBe(true);
}

describe('embedding', () => {
  const gpu = useGpu();

  it.each([
    [100, true, false],
    [100, false, true],
    [70, true, true],
    [70, false, false],
    [36, true, true],
    [36, false, true],
    [3, true, true],
  ])('4-bit table matches dequantizeQ4Ref rows (C=%i, zero points %s, sharded %s)', async (C, withZeros, sharded) => {
    const g = gpu();
    const rng = new Rng(C * 2 + (withZeros ? 1 : 0));
    const w = rng.f32(V * C);
    const packed = quantizeQ4Ref(w, V, C, withZeros);
    // 8 rows per shard forces ceil(37 / 8) = 5 shards.
    const maxShardBytes = sharded ? q4Blocks(C) * Q4_BLOCK_BYTES * 8 : undefined;
    const table = uploadQ4(g, packed, V, C, maxShardBytes);
    expect(table.shards.length).toBe(sharded ? 5 : 1);
    const ids = makeIds(rng);
    const N = ids.length;
    const tids = g.upload(ids, [N], 'u32');
    const out = sentinelOut(g, N, C);
    embeddingForward(g, out, tids, table, N);
    await expectRows(g, out, embeddingRef(dequantizeQ4Ref(packed), ids, N, C), 'out');
    releaseQ4(table);
    tids.release();
    out.release();
  });

  it.each([100, 70, 1])('f32 table matches the reference rows (C=%i)', async (C) => {
    const g = gpu();
    const rng = new Rng(500 + C);
    const w = rng.f32(V * C);
    const ids = makeIds(rng);
    const N = ids.length;
    const table = g.upload(w, [V, C]);
    const tids = g.upload(ids, [N], 'u32');
    const out = sentinelOut(g, N, C);
    embeddingForwardF32(g, out, tids, table, N, C);
    await expectRows(g, out, embeddingRef(w, ids, N, C), 'out');
    for (const t of [table, tids, out]) t.release();
  });
  it.each([100, 70, 1])('scatterAddRowsF32 adds rows into place and leaves the others (C=%i)', async (C) => {
    const g = gpu();
    const rng = new Rng(900 + C);
    const N = 37;
    const rows = [5, 0, 36, 17, 3];
    const M = rows.length;
    const dst0 = rng.f32(N * C);
    const src = rng.f32(M * C);
    const want = Float64Array.from(dst0);
    rows.forEach((r, m) => {
      for (let c = 0; c < C; c++) want[r * C + c] += src[m * C + c]!;
    });
    const dst = g.upload(dst0, [N, C]);
    const tr = g.upload(Uint32Array.from([...rows, N + 4]), [M + 1], 'u32');
    const ts = g.upload(new Float32Array([...src, ...rng.f32(C)]), [M + 1, C]);
    scatterAddRowsF32(g, dst, tr, ts, M + 1, N, C); // the last row index is out of range: skipped
    expectClose(await g.readF32(dst), want, { atol: 1e-6, rtol: 1e-6, label: 'dst' });
    for (const t of [dst, tr, ts]) t.release();
  });
});
