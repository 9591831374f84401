/**
 * Non-finite values (NaN, +-infinity) are refused where they enter, naming the file
 * and the tensor: weights at load (f32 and q4, one file or shards, a reward model's
 * score head, ONNX exports' 4-bit scales and dense initializers) and LoRA adapters at
 * PEFT import and at checkpoint resume. Each bad value is poked into an otherwise
 * valid file built at test time (small shapes); values at the edge of the finite
 * range still load.
 */
import { describe, expect, it, vi } from 'vitest';
import { FormatError } from '../../src/formats/errors';
import { parseLlamaConfig } from '../../src/formats/llama-config';
import { buildLlamaOnnx } from '../../src/formats/onnx-llama';
import { encodeOnnxModel, type OnnxModel } from '../../src/formats/onnx-proto';
import { loraKey, loraModelShape, readAdapter } from '../../src/formats/peft';
import { parseSafetensors, writeSafetensors, type SafetensorsDType, type TensorToWrite } from '../../src/formats/safetensors';
import { loadLlama, type LoadOptions } from '../../src/model/load';
import { LoraAdapter } from '../../src/model/lora';
import { openModelDir } from '../../src/model/node-source';
import type { ModelSource } from '../../src/model/source';
import { loadTokenizer } from '../../src/model/tokenizer';
import { makeConfig } from '../../src/selfplay/config';
import { SelfPlayTrainer, TrainerError } from '../../src/selfplay/trainer';
import { useGpu } from '../helpers/gpu';
import { TINY_DIR, linearValues, memorySource, syntheticModel } from '../helpers/model-files';

type Bad = 'nan' | 'inf' | '-inf';

const gpu = useGpu();

/** Bits of a NaN / +-infinity (or any other pattern) in a checkpoint dtype. */
function bitsOf(dtype: SafetensorsDType, v: Bad | number): number {
  const f32 = v === 'nan' ? 0x7fc00000 : v === 'inf' ? 0x7f800000 : v === '-inf' ? 0xff800000 : v;
  if (dtype === 'F32') return f32;
  if (dtype === 'BF16') return f32 >>> 16;
  // F16: the same class of value.
  return v === 'nan' ? 0x7e00 : v === 'inf' ? 0x7c00 : v === '-inf' ? 0xfc00 : v;
}

/** A copy of safetensors `bytes` with element `index` of tensor `name` (every element for 'all') set to the pattern `bits`. */
function poke(bytes: Uint8Array, name: string, index: number | 'all', bits: number, fileName = 'model.safetensors'): Uint8Array {
  const copy = bytes.slice();
  const st = parseSafetensors(copy, fileName);
  const info = st.header.tensors.get(name)!;
  const data = st.bytes(name);
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const size = info.dtype === 'F32' ? 4 : 2;
  const n = data.byteLength / size;
  for (const i of index === 'all' ? Array.from({ length: n }, (_, k) => k) : [index]) {
    if (size === 4) view.setUint32(4 * i, bits >>> 0, true);
    else view.setUint16(2 * i, bits, true);
  }
  return copy;
}

/** The FormatError a load ends with (a load that succeeds fails the test). */
async function loadError(load: Promise<unknown>): Promise<FormatError> {
  try {
    const m = (await load) as { weights: { release(): void } };
    m.weights.release();
  } catch (e) {
    if (e instanceof FormatError) return e;
    throw e;
  }
  throw new Error('expected the load to be refused, it succeeded');
}

