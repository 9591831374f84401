/**
 * GPU quantizer to the 4-bit layout (q4-layout.ts) and its inverse.
 *
 * quantizeQ4 reproduces quantizeQ4Ref (q4.ref.ts) bit for bit. The reference computes
 * a block's scale in float64, stores it through a Float32Array and then rounds it to
 * f16, so the kernel replays that chain of roundings exactly with integer arithmetic
 * (64-bit values as vec2<u32>) instead of trusting f32 division or pack2x16float.
 * q = roundHalfEven(v / scale) is decided by comparing v with the exact boundaries
 * (c +- 1/2) * scale, which are products of at most 17 significant bits and so exact
 * in f32.
 *
 * One thread quantizes one block of 32: it writes the block's 16 bytes of nibbles and
 * ORs its f16 scale and 4-bit zero point into words shared with neighbouring blocks
 * (atomicOr into buffers cleared first).
 *
 * On request (options.nonFinite) the same pass counts the source's NaN and infinities
 * into one u32 slot of a counts buffer (the loader's damaged-weight check, reference
 * finite.ref.ts): the values are read here anyway, so the count costs no extra pass.
 * The test is on the raw bits (exponent all ones), not on float comparisons, which
 * WGSL lets implementations fold away as if floats were always finite; a thread that
 * finds any adds them with one atomicAdd, so clean weights cost no atomics.
 */
import type { Gpu } from '../gpu/gpu';
import { Params, uniforms } from '../gpu/params';
import type { Tensor } from '../gpu/tensor';
import { q4Blocks, q4ShardRows, type Q4Shard, type Q4Weight } from './q4-layout';
import { q4Pieces, q4ShardBindings, q4Wgsl } from './q4';
import { WG_LINEAR, ceilDiv, grid, kernelCache } from './wgsl';

export type Q4SourceType = 'f32' | 'f16' | 'bf16';

export interface QuantizeQ4Options {
  /** f32: an f32 tensor; f16 / bf16: raw 16-bit values packed two per u32, low half first */
  srcType: Q4SourceType;
  /** store 4-bit zero points (asymmetric blocks); default true */
  zeros?: boolean;
  /** largest buffer of one shard; default the device's storage binding limit */
  maxShardBytes?: number;
  /** largest source range one dispatch binds; default the device's storage binding limit */
  maxSourceBytes?: number;
  /** also add the number of NaN / infinite source values to counts[slot] (u32) */
  nonFinite?: { counts: Tensor; slot: number };
}

const WG = 64;

