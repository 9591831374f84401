/**
 * Inference-only Llama forward with a KV cache, straight on the kernels: no autodiff
 * tape, nothing saved for a backward, every scratch tensor handed back to the pool as
 * soon as its last reader is recorded (later users of a recycled buffer are recorded
 * after those readers, so the command order keeps them apart).
 *
 * Cache layout (dimension letters of src/kernels/DIMENSIONS.md):
 *   shared prefix, per layer    k, v [P, HK, D]        positions 0 .. P-1, stored once
 *   per-row cache, per layer    k, v [B, Smax, HK, D]  row b holds positions P .. P+len[b]-1
 * The shared prefix is the prompt that a group of G answers continues: it is prefilled
 * once (B = 1) and every decode step reads it once per group of rows (attentionDecode
 * scores prefix chunks for several rows per workgroup), so G answers cost one prompt's
 * worth of K/V memory and prefill, not G. Both hold f32, or f16 (KvCache's dtype;
 * generate() picks f16 where the device has shader-f16): rows are rounded to f16 as
 * they are stored and widened as attention reads them.
 *
 * Decode cost: one step runs every linear layer on B rows at once, so each weight is
 * read once per step for the whole batch (the 4-bit GEMV serves up to Q4_GEMV_MAX_N = 8
 * rows per pass over the weights; larger batches use the tiled GEMM). Only the last
 * position of each prompt goes through the LM head.
 *
 * LoRA: for a targeted projection y = x W^T + scale * (x A^T) B^T, with A [R, K] and
 * B [M, R]; the base weights are never touched, so switching the adapter off (or
 * passing null) gives the reference policy.
 */
import type { Gpu } from '../gpu/gpu';
import type { CommandList } from '../gpu/replay';
import type { Tensor } from '../gpu/tensor';
import { attentionDecode, attentionForward, kvCacheWrite, type KvDtype } from '../kernels/attention';
import { convertCopy } from '../kernels/convert';
import { fusedDecodeCarry, fusedDecodeLayer, fusedDecodeSupported } from './decode-fused';
import { swigluForward } from '../kernels/elementwise';
import { embeddingForward, embeddingForwardF32 } from '../kernels/embedding';
import { LORA_BATCHED_MAX_N, loraDecode } from '../kernels/lora-decode';
import { matmul } from '../kernels/matmul';
import { rmsnormForward } from '../kernels/rmsnorm';
import { ropeForward } from '../kernels/rope';
import { LAYER_PROJECTIONS, type LayerWeights, type LlamaWeights } from './weights';

/** The LayerWeights fields LoRA can adapt. */
export type ProjectionName = 'q' | 'k' | 'v' | 'o' | 'gate' | 'up' | 'down';

/** One adapted projection: A [R, K], B [M, R] (PEFT's lora_A / lora_B), f32. */
export interface LoraFactors {
  A: Tensor;
  B: Tensor;
  scale: number;
}

/** What inference needs of a LoRA adapter: per layer, the adapted projections. */
export interface InferenceLora {
  /** false runs the base model (the reference policy) */
  enabled: boolean;
  layers: ReadonlyArray<Partial<Record<ProjectionName, LoraFactors>>>;
  /**
   * The scale every factor in `layers` has, where the adapter has one (LoraAdapter
   * does). With it, a recorded decode step is keyed by the adapter object and this
   * scale, and `layers` (which a LoraAdapter builds afresh on each read) is read only
   * when the step is recorded; without it, every step reads and compares `layers`.
   */
  readonly scale?: number;
}

/**
 * The KV cache element type generation uses on this device: f16 where the device was
 * acquired with shader-f16 (the default when the adapter offers it; acquireGpu's
 * `f16: false` keeps f32), else f32. An f16 cache halves its memory; attention still
 * scores, normalises and sums in f32.
 */
export function defaultKvDtype(gpu: Gpu): KvDtype {
  return gpu.caps.f16 ? 'f16' : 'f32';
}

export interface KvCacheOptions {
  /** Element type of the cache and its shared prefix (default f32; generate() uses defaultKvDtype). */
  dtype?: KvDtype;
}

/**
 * Key/value cache for B rows of up to Smax own positions each, after an optional
 * shared prefix. `lengths[b]` counts row b's own entries (not the prefix); the host
 * keeps it, and each decode step uploads what the kernels need.
 */
