/**
 * Matrix products against a weight W [M, K] with a short K (small models' hidden
 * sizes), without workgroup memory or barriers: one invocation per output element
 * group, reading W rows directly. The f32 LM head of a small model ([N rows] x
 * [128256 vocab] x [K = 64..512]) runs here; tiled matmul's barriers cost more than
 * its reuse saves at such K, especially on software adapters.
 *
 *   rowsForward:  y[n, j] (= or +=) sum_k x[n, k] W[r0 + j, k]        y [N, rows]
 *   rowsBackward: dx[n, k] (= or +=) sum_j dy[n, j] W[r0 + j, k]      dx [N, K]
 */
import type { Gpu } from '../gpu/gpu';
import { Params } from '../gpu/params';
import type { Tensor } from '../gpu/tensor';
import { ceilDiv, grid, kernelCache, WG_LINEAR } from './wgsl';

/** K up to which these kernels are used instead of the tiled matmul. */
export const SMALL_K = 512;
const WG = 64;
/** x rows accumulated per invocation in the forward. */
const NB = 8;

const forwardKernel = kernelCache((accumulate: boolean) => ({
  label: `smallk_rows_forward${accumulate ? '_acc' : ''}`,
  code: /* wgsl */ `
struct Params { N: u32, K: u32, rows: u32, r0: u32, nGroups: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;   // [N, rows]
@group(0) @binding(2) var<storage, read> x: array<f32>;         // [N, K]
@group(0) @binding(3) var<storage, read> w: array<f32>;         // [M, K]
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let item = ${WG_LINEAR} * ${WG}u + lid;
  let j = item / p.nGroups;          // output column (weight row)
  let n0 = (item % p.nGroups) * ${NB}u;
  if (j >= p.rows) { return; }
  let wb = (p.r0 + j) * p.K;
  var acc: array<f32, ${NB}>;
  let nEnd = min(n0 + ${NB}u, p.N);
  for (var k = 0u; k < p.K; k++) {
    let wk = w[wb + k];
    for (var n = n0; n < nEnd; n++) { acc[n - n0] += x[n * p.K + k] * wk; }
  }
  for (var n = n0; n < nEnd; n++) {
    ${accumulate ? 'y[n * p.rows + j] += acc[n - n0];' : 'y[n * p.rows + j] = acc[n - n0];'}
  }
}`,
}));

const backwardKernel = kernelCache((accumulate: boolean) => ({
  label: `smallk_rows_backward${accumulate ? '_acc' : ''}`,
  code: /* wgsl */ `
struct Params { N: u32, K: u32, rows: u32, r0: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> dx: array<f32>;  // [N, K]
@group(0) @binding(2) var<storage, read> dy: array<f32>;        // [N, rows]
@group(0) @binding(3) var<storage, read> w: array<f32>;         // [M, K]
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let i = ${WG_LINEAR} * ${WG}u + lid;
  if (i >= p.N * p.K) { return; }
  let n = i / p.K;
  let k = i % p.K;
  var acc = 0.0;
  for (var j = 0u; j < p.rows; j++) { acc += dy[n * p.rows + j] * w[(p.r0 + j) * p.K + k]; }
  ${accumulate ? 'dx[i] += acc;' : 'dx[i] = acc;'}
}`,
}));

export function rowsForward(gpu: Gpu, y: Tensor, x: Tensor, w: Tensor, N: number, K: number, r0: number, rows: number, accumulate = false): void {
  const nGroups = ceilDiv(N, NB);
  gpu.dispatch(forwardKernel(accumulate), [y, x, w], grid(ceilDiv(rows * nGroups, WG)), new Params().u32(N).u32(K).u32(rows).u32(r0).u32(nGroups));
}

export function rowsBackward(gpu: Gpu, dx: Tensor, dy: Tensor, w: Tensor, N: number, K: number, r0: number, rows: number, accumulate = false): void {
  gpu.dispatch(backwardKernel(accumulate), [dx, dy, w], grid(ceilDiv(N * K, WG)), new Params().u32(N).u32(K).u32(rows).u32(r0));
}
