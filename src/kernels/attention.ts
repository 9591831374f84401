/**
 * Causal grouped-query attention in f32, scale 1/sqrt(D). Query head h reads kv head
 * h / G with G = H / HK. Layouts (row-major):
 *   q, out, dout, dq [B, T, H, D]    k, v, dk, dv [B, S, HK, D]    lse, delta [B, H, T]
 * The T queries sit at positions S-T .. S-1, so query t sees keys 0 .. S-T+t.
 *
 * Forward and backward are tiled flash-attention kernels; no T x S buffer exists.
 * A workgroup owns a block of query rows of one kv head: rows are (t, g) pairs in
 * t-major order, so the G heads that share a K/V tile are served by one load of it.
 * Each row is handled by TPR threads that each hold D/TPR of its q and o in registers
 * (vec4 slices interleaved so neighbouring threads read neighbouring words); partial
 * dot products are summed through workgroup memory. K/V tiles are staged in
 * workgroup memory and the softmax is online (running max and sum per row).
 *
 * Backward (FlashAttention-2 split, no float atomics in WGSL): a dq kernel per query
 * block, which also writes delta = rowsum(dout * out), then a dk/dv kernel per key
 * block that walks every query row (all G heads) able to see its keys.
 *
 * Decode (one new query per row, KV cache, optional shared prefix) is split-S
 * (flash-decoding): each workgroup scores one chunk of keys for the G heads of one kv
 * head and writes an unnormalised partial output with its max and sum; a combine
 * kernel merges the chunks of each (row, head). Chunks of the shared prefix serve
 * several batch rows at once, so the prefix is read once per group of rows rather
 * than once per row.
 *
 * Tile sizes are generator parameters; the defaults keep workgroup memory within the
 * 16 KiB browsers guarantee.
 */
import type { Binding, Gpu } from '../gpu/gpu';
import { Params } from '../gpu/params';
import type { Tensor } from '../gpu/tensor';
import { WG_LINEAR, ceilDiv, enables, grid, kernelCache } from './wgsl';

/** Element type of a KV cache (and shared prefix): f16 needs shader-f16; scores, softmax and sums stay f32. */
export type KvDtype = 'f32' | 'f16';

/** The element type of a K/V binding: a Tensor says it; a bare buffer range is `fallback`. */
function kvDtypeOf(b: Binding, fallback: KvDtype): KvDtype {
  const d = 'dtype' in b ? b.dtype : fallback;
  if (d !== 'f32' && d !== 'f16') throw new Error(`attention: K/V must be f32 or f16, got ${d}`);
  return d;
}

function checkKvDtype(gpu: Gpu, d: KvDtype, what: string): void {
  if (d === 'f16' && !gpu.caps.f16) throw new Error(`${what}: an f16 KV cache needs the shader-f16 feature, which this device lacks; use an f32 cache`);
}

/** Browsers' default maxComputeWorkgroupStorageSize; defaults are chosen to fit it. */
export const PORTABLE_WORKGROUP_STORAGE = 16384;

const NEG = '-3.0e38';

/**
 * rows: query rows (t, g) per workgroup (dk/dv kernel: keys per workgroup);
 * cols: keys per staged tile (dk/dv kernel: query rows per staged tile);
 * tpr: threads per row, dividing D/4.
 */
export interface AttentionTiles {
  rows: number;
  cols: number;
  tpr: number;
}

export type AttentionKernelKind = 'forward' | 'dq' | 'dkdv';

/** Workgroup-memory bytes a kernel uses with these tiles. */
export function attentionWorkgroupBytes(kind: AttentionKernelKind, D: number, t: AttentionTiles): number {
  // Per-thread partial dot products, one padded row of cols x tpr per tile row.
  const partials = t.tpr > 1 ? t.rows * (t.cols * t.tpr + 1) * 4 : 0;
  const tiles = 2 * t.cols * D * 4;
  switch (kind) {
    case 'forward':
      return tiles + partials;
    case 'dq':
      return tiles + 2 * partials;
    case 'dkdv':
      return tiles + 3 * t.cols * 4 + 2 * partials;
  }
}

/**
 * Default tiles: about 32 floats of each per-row register vector per thread (TPR =
 * D/32 for forward and dq, D/16 for dk/dv, which holds four vectors), 128 threads, and
 * the widest key tile that fits the workgroup-memory limit, up to 16 for the forward and
 * 8 for the backward kernels. Longer unrolls only slow compilation: on lavapipe a cold
 * compile of the D=16 backward pair takes 115 s at 16, 36 s at 8 and 10 s at 4, while
 * their run time is within 10% from 4 to 16 (T = 14 and 256).
 */
export function defaultAttentionTiles(kind: AttentionKernelKind, D: number, limit = PORTABLE_WORKGROUP_STORAGE): AttentionTiles {
  checkHeadDim(D);
  const D4 = D / 4;
  let tpr = Math.min(D4, Math.max(1, Math.floor(kind === 'dkdv' ? D / 16 : D / 32)));
  while (D4 % tpr !== 0) tpr--;
  for (let rows = Math.floor(128 / tpr); rows >= 1; rows = Math.floor(rows / 2)) {
    for (const cols of kind === 'forward' ? [16, 8, 4, 2, 1] : [8, 4, 2, 1]) {
      const t = { rows, cols, tpr };
      if (attentionWorkgroupBytes(kind, D, t) <= limit) return t;
    }
  }
  throw new Error(`attention: no ${kind} tiling of head dim ${D} fits ${limit} bytes of workgroup memory`);
}

function checkHeadDim(D: number): void {
  if (!(D > 0) || D % 4 !== 0) throw new Error(`attention: head dim ${D} must be a positive multiple of 4`);
}