export class KvCache {
  readonly dtype: KvDtype;
  readonly L: number;
  readonly HK: number;
  readonly D: number;
  /** per layer [B, Smax, HK, D] */
  readonly k: Tensor[] = [];
  readonly v: Tensor[] = [];
  /** own entries per row */
  readonly lengths: number[];
  /** per layer [P, HK, D], or null */
  prefix: { k: Tensor[]; v: Tensor[]; P: number } | null = null;
  /** decodeStep's recorded step and its per-token inputs (made by the first decodeStep) */
  decodeReplay: DecodeReplay | null = null;
  private released = false;

  constructor(
    readonly gpu: Gpu,
    config: LlamaWeights['config'],
    readonly B: number,
    readonly Smax: number,
    opts: KvCacheOptions = {},
  ) {
    if (!(Number.isInteger(B) && B >= 1)) throw new Error(`KvCache: B must be a positive integer, got ${B}`);
    if (!(Number.isInteger(Smax) && Smax >= 1)) throw new Error(`KvCache: Smax must be a positive integer, got ${Smax}`);
    this.dtype = opts.dtype ?? 'f32';
    if (this.dtype !== 'f32' && this.dtype !== 'f16') throw new Error(`KvCache: dtype must be 'f32' or 'f16', got ${String(this.dtype)}`);
    if (this.dtype === 'f16' && !gpu.caps.f16) throw new Error('KvCache: an f16 cache needs the shader-f16 feature, which this device lacks; use dtype f32');
    this.L = config.numLayers;
    this.HK = config.numKvHeads;
    this.D = config.headDim;
    for (let l = 0; l < this.L; l++) {
      this.k.push(gpu.empty([B, Smax, this.HK, this.D], this.dtype, `kv-cache.k.${l}`));
      this.v.push(gpu.empty([B, Smax, this.HK, this.D], this.dtype, `kv-cache.v.${l}`));
    }
    this.lengths = new Array<number>(B).fill(0);
  }

  /** Length of the shared prefix (0 without one). */
  get P(): number {
    return this.prefix?.P ?? 0;
  }

  /** GPU bytes of the per-row cache plus the prefix. */
  get bytes(): number {
    const row = this.HK * this.D * (this.dtype === 'f16' ? 2 : 4);
    return 2 * this.L * row * (this.B * this.Smax + this.P);
  }

  release(): void {
    if (this.released) return;
    this.released = true;
    this.decodeReplay?.release();
    this.decodeReplay = null;
    for (const t of [...this.k, ...this.v, ...(this.prefix?.k ?? []), ...(this.prefix?.v ?? [])]) t.release();
    this.prefix = null;
  }
}

/** Bytes a KvCache of B rows x Smax positions and a P-token shared prefix occupies. */
export function kvCacheBytes(config: LlamaWeights['config'], B: number, Smax: number, P = 0, dtype: KvDtype = 'f32'): number {
  return 2 * config.numLayers * config.numKvHeads * config.headDim * (dtype === 'f16' ? 2 : 4) * (B * Smax + P);
}

// ---- building blocks -------------------------------------------------------------

type LayerLora = Partial<Record<ProjectionName, LoraFactors>>;

/** The adapter's per-layer factors for one pass, read once (null when off or absent). */
function passLora(lora: InferenceLora | null): ReadonlyArray<LayerLora> | null {
  return lora && lora.enabled ? lora.layers : null;
}

/**
 * For each (out, proj) of projections sharing the input x [N, K]:
 * out [N, M] (accumulate ? += : =) x W^T (+ scale (x A^T) B^T when adapted).
 * With accumulate the caller's residual stream is the output (no separate add).
 * Short batches (decode) run the adapted projections' A products in one dispatch
 * and each B product in one more (loraDecode); longer ones use the tiled matmul.
 */
