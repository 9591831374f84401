/**
 * Matrix products against a weight W [M, K] with a short K (small models' hidden
 * sizes), without workgroup memory or barriers. A small model's projections, its LoRA
 * products and its f32 LM head ([N rows] x [vocab] x [K = 16..512]) run here; tiled
 * matmul's barriers cost more than its reuse saves at such K, especially on software
 * adapters.
 *
 *   rowsForward:  y[n, j] (= or +=) alpha sum_k x[n, k] W[r0 + j, k]      y [N, rows]
 *   rowsBackward: dx[n, k] (= or +=) alpha sum_j dy[n, j] W[r0 + j, k]    dx [N, K]
 *
 * Both are out[n, c] = alpha sum_t a[n, t] B(t, c) with B read from W. A workgroup
 * covers WG output columns c (one per invocation) of NB consecutive rows n, so each
 * B element read serves NB rows, and each a[n, t] is at one address for the whole
 * workgroup. Every invocation stays active through the loop (out-of-range columns and
 * rows compute a clamped copy and skip the store): SIMD adapters such as llvmpipe then
 * load such a value once per workgroup instead of once per lane.
 */
import type { Gpu } from '../gpu/gpu';
import { uniforms } from '../gpu/params';
import type { Tensor } from '../gpu/tensor';
import { ceilDiv, grid, kernelCache, WG_LINEAR } from './wgsl';

/** K up to which these kernels are used instead of the tiled matmul. */
export const SMALL_K = 512;
/** Rows n per workgroup (accumulators per invocation). */
const NB = 16;
const U = uniforms('Params', { N: 'u32', T: 'u32', C: 'u32', K: 'u32', r0: 'u32', cBlocks: 'u32', alpha: 'f32' });

/** Output columns per workgroup: 64, or 16 for narrow outputs (a rank-16 LoRA product). */
function workgroupWidth(cols: number): number {
  return cols <= 16 ? 16 : 64;
}

/** One WGSL line per row of the workgroup's block, unrolled so the accumulators stay in registers. */
function perRow(line: (i: number) => string): string {
  return Array.from({ length: NB }, (_, i) => line(i)).join('\n');
}

const rowsKernel = kernelCache((backward: boolean, accumulate: boolean, wg: number) => {
  // forward: t = k, c = j, B(t, c) = W[r0 + c, t]; backward: t = j, c = k, B(t, c) = W[r0 + t, c]
  const bIndex = backward ? '(p.r0 + t) * p.K + c' : '(p.r0 + c) * p.K + t';
  return {
    label: `smallk_rows_${backward ? 'backward' : 'forward'}${accumulate ? '_acc' : ''} wg=${wg}`,
    code: /* wgsl */ `
${U.wgsl}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>; // [N, C]
@group(0) @binding(2) var<storage, read> a: array<f32>;         // [N, T]
@group(0) @binding(3) var<storage, read> w: array<f32>;         // [M, K]
@compute @workgroup_size(${wg})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let g = ${WG_LINEAR};
  let n0 = (g / p.cBlocks) * ${NB}u;
  let cc = (g % p.cBlocks) * ${wg}u + lid;
  let c = min(cc, p.C - 1u);
  let last = p.N - 1u;
${perRow((i) => `  let a${i} = min(n0 + ${i}u, last) * p.T;`)}
${perRow((i) => `  var acc${i} = 0.0;`)}
  for (var t = 0u; t < p.T; t++) {
    let b = w[${bIndex}];
${perRow((i) => `    acc${i} += a[a${i} + t] * b;`)}
  }
  if (cc >= p.C) { return; }
${perRow((i) => `  if (n0 + ${i}u <= last) { out[(n0 + ${i}u) * p.C + c] ${accumulate ? '+=' : '='} p.alpha * acc${i}; }`)}
}`,
  };
});

/** out [N, C] (= or +=) alpha a [N, T] B, B (T, C) read from W [M, K] as above. */
function rowsProduct(gpu: Gpu, backward: boolean, out: Tensor, a: Tensor, w: Tensor, N: number, T: number, C: number, K: number, r0: number, accumulate: boolean, alpha: number): void {
  if (N === 0 || C === 0) return;
  const wg = workgroupWidth(C);
  const cBlocks = ceilDiv(C, wg);
  gpu.dispatch(rowsKernel(backward, accumulate, wg), [out, a, w], grid(cBlocks * ceilDiv(N, NB)), U.params({ N, T, C, K, r0, cBlocks, alpha }));
}

export function rowsForward(gpu: Gpu, y: Tensor, x: Tensor, w: Tensor, N: number, K: number, r0: number, rows: number, accumulate = false, alpha = 1): void {
  rowsProduct(gpu, false, y, x, w, N, K, rows, K, r0, accumulate, alpha);
}

export function rowsBackward(gpu: Gpu, dx: Tensor, dy: Tensor, w: Tensor, N: number, K: number, r0: number, rows: number, accumulate = false, alpha = 1): void {
  rowsProduct(gpu, true, dx, dy, w, N, rows, K, K, r0, accumulate, alpha);
}
