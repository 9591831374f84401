/**
 * LoRA products for short batches (decode steps, N <= LORA_BATCHED_MAX_N rows), where
 * the general matmul splits K and spends three dispatches per projection.
 *
 *   loraDown:  u_p[n, r] = scale_p * sum_k x[n, k] A_p[r, k]     for up to 3 projections p
 *              sharing the input x [N, K] (q, k, v; gate, up), in ONE dispatch.
 *              A_p [R, K], u_p [N, R].
 *   then the B product is smallk's rowsForward with accumulate:
 *              y_p[n, j] += sum_r u_p[n, r] B_p[j, r]                B_p [M, R]
 *
 * One workgroup per (projection row p*R + r, group of NB input rows): its threads
 * stride over K (each A value read once for NB rows), then a workgroup reduction per
 * row (subgroupAdd where the device has subgroups, else a tree in workgroup memory).
 * The scale is applied here, so the B product needs no epilogue.
 */
import type { Gpu } from '../gpu/gpu';
import { uniforms } from '../gpu/params';
import type { KernelSource } from '../gpu/pipelines';
import type { Tensor } from '../gpu/tensor';
import { rowsForward } from './smallk';
import { useSubgroups, workgroupSumsAtWgsl } from './subgroup';
import { ceilDiv, enables, kernelCache } from './wgsl';

/** Rows up to which decode uses these kernels (above it, the tiled matmul reuses more). */
export const LORA_BATCHED_MAX_N = 32;
const WG = 64;
/** Input rows per workgroup. */
const NB = 8;

const DOWN_UNIFORMS = uniforms('Params', { N: 'u32', K: 'u32', R: 'u32', scale0: 'f32', scale1: 'f32', scale2: 'f32' });

export interface LoraDecodeOptions {
  /** Reduce the A products with subgroupAdd (default: where the device has `subgroups`); false forces the workgroup-memory tree. */
  subgroups?: boolean;
}

/** WGSL: the NB sums of v[0..NB) over the workgroup through a tree in `red` ([NB, WG]); `name` holds the total of v[i] for invocation i < NB. */
function treeSumsWgsl(name: string, v: string): string {
  return `
  for (var i = 0u; i < ${NB}u; i++) { red[i * ${WG}u + lid] = ${v}[i]; }
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s >>= 1u) {
    if (lid < s) {
      for (var i = 0u; i < ${NB}u; i++) { red[i * ${WG}u + lid] += red[i * ${WG}u + lid + s]; }
    }
    workgroupBarrier();
  }
  let ${name} = red[min(lid, ${NB - 1}u) * ${WG}u];`;
}

/**
 * packed: one output u [nA, N, R] (bindings x, u, a0..); else u_p [N, R] each (x, u0,
 * a0, u1, a1, ..). sg: the row sums through subgroupAdd.
 */
const downKernel = kernelCache((nA: number, packed: boolean, sg: boolean) => {
  const ps = Array.from({ length: nA }, (_, p) => p);
  const bind = packed
    ? `@group(0) @binding(2) var<storage, read_write> u: array<f32>;  // [nA, N, R]
${ps.map((p) => `@group(0) @binding(${3 + p}) var<storage, read> a${p}: array<f32>;        // [R, K]`).join('\n')}`
    : ps
        .map(
          (p) => `@group(0) @binding(${2 + 2 * p}) var<storage, read_write> u${p}: array<f32>;  // [N, R]
@group(0) @binding(${3 + 2 * p}) var<storage, read> a${p}: array<f32>;        // [R, K]`,
        )
        .join('\n');
  const store = (q: number) => (packed ? `u[(${q}u * p.N + n) * p.R + r] = p.scale${q} * v;` : `u${q}[n * p.R + r] = p.scale${q} * v;`);
  const pick = (body: (p: number) => string) => ps.map((p) => `${p > 0 ? ' else ' : ''}if (proj == ${p}u) { ${body(p)} }`).join('');
  return {
    label: `lora_down_x${nA}${packed ? ' packed' : ''}${sg ? ' subgroups' : ''}`,
    code: /* wgsl */ `${enables({ subgroups: sg })}
${DOWN_UNIFORMS.wgsl}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;         // [N, K]
${bind}
${sg ? workgroupSumsAtWgsl(WG, NB) : `var<workgroup> red: array<f32, ${NB * WG}>;`}
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) lid: u32${sg ? ', @builtin(subgroup_size) sgSize: u32' : ''}) {
  let proj = wid.x / p.R;
  let r = wid.x % p.R;
  let n0 = wid.y * ${NB}u;
  let nEnd = min(n0 + ${NB}u, p.N);
  var acc: array<f32, ${NB}>;
  for (var k = lid; k < p.K; k += ${WG}u) {
    var a = 0.0;
    ${pick((q) => `a = a${q}[r * p.K + k];`)}
    for (var n = n0; n < nEnd; n++) { acc[n - n0] += x[n * p.K + k] * a; }
  }
${sg ? '  let total = workgroupSumsAt(&acc, lid, sgSize);' : treeSumsWgsl('total', 'acc')}
  if (lid < nEnd - n0) {
    let n = n0 + lid;
    let v = total;
    ${pick(store)}
  }
}`,
  };
});

