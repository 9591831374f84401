/**
 * Optimizer kernels, all on the GPU with no readback: the global gradient L2 norm over
 * many tensors, the clip coefficient, and PyTorch's AdamW step.
 *
 * Non-finite gradients never reach the parameters: the norm pass detects NaN/Inf by
 * bit pattern (shader compilers may assume floats are finite, so `x != x` is not
 * trusted), the clip state then carries a skip flag, and adamwStep leaves param, m and
 * v untouched for that step.
 *
 * Layouts:
 *   partials  f32 [P]  one sum of squares per norm workgroup; -1 marks a non-finite one
 *   normOut   f32 [1]  sqrt(sum of squares); NaN when any gradient was non-finite
 *   clip      f32 [2]  [coef, skip]: coef = min(1, maxNorm / (norm + 1e-6)), skip = 1
 *                      when the norm is NaN or Inf (then coef = 0), else 0
 */
import type { Gpu } from '../gpu/gpu';
import { Params } from '../gpu/params';
import type { Tensor } from '../gpu/tensor';
import { mapKernel } from './elementwise';
import { ceilDiv, kernelCache } from './wgsl';

const WG = 256;
/** Norm workgroups per tensor at most; each loops over its share of the tensor. */
const MAX_WGS_PER_TENSOR = 64;
/** Elements (vec4s on the vec4 path) each norm invocation covers before another workgroup is added. */
const ITEMS_PER_THREAD = 4;
const NAN_BITS = 0x7fc00000;

export interface GradRef {
  tensor: Tensor;
  /** elements used (the tensor's buffer may hold more) */
  n: number;
}

export interface AdamWHyper {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  /** 1-based step count, for bias correction */
  step: number;
}

const nonFinite = (T: string) => `
fn nonFinite(v: ${T}) -> bool {
  return any((bitcast<${T === 'f32' ? 'u32' : 'vec4u'}>(v) & ${T === 'f32' ? '' : 'vec4u'}(0x7f800000u)) == ${T === 'f32' ? '' : 'vec4u'}(0x7f800000u));
}`;

const workgroupSum = `
var<workgroup> red: array<f32, ${WG}>;
var<workgroup> anyBad: atomic<u32>;
fn workgroupSum(v: f32, bad: bool, lid: u32) -> f32 {
  if (bad) { atomicOr(&anyBad, 1u); }
  red[lid] = v;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s >>= 1u) {
    if (lid < s) { red[lid] += red[lid + s]; }
    workgroupBarrier();
  }
  return red[0];
}`;

const sumSquaresKernel = kernelCache((vec4: boolean) => {
  const T = vec4 ? 'vec4<f32>' : 'f32';
  return {
    label: `grad_sum_squares ${vec4 ? 'vec4' : 'f32'}`,
    code: /* wgsl */ `
struct Params { n: u32, slot: u32, wgs: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> partials: array<f32>;  // [P]
@group(0) @binding(2) var<storage, read> g: array<${T}>;              // [n]
${nonFinite(T)}
${workgroupSum}
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) lid: u32) {
  let count = ${vec4 ? '(p.n + 3u) / 4u' : 'p.n'};
  var ss = 0.0;
  var bad = false;
  for (var i = wid.x * ${WG}u + lid; i < count; i += p.wgs * ${WG}u) {
    ${
      vec4
        ? `let v = select(vec4f(), g[i], vec4u(0u, 1u, 2u, 3u) + i * 4u < vec4u(p.n));
    ss += dot(v, v);`
        : `let v = g[i];
    ss += v * v;`
    }
    bad = bad || nonFinite(v);
  }
  let total = workgroupSum(ss, bad, lid);
  if (lid == 0u) { partials[p.slot + wid.x] = select(total, -1.0, atomicLoad(&anyBad) != 0u); }
}`,
  };
});