function checkTiles(gpu: Gpu, kind: AttentionKernelKind, D: number, t: AttentionTiles): void {
  const D4 = D / 4;
  if (![t.rows, t.cols, t.tpr].every((x) => Number.isInteger(x) && x >= 1)) throw new Error(`attention ${kind}: bad tiles ${JSON.stringify(t)}`);
  if (D4 % t.tpr !== 0) throw new Error(`attention ${kind}: tpr ${t.tpr} must divide D/4 = ${D4}`);
  const threads = t.rows * t.tpr;
  if (threads > gpu.caps.maxComputeInvocationsPerWorkgroup) {
    throw new Error(`attention ${kind}: ${threads} threads per workgroup exceed the device's ${gpu.caps.maxComputeInvocationsPerWorkgroup}`);
  }
  const bytes = attentionWorkgroupBytes(kind, D, t);
  if (bytes > gpu.caps.maxComputeWorkgroupStorageSize) {
    throw new Error(`attention ${kind}: tiles ${JSON.stringify(t)} need ${bytes} bytes of workgroup memory, device allows ${gpu.caps.maxComputeWorkgroupStorageSize}`);
  }
}

function checkGroups(H: number, HK: number): number {
  if (!(HK > 0) || H % HK !== 0) throw new Error(`attention: H = ${H} is not a multiple of HK = ${HK}`);
  return H / HK;
}

const range = (n: number): number[] => Array.from({ length: n }, (_, i) => i);
const each = (n: number, f: (i: number) => string, sep = '\n  '): string => range(n).map(f).join(sep);
/** Sum of n terms as one expression. */
const sum = (n: number, f: (i: number) => string): string => range(n).map(f).join(' + ');

/**
 * Shared prologue of the forward and dq kernels: the row this thread serves, its
 * position, and the exclusive key bound of the whole block (the causal frontier of its
 * last row).
 */
function queryBlockPrologue(BR: number, TPR: number, D4: number): string {
  return /* wgsl */ `
  let G = p.H / p.HK;
  let hk = wid.y;
  let b = wid.z;
  let rows = p.T * G;
  let r = lid / ${TPR}u;
  let j = lid % ${TPR}u;
  let row = wid.x * ${BR}u + r;
  let live = row < rows;
  let rr = min(row, rows - 1u);
  let t = rr / G;
  let h = hk * G + rr % G;
  let past = p.S - p.T;
  let qpos = past + t;
  let lastRow = min(wid.x * ${BR}u + ${BR}u, rows) - 1u;
  let kEnd = past + lastRow / G + 1u;
  let qb = ((b * p.T + t) * p.H + h) * ${D4}u + j;
  let kvBase = (b * p.S * p.HK + hk) * ${D4}u;
  let kvStride = p.HK * ${D4}u;`;
}

/** Stages keys k0 .. k0+BC-1 of K and V (zeros past S) into kt/vt. */
function loadKvTile(BC: number, D4: number, WG: number): string {
  return /* wgsl */ `
    for (var i = lid; i < ${BC * D4}u; i += ${WG}u) {
      let key = k0 + i / ${D4}u;
      var kk = vec4f(0.0);
      var vv = vec4f(0.0);
      if (key < p.S) {
        let a = kvBase + key * kvStride + i % ${D4}u;
        kk = k[a];
        vv = v[a];
      }
      kt[i] = kk;
      vt[i] = vv;
    }
    workgroupBarrier();`;
}

