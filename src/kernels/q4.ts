/**
 * Matmuls through a frozen 4-bit weight (layout in q4-layout.ts):
 *
 *   q4Matmul          y[N, rows]  (= or +=)  x[N, K] @ W[rows, :]^T
 *   q4MatmulBackward  dx[N, K]    (= or +=)  dy[N, rows] @ W[rows, :]
 *
 * where rows = [rowStart, rowStart + rowCount) of W (default: all M rows), so a fused
 * LM head can produce one vocabulary chunk of logits at a time. There is no weight
 * gradient: the base weights are frozen.
 *
 * Two forward kernels, picked by N:
 *  - GEMV (N <= Q4_GEMV_MAX_N, decode): memory-bandwidth bound. A workgroup owns
 *    groups * rowsPerThread rows; `lanes` threads split a row's blocks, each thread
 *    streams one 16-byte block (vec4<u32>) of rowsPerThread rows per step, so the x
 *    values it loads are reused by every row and every one of the N inputs reuses
 *    each dequantized word. The lanes' partial sums are combined with subgroup
 *    shuffles where the device has subgroups (subgroup.ts laneGroupSumWgsl, any
 *    subgroup size), else by a tree in workgroup memory.
 *  - GEMM (prefill / training): 64 x 64 output tiles, 4 x 4 per thread, one 32-wide
 *    block of K per step with the x tile and the dequantized W tile in workgroup memory.
 * The backward is the same tiled GEMM with the reduction running over W's rows.
 *
 * A row range that spans shards becomes one dispatch per shard piece.
 */
import type { Gpu } from '../gpu/gpu';
import { Params } from '../gpu/params';
import type { Tensor } from '../gpu/tensor';
import type { Q4Shard, Q4Weight } from './q4-layout';
import { laneGroupSumWgsl, useSubgroups } from './subgroup';
import { WG_LINEAR, ceilDiv, enables, grid, kernelCache } from './wgsl';

/** Largest N served by the GEMV kernel; larger N use the tiled GEMM. */
export const Q4_GEMV_MAX_N = 8;

export interface Q4GemvTuning {
  /** threads that split one row's blocks (a power of two) */
  lanes: number;
  /** row groups per workgroup; the workgroup has lanes * groups threads */
  groups: number;
  /** rows each thread streams together, sharing its x loads */
  rowsPerThread: number;
}

export const Q4_GEMV_TUNING: Q4GemvTuning = { lanes: 32, groups: 2, rowsPerThread: 2 };

/**
 * Default GEMV tuning for `rows` output rows: more rows per thread cut the x traffic
 * through L1 (each x load serves rowsPerThread rows), fewer keep enough threads in
 * flight to saturate memory when the matrix is small.
 */
export function q4GemvTuningFor(rows: number): Q4GemvTuning {
  return { ...Q4_GEMV_TUNING, rowsPerThread: rows >= 32768 ? 4 : rows >= 2048 ? 2 : 1 };
}

export interface Q4MatmulOptions {
  /** first row of W (an output feature) to use; default 0 */
  rowStart?: number;
  /** number of rows of W to use; default M - rowStart */
  rowCount?: number;
  /** add into the output instead of overwriting it */
  accumulate?: boolean;
}

export interface Q4MatmulForwardOptions extends Q4MatmulOptions {
  /** force a kernel (tests and benchmarks); default picks by N */
  kernel?: 'gemv' | 'gemm';
  /** GEMV tuning knobs; default q4GemvTuningFor(rowCount) */
  tuning?: Q4GemvTuning;
  /** GEMV: combine the lanes' sums with subgroup shuffles (default: where the device has `subgroups`); false forces the workgroup-memory tree. */
  subgroups?: boolean;
}

/** A run of rows of W that lies inside one shard. */
export interface Q4Piece {
  shard: Q4Shard;
  /** first row of the piece, counted from the shard's first row */
  local: number;
  rows: number;
  /** first row of the piece, counted from the requested rowStart */
  offset: number;
}

