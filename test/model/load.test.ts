/**
 * The loader against independent references: every tensor of models/tiny-llama read
 * straight from its safetensors file (bf16 widened on the CPU) for format f32, and the
 * float64 CPU quantizer (quantizeQ4Ref) for format q4, bit for bit.
 */
import { join } from 'node:path';
import { runInNewContext } from 'node:vm';
import { setFlagsFromString } from 'node:v8';
import { beforeAll, describe, expect, it } from 'vitest';
import { FormatError } from '../../src/formats/errors';
import { NodeFileSource } from '../../src/formats/node-source';
import { openSafetensors, writeSafetensors, type SafetensorsFile, type TensorToWrite } from '../../src/formats/safetensors';
import { downloadQ4 } from '../../src/kernels/q4-layout';
import { dequantizeQ4Ref, quantizeQ4Ref } from '../../src/kernels/q4.ref';
import { loadLlama, type LoadProgress } from '../../src/model/load';
import { openModelDir } from '../../src/model/node-source';
import type { ModelSource } from '../../src/model/source';
import { useGpu } from '../helpers/gpu';
import { TINY_DIR, countingSource, expectSameBytes, linearValues, memorySource, syntheticModel } from '../helpers/model-files';

const PROJ = [
  ['q', 'self_attn.q_proj'],
  ['k', 'self_attn.k_proj'],
  ['v', 'self_attn.v_proj'],
  ['o', 'self_attn.o_proj'],
  ['gate', 'mlp.gate_proj'],
  ['up', 'mlp.up_proj'],
  ['down', 'mlp.down_proj'],
] as const;

describe('loadLlama on models/tiny-llama', () => {
  const gpu = useGpu();
  let st: SafetensorsFile;
  const ref = async (name: string): Promise<Float32Array> => st.readTensorF32(name);
  beforeAll(async () => {
    st = await openSafetensors(await NodeFileSource.open(join(TINY_DIR, 'model.safetensors')));
  });

  it('format f32: every tensor equals the checkpoint widened to f32', async () => {
    const before = gpu().stats().inUseBytes;
    const m = await loadLlama(gpu(), await openModelDir(TINY_DIR), { format: 'f32' });
    const w = m.weights;
    expect(w.format).toBe('f32');
    expect(w.embed.format).toBe('f32');
    expect(w.layers.length).toBe(2);
    if (w.embed.format !== 'f32') throw new Error('unreachable');
    expectSameBytes(await gpu().readF32(w.embed.table), await ref('model.embed_tokens.weight'));
    expectSameBytes(await gpu().readF32(w.finalNorm), await ref('model.norm.weight'));
    for (let l = 0; l < 2; l++) {
      const L = w.layers[l]!;
      expectSameBytes(await gpu().readF32(L.inputNorm), await ref(`model.layers.${l}.input_layernorm.weight`));
      expectSameBytes(await gpu().readF32(L.postNorm), await ref(`model.layers.${l}.post_attention_layernorm.weight`));
      for (const [field, mod] of PROJ) {
        expectSameBytes(await linearValues(gpu(), L[field]), await ref(`model.layers.${l}.${mod}.weight`));
      }
    }
    expect(w.score).toBeNull();
    expect(gpu().stats().inUseBytes - before).toBe(w.bytes);
    w.release();
    expect(gpu().stats().inUseBytes).toBe(before);
  });

  it('format q4: embedding and projections are bit-identical to the CPU quantizer', async () => {
    const before = gpu().stats().inUseBytes;
    const m = await loadLlama(gpu(), await openModelDir(TINY_DIR), { format: 'q4' });
    const w = m.weights;
    if (w.embed.format !== 'q4') throw new Error('embedding should be 4-bit');
    const emb = await ref('model.embed_tokens.weight');
    const want = quantizeQ4Ref(emb, 128256, 64, true);
    const got = await downloadQ4(gpu(), w.embed.table);
    expectSameBytes(got.qweight, want.qweight, 'qweight');
    expectSameBytes(got.scales, want.scales, 'scales');
    expectSameBytes(got.zeros!, want.zeros!, 'zeros');
    for (const [field, mod] of PROJ) {
      const name = `model.layers.1.${mod}.weight`;
      const values = await ref(name);
      const lin = w.layers[1]![field];
      const deq = dequantizeQ4Ref(quantizeQ4Ref(values, lin.V, lin.C, true));
      expectSameBytes(await linearValues(gpu(), lin), Float32Array.from(deq), name);
    }
    expectSameBytes(await gpu().readF32(w.layers[0]!.inputNorm), await ref('model.layers.0.input_layernorm.weight'));
    expect(gpu().stats().inUseBytes - before).toBe(w.bytes);
    w.release();
    expect(gpu().stats().inUseBytes).toBe(before);
  });
});

