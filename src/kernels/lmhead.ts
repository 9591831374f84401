/**
 * Fused LM head + log-softmax, chunked over the vocabulary so the [N, V] logits
 * (V = 128256) never exist at once. Per position n, with z = (h W^T)[n] / temperature:
 *   logp[n]    = z[target[n]] - lse[n]            (TRL: log-probs from logits / temperature)
 *   entropy[n] = lse[n] - sum_v softmax(z)_v z_v
 *   lse[n]     = log sum_v exp z_v                 (saved for the backward)
 * The vocabulary is walked in chunks of `chunk` rows of W: each chunk's logits go into
 * one [N, chunk] scratch buffer (the only vocabulary-sized allocation, N * chunk * 4
 * bytes), a per-row kernel folds them into a running (max, sum, sum*shift, target logit)
 * state, and a final kernel turns the state into logp / entropy / lse. Everything is
 * recorded into the open command encoder; nothing is read back.
 *
 * Targets >= V mark ignored positions (padding, prompt): logp = 0 and no gradient.
 */
import type { Gpu } from '../gpu/gpu';
import { Params } from '../gpu/params';
import type { Tensor } from '../gpu/tensor';
import { matmul } from './matmul';
import { SMALL_K, rowsBackward, rowsForward } from './smallk';
import { subgroupReduceWgsl, useSubgroups } from './subgroup';
import { WG_LINEAR, ceilDiv, enables, grid, kernelCache, workgroupReduceWgsl } from './wgsl';

/**
 * The output projection W [V, C] (nn.Linear layout; the tied embedding), seen one
 * slice of vocabulary rows at a time. Implementations: f32VocabProjection below; a
 * 4-bit one maps directly onto q4Matmul / q4MatmulBackward with {rowStart, rowCount}.
 */
export interface VocabProjection {
  readonly V: number;
  readonly C: number;
  /** out[n, j] (accumulate ? += : =) sum_c h[n, c] W[rowStart + j, c] for j < rows; out packed as [N, rows]. */
  logits(gpu: Gpu, out: Tensor, h: Tensor, N: number, rowStart: number, rows: number, accumulate?: boolean): void;
  /** dh[n, c] (accumulate ? += : =) sum_j dlogits[n, j] W[rowStart + j, c]; dlogits packed [N, rows]. */
  backward(gpu: Gpu, dh: Tensor, dlogits: Tensor, N: number, rowStart: number, rows: number, accumulate: boolean): void;
}

/**
 * An f32 weight [V, C] held in one tensor: the tiled matmul, or for short rows
 * (C <= SMALL_K, small models) the barrier-free kernels of smallk.ts.
 */
export function f32VocabProjection(weight: Tensor, V: number, C: number): VocabProjection {
  if (weight.size < V * C) throw new Error(`f32VocabProjection: ${weight} is smaller than [${V}, ${C}]`);
  if (C <= SMALL_K) {
    return {
      V,
      C,
      logits: (gpu, out, h, N, rowStart, rows, accumulate = false) => rowsForward(gpu, out, h, weight, N, C, rowStart, rows, accumulate),
      backward: (gpu, dh, dlogits, N, rowStart, rows, accumulate) => rowsBackward(gpu, dh, dlogits, weight, N, C, rowStart, rows, accumulate),
    };
  }
  return {
    V,
    C,
    logits(gpu, out, h, N, rowStart, rows, accumulate = false) {
      matmul(gpu, out, h, weight, N, rows, C, { transB: true, bOffset: rowStart * C, accumulate });
    },
    backward(gpu, dh, dlogits, N, rowStart, rows, accumulate) {
      matmul(gpu, dh, dlogits, weight, N, C, rows, { bOffset: rowStart * C, accumulate });
    },
  };
}

export interface LmHeadOptions {
  temperature?: number;
  /** Vocabulary rows per chunk (default 8192); lowered so the scratch fits one binding. */
  chunk?: number;
  /** Reduce each chunk's max and sums with subgroup operations (default: where the device has `subgroups`); false forces the workgroup-memory tree. */
  subgroups?: boolean;
}

export interface LmHeadOutputs {
  /** [N] log p(target) under softmax(logits / temperature) */
  logp: Tensor;
  /** [N] entropy of that softmax (optional) */
  entropy?: Tensor | null;
  /** [N] log-sum-exp of logits / temperature, saved for lmHeadBackward */
  lse: Tensor;
}

const WG = 256;
/** Per-row running state: max m, s = sum exp(z - m), t = sum exp(z - m) (z - m), target z. */
const STATE = 4;

/** Largest chunk whose [N, chunk] f32 scratch fits one storage binding. */
export function lmHeadChunk(gpu: Gpu, N: number, V: number, requested = 8192): number {
  const limit = Math.min(gpu.caps.maxStorageBufferBindingSize, gpu.caps.maxBufferSize);
  const fit = Math.floor(limit / (4 * Math.max(1, N)));
  const chunk = Math.min(requested, V, fit >= 256 ? fit - (fit % 64) : fit);
  if (chunk < 1) throw new Error(`lmHead: ${N} rows do not fit one storage binding even one token at a time`);
  return chunk;
}