/** Exact replay of the reference's scale rounding: f16 bits of f32(f64(f64(a + b) / d)). */
const exactScaleWgsl = /* wgsl */ `
// Unsigned 64-bit integers as vec2u(low word, high word).
fn u64Shl(v: vec2u, s: u32) -> vec2u {
  if (s == 0u) { return v; }
  if (s >= 64u) { return vec2u(0u); }
  if (s >= 32u) { return vec2u(0u, v.x << (s - 32u)); }
  return vec2u(v.x << s, (v.y << s) | (v.x >> (32u - s)));
}
fn u64Shr(v: vec2u, s: u32) -> vec2u {
  if (s == 0u) { return v; }
  if (s >= 64u) { return vec2u(0u); }
  if (s >= 32u) { return vec2u(v.y >> (s - 32u), 0u); }
  return vec2u((v.x >> s) | (v.y << (32u - s)), v.y >> s);
}
fn u64Add(a: vec2u, b: vec2u) -> vec2u {
  let lo = a.x + b.x;
  return vec2u(lo, a.y + b.y + select(0u, 1u, lo < a.x));
}
fn u64Less(a: vec2u, b: vec2u) -> bool { return a.y < b.y || (a.y == b.y && a.x < b.x); }
fn u64Clz(v: vec2u) -> u32 {
  if (v.y != 0u) { return countLeadingZeros(v.y); }
  return 32u + countLeadingZeros(v.x);
}
fn u64LowMask(s: u32) -> vec2u {
  if (s >= 64u) { return vec2u(0xffffffffu); }
  if (s >= 32u) { return vec2u(0xffffffffu, (1u << (s - 32u)) - 1u); }
  return vec2u((1u << s) - 1u, 0u);
}
// Drops the low s bits (1 <= s <= 63), rounding to nearest, ties to even; sticky says
// that nonzero bits lie below v.
fn u64RoundShr(v: vec2u, s: u32, sticky: bool) -> vec2u {
  let kept = u64Shr(v, s);
  let rem = v & u64LowMask(s);
  let half = u64Shl(vec2u(1u, 0u), s - 1u);
  let up = u64Less(half, rem) || (all(rem == half) && (sticky || (kept.x & 1u) == 1u));
  return select(kept, u64Add(kept, vec2u(1u, 0u)), up);
}
struct DivMod { q: vec2u, r: u32 }
fn u64DivSmall(v: vec2u, d: u32) -> DivMod {
  let qh = v.y / d;
  var r = v.y % d;
  var t = (r << 16u) | (v.x >> 16u);
  let q1 = t / d;
  r = t % d;
  t = (r << 16u) | (v.x & 0xffffu);
  let q0 = t / d;
  r = t % d;
  return DivMod(vec2u((q1 << 16u) | q0, qh), r);
}
// value = m * 2^e with m in [2^23, 2^24), for the bits of a positive finite f32.
struct Mant { m: u32, e: i32 }
fn f32Mant(bits: u32) -> Mant {
  let ex = (bits >> 23u) & 255u;
  var m = bits & 0x7fffffu;
  var e = -149;
  if (ex != 0u) { m |= 0x800000u; e = i32(ex) - 150; }
  let lz = countLeadingZeros(m) - 8u;
  return Mant(m << lz, e - i32(lz));
}
// f16 bits of f32(f64(f64(a + b) / d)) for non-negative finite f32 bit patterns a, b.
fn exactScale(aBits: u32, bBits: u32, d: u32) -> u32 {
  let big = max(aBits, bBits);
  let small = min(aBits, bBits);
  if (big == 0u) { return 0u; }
  // The exact sum with the larger operand's 24 bits at bits 39..62.
  let xa = f32Mant(big);
  var v = vec2u(0u, xa.m << 7u);
  var e = xa.e - 39;
  var sticky = false;
  if (small != 0u) {
    let xb = f32Mant(small);
    let sh = xa.e - xb.e;
    if (sh <= 39) {
      v = u64Add(v, u64Shl(vec2u(xb.m, 0u), u32(39 - sh)));
    } else {
      let r = u32(sh - 39);
      v = u64Add(v, u64Shr(vec2u(xb.m, 0u), r));
      sticky = any((vec2u(xb.m, 0u) & u64LowMask(r)) != vec2u(0u));
    }
  }
  // float64 sum: 53 significant bits.
  var drop = 11u - u64Clz(v);
  v = u64RoundShr(v, drop, sticky);
  e += i32(drop);
  // float64 quotient: shift the dividend to bits ..62 so the quotient has >= 58 bits.
  let up = u64Clz(v) - 1u;
  v = u64Shl(v, up);
  e -= i32(up);
  let qr = u64DivSmall(v, d);
  drop = 11u - u64Clz(qr.q);
  var q = u64RoundShr(qr.q, drop, qr.r != 0u);
  e += i32(drop);
  // float32: 24 significant bits.
  drop = 40u - u64Clz(q);
  q = u64RoundShr(q, drop, false);
  e += i32(drop);
  var m = q.x;
  if (m == 0x1000000u) { m = 0x800000u; e += 1; }
  // float32 -> f16, round to nearest even (as f32ToF16 in gpu.ts).
  let e16 = e + 23 + 15;
  if (e16 >= 31) { return 0x7c00u; }
  if (e16 <= 0) {
    if (e16 < -10) { return 0u; }
    let shift = u32(14 - e16);
    var h = m >> shift;
    let rem = m & ((1u << shift) - 1u);
    let half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (h & 1u) == 1u)) { h += 1u; }
    return h;
  }
  var h = (u32(e16) << 10u) | ((m & 0x7fffffu) >> 13u);
  let rem = m & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u) == 1u)) { h += 1u; }
  return h;
}
// Exact f16 -> f32 (unpack2x16float may flush subnormals).
fn f16Value(h: u32) -> f32 {
  let ex = (h >> 10u) & 31u;
  let m = h & 1023u;
  var v = f32(m) * 5.9604644775390625e-8;
  if (ex == 31u) { v = bitcast<f32>(0x7f800000u | (m << 13u)); }
  else if (ex != 0u) { v = bitcast<f32>(((ex + 112u) << 23u) | (m << 13u)); }
  return select(v, -v, (h & 0x8000u) != 0u);
}
// roundHalfEven(v / s) for a positive finite f16 scale s, clamped to about +-21 (q is
// clamped to 0..15 after adding a zero point in 0..15, so farther values are equivalent).
fn roundDiv(v: f32, s: f32) -> i32 {
  var c = i32(round(clamp(v / s, -20.0, 20.0)));
  let lower = (f32(c) - 0.5) * s;
  let upper = (f32(c) + 0.5) * s;
  if (v < lower || (v == lower && (c & 1) == 1)) { c -= 1; }
  else if (v > upper || (v == upper && (c & 1) == 1)) { c += 1; }
  return c;
}`;