const normKernel = kernelCache(() => ({
  label: 'grad_norm_reduce',
  code: /* wgsl */ `
struct Params { count: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> normOut: array<u32>;  // [1] f32 bits
@group(0) @binding(2) var<storage, read> partials: array<f32>;       // [P]
${nonFinite('f32')}
${workgroupSum}
@compute @workgroup_size(${WG})
fn main(@builtin(local_invocation_index) lid: u32) {
  var ss = 0.0;
  var bad = false;
  for (var i = lid; i < p.count; i += ${WG}u) {
    let v = partials[i];
    ss += v;
    bad = bad || v < 0.0 || nonFinite(v);
  }
  let total = workgroupSum(ss, bad, lid);
  if (lid == 0u) {
    let norm = sqrt(total);
    normOut[0] = select(bitcast<u32>(norm), ${NAN_BITS}u, atomicLoad(&anyBad) != 0u || nonFinite(norm));
  }
}`,
}));

const clipKernel = kernelCache(() => ({
  label: 'grad_clip_coefficient',
  code: /* wgsl */ `
struct Params { maxNorm: f32, clipping: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> clip: array<f32>;  // [2] coef, skip
@group(0) @binding(2) var<storage, read> normIn: array<u32>;      // [1] f32 bits
${nonFinite('f32')}
@compute @workgroup_size(1)
fn main() {
  let norm = bitcast<f32>(normIn[0]);
  if (nonFinite(norm)) {
    clip[0] = 0.0;
    clip[1] = 1.0;
    return;
  }
  clip[0] = select(1.0, min(1.0, p.maxNorm / (norm + 1e-6)), p.clipping != 0u);
  clip[1] = 0.0;
}`,
}));

interface NormPlan {
  items: { grad: GradRef; vec4: boolean; slot: number; wgs: number }[];
  partials: number;
}

function planNorm(grads: readonly GradRef[]): NormPlan {
  let slot = 0;
  const items = grads.map((grad) => {
    const { tensor, n } = grad;
    if (tensor.dtype !== 'f32' || tensor.buffer.size < n * 4) throw new Error(`gradNorm: ${tensor} holds fewer than ${n} f32 elements`);
    const vec4 = tensor.buffer.size >= ceilDiv(n, 4) * 16;
    const count = ceilDiv(n, vec4 ? 4 : 1);
    const wgs = Math.max(1, Math.min(MAX_WGS_PER_TENSOR, ceilDiv(count, WG * ITEMS_PER_THREAD)));
    const item = { grad, vec4, slot, wgs };
    slot += wgs;
    return item;
  });
  return { items, partials: slot };
}

/** Number of partial sums (the length P of `partials`) gradNormSquared writes for these gradients. */
export function gradNormPartialCount(grads: readonly GradRef[]): number {
  return planNorm(grads).partials;
}

/**
 * partials [P] f32 = per-workgroup sums of squares of all gradients (-1 where a
 * workgroup saw NaN/Inf). One dispatch per tensor; P = gradNormPartialCount(grads).
 */
export function gradNormSquared(gpu: Gpu, partials: Tensor, grads: readonly GradRef[]): number {
  const plan = planNorm(grads);
  if (partials.buffer.size < plan.partials * 4) throw new Error(`gradNormSquared: partials ${partials} needs ${plan.partials} entries`);
  for (const { grad, vec4, slot, wgs } of plan.items) {
    if (grad.n === 0) {
      gpu.clear(partials, slot * 4, 4);
      continue;
    }
    gpu.dispatch(sumSquaresKernel(vec4), [partials, grad.tensor], [wgs], new Params().u32(grad.n).u32(slot).u32(wgs));
  }
  return plan.partials;
}

/** normOut [1] f32 = sqrt(sum of the first `count` partials); NaN when any is marked non-finite. */
export function reduceGradNorm(gpu: Gpu, normOut: Tensor, partials: Tensor, count: number): void {
  gpu.dispatch(normKernel(), [normOut, partials], [1], new Params().u32(count));
}