function linear(
  gpu: Gpu,
  outs: ReadonlyArray<readonly [Tensor, ProjectionName]>,
  x: Tensor,
  N: number,
  layer: LayerWeights,
  lora: LayerLora | null,
  accumulate = false,
): void {
  for (const [out, proj] of outs) layer[proj].logits(gpu, out, x, N, 0, layer[proj].V, accumulate);
  const adapted = outs.flatMap(([out, proj]) => {
    const f = lora?.[proj];
    return f ? [{ A: f.A, B: f.B, scale: f.scale, y: out, M: layer[proj].V }] : [];
  });
  if (adapted.length === 0) return;
  const K = layer[outs[0]![1]].C;
  const R = adapted[0]!.A.shape[0]!;
  if (N <= LORA_BATCHED_MAX_N && adapted.length <= 3 && adapted.every((t) => t.A.shape[0] === R)) {
    loraDecode(gpu, x, N, K, adapted);
    return;
  }
  for (const t of adapted) {
    const r = t.A.shape[0]!;
    const u = gpu.empty([N, r], 'f32', 'lora-u');
    matmul(gpu, u, x, t.A, N, r, K, { transB: true });
    matmul(gpu, t.y, u, t.B, N, t.M, r, { transB: true, alpha: t.scale, accumulate: true });
    u.release();
  }
}

function embed(gpu: Gpu, out: Tensor, ids: Tensor, w: LlamaWeights, N: number): void {
  if (w.embed.format === 'q4') embeddingForward(gpu, out, ids, w.embed.table, N);
  else embeddingForwardF32(gpu, out, ids, w.embed.table, N, w.config.hiddenSize);
}

/**
 * Attention of one layer: receives the roped q [N, H, D] and k, v [N, HK, D] and must
 * write att [N, H, D]. It owns k and v (keeps them as cache or releases them).
 */
type Attend = (l: number, att: Tensor, q: Tensor, k: Tensor, v: Tensor) => void;

/** x [N, C] += one decoder layer (attention and MLP blocks, pre-norm). */
function decoderLayer(gpu: Gpu, w: LlamaWeights, l: number, lora: ReadonlyArray<LayerLora> | null, x: Tensor, positions: Tensor, N: number, attend: Attend): void {
  const { hiddenSize: C, intermediateSize: F, numHeads: H, numKvHeads: HK, headDim: D, rmsNormEps: eps } = w.config;
  const layer = w.layers[l]!;
  const ad = lora?.[l] ?? null;

  const rstd = gpu.empty([N], 'f32', 'rstd');
  const h = gpu.empty([N, C], 'f32', 'h');
  rmsnormForward(gpu, h, rstd, x, layer.inputNorm, N, C, eps);
  const q = gpu.empty([N, H, D], 'f32', 'q');
  const k = gpu.empty([N, HK, D], 'f32', 'k');
  const v = gpu.empty([N, HK, D], 'f32', 'v');
  linear(gpu, [[q, 'q'], [k, 'k'], [v, 'v']], h, N, layer, ad);
  h.release();
  ropeForward(gpu, q, q, w.invFreq, positions, N, H, D);
  ropeForward(gpu, k, k, w.invFreq, positions, N, HK, D);
  const att = gpu.empty([N, H, D], 'f32', 'att');
  attend(l, att, q, k, v);
  q.release();
  // x += o-projection: the residual add is the GEMV's accumulate epilogue.
  linear(gpu, [[x, 'o']], att, N, layer, ad, true);
  att.release();

  const h2 = gpu.empty([N, C], 'f32', 'h2');
  rmsnormForward(gpu, h2, rstd, x, layer.postNorm, N, C, eps);
  rstd.release();
  const gate = gpu.empty([N, F], 'f32', 'gate');
  const up = gpu.empty([N, F], 'f32', 'up');
  linear(gpu, [[gate, 'gate'], [up, 'up']], h2, N, layer, ad);
  h2.release();
  const act = gpu.empty([N, F], 'f32', 'act');
  swigluForward(gpu, act, gate, up, N * F);
  gate.release();
  up.release();
  linear(gpu, [[x, 'down']], act, N, layer, ad, true);
  act.release();
}

