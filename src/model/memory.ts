/**
 * The GPU memory a model and a run need, stated before anything is loaded, from the
 * same buffer shapes the engine allocates (each rounded up to its buffer-pool bucket):
 *
 *   weights       every tensor the loader creates: 4-bit shards (qweight, f16 scales,
 *                 zero points; q4ShardRows) of the embedding and the seven projections per
 *                 layer, f32 norms, RoPE inverse frequencies, the score head
 *   lora          A [R, K], B [M, R] per adapted projection and their grad buffers (f32)
 *   optimizer     AdamW m and v of the same shapes
 *   kvCache       generation: per layer K and V [G, Smax, HK, D] for the G answers
 *                 (Smax = maxNewTokens - 1: the last sampled token never enters the
 *                 cache) plus the prompt stored once as a shared prefix [P, HK, D]; f16
 *                 where the device has shader-f16 (generate()'s defaultKvDtype), else f32
 *   generationScratch  the larger of the prompt's prefill (one layer at a time, its MLP
 *                 tensors) and a decode step (the [G, V] logits)
 *   activations   training with per-layer checkpointing over N = trainTokensPerStep rows:
 *                 every layer's input [N, C] (plus the last output) kept for the whole
 *                 step, one layer's recomputed forward (norm outputs, q/k/v before and
 *                 after RoPE, attention output and its lse [N, H], the [N, F] gate, up and
 *                 SwiGLU tensors, LoRA intermediates [N, R]) and that layer's backward
 *                 working set (three [N, F] or attention gradients, plus [N, C] ones)
 *   lmHeadScratch the [N, chunk] logits chunk of the fused LM head (lmHeadScratchBytes);
 *                 it exists only while the head runs, so training's peak is the larger of
 *                 the activations and the head's scratch with what the whole step keeps
 *
 * test/model/memory.test.ts checks these against the buffer pool's measured peaks of
 * a real training step and generation on a small model (within 2%; weights, LoRA and
 * optimizer exactly).
 *
 * Generation and training never overlap: the total is the persistent part (weights,
 * LoRA, optimizer) plus the larger of the two phases, assuming the buffer pool is
 * trimmed between them (`untrimmedTotal` is the sum, if freed buffers are kept).
 */
import { llamaTensorShapes, type LlamaConfig } from '../formats/llama-config';
import type { Gpu } from '../gpu/gpu';
import { bucketBytes } from '../gpu/pool';
import { lmHeadScratchBytes } from '../kernels/lmhead';
import { q4Blocks, q4ShardRows } from '../kernels/q4-layout';
import { isQuantizedTensor } from './load';
import type { WeightFormat } from './weights';
import { PROJECTION_FIELDS } from './weights';

export type LoraTarget = keyof typeof PROJECTION_FIELDS;

export interface RunShape {
  format: WeightFormat;
  /** LoRA rank R (0: no adapter) */
  loraRank: number;
  loraTargets: readonly LoraTarget[];
  /** answers generated per prompt (G) */
  groupSize: number;
  maxPromptTokens: number;
  maxNewTokens: number;
  /**
   * Rows of one training forward/backward (N). Default: one sequence, prompt plus answer,
   * with gradients accumulated over the group's answers.
   */
  trainTokensPerStep?: number;
  /** Per-layer gradient checkpointing (the engine always uses it). */
  checkpointing: true;
  /** 4-bit zero points (default true, as the loader). */
  q4Zeros?: boolean;
  /** KV cache element type; default f16 when the limits say the device has shader-f16, else f32 (as generate()). */
  kvCache?: 'f32' | 'f16';
}

export interface DeviceLimits {
  maxBufferSize: number;
  maxStorageBufferBindingSize: number;
  /** What the run may use in total (e.g. 4 GB); unchecked when absent. */
  totalBudgetBytes?: number;
  /** The device has shader-f16 (GpuCapabilities.f16): generation then keeps an f16 KV cache. */
  f16?: boolean;
}

export interface MemoryProblem {
  kind: 'buffer-too-large' | 'over-budget' | 'context-too-long';
  /** Plain words: what does not fit. */
  message: string;
  /** Plain words: what to change. */
  fix: string;
}