/** normOut [1] f32 = global L2 norm of all gradients (NaN if any element is NaN or Inf). */
export function globalGradNorm(gpu: Gpu, normOut: Tensor, grads: readonly GradRef[]): void {
  const P = gradNormPartialCount(grads);
  const partials = gpu.empty([Math.max(P, 1)], 'f32', 'grad-norm-partials');
  gradNormSquared(gpu, partials, grads);
  reduceGradNorm(gpu, normOut, partials, P);
  // Safe to recycle now: later work reusing the buffer is ordered after these dispatches.
  partials.release();
}

/**
 * clip [2] f32 = [coef, skip] from norm [1]: coef = min(1, maxNorm / (norm + 1e-6)),
 * or 1 when maxNorm is null (no clipping, NaN guard only); [0, 1] when norm is NaN/Inf.
 */
export function clipCoefficient(gpu: Gpu, clip: Tensor, norm: Tensor, maxNorm: number | null): void {
  const clipping = maxNorm !== null && Number.isFinite(maxNorm);
  gpu.dispatch(clipKernel(), [clip, norm], [1], new Params().f32(clipping ? maxNorm : 0).u32(clipping ? 1 : 0));
}

/** globalGradNorm then clipCoefficient: the usual prelude to a step of adamwStep(..., clip). */
export function gradClipState(gpu: Gpu, clip: Tensor, normOut: Tensor, grads: readonly GradRef[], maxNorm: number | null): void {
  globalGradNorm(gpu, normOut, grads);
  clipCoefficient(gpu, clip, normOut, maxNorm);
}

const adamwBody = `let g = grad * coef;
  param = param * p.decay;
  m = p.b1 * m + p.c1 * g;
  v = p.b2 * v + p.c2 * g * g;
  param = param - p.stepSize * m / (sqrt(v) * p.invSqrtBc2 + p.eps);`;
const adamwScalars = ['decay', 'b1', 'c1', 'b2', 'c2', 'stepSize', 'invSqrtBc2', 'eps'];

const adamwClipped = mapKernel({
  label: 'adamw_step clipped',
  outputs: [],
  inouts: ['param', 'm', 'v'],
  inputs: ['grad'],
  scalars: adamwScalars,
  globals: ['clip'],
  prologue: `let coef = clip[0];
  if (clip[1] != 0.0 || (bitcast<u32>(coef) & 0x7f800000u) == 0x7f800000u) { return; }`,
  body: adamwBody,
});

const adamwPlain = mapKernel({
  label: 'adamw_step',
  outputs: [],
  inouts: ['param', 'm', 'v'],
  inputs: ['grad'],
  scalars: adamwScalars,
  prologue: 'let coef = 1.0;',
  body: adamwBody,
});

/**
 * One PyTorch AdamW step over n elements (param, m, v updated in place; grad [n] read):
 *   p -= lr * wd * p;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
 *   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
 * With `clip` (the [coef, skip] state), g = coef * grad and the whole update is skipped
 * when skip is set. Without it there is no NaN guard.
 */
export function adamwStep(gpu: Gpu, param: Tensor, grad: Tensor, m: Tensor, v: Tensor, n: number, hp: AdamWHyper, clip: Tensor | null): void {
  const { lr, beta1, beta2, eps, weightDecay, step } = hp;
  if (!(Number.isInteger(step) && step >= 1)) throw new Error(`adamwStep: step must be a positive integer, got ${step}`);
  const scalars = [
    1 - lr * weightDecay,
    beta1,
    1 - beta1,
    beta2,
    1 - beta2,
    lr / (1 - beta1 ** step),
    1 / Math.sqrt(1 - beta2 ** step),
    eps,
  ];
  if (clip) adamwClipped(gpu, [param, m, v, grad], n, scalars, [clip]);
  else adamwPlain(gpu, [param, m, v, grad], n, scalars);
}

/** Clears gradient buffers before a step's backward (parameter grads accumulate with +=). */
export function zeroGrads(gpu: Gpu, grads: readonly (Tensor | GradRef)[]): void {
  for (const g of grads) gpu.clear('tensor' in g ? g.tensor : g);
}
