/**
 * Element-wise ops over flat f32 tensors of n elements: add, scale, axpy, fill and the
 * SwiGLU activation of Llama's MLP (out = silu(gate) * up) with its backward.
 *
 * Every op is generated from one `MapSpec` by `mapKernel`, in two widths:
 *   vec4: each invocation handles 4 consecutive elements (128-bit loads and stores).
 *         The last vec4 may straddle n; its lanes past n are written back unchanged
 *         (read-modify-write), so memory past n is never altered. Needs every bound
 *         buffer to hold ceil(n / 4) * 16 bytes, which pool buffers always do.
 *   scalar: one element per invocation, for buffers too short for the vec4 view.
 * Workgroup counts go through grid(), so n is bounded only by buffer sizes.
 *
 * Aliasing: WebGPU rejects one buffer bound both writable and read-only in a
 * dispatch, so `out` must not be an input; use the *InPlace forms instead.
 */
import type { Gpu } from '../gpu/gpu';
import { Params } from '../gpu/params';
import type { KernelSource } from '../gpu/pipelines';
import type { Tensor } from '../gpu/tensor';
import { WG_LINEAR, ceilDiv, grid, kernelCache } from './wgsl';

const WG = 256;

/**
 * An element-wise op. In `body`, every array is a local of type `T` (vec4<f32> or f32)
 * with the array's name: inputs and inouts hold their loaded values, outputs start at
 * zero, and whatever outputs and inouts hold afterwards is stored. Scalars are
 * `p.<name>` (f32 uniforms).
 */
export interface MapSpec {
  label: string;
  /** written (=) */
  outputs: readonly string[];
  /** read and written (+=, optimizer state) */
  inouts?: readonly string[];
  /** read */
  inputs: readonly string[];
  /** f32 uniforms, in the order the caller passes them */
  scalars?: readonly string[];
  /** extra read-only f32 storage arrays bound after the element arrays (not indexed by element) */
  globals?: readonly string[];
  /** statements run before any element is loaded (may `return`) */
  prologue?: string;
  body: string;
}

function mapWgsl(spec: MapSpec, vec4: boolean): KernelSource {
  const inouts = spec.inouts ?? [];
  const scalars = spec.scalars ?? [];
  const globals = spec.globals ?? [];
  const T = vec4 ? 'vec4<f32>' : 'f32';
  const W = vec4 ? 4 : 1;
  let binding = 1;
  const decls: string[] = [];
  for (const name of [...spec.outputs, ...inouts]) {
    decls.push(`@group(0) @binding(${binding++}) var<storage, read_write> b_${name}: array<T>;`);
  }
  for (const name of spec.inputs) decls.push(`@group(0) @binding(${binding++}) var<storage, read> b_${name}: array<T>;`);
  for (const name of globals) decls.push(`@group(0) @binding(${binding++}) var<storage, read> ${name}: array<f32>;`);
  const loads = [
    ...spec.inputs.map((a) => `let ${a} = b_${a}[i];`),
    ...inouts.map((a) => `var ${a} = b_${a}[i];`),
    ...spec.outputs.map((a) => `var ${a} = T();`),
  ];
  const written = [...spec.outputs, ...inouts];
  const stores = vec4
    ? `if (i * 4u + 4u <= p.n) {
    ${written.map((a) => `b_${a}[i] = ${a};`).join('\n    ')}
  } else {
    let keep = vec4u(0u, 1u, 2u, 3u) + i * 4u < vec4u(p.n);
    ${written.map((a) => `b_${a}[i] = select(b_${a}[i], ${a}, keep);`).join('\n    ')}
  }`
    : written.map((a) => `b_${a}[i] = ${a};`).join('\n  ');
  return {
    label: `${spec.label} ${vec4 ? 'vec4' : 'f32'}`,
    code: /* wgsl */ `
alias T = ${T};
struct Params { n: u32, ${scalars.map((s) => `${s}: f32`).join(', ')} }
@group(0) @binding(0) var<uniform> p: Params;
${decls.join('\n')}
@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let i = ${WG_LINEAR} * ${WG}u + lid;
  if (i >= (p.n + ${W - 1}u) / ${W}u) { return; }
  ${spec.prologue ?? ''}
  ${loads.join('\n  ')}
  ${spec.body}
  ${stores}
}`,
  };
}

/**
 * Memoizes an op's two kernels and returns its launcher. `arrays` are bound in the
 * spec's order (outputs, inouts, inputs), then `globals`; `scalars` in the spec's order.
 */