export function q4Pieces(W: Q4Weight, rowStart: number, rowCount: number): Q4Piece[] {
  if (!Number.isInteger(rowStart) || !Number.isInteger(rowCount) || rowStart < 0 || rowCount < 0 || rowStart + rowCount > W.M) {
    throw new Error(`q4: rows [${rowStart}, ${rowStart + rowCount}) are outside the weight's ${W.M} rows`);
  }
  const pieces: Q4Piece[] = [];
  const end = rowStart + rowCount;
  for (const shard of W.shards) {
    const a = Math.max(rowStart, shard.rowStart);
    const b = Math.min(end, shard.rowStart + shard.rows);
    if (a < b) pieces.push({ shard, local: a - shard.rowStart, rows: b - a, offset: a - rowStart });
  }
  return pieces;
}

export function q4ShardBindings(shard: Q4Shard): Tensor[] {
  return shard.zeros ? [shard.qweight, shard.scales, shard.zeros] : [shard.qweight, shard.scales];
}

/**
 * WGSL for one shard's buffers, bound from `first` on (qweight, scales, then zero points
 * when present), and helpers to decode them. Block `blk` = row * nb + b (shard-local row).
 *
 * Nibbles become floats without an int-to-float conversion (slow on many GPUs): OR-ing
 * a nibble into the mantissa of 2^23 gives the f32 2^23 + q. q4Zero returns 2^23 + zero
 * likewise, so `q4Lo(u) - q4Zero(..)` is exactly q - zero.
 */
export function q4Wgsl(first: number, zeros: boolean): string {
  const zeroFn = zeros
    ? `@group(0) @binding(${first + 2}) var<storage, read> zp: array<u32>;     // [rows, ceil(nb/2)] bytes
fn q4Zero(row: u32, b: u32, nb: u32) -> f32 {
  let zi = row * ((nb + 1u) >> 1u) + (b >> 1u);
  return bitcast<f32>(((zp[zi >> 2u] >> ((zi & 3u) * 8u + (b & 1u) * 4u)) & 15u) | 0x4b000000u);
}`
    : `fn q4Zero(row: u32, b: u32, nb: u32) -> f32 { return 8388616.0; }  // 2^23 + 8`;
  return `
@group(0) @binding(${first}) var<storage, read> qw: array<vec4<u32>>;  // [rows, nb] blocks of 32 nibbles
@group(0) @binding(${first + 1}) var<storage, read> sc: array<u32>;       // [rows, nb] f16 pairs
${zeroFn}
fn q4Scale(blk: u32) -> f32 { return unpack2x16float(sc[blk >> 1u])[blk & 1u]; }
// 2^23 + nibbles 0-3 and 4-7 of one word (elements w*8 + 0..3 and w*8 + 4..7 of a block).
fn q4Lo(u: u32) -> vec4f { return bitcast<vec4f>(((vec4u(u) >> vec4u(0u, 4u, 8u, 12u)) & vec4u(15u)) | vec4u(0x4b000000u)); }
fn q4Hi(u: u32) -> vec4f { return bitcast<vec4f>(((vec4u(u) >> vec4u(16u, 20u, 24u, 28u)) & vec4u(15u)) | vec4u(0x4b000000u)); }`;
}

// ---- GEMV ----------------------------------------------------------------------

/**
 * GEMV for N (1..8) input rows. `aligned` (K % 32 == 0) reads x as vec4 with no masks;
 * otherwise x is read element-wise with the block tail masked to zero. `sg`: the lanes'
 * sums combine through subgroups instead of a tree in workgroup memory.
 */