/** logits [R, V] of the hidden rows `rows` of x [N, C] (final norm, then the LM head on those rows only). */
function lastLogits(gpu: Gpu, w: LlamaWeights, x: Tensor, rows: readonly number[]): Tensor {
  const C = w.config.hiddenSize;
  const R = rows.length;
  let picked = x;
  if (!(rows.length === x.size / C && rows.every((r, i) => r === i))) {
    picked = gpu.empty([R, C], 'f32', 'last-hidden');
    rows.forEach((r, i) => gpu.copy(x, picked, C * 4, r * C * 4, i * C * 4));
  }
  const rstd = gpu.empty([R], 'f32', 'rstd');
  const hn = gpu.empty([R, C], 'f32', 'final-norm');
  rmsnormForward(gpu, hn, rstd, picked, w.finalNorm, R, C, w.config.rmsNormEps);
  rstd.release();
  if (picked !== x) picked.release();
  const V = w.lmHead.V;
  const logits = gpu.empty([R, V], 'f32', 'logits');
  w.lmHead.logits(gpu, logits, hn, R, 0, V);
  hn.release();
  return logits;
}

function checkIds(ids: readonly number[], V: number, what: string): void {
  for (const id of ids) {
    if (!(Number.isInteger(id) && id >= 0 && id < V)) throw new Error(`${what}: token id ${id} is not in [0, ${V})`);
  }
}

// ---- prefill -------------------------------------------------------------------

/** One layer's shared prefix, k and v [P, HK, D]. */
interface LayerPrefix {
  k: Tensor;
  v: Tensor;
  P: number;
}

interface Segment {
  /** first token in the flattened pass */
  start: number;
  T: number;
}

/**
 * Causal attention of each segment's queries over the shared prefix (if any) and the
 * segment's own keys. Segments are independent sequences laid end to end in q, k, v.
 */
function segmentAttention(gpu: Gpu, att: Tensor, q: Tensor, k: Tensor, v: Tensor, segs: readonly Segment[], prefix: LayerPrefix | null, H: number, HK: number, D: number): void {
  const P = prefix?.P ?? 0;
  const T0 = segs[0]!.T;
  if (P === 0 && segs.every((s) => s.T === T0)) {
    // Equal lengths, nothing before them: the flat tensors already are [B, T, ., D].
    const lse = gpu.empty([segs.length, H, T0], 'f32', 'lse');
    attentionForward(gpu, att, lse, q, k, v, segs.length, T0, T0, H, HK, D);
    lse.release();
    return;
  }
  const qRow = H * D * 4;
  const kvRow = HK * D * 4;
  const kvElems = HK * D;
  for (const s of segs) {
    const S = P + s.T;
    const kAll = gpu.empty([S, HK, D], 'f32', 'k-all');
    const vAll = gpu.empty([S, HK, D], 'f32', 'v-all');
    if (prefix && P > 0) {
      // An f16 prefix is widened: the prompt sees the prefix exactly as decode steps do.
      copyKv(gpu, prefix.k, kAll, P * kvElems, 0, 0);
      copyKv(gpu, prefix.v, vAll, P * kvElems, 0, 0);
    }
    gpu.copy(k, kAll, s.T * kvRow, s.start * kvRow, P * kvRow);
    gpu.copy(v, vAll, s.T * kvRow, s.start * kvRow, P * kvRow);
    const single = segs.length === 1;
    const qs = single ? q : gpu.empty([s.T, H, D], 'f32', 'q-seg');
    const out = single ? att : gpu.empty([s.T, H, D], 'f32', 'att-seg');
    if (!single) gpu.copy(q, qs, s.T * qRow, s.start * qRow, 0);
    const lse = gpu.empty([1, H, s.T], 'f32', 'lse');
    attentionForward(gpu, out, lse, qs, kAll, vAll, 1, s.T, S, H, HK, D);
    lse.release();
    kAll.release();
    vAll.release();
    if (!single) {
      gpu.copy(out, att, s.T * qRow, 0, s.start * qRow);
      qs.release();
      out.release();
    }
  }
}

/** Copies `count` elements (offsets in elements) between K/V tensors, converting when their element types differ. */
function copyKv(gpu: Gpu, src: Tensor, dst: Tensor, count: number, srcOffset: number, dstOffset: number): void {
  if (src.dtype === dst.dtype) {
    const e = src.dtype === 'f16' ? 2 : 4;
    gpu.copy(src, dst, count * e, srcOffset * e, dstOffset * e);
  } else {
    convertCopy(gpu, dst, src, count, srcOffset, dstOffset);
  }
}

function uploadU32(gpu: Gpu, values: readonly number[], label: string): Tensor {
  return gpu.upload(Uint32Array.from(values), [values.length], 'u32', label);
}

