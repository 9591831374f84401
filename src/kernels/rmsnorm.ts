/**
 * RMSNorm over the last dimension, computed in f32 as Llama does:
 *   out[n, c] = w[c] * x[n, c] * rstd[n],  rstd[n] = 1 / sqrt(mean_c x[n, c]^2 + eps)
 * Forward saves rstd [N] for the backward.
 */
import type { Gpu } from '../gpu/gpu';
import { Params } from '../gpu/params';
import type { Tensor } from '../gpu/tensor';
import { subgroupReduceWgsl, useSubgroups } from './subgroup';
import { WG_LINEAR, enables, grid, kernelCache, workgroupReduceWgsl } from './wgsl';

/**
 * Threads per row: enough to cover C in a few passes, 256 at most. Narrow rows get
 * narrow workgroups (fewer idle lanes per barrier; software adapters run every lane).
 */
export function rmsnormWorkgroup(C: number): number {
  return C <= 128 ? 32 : C <= 1024 ? 64 : 256;
}

/** The forward's row sum of squares through subgroupAdd (`sg`) or a workgroup-memory tree. */
const forwardKernel = kernelCache((WG: number, sg: boolean) => ({
  label: `rmsnorm_forward wg${WG}${sg ? ' subgroups' : ''}`,
  code: /* wgsl */ `${enables({ subgroups: sg })}
struct Params { N: u32, C: u32, eps: f32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;   // [N, C]
@group(0) @binding(2) var<storage, read_write> rstd: array<f32>;  // [N]
@group(0) @binding(3) var<storage, read> x: array<f32>;           // [N, C]
@group(0) @binding(4) var<storage, read> w: array<f32>;           // [C]
${sg ? subgroupReduceWgsl(WG, ['sum']) : workgroupReduceWgsl(WG, ['sum'])}
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u, @builtin(local_invocation_index) lid: u32${sg ? ', @builtin(subgroup_size) sgSize: u32' : ''}) {
  let n = ${WG_LINEAR};
  if (n >= p.N) { return; }
  let base = n * p.C;
  var ss = 0.0;
  for (var c = lid; c < p.C; c += ${WG}u) { let v = x[base + c]; ss += v * v; }
  let r = inverseSqrt(workgroupSum(ss, lid${sg ? ', sgSize' : ''}) / f32(p.C) + p.eps);
  for (var c = lid; c < p.C; c += ${WG}u) { out[base + c] = w[c] * (x[base + c] * r); }
  if (lid == 0u) { rstd[n] = r; }
}`,
}));

const backwardKernel = kernelCache((WG: number, sg: boolean) => ({
  label: `rmsnorm_backward_dx wg${WG}${sg ? ' subgroups' : ''}`,
  code: /* wgsl */ `${enables({ subgroups: sg })}
struct Params { N: u32, C: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> dx: array<f32>;    // [N, C]
@group(0) @binding(2) var<storage, read> dout: array<f32>;        // [N, C]
@group(0) @binding(3) var<storage, read> x: array<f32>;           // [N, C]
@group(0) @binding(4) var<storage, read> rstd: array<f32>;        // [N]
@group(0) @binding(5) var<storage, read> w: array<f32>;           // [C]
${sg ? subgroupReduceWgsl(WG, ['sum']) : workgroupReduceWgsl(WG, ['sum'])}
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u, @builtin(local_invocation_index) lid: u32${sg ? ', @builtin(subgroup_size) sgSize: u32' : ''}) {
  let n = ${WG_LINEAR};
  if (n >= p.N) { return; }
  let base = n * p.C;
  let r = rstd[n];
  var dot = 0.0;
  for (var c = lid; c < p.C; c += ${WG}u) { dot += w[c] * dout[base + c] * x[base + c]; }
  let k = workgroupSum(dot, lid${sg ? ', sgSize' : ''}) * r * r / f32(p.C);
  for (var c = lid; c < p.C; c += ${WG}u) {
    dx[base + c] = r * (w[c] * dout[base + c] - x[base + c] * k);
  }
}`,
}));

const weightGradKernel = kernelCache(() => ({
  label: 'rmsnorm_backward_dw',
  code: /* wgsl */ `
struct Params { N: u32, C: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> dw: array<f32>;    // [C]  (+=)
@group(0) @binding(2) var<storage, read> dout: array<f32>;        // [N, C]
@group(0) @binding(3) var<storage, read> x: array<f32>;           // [N, C]
@group(0) @binding(4) var<storage, read> rstd: array<f32>;        // [N]
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3u) {
  let c = gid.x;
  if (c >= p.C) { return; }
  var acc = 0.0;
  for (var n = 0u; n < p.N; n++) { acc += dout[n * p.C + c] * x[n * p.C + c] * rstd[n]; }
  dw[c] += acc;
}`,
}));

export interface RmsnormOptions {
  /** Reduce with subgroup operations (default: where the device has `subgroups`); false forces the workgroup-memory tree. */
  subgroups?: boolean;
}

export function rmsnormForward(gpu: Gpu, out: Tensor, rstd: Tensor, x: Tensor, w: Tensor, N: number, C: number, eps: number, opts: RmsnormOptions = {}): void {
  const sg = useSubgroups(gpu, opts.subgroups, 'rmsnormForward');
  gpu.dispatch(forwardKernel(rmsnormWorkgroup(C), sg), [out, rstd, x, w], grid(N), new Params().u32(N).u32(C).f32(eps));
}

/** dx = (written); dw += when given (norm weights are frozen during LoRA training). */
export function rmsnormBackward(
  gpu: Gpu,
  dx: Tensor,
  dw: Tensor | null,
  dout: Tensor,
  x: Tensor,
  rstd: Tensor,
  w: Tensor,
  N: number,
  C: number,
  opts: RmsnormOptions = {},
): void {
  const sg = useSubgroups(gpu, opts.subgroups, 'rmsnormBackward');
  gpu.dispatch(backwardKernel(rmsnormWorkgroup(C), sg), [dx, dout, x, rstd, w], grid(N), new Params().u32(N).u32(C));
  if (dw) gpu.dispatch(weightGradKernel(), [dw, dout, x, rstd], [Math.ceil(C / 64)], new Params().u32(N).u32(C));
}