const forwardKernel = kernelCache((D: number, tiles: AttentionTiles) => {
  const { rows: BR, cols: BC, tpr: TPR } = tiles;
  const D4 = D / 4;
  const NV = D4 / TPR;
  const WG = BR * TPR;
  const PS = BC * TPR + 1;
  const slice = (c: number, m: number) => `${c * D4 + m * TPR}u + j`;
  const scores =
    TPR === 1
      ? each(BC, (c) => `var s${c} = ${sum(NV, (m) => `dot(q${m}, kt[${slice(c, m)}])`)};`)
      : `${each(BC, (c) => `part[r * ${PS}u + ${c * TPR}u + j] = ${sum(NV, (m) => `dot(q${m}, kt[${slice(c, m)}])`)};`)}
    workgroupBarrier();
    ${each(BC, (c) => `var s${c} = ${sum(TPR, (jj) => `part[r * ${PS}u + ${c * TPR + jj}u]`)};`, '\n    ')}`;
  return {
    label: `attention_forward D=${D} rows=${BR} cols=${BC} tpr=${TPR}`,
    code: /* wgsl */ `
struct Params { T: u32, S: u32, H: u32, HK: u32, scale: f32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<vec4f>;  // [B, T, H, D]
@group(0) @binding(2) var<storage, read_write> lse: array<f32>;    // [B, H, T]
@group(0) @binding(3) var<storage, read> q: array<vec4f>;          // [B, T, H, D]
@group(0) @binding(4) var<storage, read> k: array<vec4f>;          // [B, S, HK, D]
@group(0) @binding(5) var<storage, read> v: array<vec4f>;          // [B, S, HK, D]
var<workgroup> kt: array<vec4f, ${BC * D4}>;
var<workgroup> vt: array<vec4f, ${BC * D4}>;
${TPR > 1 ? `var<workgroup> part: array<f32, ${BR * PS}>;  // [row][key][thread], rows padded against bank conflicts` : ''}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) lid: u32) {
  ${queryBlockPrologue(BR, TPR, D4)}
  ${each(NV, (m) => `let q${m} = q[qb + ${m * TPR}u] * p.scale;`)}
  ${each(NV, (m) => `var o${m} = vec4f(0.0);`)}
  var mx = ${NEG};
  var l = 0.0;
  for (var k0 = 0u; k0 < kEnd; k0 += ${BC}u) {
    ${loadKvTile(BC, D4, WG)}
    ${scores}
    ${each(BC, (c) => `s${c} = select(s${c}, ${NEG}, k0 + ${c}u > qpos);`, '\n    ')}
    let mNew = max(mx, ${range(BC).reduce((acc, c) => (acc ? `max(${acc}, s${c})` : `s${c}`), '')});
    let alpha = exp(mx - mNew);
    ${each(BC, (c) => `let p${c} = exp(s${c} - mNew);`, '\n    ')}
    l = l * alpha + ${sum(BC, (c) => `p${c}`)};
    ${each(NV, (m) => `o${m} = o${m} * alpha + ${sum(BC, (c) => `p${c} * vt[${slice(c, m)}]`)};`, '\n    ')}
    mx = mNew;
    workgroupBarrier();
  }
  if (live) {
    let inv = 1.0 / l;
    ${each(NV, (m) => `out[qb + ${m * TPR}u] = o${m} * inv;`, '\n    ')}
    if (j == 0u) { lse[(b * p.H + h) * p.T + t] = mx + log(l); }
  }
}`,
  };
});

const dqKernel = kernelCache((D: number, tiles: AttentionTiles) => {
  const { rows: BR, cols: BC, tpr: TPR } = tiles;
  const D4 = D / 4;
  const NV = D4 / TPR;
  const WG = BR * TPR;
  const PS = BC * TPR + 1;
  const slice = (c: number, m: number) => `${c * D4 + m * TPR}u + j`;
  const dots = (a: string, tile: string, c: number) => sum(NV, (m) => `dot(${a}${m}, ${tile}[${slice(c, m)}])`);
  const deltaCalc =
    TPR === 1
      ? `let dl = ${sum(NV, (m) => `dot(do${m}, out[qb + ${m}u])`)};`
      : `ps[r * ${PS}u + j] = ${sum(NV, (m) => `dot(do${m}, out[qb + ${m * TPR}u])`)};
  workgroupBarrier();
  let dl = ${sum(TPR, (jj) => `ps[r * ${PS}u + ${jj}u]`)};
  workgroupBarrier();`;
  const scores =
    TPR === 1
      ? `${each(BC, (c) => `let s${c} = ${dots('q', 'kt', c)};`, '\n    ')}
    ${each(BC, (c) => `let dp${c} = ${dots('do', 'vt', c)};`, '\n    ')}`
      : `${each(BC, (c) => `ps[r * ${PS}u + ${c * TPR}u + j] = ${dots('q', 'kt', c)};`, '\n    ')}
    ${each(BC, (c) => `pd[r * ${PS}u + ${c * TPR}u + j] = ${dots('do', 'vt', c)};`, '\n    ')}
    workgroupBarrier();
    ${each(BC, (c) => `let s${c} = ${sum(TPR, (jj) => `ps[r * ${PS}u + ${c * TPR + jj}u]`)};`, '\n    ')}
    ${each(BC, (c) => `let dp${c} = ${sum(TPR, (jj) => `pd[r * ${PS}u + ${c * TPR + jj}u]`)};`, '\n    ')}`;
  return {
    label: `attention_backward_dq D=${D} rows=${BR} cols=${BC} tpr=${TPR}`,
    code: /* wgsl */ `
struct Params { T: u32, S: u32, H: u32, HK: u32, scale: f32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> dq: array<vec4f>;    // [B, T, H, D]
@group(0) @binding(2) var<storage, read_write> delta: array<f32>;   // [B, H, T] rowsum(dout * out)
@group(0) @binding(3) var<storage, read> dout: array<vec4f>;        // [B, T, H, D]
@group(0) @binding(4) var<storage, read> out: array<vec4f>;         // [B, T, H, D]
@group(0) @binding(5) var<storage, read> lse: array<f32>;           // [B, H, T]
@group(0) @binding(6) var<storage, read> q: array<vec4f>;           // [B, T, H, D]
@group(0) @binding(7) var<storage, read> k: array<vec4f>;           // [B, S, HK, D]
@group(0) @binding(8) var<storage, read> v: array<vec4f>;           // [B, S, HK, D]
var<workgroup> kt: array<vec4f, ${BC * D4}>;
var<workgroup> vt: array<vec4f, ${BC * D4}>;
${TPR > 1 ? `var<workgroup> ps: array<f32, ${BR * PS}>;\nvar<workgroup> pd: array<f32, ${BR * PS}>;` : ''}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) lid: u32) {
  ${queryBlockPrologue(BR, TPR, D4)}
  ${each(NV, (m) => `let q${m} = q[qb + ${m * TPR}u];`)}
  ${each(NV, (m) => `let do${m} = dout[qb + ${m * TPR}u];`)}
  ${each(NV, (m) => `var dq${m} = vec4f(0.0);`)}
  ${deltaCalc}
  let stat = (b * p.H + h) * p.T + t;
  let lrow = lse[stat];
  if (live && j == 0u) { delta[stat] = dl; }
  for (var k0 = 0u; k0 < kEnd; k0 += ${BC}u) {
    ${loadKvTile(BC, D4, WG)}
    ${scores}
    ${each(BC, (c) => `let ds${c} = select(0.0, exp(s${c} * p.scale - lrow), k0 + ${c}u <= qpos) * (dp${c} - dl);`, '\n    ')}
    ${each(NV, (m) => `dq${m} += ${sum(BC, (c) => `ds${c} * kt[${slice(c, m)}]`)};`, '\n    ')}
    workgroupBarrier();
  }
  if (live) {
    ${each(NV, (m) => `dq[qb + ${m * TPR}u] = dq${m} * p.scale;`, '\n    ')}
  }
}`,
  };
});

const dkdvKernel = kernelCache((D: number, tiles: AttentionTiles) => {
  const { rows: BK, cols: BQ, tpr: TPR } = tiles;
  const D4 = D / 4;
  const NV = D4 / TPR;
  const WG = BK * TPR;
  const PS = BQ * TPR + 1;
  const slice = (r: number, m: number) => `${r * D4 + m * TPR}u + j`;
  const dots = (a: string, tile: string, r: number) => sum(NV, (m) => `dot(${a}${m}, ${tile}[${slice(r, m)}])`);
  const scores =
    TPR === 1
      ? `${each(BQ, (r) => `let s${r} = ${dots('k', 'qt', r)};`, '\n    ')}
    ${each(BQ, (r) => `let dp${r} = ${dots('v', 'gt', r)};`, '\n    ')}`
      : `${each(BQ, (r) => `ps[c * ${PS}u + ${r * TPR}u + j] = ${dots('k', 'qt', r)};`, '\n    ')}
    ${each(BQ, (r) => `pd[c * ${PS}u + ${r * TPR}u + j] = ${dots('v', 'gt', r)};`, '\n    ')}
    workgroupBarrier();
    ${each(BQ, (r) => `let s${r} = ${sum(TPR, (jj) => `ps[c * ${PS}u + ${r * TPR + jj}u]`)};`, '\n    ')}
    ${each(BQ, (r) => `let dp${r} = ${sum(TPR, (jj) => `pd[c * ${PS}u + ${r * TPR + jj}u]`)};`, '\n    ')}`;
  return {
    label: `attention_backward_dkdv D=${D} keys=${BK} rows=${BQ} tpr=${TPR}`,
    code: /* wgsl */ `
struct Params { T: u32, S: u32, H: u32, HK: u32, scale: f32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> dk: array<vec4f>;    // [B, S, HK, D]
@group(0) @binding(2) var<storage, read_write> dv: array<vec4f>;    // [B, S, HK, D]
@group(0) @binding(3) var<storage, read> dout: array<vec4f>;        // [B, T, H, D]
@group(0) @binding(4) var<storage, read> lse: array<f32>;           // [B, H, T]
@group(0) @binding(5) var<storage, read> delta: array<f32>;         // [B, H, T]
@group(0) @binding(6) var<storage, read> q: array<vec4f>;           // [B, T, H, D]
@group(0) @binding(7) var<storage, read> k: array<vec4f>;           // [B, S, HK, D]
@group(0) @binding(8) var<storage, read> v: array<vec4f>;           // [B, S, HK, D]
var<workgroup> qt: array<vec4f, ${BQ * D4}>;
var<workgroup> gt: array<vec4f, ${BQ * D4}>;  // dout rows
var<workgroup> lseT: array<f32, ${BQ}>;
var<workgroup> deltaT: array<f32, ${BQ}>;
var<workgroup> limT: array<u32, ${BQ}>;  // keys < limT[r] are visible to row r (0 past the last row)
${TPR > 1 ? `var<workgroup> ps: array<f32, ${BK * PS}>;\nvar<workgroup> pd: array<f32, ${BK * PS}>;` : ''}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) lid: u32) {
  let G = p.H / p.HK;
  let hk = wid.y;
  let b = wid.z;
  let rows = p.T * G;
  let c = lid / ${TPR}u;
  let j = lid % ${TPR}u;
  let kStart = wid.x * ${BK}u;
  let key = kStart + c;
  let live = key < p.S;
  let kb = ((b * p.S + min(key, p.S - 1u)) * p.HK + hk) * ${D4}u + j;
  ${each(NV, (m) => `let k${m} = k[kb + ${m * TPR}u];`)}
  ${each(NV, (m) => `let v${m} = v[kb + ${m * TPR}u];`)}
  ${each(NV, (m) => `var dk${m} = vec4f(0.0);`)}
  ${each(NV, (m) => `var dv${m} = vec4f(0.0);`)}
  let past = p.S - p.T;
  // Queries before position kStart cannot see any key of this block.
  let firstRow = select(0u, (kStart - past) * G, kStart > past);
  for (var r0 = firstRow; r0 < rows; r0 += ${BQ}u) {
    for (var i = lid; i < ${BQ * D4}u; i += ${WG}u) {
      let rq = r0 + i / ${D4}u;
      var qq = vec4f(0.0);
      var dd = vec4f(0.0);
      if (rq < rows) {
        let a = ((b * p.T + rq / G) * p.H + hk * G + rq % G) * ${D4}u + i % ${D4}u;
        qq = q[a];
        dd = dout[a];
      }
      qt[i] = qq;
      gt[i] = dd;
    }
    if (lid < ${BQ}u) {
      let rq = r0 + lid;
      var ls = 0.0;
      var dl = 0.0;
      var lim = 0u;
      if (rq < rows) {
        let s = (b * p.H + hk * G + rq % G) * p.T + rq / G;
        ls = lse[s];
        dl = delta[s];
        lim = past + rq / G + 1u;
      }
      lseT[lid] = ls;
      deltaT[lid] = dl;
      limT[lid] = lim;
    }
    workgroupBarrier();
    ${scores}
    ${each(
      BQ,
      (r) => `let p${r} = select(0.0, exp(s${r} * p.scale - lseT[${r}]), key < limT[${r}]);
    let ds${r} = p${r} * (dp${r} - deltaT[${r}]);`,
      '\n    ',
    )}
    ${each(NV, (m) => `dv${m} += ${sum(BQ, (r) => `p${r} * gt[${slice(r, m)}]`)};`, '\n    ')}
    ${each(NV, (m) => `dk${m} += ${sum(BQ, (r) => `ds${r} * qt[${slice(r, m)}]`)};`, '\n    ')}
    workgroupBarrier();
  }
  if (live) {
    ${each(NV, (m) => `dk[kb + ${m * TPR}u] = dk${m} * p.scale;`, '\n    ')}
    ${each(NV, (m) => `dv[kb + ${m * TPR}u] = dv${m};`, '\n    ')}
  }
}`,
  };
});

export interface AttentionOptions {
  /** Tile overrides; unspecified kernels use defaultAttentionTiles. */
  forward?: AttentionTiles;
  dq?: AttentionTiles;
  dkdv?: AttentionTiles;
}

/** Rows per workgroup for short sequences (one more compiled variant per kernel, not one per length). */
const SHORT_ROWS = 32;

/**
 * The tiles a kernel runs with: the override, or the default, with its rows cut to
 * SHORT_ROWS when `n` (the query rows T x G, or for dk/dv the keys S) fits in that, so
 * a short sequence does not leave most of each workgroup idle. Rows are independent,
 * so the results do not depend on how many share a workgroup.
 */
function tilesFor(gpu: Gpu, kind: AttentionKernelKind, D: number, opts: AttentionOptions, n: number): AttentionTiles {
  let t = opts[kind];
  if (!t) {
    const d = defaultAttentionTiles(kind, D, Math.min(PORTABLE_WORKGROUP_STORAGE, gpu.caps.maxComputeWorkgroupStorageSize));
    t = n <= SHORT_ROWS && d.rows > SHORT_ROWS ? { ...d, rows: SHORT_ROWS } : d;
  }
  checkTiles(gpu, kind, D, t);
  return t;
}

function attentionParams(T: number, S: number, H: number, HK: number, D: number): Params {
  if (!(T >= 1) || S < T) throw new Error(`attention: need 1 <= T <= S, got T = ${T}, S = ${S}`);
  return new Params().u32(T).u32(S).u32(H).u32(HK).f32(1 / Math.sqrt(D));
}

/**
 * out [B, T, H, D] = softmax(q k^T / sqrt(D), causal) v; saves lse [B, H, T] (natural
 * log of each query row's softmax denominator, scaled scores) for the backward.
 */
export function attentionForward(
  gpu: Gpu,
  out: Tensor,
  lse: Tensor,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  B: number,
  T: number,
  S: number,
  H: number,
  HK: number,
  D: number,
  opts: AttentionOptions = {},
): void {
  checkHeadDim(D);
  const G = checkGroups(H, HK);
  const t = tilesFor(gpu, 'forward', D, opts, T * G);
  gpu.dispatch(forwardKernel(D, t), [out, lse, q, k, v], [ceilDiv(T * G, t.rows), HK, B], attentionParams(T, S, H, HK, D));
}

/**
 * dq [B, T, H, D], dk and dv [B, S, HK, D] (all written; dk/dv summed over the G query
 * heads of each kv head) from dout, the forward's out and lse, and q, k, v.
 */
export function attentionBackward(
  gpu: Gpu,
  dq: Tensor,
  dk: Tensor,
  dv: Tensor,
  dout: Tensor,
  out: Tensor,
  lse: Tensor,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  B: number,
  T: number,
  S: number,
  H: number,
  HK: number,
  D: number,
  opts: AttentionOptions = {},
): void {
  checkHeadDim(D);
  const G = checkGroups(H, HK);
  const tq = tilesFor(gpu, 'dq', D, opts, T * G);
  const tkv = tilesFor(gpu, 'dkdv', D, opts, S);
  const params = attentionParams(T, S, H, HK, D);
  const delta = gpu.empty([B, H, T], 'f32', 'attention-delta');
  gpu.dispatch(dqKernel(D, tq), [dq, delta, dout, out, lse, q, k, v], [ceilDiv(T * G, tq.rows), HK, B], params);
  gpu.dispatch(dkdvKernel(D, tkv), [dk, dv, dout, lse, delta, q, k, v], [ceilDiv(S, tkv.rows), HK, B], params);
  // Safe to recycle now: later users of this buffer are recorded (or written) after these dispatches.
  delta.release();
}

// ---- decode with a KV cache ---------------------------------------------------------

export interface DecodeTiles {
  /** keys per workgroup (one split of S) */
  chunk: number;
  /** threads per key when scoring, dividing D/4 */
  tpr: number;
  /** threads per workgroup, a multiple of tpr */
  threads: number;
  /** batch rows served together by one workgroup of a shared-prefix chunk */
  prefixRows: number;
}

/** Query vectors one workgroup serves: G heads, times prefixRows rows on prefix chunks. */
function decodeQueries(G: number, t: DecodeTiles): number {
  return G * Math.max(1, t.prefixRows);
}

export function decodeWorkgroupBytes(D: number, G: number, t: DecodeTiles): number {
  const QN = decodeQueries(G, t);
  const keysPerPass = t.threads / t.tpr;
  return QN * D * 4 + QN * keysPerPass * (t.tpr + 1) * 4 + QN * t.chunk * 4 + QN * 8 + 4;
}

export function defaultDecodeTiles(D: number, G: number, B = 8, limit = PORTABLE_WORKGROUP_STORAGE): DecodeTiles {
  checkHeadDim(D);
  const D4 = D / 4;
  let tpr = Math.min(8, D4);
  while (D4 % tpr !== 0) tpr--;
  // Up to 8 query vectors per prefix workgroup keeps the per-thread accumulators in registers.
  for (let prefixRows = Math.max(1, Math.min(B, Math.floor(8 / G))); prefixRows >= 1; prefixRows = Math.floor(prefixRows / 2)) {
    for (const chunk of [64, 32, 16, 8]) {
      const t = { chunk, tpr, threads: 128, prefixRows };
      if (decodeWorkgroupBytes(D, G, t) <= limit) return t;
    }
  }
  throw new Error(`attention decode: head dim ${D} with ${G} heads per kv head does not fit ${limit} bytes of workgroup memory`);
}

/**
 * One chunk of keys against QN query vectors. 'cache' workgroups read keys
 * chunk*CH .. of row wid.z's cache for its G heads; 'prefix' workgroups read the shared
 * prefix for the G heads of rows wid.z*R .. wid.z*R+R-1 (the prefix is read once per R
 * rows). With a prefix both kinds run in ONE dispatch: workgroups x < prefixChunks are
 * prefix chunks (grid z counts rows, so those with z*R >= B have nothing to do), the
 * rest cache chunks; each kind is a function over the same workgroup memory, sized for
 * the larger (prefix) query block.
 */
const decodeKernel = kernelCache((D: number, G: number, R: number, tiles: DecodeTiles, withPrefix: boolean, cacheKv: KvDtype = 'f32', prefixKv: KvDtype = cacheKv) => {
  const { chunk: CH, tpr: TPR, threads: WG } = tiles;
  const D4 = D / 4;
  const NV = D4 / TPR;
  const KP = WG / TPR;
  const PS = TPR + 1;
  const QNmax = (withPrefix ? R : 1) * G;
  const kvT = (kv: KvDtype) => (kv === 'f16' ? 'vec4h' : 'vec4f');
  // f16 K/V are widened to f32 as they are read; everything after is f32.
  const pass = (source: 'cache' | 'prefix') => {
    const cache = source === 'cache';
    const QN = (cache ? 1 : R) * G;
    const keys = cache ? 'keys' : 'pkeys';
    const values = cache ? 'values' : 'pvalues';
    const wide = (e: string) => ((cache ? cacheKv : prefixKv) === 'f16' ? `vec4f(${e})` : e);
    return `