/** One adapted projection of a group sharing an input: A [R, K], B [M, R], y [N, M] (+=). */
export interface LoraTerm {
  A: Tensor;
  B: Tensor;
  scale: number;
  y: Tensor;
  M: number;
}

/**
 * y_p += scale_p * (x A_p^T) B_p^T for 1..3 projections sharing x [N, K], all with rank R:
 * one dispatch for the A products, one per projection for the B products.
 */
export function loraDecode(gpu: Gpu, x: Tensor, N: number, K: number, terms: readonly LoraTerm[], opts: LoraDecodeOptions = {}): void {
  if (terms.length === 0 || N === 0) return;
  if (terms.length > 3) throw new Error(`loraDecode: at most 3 projections share one dispatch, got ${terms.length}`);
  if (N > LORA_BATCHED_MAX_N) throw new Error(`loraDecode: serves N <= ${LORA_BATCHED_MAX_N} rows, got ${N}`);
  const R = terms[0]!.A.shape[0]!;
  for (const t of terms) {
    if (t.A.shape[0] !== R || t.A.size !== R * K) throw new Error(`loraDecode: A ${t.A} is not [${R}, ${K}] (projections sharing a dispatch need one rank)`);
    if (t.B.size !== t.M * R) throw new Error(`loraDecode: B ${t.B} is not [${t.M}, ${R}]`);
    if (t.y.size < N * t.M) throw new Error(`loraDecode: y ${t.y} is smaller than [${N}, ${t.M}]`);
  }
  if (x.size < N * K) throw new Error(`loraDecode: x ${x} is smaller than [${N}, ${K}]`);
  const sg = useSubgroups(gpu, opts.subgroups, 'loraDecode');
  const us = terms.map(() => gpu.empty([N, R], 'f32', 'lora-u'));
  const scales = [0, 1, 2].map((p) => terms[p]?.scale ?? 0);
  const params = DOWN_UNIFORMS.params({ N, K, R, scale0: scales[0]!, scale1: scales[1]!, scale2: scales[2]! });
  gpu.dispatch(downKernel(terms.length, false, sg), [x, ...terms.flatMap((t, p) => [us[p]!, t.A])], [terms.length * R, ceilDiv(N, NB)], params);
  terms.forEach((t, p) => rowsForward(gpu, t.y, us[p]!, t.B, N, R, 0, t.M, true));
  // Released last-first, so the pool hands the same buffers back in the same order next
  // step and the cached bind groups still match.
  for (const u of us.reverse()) u.release();
}

// Decode-step kernels by projection count (packedDown: + 4 with subgroups; normDown: + 4 with a pending B product, + 8 with subgroups), looked up without kernelCache's string key.
const packedDown: KernelSource[] = [];
const normDown: KernelSource[] = [];

/**
 * u [terms.length, N, R] = scale_p * x A_p^T for 1..3 projections sharing x [N, K], all
 * of rank R, in one dispatch: the A half of LoRA for a GEMV whose epilogue adds the
 * B half (q4-fused.ts). The caller releases u.
 */
