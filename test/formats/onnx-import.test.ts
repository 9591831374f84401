/**
 * ONNX import (src/model/onnx-load.ts): 4-bit ONNX decoders of the tiny Llama, written
 * as onnx-community lays them out (src/formats/onnx-llama.ts: MatMulNBits, a 4-bit
 * GatherBlockQuantized or an f16 embedding, external data), load into the engine
 * through loadLlama with the packed bytes unchanged, and the engine's log-probs and
 * logits match onnxruntime-node running the very same file.
 *
 * Tolerances: with f32 scales both compute in f32 from the same 4-bit weights
 * (measured 4e-6 on log-probs, 8e-6 on logits; bound 1e-3). The q4f16 file runs each MatMulNBits in f16 in
 * onnxruntime while the engine widens the same f16 scales to f32, so there the bound
 * is 5e-2 (measured 6e-3 on log-probs, 1.4e-2 on logits: the f16 rounding of activations through two layers and
 * the 128256-way head).
 */
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as ort from 'onnxruntime-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FormatError } from '../../src/formats/errors';
import { ONNX_DATA_TYPE, decodeOnnxModel, encodeOnnxModel, type OnnxModel, type OnnxTensor } from '../../src/formats/onnx-proto';
import { buildLlamaOnnx } from '../../src/formats/onnx-llama';
import { f16ToF32, f32ToF16, type Gpu } from '../../src/gpu/gpu';
import { downloadQ4, type Q4Weight } from '../../src/kernels/q4-layout';
import type { FrozenLinear } from '../../src/kernels/linear';
import type { Tensor } from '../../src/gpu/tensor';
import { KvCache, prefillShared } from '../../src/model/infer';
import { importedQ4Weight } from '../../src/model/onnx-load';
import { sequenceLogprobs } from '../../src/model/llama';
import { loadLlama, type LoadedModel } from '../../src/model/load';
import { openModelDir } from '../../src/model/node-source';
import { loadTokenizer } from '../../src/model/tokenizer';
import { useGpu } from '../helpers/gpu';
import { TINY_DIR, expectSameBytes, linearValues, memorySource } from '../helpers/model-files';
import { logSoftmaxAt } from '../helpers/numeric';
import { readCheckpoint, writeOnnxFolder, type CheckpointValues } from '../peer/onnx-model';

const MESSAGES = [{ role: 'user', content: 'What is the capital of France?' }];

/** The initializers of an ONNX file with their bytes, external data resolved. */
async function fileTensors(dir: string, file: string): Promise<Map<string, { t: OnnxTensor; bytes: Uint8Array }>> {
  const model = decodeOnnxModel(new Uint8Array(await readFile(join(dir, file))));
  const data = new Uint8Array(await readFile(join(dir, `${file}_data`)));
  const out = new Map<string, { t: OnnxTensor; bytes: Uint8Array }>();
  for (const t of model.graph.initializers) {
    let bytes = t.rawData ?? new Uint8Array(0);
    if (t.dataLocation === 1) {
      const kv = new Map(t.externalData!.map((e) => [e.key, e.value]));
      bytes = data.subarray(Number(kv.get('offset')), Number(kv.get('offset')) + Number(kv.get('length')));
    }
    out.set(t.name, { t, bytes });
  }
  return out;
}

/** onnxruntime's logits [T, V] for one sequence (no past). */
async function ortLogits(path: string, ids: number[], layers: number, kvHeads: number, headDim: number): Promise<Float32Array> {
  const session = await ort.InferenceSession.create(path);
  try {
    const T = ids.length;
    const feeds: Record<string, ort.Tensor> = {
      input_ids: new ort.Tensor('int64', BigInt64Array.from(ids.map(BigInt)), [1, T]),
      attention_mask: new ort.Tensor('int64', new BigInt64Array(T).fill(1n), [1, T]),
      position_ids: new ort.Tensor('int64', BigInt64Array.from(ids.map((_, i) => BigInt(i))), [1, T]),
      num_logits_to_keep: new ort.Tensor('int64', BigInt64Array.of(0n), []),
    };
    for (let l = 0; l < layers; l++) for (const k of ['key', 'value']) feeds[`past_key_values.${l}.${k}`] = new ort.Tensor('float32', new Float32Array(0), [1, kvHeads, 0, headDim]);
    const out = await session.run(feeds);
    return out.logits!.data as Float32Array;
  } finally {
    await session.release();
  }
}