/**
 * Runs the prompt that every row of the cache continues (B = 1) and stores its K/V
 * once as the cache's shared prefix. Returns the last position's logits [1, V].
 * The cache must be empty (no prefix, every row length 0).
 */
export function prefillShared(gpu: Gpu, w: LlamaWeights, lora: InferenceLora | null, ids: readonly number[], cache: KvCache): Tensor;
/** With {logits: false} the LM head is skipped (the prompts continue past the prefix). */
export function prefillShared(gpu: Gpu, w: LlamaWeights, lora: InferenceLora | null, ids: readonly number[], cache: KvCache, opts: { logits: false }): null;
export function prefillShared(
  gpu: Gpu,
  w: LlamaWeights,
  lora: InferenceLora | null,
  ids: readonly number[],
  cache: KvCache,
  opts: { logits?: boolean } = {},
): Tensor | null {
  const logits = opts.logits ?? true;
  if (cache.prefix) throw new Error('prefillShared: the cache already holds a shared prefix');
  if (cache.lengths.some((n) => n > 0)) throw new Error('prefillShared: the cache rows must be empty (the prefix comes first)');
  const T = ids.length;
  if (T === 0) throw new Error('prefillShared: empty prompt');
  checkIds(ids, w.config.vocabSize, 'prefillShared');
  const { hiddenSize: C, numHeads: H, numKvHeads: HK, headDim: D } = w.config;
  const idsT = uploadU32(gpu, ids, 'prompt-ids');
  const posT = uploadU32(gpu, ids.map((_, t) => t), 'prompt-positions');
  const x = gpu.empty([T, C], 'f32', 'x');
  embed(gpu, x, idsT, w, T);
  idsT.release();
  const prefix = { k: [] as Tensor[], v: [] as Tensor[], P: T };
  const ad = passLora(lora);
  for (let l = 0; l < w.config.numLayers; l++) {
    decoderLayer(gpu, w, l, ad, x, posT, T, (_l, att, q, k, v) => {
      const lse = gpu.empty([1, H, T], 'f32', 'lse');
      attentionForward(gpu, att, lse, q, k, v, 1, T, T, H, HK, D);
      lse.release();
      if (cache.dtype === 'f32') {
        // The roped keys and the values of the prompt are the prefix as they stand.
        prefix.k.push(k);
        prefix.v.push(v);
      } else {
        for (const [src, dst] of [[k, prefix.k], [v, prefix.v]] as const) {
          const t = gpu.empty([T, HK, D], cache.dtype, `kv-prefix.${dst === prefix.k ? 'k' : 'v'}.${_l}`);
          convertCopy(gpu, t, src);
          src.release();
          dst.push(t);
        }
      }
    });
  }
  posT.release();
  cache.prefix = prefix;
  const out = logits ? lastLogits(gpu, w, x, [T - 1]) : null;
  x.release();
  return out;
}

/**
 * Runs prompts[i] after the cache's shared prefix (if any; positions continue from
 * P) and stores its K/V in every cache row of rows[i] (default: row i), whose lengths
 * must be 0. All prompts go through the token-wise layers as one batch of
 * sum(len) tokens; only attention runs per prompt. Returns each prompt's last-position
 * logits [prompts.length, V].
 */
