/**
 * Token embedding lookup: out[n, :] = table[ids[n], :]. Forward only: the (tied)
 * embedding is frozen during LoRA training.
 *
 * The 4-bit table (Q4Weight, rows = V, K = C) is dequantized in the kernel. A table
 * split into row shards is read with one dispatch per shard; each writes only the
 * rows whose id falls in its shard, so every row is written exactly once.
 *
 * Out-of-range ids (id >= V, including negative ids stored as u32) give a row of
 * zeros; nothing is read out of bounds.
 */
import type { Gpu } from '../gpu/gpu';
import { Params } from '../gpu/params';
import type { Tensor } from '../gpu/tensor';
import { Q4_BLOCK, type Q4Weight } from './q4-layout';
import { WG_LINEAR, ceilDiv, grid, kernelCache } from './wgsl';

const WG = 64;

/**
 * One workgroup per token; each invocation dequantizes one u32 of qweight (8 features).
 * vec4 stores when C % 4 == 0 (a word's 8 features are then two aligned vec4s).
 */
const q4Kernel = kernelCache((withZeros: boolean, vec4: boolean) => ({
  label: `embedding_q4${withZeros ? ' zeros' : ''}${vec4 ? ' vec4' : ''}`,
  code: /* wgsl */ `
struct Params { N: u32, C: u32, nb: u32, rowStart: u32, rows: u32, V: u32, zeroInvalid: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<${vec4 ? 'vec4<f32>' : 'f32'}>;  // [N, C]
@group(0) @binding(2) var<storage, read> ids: array<u32>;                                  // [N]
@group(0) @binding(3) var<storage, read> qweight: array<u32>;   // shard [rows, nb, 4]
@group(0) @binding(4) var<storage, read> scales: array<u32>;    // shard f16 pairs [rows, nb]
${withZeros ? '@group(0) @binding(5) var<storage, read> zeros: array<u32>;  // shard u8 [rows, ceil(nb/2)]' : ''}

fn put(base: u32, k: u32, lo: vec4f, hi: vec4f) {
${
  vec4
    ? `  let o = (base + k) / 4u;
  out[o] = lo;
  if (k + 4u < p.C) { out[o + 1u] = hi; }`
    : `  for (var i = 0u; i < 4u; i++) {
    if (k + i < p.C) { out[base + k + i] = lo[i]; }
    if (k + 4u + i < p.C) { out[base + k + 4u + i] = hi[i]; }
  }`
}
}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let n = ${WG_LINEAR};
  if (n >= p.N) { return; }
  let id = ids[n];
  let base = n * p.C;
  let words = (p.C + 7u) / 8u;
  if (id >= p.V) {
    if (p.zeroInvalid != 0u) {
      for (var w = lid; w < words; w += ${WG}u) { put(base, w * 8u, vec4f(), vec4f()); }
    }
    return;
  }
  if (id < p.rowStart || id - p.rowStart >= p.rows) { return; }
  let m = id - p.rowStart;
  for (var w = lid; w < words; w += ${WG}u) {
    let b = w / 4u;
    let blk = m * p.nb + b;
    let scale = unpack2x16float(scales[blk / 2u])[blk % 2u];
    ${
      withZeros
        ? `let zi = m * ((p.nb + 1u) / 2u) + b / 2u;
    let zero = f32((zeros[zi / 4u] >> ((zi % 4u) * 8u + (b % 2u) * 4u)) & 15u);`
        : 'let zero = 8.0;'
    }
    let q = qweight[blk * 4u + w % 4u];
    let lo = (vec4f(f32(q & 15u), f32((q >> 4u) & 15u), f32((q >> 8u) & 15u), f32((q >> 12u) & 15u)) - zero) * scale;
    let hi = (vec4f(f32((q >> 16u) & 15u), f32((q >> 20u) & 15u), f32((q >> 24u) & 15u), f32(q >> 28u)) - zero) * scale;
    put(base, b * ${Q4_BLOCK}u + (w % 4u) * 8u, lo, hi);
  }
}`,
}));