/** Bytes of vocabulary-sized scratch the LM head uses for N rows (the chunk logits). */
export function lmHeadScratchBytes(gpu: Gpu, N: number, V: number, requested = 8192): number {
  return N * lmHeadChunk(gpu, N, V, requested) * 4;
}

/**
 * Folds one chunk of logits into the running per-row state (one workgroup per row),
 * reducing through subgroupMax / subgroupAdd (`sg`) or a workgroup-memory tree.
 */
const chunkStatsKernel = kernelCache((sg: boolean) => ({
  label: `lmhead_chunk_stats${sg ? ' subgroups' : ''}`,
  code: /* wgsl */ `${enables({ subgroups: sg })}
struct Params { N: u32, rows: u32, rowStart: u32, temperature: f32, first: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> state: array<f32>;  // [N, 4]
@group(0) @binding(2) var<storage, read> logits: array<f32>;       // [N, rows]
@group(0) @binding(3) var<storage, read> targets: array<u32>;      // [N]
${sg ? subgroupReduceWgsl(WG, ['max', 'sum']) : workgroupReduceWgsl(WG, ['max', 'sum'])}
const LOWEST = -3.4028234e38;
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u, @builtin(local_invocation_index) lid: u32${sg ? ', @builtin(subgroup_size) sgSize: u32' : ''}) {
  let n = ${WG_LINEAR};
  if (n >= p.N) { return; }
  let base = n * p.rows;
  var m = LOWEST;
  for (var j = lid; j < p.rows; j += ${WG}u) { m = max(m, logits[base + j] / p.temperature); }
  let mc = workgroupMax(m, lid${sg ? ', sgSize' : ''});
  var s = 0.0;
  var t = 0.0;
  for (var j = lid; j < p.rows; j += ${WG}u) {
    let d = logits[base + j] / p.temperature - mc;
    let e = exp(d);
    s += e;
    if (e > 0.0) { t += e * d; }
  }
  let sc = workgroupSum(s, lid${sg ? ', sgSize' : ''});
  let tc = workgroupSum(t, lid${sg ? ', sgSize' : ''});
  if (lid != 0u) { return; }
  let o = n * ${STATE}u;
  let tgt = targets[n];
  if (tgt >= p.rowStart && tgt - p.rowStart < p.rows) {
    state[o + 3u] = logits[base + tgt - p.rowStart] / p.temperature;
  }
  if (p.first != 0u || state[o + 1u] == 0.0) {
    state[o] = mc; state[o + 1u] = sc; state[o + 2u] = tc;
    return;
  }
  if (sc == 0.0) { return; }
  let mo = state[o];
  let so = state[o + 1u];
  let to = state[o + 2u];
  let mn = max(mo, mc);
  let fo = exp(mo - mn);
  let fc = exp(mc - mn);
  // sum e^(z - mn) (z - mn) = e^(m - mn) (t + (m - mn) s) for each side
  state[o] = mn;
  state[o + 1u] = so * fo + sc * fc;
  state[o + 2u] = fo * (to + (mo - mn) * so) + fc * (tc + (mc - mn) * sc);
}`,
}));

const finalizeKernel = kernelCache((withEntropy: boolean) => ({
  label: `lmhead_finalize${withEntropy ? ' entropy' : ''}`,
  code: /* wgsl */ `
struct Params { N: u32, V: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> logp: array<f32>;     // [N]
@group(0) @binding(2) var<storage, read_write> lse: array<f32>;      // [N]
@group(0) @binding(3) var<storage, read> state: array<f32>;          // [N, 4]
@group(0) @binding(4) var<storage, read> targets: array<u32>;        // [N]
${withEntropy ? '@group(0) @binding(5) var<storage, read_write> entropy: array<f32>; // [N]' : ''}
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3u) {
  let n = gid.x;
  if (n >= p.N) { return; }
  let o = n * ${STATE}u;
  let logS = log(state[o + 1u]);
  let l = state[o] + logS;
  lse[n] = l;
  logp[n] = select(0.0, state[o + 3u] - l, targets[n] < p.V);
  ${withEntropy ? 'entropy[n] = logS - state[o + 2u] / state[o + 1u];' : ''}
}`,
}));

