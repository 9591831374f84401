/**
 * Element-type conversion between f32 and f16 tensors (gpu.copy moves bytes, this
 * converts): dst[dstOffset + i] = src[srcOffset + i] for i < count, f32 -> f16 rounds
 * to nearest, f16 -> f32 is exact. Counts and offsets are elements, multiples of 4
 * (every K/V row is HK x D with D a multiple of 4), so each thread moves one vec4 and
 * no two threads write the same 32-bit word. Needs shader-f16.
 */
import type { Gpu } from '../gpu/gpu';
import { Params } from '../gpu/params';
import type { Tensor } from '../gpu/tensor';
import { WG_LINEAR, ceilDiv, enables, grid, kernelCache } from './wgsl';

type FloatDtype = 'f32' | 'f16';

const WG = 256;

const convertKernel = kernelCache((to: FloatDtype, from: FloatDtype) => {
  const vt = (d: FloatDtype) => (d === 'f16' ? 'vec4h' : 'vec4f');
  return {
    label: `convert ${from}->${to}`,
    code: /* wgsl */ `${enables({ f16: true })}
struct Params { n4: u32, dst4: u32, src4: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> dst: array<${vt(to)}>;
@group(0) @binding(2) var<storage, read> src: array<${vt(from)}>;

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let i = ${WG_LINEAR} * ${WG}u + lid;
  if (i >= p.n4) { return; }
  dst[p.dst4 + i] = ${vt(to)}(src[p.src4 + i]);
}`,
  };
});

/** dst[dstOffset ..] = src[srcOffset ..] (count elements) converted between f32 and f16. */
export function convertCopy(gpu: Gpu, dst: Tensor, src: Tensor, count = src.size, srcOffset = 0, dstOffset = 0): void {
  const from = src.dtype;
  const to = dst.dtype;
  if ((from !== 'f32' && from !== 'f16') || (to !== 'f32' && to !== 'f16')) throw new Error(`convertCopy: needs f32 or f16 tensors, got ${src} -> ${dst}`);
  if (from === to) throw new Error(`convertCopy: ${src} -> ${dst} has nothing to convert; use gpu.copy`);
  if (!gpu.caps.f16) throw new Error('convertCopy: f16 tensors need the shader-f16 feature, which this device lacks');
  for (const [k, v] of [['count', count], ['srcOffset', srcOffset], ['dstOffset', dstOffset]] as const) {
    if (!(Number.isInteger(v) && v >= 0 && v % 4 === 0)) throw new Error(`convertCopy: ${k} = ${v} must be a non-negative multiple of 4 elements`);
  }
  if (srcOffset + count > src.size) throw new Error(`convertCopy: reads ${srcOffset} + ${count} elements of ${src}`);
  if (dstOffset + count > dst.size) throw new Error(`convertCopy: writes ${dstOffset} + ${count} elements of ${dst}`);
  if (count === 0) return;
  gpu.dispatch(convertKernel(to, from), [dst, src], grid(ceilDiv(count / 4, WG)), new Params().u32(count / 4).u32(dstOffset / 4).u32(srcOffset / 4));
}