const f32Kernel = kernelCache((vec4: boolean) => {
  const T = vec4 ? 'vec4<f32>' : 'f32';
  return {
    label: `embedding_f32${vec4 ? ' vec4' : ''}`,
    code: /* wgsl */ `
struct Params { N: u32, C: u32, V: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<${T}>;  // [N, C]
@group(0) @binding(2) var<storage, read> ids: array<u32>;         // [N]
@group(0) @binding(3) var<storage, read> table: array<${T}>;      // [V, C]
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let n = ${WG_LINEAR};
  if (n >= p.N) { return; }
  let id = ids[n];
  let width = p.C / ${vec4 ? 4 : 1}u;
  let base = n * width;
  if (id >= p.V) {
    for (var c = lid; c < width; c += ${WG}u) { out[base + c] = ${T}(); }
    return;
  }
  let row = id * width;
  for (var c = lid; c < width; c += ${WG}u) { out[base + c] = table[row + c]; }
}`,
  };
});

/** out [N, C] f32 = rows ids [N] u32 of the 4-bit table [V, C] (V = table.M, C = table.K). */
export function embeddingForward(gpu: Gpu, out: Tensor, ids: Tensor, table: Q4Weight, N: number): void {
  const C = table.K;
  checkShapes(out, ids, N, C);
  const withZeros = table.shards.some((s) => s.zeros !== null);
  if (withZeros && table.shards.some((s) => s.zeros === null)) throw new Error('embeddingForward: zero points on some shards only');
  const vec4 = C % 4 === 0;
  table.shards.forEach((s, i) => {
    const params = new Params().u32(N).u32(C).u32(table.nb).u32(s.rowStart).u32(s.rows).u32(table.M).u32(i === 0 ? 1 : 0);
    const bindings = [out, ids, s.qweight, s.scales, ...(s.zeros ? [s.zeros] : [])];
    gpu.dispatch(q4Kernel(withZeros, vec4), bindings, grid(N), params);
  });
}

/** out [N, C] f32 = rows ids [N] u32 of table [V, C] f32. */
export function embeddingForwardF32(gpu: Gpu, out: Tensor, ids: Tensor, table: Tensor, N: number, C: number): void {
  checkShapes(out, ids, N, C);
  const V = table.shape[0]!;
  if (table.dtype !== 'f32' || table.size !== V * C) throw new Error(`embeddingForwardF32: table ${table} is not [V, ${C}] f32`);
  const vec4 = C % 4 === 0;
  gpu.dispatch(f32Kernel(vec4), [out, ids, table], grid(N), new Params().u32(N).u32(C).u32(V));
}

function checkShapes(out: Tensor, ids: Tensor, N: number, C: number): void {
  if (out.dtype !== 'f32' || out.buffer.size < ceilDiv(N * C, 4) * 4) throw new Error(`embedding: out ${out} is not [${N}, ${C}] f32`);
  if (ids.dtype !== 'u32' && ids.dtype !== 'i32') throw new Error(`embedding: ids ${ids} must be u32`);
  if (ids.size < N) throw new Error(`embedding: ids ${ids} has fewer than ${N} entries`);
}

const scatterKernel = kernelCache((vec4: boolean) => {
  const T = vec4 ? 'vec4<f32>' : 'f32';
  return {
    label: `scatter_rows_f32${vec4 ? ' vec4' : ''}`,
    code: /* wgsl */ `
struct Params { M: u32, C: u32, N: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> dst: array<${T}>;  // [N, C]
@group(0) @binding(2) var<storage, read> rows: array<u32>;       // [M], distinct
@group(0) @binding(3) var<storage, read> src: array<${T}>;       // [M, C]
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let m = ${WG_LINEAR};
  if (m >= p.M) { return; }
  let row = rows[m];
  if (row >= p.N) { return; }
  let width = p.C / ${vec4 ? 4 : 1}u;
  for (var c = lid; c < width; c += ${WG}u) { dst[row * width + c] += src[m * width + c]; }
}`,
  };
});

/**
 * dst[rows[m], :] += src[m, :] for m < M (dst [N, C], src [M, C]): the backward of a row
 * gather. Rows must be distinct (no atomics); rows >= N are skipped.
 */
export function scatterAddRowsF32(gpu: Gpu, dst: Tensor, rows: Tensor, src: Tensor, M: number, N: number, C: number): void {
  if (dst.dtype !== 'f32' || dst.size < N * C) throw new Error(`scatterAddRowsF32: dst ${dst} is not [${N}, ${C}] f32`);
  if (src.dtype !== 'f32' || src.size < M * C) throw new Error(`scatterAddRowsF32: src ${src} is not [${M}, ${C}] f32`);
  if (rows.dtype !== 'u32' || rows.size < M) throw new Error(`scatterAddRowsF32: rows ${rows} must be u32 [${M}]`);
  gpu.dispatch(scatterKernel(C % 4 === 0), [dst, rows, src], grid(M), new Params().u32(M).u32(C).u32(N));
}
