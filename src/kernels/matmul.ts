/**
 * Dense matrix multiply for the LoRA paths and the f32 LM head:
 *   C[M, N] (= or +=) alpha * op(A) op(B),  op(A) [M, K],  op(B) [K, N]
 * A is stored [M, K], or [K, M] with transA; B is stored [K, N], or [N, K] with transB
 * (so y = x W^T for an nn.Linear weight W [M, K] is `transB`). All row-major.
 * M, N, K here are the GEMM's own extents (C's rows, C's columns, the reduction), not
 * DIMENSIONS.md's letters: y[N_rows, M_out] = x W^T is matmul(y, x, W, N_rows, M_out, K).
 *
 * Each workgroup (16 x 16 threads) computes one BM x BN tile of C, staging BK-deep
 * slices of op(A) and op(B) in workgroup memory; each thread owns a (BM/16) x (BN/16)
 * micro-tile strided by 16 so neighbouring threads touch neighbouring addresses.
 * The tile shrinks to 16 or 32 along a small M or N (LoRA ranks 8..64).
 *
 * When the output has few tiles but K is long (LoRA weight gradients: [R, N] @ [N, C]
 * with N = thousands of tokens) the K range is split over extra workgroups that write
 * f32 partial sums; a second kernel adds them (and alpha, and C when accumulating).
 *
 * dtype 'f16' stores A, B and C as f16 (needs shader-f16) and accumulates in f32.
 */
import type { Gpu } from '../gpu/gpu';
import { Params } from '../gpu/params';
import type { Tensor } from '../gpu/tensor';
import { MAX_WORKGROUPS_PER_DIM, ceilDiv, enables, kernelCache } from './wgsl';

export interface MatmulOptions {
  transA?: boolean;
  transB?: boolean;
  alpha?: number;
  /** C += alpha op(A) op(B) instead of C = ... */
  accumulate?: boolean;
  dtype?: 'f32' | 'f16';
  /** Element offsets into each tensor (views of a larger buffer, e.g. a vocabulary slice of W). */
  aOffset?: number;
  bOffset?: number;
  cOffset?: number;
  /** Number of K splits; default chosen from the shape (1 = no split). */
  splitK?: number;
}

const THREADS_1D = 16; // threads per tile side: 16 x 16 = 256 per workgroup
const BK = 16;

interface TileShape {
  BM: number;
  BN: number;
}

function tileSide(extent: number): number {
  return extent <= 16 ? 16 : extent <= 32 ? 32 : 64;
}

