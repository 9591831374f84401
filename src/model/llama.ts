/**
 * The differentiable Llama forward over a batch of B sequences of T tokens each
 * (N = B*T rows), for scoring and for LoRA training:
 *
 *   x0 = embed(ids)                                           [N, C]   (frozen, no grad)
 *   per layer, under tape.checkpoint (recomputed in backward):
 *     h  = rmsnorm(x, inputNorm)                              [N, C]
 *     q  = rope(h Wq^T + lora)                                [N, H*D]
 *     k  = rope(h Wk^T + lora), v = h Wv^T + lora             [N, HK*D]
 *     x' = x + attention(q, k, v) Wo^T + lora                 [N, C]   (causal GQA per sequence)
 *     h' = rmsnorm(x', postNorm)                              [N, C]
 *     x  = x' + swiglu(h' Wgate^T, h' Wup^T) Wdown^T + lora   [N, C]   (gate/up [N, F])
 *   h = rmsnorm(x, finalNorm)                                 [N, C]
 *   logp[n] = log softmax(h[n] W_lm^T / temperature)[target[n]]   [N]
 *
 * Right-padded batches: attention is causal, so a real token never sees the padding
 * after it; padding positions get target V (ignored: logp 0, no gradient). Positions
 * restart at 0 for every sequence.
 *
 * Scoring (train false) records nothing, keeps one layer's activations at a time and
 * returns only logp (and entropy) [N]. Training (train true) keeps each layer's input
 * [N, C] and recomputes the layer during backward(dlogp), where LoRA grads accumulate
 * (+=) into the adapter's grad buffers.
 */
import { attention, gatherRows, linear, rope, tokenLogp, type Lora } from '../autodiff/nn';
import { add, rmsnorm, swiglu } from '../autodiff/ops';
import { Tape, leaf, type Var } from '../autodiff/tape';
import type { Gpu } from '../gpu/gpu';
import type { Tensor } from '../gpu/tensor';
import { embeddingForward, embeddingForwardF32 } from '../kernels/embedding';
import { matmul } from '../kernels/matmul';
import type { LoraAdapter, ProjectionField } from './lora';
import type { LayerWeights, LlamaWeights } from './weights';

export interface TokenBatch {
  /** u32 [B*T] token ids, sequence b at rows b*T .. b*T+T-1, right-padded */
  ids: Uint32Array;
  B: number;
  T: number;
  /** Real tokens per sequence [B] (default T each); rows past a sequence's length are padding. */
  lengths?: ArrayLike<number>;
  /**
   * u32 [B*T]: the token each row's log-prob is taken of; >= V ignores the row.
   * Default: the next id of the same sequence, ignored at each sequence's last real
   * token and on padding.
   */
  targets?: Uint32Array;
}

export interface LogprobOptions {
  /** logits / temperature before the softmax (TRL's convention); default 1 */
  temperature?: number;
  /** also return the per-row entropy of that softmax */
  entropy?: boolean;
  /** record a tape for backward (LoRA training); default false */
  train?: boolean;
  /**
   * Score only these rows of the batch (distinct indices into [B*T]): the LM head runs
   * on M rows instead of B*T, and logp, entropy and dlogp are [M] in this order. The
   * rows a trainer needs are the completion tokens', so prompt rows cost no LM head.
   */
  rows?: ArrayLike<number>;
}

export interface LogprobPass {
  /** [B*T] log p(target) per row; 0 on ignored rows ([M] with `rows`) */
  logp: Tensor;
  /** [B*T] entropy per row (also computed on ignored rows: mask them), or null ([M] with `rows`) */
  entropy: Tensor | null;
  /** The recorded tape (train only); owns logp and entropy until release(). */
  tape: Tape | null;
  /**
   * Backpropagates sum_n dlogp[n] * logp[n] (dlogp f32 [B*T], borrowed): LoRA grads are
   * added into the adapter's grad buffers. Train only, once.
   */
  backward(dlogp: Tensor): void;
  /** Returns logp, entropy and (train) the tape's tensors to the pool. */
  release(): void;
}