/** Max |diff| of the engine's log-probs and last-position logits against onnxruntime's. */
async function compareWithOrt(g: Gpu, m: LoadedModel, path: string, seq: number[]): Promise<{ logp: number; logits: number }> {
  const c = m.weights.config;
  const V = c.vocabSize;
  const T = seq.length;
  const logits = await ortLogits(path, seq, c.numLayers, c.numKvHeads, c.headDim);
  const pass = sequenceLogprobs(g, m.weights, null, { ids: Uint32Array.from(seq), B: 1, T });
  const mine = await g.readF32(pass.logp);
  pass.release();
  let logp = 0;
  for (let t = 0; t < T - 1; t++) logp = Math.max(logp, Math.abs(mine[t]! - logSoftmaxAt(logits.subarray(t * V, (t + 1) * V), seq[t + 1]!)));
  const cache = new KvCache(g, c, 1, 1);
  const last = prefillShared(g, m.weights, null, seq, cache);
  const myLast = await g.readF32(last);
  last.release();
  cache.release();
  let lg = 0;
  for (let v = 0; v < V; v++) lg = Math.max(lg, Math.abs(myLast[v]! - logits[(T - 1) * V + v]!));
  return { logp, logits: lg };
}

async function expectQ4Bytes(g: Gpu, w: Q4Weight, tensors: Map<string, { t: OnnxTensor; bytes: Uint8Array }>, prefix: string, suffix: { q: string; s: string; z: string }) {
  const got = await downloadQ4(g, w);
  expectSameBytes(got.qweight, tensors.get(prefix + suffix.q)!.bytes, `${prefix} qweight`);
  const s = tensors.get(prefix + suffix.s)!;
  if (s.t.dataType === ONNX_DATA_TYPE.FLOAT16) expectSameBytes(got.scales, s.bytes, `${prefix} scales`);
  else {
    const f32 = new Float32Array(s.bytes.slice().buffer);
    expectSameBytes(got.scales, f32ToF16(f32), `${prefix} scales`);
    expectSameBytes(f16ToF32(got.scales), f32, `${prefix} scales (f32 values exact)`);
  }
  const z = tensors.get(prefix + suffix.z);
  if (z) expectSameBytes(got.zeros!, z.bytes, `${prefix} zero points`);
  else expect(got.zeros).toBeNull();
}