const matmulKernel = kernelCache(
  (dtype: 'f32' | 'f16', transA: boolean, transB: boolean, accumulate: boolean, partial: boolean, tile: TileShape) => {
    const { BM, BN } = tile;
    const TM = BM / THREADS_1D;
    const TN = BN / THREADS_1D;
    const T = dtype;
    const outType = partial ? 'f32' : T;
    // op(A)[m, k] and op(B)[k, n] as storage indices.
    const aIndex = transA ? 'k * p.M + m' : 'm * p.K + k';
    const bIndex = transB ? 'n * p.K + k' : 'k * p.N + n';
    // Load order follows the stored layout so consecutive threads read consecutive words.
    const aLoad = transA
      ? `let mm = i % ${BM}u; let kk = i / ${BM}u;`
      : `let kk = i % ${BK}u; let mm = i / ${BK}u;`;
    const bLoad = transB
      ? `let kk = i % ${BK}u; let nn = i / ${BK}u;`
      : `let nn = i % ${BN}u; let kk = i / ${BN}u;`;
    let store: string;
    if (partial) {
      store = `out[(wid.z * p.M + m) * p.N + n] = acc[i * ${TN}u + j];`;
    } else {
      const prev = accumulate ? ` + f32(out[ci])` : '';
      store = `let ci = p.cOff + m * p.N + n; out[ci] = ${T}(p.alpha * acc[i * ${TN}u + j]${prev});`;
    }
    return {
      label: `matmul ${dtype}${transA ? ' tA' : ''}${transB ? ' tB' : ''}${accumulate ? ' acc' : ''}${partial ? ' splitK' : ''} ${BM}x${BN}`,
      code: /* wgsl */ `
${enables({ f16: dtype === 'f16' })}
struct Params { M: u32, N: u32, K: u32, alpha: f32, aOff: u32, bOff: u32, cOff: u32, kPerSplit: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<${outType}>; // C [M, N]${partial ? ' partials [S, M, N]' : ''}
@group(0) @binding(2) var<storage, read> a: array<${T}>;
@group(0) @binding(3) var<storage, read> b: array<${T}>;
var<workgroup> As: array<f32, ${BK * BM}>; // [BK][BM]
var<workgroup> Bs: array<f32, ${BK * BN}>; // [BK][BN]

@compute @workgroup_size(${THREADS_1D * THREADS_1D})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) lid: u32) {
  let m0 = wid.y * ${BM}u;
  let n0 = wid.x * ${BN}u;
  let kBegin = wid.z * p.kPerSplit;
  let kEnd = min(p.K, kBegin + p.kPerSplit);
  let tx = lid % ${THREADS_1D}u;
  let ty = lid / ${THREADS_1D}u;
  var acc: array<f32, ${TM * TN}>;
  for (var k0 = kBegin; k0 < kEnd; k0 += ${BK}u) {
    for (var i = lid; i < ${BM * BK}u; i += ${THREADS_1D * THREADS_1D}u) {
      ${aLoad}
      let m = m0 + mm;
      let k = k0 + kk;
      var v = 0.0;
      if (m < p.M && k < kEnd) { v = f32(a[p.aOff + ${aIndex}]); }
      As[kk * ${BM}u + mm] = v;
    }
    for (var i = lid; i < ${BN * BK}u; i += ${THREADS_1D * THREADS_1D}u) {
      ${bLoad}
      let n = n0 + nn;
      let k = k0 + kk;
      var v = 0.0;
      if (n < p.N && k < kEnd) { v = f32(b[p.bOff + ${bIndex}]); }
      Bs[kk * ${BN}u + nn] = v;
    }
    workgroupBarrier();
    for (var kk = 0u; kk < ${BK}u; kk++) {
      var av: array<f32, ${TM}>;
      var bv: array<f32, ${TN}>;
      for (var i = 0u; i < ${TM}u; i++) { av[i] = As[kk * ${BM}u + ty + i * ${THREADS_1D}u]; }
      for (var j = 0u; j < ${TN}u; j++) { bv[j] = Bs[kk * ${BN}u + tx + j * ${THREADS_1D}u]; }
      for (var i = 0u; i < ${TM}u; i++) {
        for (var j = 0u; j < ${TN}u; j++) { acc[i * ${TN}u + j] = fma(av[i], bv[j], acc[i * ${TN}u + j]); }
      }
    }
    workgroupBarrier();
  }
  for (var i = 0u; i < ${TM}u; i++) {
    let m = m0 + ty + i * ${THREADS_1D}u;
    if (m >= p.M) { continue; }
    for (var j = 0u; j < ${TN}u; j++) {
      let n = n0 + tx + j * ${THREADS_1D}u;
      if (n < p.N) { ${store} }
    }
  }
}`,
    };
  },
);

/** C = alpha * sum_s partial[s] (+ C): the second half of a split-K product. */
const splitReduceKernel = kernelCache((dtype: 'f32' | 'f16', accumulate: boolean) => ({
  label: `matmul_splitk_reduce ${dtype}${accumulate ? ' acc' : ''}`,
  code: /* wgsl */ `
${enables({ f16: dtype === 'f16' })}
struct Params { MN: u32, S: u32, alpha: f32, cOff: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> c: array<${dtype}>;   // [M, N]
@group(0) @binding(2) var<storage, read> partial: array<f32>;       // [S, M, N]
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3u, @builtin(num_workgroups) nwg: vec3u) {
  let i = gid.x + gid.y * nwg.x * 256u;
  if (i >= p.MN) { return; }
  var s = 0.0;
  for (var j = 0u; j < p.S; j++) { s += partial[j * p.MN + i]; }
  ${accumulate ? `c[p.cOff + i] = ${dtype}(p.alpha * s + f32(c[p.cOff + i]));` : `c[p.cOff + i] = ${dtype}(p.alpha * s);`}
}`,
}));