/** Per-token log-probs of a batch under the base model plus `lora` (when given and enabled). */
export function sequenceLogprobs(
  gpu: Gpu,
  weights: LlamaWeights,
  lora: LoraAdapter | null,
  batch: TokenBatch,
  opts: LogprobOptions = {},
): LogprobPass {
  const train = opts.train ?? false;
  const { B, T } = checkBatch(weights, batch);
  let N = B * T;
  const tape = new Tape(gpu, train);
  try {
    let allTargets = batchTargets(batch, weights.config.vocabSize);
    let h = finalHidden(tape, weights, lora, batch);
    if (opts.rows) {
      const rows = Uint32Array.from(opts.rows);
      if (rows.length === 0) throw new Error('sequenceLogprobs: rows is empty');
      const seen = new Set<number>();
      for (const r of rows) {
        if (r >= N || seen.has(r)) throw new Error(`sequenceLogprobs: row ${r} is out of range or repeated (B*T = ${N})`);
        seen.add(r);
      }
      allTargets = Uint32Array.from(rows, (r) => allTargets[r]!);
      h = gatherRows(tape, h, tape.own(gpu.upload(rows, [rows.length], 'u32', 'llama.rows')), rows.length);
      N = rows.length;
    }
    const targets = tape.own(gpu.upload(allTargets, [N], 'u32', 'llama.targets'));
    const out = tokenLogp(tape, h, weights.lmHead, targets, { temperature: opts.temperature ?? 1, entropy: !!opts.entropy });
    if (!train) {
      const logp = tape.disown(out.logp.value);
      const entropy = out.entropy ? tape.disown(out.entropy.value) : null;
      tape.dispose();
      return {
        logp,
        entropy,
        tape: null,
        backward: () => {
          throw new Error('sequenceLogprobs: backward needs { train: true }');
        },
        release: () => {
          logp.release();
          entropy?.release();
        },
      };
    }
    let done = false;
    return {
      logp: out.logp.value,
      entropy: out.entropy?.value ?? null,
      tape,
      backward: (dlogp) => {
        if (done) throw new Error('sequenceLogprobs: backward called twice on one pass');
        done = true;
        if (dlogp.size !== N) throw new Error(`sequenceLogprobs: dlogp ${dlogp} must have ${N} entries`);
        if (out.logp.requiresGrad) tape.backward(out.logp, dlogp);
      },
      release: () => tape.dispose(),
    };
  } catch (e) {
    tape.dispose();
    throw e;
  }
}

/**
 * LlamaForSequenceClassification: scores [B, numLabels] = h[last real token of b] @ score^T,
 * with h the final-normed hidden states. Inference only.
 */
export function sequenceScore(gpu: Gpu, weights: LlamaWeights, lora: LoraAdapter | null, batch: TokenBatch): Tensor {
  const score = weights.score;
  if (!score) throw new Error('sequenceScore: this model has no score head (load a LlamaForSequenceClassification checkpoint)');
  const { B, T } = checkBatch(weights, batch);
  const C = weights.config.hiddenSize;
  const labels = score.size / C;
  const tape = new Tape(gpu, false);
  try {
    const h = finalHidden(tape, weights, lora, batch); // [N, C]
    const lastRows = new Uint32Array(B);
    for (let b = 0; b < B; b++) lastRows[b] = b * T + lengthOf(batch, b) - 1;
    const rows = tape.own(gpu.upload(lastRows, [B], 'u32', 'llama.last-rows'));
    // Gather the last real row of each sequence: an embedding lookup into h itself.
    const hLast = tape.alloc([B, C], 'f32', 'llama.h-last');
    embeddingForwardF32(gpu, hLast, rows, h.value, B, C);
    const out = gpu.empty([B, labels], 'f32', 'llama.scores');
    matmul(gpu, out, hLast, score, B, labels, C, { transB: true });
    return out;
  } finally {
    tape.dispose();
  }
}

/**
 * The final-normed hidden states h [N, C] of a batch, on `tape`. With a recording tape
 * each layer is checkpointed; without, each layer runs under its own scratch tape and
 * the previous layer's output is released as soon as the next one is computed.
 */
export function finalHidden(tape: Tape, weights: LlamaWeights, lora: LoraAdapter | null, batch: TokenBatch): Var {
  const gpu = tape.gpu;
  const cfg = weights.config;
  const { B, T } = checkBatch(weights, batch);
  const N = B * T;
  const C = cfg.hiddenSize;
  const ids = tape.own(gpu.upload(batch.ids, [N], 'u32', 'llama.ids'));
  const positions = tape.own(gpu.upload(batchPositions(B, T), [N], 'u32', 'llama.positions'));
  const x0 = tape.alloc([N, C], 'f32', 'llama.embed');
  if (weights.embed.format === 'q4') embeddingForward(gpu, x0, ids, weights.embed.table, N);
  else embeddingForwardF32(gpu, x0, ids, weights.embed.table, N, C);

  const dims: LayerDims = { B, T, H: cfg.numHeads, HK: cfg.numKvHeads, D: cfg.headDim, eps: cfg.rmsNormEps };
  let x = leaf(x0, false);
  weights.layers.forEach((w, l) => {
    const block = layerBlock(w, loraOf(lora, l), dims, weights.invFreq, positions);
    if (tape.recording) {
      x = tape.checkpoint(block, [x])[0]!;
      return;
    }
    const scratch = new Tape(gpu, false);
    try {
      const out = tape.own(scratch.disown(block(scratch, [x])[0]!.value));
      tape.disown(x.value).release(); // the layer input is dead once its output exists
      x = leaf(out, false);
    } finally {
      scratch.dispose();
    }
  });
  return rmsnorm(tape, x, leaf(weights.finalNorm), cfg.rmsNormEps);
}