/** Dequantized values of W [M, K] as the 4-bit quantizer stores them. */
function q4Values(values: Float32Array, M: number, K: number): Float32Array {
  return Float32Array.from(dequantizeQ4Ref(quantizeQ4Ref(values, M, K, true)));
}

async function formatErrorOf(p: Promise<unknown>): Promise<FormatError> {
  const e = await p.then(
    () => null,
    (x: unknown) => x,
  );
  if (!(e instanceof FormatError)) throw new Error(`expected a FormatError, got ${String(e)}`);
  return e;
}

describe('loadLlama on synthetic checkpoints', () => {
  const gpu = useGpu();

  it('reads BF16, F16 and F32 weights (f32 exact, q4 as the CPU quantizer)', async () => {
    for (const dtype of ['BF16', 'F16', 'F32'] as const) {
      const m = syntheticModel({ dtype, seed: 3 });
      const f32 = await loadLlama(gpu(), memorySource(m.files), { format: 'f32' });
      const q4 = await loadLlama(gpu(), memorySource(m.files), { format: 'q4' });
      for (const [field, mod] of PROJ) {
        const name = `model.layers.1.${mod}.weight`;
        const v = m.values.get(name)!;
        const lin = f32.weights.layers[1]![field];
        expectSameBytes(await linearValues(gpu(), lin), v, `${dtype} f32 ${name}`);
        expectSameBytes(await linearValues(gpu(), q4.weights.layers[1]![field]), q4Values(v, lin.V, lin.C), `${dtype} q4 ${name}`);
      }
      if (q4.weights.embed.format !== 'q4') throw new Error('q4 embedding expected');
      const want = quantizeQ4Ref(m.values.get('model.embed_tokens.weight')!, 300, 64, true);
      expectSameBytes((await downloadQ4(gpu(), q4.weights.embed.table)).qweight, want.qweight, `${dtype} embedding`);
      expectSameBytes(await gpu().readF32(q4.weights.finalNorm), m.values.get('model.norm.weight')!, `${dtype} norm`);
      f32.weights.release();
      q4.weights.release();
    }
  });

  it('quantizes a tensor larger than the staging buffer in row blocks, into small shards, identically', async () => {
    const m = syntheticModel({ vocab: 1000, seed: 5 });
    const whole = await loadLlama(gpu(), memorySource(m.files), { format: 'q4' });
    // 1000 BF16 rows of 64 are 128000 bytes: 24 KiB of staging holds blocks of 192 rows, which
    // straddle the 4 KiB shards of 128 rows (32 bytes of 4-bit data per row).
    const blocked = await loadLlama(gpu(), memorySource(m.files), { format: 'q4', maxStagingBytes: 24 << 10, maxShardBytes: 4 << 10, maxChunkBytes: 5000 });
    if (whole.weights.embed.format !== 'q4' || blocked.weights.embed.format !== 'q4') throw new Error('q4 embedding expected');
    expect(whole.weights.embed.table.shards).toHaveLength(1);
    expect(blocked.weights.embed.table.shards.map((s) => s.rows)).toEqual([...new Array<number>(7).fill(128), 104]);
    const a = await downloadQ4(gpu(), whole.weights.embed.table);
    const b = await downloadQ4(gpu(), blocked.weights.embed.table);
    const want = quantizeQ4Ref(m.values.get('model.embed_tokens.weight')!, 1000, 64, true);
    for (const [x, label] of [[a, 'whole'], [b, 'blocked']] as const) {
      expectSameBytes(x.qweight, want.qweight, `${label} qweight`);
      expectSameBytes(x.scales, want.scales, `${label} scales`);
      expectSameBytes(x.zeros!, want.zeros!, `${label} zeros`);
    }
    // The LM head reads the same sharded table.
    expectSameBytes(await linearValues(gpu(), blocked.weights.lmHead), q4Values(m.values.get('model.embed_tokens.weight')!, 1000, 64), 'lm head');
    whole.weights.release();
    blocked.weights.release();
  });

  it('symmetric 4-bit (no zero points) on request', async () => {
    const m = syntheticModel({ seed: 8 });
    const q4 = await loadLlama(gpu(), memorySource(m.files), { format: 'q4', q4Zeros: false });
    if (q4.weights.embed.format !== 'q4') throw new Error('q4 embedding expected');
    const want = quantizeQ4Ref(m.values.get('model.embed_tokens.weight')!, 300, 64, false);
    const got = await downloadQ4(gpu(), q4.weights.embed.table);
    expect(got.zeros).toBeNull();
    expectSameBytes(got.qweight, want.qweight, 'qweight');
    q4.weights.release();
  });

  it('loads a sharded checkpoint (index + shards) the same as one file', async () => {
    const m = syntheticModel({ seed: 11 });
    const half = Math.ceil(m.tensors.length / 2);
    const parts: [string, TensorToWrite[]][] = [
      ['model-00001-of-00002.safetensors', m.tensors.slice(0, half)],
      ['model-00002-of-00002.safetensors', m.tensors.slice(half)],
    ];
    const files: Record<string, Uint8Array | string> = { 'config.json': m.files['config.json']!, 'generation_config.json': m.files['generation_config.json']! };
    const weightMap: Record<string, string> = {};
    for (const [file, list] of parts) {
      files[file] = writeSafetensors(list, { format: 'pt' });
      for (const t of list) weightMap[t.name] = file;
    }
    files['model.safetensors.index.json'] = JSON.stringify({ metadata: { total_size: 0 }, weight_map: weightMap });
    const { source, log } = countingSource(memorySource(files));
    const sharded = await loadLlama(gpu(), source, { format: 'f32' });
    expect(log.calls.filter((c) => c.startsWith('open'))).toEqual(['open model-00001-of-00002.safetensors', 'open model-00002-of-00002.safetensors']);
    for (const [field, mod] of PROJ) {
      expectSameBytes(await linearValues(gpu(), sharded.weights.layers[1]![field]), m.values.get(`model.layers.1.${mod}.weight`)!, mod);
    }
    expectSameBytes(await gpu().readF32(sharded.weights.finalNorm), m.values.get('model.norm.weight')!, 'norm');
    sharded.weights.release();

    // A shard the index names but the folder lacks.
    delete files['model-00002-of-00002.safetensors'];
    const before = gpu().stats().inUseBytes;
    const e = await formatErrorOf(loadLlama(gpu(), memorySource(files), { format: 'f32' }));
    expect(e.message).toMatch(/model-00002-of-00002\.safetensors/);
    expect(gpu().stats().inUseBytes).toBe(before);
  });

  it('untied LM head: lm_head.weight is loaded as its own weight', async () => {
    const m = syntheticModel({ tied: false, seed: 13 });
    const f32 = await loadLlama(gpu(), memorySource(m.files), { format: 'f32' });
    expectSameBytes(await linearValues(gpu(), f32.weights.lmHead), m.values.get('lm_head.weight')!, 'lm head f32');
    const q4 = await loadLlama(gpu(), memorySource(m.files), { format: 'q4' });
    expectSameBytes(await linearValues(gpu(), q4.weights.lmHead), q4Values(m.values.get('lm_head.weight')!, 300, 64), 'lm head q4');
    expect(q4.weights.bytes).toBeGreaterThan(f32.weights.bytes / 8);
    f32.weights.release();
    q4.weights.release();
  });

  it('LlamaForSequenceClassification: score.weight as f32 [numLabels, C]', async () => {
    const m = syntheticModel({ architecture: 'LlamaForSequenceClassification', numLabels: 3, seed: 17 });
    const q4 = await loadLlama(gpu(), memorySource(m.files), { format: 'q4' });
    expect(q4.weights.config.architecture).toBe('LlamaForSequenceClassification');
    expect(q4.weights.score!.shape).toEqual([3, 64]);
    expectSameBytes(await gpu().readF32(q4.weights.score!), m.values.get('score.weight')!, 'score');
    q4.weights.release();
  });

  it('generation defaults come from generation_config.json, else from config.json', async () => {
    const m = syntheticModel({ seed: 19 });
    const a = await loadLlama(gpu(), memorySource(m.files), { format: 'f32' });
    expect(a.generation).toEqual({ eosTokenIds: [2, 3], bosTokenId: 1, padTokenId: null, temperature: 0.7, topK: 40 });
    a.weights.release();
    const { ['generation_config.json']: _, ...rest } = m.files;
    const b = await loadLlama(gpu(), memorySource(rest), { format: 'f32' });
    expect(b.generation).toEqual({ eosTokenIds: [2], bosTokenId: 1, padTokenId: null });
    b.weights.release();
    const bad = { ...m.files, 'generation_config.json': '{"top_p": 2}' };
    const e = await formatErrorOf(loadLlama(gpu(), memorySource(bad), { format: 'f32' }));
    expect(e.message).toMatch(/^generation_config\.json, top_p: is 2, expected a number in \[0, 1\]/);
  });

  it('RoPE inverse frequencies follow the llama3 rule of formats.md (float64, then f32)', async () => {
    const m = await loadLlama(gpu(), await openModelDir(TINY_DIR), { format: 'q4' });
    const D = 16;
    const want = new Float32Array(D / 2);
    for (let i = 0; i < D / 2; i++) {
      const f = 500000 ** (-(2 * i) / D);
      const wl = (2 * Math.PI) / f;
      const [low, high] = [8192 / 1, 8192 / 4];
      if (wl > low) want[i] = f / 32;
      else if (wl < high) want[i] = f;
      else {
        const s = (8192 / wl - 1) / (4 - 1);
        want[i] = ((1 - s) * f) / 32 + s * f;
      }
    }
    expectSameBytes(await gpu().readF32(m.weights.invFreq), want, 'invFreq');
    m.weights.release();
  });
});