export const q4GemvKernel = kernelCache((N: number, zeros: boolean, aligned: boolean, tuning: Q4GemvTuning, sg: boolean) => {
  const { lanes, groups, rowsPerThread: R } = tuning;
  const WG = lanes * groups;
  if (!(N >= 1 && N <= Q4_GEMV_MAX_N)) throw new Error(`q4 GEMV: N=${N} is outside 1..${Q4_GEMV_MAX_N}`);
  if (lanes < 1 || (lanes & (lanes - 1)) !== 0) throw new Error(`q4 GEMV: lanes=${lanes} is not a power of two`);
  if (WG > 256 || R < 1 || groups < 1) throw new Error(`q4 GEMV: bad tuning ${JSON.stringify(tuning)}`);
  if (R * N * WG * 4 > 16384) throw new Error(`q4 GEMV: rowsPerThread * N * workgroup = ${R * N * WG} floats exceeds 16 KiB`);
  const rs = [...Array(R).keys()];
  const ns = [...Array(N).keys()];
  const xDecl = aligned
    ? `@group(0) @binding(2) var<storage, read> x: array<vec4f>;   // [N, K/4]
fn xq(n: u32, k: u32) -> vec4f { return x[(n * p.K + k) >> 2u]; }`
    : `@group(0) @binding(2) var<storage, read> x: array<f32>;     // [N, K]
fn xs(n: u32, k: u32) -> f32 { return select(0.0, x[n * p.K + min(k, p.K - 1u)], k < p.K); }
fn xq(n: u32, k: u32) -> vec4f { return vec4f(xs(n, k), xs(n, k + 1u), xs(n, k + 2u), xs(n, k + 3u)); }`;
  const word = (w: number, c: string) => `
    {
${rs.map((r) => `      let l${r} = q4Lo(w${r}.${c}) - z${r};\n      let h${r} = q4Hi(w${r}.${c}) - z${r};`).join('\n')}
${ns
  .map(
    (n) => `      let xl${n} = xq(${n}u, k + ${w * 8}u);
      let xh${n} = xq(${n}u, k + ${w * 8 + 4}u);
${rs.map((r) => `      t${r}_${n} += dot(xl${n}, l${r}) + dot(xh${n}, h${r});`).join('\n')}`,
  )
  .join('\n')}
    }`;
  const sums = rs.flatMap((r) => ns.map((n) => `a${r}_${n}`)).join(', ');
  const reduce = sg
    ? `  var acc = array<f32, ${R * N}>(${sums});
  laneGroupSum(&acc, lane, lid, sgSize);`
    : `${rs.map((r) => ns.map((n) => `  red[${r * N + n}u * WG + lid] = a${r}_${n};`).join('\n')).join('\n')}
  workgroupBarrier();
  for (var s = LANES / 2u; s > 0u; s >>= 1u) {
    if (lane < s) {
      for (var i = 0u; i < RN; i++) { red[i * WG + lid] += red[i * WG + lid + s]; }
    }
    workgroupBarrier();
  }`;
  return {
    label: `q4_gemv N=${N}${zeros ? ' zeros' : ''}${aligned ? '' : ' unaligned'} lanes=${lanes} groups=${groups} R=${R}${sg ? ' subgroups' : ''}`,
    code: /* wgsl */ `${enables({ subgroups: sg })}
struct Params { rows: u32, K: u32, nb: u32, row0: u32, yStride: u32, yOffset: u32, accumulate: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;  // [N, yStride]
${xDecl}
${q4Wgsl(3, zeros)}
const LANES = ${lanes}u;
const WG = ${WG}u;
const RN = ${R * N}u;
${sg ? laneGroupSumWgsl(WG, lanes, R * N) : `var<workgroup> red: array<f32, ${R * N * WG}>;  // [R * N, WG]`}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u, @builtin(local_invocation_index) lid: u32${sg ? ', @builtin(subgroup_size) sgSize: u32' : ''}) {
  let lane = lid % LANES;
  let group = lid / LANES;
  let first = (${WG_LINEAR} * ${groups}u + group) * ${R}u;  // first piece row of this thread's rows
  let last = p.rows - 1u;
${rs.map((r) => `  let m${r} = p.row0 + min(first + ${r}u, last);`).join('\n')}
${rs.map((r) => ns.map((n) => `  var a${r}_${n} = 0.0;`).join('\n')).join('\n')}
  for (var b = lane; b < p.nb; b += LANES) {
    let k = b * 32u;
${rs
  .map(
    (r) => `    let blk${r} = m${r} * p.nb + b;
    let w${r} = qw[blk${r}];
    let s${r} = q4Scale(blk${r});
    let z${r} = q4Zero(m${r}, b, p.nb);`,
  )
  .join('\n')}
${rs.map((r) => ns.map((n) => `    var t${r}_${n} = 0.0;`).join('\n')).join('\n')}
${['x', 'y', 'z', 'w'].map((c, w) => word(w, c)).join('')}
${rs.map((r) => ns.map((n) => `    a${r}_${n} += s${r} * t${r}_${n};`).join('\n')).join('\n')}
  }
${reduce}
  for (var i = lane; i < RN; i += LANES) {
    let row = first + i / ${N}u;
    if (row < p.rows) {
      let o = (i % ${N}u) * p.yStride + p.yOffset + row;
      var v = ${sg ? 'acc[i]' : 'red[i * WG + group * LANES]'};
      if (p.accumulate != 0u) { v += y[o]; }
      y[o] = v;
    }
  }
}`,
  };
});

// ---- tiled GEMM (forward) ------------------------------------------------------

const TILE = 64;

export const q4GemmKernel = kernelCache((zeros: boolean) => ({
  label: `q4_gemm${zeros ? ' zeros' : ''}`,
  code: /* wgsl */ `
struct Params { N: u32, K: u32, nb: u32, rows: u32, row0: u32, yStride: u32, yOffset: u32, accumulate: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;  // [N, yStride]
@group(0) @binding(2) var<storage, read> x: array<f32>;        // [N, K]
${q4Wgsl(3, zeros)}
var<workgroup> xs: array<vec4f, 512>;  // [32 k][16]: x[n0 + 4j .. 4j+3, k]
var<workgroup> ws: array<vec4f, 512>;  // [32 k][16]: W[m0 + 4j .. 4j+3, k]

fn xAt(n: u32, k: u32) -> f32 {
  return select(0.0, x[min(n, p.N - 1u) * p.K + min(k, p.K - 1u)], n < p.N && k < p.K);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) lid: u32) {
  let tm = lid % 16u;
  let tn = lid / 16u;
  let n0 = wid.y * ${TILE}u;
  let m0 = wid.x * ${TILE}u;
  // This thread dequantizes word (lid % 4) of tile row (lid / 4) at every step.
  let wm = lid / 4u;
  let wrow = p.row0 + min(m0 + wm, p.rows - 1u);
  let ww = lid % 4u;
  var acc0 = vec4f(0.0);
  var acc1 = vec4f(0.0);
  var acc2 = vec4f(0.0);
  var acc3 = vec4f(0.0);
  for (var b = 0u; b < p.nb; b++) {
    for (var h = 0u; h < 2u; h++) {
      let i = lid + h * 256u;
      let g = i / 32u;
      let c = i % 32u;
      let n = n0 + g * 4u;
      let k = b * 32u + c;
      xs[c * 16u + g] = vec4f(xAt(n, k), xAt(n + 1u, k), xAt(n + 2u, k), xAt(n + 3u, k));
    }
    let blk = wrow * p.nb + b;
    let u = qw[blk][ww];
    let s = q4Scale(blk);
    let z = q4Zero(wrow, b, p.nb);
    let lo = (q4Lo(u) - z) * s;
    let hi = (q4Hi(u) - z) * s;
    let col = wm / 4u;
    let comp = wm % 4u;
    let kb = ww * 8u;
    ws[(kb + 0u) * 16u + col][comp] = lo.x;
    ws[(kb + 1u) * 16u + col][comp] = lo.y;
    ws[(kb + 2u) * 16u + col][comp] = lo.z;
    ws[(kb + 3u) * 16u + col][comp] = lo.w;
    ws[(kb + 4u) * 16u + col][comp] = hi.x;
    ws[(kb + 5u) * 16u + col][comp] = hi.y;
    ws[(kb + 6u) * 16u + col][comp] = hi.z;
    ws[(kb + 7u) * 16u + col][comp] = hi.w;
    workgroupBarrier();
    for (var kk = 0u; kk < 32u; kk++) {
      let a = xs[kk * 16u + tn];
      let w = ws[kk * 16u + tm];
      acc0 += a.x * w;
      acc1 += a.y * w;
      acc2 += a.z * w;
      acc3 += a.w * w;
    }
    workgroupBarrier();
  }
  var accs = array<vec4f, 4>(acc0, acc1, acc2, acc3);
  for (var i = 0u; i < 4u; i++) {
    let n = n0 + tn * 4u + i;
    for (var j = 0u; j < 4u; j++) {
      let m = m0 + tm * 4u + j;
      if (n < p.N && m < p.rows) {
        let o = n * p.yStride + p.yOffset + m;
        var v = accs[i][j];
        if (p.accumulate != 0u) { v += y[o]; }
        y[o] = v;
      }
    }
  }
}`,
}));

// ---- tiled GEMM (backward: dx = dy @ W) ----------------------------------------

export const q4GemmBackwardKernel = kernelCache((zeros: boolean) => ({
  label: `q4_gemm_backward${zeros ? ' zeros' : ''}`,
  code: /* wgsl */ `
struct Params { N: u32, K: u32, nb: u32, rows: u32, row0: u32, dyStride: u32, dyOffset: u32, accumulate: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> dx: array<f32>;  // [N, K]
@group(0) @binding(2) var<storage, read> dy: array<f32>;        // [N, dyStride]
${q4Wgsl(3, zeros)}
var<workgroup> ds: array<vec4f, 512>;  // [32 m][16]: dy[n0 + 4j .. 4j+3, m]
var<workgroup> ws: array<vec4f, 512>;  // [32 m][16]: W[m, k0 + 4j .. 4j+3]

fn dyAt(n: u32, m: u32) -> f32 {
  return select(0.0, dy[min(n, p.N - 1u) * p.dyStride + p.dyOffset + min(m, p.rows - 1u)], n < p.N && m < p.rows);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) lid: u32) {
  let tk = lid % 16u;
  let tn = lid / 16u;
  let n0 = wid.y * ${TILE}u;
  let k0 = wid.x * ${TILE}u;
  // This thread dequantizes word (lid % 4) of block (lid / 4) % 2 of tile row lid / 8.
  let wm = lid / 8u;
  let wb = wid.x * 2u + (lid / 4u) % 2u;
  let ww = lid % 4u;
  let wslot = wm * 16u + ((lid / 4u) % 2u) * 8u + ww * 2u;
  var acc0 = vec4f(0.0);
  var acc1 = vec4f(0.0);
  var acc2 = vec4f(0.0);
  var acc3 = vec4f(0.0);
  for (var m0 = 0u; m0 < p.rows; m0 += 32u) {
    for (var h = 0u; h < 2u; h++) {
      let i = lid + h * 256u;
      let g = i / 32u;
      let c = i % 32u;
      let n = n0 + g * 4u;
      let m = m0 + c;
      ds[c * 16u + g] = vec4f(dyAt(n, m), dyAt(n + 1u, m), dyAt(n + 2u, m), dyAt(n + 3u, m));
    }
    let valid = m0 + wm < p.rows && wb < p.nb;
    let row = p.row0 + min(m0 + wm, p.rows - 1u);
    let b = min(wb, p.nb - 1u);
    let blk = row * p.nb + b;
    let u = qw[blk][ww];
    let s = q4Scale(blk);
    let z = q4Zero(row, b, p.nb);
    ws[wslot] = select(vec4f(0.0), (q4Lo(u) - z) * s, valid);
    ws[wslot + 1u] = select(vec4f(0.0), (q4Hi(u) - z) * s, valid);
    workgroupBarrier();
    for (var mm = 0u; mm < 32u; mm++) {
      let d = ds[mm * 16u + tn];
      let w = ws[mm * 16u + tk];
      acc0 += d.x * w;
      acc1 += d.y * w;
      acc2 += d.z * w;
      acc3 += d.w * w;
    }
    workgroupBarrier();
  }
  var accs = array<vec4f, 4>(acc0, acc1, acc2, acc3);
  for (var i = 0u; i < 4u; i++) {
    let n = n0 + tn * 4u + i;
    for (var j = 0u; j < 4u; j++) {
      let k = k0 + tk * 4u + j;
      if (n < p.N && k < p.K) {
        let o = n * p.K + k;
        var v = accs[i][j];
        if (p.accumulate != 0u) { v += dx[o]; }
        dx[o] = v;
      }
    }
  }
}`,
}));

// ---- entry points ----------------------------------------------------------------

function checkSize(t: Tensor, elements: number, what: string): void {
  if (t.size < elements) throw new Error(`q4: ${what} ${t} has fewer than ${elements} elements`);
}

/** y[N, rowCount] (= or +=) x[N, K] @ W[rowStart : rowStart + rowCount, :]^T */
export function q4Matmul(gpu: Gpu, y: Tensor, x: Tensor, W: Q4Weight, N: number, opts: Q4MatmulForwardOptions = {}): void {
  const rowStart = opts.rowStart ?? 0;
  const rowCount = opts.rowCount ?? W.M - rowStart;
  const pieces = q4Pieces(W, rowStart, rowCount);
  if (N === 0 || rowCount === 0) return;
  checkSize(x, N * W.K, 'x');
  checkSize(y, N * rowCount, 'y');
  const kernel = opts.kernel ?? (N <= Q4_GEMV_MAX_N ? 'gemv' : 'gemm');
  const zeros = W.shards[0]!.zeros !== null;
  const acc = opts.accumulate ? 1 : 0;
  if (kernel === 'gemv') {
    const sg = useSubgroups(gpu, opts.subgroups, 'q4Matmul');
    const tuning = opts.tuning ?? q4GemvTuningFor(rowCount);
    const rowsPerGroup = tuning.groups * tuning.rowsPerThread;
    const aligned = W.K % 32 === 0;
    if (N > Q4_GEMV_MAX_N) throw new Error(`q4Matmul: the GEMV kernel serves N <= ${Q4_GEMV_MAX_N}, got N=${N}`);
    for (const pc of pieces) {
      const params = new Params().u32(pc.rows).u32(W.K).u32(W.nb).u32(pc.local).u32(rowCount).u32(pc.offset).u32(acc);
      gpu.dispatch(q4GemvKernel(N, zeros, aligned, tuning, sg), [y, x, ...q4ShardBindings(pc.shard)], grid(ceilDiv(pc.rows, rowsPerGroup)), params);
    }
    return;
  }
  for (const pc of pieces) {
    const params = new Params().u32(N).u32(W.K).u32(W.nb).u32(pc.rows).u32(pc.local).u32(rowCount).u32(pc.offset).u32(acc);
    gpu.dispatch(q4GemmKernel(zeros), [y, x, ...q4ShardBindings(pc.shard)], [ceilDiv(pc.rows, TILE), ceilDiv(N, TILE)], params);
  }
}

/** dx[N, K] (= or +=) dy[N, rowCount] @ W[rowStart : rowStart + rowCount, :] */
export function q4MatmulBackward(gpu: Gpu, dx: Tensor, dy: Tensor, W: Q4Weight, N: number, opts: Q4MatmulOptions = {}): void {
  const rowStart = opts.rowStart ?? 0;
  const rowCount = opts.rowCount ?? W.M - rowStart;
  const pieces = q4Pieces(W, rowStart, rowCount);
  if (N === 0) return;
  checkSize(dx, N * W.K, 'dx');
  checkSize(dy, N * rowCount, 'dy');
  if (pieces.length === 0) {
    if (!opts.accumulate) gpu.clear(dx, 0, N * W.K * 4);
    return;
  }
  const zeros = W.shards[0]!.zeros !== null;
  pieces.forEach((pc, i) => {
    // Pieces after the first add their share of the sum over rows.
    const acc = opts.accumulate || i > 0 ? 1 : 0;
    const params = new Params().u32(N).u32(W.K).u32(W.nb).u32(pc.rows).u32(pc.local).u32(rowCount).u32(pc.offset).u32(acc);
    gpu.dispatch(q4GemmBackwardKernel(zeros), [dx, dy, ...q4ShardBindings(pc.shard)], [ceilDiv(W.K, TILE), ceilDiv(N, TILE)], params);
  });
}
