/**
 * The 4-bit layout and kernels against onnxruntime's own MatMulNBits (com.microsoft,
 * bits=4, block_size=32) on its CPU execution provider: the packed bytes our GPU
 * quantizer produced are given unchanged to both.
 */
import * as ort from 'onnxruntime-node';
import { describe, expect, it } from 'vitest';
import { f16ToF32, f32ToF16 } from '../../src/gpu/gpu';
import {
  ONNX_DATA_TYPE,
  decodeOnnxModel,
  encodeOnnxModel,
  intAttribute,
  rawTensor,
  type OnnxModel,
} from '../../src/formats/onnx-proto';
import { q4Matmul, q4MatmulBackward } from '../../src/kernels/q4';
import { downloadQ4, releaseQ4, type Q4Weight } from '../../src/kernels/q4-layout';
import { dequantizeQ4, quantizeQ4 } from '../../src/kernels/quantize';
import type { Gpu } from '../../src/gpu/gpu';
import { useGpu } from '../helpers/gpu';
import { Rng, expectClose } from '../helpers/numeric';
import { q4MatmulBackwardRef, randomWeights } from '../helpers/q4-fixtures';

type Packed = Awaited<ReturnType<typeof downloadQ4>>;

/** A one-node model: Y[batch, M] = MatMulNBits(A[batch, K], B, scales, zero_points). */
function matMulNBitsModel(p: Packed, scaleType: 'float' | 'float16'): OnnxModel {
  const { M, K } = p;
  const nb = Math.ceil(K / 32);
  const io = scaleType === 'float' ? ONNX_DATA_TYPE.FLOAT : ONNX_DATA_TYPE.FLOAT16;
  const scales =
    scaleType === 'float'
      ? rawTensor('scales', ONNX_DATA_TYPE.FLOAT, [M * nb], f16ToF32(p.scales))
      : rawTensor('scales', ONNX_DATA_TYPE.FLOAT16, [M * nb], p.scales);
  const initializers = [rawTensor('B', ONNX_DATA_TYPE.UINT8, [M, nb, 16], p.qweight), scales];
  if (p.zeros) initializers.push(rawTensor('zero_points', ONNX_DATA_TYPE.UINT8, [M * Math.ceil(nb / 2)], p.zeros));
  return {
    irVersion: 8,
    producerName: 'selfplay-lab q4 test',
    opsetImports: [
      { domain: '', version: 17 },
      { domain: 'com.microsoft', version: 1 },
    ],
    graph: {
      name: 'q4_matmul',
      nodes: [
        {
          name: 'matmul',
          opType: 'MatMulNBits',
          domain: 'com.microsoft',
          inputs: ['A', 'B', 'scales', ...(p.zeros ? ['zero_points'] : [])],
          outputs: ['Y'],
          attributes: [intAttribute('K', K), intAttribute('N', M), intAttribute('bits', 4), intAttribute('block_size', 32)],
        },
      ],
      initializers,
      inputs: [{ name: 'A', elemType: io, shape: ['batch', K] }],
      outputs: [{ name: 'Y', elemType: io, shape: ['batch', M] }],
    },
  };
}

async function ortMatmul(p: Packed, x: Float32Array, N: number): Promise<Float32Array> {
  const session = await ort.InferenceSession.create(encodeOnnxModel(matMulNBitsModel(p, 'float')));
  try {
    const out = await session.run({ A: new ort.Tensor('float32', x, [N, p.K]) });
    return out.Y!.data as Float32Array;
  } finally {
    await session.release();
  }
}

/** Quantizes random weights on the GPU and reads back the exact bytes it made. */
async function gpuWeight(g: Gpu, M: number, K: number, zeros: boolean, seed: number, maxShardBytes?: number) {
  const w = randomWeights(new Rng(seed), M, K);
  const src = g.upload(w, [M, K]);
  const W: Q4Weight = quantizeQ4(g, src, M, K, { srcType: 'f32', zeros, maxShardBytes });
  src.release();
  return { W, packed: await downloadQ4(g, W) };
}