fn ${source}Chunk(chunk: u32, hk: u32, b0: u32, lid: u32) {
  ${
    cache
      ? `if (lid == 0u) { total = min(lengths[b0], p.Smax); }
  let nKeys = workgroupUniformLoad(&total);
  let outChunk = p.prefixChunks + chunk;
  let keyBase = (b0 * p.Smax * p.HK + hk) * ${D4}u;`
      : `let nKeys = p.P;
  let outChunk = chunk;
  let keyBase = hk * ${D4}u;`
  }
  let keyStride = p.HK * ${D4}u;
  let c0 = chunk * ${CH}u;
  if (c0 >= nKeys) { return; }
  let n = min(${CH}u, nKeys - c0);
  for (var i = lid; i < ${QN * D4}u; i += ${WG}u) {
    let b = b0 + i / ${G * D4}u;
    var qq = vec4f(0.0);
    if (b < p.B) { qq = q[(b * p.H + hk * ${G}u) * ${D4}u + i % ${G * D4}u] * p.scale; }
    qs[i] = qq;
  }
  workgroupBarrier();
  let cl = lid / ${TPR}u;
  let j = lid % ${TPR}u;
  for (var kp0 = 0u; kp0 < ${CH}u; kp0 += ${KP}u) {
    let c = kp0 + cl;
    ${each(QN, (i) => `var a${i} = 0.0;`, '\n    ')}
    if (c < n) {
      let kb = keyBase + (c0 + c) * keyStride + j;
      ${each(NV, (m) => `let k${m} = ${wide(`${keys}[kb + ${m * TPR}u]`)};`, '\n      ')}
      ${each(QN, (i) => `a${i} = ${sum(NV, (m) => `dot(k${m}, qs[${i * D4 + m * TPR}u + j])`)};`, '\n      ')}
    }
    ${each(QN, (i) => `part[(${i * KP}u + cl) * ${PS}u + j] = a${i};`, '\n    ')}
    workgroupBarrier();
    for (var i = lid; i < ${QN * KP}u; i += ${WG}u) {
      let cc = kp0 + i % ${KP}u;
      let s = ${sum(TPR, (jj) => `part[i * ${PS}u + ${jj}u]`)};
      if (cc < ${CH}u) { sc[(i / ${KP}u) * ${CH}u + cc] = select(${NEG}, s, cc < n); }
    }
    workgroupBarrier();
  }
  if (lid < ${QN}u) {
    var mx = ${NEG};
    for (var c = 0u; c < n; c++) { mx = max(mx, sc[lid * ${CH}u + c]); }
    var l = 0.0;
    for (var c = 0u; c < n; c++) {
      let e = exp(sc[lid * ${CH}u + c] - mx);
      sc[lid * ${CH}u + c] = e;
      l += e;
    }
    stat[lid] = vec2f(mx, l);
  }
  workgroupBarrier();
  for (var i = lid; i < ${QN * D4}u; i += ${WG}u) {
    let qi = i / ${D4}u;
    let d4 = i % ${D4}u;
    let b = b0 + qi / ${G}u;
    if (b < p.B) {
      let vb = keyBase + c0 * keyStride + d4;
      var acc = vec4f(0.0);
      for (var c = 0u; c < n; c++) { acc += sc[qi * ${CH}u + c] * ${wide(`${values}[vb + c * keyStride]`)}; }
      let bh = b * p.H + hk * ${G}u + qi % ${G}u;
      opart[(bh * p.nChunks + outChunk) * ${D4}u + d4] = acc;
      if (d4 == 0u) { ml[bh * p.nChunks + outChunk] = stat[qi]; }
    }
  }
}`;
  };
  return {
    label: `attention_decode${withPrefix ? '_prefix' : ''} D=${D} G=${G} rows=${R} chunk=${CH} tpr=${TPR} wg=${WG}${cacheKv === 'f16' ? ' kv=f16' : ''}${withPrefix && prefixKv === 'f16' ? ' prefix=f16' : ''}`,
    code: /* wgsl */ `${enables({ f16: cacheKv === 'f16' || (withPrefix && prefixKv === 'f16') })}