describe('non-finite weights are refused at load', () => {

  const expectRefused = (e: FormatError, file: string, tensor: string) => {
    expect(e.file).toBe(file);
    expect(e.item).toBe(`tensor ${JSON.stringify(tensor)}`);
    expect(e.message).toMatch(/non-finite value.*\(NaN or infinity\)/);
    expect(e.message).toMatch(/damaged.*download it again/);
  };

  it.each([
    ['f32', 'BF16', 'model.layers.1.self_attn.q_proj.weight', 17, 'nan'],
    ['f32', 'F32', 'model.norm.weight', 'all', 'inf'],
    ['f32', 'F16', 'model.embed_tokens.weight', 4000, '-inf'],
    ['q4', 'BF16', 'model.layers.0.self_attn.q_proj.weight', 5, 'nan'],
    ['q4', 'F16', 'model.embed_tokens.weight', 'all', 'inf'],
    ['q4', 'F32', 'model.layers.1.mlp.down_proj.weight', 95, '-inf'],
    ['q4', 'BF16', 'model.norm.weight', 63, 'inf'],
    ['q4', 'F16', 'model.layers.0.input_layernorm.weight', 0, 'nan'],
  ] as [LoadOptions['format'], SafetensorsDType, string, number | 'all', Bad][])('format %s, %s checkpoint: %s (element %s = %s)', async (format, dtype, tensor, index, bad) => {
    const g = gpu();
    const m = syntheticModel({ dtype, seed: 21 });
    const files = { ...m.files, 'model.safetensors': poke(m.files['model.safetensors'] as Uint8Array, tensor, index, bitsOf(dtype, bad)) };
    const before = g.stats().inUseBytes;
    const e = await loadError(loadLlama(g, memorySource(files), { format }));
    expectRefused(e, 'model.safetensors', tensor);
    if (index === 'all') expect(e.problem).toMatch(/^holds only non-finite values/);
    else expect(e.problem).toMatch(/^holds 1 non-finite value \(NaN or infinity\) of \d+$/);
    expect(g.stats().inUseBytes).toBe(before);
  });

  it('values at the edge of the finite range load (largest finite, subnormal, -0)', async () => {
    const g = gpu();
    const m = syntheticModel({ dtype: 'BF16', seed: 22 });
    let st = m.files['model.safetensors'] as Uint8Array;
    const q = 'model.layers.0.self_attn.q_proj.weight';
    st = poke(st, q, 0, 0x7f7f); // 3.39e38
    st = poke(st, q, 1, 0xff7f);
    st = poke(st, q, 2, 0x0001);
    st = poke(st, q, 3, 0x8000);
    for (const format of ['f32', 'q4'] as const) {
      const loaded = await loadLlama(g, memorySource({ ...m.files, 'model.safetensors': st }), { format });
      if (format === 'f32') {
        const w = await linearValues(g, loaded.weights.layers[0]!.q);
        expect([w[0], w[1]]).toEqual([3.3895313892515355e38, -3.3895313892515355e38]);
      }
      loaded.weights.release();
    }
  });

  it('q4: a tensor quantized in row blocks through a small staging buffer is counted in every block', async () => {
    const g = gpu();
    const m = syntheticModel({ vocab: 1000, seed: 23 });
    const opts = { format: 'q4', maxStagingBytes: 24 << 10, maxShardBytes: 4 << 10, maxChunkBytes: 5000 } as const;
    for (const row of [0, 500, 999]) {
      const files = { ...m.files, 'model.safetensors': poke(m.files['model.safetensors'] as Uint8Array, 'model.embed_tokens.weight', row * 64 + 63, bitsOf('BF16', 'nan')) };
      expectRefused(await loadError(loadLlama(g, memorySource(files), opts)), 'model.safetensors', 'model.embed_tokens.weight');
    }
  });

  it('names the first bad tensor in load order, and how many more follow', async () => {
    const g = gpu();
    const m = syntheticModel({ seed: 24 });
    let st = m.files['model.safetensors'] as Uint8Array;
    st = poke(st, 'model.layers.1.mlp.up_proj.weight', 3, bitsOf('BF16', 'inf'));
    st = poke(st, 'model.layers.0.self_attn.v_proj.weight', 7, bitsOf('BF16', 'nan'));
    st = poke(st, 'model.norm.weight', 1, bitsOf('BF16', '-inf'));
    const e = await loadError(loadLlama(g, memorySource({ ...m.files, 'model.safetensors': st }), { format: 'q4' }));
    expectRefused(e, 'model.safetensors', 'model.layers.0.self_attn.v_proj.weight');
    expect(e.problem).toMatch(/\(and 2 more tensors after it\)$/);
  });

  it('counts are read back once per load (q4: one readback of the GPU counts; f32: counted on the CPU, none)', async () => {
    const g = gpu();
    const m = syntheticModel({ seed: 25 });
    const reads = vi.spyOn(g, 'readBytes');
    try {
      for (const format of ['f32', 'q4'] as const) {
        reads.mockClear();
        const loaded = await loadLlama(g, memorySource(m.files), { format });
        expect(reads).toHaveBeenCalledTimes(format === 'q4' ? 1 : 0);
        loaded.weights.release();
      }
    } finally {
      reads.mockRestore();
    }
  });

  it.each(['f32', 'q4'] as const)('a sharded checkpoint (format %s): the bad tensor in the second shard is named with its shard', async (format) => {
    const g = gpu();
    const m = syntheticModel({ seed: 26 });
    const bad = 'model.layers.1.self_attn.k_proj.weight';
    const half = Math.ceil(m.tensors.length / 2);
    const parts: [string, TensorToWrite[]][] = [
      ['model-00001-of-00002.safetensors', m.tensors.slice(0, half)],
      ['model-00002-of-00002.safetensors', m.tensors.slice(half)],
    ];
    expect(parts[1]![1].map((t) => t.name)).toContain(bad);
    const files: Record<string, Uint8Array | string> = { 'config.json': m.files['config.json']!, 'generation_config.json': m.files['generation_config.json']! };
    const weightMap: Record<string, string> = {};
    for (const [file, list] of parts) {
      files[file] = writeSafetensors(list, { format: 'pt' });
      for (const t of list) weightMap[t.name] = file;
    }
    files['model.safetensors.index.json'] = JSON.stringify({ metadata: { total_size: 0 }, weight_map: weightMap });
    const clean = await loadLlama(g, memorySource(files), { format });
    clean.weights.release();
    files['model-00002-of-00002.safetensors'] = poke(files['model-00002-of-00002.safetensors'] as Uint8Array, bad, 33, bitsOf('BF16', 'nan'), 'model-00002-of-00002.safetensors');
    expectRefused(await loadError(loadLlama(g, memorySource(files), { format })), 'model-00002-of-00002.safetensors', bad);
  });

  it.each(['f32', 'q4'] as const)('a reward model (format %s): a NaN in the score head is refused', async (format) => {
    const g = gpu();
    const m = syntheticModel({ architecture: 'LlamaForSequenceClassification', numLabels: 1, seed: 27 });
    const clean = await loadLlama(g, memorySource(m.files), { format });
    expect(clean.weights.score).not.toBeNull();
    clean.weights.release();
    const files = { ...m.files, 'model.safetensors': poke(m.files['model.safetensors'] as Uint8Array, 'score.weight', 10, bitsOf('BF16', 'nan')) };
    expectRefused(await loadError(loadLlama(g, memorySource(files), { format })), 'model.safetensors', 'score.weight');
  });
});