export function prefill(
  gpu: Gpu,
  w: LlamaWeights,
  lora: InferenceLora | null,
  prompts: readonly (readonly number[])[],
  cache: KvCache,
  rows: readonly (readonly number[])[] = prompts.map((_, i) => [i]),
): Tensor {
  const nP = prompts.length;
  if (nP === 0) throw new Error('prefill: no prompts');
  if (rows.length !== nP) throw new Error(`prefill: ${nP} prompts but ${rows.length} row lists`);
  const seen = new Set<number>();
  for (const list of rows) {
    for (const r of list) {
      if (!(Number.isInteger(r) && r >= 0 && r < cache.B)) throw new Error(`prefill: row ${r} is not in [0, ${cache.B})`);
      if (seen.has(r)) throw new Error(`prefill: row ${r} is listed twice`);
      if (cache.lengths[r] !== 0) throw new Error(`prefill: cache row ${r} is not empty`);
      seen.add(r);
    }
  }
  const segs: Segment[] = [];
  let N = 0;
  for (const p of prompts) {
    if (p.length === 0) throw new Error('prefill: empty prompt (a prompt equal to the shared prefix needs no prefill)');
    if (p.length > cache.Smax) throw new Error(`prefill: prompt of ${p.length} tokens exceeds the cache's ${cache.Smax} positions per row`);
    checkIds(p, w.config.vocabSize, 'prefill');
    segs.push({ start: N, T: p.length });
    N += p.length;
  }
  const { hiddenSize: C, numHeads: H, numKvHeads: HK, headDim: D } = w.config;
  const P = cache.P;
  const flat = prompts.flatMap((p) => [...p]);
  const idsT = uploadU32(gpu, flat, 'prompt-ids');
  const posT = uploadU32(gpu, prompts.flatMap((p) => p.map((_, t) => P + t)), 'prompt-positions');
  const x = gpu.empty([N, C], 'f32', 'x');
  embed(gpu, x, idsT, w, N);
  idsT.release();
  const kvElems = HK * D;
  const ad = passLora(lora);
  for (let l = 0; l < w.config.numLayers; l++) {
    decoderLayer(gpu, w, l, ad, x, posT, N, (l, att, q, k, v) => {
      const prefix = cache.prefix ? { k: cache.prefix.k[l]!, v: cache.prefix.v[l]!, P } : null;
      segmentAttention(gpu, att, q, k, v, segs, prefix, H, HK, D);
      segs.forEach((s, i) => {
        for (const r of rows[i]!) {
          copyKv(gpu, k, cache.k[l]!, s.T * kvElems, s.start * kvElems, r * cache.Smax * kvElems);
          copyKv(gpu, v, cache.v[l]!, s.T * kvElems, s.start * kvElems, r * cache.Smax * kvElems);
        }
      });
      k.release();
      v.release();
    });
  }
  posT.release();
  segs.forEach((s, i) => {
    for (const r of rows[i]!) cache.lengths[r] = s.T;
  });
  const logits = lastLogits(gpu, w, x, segs.map((s) => s.start + s.T - 1));
  x.release();
  return logits;
}

// ---- decode --------------------------------------------------------------------

/**
 * Attention's upper bound on the rows' lengths, as decodeStep rounds it: up to 16
 * times a power of two, capped at Smax, so a recorded step serves many tokens (16,
 * 16, 32, 64, 128, ...) before it is recorded again. The chunks this adds lie past
 * every row's length: attention's workgroups for them find nothing to read and the
 * combine skips them, so the results are the same, bit for bit.
 */
export function decodeLengthBound(longest: number, Smax: number): number {
  let bound = 16;
  while (bound < longest) bound *= 2;
  return Math.min(Smax, bound);
}

function factorList(lora: InferenceLora): (Tensor | number | null)[] {
  const out: (Tensor | number | null)[] = [];
  for (const layer of lora.layers) {
    for (const p of LAYER_PROJECTIONS) {
      const f = layer[p];
      out.push(f?.A ?? null, f?.B ?? null, f?.scale ?? null);
    }
  }
  return out;
}

function sameFactors(list: readonly (Tensor | number | null)[], lora: InferenceLora): boolean {
  const layers = lora.layers;
  if (list.length !== layers.length * 3 * LAYER_PROJECTIONS.length) return false;
  let i = 0;
  for (const layer of layers) {
    for (const p of LAYER_PROJECTIONS) {
      const f = layer[p];
      if (f ? list[i] !== f.A || list[i + 1] !== f.B || list[i + 2] !== f.scale : list[i] !== null) return false;
      i += 3;
    }
  }
  return true;
}

/**
 * What decodeStep keeps between the steps of one cache: the step's commands as a
 * CommandList (src/gpu/replay.ts), what they were recorded for (the key), and the
 * buffers that carry a token's values: one u32 [3, B] upload (positions, write
 * offsets, attention lengths), copied by the recorded step into the three [B]
 * vectors its kernels bind.
 */
export class DecodeReplay {
  readonly inputs: Tensor;
  readonly positions: Tensor;
  readonly offsets: Tensor;
  readonly lengths: Tensor;
  readonly values: Uint32Array;
  list: CommandList | null = null;
  /** Steps recorded so far (tests use it to prove the replay path). */
  recordings = 0;
  private key: {
    w: LlamaWeights;
    ids: Tensor;
    prefix: KvCache['prefix'];
    maxLength: number;
    lora: InferenceLora | null;
    scale: number | undefined;
    /** A, B, scale of every layer's projections, for an adapter without a `scale` */
    factors: (Tensor | number | null)[];
  } | null = null;