describe('loadLlama rejects bad checkpoints before uploading anything', () => {
  const gpu = useGpu();
  const m = syntheticModel({ seed: 23 });
  const withTensors = (tensors: TensorToWrite[]): Record<string, Uint8Array | string> => ({ ...m.files, 'model.safetensors': writeSafetensors(tensors) });
  const expectRejected = async (files: Record<string, Uint8Array | string>, pattern: RegExp): Promise<void> => {
    const before = gpu().stats().inUseBytes;
    const e = await formatErrorOf(loadLlama(gpu(), memorySource(files), { format: 'q4' }));
    expect(e.message).toMatch(pattern);
    expect(gpu().stats().inUseBytes).toBe(before);
  };

  it('a missing tensor', async () => {
    await expectRejected(
      withTensors(m.tensors.filter((t) => t.name !== 'model.layers.1.mlp.up_proj.weight')),
      /^model\.safetensors, tensor "model\.layers\.1\.mlp\.up_proj\.weight": is missing from the checkpoint/,
    );
  });

  it('a wrong shape', async () => {
    const tensors = m.tensors.map((t) => (t.name === 'model.layers.0.self_attn.k_proj.weight' ? { ...t, shape: [64, 32] } : t));
    await expectRejected(withTensors(tensors), /^model\.safetensors, tensor "model\.layers\.0\.self_attn\.k_proj\.weight": has shape \[64,32\] but config\.json implies \[32,64\]/);
  });

  it('an unsupported dtype', async () => {
    const tensors = m.tensors.map((t) => (t.name === 'model.norm.weight' ? { name: t.name, dtype: 'I16' as const, shape: t.shape, data: t.data } : t));
    await expectRejected(withTensors(tensors), /^model\.safetensors, tensor "model\.norm\.weight": has dtype I16; the lab loads BF16, F16 or F32 weights/);
  });

  it('a truncated file', async () => {
    const full = m.files['model.safetensors'] as Uint8Array;
    await expectRejected({ ...m.files, 'model.safetensors': full.subarray(0, full.length - 100) }, /^model\.safetensors, tensor "[^"]+": data_offsets .* run past the end of the data section/);
  });

  it('an unsupported architecture, and a folder without safetensors weights', async () => {
    const config = { ...(m.config as object), architectures: ['MistralForCausalLM'] };
    await expectRejected({ ...m.files, 'config.json': JSON.stringify(config) }, /^config\.json, architectures: unsupported architecture MistralForCausalLM/);
    const { ['model.safetensors']: _, ...noWeights } = m.files;
    await expectRejected({ ...noWeights, 'pytorch_model.bin': new Uint8Array(8) }, /^memory-model: holds neither model\.safetensors nor model\.safetensors\.index\.json\. The lab reads safetensors weights/);
  });

  it('format f32 larger than one device buffer: refused before any upload', async () => {
    const caps = { ...gpu().caps, maxBufferSize: 20_000 };
    const limited = Object.create(gpu(), { caps: { value: caps } }) as typeof gpu extends () => infer G ? G : never;
    const before = gpu().stats().inUseBytes;
    await expect(loadLlama(limited, memorySource(m.files), { format: 'f32' })).rejects.toThrow(
      /^model\.embed_tokens\.weight: format "f32" needs 76800 bytes in one buffer but this device allows 20000; load the model with format "q4"\.$/,
    );
    expect(gpu().stats().inUseBytes).toBe(before);
  });

  it('a read failing half-way releases every buffer already uploaded', async () => {
    const inner = memorySource(m.files);
    let reads = 0;
    const failing: ModelSource = {
      ...inner,
      open: async (f) => {
        const file = await inner.open(f);
        return {
          name: file.name,
          size: file.size,
          read: (offset, length) => (++reads > 10 ? Promise.reject(new Error('connection reset')) : file.read(offset, length)),
        };
      },
    };
    const before = gpu().stats().inUseBytes;
    await expect(loadLlama(gpu(), failing, { format: 'q4' })).rejects.toThrow(/connection reset/);
    expect(reads).toBeGreaterThan(10);
    expect(gpu().stats().inUseBytes).toBe(before);
  });
});