export interface MemoryPlan {
  weights: number;
  lora: number;
  optimizer: number;
  kvCache: number;
  generationScratch: number;
  activations: number;
  lmHeadScratch: number;
  /** training's peak: the activations, or the LM head's scratch with what the step keeps, whichever is larger */
  trainingPeak: number;
  /** persistent + the larger phase */
  total: number;
  /** persistent + both phases (when the pool keeps freed buffers between phases) */
  untrimmedTotal: number;
  /** the phase that sets the peak */
  peakPhase: 'generation' | 'training';
  /** element type of the planned KV cache */
  kvCacheDtype: 'f32' | 'f16';
  /** peak while loading: the weights plus the staging buffer of the largest tensor */
  loadPeak: number;
  trainTokensPerStep: number;
  largestBuffer: { bytes: number; what: string };
  problems: MemoryProblem[];
}

/** One kind of buffer: `count` buffers of `bytes` each. */
interface Buffers {
  what: string;
  bytes: number;
  count: number;
}

const F32 = 4;

/** GPU bytes a buffer of `bytes` data bytes takes (Gpu.empty's 4-byte rounding, then the pool bucket). */
export function allocatedBytes(bytes: number): number {
  return bucketBytes(Math.max(4, Math.ceil(bytes / 4) * 4));
}

function sum(list: readonly Buffers[]): number {
  return list.reduce((a, b) => a + allocatedBytes(b.bytes) * b.count, 0);
}

function largest(list: readonly Buffers[]): Buffers | null {
  let best: Buffers | null = null;
  for (const b of list) if (b.count > 0 && (!best || b.bytes > best.bytes)) best = b;
  return best;
}

/** Every buffer the loader allocates for a model's weights. */
export function weightBuffers(config: LlamaConfig, format: WeightFormat, zeros: boolean, maxShardBytes: number): Buffers[] {
  const out: Buffers[] = [];
  for (const [name, shape] of llamaTensorShapes(config)) {
    if (format === 'q4' && isQuantizedTensor(name)) {
      const [M, K] = shape as [number, number];
      const nb = q4Blocks(K);
      const zb = Math.ceil(nb / 2);
      const rowsPer = q4ShardRows(M, K, maxShardBytes);
      for (let r0 = 0; r0 < M; r0 += rowsPer) {
        const rows = Math.min(rowsPer, M - r0);
        out.push({ what: `${name} 4-bit shard`, bytes: rows * nb * 16, count: 1 });
        out.push({ what: `${name} scales`, bytes: Math.ceil((rows * nb) / 2) * 4, count: 1 });
        if (zeros) out.push({ what: `${name} zero points`, bytes: Math.ceil((rows * zb) / 4) * 4, count: 1 });
      }
    } else {
      out.push({ what: `${name} (f32)`, bytes: shape.reduce((a, b) => a * b, F32), count: 1 });
    }
  }
  out.push({ what: 'RoPE inverse frequencies', bytes: (config.headDim / 2) * F32, count: 1 });
  return out;
}

/** [M, K] of each projection LoRA can adapt. */
function projectionShapes(config: LlamaConfig): Record<LoraTarget, [number, number]> {
  const shapes = llamaTensorShapes(config);
  const get = (mod: string): [number, number] => shapes.get(`model.layers.0.${mod}.weight`) as [number, number];
  return {
    q_proj: get('self_attn.q_proj'),
    k_proj: get('self_attn.k_proj'),
    v_proj: get('self_attn.v_proj'),
    o_proj: get('self_attn.o_proj'),
    gate_proj: get('mlp.gate_proj'),
    up_proj: get('mlp.up_proj'),
    down_proj: get('mlp.down_proj'),
  };
}

function loraBuffers(config: LlamaConfig, run: RunShape): { params: Buffers[]; optimizer: Buffers[] } {
  const R = run.loraRank;
  const params: Buffers[] = [];
  const optimizer: Buffers[] = [];
  if (R <= 0 || run.loraTargets.length === 0) return { params, optimizer };
  const shapes = projectionShapes(config);
  const L = config.numLayers;
  for (const t of new Set(run.loraTargets)) {
    const [M, K] = shapes[t];
    // A, B and their grads; AdamW m and v of each.
    params.push({ what: `LoRA ${t} A and grad [${R}, ${K}]`, bytes: R * K * F32, count: 2 * L });
    params.push({ what: `LoRA ${t} B and grad [${M}, ${R}]`, bytes: M * R * F32, count: 2 * L });
    optimizer.push({ what: `AdamW m, v of ${t} A`, bytes: R * K * F32, count: 2 * L });
    optimizer.push({ what: `AdamW m, v of ${t} B`, bytes: M * R * F32, count: 2 * L });
  }
  optimizer.push({ what: 'grad norm, clip state, step statistics', bytes: F32, count: 3 });
  return { params, optimizer };
}

