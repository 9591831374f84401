/**
 * Rotary position embedding, Llama convention (split halves, rotate_half = [-x2, x1]):
 *   out[i]       = x[i] cos a - x[i + D/2] sin a
 *   out[i + D/2] = x[i + D/2] cos a + x[i] sin a,      a = f32(pos[n]) * invFreq[i]  (f32 product)
 * for i < D/2, on rows x [N, heads, D]. Positions are per row, so rows of a batched
 * decode can sit at different positions. The backward rotates by -a (the transpose).
 *
 * cos/sin are evaluated here rather than with WGSL's builtins, whose accuracy is only
 * specified on [-pi, pi] (absolute 2^-11): the f32 angle is reduced by pi/2 in three
 * Cody-Waite steps and the remainder (|r| <= pi/4) goes through short Taylor series,
 * so the result tracks cos/sin of the f32 angle to a few ulp for positions well past
 * 10^4, as PyTorch's fp32 cos/sin do.
 */
import type { Llama3RopeScaling } from '../formats/llama-config';
import type { Gpu } from '../gpu/gpu';
import { Params } from '../gpu/params';
import type { Tensor } from '../gpu/tensor';
import { WG_LINEAR, grid, kernelCache } from './wgsl';

export type { Llama3RopeScaling };

/**
 * Inverse frequencies [D/2] as transformers computes them (`_compute_default_rope_parameters`
 * and `_compute_llama3_parameters`), evaluated in float64 and rounded once to f32.
 */
export function ropeInvFreq(headDim: number, theta: number, scaling?: Llama3RopeScaling | null): Float32Array {
  if (headDim % 2 !== 0) throw new Error(`ropeInvFreq: head_dim ${headDim} is odd`);
  const half = headDim / 2;
  const out = new Float32Array(half);
  for (let i = 0; i < half; i++) {
    const base = 1 / theta ** ((2 * i) / headDim);
    out[i] = scaling ? llama3Scale(base, scaling) : base;
  }
  return out;
}