  constructor(gpu: Gpu, readonly B: number) {
    this.inputs = gpu.empty([3 * B], 'u32', 'decode-inputs');
    this.positions = gpu.empty([B], 'u32', 'decode-positions');
    this.offsets = gpu.empty([B], 'u32', 'decode-offsets');
    this.lengths = gpu.empty([B], 'u32', 'decode-lengths');
    this.values = new Uint32Array(3 * B);
  }

  /**
   * Whether the recorded list was made for exactly this step: the same weights, ids
   * tensor, adapter (on or off as then, same tensors and scales), shared prefix and
   * length bound, and every tensor it binds still alive. An adapter with a `scale`
   * is keyed by the object and that scale: it trains in place (same tensors, new
   * values: nothing to record again), and tensors replaced would have been released,
   * which the list notices.
   */
  matches(w: LlamaWeights, ids: Tensor, lora: InferenceLora | null, prefix: KvCache['prefix'], maxLength: number): boolean {
    const k = this.key;
    if (!k || !this.list || k.w !== w || k.ids !== ids || k.prefix !== prefix || k.maxLength !== maxLength) return false;
    const on = lora && lora.enabled ? lora : null;
    if (k.lora !== on) return false;
    if (on && (on.scale !== undefined ? on.scale !== k.scale : !sameFactors(k.factors, on))) return false;
    return this.list.replayable;
  }

  setKey(w: LlamaWeights, ids: Tensor, lora: InferenceLora | null, prefix: KvCache['prefix'], maxLength: number): void {
    const on = lora && lora.enabled ? lora : null;
    this.key = { w, ids, prefix, maxLength, lora: on, scale: on?.scale, factors: on && on.scale === undefined ? factorList(on) : [] };
  }

  release(): void {
    this.list?.release();
    this.list = null;
    for (const t of [this.inputs, this.positions, this.offsets, this.lengths]) t.release();
  }
}

export interface DecodeStepOptions {
  /**
   * false: record the step's commands afresh, as every step did before replay (each
   * step's vectors uploaded, the exact length bound); tests compare the two paths.
   * Default true: replay the cache's recorded step (see decodeStep).
   */
  replay?: boolean;
}

/**
 * One new token per cache row: ids (u32 GPU tensor [B], e.g. the sampler's output, so
 * no host round trip) at positions P + lengths[b]. Appends each row's K/V and returns
 * logits [B, V]. Rows with active[b] false still run (a batch keeps its shape) but
 * their lengths do not advance, so their cache is left as it was.
 *
 * Host cost: the step's commands are recorded once into a CommandList kept on the
 * cache and replayed every token; per token the host writes one u32 [3, B] upload
 * (positions, write offsets, attention lengths) and encodes the list. The step is
 * recorded again when what it was recorded for changes (DecodeReplay.matches): other
 * weights, ids tensor or adapter, LoRA switched on or off, the shared prefix, a bound
 * tensor released (replaced), or the length bound growing (decodeLengthBound: after
 * 16, 32, 64, ... tokens). The logits returned
 * are lent by the list: release them before the next step of this cache (a step
 * whose previous logits are still held is recorded afresh). The upload runs before
 * anything is recorded, so it never splits a command buffer.
 */
