/** Model sources and checkpoints built in memory for the loader, cache and tokenizer tests. */
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { FormatError, parseJsonInput } from '../../src/formats/errors';
import { parseLlamaConfig } from '../../src/formats/llama-config';
import { MemorySource, f32ToBf16, writeSafetensors, type SafetensorsDType, type TensorToWrite } from '../../src/formats/safetensors';
import type { Gpu } from '../../src/gpu/gpu';
import type { FrozenLinear } from '../../src/kernels/linear';
import type { ModelFile, ModelSource } from '../../src/model/source';
import type { LlamaWeights } from '../../src/model/weights';
import { f32ToF16 } from '../../src/gpu/gpu';
import { Rng } from './numeric';

export const ROOT = fileURLToPath(new URL('../..', import.meta.url));
export const TINY_DIR = join(ROOT, 'models', 'tiny-llama');

/** Llama-3.2-3B-Instruct's config.json fields (formats.md). */
export const CONFIG_3B = parseLlamaConfig(
  {
    architectures: ['LlamaForCausalLM'],
    model_type: 'llama',
    hidden_size: 3072,
    intermediate_size: 8192,
    num_hidden_layers: 28,
    num_attention_heads: 24,
    num_key_value_heads: 8,
    head_dim: 128,
    vocab_size: 128256,
    max_position_embeddings: 131072,
    rope_theta: 500000,
    rope_scaling: { rope_type: 'llama3', factor: 32, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 },
    rms_norm_eps: 1e-5,
    tie_word_embeddings: true,
    bos_token_id: 128000,
    eos_token_id: [128001, 128008, 128009],
    torch_dtype: 'bfloat16',
  },
  'config.json',
);

/** Every call a source received, and the largest single read it answered. */
export interface SourceLog {
  calls: string[];
  reads: number;
  bytesRead: number;
  largestRead: number;
}

/** Wraps a source, logging every call and every byte read through the files it opens. */
export function countingSource(inner: ModelSource): { source: ModelSource; log: SourceLog } {
  const log: SourceLog = { calls: [], reads: 0, bytesRead: 0, largestRead: 0 };
  const source: ModelSource = {
    name: inner.name,
    revision: inner.revision,
    has: (f) => (log.calls.push(`has ${f}`), inner.has(f)),
    readJson: (f) => (log.calls.push(`readJson ${f}`), inner.readJson(f)),
    readText: (f) => (log.calls.push(`readText ${f}`), inner.readText(f)),
    open: async (f) => {
      log.calls.push(`open ${f}`);
      const file = await inner.open(f);
      const wrapped: ModelFile = {
        name: file.name,
        size: file.size,
        read: async (offset, length) => {
          const bytes = await file.read(offset, length);
          log.reads++;
          log.bytesRead += bytes.length;
          log.largestRead = Math.max(log.largestRead, bytes.length);
          return bytes;
        },
        close: () => file.close?.() ?? Promise.resolve(),
      };
      return wrapped;
    },
  };
  return { source, log };
}

/** A model folder held in memory: file name -> bytes or text. */
export function memorySource(files: Record<string, Uint8Array | string>, name = 'memory-model', revision: string | null = 'r1'): ModelSource {
  const bytes = (f: string): Uint8Array => {
    const v = files[f];
    if (v === undefined) throw new FormatError(f, null, `is missing from ${name}`, 'Add the file.');
    return typeof v === 'string' ? new TextEncoder().encode(v) : v;
  };
  return {
    name,
    revision,
    has: (f) => Promise.resolve(f in files),
    open: (f) => Promise.resolve(new MemorySource(bytes(f), f)),
    readText: (f) => Promise.resolve(new TextDecoder().decode(bytes(f))),
    readJson: (f) => Promise.resolve(parseJsonInput(new TextDecoder().decode(bytes(f)), f)),
  };
}

/** The values of a frozen linear layer W [M, K], read through its own matmul with an identity input. */
export async function linearValues(gpu: Gpu, lin: FrozenLinear): Promise<Float32Array> {
  const { V: M, C: K } = lin;
  const eye = new Float32Array(K * K);
  for (let i = 0; i < K; i++) eye[i * K + i] = 1;
  const h = gpu.upload(eye, [K, K]);
  const out = gpu.empty([K, M]);
  lin.logits(gpu, out, h, K, 0, M);
  const wt = await gpu.readF32(out);
  h.release();
  out.release();
  const w = new Float32Array(M * K);
  for (let k = 0; k < K; k++) for (let m = 0; m < M; m++) w[m * K + k] = wt[k * M + m]!;
  return w;
}

export interface SyntheticModel {
  config: Record<string, unknown>;
  /** tensor name -> f32 values (as stored, after rounding to the checkpoint dtype) */
  values: Map<string, Float32Array>;
  tensors: TensorToWrite[];
  files: Record<string, Uint8Array | string>;
}

export interface SyntheticOptions {
  vocab?: number;
  hidden?: number;
  intermediate?: number;
  layers?: number;
  heads?: number;
  kvHeads?: number;
  dtype?: SafetensorsDType;
  tied?: boolean;
  architecture?: 'LlamaForCausalLM' | 'LlamaForSequenceClassification';
  numLabels?: number;
  seed?: number;
}

function encode(dtype: SafetensorsDType, v: Float32Array): { data: ArrayBufferView; values: Float32Array } {
  if (dtype === 'F32') return { data: v, values: v };
  if (dtype === 'BF16') {
    const bits = f32ToBf16(v);
    const back = new Float32Array(bits.length);
    new Uint32Array(back.buffer).set(Array.from(bits, (b) => b << 16));
    return { data: bits, values: back };
  }
  if (dtype === 'F16') {
    const bits = f32ToF16(v);
    return { data: bits, values: Float32Array.from(new Float32Array(v.length), (_, i) => f16Value(bits[i]!)) };
  }
  throw new Error(`synthetic model: dtype ${dtype}`);
}