describe('ONNX import: non-finite scales and dense initializers are refused', () => {
  const m = syntheticModel({ dtype: 'F32', seed: 31 });
  const config = parseLlamaConfig(m.config, 'config.json');
  const values = (name: string) => m.values.get(name)!;

  /** An ONNX folder in memory whose initializer `name` has element `index` set to the f32 (4-byte) or f16 (2-byte) pattern `bits`. */
  function onnxWith(model: OnnxModel, file: string, name: string, index: number, bits: number): ModelSource {
    const initializers = model.graph.initializers.map((t) => {
      if (t.name !== name) return t;
      const raw = t.rawData!.slice();
      const view = new DataView(raw.buffer);
      if (t.dataType === 1) view.setUint32(4 * index, bits >>> 0, true);
      else view.setUint16(2 * index, bits, true);
      return { ...t, rawData: raw };
    });
    expect(initializers.some((t) => t.name === name)).toBe(true);
    return memorySource({ 'config.json': m.files['config.json']!, [file]: encodeOnnxModel({ ...model, graph: { ...model.graph, initializers } }) }, 'onnx-model');
  }

  const expectRefused = (e: FormatError, file: string, initializer: string) => {
    expect(e.file).toBe(file);
    expect(e.item).toBe(`initializer ${JSON.stringify(initializer)}`);
    expect(e.message).toMatch(/non-finite value.*\(NaN or infinity\)/);
    expect(e.message).toMatch(/damaged.*download it again/);
  };

  it('a clean export loads (the check has no false positives)', async () => {
    const g = gpu();
    const model = buildLlamaOnnx(config, values, { weights: 'q4' });
    const loaded = await loadLlama(g, onnxWith(model, 'onnx/model_q4.onnx', 'model.norm.weight', 0, 0x3f800000), { format: 'q4' });
    loaded.weights.release();
  });

  it.each(['q4', 'f32'] as const)('MatMulNBits with a NaN f32 scale (format %s)', async (format) => {
    const g = gpu();
    const model = buildLlamaOnnx(config, values, { weights: 'q4' });
    const name = 'model.layers.0.self_attn.q_proj.MatMul.weight_scales';
    const e = await loadError(loadLlama(g, onnxWith(model, 'onnx/model_q4.onnx', name, 3, 0x7fc00000), { format }));
    expectRefused(e, 'onnx/model_q4.onnx', name);
  });

  it('MatMulNBits with an infinite f16 scale (q4f16)', async () => {
    const g = gpu();
    const model = buildLlamaOnnx(config, values, { weights: 'q4', scales: 'f16', zeroPoints: false });
    const name = 'model.layers.1.mlp.down_proj.MatMul.weight_scales';
    const e = await loadError(loadLlama(g, onnxWith(model, 'onnx/model_q4f16.onnx', name, 0, 0xfc00), { format: 'q4' }));
    expectRefused(e, 'onnx/model_q4f16.onnx', name);
    expect(e.problem).toMatch(/as f16 scales/);
  });

  it('an f32 scale beyond f16 range (it would become an infinite engine scale)', async () => {
    const g = gpu();
    const model = buildLlamaOnnx(config, values, { weights: 'q4' });
    const name = 'model.layers.0.mlp.gate_proj.MatMul.weight_scales';
    const e = await loadError(loadLlama(g, onnxWith(model, 'onnx/model_q4.onnx', name, 1, 0x7f000000), { format: 'q4' }));
    expectRefused(e, 'onnx/model_q4.onnx', name);
  });

  it('a NaN in a dense norm weight and an infinity in a dense MatMul weight', async () => {
    const g = gpu();
    const q4 = buildLlamaOnnx(config, values, { weights: 'q4' });
    const norm = 'model.layers.1.post_attention_layernorm.weight';
    expectRefused(await loadError(loadLlama(g, onnxWith(q4, 'onnx/model_q4.onnx', norm, 9, 0x7fc00000), { format: 'q4' })), 'onnx/model_q4.onnx', norm);
    const f32 = buildLlamaOnnx(config, values, { weights: 'f32' });
    const matmul = f32.graph.initializers.find((t) => /layers\.0.*o_proj/.test(t.name) && t.dims.length === 2)!.name;
    expectRefused(await loadError(loadLlama(g, onnxWith(f32, 'onnx/model.onnx', matmul, 100, 0x7f800000), { format: 'f32' })), 'onnx/model.onnx', matmul);
  });
});

