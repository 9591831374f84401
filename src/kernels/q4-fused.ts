/**
 * Fused 4-bit GEMVs for a decode step: several projections that read one input in a
 * single dispatch, with their epilogues applied before anything is stored.
 *
 *   rows mode    y[n, off_s + j]  (= or +=)  x[n, :] . W_s[base_s + j, :]  (+ lora_s)   for each segment s
 *                (q, k, v into one [N, Mq + Mk + Mv] buffer; o or down alone with +=
 *                onto the residual stream)
 *   swiglu mode  y[n, off + j]  =  silu(g) * v,  g = x . W_0[j, :] (+ lora_0),  v = x . W_1[j, :] (+ lora_1)
 *                (gate and up: neither is ever stored)
 *
 *   lora_s[n, j] = sum_r u[uBase + s, n, r] B_s[j, r]     u [terms, N, R] with the scale
 *                  already applied (lora-decode.ts loraDownProducts), B_s [M_s, R]
 *
 * so a LoRA projection adds no dispatch of its own beyond the shared A products.
 *
 *   A products   uA[n, r] = scaleA * x[n, :] . A[r, :]     (rows mode, option `down`)
 *                by RA extra workgroups after the GEMV's: the LoRA A half of the
 *                projection itself, whose B half a later dispatch applies (the decode
 *                step defers o's and down's B products to the next dispatches that read
 *                the residual stream, decode-fused.ts), so neither needs a dispatch.
 *
 * Layout of the work: like q4.ts's GEMV (a workgroup owns groups * rowsPerThread rows
 * of one segment; `lanes` threads split each row's blocks; every dequantized word is
 * reused by the NC input rows of the workgroup's chunk), with the segments laid end to
 * end along workgroup x (each workgroup's rows lie in one segment, so the branch that
 * picks a segment's buffers is uniform) and chunks of NC <= 8 input rows along y.
 * A segment is a row range [base_s, base_s + M_s) of a weight, so the projections of
 * one packed weight (src/model/pack.ts) share its buffers; each distinct weight takes
 * 2 bindings (3 with zero points) and each LoRA B one more, so a group fits one
 * dispatch only within the device's maxStorageBuffersPerShaderStage:
 * q4FusedBindings() counts, q4FusedUnsupported() says why not, the caller plans.
 * Batches of 9..32 rows re-read the weights once per chunk of 8 (from cache on GPUs);
 * the N = 1..8 decode steps read each weight byte once. Where the device has subgroups
 * the lanes' sums combine with shuffles (subgroup.ts laneGroupSumWgsl) and the A
 * products' with subgroupAdd, else through trees in workgroup memory.
 */
import type { Gpu } from '../gpu/gpu';
import { uniforms } from '../gpu/params';
import type { KernelSource } from '../gpu/pipelines';
import type { Tensor } from '../gpu/tensor';
import { Q4_GEMV_MAX_N, q4GemvTuningFor, type Q4GemvTuning } from './q4';
import type { Q4Weight } from './q4-layout';
import { laneGroupSumWgsl, useSubgroups, workgroupSumsAtWgsl } from './subgroup';
import { MAX_WORKGROUPS_PER_DIM, ceilDiv, enables, kernelCache } from './wgsl';

/** Rows served by one fused dispatch (chunks of up to Q4_GEMV_MAX_N along the grid's y). */
export const Q4_FUSED_MAX_N = 32;
export const Q4_FUSED_MAX_SEGMENTS = 3;

const U = uniforms('Params', {
  N: 'u32',
  K: 'u32',
  nb: 'u32',
  R: 'u32',
  yStride: 'u32',
  accumulate: 'u32',
  uBase: 'u32',
  rows0: 'u32',
  rows1: 'u32',
  rows2: 'u32',
  wg1: 'u32',
  wg2: 'u32',
  off0: 'u32',
  off1: 'u32',
  off2: 'u32',
  base0: 'u32',
  base1: 'u32',
  base2: 'u32',
  RA: 'u32',
  wgA: 'u32',
  scaleA: 'f32',
});

export type Q4FusedMode = 'rows' | 'swiglu';

/**
 * Most storage bindings a fused dispatch uses, whatever the device allows: 12 are
 * checked on both test drivers; on lavapipe (16 allowed) a 15-binding variant (three
 * unpacked weights with zero points and LoRA, N = 11) did not finish, so groups past
 * 12 are split. Packed weights (src/model/pack.ts) need at most 9.
 */