/** KV cache, and the two peaks of generation's scratch: the prompt's prefill and a decode step. */
function generationBuffers(config: LlamaConfig, run: RunShape, kvDtype: 'f32' | 'f16'): { kv: Buffers[]; prefill: Buffers[]; decode: Buffers[] } {
  const { numLayers: L, numKvHeads: HK, headDim: D, hiddenSize: C, intermediateSize: F, vocabSize: V } = config;
  const G = run.groupSize;
  const P = run.maxPromptTokens;
  const Smax = Math.max(1, run.maxNewTokens - 1);
  const E = kvDtype === 'f16' ? 2 : F32;
  const kv: Buffers[] = [{ what: `KV cache per layer [${G}, ${Smax}, ${HK}, ${D}] ${kvDtype} (K and V)`, bytes: G * Smax * HK * D * E, count: 2 * L }];
  if (P > 0) kv.push({ what: `shared prompt KV per layer [${P}, ${HK}, ${D}] ${kvDtype} (K and V)`, bytes: P * HK * D * E, count: 2 * L });
  // Prefill runs the prompt one layer at a time; its peak is inside the MLP.
  const prefill: Buffers[] = [
    { what: `prefill hidden state [${P}, ${C}]`, bytes: P * C * F32, count: 1 },
    { what: `prefill positions [${P}]`, bytes: P * 4, count: 1 },
    { what: `prefill MLP gate, up, SwiGLU [${P}, ${F}]`, bytes: P * F * F32, count: 3 },
  ];
  const decode: Buffers[] = [
    { what: `logits [${G}, ${V}] (and the copy for the group)`, bytes: G * V * F32, count: 2 },
    { what: `decode MLP gate, up, SwiGLU [${G}, ${F}]`, bytes: G * F * F32, count: 3 },
    { what: `decode hidden state [${G}, ${C}]`, bytes: G * C * F32, count: 2 },
    { what: `sampled ids, log-probs, readback [${G}]`, bytes: 2 * G * 4, count: 3 },
  ];
  return { kv, prefill, decode };
}

/**
 * Training buffers in three groups: the whole step's (`step`), the peak inside one
 * layer's recomputation and backward (`layer`), and the LM head's backward (`head`,
 * besides its chunk scratch). The two peaks do not overlap.
 */
function trainingBuffers(config: LlamaConfig, run: RunShape, N: number): { step: Buffers[]; layer: Buffers[]; head: Buffers[] } {
  const { numLayers: L, hiddenSize: C, intermediateSize: F, numHeads: H, numKvHeads: HK, headDim: D } = config;
  const R = run.loraRank > 0 ? run.loraRank : 0;
  const adapted = R > 0 ? new Set(run.loraTargets).size : 0;
  const NC = N * C * F32;
  const attnBack = 3 * H * D + 3 * HK * D + H;
  const mlpBack = 3 * F;
  const step: Buffers[] = [
    { what: `token ids, positions, targets [${N}]`, bytes: N * 4, count: 3 },
    { what: `checkpointed layer inputs [${N}, ${C}] (embedding output, each layer's output)`, bytes: NC, count: L + 1 },
    { what: `final norm output [${N}, ${C}]`, bytes: NC, count: 1 },
    { what: `log-probs, lse, entropy, their gradient, norm statistics [${N}]`, bytes: N * F32, count: 5 },
  ];
  const layer: Buffers[] = [
    { what: `residual gradient [${N}, ${C}]`, bytes: NC, count: 1 },
    // One layer recomputed under the backward's tape: every output and what its backward saves.
    { what: `layer norm outputs, projections, residual sums [${N}, ${C}]`, bytes: NC, count: 6 },
    { what: `q before and after RoPE, attention output [${N}, ${H * D}]`, bytes: N * H * D * F32, count: 3 },
    { what: `k before and after RoPE, v [${N}, ${HK * D}]`, bytes: N * HK * D * F32, count: 3 },
    { what: `attention lse [${N}, ${H}]`, bytes: N * H * F32, count: 1 },
    { what: `MLP gate, up, SwiGLU [${N}, ${F}]`, bytes: N * F * F32, count: 3 },
    { what: `LoRA intermediates x A^T [${N}, ${R}]`, bytes: N * R * F32, count: adapted },
    // Its backward at the widest point: the MLP gradients (or the attention ones, if larger).
    {
      what: mlpBack >= attnBack ? `MLP gradients [${N}, ${F}]` : `attention gradients [${N}, ${H * D}]`,
      bytes: (mlpBack >= attnBack ? N * F : N * H * D) * F32,
      count: 3,
    },
    { what: `layer gradient [${N}, ${C}]`, bytes: NC, count: 1 },
    { what: `LoRA intermediate gradient [${N}, ${R}]`, bytes: N * R * F32, count: adapted > 0 ? 1 : 0 },
  ];
  const head: Buffers[] = [{ what: `LM head input gradient [${N}, ${C}]`, bytes: NC, count: 1 }];
  return { step, layer, head };
}