describe('loadLlama streams: JS memory stays near one chunk', () => {
  const gpu = useGpu();

  it('reads each byte once, in reads no larger than maxChunkBytes, and reports progress', async () => {
    const maxChunkBytes = 256 << 10;
    const { source, log } = countingSource(await openModelDir(TINY_DIR));
    const events: LoadProgress[] = [];
    const m = await loadLlama(gpu(), source, { format: 'q4', maxChunkBytes, onProgress: (p) => events.push(p) });
    const st = await openSafetensors(await NodeFileSource.open(join(TINY_DIR, 'model.safetensors')));
    const dataBytes = [...st.tensors.values()].reduce((a, t) => a + t.byteLength, 0);
    // The header (one 64 KiB prefetch), then every tensor's data exactly once.
    expect(log.bytesRead).toBe(Math.min(65536, st.header.fileSize) + dataBytes);
    expect(log.largestRead).toBeLessThanOrEqual(maxChunkBytes);
    expect(log.reads).toBeGreaterThanOrEqual(Math.ceil(dataBytes / maxChunkBytes));
    expect(events.length).toBe(log.reads - 1);
    expect(events.every((e, i) => e.phase === 'weights' && e.bytesTotal === dataBytes && (i === 0 || e.bytesDone > events[i - 1]!.bytesDone))).toBe(true);
    expect(events.at(-1)!.bytesDone).toBe(dataBytes);
    expect(events[0]).toMatchObject({ file: 'model.safetensors', tensor: 'model.embed_tokens.weight' });
    m.weights.release();
  });

  it('live ArrayBuffer memory grows by a few chunks, not by the checkpoint size', async () => {
    setFlagsFromString('--expose-gc');
    const gc = runInNewContext('gc') as () => void;
    const maxChunkBytes = 512 << 10;
    gc();
    const base = process.memoryUsage().arrayBuffers;
    let peak = -Infinity;
    let samples = 0;
    const m = await loadLlama(gpu(), await openModelDir(TINY_DIR), {
      format: 'q4',
      maxChunkBytes,
      onProgress: () => {
        // Sampled with the current chunk still referenced: what the loader holds at its busiest.
        // Growth can read as negative where buffers alive at `base` (an earlier test's staging
        // memory) are freed during the load; the bound is on the largest sample either way.
        samples++;
        peak = Math.max(peak, process.memoryUsage().arrayBuffers - base);
        gc();
      },
    });
    console.log(`peak live ArrayBuffer growth while loading the 16.6 MB checkpoint: ${(peak / 2 ** 20).toFixed(2)} MiB (chunk ${maxChunkBytes / 2 ** 20} MiB)`);
    expect(samples).toBeGreaterThan(4);
    expect(peak).toBeLessThan(4 * maxChunkBytes);
    m.weights.release();
  });
});