export const Q4_FUSED_MAX_BINDINGS = 12;

/**
 * Storage bindings one fused dispatch of `segments` row ranges of `weights` distinct
 * weights needs (`down`: with the A products' A and output).
 */
export function q4FusedBindings(segments: number, zeros: boolean, lora: boolean, weights = segments, down = false): number {
  return 2 + (lora ? 1 : 0) + weights * (zeros ? 3 : 2) + (lora ? segments : 0) + (down ? 2 : 0);
}

/**
 * weightOf[s]: which bound weight segment s reads (segments of one packed weight share
 * its bindings). `sg`: sums combine through subgroups instead of workgroup-memory trees.
 */
const fusedKernel = kernelCache((NC: number, weightOf: readonly number[], mode: Q4FusedMode, zeros: boolean, lora: boolean, aligned: boolean, tuning: Q4GemvTuning, down: boolean, sg: boolean) => {
  const nSeg = weightOf.length;
  const nW = Math.max(...weightOf) + 1;
  const { lanes, groups, rowsPerThread: R } = tuning;
  const WG = lanes * groups;
  const nOut = mode === 'swiglu' ? 2 : 1;
  const RN = R * NC;
  if (!(NC >= 1 && NC <= Q4_GEMV_MAX_N)) throw new Error(`q4 fused GEMV: chunk of ${NC} rows is outside 1..${Q4_GEMV_MAX_N}`);
  if (!(nSeg >= 1 && nSeg <= Q4_FUSED_MAX_SEGMENTS)) throw new Error(`q4 fused GEMV: ${nSeg} segments is outside 1..${Q4_FUSED_MAX_SEGMENTS}`);
  if (mode === 'swiglu' && nSeg !== 2) throw new Error('q4 fused GEMV: swiglu needs exactly 2 segments (gate, up)');
  if (mode === 'swiglu' && down) throw new Error('q4 fused GEMV: A products are served in rows mode only');
  if (lanes < 1 || (lanes & (lanes - 1)) !== 0 || WG > 256 || R < 1 || groups < 1) throw new Error(`q4 fused GEMV: bad tuning ${JSON.stringify(tuning)}`);
  if (nOut * RN * WG * 4 > 16384) throw new Error(`q4 fused GEMV: ${nOut * RN * WG} reduction floats exceed 16 KiB`);
  const rs = [...Array(R).keys()];
  const ns = [...Array(NC).keys()];
  const segs = [...Array(nSeg).keys()];
  const ws = [...Array(nW).keys()];

  let b = 3;
  const uDecl = lora ? `@group(0) @binding(${b++}) var<storage, read> u: array<f32>;  // [terms, N, R], scaled\n` : '';
  const wDecl = ws
    .map((s) => {
      const lines = [
        `@group(0) @binding(${b++}) var<storage, read> qw${s}: array<vec4<u32>>;  // [rows, nb] blocks`,
        `@group(0) @binding(${b++}) var<storage, read> sc${s}: array<u32>;        // [rows, nb] f16 pairs`,
      ];
      if (zeros) lines.push(`@group(0) @binding(${b++}) var<storage, read> zp${s}: array<u32>;        // [rows, ceil(nb/2)] bytes`);
      return lines.join('\n');
    })
    .join('\n');
  const bDecl = lora ? segs.map((s) => `@group(0) @binding(${b++}) var<storage, read> lb${s}: array<f32>;        // LoRA B [rows, R]`).join('\n') : '';
  const aDecl = down
    ? `@group(0) @binding(${b++}) var<storage, read> la: array<f32>;        // LoRA A [RA, K]
@group(0) @binding(${b++}) var<storage, read_write> ua: array<f32>;  // [N, RA], scaled`
    : '';

  const xDecl = aligned
    ? `@group(0) @binding(2) var<storage, read> x: array<vec4f>;   // [N, K/4]
fn xq(o: u32, k: u32) -> vec4f { return x[(o + k) >> 2u]; }`
    : `@group(0) @binding(2) var<storage, read> x: array<f32>;     // [N, K]
fn xs(o: u32, k: u32) -> f32 { return select(0.0, x[o + min(k, p.K - 1u)], k < p.K); }
fn xq(o: u32, k: u32) -> vec4f { return vec4f(xs(o, k), xs(o, k + 1u), xs(o, k + 2u), xs(o, k + 3u)); }`;

  // One segment's partial dot products: rows first .. first + R - 1 (clamped to last)
  // of W_s, for the chunk's NC input rows, over this lane's blocks.
  const dotFn = (s: number) => {
    const word = (w: number, c: string) => `
    {
${rs.map((r) => `      let l${r} = q4Lo(w${r}.${c}) - z${r};\n      let h${r} = q4Hi(w${r}.${c}) - z${r};`).join('\n')}
${ns
  .map(
    (n) => `      let xl${n} = xq(xo${n}, k + ${w * 8}u);
      let xh${n} = xq(xo${n}, k + ${w * 8 + 4}u);
${rs.map((r) => `      t${r}_${n} += dot(xl${n}, l${r}) + dot(xh${n}, h${r});`).join('\n')}`,
  )
  .join('\n')}
    }`;
    const zero = (r: number) =>
      zeros
        ? `let zi${r} = m${r} * ((p.nb + 1u) >> 1u) + (b >> 1u);
    let z${r} = bitcast<f32>(((zp${s}[zi${r} >> 2u] >> ((zi${r} & 3u) * 8u + (b & 1u) * 4u)) & 15u) | 0x4b000000u);`
        : `let z${r} = 8388616.0;  // 2^23 + 8`;
    return `
fn dot${s}(base: u32, first: u32, last: u32, lane: u32, n0: u32) -> array<f32, ${RN}> {
${rs.map((r) => `  let m${r} = base + min(first + ${r}u, last);`).join('\n')}
${ns.map((n) => `  let xo${n} = min(n0 + ${n}u, p.N - 1u) * p.K;`).join('\n')}
${rs.map((r) => ns.map((n) => `  var a${r}_${n} = 0.0;`).join('\n')).join('\n')}
  for (var b = lane; b < p.nb; b += LANES) {
    let k = b * 32u;
${rs
  .map(
    (r) => `    let blk${r} = m${r} * p.nb + b;
    let w${r} = qw${s}[blk${r}];
    let s${r} = unpack2x16float(sc${s}[blk${r} >> 1u])[blk${r} & 1u];
    ${zero(r)}`,
  )
  .join('\n')}
${rs.map((r) => ns.map((n) => `    var t${r}_${n} = 0.0;`).join('\n')).join('\n')}
${['x', 'y', 'z', 'w'].map((c, w) => word(w, c)).join('')}
${rs.map((r) => ns.map((n) => `    a${r}_${n} += s${r} * t${r}_${n};`).join('\n')).join('\n')}
  }
  return array<f32, ${RN}>(${rs.flatMap((r) => ns.map((n) => `a${r}_${n}`)).join(', ')});
}`;
  };

  const loraFn = (s: number) => `
fn lora${s}(n: u32, row: u32) -> f32 {
  let ub = ((p.uBase + ${s}u) * p.N + n) * p.R;
  let bb = row * p.R;
  var v = 0.0;
  for (var r = 0u; r < p.R; r++) { v += u[ub + r] * lb${s}[bb + r]; }
  return v;
}`;
  // Workgroup wgA + r: row r of A against the chunk's NC input rows, all WG threads
  // striding over K four columns at a time, then one tree over the workgroup.
  const P2 = 1 << Math.ceil(Math.log2(WG));
  const aLoad = aligned
    ? (k: string) => `vec4f(la[${k}], la[${k} + 1u], la[${k} + 2u], la[${k} + 3u])`
    : (k: string) => `vec4f(${[0, 1, 2, 3].map((i) => `select(0.0, la[min(${k} + ${i}u, ab + p.K - 1u)], k + ${i}u < p.K)`).join(', ')})`;
  // Subgroups: workgroupSumsAt (subgroupAdd, then the subgroups' sums in order) hands lid n < NC the total of input row n.
  const downSubgroupSum = `  var d = array<f32, ${NC}>(${ns.map((n) => `d${n}`).join(', ')});
  let t = workgroupSumsAt(&d, lid, sgSize);
  if (lid < ${NC}u && n0 + lid < p.N) { ua[(n0 + lid) * p.RA + r] = p.scaleA * t; }`;
  const downTreeSum = `${ns.map((n) => `  red[${n}u * WG + lid] = d${n};`).join('\n')}
  workgroupBarrier();
  for (var s = ${Math.floor(P2 / 2)}u; s > 0u; s >>= 1u) {
    if (lid < s && lid + s < WG) {
      for (var i = 0u; i < ${NC}u; i++) { red[i * WG + lid] += red[i * WG + lid + s]; }
    }
    workgroupBarrier();
  }
  if (lid < ${NC}u && n0 + lid < p.N) { ua[(n0 + lid) * p.RA + r] = p.scaleA * red[lid * WG]; }`;
  const downFn = `
fn downProducts(r: u32, lid: u32, n0: u32${sg ? ', sgSize: u32' : ''}) {
  let ab = r * p.K;
${ns.map((n) => `  let xo${n} = min(n0 + ${n}u, p.N - 1u) * p.K;
  var d${n} = 0.0;`).join('\n')}
  for (var k = lid * 4u; k < p.K; k += WG * 4u) {
    let a = ${aLoad('ab + k')};
${ns.map((n) => `    d${n} += dot(xq(xo${n}, k), a);`).join('\n')}
  }
${sg ? downSubgroupSum : downTreeSum}
}`;
  const pickSeg = (body: (s: number) => string) => segs.map((s) => `${s > 0 ? ' else ' : ''}if (seg == ${s}u) { ${body(s)} }`).join('');

  const main =
    mode === 'rows'
      ? `${down ? `\n  if (wid.x >= p.wgA) {\n    downProducts(wid.x - p.wgA, lid, n0${sg ? ', sgSize' : ''});\n    return;\n  }` : ''}
  var seg = 0u;
  var g = wid.x;
  var rows = p.rows0;
  var off = p.off0;
  var base = p.base0;
${nSeg > 1 ? '  if (wid.x >= p.wg1) { seg = 1u; g = wid.x - p.wg1; rows = p.rows1; off = p.off1; base = p.base1; }' : ''}
${nSeg > 2 ? '  if (wid.x >= p.wg2) { seg = 2u; g = wid.x - p.wg2; rows = p.rows2; off = p.off2; base = p.base2; }' : ''}
  let first = (g * ${groups}u + group) * ${R}u;
  var acc: array<f32, ${RN}>;
  ${nW === 1 ? `acc = dot0(base, first, rows - 1u, lane, n0);` : pickSeg((s) => `acc = dot${weightOf[s]}(base, first, rows - 1u, lane, n0);`)}
  ${sg ? 'laneGroupSum(&acc, lane, lid, sgSize);' : `for (var i = 0u; i < RN; i++) { red[i * WG + lid] = acc[i]; }
  ${reduce(RN)}`}
  for (var i = lane; i < RN; i += LANES) {
    let row = first + i / ${NC}u;
    let n = n0 + i % ${NC}u;
    if (row < rows && n < p.N) {
      let o = n * p.yStride + off + row;
      var v = ${sg ? 'acc[i]' : 'red[i * WG + group * LANES]'};
${lora ? `      ${pickSeg((s) => `v += lora${s}(n, row);`)}` : ''}
      if (p.accumulate != 0u) { v += y[o]; }
      y[o] = v;
    }
  }`
      : `
  let first = (wid.x * ${groups}u + group) * ${R}u;
  let rows = p.rows0;
  let acc0 = dot${weightOf[0]}(p.base0, first, rows - 1u, lane, n0);
  let acc1 = dot${weightOf[1]}(p.base1, first, rows - 1u, lane, n0);
  ${
    sg
      ? `var acc: array<f32, ${2 * RN}>;
  for (var i = 0u; i < RN; i++) {
    acc[i] = acc0[i];
    acc[RN + i] = acc1[i];
  }
  laneGroupSum(&acc, lane, lid, sgSize);`
      : `for (var i = 0u; i < RN; i++) {
    red[i * WG + lid] = acc0[i];
    red[(RN + i) * WG + lid] = acc1[i];
  }
  ${reduce(2 * RN)}`
  }
  for (var i = lane; i < RN; i += LANES) {
    let row = first + i / ${NC}u;
    let n = n0 + i % ${NC}u;
    if (row < rows && n < p.N) {
      var gate = ${sg ? 'acc[i]' : 'red[i * WG + group * LANES]'};
      var up = ${sg ? 'acc[RN + i]' : 'red[(RN + i) * WG + group * LANES]'};
${lora ? '      gate += lora0(n, row);\n      up += lora1(n, row);' : ''}
      y[n * p.yStride + p.off0 + row] = gate / (1.0 + exp(-gate)) * up;
    }
  }`;

  return {
    label: `q4_fused_gemv ${mode} NC=${NC} seg=${weightOf.join('')}${zeros ? ' zeros' : ''}${lora ? ' lora' : ''}${down ? ' down' : ''}${aligned ? '' : ' unaligned'} lanes=${lanes} groups=${groups} R=${R}${sg ? ' subgroups' : ''}`,
    code: /* wgsl */ `${enables({ subgroups: sg })}
${U.wgsl}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;  // [N, yStride]
${xDecl}
${uDecl}${wDecl}
${bDecl}
${aDecl}
const LANES = ${lanes}u;
const WG = ${WG}u;
const RN = ${RN}u;
${
  sg
    ? `${laneGroupSumWgsl(WG, lanes, RN, nOut)}${down ? workgroupSumsAtWgsl(WG, NC) : ''}`
    : `var<workgroup> red: array<f32, ${nOut * RN * WG}>;  // [nOut * RN, WG]`
}
// 2^23 + nibbles 0-3 and 4-7 of one word (see q4.ts: no int-to-float conversion).
fn q4Lo(w: u32) -> vec4f { return bitcast<vec4f>(((vec4u(w) >> vec4u(0u, 4u, 8u, 12u)) & vec4u(15u)) | vec4u(0x4b000000u)); }
fn q4Hi(w: u32) -> vec4f { return bitcast<vec4f>(((vec4u(w) >> vec4u(16u, 20u, 24u, 28u)) & vec4u(15u)) | vec4u(0x4b000000u)); }
${ws.map(dotFn).join('\n')}
${lora ? segs.map(loraFn).join('\n') : ''}
${down ? downFn : ''}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_index) lid: u32${sg ? ', @builtin(subgroup_size) sgSize: u32' : ''}) {
  let lane = lid % LANES;
  let group = lid / LANES;
  let n0 = wid.y * ${NC}u;
${main}
}`,
  };
});

/**
 * The kernel for these arguments, found by one small integer (no string work per
 * dispatch: kernelCache keys by joined strings, which a decode step would pay ~100
 * times a token).
 */
const fusedByKey = new Map<number, KernelSource>();
function fusedKernelFor(NC: number, weightOf: readonly number[], mode: Q4FusedMode, zeros: boolean, lora: boolean, aligned: boolean, tuning: Q4GemvTuning, down: boolean, sg: boolean): KernelSource {
  const { lanes, groups, rowsPerThread } = tuning;
  if (lanes > 1024 || groups > 1023 || rowsPerThread > 255) return fusedKernel(NC, weightOf, mode, zeros, lora, aligned, tuning, down, sg);
  let key = NC * 4 + weightOf.length;
  for (let i = 0; i < Q4_FUSED_MAX_SEGMENTS; i++) key = key * 4 + (weightOf[i] ?? 0);
  key = ((((key * 2 + (mode === 'swiglu' ? 1 : 0)) * 2 + (zeros ? 1 : 0)) * 2 + (lora ? 1 : 0)) * 2 + (aligned ? 1 : 0)) * 2048 + lanes;
  key = (((key * 1024 + groups) * 256 + rowsPerThread) * 2 + (down ? 1 : 0)) * 2 + (sg ? 1 : 0);
  let k = fusedByKey.get(key);
  if (!k) fusedByKey.set(key, (k = fusedKernel(NC, weightOf, mode, zeros, lora, aligned, tuning, down, sg)));
  return k;
}

/** Tree reduction of `count` rows of partials over each row group's lanes, in `red`. */
function reduce(count: number): string {
  return `workgroupBarrier();
  for (var s = LANES / 2u; s > 0u; s >>= 1u) {
    if (lane < s) {
      for (var i = 0u; i < ${count}u; i++) { red[i * WG + lid] += red[i * WG + lid + s]; }
    }
    workgroupBarrier();
  }`;
}

/** One projection of a fused group: rows [rowStart, rowStart + rows) of W (a packed weight holds several). */
export interface Q4FusedSegment {
  W: Q4Weight;
  /** first row of W; default 0 */
  rowStart?: number;
  /** rows of W; default W.M - rowStart */
  rows?: number;
  /** first column of y this projection writes (rows mode); swiglu writes at segment 0's */
  yOffset: number;
  /** LoRA B [rows, R] when adapted */
  B?: Tensor | null;
}

export interface Q4FusedOptions {
  /** 'rows' (default) or 'swiglu' (segments: gate, up) */
  mode?: Q4FusedMode;
  /** columns of y per input row */
  yStride: number;
  /** add into y instead of overwriting it (rows mode) */
  accumulate?: boolean;
  /** LoRA A products [terms, N, R] (scaled) when the segments carry B */
  u?: Tensor | null;
  /** LoRA rank */
  R?: number;
  /** term of u that segment 0 reads (segment s reads uBase + s); default 0 */
  uBase?: number;
  /** rows mode: also u [N, RA] = scale x A^T (A [RA, K]) from extra workgroups of this dispatch */
  down?: Q4FusedDown | null;
  tuning?: Q4GemvTuning;
  /** Combine sums with subgroup operations (default: where the device has `subgroups`); false forces the workgroup-memory trees. */
  subgroups?: boolean;
}

/** The LoRA A half of a projection, computed beside its GEMV (the B half is applied later). */
export interface Q4FusedDown {
  /** [RA, K] */
  A: Tensor;
  scale: number;
  /** [N, RA] output */
  u: Tensor;
}

const segRows = (s: Q4FusedSegment) => s.rows ?? s.W.M - (s.rowStart ?? 0);

/** Distinct weights of the segments in order of first use, and each segment's index among them. */
function weightIndex(segs: readonly Q4FusedSegment[]): { weights: Q4Weight[]; weightOf: number[] } {
  const weights: Q4Weight[] = [];
  const weightOf: number[] = [];
  for (const s of segs) {
    let i = weights.indexOf(s.W);
    if (i < 0) i = weights.push(s.W) - 1;
    weightOf.push(i);
  }
  return { weights, weightOf };
}

/** Why the segments cannot share one fused dispatch on this device, or null when they can. */
export function q4FusedUnsupported(gpu: Gpu, segs: readonly Q4FusedSegment[], N: number, down = false): string | null {
  if (segs.length < 1 || segs.length > Q4_FUSED_MAX_SEGMENTS) return `${segs.length} projections (1..${Q4_FUSED_MAX_SEGMENTS} share a dispatch)`;
  if (!(N >= 1 && N <= Q4_FUSED_MAX_N)) return `N=${N} rows (the fused GEMV serves 1..${Q4_FUSED_MAX_N})`;
  const K = segs[0]!.W.K;
  const zeros = segs[0]!.W.shards[0]?.zeros != null;
  for (const s of segs) {
    if (s.W.K !== K) return `projections with different input widths (${K} and ${s.W.K})`;
    if (s.W.shards.length !== 1) return `a weight split into ${s.W.shards.length} shards`;
    if ((s.W.shards[0]!.zeros != null) !== zeros) return 'projections with and without zero points';
    const r0 = s.rowStart ?? 0;
    if (!(r0 >= 0 && segRows(s) >= 1 && r0 + segRows(s) <= s.W.M)) return `rows [${r0}, ${r0 + segRows(s)}) outside a weight of ${s.W.M} rows`;
  }
  const lora = segs[0]!.B != null;
  if (segs.some((s) => (s.B != null) !== lora)) return 'a group where only some projections are adapted';
  const need = q4FusedBindings(segs.length, zeros, lora, weightIndex(segs).weights.length, down);
  const limit = Math.min(gpu.caps.maxStorageBuffersPerShaderStage, Q4_FUSED_MAX_BINDINGS);
  if (need > limit) return `${need} storage bindings (at most ${limit} here: the device allows ${gpu.caps.maxStorageBuffersPerShaderStage}, the kernel uses up to ${Q4_FUSED_MAX_BINDINGS})`;
  return null;
}

/**
 * One dispatch: every segment's GEMV over x [N, K] with its epilogue (module comment).
 * Throws with the reason when q4FusedUnsupported says the group cannot be fused.
 */
export function q4FusedGemv(gpu: Gpu, y: Tensor, x: Tensor, N: number, segs: readonly Q4FusedSegment[], opts: Q4FusedOptions): void {
  const down = opts.down ?? null;
  const why = q4FusedUnsupported(gpu, segs, N, down !== null);
  if (why) throw new Error(`q4FusedGemv: cannot fuse ${why}`);
  const mode = opts.mode ?? 'rows';
  if (down && mode !== 'rows') throw new Error('q4FusedGemv: A products (down) are served in rows mode only');
  const W0 = segs[0]!.W;
  const K = W0.K;
  const zeros = W0.shards[0]!.zeros != null;
  const lora = segs[0]!.B != null;
  const R = opts.R ?? 0;
  const rows = segs.map(segRows);
  if (mode === 'swiglu' && (segs.length !== 2 || rows[1] !== rows[0])) throw new Error('q4FusedGemv: swiglu needs two projections of equal rows (gate, up)');
  if (mode === 'swiglu' && opts.accumulate) throw new Error('q4FusedGemv: swiglu overwrites its output (no accumulate)');
  if (x.size < N * K) throw new Error(`q4FusedGemv: x ${x} is smaller than [${N}, ${K}]`);
  const RA = down?.A.shape[0] ?? 0;
  if (down) {
    if (!(RA >= 1) || down.A.size !== RA * K) throw new Error(`q4FusedGemv: LoRA A ${down.A} is not [rank, ${K}]`);
    if (down.u.size < N * RA) throw new Error(`q4FusedGemv: A products u ${down.u} is smaller than [${N}, ${RA}]`);
    if (down.u === y || down.u === opts.u) throw new Error('q4FusedGemv: the A products need their own buffer');
  }
  const uBase = opts.uBase ?? 0;
  if (lora) {
    if (!opts.u || !(R >= 1)) throw new Error('q4FusedGemv: adapted segments need u [terms, N, R] and R');
    if (opts.u.size < (uBase + segs.length) * N * R) throw new Error(`q4FusedGemv: u ${opts.u} is smaller than [${uBase + segs.length}, ${N}, ${R}]`);
    segs.forEach((s, i) => {
      if (s.B!.size !== rows[i]! * R) throw new Error(`q4FusedGemv: LoRA B ${s.B} is not [${rows[i]}, ${R}]`);
    });
  }
  segs.forEach((s, i) => {
    const cols = mode === 'swiglu' ? segs[0]!.yOffset + rows[0]! : s.yOffset + rows[i]!;
    if (cols > opts.yStride || y.size < (N - 1) * opts.yStride + cols) throw new Error(`q4FusedGemv: y ${y} cannot hold [${N}, ${opts.yStride}] with columns up to ${cols}`);
  });
  const rowsTotal = mode === 'swiglu' ? rows[0]! : rows.reduce((a, r) => a + r, 0);
  const tuning = opts.tuning ?? q4GemvTuningFor(rowsTotal);
  const perGroup = tuning.groups * tuning.rowsPerThread;
  const wgs = rows.map((r) => ceilDiv(r, perGroup));
  const total = mode === 'swiglu' ? wgs[0]! : wgs.reduce((a, w) => a + w, 0);
  if (total + RA > MAX_WORKGROUPS_PER_DIM) throw new Error(`q4FusedGemv: ${total} workgroups exceed ${MAX_WORKGROUPS_PER_DIM} (raise rowsPerThread)`);
  const NC = Math.min(N, Q4_GEMV_MAX_N);
  const { weights, weightOf } = weightIndex(segs);
  const sg = useSubgroups(gpu, opts.subgroups, 'q4FusedGemv');
  const kernel = fusedKernelFor(NC, weightOf, mode, zeros, lora, K % 32 === 0, tuning, down !== null, sg);
  const params = U.params({
    N,
    K,
    nb: W0.nb,
    R: lora ? R : 0,
    yStride: opts.yStride,
    accumulate: opts.accumulate ? 1 : 0,
    uBase,
    rows0: rows[0]!,
    rows1: rows[1] ?? 0,
    rows2: rows[2] ?? 0,
    wg1: wgs[0]!,
    wg2: wgs[0]! + (wgs[1] ?? 0),
    off0: segs[0]!.yOffset,
    off1: segs[1]?.yOffset ?? 0,
    off2: segs[2]?.yOffset ?? 0,
    base0: segs[0]!.rowStart ?? 0,
    base1: segs[1]?.rowStart ?? 0,
    base2: segs[2]?.rowStart ?? 0,
    RA,
    wgA: total,
    scaleA: down?.scale ?? 0,
  });
  const bindings: Tensor[] = [y, x];
  if (lora) bindings.push(opts.u!);
  for (const W of weights) {
    const sh = W.shards[0]!;
    bindings.push(sh.qweight, sh.scales);
    if (zeros) bindings.push(sh.zeros!);
  }
  if (lora) for (const s of segs) bindings.push(s.B!);
  if (down) bindings.push(down.A, down.u);
  gpu.dispatch(kernel, bindings, [total + RA, ceilDiv(N, NC)], params);
}