/**
 * The source binding and, for element e: srcBits(e) (its raw bits), valueOf(bits) (as
 * f32), badBits(bits) (1 when NaN or infinite: exponent all ones) and srcAt(e).
 */
function sourceWgsl(srcType: Q4SourceType, binding: number): string {
  const decl = `@group(0) @binding(${binding}) var<storage, read> src: array<u32>;`;
  switch (srcType) {
    case 'f32':
      return `${decl}  // f32 bits
fn srcBits(e: u32) -> u32 { return src[e]; }
fn valueOf(bits: u32) -> f32 { return bitcast<f32>(bits); }
fn badBits(bits: u32) -> u32 { return select(0u, 1u, (bits & 0x7f800000u) == 0x7f800000u); }
fn srcAt(e: u32) -> f32 { return bitcast<f32>(src[e]); }`;
    case 'f16':
      return `${decl}  // f16 pairs
fn srcBits(e: u32) -> u32 { return (src[e >> 1u] >> ((e & 1u) * 16u)) & 0xffffu; }
fn valueOf(bits: u32) -> f32 { return f16Value(bits); }
fn badBits(bits: u32) -> u32 { return select(0u, 1u, (bits & 0x7c00u) == 0x7c00u); }
fn srcAt(e: u32) -> f32 { return f16Value(srcBits(e)); }`;
    case 'bf16':
      return `${decl}  // bf16 pairs
fn srcBits(e: u32) -> u32 { return (src[e >> 1u] >> ((e & 1u) * 16u)) & 0xffffu; }
fn valueOf(bits: u32) -> f32 { return bitcast<f32>(bits << 16u); }
fn badBits(bits: u32) -> u32 { return select(0u, 1u, (bits & 0x7f80u) == 0x7f80u); }
fn srcAt(e: u32) -> f32 { return bitcast<f32>(srcBits(e) << 16u); }`;
  }
}

const QUANTIZE_PARAMS = uniforms('Params', { rows: 'u32', K: 'u32', nb: 'u32', srcOffset: 'u32', row0: 'u32', slot: 'u32' });

