/**
 * Batched sampling on the GPU: G answers to each of one or more prompts decode
 * together, one token per row per step, over a KV cache (infer.ts).
 *
 * Prompt sharing: the longest common prefix of the prompts (the whole prompt when
 * there is one, or all are equal) is prefilled once and stored once as the cache's
 * shared prefix; each prompt's remainder is prefilled once and copied into its G rows.
 * Rows are prompt-major: row i*G + j is answer j to prompt i.
 *
 * Host traffic per step: exactly one small readback, the B sampled ids and their
 * log-probs (copied into one buffer). The sampled ids tensor itself is the next step's
 * embedding input, so ids never make a host round trip before the GPU can use them;
 * the host reads them only to stream tokens and to notice stop tokens.
 *
 * Pipelining: step s+1 is recorded and submitted before the host waits for step s's
 * ids, so the GPU is never idle while the host maps a buffer. The price is that a row
 * which stops at step s has already been sent through step s+1: that step's output
 * for the row is discarded and its cache length is put back, so a stopped row's cache
 * holds exactly its prompt and its answer up to (not including) the stop token. When
 * every row has stopped, one speculative step was wasted.
 *
 * Finished rows keep their place in the batch (the batch keeps its shape, and
 * the weights are read once per step for all rows whatever their number).
 */
import type { Gpu } from '../gpu/gpu';
import type { Tensor } from '../gpu/tensor';
import { addInPlace } from '../kernels/elementwise';
import { sample } from '../kernels/sample';
import type { KvDtype } from '../kernels/attention';
import { KvCache, decodeStep, defaultKvDtype, prefill, prefillShared, type InferenceLora } from './infer';
import type { LlamaWeights } from './weights';

export interface GenerateOptions {
  /** one prompt, or several (each answered G times) */
  prompt: readonly number[] | readonly (readonly number[])[];
  /** answers per prompt (default 1) */
  G?: number;
  maxNewTokens: number;
  /** 0 = greedy (default 1) */
  temperature?: number;
  /** 0 = off (default) */
  topK?: number;
  /** 1 = off (default) */
  topP?: number;
  /** same seed, same prompts and settings: same tokens (default 0) */
  seed?: number;
  /** default: the checkpoint's eos ids */
  stopTokens?: Iterable<number>;
  /**
   * Constrained decoding: only these ids may be sampled (every other logit is set to
   * -1e30 before sampling, so log-probs are those of the restricted softmax). Costs a
   * [B, V] mask on the GPU; meant for small vocabularies of answers (the toy world).
   */
  allowedTokens?: readonly number[];
  /** called for every new token of a still-running row, in row order within a step */
  onToken?: (row: number, tokenId: number, step: number) => void;
  /** KV cache element type; default defaultKvDtype(gpu): f16 where the device has shader-f16. */
  kvCache?: KvDtype;
}

export type FinishReason = 'stop' | 'length';

export interface GeneratedAnswer {
  /** index of the prompt this answers */
  prompt: number;
  /** sampled ids; ends with the stop token when finishReason is 'stop' */
  tokens: number[];
  /** per token: log-prob under the untruncated softmax(logits / temperature) (plain logits when greedy) */
  logprobs: number[];
  finishReason: FinishReason;
}

export interface GenerateResult {
  /** one per row, prompt-major (row i*G + j: answer j to prompt i) */
  answers: GeneratedAnswer[];
  /** tokens stored once as the shared prefix */
  sharedPrefix: number;
  /** sampling steps (each one readback) */
  steps: number;
  /** decode steps run (steps - 1, plus one wasted when all rows stopped early) */
  decodeSteps: number;
}

/**
 * Length of the prefix all prompts share and that can be stored once: the whole
 * prompt when they are all equal, else the common prefix shortened so that every
 * prompt keeps at least one token of its own (whose logits start its answers).
 */
export function sharedPrefixLength(prompts: readonly (readonly number[])[]): number {
  const first = prompts[0]!;
  const minLen = Math.min(...prompts.map((p) => p.length));
  let lcp = 0;
  while (lcp < minLen && prompts.every((p) => p[lcp] === first[lcp])) lcp++;
  if (prompts.every((p) => p.length === first.length && lcp === first.length)) return lcp;
  return Math.min(lcp, minLen - 1);
}

function normalizePrompts(prompt: GenerateOptions['prompt']): number[][] {
  if (prompt.length === 0) throw new Error('generate: no prompt');
  const list = typeof prompt[0] === 'number' ? [prompt as readonly number[]] : (prompt as readonly (readonly number[])[]);
  return list.map((p, i) => {
    if (!Array.isArray(p) || p.length === 0) throw new Error(`generate: prompt ${i} is empty`);
    return [...p];
  });
}