/** Target number of workgroups before K is split (enough to fill a desktop GPU). */
const SPLIT_TARGET_WORKGROUPS = 256;
/** Minimum K per split so the partial sums stay worth their traffic. */
const SPLIT_MIN_K = 256;

function defaultSplitK(tiles: number, K: number): number {
  if (tiles >= SPLIT_TARGET_WORKGROUPS / 2) return 1;
  return Math.max(1, Math.min(Math.ceil(SPLIT_TARGET_WORKGROUPS / tiles), Math.floor(K / SPLIT_MIN_K), 64));
}

function checkSize(t: Tensor, offset: number, needed: number, what: string): void {
  if (offset + needed > t.size) {
    throw new Error(`matmul: ${what} ${t} holds ${t.size} elements, needs ${offset + needed} (offset ${offset})`);
  }
}

export function matmul(gpu: Gpu, c: Tensor, a: Tensor, b: Tensor, M: number, N: number, K: number, opts: MatmulOptions = {}): void {
  const { transA = false, transB = false, alpha = 1, accumulate = false, dtype = 'f32' } = opts;
  const aOff = opts.aOffset ?? 0;
  const bOff = opts.bOffset ?? 0;
  const cOff = opts.cOffset ?? 0;
  if (M === 0 || N === 0) return;
  if (dtype === 'f16' && !gpu.caps.f16) throw new Error('matmul: f16 needs the shader-f16 feature, which this device lacks');
  for (const [t, name] of [[a, 'A'], [b, 'B'], [c, 'C']] as const) {
    if (t.dtype !== dtype) throw new Error(`matmul: ${name} is ${t}, expected ${dtype}`);
  }
  checkSize(a, aOff, M * K, 'A');
  checkSize(b, bOff, K * N, 'B');
  checkSize(c, cOff, M * N, 'C');
  if (K === 0) {
    // An empty sum: C = 0, or C unchanged when accumulating.
    if (!accumulate) gpu.clear(c, cOff * (dtype === 'f16' ? 2 : 4), M * N * (dtype === 'f16' ? 2 : 4));
    return;
  }
  const tile = { BM: tileSide(M), BN: tileSide(N) };
  const gx = ceilDiv(N, tile.BN);
  const gy = ceilDiv(M, tile.BM);
  if (gx > MAX_WORKGROUPS_PER_DIM || gy > MAX_WORKGROUPS_PER_DIM) {
    throw new Error(`matmul: [${M}, ${N}] needs ${gy} x ${gx} tiles, over the ${MAX_WORKGROUPS_PER_DIM} per-dimension limit`);
  }
  const requested = opts.splitK ?? defaultSplitK(gx * gy, K);
  const kPerSplit = ceilDiv(ceilDiv(K, Math.max(1, requested)), BK) * BK;
  const S = ceilDiv(K, kPerSplit);
  const params = new Params().u32(M).u32(N).u32(K).f32(alpha).u32(aOff).u32(bOff).u32(cOff).u32(kPerSplit);
  if (S === 1) {
    gpu.dispatch(matmulKernel(dtype, transA, transB, accumulate, false, tile), [c, a, b], [gx, gy, 1], params);
    return;
  }
  const partial = gpu.empty([S, M, N], 'f32', 'matmul.splitK');
  gpu.dispatch(matmulKernel(dtype, transA, transB, false, true, tile), [partial, a, b], [gx, gy, S], params);
  const MN = M * N;
  const wgs = ceilDiv(MN, 256);
  const wy = ceilDiv(wgs, MAX_WORKGROUPS_PER_DIM);
  gpu.dispatch(splitReduceKernel(dtype, accumulate), [c, partial], [ceilDiv(wgs, wy), wy], new Params().u32(MN).u32(S).f32(alpha).u32(cOff));
  partial.release();
}