export function decodeStep(gpu: Gpu, w: LlamaWeights, lora: InferenceLora | null, ids: Tensor, cache: KvCache, active?: readonly boolean[], opts: DecodeStepOptions = {}): Tensor {
  const B = cache.B;
  if (ids.dtype !== 'u32' || ids.size < B) throw new Error(`decodeStep: ids must be u32 [${B}], got ${ids}`);
  if (active && active.length !== B) throw new Error(`decodeStep: active has ${active.length} entries for ${B} rows`);
  const isActive = (b: number) => !active || active[b]!;
  const P = cache.P;
  const len = cache.lengths;
  let longest = 0;
  for (let b = 0; b < B; b++) {
    if (isActive(b) && len[b]! >= cache.Smax) throw new Error(`decodeStep: cache row ${b} is full (${cache.Smax} positions)`);
    longest = Math.max(longest, len[b]!);
  }
  let logits: Tensor;
  if (opts.replay === false) {
    const ad = passLora(lora);
    const posT = uploadU32(gpu, len.map((n) => P + n), 'decode-positions');
    const offT = uploadU32(gpu, len, 'decode-offsets');
    const lenT = uploadU32(gpu, len.map((n) => Math.min(n + 1, cache.Smax)), 'decode-lengths');
    logits = decodeLayers(gpu, w, ad, ids, cache, posT, offT, lenT, Math.min(cache.Smax, longest + 1));
    posT.release();
    offT.release();
    lenT.release();
  } else {
    const r = (cache.decodeReplay ??= new DecodeReplay(gpu, B));
    const v = r.values;
    for (let b = 0; b < B; b++) {
      v[b] = P + len[b]!;
      v[B + b] = len[b]!;
      v[2 * B + b] = Math.min(len[b]! + 1, cache.Smax);
    }
    gpu.write(r.inputs, v);
    const maxLength = decodeLengthBound(longest + 1, cache.Smax);
    let list = r.list;
    if (!list || !r.matches(w, ids, lora, cache.prefix, maxLength)) {
      const ad = passLora(lora);
      list?.release();
      r.list = null;
      list = r.list = gpu.record('decode-step', () => {
        gpu.copy(r.inputs, r.positions, B * 4, 0, 0);
        gpu.copy(r.inputs, r.offsets, B * 4, B * 4, 0);
        gpu.copy(r.inputs, r.lengths, B * 4, 2 * B * 4, 0);
        return [decodeLayers(gpu, w, ad, ids, cache, r.positions, r.offsets, r.lengths, maxLength)];
      });
      r.setKey(w, ids, lora, cache.prefix, maxLength);
      r.recordings++;
    }
    logits = gpu.replay(list)[0]!;
  }
  for (let b = 0; b < B; b++) if (isActive(b)) len[b] = len[b]! + 1;
  return logits;
}

/** The layers and LM head of a decode step on the given per-row vectors; returns logits [B, V]. */
function decodeLayers(
  gpu: Gpu,
  w: LlamaWeights,
  ad: ReadonlyArray<LayerLora> | null,
  ids: Tensor,
  cache: KvCache,
  posT: Tensor,
  offT: Tensor,
  lenT: Tensor,
  maxLength: number,
): Tensor {
  const B = cache.B;
  const P = cache.P;
  const { hiddenSize: C, numHeads: H, numKvHeads: HK, headDim: D } = w.config;
  const x = gpu.empty([B, C], 'f32', 'x');
  embed(gpu, x, ids, w, B);
  // 4-bit weights: the fused kernels (q/k/v in one GEMV, RoPE with the cache write,
  // gate/up with SwiGLU, LoRA B in the GEMV epilogues); otherwise the general layer.
  const fused = fusedDecodeSupported(w, ad, B);
  const carry = fused ? fusedDecodeCarry(gpu, w, ad, B) : null;
  for (let l = 0; l < w.config.numLayers; l++) {
    const prefix = cache.prefix ? { k: cache.prefix.k[l]!, v: cache.prefix.v[l]!, P } : null;
    if (fused) {
      const layerCache = { k: cache.k[l]!, v: cache.v[l]!, Smax: cache.Smax, positions: posT, offsets: offT };
      fusedDecodeLayer(gpu, w, l, ad, x, B, layerCache, (att, q) =>
        attentionDecode(gpu, att, q, cache.k[l]!, cache.v[l]!, lenT, prefix, B, cache.Smax, H, HK, D, { maxLength }),
        carry,
      );
      continue;
    }
    decoderLayer(gpu, w, l, ad, x, posT, B, (l, att, q, k, v) => {
      kvCacheWrite(gpu, cache.k[l]!, cache.v[l]!, k, v, offT, B, 1, cache.Smax, HK, D);
      k.release();
      v.release();
      attentionDecode(gpu, att, q, cache.k[l]!, cache.v[l]!, lenT, prefix, B, cache.Smax, H, HK, D, { maxLength });
    });
  }
  const logits = lastLogits(gpu, w, x, Array.from({ length: B }, (_, b) => b));
  x.release();
  return logits;
}