struct Params { B: u32, Smax: u32, H: u32, HK: u32, P: u32, nChunks: u32, prefixChunks: u32, scale: f32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> opart: array<vec4f>;  // [B, H, nChunks, D] unnormalised
@group(0) @binding(2) var<storage, read_write> ml: array<vec2f>;     // [B, H, nChunks] (max, sum)
@group(0) @binding(3) var<storage, read> q: array<vec4f>;            // [B, H, D]
@group(0) @binding(4) var<storage, read> keys: array<${kvT(cacheKv)}>;         // [B, Smax, HK, D] cache
@group(0) @binding(5) var<storage, read> values: array<${kvT(cacheKv)}>;       // [B, Smax, HK, D] cache
@group(0) @binding(6) var<storage, read> lengths: array<u32>;        // [B]
${
  withPrefix
    ? `@group(0) @binding(7) var<storage, read> pkeys: array<${kvT(prefixKv)}>;        // [P, HK, D] prefix
@group(0) @binding(8) var<storage, read> pvalues: array<${kvT(prefixKv)}>;      // [P, HK, D] prefix`
    : ''
}
var<workgroup> qs: array<vec4f, ${QNmax * D4}>;
var<workgroup> part: array<f32, ${QNmax * KP * PS}>;
var<workgroup> sc: array<f32, ${QNmax * CH}>;
var<workgroup> stat: array<vec2f, ${QNmax}>;
var<workgroup> total: u32;
${withPrefix ? pass('prefix') : ''}
${pass('cache')}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) lid: u32) {
  ${
    withPrefix
      ? `if (wid.x < p.prefixChunks) {
    if (wid.z * ${R}u < p.B) { prefixChunk(wid.x, wid.y, wid.z * ${R}u, lid); }
  } else {
    cacheChunk(wid.x - p.prefixChunks, wid.y, wid.z, lid);
  }`
      : 'cacheChunk(wid.x, wid.y, wid.z, lid);'
  }
}`,
  };
});

const combineKernel = kernelCache((D: number, chunk: number) => {
  const D4 = D / 4;
  const WG = Math.min(64, Math.max(32, D4));
  return {
    label: `attention_decode_combine D=${D} chunk=${chunk}`,
    code: /* wgsl */ `