export function loraDownProducts(gpu: Gpu, x: Tensor, N: number, K: number, terms: readonly { A: Tensor; scale: number }[], opts: LoraDecodeOptions = {}): Tensor {
  if (terms.length === 0 || terms.length > 3) throw new Error(`loraDownProducts: 1..3 projections share one dispatch, got ${terms.length}`);
  if (N < 1 || N > LORA_BATCHED_MAX_N) throw new Error(`loraDownProducts: serves 1..${LORA_BATCHED_MAX_N} rows, got ${N}`);
  const R = terms[0]!.A.shape[0]!;
  for (const t of terms) {
    if (t.A.shape[0] !== R || t.A.size !== R * K) throw new Error(`loraDownProducts: A ${t.A} is not [${R}, ${K}] (projections sharing a dispatch need one rank)`);
  }
  if (x.size < N * K) throw new Error(`loraDownProducts: x ${x} is smaller than [${N}, ${K}]`);
  const sg = useSubgroups(gpu, opts.subgroups, 'loraDownProducts');
  const u = gpu.empty([terms.length, N, R], 'f32', 'lora-u');
  const params = DOWN_UNIFORMS.params({ N, K, R, scale0: terms[0]!.scale, scale1: terms[1]?.scale ?? 0, scale2: terms[2]?.scale ?? 0 });
  const bindings: Tensor[] = [x, u];
  for (const t of terms) bindings.push(t.A);
  gpu.dispatch((packedDown[terms.length + (sg ? 4 : 0)] ??= downKernel(terms.length, true, sg)), bindings, [terms.length * R, ceilDiv(N, NB)], params);
  return u;
}

const NORM_UNIFORMS = uniforms('Params', { N: 'u32', K: 'u32', R: 'u32', scale0: 'f32', scale1: 'f32', scale2: 'f32', eps: 'f32' });

/**
 * RMSNorm and the A products in one kernel: each workgroup normalises its NB input
 * rows itself (h = w * (x * rstd), rstd = 1/sqrt(mean x^2 + eps), rmsnorm.ts's
 * expression) and reduces h against its A row; the workgroups of A row 0 also store h
 * for the projection GEMV that follows. `pending`: the input is x + pu pb^T, a LoRA B
 * product not yet added to the residual stream x (added on the fly, x is not written).
 */