export async function generate(gpu: Gpu, w: LlamaWeights, lora: InferenceLora | null, opts: GenerateOptions): Promise<GenerateResult> {
  const prompts = normalizePrompts(opts.prompt);
  const G = opts.G ?? 1;
  if (!(Number.isInteger(G) && G >= 1)) throw new Error(`generate: G must be a positive integer, got ${G}`);
  const maxNewTokens = opts.maxNewTokens;
  if (!(Number.isInteger(maxNewTokens) && maxNewTokens >= 0)) throw new Error(`generate: maxNewTokens must be a non-negative integer, got ${maxNewTokens}`);
  const { temperature = 1, topK = 0, topP = 1, seed = 0, onToken } = opts;
  const stop = new Set(opts.stopTokens ?? w.config.eosTokenIds);
  const nP = prompts.length;
  const B = nP * G;
  const V = w.lmHead.V;
  const answers: GeneratedAnswer[] = Array.from({ length: B }, (_, b) => ({ prompt: Math.floor(b / G), tokens: [], logprobs: [], finishReason: 'length' }));
  const P = sharedPrefixLength(prompts);
  if (maxNewTokens === 0) return { answers, sharedPrefix: 0, steps: 0, decodeSteps: 0 };

  const suffixes = prompts.map((p) => p.slice(P));
  const ownPrompt = suffixes[0]!.length > 0;
  const maxSuffix = Math.max(...suffixes.map((s) => s.length));
  // The last sampled token never enters the cache.
  const cache = new KvCache(gpu, w.config, B, Math.max(1, maxSuffix + maxNewTokens - 1), { dtype: opts.kvCache ?? defaultKvDtype(gpu) });
  const owned: Tensor[] = [];
  let decodeSteps = 0;
  let steps = 0;
  try {
    let logits: Tensor;
    if (!ownPrompt) {
      logits = prefillShared(gpu, w, lora, prompts[0]!.slice(0, P), cache);
    } else {
      if (P > 0) prefillShared(gpu, w, lora, prompts[0]!.slice(0, P), cache, { logits: false });
      const rows = prompts.map((_, i) => Array.from({ length: G }, (_, j) => i * G + j));
      logits = prefill(gpu, w, lora, suffixes, cache, rows);
    }
    const nLogitRows = logits.shape[0]!;
    if (nLogitRows !== B) {
      // Every row of a prompt starts from the same distribution (rows still sample differently).
      const full = gpu.empty([B, V], 'f32', 'logits');
      for (let b = 0; b < B; b++) gpu.copy(logits, full, V * 4, (nLogitRows === 1 ? 0 : Math.floor(b / G)) * V * 4, b * V * 4);
      logits.release();
      logits = full;
    }

    let mask: Tensor | null = null;
    if (opts.allowedTokens) {
      const allowed = opts.allowedTokens;
      if (allowed.length === 0) throw new Error('generate: allowedTokens is empty');
      const row = new Float32Array(V).fill(-1e30);
      for (const id of allowed) {
        if (!(Number.isInteger(id) && id >= 0 && id < V)) throw new Error(`generate: allowed token ${id} is outside the vocabulary of ${V}`);
        row[id] = 0;
      }
      const full = new Float32Array(B * V);
      for (let b = 0; b < B; b++) full.set(row, b * V);
      mask = gpu.upload(full, [B * V], 'f32', 'allowed-mask');
      owned.push(mask);
    }
    const ids = gpu.zeros([B], 'u32', 'sampled-ids');
    const logp = gpu.empty([B], 'f32', 'sampled-logp');
    const readback = gpu.empty([2 * B], 'u32', 'sampled-readback');
    owned.push(ids, logp, readback);
    /** Samples, and starts the step's single readback (ids then logp in one buffer). */
    const sampleStep = (step: number, l: Tensor): Promise<ArrayBuffer> => {
      if (mask) addInPlace(gpu, l, mask, B * V);
      sample(gpu, ids, l, { temperature, topK, topP, seed, step, logp }, B, V);
      l.release();
      gpu.copy(ids, readback, B * 4, 0, 0);
      gpu.copy(logp, readback, B * 4, 0, B * 4);
      const read = gpu.readBytes(readback.buffer, 0, 2 * B * 4);
      read.catch(() => undefined); // awaited below; this only keeps an abandoned read from being reported as unhandled
      return read;
    };

    const active = new Array<boolean>(B).fill(true);
    let pending = sampleStep(0, logits);
    for (let step = 0; ; step++) {
      let next: Promise<ArrayBuffer> | null = null;
      if (step + 1 < maxNewTokens) {
        next = sampleStep(step + 1, decodeStep(gpu, w, lora, ids, cache, active));
        decodeSteps++;
      }
      const raw = await pending;
      steps++;
      const tokens = new Uint32Array(raw, 0, B);
      const lps = new Float32Array(raw, B * 4, B);
      for (let b = 0; b < B; b++) {
        if (!active[b]) continue;
        const a = answers[b]!;
        const id = tokens[b]!;
        a.tokens.push(id);
        a.logprobs.push(lps[b]!);
        if (stop.has(id)) {
          a.finishReason = 'stop';
          active[b] = false;
          // The speculative step already appended this stop token to the row's cache.
          if (next) cache.lengths[b] = cache.lengths[b]! - 1;
        }
        onToken?.(b, id, step);
      }
      if (!next || !active.some(Boolean)) {
        if (next) await next;
        break;
      }
      pending = next;
    }
    return { answers, sharedPrefix: P, steps, decodeSteps };
  } finally {
    for (const t of owned) t.release();
    cache.release();
  }
}