describe('non-finite adapters are refused at import and at resume, naming the key', () => {
  const m = syntheticModel({ seed: 41 });
  const config = parseLlamaConfig(m.config, 'config.json');
  const targets = ['q_proj', 'v_proj', 'down_proj'] as const;

  async function adapterFiles() {
    const lora = LoraAdapter.create(gpu(), config, { r: 4, alpha: 8, targets, seed: 3 });
    const files = await lora.exportPeft('synthetic');
    lora.release();
    return files;
  }

  const expectRefused = (e: unknown, key: string) => {
    expect(e).toBeInstanceOf(FormatError);
    const f = e as FormatError;
    expect(f.file).toBe('adapter_model.safetensors');
    expect(f.item).toBe(key);
    expect(f.message).toMatch(/non-finite value.*\(NaN or infinity\)/);
    expect(f.message).toMatch(/damaged/);
  };
  const errorOf = (fn: () => unknown): unknown => {
    try {
      fn();
    } catch (e) {
      return e;
    }
    throw new Error('expected a refusal, nothing was thrown');
  };

  it('readAdapter, LoraAdapter.fromPeft and importPeft refuse a NaN lora_B and an infinite lora_A', async () => {
    const files = await adapterFiles();
    const shape = loraModelShape(config);
    expect(readAdapter(files, shape).tensors.size).toBe(2 * 2 * targets.length);
    const keyB = loraKey(0, 'q_proj', 'B');
    const keyA = loraKey(1, 'down_proj', 'A');
    const nanB = { ...files, 'adapter_model.safetensors': poke(files['adapter_model.safetensors'], keyB, 5, 0x7fc00000, 'adapter_model.safetensors') };
    const infA = { ...files, 'adapter_model.safetensors': poke(files['adapter_model.safetensors'], keyA, 0, 0xff800000, 'adapter_model.safetensors') };
    expect(keyB).toBe('base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight');
    expectRefused(errorOf(() => readAdapter(nanB, shape)), keyB);
    expectRefused(errorOf(() => readAdapter(infA, shape)), keyA);
    const before = gpu().stats().inUseBytes;
    expectRefused(errorOf(() => LoraAdapter.fromPeft(gpu(), config, nanB)), keyB);
    expect(gpu().stats().inUseBytes).toBe(before);
    // importPeft leaves the adapter as it was.
    const lora = LoraAdapter.fromPeft(gpu(), config, files);
    expectRefused(errorOf(() => lora.importPeft(infA)), keyA);
    expect((await lora.exportPeft('synthetic'))['adapter_model.safetensors']).toEqual(files['adapter_model.safetensors']);
    lora.release();
  });

  it('a checkpoint with a NaN lora_B, or an infinite optimizer moment, does not resume', { timeout: 300_000 }, async () => {
    const g = gpu();
    const model = await loadLlama(g, await openModelDir(TINY_DIR), { format: 'f32' });
    try {
      const tokenizer = await loadTokenizer(model.files);
      const models = { gpu: g, model, tokenizer };
      const cfg = makeConfig({ mode: 'lsp-zero', world: 'arithmetic', arithmeticMaxOperand: 2, queriesPerIteration: 2, groupSize: 3, microBatch: 4, lora: { r: 4, alpha: 8, targets: ['q_proj', 'v_proj', 'down_proj'] }, seed: 11 });
      const trainer = SelfPlayTrainer.start(models, cfg);
      const files = await trainer.checkpointFiles();
      trainer.release();
      SelfPlayTrainer.fromFiles(models, files).release();

      const keyB = loraKey(1, 'v_proj', 'B');
      const nanB = new Map(files);
      nanB.set('adapter_model.safetensors', poke(files.get('adapter_model.safetensors')!, keyB, 2, 0x7fc00000, 'adapter_model.safetensors'));
      expectRefused(errorOf(() => SelfPlayTrainer.fromFiles(models, nanB)), keyB);

      const moment = `${loraKey(0, 'q_proj', 'A')}.exp_avg_sq`;
      const infV = new Map(files);
      infV.set('optimizer.safetensors', poke(files.get('optimizer.safetensors')!, moment, 1, 0x7f800000, 'optimizer.safetensors'));
      const before = g.stats().inUseBytes;
      const e = errorOf(() => SelfPlayTrainer.fromFiles(models, infV));
      expect(e).toBeInstanceOf(TrainerError);
      expect((e as Error).message).toContain(moment);
      expect((e as Error).message).toMatch(/non-finite.*damaged/);
      expect(g.stats().inUseBytes).toBe(before);
    } finally {
      model.weights.release();
    }
  });
});