struct Params { B: u32, Smax: u32, H: u32, nChunks: u32, prefixChunks: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<vec4f>;    // [B, H, D]
@group(0) @binding(2) var<storage, read> opart: array<vec4f>;        // [B, H, nChunks, D]
@group(0) @binding(3) var<storage, read> ml: array<vec2f>;           // [B, H, nChunks]
@group(0) @binding(4) var<storage, read> lengths: array<u32>;        // [B]

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let bh = ${WG_LINEAR};
  if (bh >= p.B * p.H) { return; }
  let own = (min(lengths[bh / p.H], p.Smax) + ${chunk - 1}u) / ${chunk}u;
  let used = p.prefixChunks + min(p.nChunks - p.prefixChunks, own);
  let base = bh * p.nChunks;
  var mx = ${NEG};
  for (var i = 0u; i < used; i++) { mx = max(mx, ml[base + i].x); }
  var l = 0.0;
  for (var i = 0u; i < used; i++) { l += ml[base + i].y * exp(ml[base + i].x - mx); }
  let inv = select(0.0, 1.0 / l, l > 0.0);
  for (var d4 = lid; d4 < ${D4}u; d4 += ${WG}u) {
    var acc = vec4f(0.0);
    for (var i = 0u; i < used; i++) { acc += opart[(base + i) * ${D4}u + d4] * exp(ml[base + i].x - mx); }
    out[bh * ${D4}u + d4] = acc * inv;
  }
}`,
  };
});

export interface SharedPrefix {
  /** [P, HK, D] keys and values every row attends to before its own cache entries */
  k: Binding;
  v: Binding;
  P: number;
}

export interface DecodeOptions {
  /** Upper bound on every lengths[b] (fewer splits when the cache is mostly empty); default Smax. */
  maxLength?: number;
  tiles?: DecodeTiles;
  /** Element type of K/V given as bare buffer ranges (a Tensor states its own); default f32. */
  kvDtype?: KvDtype;
}

/**
 * out [B, H, D] = attention of one (already roped) query per row, q [B, H, D], over the
 * shared prefix (if any, positions 0 .. P-1) followed by the first lengths[b] entries of
 * row b's cache kCache, vCache [B, Smax, HK, D]. lengths (u32 [B]) counts the new token.
 * No causal mask beyond that: the new query sees every valid key. Cache and prefix may
 * be buffer ranges (e.g. one layer's slice of a cache holding every layer). Cache and
 * prefix may each be f16 (needs shader-f16): keys and values are widened to f32 as
 * they are read, so scores, softmax and the weighted sums stay f32.
 */
export function attentionDecode(
  gpu: Gpu,
  out: Tensor,
  q: Tensor,
  kCache: Binding,
  vCache: Binding,
  lengths: Tensor,
  prefix: SharedPrefix | null,
  B: number,
  Smax: number,
  H: number,
  HK: number,
  D: number,
  opts: DecodeOptions = {},
): void {
  checkHeadDim(D);
  const G = checkGroups(H, HK);
  const limit = Math.min(PORTABLE_WORKGROUP_STORAGE, gpu.caps.maxComputeWorkgroupStorageSize);
  const tiles = opts.tiles ?? defaultDecodeTiles(D, G, B, limit);
  const D4 = D / 4;
  if (D4 % tiles.tpr !== 0 || tiles.threads % tiles.tpr !== 0 || tiles.prefixRows < 1) {
    throw new Error(`attention decode: bad tiles ${JSON.stringify(tiles)}`);
  }
  const bytes = decodeWorkgroupBytes(D, G, tiles);
  if (bytes > gpu.caps.maxComputeWorkgroupStorageSize) {
    throw new Error(`attention decode: tiles ${JSON.stringify(tiles)} need ${bytes} bytes of workgroup memory`);
  }
  const cacheKv = kvDtypeOf(kCache, opts.kvDtype ?? 'f32');
  if (kvDtypeOf(vCache, cacheKv) !== cacheKv) throw new Error('attention decode: the K and V caches must have one element type');
  const prefixKv = prefix ? kvDtypeOf(prefix.k, cacheKv) : cacheKv;
  if (prefix && kvDtypeOf(prefix.v, prefixKv) !== prefixKv) throw new Error('attention decode: the prefix K and V must have one element type');
  checkKvDtype(gpu, cacheKv, 'attention decode');
  checkKvDtype(gpu, prefixKv, 'attention decode');
  const P = prefix?.P ?? 0;
  const maxLength = Math.min(opts.maxLength ?? Smax, Smax);
  const prefixChunks = ceilDiv(P, tiles.chunk);
  const nChunks = Math.max(1, prefixChunks + ceilDiv(maxLength, tiles.chunk));
  const opart = gpu.empty([B, H, nChunks, D], 'f32', 'attention-decode-partials');
  const ml = gpu.empty([B, H, nChunks, 2], 'f32', 'attention-decode-stats');
  const params = () => new Params().u32(B).u32(Smax).u32(H).u32(HK).u32(P).u32(nChunks).u32(prefixChunks).f32(1 / Math.sqrt(D));
  // Prefix and cache chunks in one dispatch (the kernel's comment), then the combine.
  if (prefix && prefixChunks > 0) {
    const R = Math.min(tiles.prefixRows, B);
    gpu.dispatch(decodeKernel(D, G, R, tiles, true, cacheKv, prefixKv), [opart, ml, q, kCache, vCache, lengths, prefix.k, prefix.v], [nChunks, HK, B], params());
  } else {
    gpu.dispatch(decodeKernel(D, G, 1, tiles, false, cacheKv), [opart, ml, q, kCache, vCache, lengths], [nChunks - prefixChunks, HK, B], params());
  }
  gpu.dispatch(
    combineKernel(D, tiles.chunk),
    [out, opart, ml, lengths],
    grid(B * H),
    new Params().u32(B).u32(Smax).u32(H).u32(nChunks).u32(prefixChunks),
  );
  opart.release();
  ml.release();
}

const cacheWriteKernel = kernelCache((kv: KvDtype = 'f32') => ({
  label: `kv_cache_write${kv === 'f16' ? ' kv=f16' : ''}`,
  code: /* wgsl */ `${enables({ f16: kv === 'f16' })}