export const quantizeQ4Kernel = kernelCache((srcType: Q4SourceType, zeros: boolean, countNonFinite = false) => ({
  label: `q4_quantize ${srcType}${zeros ? ' zeros' : ''}${countNonFinite ? ' nonfinite' : ''}`,
  code: /* wgsl */ `
${QUANTIZE_PARAMS.wgsl}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> qw: array<vec4u>;        // [rows, nb] blocks
@group(0) @binding(2) var<storage, read_write> sc: array<atomic<u32>>;  // [rows, nb] f16 pairs
${zeros ? '@group(0) @binding(3) var<storage, read_write> zp: array<atomic<u32>>;  // [rows, ceil(nb/2)] bytes' : ''}
${sourceWgsl(srcType, zeros ? 4 : 3)}
${countNonFinite ? `@group(0) @binding(${zeros ? 5 : 4}) var<storage, read_write> nonFinite: array<atomic<u32>>;` : ''}
${exactScaleWgsl}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let g = ${WG_LINEAR} * ${WG}u + lid;
  if (g >= p.rows * p.nb) { return; }
  let row = g / p.nb;
  let b = g % p.nb;
  let k0 = b * 32u;
  let len = min(32u, p.K - k0);
  let e0 = p.srcOffset + row * p.K + k0;
  var lo = 0.0;
  var hi = 0.0;
  var bad = 0u;
  for (var j = 0u; j < len; j++) {
    let bits = srcBits(e0 + j);
    let v = valueOf(bits);
    lo = min(lo, v);
    hi = max(hi, v);
    ${countNonFinite ? 'bad += badBits(bits);' : ''}
  }
  ${countNonFinite ? 'if (bad > 0u) { atomicAdd(&nonFinite[p.slot], bad); }' : ''}
  let loBits = bitcast<u32>(lo) & 0x7fffffffu;  // |lo|
  let hiBits = bitcast<u32>(hi) & 0x7fffffffu;
  ${zeros ? 'let sBits = exactScale(hiBits, loBits, 15u);' : 'let sBits = exactScale(max(hiBits, loBits), 0u, 7u);'}
  let s = f16Value(sBits);
  // A scale that rounded to f16 infinity makes every v / scale zero.
  let finite = sBits < 0x7c00u;
  var zero = ${zeros ? '0' : '8'};
  ${zeros ? 'if (sBits != 0u && finite) { zero = clamp(roundDiv(-lo, s), 0, 15); }' : ''}
  var words = vec4u(0u);
  for (var j = 0u; j < len; j++) {
    var q = zero;
    if (sBits != 0u && finite) { q = clamp(roundDiv(srcAt(e0 + j), s) + zero, 0, 15); }
    words[j / 8u] |= u32(q) << ((j % 8u) * 4u);
  }
  let r = p.row0 + row;
  let blk = r * p.nb + b;
  qw[blk] = words;
  atomicOr(&sc[blk >> 1u], sBits << ((blk & 1u) * 16u));
  ${zeros ? `let zi = r * ((p.nb + 1u) >> 1u) + (b >> 1u);
  atomicOr(&zp[zi >> 2u], u32(zero) << ((zi & 3u) * 8u + (b & 1u) * 4u));` : ''}
}`,
}));

/**
 * Quantizes W [M, K], already on the GPU, into a sharded Q4Weight (new tensors the
 * caller owns; see releaseQ4). Bit-identical to quantizeQ4Ref.
 */