/** dlogits[n, j] = dlogp[n] (onehot(target)[j] - softmax(z)[j]) / temperature, in place. */
const chunkGradKernel = kernelCache(() => ({
  label: 'lmhead_chunk_grad',
  code: /* wgsl */ `
struct Params { N: u32, rows: u32, rowStart: u32, temperature: f32, V: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> g: array<f32>;       // [N, rows]: logits in, dlogits out
@group(0) @binding(2) var<storage, read> dlogp: array<f32>;         // [N]
@group(0) @binding(3) var<storage, read> targets: array<u32>;       // [N]
@group(0) @binding(4) var<storage, read> lse: array<f32>;           // [N]
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let n = ${WG_LINEAR};
  if (n >= p.N) { return; }
  let base = n * p.rows;
  let tgt = targets[n];
  let scale = select(0.0, dlogp[n] / p.temperature, tgt < p.V);
  let l = lse[n];
  for (var j = lid; j < p.rows; j += ${WG}u) {
    let prob = exp(g[base + j] / p.temperature - l);
    let hit = select(0.0, 1.0, p.rowStart + j == tgt);
    g[base + j] = scale * (hit - prob);
  }
}`,
}));

function checkShapes(fn: string, h: Tensor, targets: Tensor, proj: VocabProjection, N: number): void {
  if (h.size < N * proj.C) throw new Error(`${fn}: h ${h} is smaller than [${N}, ${proj.C}]`);
  if (targets.dtype !== 'u32' || targets.size < N) throw new Error(`${fn}: targets must be u32 [${N}], got ${targets}`);
}

/**
 * Forward: logp, entropy (optional) and lse [N] from h [N, C] and targets u32 [N].
 * Scratch: [N, chunk] f32 logits + [N, 4] f32 state, released before returning.
 */
export function lmHeadForward(
  gpu: Gpu,
  out: LmHeadOutputs,
  h: Tensor,
  targets: Tensor,
  proj: VocabProjection,
  N: number,
  opts: LmHeadOptions = {},
): void {
  const { temperature = 1 } = opts;
  if (!(temperature > 0)) throw new Error(`lmHeadForward: temperature must be > 0, got ${temperature}`);
  checkShapes('lmHeadForward', h, targets, proj, N);
  if (N === 0) return;
  const V = proj.V;
  const chunk = lmHeadChunk(gpu, N, V, opts.chunk);
  const sg = useSubgroups(gpu, opts.subgroups, 'lmHeadForward');
  const logits = gpu.empty([N, chunk], 'f32', 'lmhead.chunk');
  const state = gpu.empty([N, STATE], 'f32', 'lmhead.state');
  for (let r0 = 0; r0 < V; r0 += chunk) {
    const rows = Math.min(chunk, V - r0);
    proj.logits(gpu, logits, h, N, r0, rows);
    const params = new Params().u32(N).u32(rows).u32(r0).f32(temperature).u32(r0 === 0 ? 1 : 0);
    gpu.dispatch(chunkStatsKernel(sg), [state, logits, targets], grid(N), params);
  }
  const withEntropy = !!out.entropy;
  const bindings = [out.logp, out.lse, state, targets, ...(out.entropy ? [out.entropy] : [])];
  gpu.dispatch(finalizeKernel(withEntropy), bindings, [ceilDiv(N, 64)], new Params().u32(N).u32(V));
  logits.release();
  state.release();
}

export interface LmHeadBackwardOptions extends LmHeadOptions {
  /** dh += instead of dh = (activation gradients are written by default). */
  accumulate?: boolean;
}

/**
 * Backward of sum_n dlogp[n] * logp[n] w.r.t. h: recomputes each chunk's logits, turns
 * them into dlogits in place and adds dlogits @ W_chunk into dh [N, C]. dh is written
 * (=) unless opts.accumulate. The entropy output has no gradient here.
 */
export function lmHeadBackward(
  gpu: Gpu,
  dh: Tensor,
  dlogp: Tensor,
  h: Tensor,
  targets: Tensor,
  lse: Tensor,
  proj: VocabProjection,
  N: number,
  opts: LmHeadBackwardOptions = {},
): void {
  const { temperature = 1, accumulate = false } = opts;
  if (!(temperature > 0)) throw new Error(`lmHeadBackward: temperature must be > 0, got ${temperature}`);
  checkShapes('lmHeadBackward', h, targets, proj, N);
  if (dh.size < N * proj.C) throw new Error(`lmHeadBackward: dh ${dh} is smaller than [${N}, ${proj.C}]`);
  if (N === 0) return;
  const V = proj.V;
  const chunk = lmHeadChunk(gpu, N, V, opts.chunk);
  const g = gpu.empty([N, chunk], 'f32', 'lmhead.chunk');
  for (let r0 = 0; r0 < V; r0 += chunk) {
    const rows = Math.min(chunk, V - r0);
    proj.logits(gpu, g, h, N, r0, rows);
    const params = new Params().u32(N).u32(rows).u32(r0).f32(temperature).u32(V);
    gpu.dispatch(chunkGradKernel(), [g, dlogp, targets, lse], grid(N), params);
    proj.backward(gpu, dh, g, N, r0, rows, accumulate || r0 > 0);
  }
  g.release();
}