struct Params { B: u32, T: u32, Smax: u32, rowVec4: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> kc: array<${kv === 'f16' ? 'vec4h' : 'vec4f'}>;     // [B, Smax, HK, D]
@group(0) @binding(2) var<storage, read_write> vc: array<${kv === 'f16' ? 'vec4h' : 'vec4f'}>;     // [B, Smax, HK, D]
@group(0) @binding(3) var<storage, read> k: array<vec4f>;            // [B, T, HK, D]
@group(0) @binding(4) var<storage, read> v: array<vec4f>;            // [B, T, HK, D]
@group(0) @binding(5) var<storage, read> offsets: array<u32>;        // [B]

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let i = ${WG_LINEAR} * 256u + lid;
  if (i >= p.B * p.T * p.rowVec4) { return; }
  let e = i % p.rowVec4;
  let bt = i / p.rowVec4;
  let b = bt / p.T;
  let pos = offsets[b] + bt % p.T;
  if (pos >= p.Smax) { return; }
  let dst = (b * p.Smax + pos) * p.rowVec4 + e;
  kc[dst] = ${kv === 'f16' ? 'vec4h(k[i])' : 'k[i]'};
  vc[dst] = ${kv === 'f16' ? 'vec4h(v[i])' : 'v[i]'};
}`,
}));

/**
 * Writes k, v [B, T, HK, D] into kCache, vCache [B, Smax, HK, D] at rows
 * offsets[b] .. offsets[b]+T-1 of each batch row (u32 offsets [B]); positions at or
 * past Smax are dropped. The caches may be buffer ranges (f32), or f16 Tensors
 * (values rounded to nearest f16 as they are stored).
 */
export function kvCacheWrite(
  gpu: Gpu,
  kCache: Binding,
  vCache: Binding,
  k: Tensor,
  v: Tensor,
  offsets: Tensor,
  B: number,
  T: number,
  Smax: number,
  HK: number,
  D: number,
): void {
  checkHeadDim(D);
  const rowVec4 = (HK * D) / 4;
  const kv = kvDtypeOf(kCache, 'f32');
  if (kvDtypeOf(vCache, kv) !== kv) throw new Error('kvCacheWrite: the K and V caches must have one element type');
  checkKvDtype(gpu, kv, 'kvCacheWrite');
  gpu.dispatch(
    cacheWriteKernel(kv),
    [kCache, vCache, k, v, offsets],
    grid(ceilDiv(B * T * rowVec4, 256)),
    new Params().u32(B).u32(T).u32(Smax).u32(rowVec4),
  );
}