export function quantizeQ4(gpu: Gpu, src: Tensor, M: number, K: number, opts: QuantizeQ4Options): Q4Weight {
  const zeros = opts.zeros ?? true;
  const { srcType } = opts;
  const elemBytes = srcType === 'f32' ? 4 : 2;
  if (!(M > 0 && K > 0)) throw new Error(`quantizeQ4: bad shape [${M}, ${K}]`);
  if (src.byteLength < Math.ceil((M * K * elemBytes) / 4) * 4) {
    throw new Error(`quantizeQ4: ${src} holds ${src.byteLength} bytes, less than [${M}, ${K}] ${srcType}`);
  }
  const nb = q4Blocks(K);
  const zb = Math.ceil(nb / 2);
  const rowsPer = q4ShardRows(M, K, opts.maxShardBytes ?? gpu.caps.maxStorageBufferBindingSize);
  // Each dispatch binds only the source rows it reads, so a source larger than one
  // binding still works: at most `chunkRows` rows per dispatch.
  const align = gpu.device.limits.minStorageBufferOffsetAlignment;
  const maxBinding = Math.min(opts.maxSourceBytes ?? Infinity, gpu.caps.maxStorageBufferBindingSize);
  const chunkRows = Math.floor((maxBinding - align - 4) / (K * elemBytes));
  if (chunkRows < 1) throw new Error(`quantizeQ4: one row of ${K} ${srcType} values does not fit a storage binding`);
  const nf = opts.nonFinite ?? null;
  if (nf && !(Number.isInteger(nf.slot) && nf.slot >= 0 && nf.slot < nf.counts.size)) throw new Error(`quantizeQ4: non-finite slot ${nf.slot} is outside ${nf.counts}`);
  const kernel = quantizeQ4Kernel(srcType, zeros, nf !== null);
  const shards: Q4Shard[] = [];
  for (let r0 = 0; r0 < M; r0 += rowsPer) {
    const rows = Math.min(rowsPer, M - r0);
    const shard: Q4Shard = {
      rowStart: r0,
      rows,
      qweight: gpu.empty([rows * nb * 4], 'u32', 'q4.qweight'),
      scales: gpu.zeros([Math.ceil((rows * nb) / 2)], 'u32', 'q4.scales'),
      zeros: zeros ? gpu.zeros([Math.ceil((rows * zb) / 4)], 'u32', 'q4.zeros') : null,
    };
    shards.push(shard);
    for (let c = 0; c < rows; c += chunkRows) {
      const cr = Math.min(chunkRows, rows - c);
      const byteStart = (r0 + c) * K * elemBytes;
      const offset = Math.floor(byteStart / align) * align;
      const end = Math.min(src.buffer.size, Math.ceil((byteStart + cr * K * elemBytes) / 4) * 4);
      const params = QUANTIZE_PARAMS.params({ rows: cr, K, nb, srcOffset: (byteStart - offset) / elemBytes, row0: c, slot: nf?.slot ?? 0 });
      const bindings = [...q4ShardBindings(shard), { buffer: src.buffer, offset, size: end - offset }, ...(nf ? [nf.counts] : [])];
      gpu.dispatch(kernel, bindings, grid(ceilDiv(cr * nb, WG)), params);
    }
  }
  return { M, K, nb, shards };
}

// ---- dequantize ------------------------------------------------------------------

export const dequantizeQ4Kernel = kernelCache((zeros: boolean) => ({
  label: `q4_dequantize${zeros ? ' zeros' : ''}`,
  code: /* wgsl */ `
struct Params { rows: u32, K: u32, nb: u32, row0: u32, outRow0: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;  // [rows, K]
${q4Wgsl(2, zeros)}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let i = ${WG_LINEAR} * ${WG}u + lid;  // one u32 word: 8 values
  if (i >= p.rows * p.nb * 4u) { return; }
  let row = i / (p.nb * 4u);
  let b = (i / 4u) % p.nb;
  let r = p.row0 + row;
  let blk = r * p.nb + b;
  let u = qw[blk][i % 4u];
  let s = q4Scale(blk);
  let z = q4Zero(r, b, p.nb);
  let lo = (q4Lo(u) - z) * s;
  let hi = (q4Hi(u) - z) * s;
  var v = array<f32, 8>(lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w);
  let k0 = b * 32u + (i % 4u) * 8u;
  let base = (p.outRow0 + row) * p.K;
  for (var j = 0u; j < 8u; j++) {
    if (k0 + j < p.K) { out[base + k0 + j] = v[j]; }
  }
}`,
}));

/** out[rows, K] = the f32 values of W[rowStart : rowStart + rows, :]. */
export function dequantizeQ4(gpu: Gpu, out: Tensor, W: Q4Weight, rowStart: number, rows: number): void {
  if (out.size < rows * W.K) throw new Error(`dequantizeQ4: ${out} is smaller than [${rows}, ${W.K}]`);
  const zeros = W.shards[0]!.zeros !== null;
  for (const pc of q4Pieces(W, rowStart, rows)) {
    const params = new Params().u32(pc.rows).u32(W.K).u32(W.nb).u32(pc.local).u32(pc.offset);
    gpu.dispatch(dequantizeQ4Kernel(zeros), [out, ...q4ShardBindings(pc.shard)], grid(ceilDiv(pc.rows * W.nb * 4, WG)), params);
  }
}