function f16Value(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 31;
  const m = h & 1023;
  return e === 0 ? s * m * 2 ** -24 : s * (1 + m / 1024) * 2 ** (e - 15);
}

/** A small random Llama checkpoint in the hub layout (config.json, generation_config.json, model.safetensors). */
export function syntheticModel(o: SyntheticOptions = {}): SyntheticModel {
  const V = o.vocab ?? 300;
  const C = o.hidden ?? 64;
  const F = o.intermediate ?? 96;
  const L = o.layers ?? 2;
  const H = o.heads ?? 4;
  const HK = o.kvHeads ?? 2;
  const D = C / H;
  const dtype = o.dtype ?? 'BF16';
  const tied = o.tied ?? true;
  const arch = o.architecture ?? 'LlamaForCausalLM';
  const rng = new Rng(o.seed ?? 7);
  const config: Record<string, unknown> = {
    architectures: [arch],
    model_type: 'llama',
    hidden_size: C,
    intermediate_size: F,
    num_hidden_layers: L,
    num_attention_heads: H,
    num_key_value_heads: HK,
    head_dim: D,
    vocab_size: V,
    max_position_embeddings: 2048,
    rope_theta: 10000,
    rms_norm_eps: 1e-5,
    tie_word_embeddings: tied,
    bos_token_id: 1,
    eos_token_id: 2,
    torch_dtype: dtype === 'BF16' ? 'bfloat16' : dtype === 'F16' ? 'float16' : 'float32',
  };
  if (arch === 'LlamaForSequenceClassification') config.num_labels = o.numLabels ?? 1;
  const shapes: [string, number[]][] = [['model.embed_tokens.weight', [V, C]]];
  for (let l = 0; l < L; l++) {
    const p = `model.layers.${l}`;
    shapes.push(
      [`${p}.input_layernorm.weight`, [C]],
      [`${p}.self_attn.q_proj.weight`, [H * D, C]],
      [`${p}.self_attn.k_proj.weight`, [HK * D, C]],
      [`${p}.self_attn.v_proj.weight`, [HK * D, C]],
      [`${p}.self_attn.o_proj.weight`, [C, H * D]],
      [`${p}.post_attention_layernorm.weight`, [C]],
      [`${p}.mlp.gate_proj.weight`, [F, C]],
      [`${p}.mlp.up_proj.weight`, [F, C]],
      [`${p}.mlp.down_proj.weight`, [C, F]],
    );
  }
  shapes.push(['model.norm.weight', [C]]);
  if (arch === 'LlamaForSequenceClassification') shapes.push(['score.weight', [o.numLabels ?? 1, C]]);
  else if (!tied) shapes.push(['lm_head.weight', [V, C]]);
  const values = new Map<string, Float32Array>();
  const tensors: TensorToWrite[] = [];
  for (const [name, shape] of shapes) {
    const n = shape.reduce((a, b) => a * b, 1);
    const raw = name.endsWith('norm.weight') ? Float32Array.from({ length: n }, () => 1 + 0.1 * rng.normal()) : rng.f32(n, 0.05);
    const { data, values: v } = encode(dtype, raw);
    values.set(name, v);
    tensors.push({ name, dtype, shape, data });
  }
  const files: Record<string, Uint8Array | string> = {
    'config.json': JSON.stringify(config),
    'generation_config.json': JSON.stringify({ bos_token_id: 1, eos_token_id: [2, 3], temperature: 0.7, top_k: 40 }),
    'model.safetensors': writeSafetensors(tensors, { format: 'pt' }),
  };
  return { config, values, tensors, files };
}

/** Throws unless both views hold the same bytes, naming the first differing element. */
export function expectSameBytes(actual: ArrayBufferView, expected: ArrayBufferView, label = 'values'): void {
  const a = new Uint8Array(actual.buffer, actual.byteOffset, actual.byteLength);
  const e = new Uint8Array(expected.buffer, expected.byteOffset, expected.byteLength);
  if (a.length !== e.length) throw new Error(`${label}: ${a.length} bytes, expected ${e.length}`);
  if (Buffer.compare(a, e) === 0) return;
  let i = 0;
  while (a[i] === e[i]) i++;
  const size = 'BYTES_PER_ELEMENT' in actual ? (actual as unknown as { BYTES_PER_ELEMENT: number }).BYTES_PER_ELEMENT : 1;
  const el = Math.floor(i / size);
  const show = (v: ArrayBufferView): unknown => (v as unknown as ArrayLike<number>)[el];
  throw new Error(`${label}: first difference at element ${el}: got ${String(show(actual))}, expected ${String(show(expected))}`);
}

/**
 * The model restricted to its first V vocabulary rows (its LM head and ids); shares the
 * layers and owns nothing, so its release is a no-op. Keeps logits readbacks small.
 */
export function smallVocab(w: LlamaWeights, V: number): LlamaWeights {
  const head = w.lmHead;
  const lmHead: FrozenLinear = {
    V,
    C: head.C,
    logits: (gpu, out, h, N, rowStart, rows) => head.logits(gpu, out, h, N, rowStart, rows),
    backward: (gpu, dh, dl, N, rowStart, rows, acc) => head.backward(gpu, dh, dl, N, rowStart, rows, acc),
  };
  return { ...w, config: { ...w.config, vocabSize: V }, lmHead, release: () => undefined };
}