function llama3Scale(invFreq: number, s: Llama3RopeScaling): number {
  const orig = s.originalMaxPositionEmbeddings;
  const lowFreqWavelen = orig / s.lowFreqFactor;
  const highFreqWavelen = orig / s.highFreqFactor;
  const wavelen = (2 * Math.PI) / invFreq;
  if (wavelen < highFreqWavelen) return invFreq;
  if (wavelen > lowFreqWavelen) return invFreq / s.factor;
  const smooth = (orig / wavelen - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
  return ((1 - smooth) * invFreq) / s.factor + smooth * invFreq;
}

const WG = 256;

/** pi/2 split for Cody-Waite reduction: C1 has 8 significant bits, C2 12, C3 the f32 rest. */
function halfPiSplit(): [number, number, number] {
  const halfPi = Math.PI / 2;
  const c1 = Math.round(halfPi * 2 ** 7) / 2 ** 7;
  const rest = halfPi - c1;
  const c2 = Math.round(rest * 2 ** 23) / 2 ** 23;
  const c3 = Math.fround(rest - c2);
  return [c1, c2, c3];
}

/** WGSL literal that parses back to exactly this f32 value. */
function f32Literal(v: number): string {
  const s = String(Math.fround(v));
  return /[.eE]/.test(s) ? s : `${s}.0`;
}

function taylor(sign: number, denominators: number[]): string[] {
  let fact = sign;
  return denominators.map((d) => {
    fact *= d;
    return f32Literal(1 / fact);
  });
}

/** `fn cosSin(a: f32) -> vec2f` returning (cos a, sin a) of the f32 angle a >= 0. */
export function cosSinSnippet(): string {
  const [c1, c2, c3] = halfPiSplit();
  // sin r = r (1 + z (s3 + z (s5 + z (s7 + z s9)))), cos r = 1 + z (c2 + z (c4 + ...)), z = r^2
  const [s3, s5, s7, s9] = taylor(1, [-6, -20, -42, -72]);
  const [k2, k4, k6, k8, k10] = taylor(1, [-2, -12, -30, -56, -90]);
  return /* wgsl */ `
fn cosSin(a: f32) -> vec2f {
  let k = round(a * ${f32Literal(2 / Math.PI)});
  var r = a - k * ${f32Literal(c1)};
  r = r - k * ${f32Literal(c2)};
  r = r - k * ${f32Literal(c3)};
  let z = r * r;
  let s = r + r * z * (${s3} + z * (${s5} + z * (${s7} + z * ${s9})));
  let c = 1.0 + z * (${k2} + z * (${k4} + z * (${k6} + z * (${k8} + z * ${k10}))));
  switch (i32(k) & 3) {
    case 0: { return vec2f(c, s); }
    case 1: { return vec2f(-s, c); }
    case 2: { return vec2f(-c, -s); }
    default: { return vec2f(s, -c); }
  }
}`;
}

/** inPlace binds x once as read_write (WebGPU forbids one buffer as both read and read_write). */
const ropeKernel = kernelCache((inPlace: boolean) => ({
  label: `rope${inPlace ? ' in-place' : ''}`,
  code: /* wgsl */ `
struct Params { N: u32, heads: u32, half: u32, sign: f32 }
@group(0) @binding(0) var<uniform> p: Params;
${
  inPlace
    ? `@group(0) @binding(1) var<storage, read_write> x: array<f32>;      // [N, heads, D] in and out
@group(0) @binding(2) var<storage, read> invFreq: array<f32>;      // [D/2]
@group(0) @binding(3) var<storage, read> positions: array<u32>;    // [N]`
    : `@group(0) @binding(1) var<storage, read_write> out: array<f32>;    // [N, heads, D]
@group(0) @binding(2) var<storage, read> x: array<f32>;            // [N, heads, D]
@group(0) @binding(3) var<storage, read> invFreq: array<f32>;      // [D/2]
@group(0) @binding(4) var<storage, read> positions: array<u32>;    // [N]`
}
${cosSinSnippet()}
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let idx = ${WG_LINEAR} * ${WG}u + lid;
  if (idx >= p.N * p.heads * p.half) { return; }
  let i = idx % p.half;
  let row = idx / p.half;
  let n = row / p.heads;
  let cs = cosSin(f32(positions[n]) * invFreq[i]);
  let sn = cs.y * p.sign;
  let lo = row * 2u * p.half + i;
  let hi = lo + p.half;
  let x1 = x[lo];
  let x2 = x[hi];
  ${inPlace ? 'x' : 'out'}[lo] = x1 * cs.x - x2 * sn;
  ${inPlace ? 'x' : 'out'}[hi] = x2 * cs.x + x1 * sn;
}`,
}));

function rope(gpu: Gpu, out: Tensor, x: Tensor, invFreq: Tensor, positions: Tensor, N: number, heads: number, D: number, sign: 1 | -1): void {
  if (D % 2 !== 0) throw new Error(`rope: head dim ${D} is odd`);
  const params = new Params().u32(N).u32(heads).u32(D / 2).f32(sign);
  const workgroups = grid(Math.ceil((N * heads * (D / 2)) / WG));
  if (out.buffer === x.buffer) gpu.dispatch(ropeKernel(true), [x, invFreq, positions], workgroups, params);
  else gpu.dispatch(ropeKernel(false), [out, x, invFreq, positions], workgroups, params);
}

/**
 * out [N, heads, D] = rope(x [N, heads, D]) with invFreq [D/2] (f32) and positions [N] (u32).
 * `out` may be `x` itself (rotates in place).
 */
export function ropeForward(gpu: Gpu, out: Tensor, x: Tensor, invFreq: Tensor, positions: Tensor, N: number, heads: number, D: number): void {
  rope(gpu, out, x, invFreq, positions, N, heads, D, 1);
}

/** dx [N, heads, D] (written) = rotation of dout by the negative angle. `dx` may be `dout`. */
export function ropeBackward(gpu: Gpu, dx: Tensor, dout: Tensor, invFreq: Tensor, positions: Tensor, N: number, heads: number, D: number): void {
  rope(gpu, dx, dout, invFreq, positions, N, heads, D, -1);
}
