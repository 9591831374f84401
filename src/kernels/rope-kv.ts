/**
 * RoPE fused with the KV-cache write, for a decode step (one new position per row):
 *
 *   qkv [B, (H + 2 HK) D]   the fused q/k/v GEMV's output, heads q | k | v
 *   q  [B, H, D]            = rope(q heads)
 *   kc [B, Smax, HK, D] at row offsets[b]  = rope(k heads)     (f32 or f16 cache)
 *   vc [B, Smax, HK, D] at row offsets[b]  = v heads
 *
 * with the angle f32(positions[b]) * invFreq[i], exactly rope.ts's rotation (same
 * cos/sin evaluation, same f32 products), and the cache store of kvCacheWrite (f16:
 * rounded to nearest as stored). Offsets at or past Smax drop that row's cache write.
 * Each invocation owns two neighbouring rotation indices of one head, so f16 stores
 * are whole 4-byte words and no two invocations share one.
 */
import type { Gpu } from '../gpu/gpu';
import { uniforms } from '../gpu/params';
import type { KernelSource } from '../gpu/pipelines';
import type { Tensor } from '../gpu/tensor';
import type { KvDtype } from './attention';
import { cosSinSnippet } from './rope';
import { WG_LINEAR, ceilDiv, enables, grid, kernelCache } from './wgsl';

const WG = 256;
const U = uniforms('Params', { B: 'u32', H: 'u32', HK: 'u32', D: 'u32', Smax: 'u32' });

const ropeKvKernel = kernelCache((kv: KvDtype) => {
  const c2 = kv === 'f16' ? 'vec2h' : 'vec2f';
  return {
    label: `rope_kv_write${kv === 'f16' ? ' kv=f16' : ''}`,
    code: /* wgsl */ `${enables({ f16: kv === 'f16' })}
${U.wgsl}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> q: array<vec2f>;      // [B, H, D]
@group(0) @binding(2) var<storage, read_write> kc: array<${c2}>;     // [B, Smax, HK, D]
@group(0) @binding(3) var<storage, read_write> vc: array<${c2}>;     // [B, Smax, HK, D]
@group(0) @binding(4) var<storage, read> qkv: array<vec2f>;          // [B, (H + 2 HK) D]
@group(0) @binding(5) var<storage, read> invFreq: array<vec2f>;      // [D/2]
@group(0) @binding(6) var<storage, read> positions: array<u32>;      // [B]
@group(0) @binding(7) var<storage, read> offsets: array<u32>;        // [B]
${cosSinSnippet()}
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let idx = ${WG_LINEAR} * ${WG}u + lid;
  let pairs = p.D / 4u;                    // pairs of rotation indices per head
  let heads = p.H + 2u * p.HK;
  if (idx >= p.B * heads * pairs) { return; }
  let t = idx % pairs;
  let bh = idx / pairs;
  let h = bh % heads;
  let b = bh / heads;
  let half2 = p.D / 4u;                    // D/2 in vec2 units
  let src = bh * (p.D / 2u) + t;           // vec2 index of (x[2t], x[2t+1]) in qkv
  let x1 = qkv[src];
  let x2 = qkv[src + half2];
  let off = offsets[b];
  let cacheRow = ((b * p.Smax + off) * p.HK) * (p.D / 2u);
  if (h >= p.H + p.HK) {
    if (off < p.Smax) {
      let o = cacheRow + (h - p.H - p.HK) * (p.D / 2u) + t;
      vc[o] = ${c2}(x1);
      vc[o + half2] = ${c2}(x2);
    }
    return;
  }
  let f = invFreq[t];
  let pos = f32(positions[b]);
  let cs0 = cosSin(pos * f.x);
  let cs1 = cosSin(pos * f.y);
  let c = vec2f(cs0.x, cs1.x);
  let s = vec2f(cs0.y, cs1.y);
  let lo = x1 * c - x2 * s;
  let hi = x2 * c + x1 * s;
  if (h < p.H) {
    let o = (b * p.H + h) * (p.D / 2u) + t;
    q[o] = lo;
    q[o + half2] = hi;
  } else if (off < p.Smax) {
    let o = cacheRow + (h - p.H) * (p.D / 2u) + t;
    kc[o] = ${c2}(lo);
    kc[o + half2] = ${c2}(hi);
  }
}`,
  };
});

// Looked up without kernelCache's string key: this runs once per layer per token.
let kernelF32: KernelSource | null = null;
let kernelF16: KernelSource | null = null;

/** Dimensions of one decode step's attention inputs. */
export interface RopeKvDims {
  /** rows (one new position each) */
  B: number;
  H: number;
  HK: number;
  D: number;
  /** positions per cache row */
  Smax: number;
}

/**
 * q [B, H, D] = rope(q part of qkv); kCache, vCache [B, Smax, HK, D] at row offsets[b]
 * = rope(k part), v part. qkv [B, (H + 2 HK) D] f32; invFreq [D/2] f32; positions and
 * offsets [B] u32. One dispatch.
 */
export function ropeKvWrite(gpu: Gpu, q: Tensor, kCache: Tensor, vCache: Tensor, qkv: Tensor, invFreq: Tensor, positions: Tensor, offsets: Tensor, dims: RopeKvDims): void {
  const { B, H, HK, D, Smax } = dims;
  if (!(D > 0) || D % 4 !== 0) throw new Error(`ropeKvWrite: head dim ${D} must be a positive multiple of 4`);
  const kv = kCache.dtype;
  if ((kv !== 'f32' && kv !== 'f16') || vCache.dtype !== kv) throw new Error(`ropeKvWrite: K and V caches must both be f32 or both f16, got ${kCache} and ${vCache}`);
  if (kv === 'f16' && !gpu.caps.f16) throw new Error('ropeKvWrite: an f16 KV cache needs the shader-f16 feature, which this device lacks; use an f32 cache');
  if (qkv.size < B * (H + 2 * HK) * D) throw new Error(`ropeKvWrite: qkv ${qkv} is smaller than [${B}, ${(H + 2 * HK) * D}]`);
  if (q.size < B * H * D) throw new Error(`ropeKvWrite: q ${q} is smaller than [${B}, ${H}, ${D}]`);
  if (kCache.size < B * Smax * HK * D || vCache.size < B * Smax * HK * D) throw new Error(`ropeKvWrite: caches are smaller than [${B}, ${Smax}, ${HK}, ${D}]`);
  if (invFreq.size < D / 2 || positions.size < B || offsets.size < B) throw new Error('ropeKvWrite: invFreq [D/2], positions [B] and offsets [B] are required');
  gpu.dispatch(
    kv === 'f16' ? (kernelF16 ??= ropeKvKernel('f16')) : (kernelF32 ??= ropeKvKernel('f32')),
    [q, kCache, vCache, qkv, invFreq, positions, offsets],
    grid(ceilDiv(B * (H + 2 * HK) * (D / 4), WG)),
    U.params({ B, H, HK, D, Smax }),
  );
}