/** The LM head's chunk logits for N rows on a device with these limits (the kernel's own rule). */
function lmHeadScratch(limits: DeviceLimits, N: number, V: number): number {
  const caps = { maxBufferSize: limits.maxBufferSize, maxStorageBufferBindingSize: limits.maxStorageBufferBindingSize };
  return lmHeadScratchBytes({ caps } as unknown as Gpu, N, V);
}

const MiB = 1 << 20;
const mb = (n: number): string => `${Math.round(n / MiB)} MiB`;

export function planMemory(config: LlamaConfig, run: RunShape, limits: DeviceLimits): MemoryPlan {
  const bufferLimit = Math.min(limits.maxBufferSize, limits.maxStorageBufferBindingSize);
  const zeros = run.q4Zeros ?? true;
  const N = run.trainTokensPerStep ?? run.maxPromptTokens + run.maxNewTokens;
  if (!(Number.isInteger(N) && N >= 1)) throw new Error(`planMemory: trainTokensPerStep must be a positive integer, got ${N}`);
  for (const [k, v] of [['groupSize', run.groupSize], ['maxNewTokens', run.maxNewTokens], ['maxPromptTokens', run.maxPromptTokens], ['loraRank', run.loraRank]] as const) {
    if (!(Number.isInteger(v) && v >= 0)) throw new Error(`planMemory: ${k} must be a non-negative integer, got ${v}`);
  }

  const w = weightBuffers(config, run.format, zeros, bufferLimit);
  const { params, optimizer } = loraBuffers(config, run);
  const kvDtype = run.kvCache ?? (limits.f16 ? 'f16' : 'f32');
  if (kvDtype !== 'f32' && kvDtype !== 'f16') throw new Error(`planMemory: kvCache must be 'f32' or 'f16', got ${String(kvDtype)}`);
  const { kv, prefill, decode } = generationBuffers(config, run, kvDtype);
  const scratch = [...prefill, ...decode];
  const train = trainingBuffers(config, run, N);
  const trainAll = [...train.step, ...train.layer, ...train.head];
  const headScratch = lmHeadScratch(limits, N, config.vocabSize);
  const headBuffer: Buffers = { what: `LM head logits chunk for ${N} rows`, bytes: headScratch, count: 1 };

  const weights = sum(w);
  const lora = sum(params);
  const opt = sum(optimizer);
  const kvCache = sum(kv);
  const generationScratch = Math.max(sum(prefill), sum(decode));
  const activations = sum(train.step) + sum(train.layer);
  const lmHeadScratchB = allocatedBytes(headScratch);
  const persistent = weights + lora + opt;
  const generation = kvCache + generationScratch;
  // The LM head's scratch lives only while the head runs, before the layers' backward.
  const training = Math.max(activations, sum(train.step) + sum(train.head) + lmHeadScratchB);
  const total = persistent + Math.max(generation, training);

  // The loader stages one tensor's raw rows (at most 256 MiB) while quantizing it.
  const largestRaw = Math.max(...[...llamaTensorShapes(config).values()].map((s) => s.reduce((a, b) => a * b, 2)));
  const loadPeak = weights + allocatedBytes(Math.min(largestRaw, 256 * MiB, bufferLimit));

  const big = largest([...w, ...params, ...optimizer, ...kv, ...scratch, ...trainAll, headBuffer])!;
  const problems: MemoryProblem[] = [];
  for (const b of [...w, ...kv, ...scratch, ...trainAll, headBuffer]) {
    if (b.count === 0 || b.bytes <= bufferLimit) continue;
    const isWeight = w.includes(b);
    const isGen = kv.includes(b) || scratch.includes(b);
    problems.push({
      kind: 'buffer-too-large',
      message: `${b.what} needs one ${mb(b.bytes)} buffer, but this GPU allows at most ${mb(bufferLimit)} per buffer.`,
      fix: isWeight
        ? 'Load the model in 4-bit (format q4), or pick a smaller model.'
        : isGen
          ? 'Generate fewer answers per prompt (G) or shorter answers, or use a shorter prompt.'
          : 'Train on fewer tokens per step (shorter prompts and answers, or smaller micro-batches).',
    });
    break;
  }
  const ctx = run.maxPromptTokens + run.maxNewTokens;
  if (config.maxPositionEmbeddings !== null && ctx > config.maxPositionEmbeddings) {
    problems.push({
      kind: 'context-too-long',
      message: `A prompt of ${run.maxPromptTokens} tokens plus ${run.maxNewTokens} new tokens is longer than the model's ${config.maxPositionEmbeddings}-token context.`,
      fix: 'Shorten the prompt or the answers.',
    });
  }
  if (limits.totalBudgetBytes !== undefined && total > limits.totalBudgetBytes) {
    const parts = [
      ['model weights', weights],
      ['LoRA and optimizer state', lora + opt],
      [generation >= training ? 'KV cache while generating' : 'training activations', Math.max(generation, training)],
    ] as const;
    problems.push({
      kind: 'over-budget',
      message:
        `This run needs about ${mb(total)} of GPU memory but only ${mb(limits.totalBudgetBytes)} is available ` +
        `(${parts.map(([k, v]) => `${k} ${mb(v)}`).join(', ')}).`,
      fix:
        generation >= training
          ? `Generate fewer answers per prompt (G = ${run.groupSize} now) or shorter answers (${run.maxNewTokens} tokens now), or pick a smaller model.`
          : `Train on fewer tokens per step (${N} now), use shorter answers, or pick a smaller model.`,
    });
  }

  return {
    weights,
    lora,
    optimizer: opt,
    kvCache,
    generationScratch,
    activations,
    lmHeadScratch: lmHeadScratchB,
    trainingPeak: training,
    total,
    untrimmedTotal: persistent + generation + training,
    peakPhase: generation >= training ? 'generation' : 'training',
    kvCacheDtype: kvDtype,
    loadPeak,
    trainTokensPerStep: N,
    largestBuffer: { bytes: allocatedBytes(big.bytes), what: big.what },
    problems,
  };
}