interface LayerDims {
  B: number;
  T: number;
  H: number;
  HK: number;
  D: number;
  eps: number;
}

type LayerLora = Partial<Record<ProjectionField, Lora>>;

function loraOf(lora: LoraAdapter | null, layer: number): LayerLora {
  return lora ? lora.layer(layer) : {};
}

/** One decoder layer as a deterministic block (x [N, C] -> x [N, C]) for tape.checkpoint. */
function layerBlock(w: LayerWeights, lora: LayerLora, d: LayerDims, invFreq: Tensor, positions: Tensor) {
  const { B, T, H, HK, D, eps } = d;
  const inputNorm = leaf(w.inputNorm);
  const postNorm = leaf(w.postNorm);
  const lin = (tape: Tape, x: Var, f: ProjectionField) => linear(tape, x, w[f], lora[f] ?? null);
  return (tape: Tape, [x]: Var[]): Var[] => {
    const h = rmsnorm(tape, x!, inputNorm, eps); // [N, C]
    const q = rope(tape, lin(tape, h, 'q'), invFreq, positions, H, D); // [N, H*D]
    const k = rope(tape, lin(tape, h, 'k'), invFreq, positions, HK, D); // [N, HK*D]
    const v = lin(tape, h, 'v'); // [N, HK*D]
    const att = attention(tape, q, k, v, { B, T, H, HK, D }); // [N, H*D]
    const x1 = add(tape, x!, lin(tape, att, 'o')); // [N, C]
    const h2 = rmsnorm(tape, x1, postNorm, eps); // [N, C]
    const act = swiglu(tape, lin(tape, h2, 'gate'), lin(tape, h2, 'up')); // [N, F]
    return [add(tape, x1, lin(tape, act, 'down'))]; // [N, C]
  };
}

function checkBatch(weights: LlamaWeights, batch: TokenBatch): { B: number; T: number } {
  const { B, T, ids } = batch;
  if (!(Number.isInteger(B) && B >= 1 && Number.isInteger(T) && T >= 1)) throw new Error(`llama: bad batch shape B=${B}, T=${T}`);
  if (ids.length !== B * T) throw new Error(`llama: ids has ${ids.length} entries, expected B*T = ${B * T}`);
  if (batch.targets && batch.targets.length !== B * T) throw new Error(`llama: targets has ${batch.targets.length} entries, expected ${B * T}`);
  if (batch.lengths) {
    if (batch.lengths.length !== B) throw new Error(`llama: lengths has ${batch.lengths.length} entries, expected B = ${B}`);
    for (let b = 0; b < B; b++) {
      const len = batch.lengths[b]!;
      if (!(Number.isInteger(len) && len >= 1 && len <= T)) throw new Error(`llama: sequence ${b} has length ${len}, expected 1..${T}`);
    }
  }
  const max = weights.config.maxPositionEmbeddings;
  if (max !== null && T > max) throw new Error(`llama: ${T} positions exceed max_position_embeddings ${max}`);
  return { B, T };
}

function lengthOf(batch: TokenBatch, b: number): number {
  return batch.lengths ? batch.lengths[b]! : batch.T;
}

/** u32 [B*T]: 0..T-1 for every sequence. */
function batchPositions(B: number, T: number): Uint32Array {
  const p = new Uint32Array(B * T);
  for (let i = 0; i < p.length; i++) p[i] = i % T;
  return p;
}

/** The batch's targets, or next-token targets with V past each sequence's last real token. */
export function batchTargets(batch: TokenBatch, V: number): Uint32Array {
  if (batch.targets) return batch.targets;
  const { B, T, ids } = batch;
  const out = new Uint32Array(B * T).fill(V);
  for (let b = 0; b < B; b++) {
    const len = lengthOf(batch, b);
    for (let t = 0; t + 1 < len; t++) out[b * T + t] = ids[b * T + t + 1]!;
  }
  return out;
}