export function mapKernel(spec: MapSpec) {
  const kernel = kernelCache((vec4: boolean) => mapWgsl(spec, vec4));
  const arity = spec.outputs.length + (spec.inouts?.length ?? 0) + spec.inputs.length;
  return (gpu: Gpu, arrays: readonly Tensor[], n: number, scalars: readonly number[] = [], globals: readonly Tensor[] = []): void => {
    if (arrays.length !== arity || scalars.length !== (spec.scalars?.length ?? 0) || globals.length !== (spec.globals?.length ?? 0)) {
      throw new Error(`${spec.label}: wrong number of arguments`);
    }
    if (n === 0) return;
    for (const t of arrays) {
      if (t.dtype !== 'f32' || t.buffer.size < n * 4) throw new Error(`${spec.label}: ${t} holds fewer than ${n} f32 elements`);
    }
    const vec4 = arrays.every((t) => t.buffer.size >= ceilDiv(n, 4) * 16);
    const params = new Params().u32(n);
    for (const s of scalars) params.f32(s);
    gpu.dispatch(kernel(vec4), [...arrays, ...globals], grid(ceilDiv(ceilDiv(n, vec4 ? 4 : 1), WG)), params);
  };
}

const addOp = mapKernel({ label: 'add', outputs: ['out'], inputs: ['a', 'b'], body: 'out = a + b;' });
const addInPlaceOp = mapKernel({ label: 'add_inplace', outputs: [], inouts: ['a'], inputs: ['b'], body: 'a += b;' });
const scaleOp = mapKernel({ label: 'scale', outputs: ['out'], inputs: ['a'], scalars: ['s'], body: 'out = a * p.s;' });
const scaleInPlaceOp = mapKernel({ label: 'scale_inplace', outputs: [], inouts: ['a'], inputs: [], scalars: ['s'], body: 'a *= p.s;' });
const axpyOp = mapKernel({ label: 'axpy', outputs: [], inouts: ['y'], inputs: ['x'], scalars: ['alpha'], body: 'y += p.alpha * x;' });
const fillOp = mapKernel({ label: 'fill', outputs: ['t'], inputs: [], scalars: ['value'], body: 't = T(p.value);' });

// sigmoid written with exp(-x): overflow gives 1/inf = 0, never NaN.
const swigluForwardOp = mapKernel({
  label: 'swiglu_forward',
  outputs: ['out'],
  inputs: ['gate', 'up'],
  body: 'out = gate / (1.0 + exp(-gate)) * up;',
});
const swigluBackwardOp = mapKernel({
  label: 'swiglu_backward',
  outputs: ['dgate', 'dup'],
  inputs: ['dout', 'gate', 'up'],
  body: `let sig = 1.0 / (1.0 + exp(-gate));
  dup = dout * gate * sig;
  dgate = dout * up * sig * (1.0 + gate * (1.0 - sig));`,
});

/** out = a + b */
export function add(gpu: Gpu, out: Tensor, a: Tensor, b: Tensor, n: number): void {
  addOp(gpu, [out, a, b], n);
}

/** a += b */
export function addInPlace(gpu: Gpu, a: Tensor, b: Tensor, n: number): void {
  addInPlaceOp(gpu, [a, b], n);
}

/** out = s * a */
export function scale(gpu: Gpu, out: Tensor, a: Tensor, s: number, n: number): void {
  scaleOp(gpu, [out, a], n, [s]);
}

/** a *= s */
export function scaleInPlace(gpu: Gpu, a: Tensor, s: number, n: number): void {
  scaleInPlaceOp(gpu, [a], n, [s]);
}

/** y += alpha * x */
export function axpy(gpu: Gpu, y: Tensor, alpha: number, x: Tensor, n: number): void {
  axpyOp(gpu, [y, x], n, [alpha]);
}

/** t[0..n) = value (any f32, NaN included). For zeros gpu.clear(t) is cheaper. */
export function fill(gpu: Gpu, t: Tensor, value: number, n: number): void {
  fillOp(gpu, [t], n, [value]);
}

/** out = silu(gate) * up, all [N, F] flattened to n = N * F. */
export function swigluForward(gpu: Gpu, out: Tensor, gate: Tensor, up: Tensor, n: number): void {
  swigluForwardOp(gpu, [out, gate, up], n);
}

/** dgate, dup = (written) gradients of out = silu(gate) * up given dout; recomputes silu from gate. */
export function swigluBackward(gpu: Gpu, dgate: Tensor, dup: Tensor, dout: Tensor, gate: Tensor, up: Tensor, n: number): void {
  swigluBackwardOp(gpu, [dgate, dup, dout, gate, up], n);
}