describe('ONNX import: 4-bit onnx-community-style decoders into the engine', () => {
  const gpu = useGpu();
  let dir = '';
  let ckpt: CheckpointValues;
  let seq: number[] = [];

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'onnx-import-'));
    ckpt = await readCheckpoint(TINY_DIR);
    const prompt = (await loadTokenizer(await openModelDir(TINY_DIR))).applyChatTemplate(MESSAGES, { dateString: '22 Nov 2026' });
    seq = [...prompt, 791, 6864, 315, 9822, 374, 12366, 13];
  });
  afterAll(async () => {
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('q4 (f32 scales, zero points, 4-bit GatherBlockQuantized embedding): bytes copied, logits match onnxruntime', async () => {
    const g = gpu();
    const out = join(dir, 'q4');
    const files = await writeOnnxFolder(ckpt, out, { weights: 'q4', embedding: 'q4' });
    expect(files).toEqual(expect.arrayContaining(['onnx/model_q4.onnx', 'onnx/model_q4.onnx_data', 'config.json', 'tokenizer.json']));
    const m = await loadLlama(g, await openModelDir(out), { format: 'q4' });
    try {
      expect(m.weights.format).toBe('q4');
      const tensors = await fileTensors(out, 'onnx/model_q4.onnx');
      const w = m.weights;
      expect(w.embed.format).toBe('q4');
      await expectQ4Bytes(g, (w.embed as { table: Q4Weight }).table, tensors, 'model.embed_tokens.weight', { q: '_Q4', s: '_scales', z: '_zp' });
      const mm = { q: '.MatMul.weight_Q4', s: '.MatMul.weight_scales', z: '.MatMul.weight_zp' };
      for (let l = 0; l < w.config.numLayers; l++) {
        for (const [field, name] of [['q', 'self_attn.q_proj'], ['k', 'self_attn.k_proj'], ['v', 'self_attn.v_proj'], ['o', 'self_attn.o_proj'], ['gate', 'mlp.gate_proj'], ['up', 'mlp.up_proj'], ['down', 'mlp.down_proj']] as const) {
          await expectQ4Bytes(g, q4Of(m, l, field), tensors, `model.layers.${l}.${name}`, mm);
        }
      }
      await expectQ4Bytes(g, lmHeadQ4(m), tensors, 'lm_head', mm);
      const err = await compareWithOrt(g, m, join(out, 'onnx/model_q4.onnx'), seq);
      console.log(`q4 vs onnxruntime: max |diff| log-probs ${err.logp.toExponential(2)}, last logits ${err.logits.toExponential(2)} (bound 1e-3)`);
      expect(err.logp).toBeLessThan(1e-3);
      expect(err.logits).toBeLessThan(1e-3);
    } finally {
      m.weights.release();
    }
  });

  it('q4f16 (f16 scales, no zero points, f16 embedding): f16 scale bytes kept, logits match onnxruntime within f16 rounding', async () => {
    const g = gpu();
    const out = join(dir, 'q4f16');
    await writeOnnxFolder(ckpt, out, { weights: 'q4', scales: 'f16', zeroPoints: false, embedding: 'f16' });
    const m = await loadLlama(g, await openModelDir(out), { format: 'q4' });
    try {
      const tensors = await fileTensors(out, 'onnx/model_q4f16.onnx');
      await expectQ4Bytes(g, q4Of(m, 1, 'down'), tensors, 'model.layers.1.mlp.down_proj', { q: '.MatMul.weight_Q4', s: '.MatMul.weight_scales', z: '.MatMul.weight_zp' });
      // The f16 table is widened exactly, as onnxruntime's Cast does.
      expect(m.weights.embed.format).toBe('f32');
      const err = await compareWithOrt(g, m, join(out, 'onnx/model_q4f16.onnx'), seq);
      console.log(`q4f16 vs onnxruntime (f16 MatMulNBits): max |diff| log-probs ${err.logp.toExponential(2)}, last logits ${err.logits.toExponential(2)} (bound 5e-2)`);
      expect(err.logp).toBeLessThan(5e-2);
      expect(err.logits).toBeLessThan(5e-2);
    } finally {
      m.weights.release();
    }
  });

  it('an f32 ONNX export loads with format f32 to the safetensors checkpoint\'s exact weights', async () => {
    const g = gpu();
    const out = join(dir, 'f32');
    await writeOnnxFolder(ckpt, out, { weights: 'f32' });
    const fromOnnx = await loadLlama(g, await openModelDir(out), { format: 'f32' });
    const fromSt = await loadLlama(g, await openModelDir(TINY_DIR), { format: 'f32' });
    try {
      for (const field of ['q', 'k', 'o', 'down'] as const) {
        expectSameBytes(await linearValues(g, fromOnnx.weights.layers[1]![field]), await linearValues(g, fromSt.weights.layers[1]![field]), `layer 1 ${field}`);
      }
      expect(fromOnnx.weights.embed.format).toBe('f32');
      const a = await g.readF32((fromOnnx.weights.embed as { table: Tensor }).table);
      const b = await g.readF32((fromSt.weights.embed as { table: Tensor }).table);
      expectSameBytes(a, b, 'embedding');
    } finally {
      fromOnnx.weights.release();
      fromSt.weights.release();
    }
  });

  it('refuses graphs it cannot express, naming the node or initializer and what to do', async () => {
    const g = gpu();
    const model = buildLlamaOnnx(ckpt.config, ckpt.values, { weights: 'q4' });
    const text = { 'config.json': JSON.stringify(ckpt.configJson), ...ckpt.textFiles };
    const load = (m: OnnxModel) => loadLlama(g, memorySource({ ...text, 'onnx/model_q4.onnx': encodeOnnxModel(m) }, 'bad-onnx'), { format: 'q4' });
    const withAttr = (opName: string, attr: string, value: number): OnnxModel => ({
      ...model,
      graph: {
        ...model.graph,
        nodes: model.graph.nodes.map((n) => (n.name === opName ? { ...n, attributes: n.attributes.map((a) => (a.name === attr ? { ...a, i: value } : a)) } : n)),
      },
    });
    const node = '/model/layers.0/self_attn/k_proj/MatMul_Q4';
    await expect(load(withAttr(node, 'bits', 8))).rejects.toThrow(/k_proj\/MatMul_Q4.*bits=8.*4-bit \(q4 \/ q4f16\) export/);
    await expect(load(withAttr(node, 'block_size', 128))).rejects.toThrow(/block_size=128.*block_size 32/);
    const withoutUp: OnnxModel = { ...model, graph: { ...model.graph, nodes: model.graph.nodes.filter((n) => n.name !== '/model/layers.1/mlp/up_proj/MatMul_Q4') } };
    await expect(load(withoutUp)).rejects.toThrow(FormatError);
    await expect(load(withoutUp)).rejects.toThrow(/no up_proj weight for layer 1/);
    const renamed: OnnxModel = {
      ...model,
      graph: { ...model.graph, initializers: model.graph.initializers.map((t) => (t.name === 'model.norm.weight' ? { ...t, name: 'final_scale' } : t)) },
    };
    await expect(load(renamed)).rejects.toThrow(/no RMSNorm weight named "model.norm.weight"/);
    // No safetensors and no ONNX: the safetensors loader's message.
    await expect(loadLlama(g, memorySource(text, 'empty'), { format: 'q4' })).rejects.toThrow(/holds neither model.safetensors/);
  });
});

/** The 4-bit weight behind a layer's projection. */
function q4Of(m: LoadedModel, layer: number, field: 'q' | 'k' | 'v' | 'o' | 'gate' | 'up' | 'down'): Q4Weight {
  return q4Source(m.weights.layers[layer]![field]);
}

function lmHeadQ4(m: LoadedModel): Q4Weight {
  return q4Source(m.weights.lmHead);
}

function q4Source(lin: FrozenLinear): Q4Weight {
  const w = importedQ4Weight(lin);
  if (!w) throw new Error('expected a 4-bit linear weight made by the importer');
  return w;
}