describe('q4 kernels vs onnxruntime MatMulNBits', () => {
  const gpu = useGpu();

  it('onnxruntime-node loads and the model encoder round-trips through the decoder', async () => {
    expect(ort.env.versions.node).toMatch(/^\d+\.\d+/);
    const g = gpu();
    const { W, packed } = await gpuWeight(g, 8, 40, true, 1);
    const model = matMulNBitsModel(packed, 'float');
    const decoded = decodeOnnxModel(encodeOnnxModel(model));
    expect(decoded).toEqual({
      ...model,
      graph: {
        ...model.graph,
        initializers: model.graph.initializers.map((t) => ({ ...t, rawData: new Uint8Array(t.rawData!) })),
      },
    });
    // negative and large int64 values survive too
    const dims = [-1, 0, 1, 300, 2 ** 40, -(2 ** 40)];
    const t = decodeOnnxModel(encodeOnnxModel({ ...model, graph: { ...model.graph, initializers: [{ name: 'd', dataType: 7, dims, int64Data: dims }] } }));
    expect(t.graph.initializers[0]!.dims).toEqual(dims);
    expect(t.graph.initializers[0]!.int64Data).toEqual(dims);
    releaseQ4(W);
  });

  it.each([
    [1, 48, 100, true, undefined],
    [5, 48, 100, false, undefined],
    [8, 64, 256, true, undefined],
    [40, 33, 72, true, undefined],
    [3, 72, 64, true, 256],
    [37, 72, 64, true, 256],
  ] as const)('forward matches (N=%i, M=%i, K=%i, zeros=%s, shardBytes=%s)', async (N, M, K, zeros, shard) => {
    const g = gpu();
    const { W, packed } = await gpuWeight(g, M, K, zeros, N * M + K, shard);
    if (shard) expect(W.shards.length).toBeGreaterThan(1);
    const x = new Rng(N + K).f32(N * K);
    const expected = await ortMatmul(packed, x, N);
    const tx = g.upload(x, [N, K]);
    const ty = g.empty([N, M]);
    q4Matmul(g, ty, tx, W, N);
    expectClose(await g.readF32(ty), expected, { atol: 2e-5 * Math.sqrt(K), rtol: 1e-4, label: 'y vs onnxruntime' });
    // a row range spanning a shard boundary, accumulated into existing values
    const rowStart = 5;
    const rowCount = M - 11;
    const y0 = new Rng(7).f32(N * rowCount);
    const tr = g.upload(y0, [N, rowCount]);
    q4Matmul(g, tr, tx, W, N, { rowStart, rowCount, accumulate: true });
    const want = new Float32Array(N * rowCount);
    for (let n = 0; n < N; n++) for (let r = 0; r < rowCount; r++) want[n * rowCount + r] = y0[n * rowCount + r]! + expected[n * M + rowStart + r]!;
    expectClose(await g.readF32(tr), want, { atol: 2e-5 * Math.sqrt(K), rtol: 1e-4, label: 'row range vs onnxruntime' });
    for (const t of [tx, ty, tr]) t.release();
    releaseQ4(W);
  });

  it.each([
    [50, 100, true],
    [40, 64, false],
  ] as const)('dequantizeQ4 (and the backward) agree with the weight onnxruntime decodes (M=%i, K=%i, zeros=%s)', async (M, K, zeros) => {
    const g = gpu();
    const { W, packed } = await gpuWeight(g, M, K, zeros, M + K, 512);
    // identity input: onnxruntime's output row k is column k of its dequantized weight
    const eye = new Float32Array(K * K);
    for (let k = 0; k < K; k++) eye[k * K + k] = 1;
    const wt = await ortMatmul(packed, eye, K);
    const wOrt = new Float64Array(M * K);
    for (let k = 0; k < K; k++) for (let m = 0; m < M; m++) wOrt[m * K + k] = wt[k * M + m]!;
    const dense = g.empty([M, K]);
    dequantizeQ4(g, dense, W, 0, M);
    expectClose(await g.readF32(dense), wOrt, { atol: 0, rtol: 0, label: 'dequantized vs onnxruntime' });
    dense.release();
    // (the backward's no-zero-point variant is covered against the f64 reference in q4.test.ts)
    if (zeros) {
      const N = 37;
      const dy = new Rng(3).f32(N * M);
      const tdy = g.upload(dy, [N, M]);
      const tdx = g.empty([N, K]);
      q4MatmulBackward(g, tdx, tdy, W, N);
      expectClose(await g.readF32(tdx), q4MatmulBackwardRef(dy, wOrt, N, K, 0, M), { atol: 2e-5 * Math.sqrt(M), rtol: 1e-4, label: 'dx' });
      tdy.release();
      tdx.release();
    }
    releaseQ4(W);
  });

  it('f16 scales: the packed scale bytes go to onnxruntime unchanged (float16 model)', async () => {
    const g = gpu();
    const N = 8;
    const M = 40;
    const K = 96;
    const { W, packed } = await gpuWeight(g, M, K, true, 17);
    const session = await ort.InferenceSession.create(encodeOnnxModel(matMulNBitsModel(packed, 'float16')));
    // the same inputs, exactly representable in f16, for both
    const xh = f32ToF16(new Rng(4).f32(N * K));
    const x = f16ToF32(xh);
    const out = await session.run({ A: new ort.Tensor('float16', xh, [N, K]) });
    await session.release();
    const data = out.Y!.data;
    const expected = data instanceof Uint16Array ? f16ToF32(data) : Float32Array.from(data as ArrayLike<number>);
    const tx = g.upload(x, [N, K]);
    const ty = g.empty([N, M]);
    q4Matmul(g, ty, tx, W, N);
    // onnxruntime rounds its output (and possibly partial sums) to f16
    expectClose(await g.readF32(ty), expected, { atol: 1e-2, rtol: 4e-3, label: 'y vs onnxruntime (f16)' });
    tx.release();
    ty.release();
    releaseQ4(W);
  });
});