/** The plan as aligned text lines (for logs and the benchmark). */
export function formatMemoryPlan(plan: MemoryPlan): string[] {
  const rows: [string, number][] = [
    ['weights', plan.weights],
    ['LoRA A/B + grads', plan.lora],
    ['AdamW m, v', plan.optimizer],
    [`KV cache (generation, ${plan.kvCacheDtype})`, plan.kvCache],
    ['generation scratch', plan.generationScratch],
    [`activations (training, N=${plan.trainTokensPerStep})`, plan.activations],
    ['LM head chunk scratch', plan.lmHeadScratch],
    ['training peak', plan.trainingPeak],
    [`total (peak: ${plan.peakPhase})`, plan.total],
  ];
  const width = Math.max(...rows.map(([k]) => k.length));
  const lines = rows.map(([k, v]) => `${k.padEnd(width)}  ${(v / MiB).toFixed(1).padStart(9)} MiB  ${(v / 1e9).toFixed(3).padStart(7)} GB`);
  lines.push(`(${mb(plan.untrimmedTotal)} if the pool keeps generation's buffers while training; ${mb(plan.loadPeak)} while loading)`);
  lines.push(`largest buffer: ${mb(plan.largestBuffer.bytes)} (${plan.largestBuffer.what})`);
  for (const p of plan.problems) lines.push(`problem: ${p.message} ${p.fix}`);
  return lines;
}