const normDownKernel = kernelCache((nA: number, pending: boolean, sg: boolean) => {
  const ps = Array.from({ length: nA }, (_, p) => p);
  const pick = (body: (p: number) => string) => ps.map((p) => `${p > 0 ? ' else ' : ''}if (proj == ${p}u) { ${body(p)} }`).join('');
  return {
    label: `lora_norm_down_x${nA}${pending ? ' pending' : ''}${sg ? ' subgroups' : ''}`,
    code: /* wgsl */ `${enables({ subgroups: sg })}
${NORM_UNIFORMS.wgsl}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;          // [N, K] (before the norm)
@group(0) @binding(2) var<storage, read> nw: array<f32>;         // [K] norm weight
@group(0) @binding(3) var<storage, read_write> h: array<f32>;    // [N, K] normed
@group(0) @binding(4) var<storage, read_write> u: array<f32>;    // [nA, N, R]
${ps.map((p) => `@group(0) @binding(${5 + p}) var<storage, read> a${p}: array<f32>;        // [R, K]`).join('\n')}
${
  pending
    ? `@group(0) @binding(${5 + nA}) var<storage, read> pu: array<f32>;        // [N, R] pending A products (scaled)
@group(0) @binding(${6 + nA}) var<storage, read> pb: array<f32>;        // [K, R] pending B
fn xin(n: u32, k: u32) -> f32 {
  var v = 0.0;
  for (var r = 0u; r < p.R; r++) { v += pu[n * p.R + r] * pb[k * p.R + r]; }
  return x[n * p.K + k] + v;
}`
    : 'fn xin(n: u32, k: u32) -> f32 { return x[n * p.K + k]; }'
}
${sg ? workgroupSumsAtWgsl(WG, NB) : `var<workgroup> red: array<f32, ${NB * WG}>;`}
var<workgroup> rs: array<f32, ${NB}>;
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) lid: u32${sg ? ', @builtin(subgroup_size) sgSize: u32' : ''}) {
  let proj = wid.x / p.R;
  let r = wid.x % p.R;
  let n0 = wid.y * ${NB}u;
  let nEnd = min(n0 + ${NB}u, p.N);
  var ss: array<f32, ${NB}>;
  for (var k = lid; k < p.K; k += ${WG}u) {
    for (var n = n0; n < nEnd; n++) { let v = xin(n, k); ss[n - n0] += v * v; }
  }
${sg ? '  let sumSq = workgroupSumsAt(&ss, lid, sgSize);' : treeSumsWgsl('sumSq', 'ss')}
  if (lid < ${NB}u) { rs[lid] = inverseSqrt(sumSq / f32(p.K) + p.eps); }
  workgroupBarrier();
  let store = wid.x == 0u;
  var acc: array<f32, ${NB}>;
  for (var k = lid; k < p.K; k += ${WG}u) {
    var a = 0.0;
    ${pick((q) => `a = a${q}[r * p.K + k];`)}
    let wk = nw[k];
    for (var n = n0; n < nEnd; n++) {
      let hv = wk * (xin(n, k) * rs[n - n0]);
      if (store) { h[n * p.K + k] = hv; }
      acc[n - n0] += hv * a;
    }
  }
${sg ? '  let total = workgroupSumsAt(&acc, lid, sgSize);' : treeSumsWgsl('total', 'acc')}
  if (lid < nEnd - n0) {
    let n = n0 + lid;
    let v = total;
    ${pick((q) => `u[(${q}u * p.N + n) * p.R + r] = p.scale${q} * v;`)}
  }
}`,
  };
});

/** A LoRA B product not yet added to the residual stream: x + u B^T, u [N, R] (scaled), B [K, R]. */
export interface PendingLora {
  u: Tensor;
  B: Tensor;
}

/** Storage bindings of loraNormDownProducts for nA projections (with a pending B product or not). */
export function loraNormDownBindings(nA: number, pending: boolean): number {
  return 4 + nA + (pending ? 2 : 0);
}

/**
 * h [N, K] = rmsnorm(x') with weight normW, and u [terms.length, N, R] = scale_p h A_p^T,
 * in one dispatch (the norm before q/k/v or gate/up, fused with their LoRA A half);
 * x' = x, or x + pending.u pending.B^T (same rank R) without writing x. The caller
 * releases u.
 */
export function loraNormDownProducts(
  gpu: Gpu,
  h: Tensor,
  x: Tensor,
  normW: Tensor,
  eps: number,
  N: number,
  K: number,
  terms: readonly { A: Tensor; scale: number }[],
  pending: PendingLora | null = null,
  opts: LoraDecodeOptions = {},
): Tensor {
  if (terms.length === 0 || terms.length > 3) throw new Error(`loraNormDownProducts: 1..3 projections share one dispatch, got ${terms.length}`);
  if (N < 1 || N > LORA_BATCHED_MAX_N) throw new Error(`loraNormDownProducts: serves 1..${LORA_BATCHED_MAX_N} rows, got ${N}`);
  const R = terms[0]!.A.shape[0]!;
  for (const t of terms) {
    if (t.A.shape[0] !== R || t.A.size !== R * K) throw new Error(`loraNormDownProducts: A ${t.A} is not [${R}, ${K}] (projections sharing a dispatch need one rank)`);
  }
  if (x.size < N * K || h.size < N * K) throw new Error(`loraNormDownProducts: x ${x} or h ${h} is smaller than [${N}, ${K}]`);
  if (normW.size < K) throw new Error(`loraNormDownProducts: norm weight ${normW} is smaller than [${K}]`);
  if (pending && (pending.u.size < N * R || pending.B.size !== K * R)) {
    throw new Error(`loraNormDownProducts: pending u ${pending.u} / B ${pending.B} are not [${N}, ${R}] / [${K}, ${R}] (one rank for all projections)`);
  }
  const sg = useSubgroups(gpu, opts.subgroups, 'loraNormDownProducts');
  const u = gpu.empty([terms.length, N, R], 'f32', 'lora-u');
  const params = NORM_UNIFORMS.params({ N, K, R, scale0: terms[0]!.scale, scale1: terms[1]?.scale ?? 0, scale2: terms[2]?.scale ?? 0, eps });
  const bindings: Tensor[] = [x, normW, h, u];
  for (const t of terms) bindings.push(t.A);
  if (pending) bindings.push(pending.u, pending.B);
  const slot = terms.length + (pending ? 4 : 0) + (sg ? 8 : 0);
  gpu.dispatch((normDown[slot] ??= normDownKernel(terms.length, pending !== null, sg)), bindings, [terms.length * R, ceilDiv(N, NB)], params);
  return u;
}
