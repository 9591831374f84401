/**
 * Workgroup reductions through subgroup operations (the `subgroups` feature), the
 * counterpart of workgroupReduceWgsl's tree in workgroup memory: each subgroup reduces
 * with one subgroupAdd / subgroupMax, its first lane stores the partial, and every
 * invocation combines the ceil(WG / sgSize) partials in a fixed order, so results are
 * deterministic. Two barriers per reduction instead of log2(WG) + 2.
 *
 * Correct for any subgroup size (4 on SwiftShader, 8 on lavapipe, 16-64 on GPUs, up to
 * 128, also larger than the workgroup): the partials array holds one slot per subgroup
 * of the smallest size WebGPU allows (4). Like other WebGPU subgroup kernels it relies on
 * a 1-D workgroup being split into subgroups of consecutive local_invocation_index.
 *
 * The entry point passes its subgroup size (`@builtin(subgroup_size)`, uniform) to the
 * functions: `workgroupSum(v, lid, sgSize)` / `workgroupMax(v, lid, sgSize)`. Every
 * invocation must call them in uniform control flow (they contain barriers).
 */

import type { Gpu } from '../gpu/gpu';

/** The smallest subgroup size a WebGPU device may report. */
export const MIN_SUBGROUP_SIZE = 4;

/**
 * Whether a kernel reduces through subgroup operations: `requested` (a kernel's
 * `subgroups` option) or, by default, wherever the device has the feature. Asking for
 * them on a device without it throws, naming the caller.
 */
export function useSubgroups(gpu: Gpu, requested: boolean | undefined, what: string): boolean {
  const sg = requested ?? gpu.caps.subgroups;
  if (sg && !gpu.caps.subgroups) throw new Error(`${what}: subgroup reductions need the subgroups feature, which this device lacks`);
  return sg;
}

export function subgroupReduceWgsl(wg: number, ops: readonly ('sum' | 'max')[]): string {
  const slots = Math.ceil(wg / MIN_SUBGROUP_SIZE);
  const fns = ops.map((op) => {
    const [name, sg, comb] = op === 'sum' ? ['Sum', 'subgroupAdd', (a: string, b: string) => `${a} + ${b}`] : ['Max', 'subgroupMax', (a: string, b: string) => `max(${a}, ${b})`];
    return `
fn workgroup${name}(v: f32, lid: u32, sgSize: u32) -> f32 {
  let s = ${sg}(v);
  if (lid % sgSize == 0u) { sgPart[lid / sgSize] = s; }
  workgroupBarrier();
  let n = (${wg}u + sgSize - 1u) / sgSize;
  var r = sgPart[0];
  for (var i = 1u; i < n; i++) { r = ${comb('r', 'sgPart[i]')}; }
  workgroupBarrier();
  return r;
}`;
  });
  return `var<workgroup> sgPart: array<f32, ${slots}>;${fns.join('')}`;
}

/**
 * WGSL for sums over row groups of `lanes` consecutive invocations (`lanes` a power of
 * two dividing `wg`; group g is invocations g * lanes .. g * lanes + lanes - 1), each
 * summing `outs * copies` values: the GEMVs' combine of the partial dot products that
 * their lanes computed over a row's blocks.
 *
 * `fn laneGroupSum(v: ptr<function, array<f32, outs * copies>>, lane, lid, sgSize)`
 * first sums over span = min(subgroup size, lanes) lanes with a subgroupShuffleXor
 * butterfly (aligned spans lie inside one subgroup; subgroup sizes are powers of two),
 * after which every lane of a span holds the same sums (a + b == b + a). When a
 * subgroup is narrower than the group (lanes / span > 1 spans, e.g. 32 lanes on
 * subgroups of 4 or 8), each span's first lane stores its sums in workgroup memory and
 * the lane that needs a total adds the group's spans in order. Afterwards (*v)[c * outs
 * + i] is the group's total for every copy c and every i with i % lanes == lane (every
 * i when one subgroup holds the group). Deterministic: fixed order at every step.
 * Contains a barrier: call in uniform control flow.
 */
export function laneGroupSumWgsl(wg: number, lanes: number, outs: number, copies = 1): string {
  if (lanes < 1 || (lanes & (lanes - 1)) !== 0 || wg % lanes !== 0) throw new Error(`laneGroupSumWgsl: lanes=${lanes} is not a power of two dividing ${wg}`);
  const count = outs * copies;
  const slots = Math.ceil(wg / MIN_SUBGROUP_SIZE);
  return `
var<workgroup> lanePart: array<f32, ${count * slots}>;  // [${count}, ${slots}]: one sum per span
fn laneGroupSum(v: ptr<function, array<f32, ${count}>>, lane: u32, lid: u32, sgSize: u32) {
  let span = min(sgSize, ${lanes}u);
  for (var s = span / 2u; s > 0u; s >>= 1u) {
    for (var i = 0u; i < ${count}u; i++) { (*v)[i] += subgroupShuffleXor((*v)[i], s); }
  }
  let parts = ${lanes}u / span;
  if (parts > 1u && lane % span == 0u) {
    for (var i = 0u; i < ${count}u; i++) { lanePart[i * ${slots}u + lid / span] = (*v)[i]; }
  }
  workgroupBarrier();
  if (parts > 1u) {
    let first = (lid - lane) / span;
    for (var i = lane; i < ${outs}u; i += ${lanes}u) {
      for (var c = 0u; c < ${copies}u; c++) {
        let o = (c * ${outs}u + i) * ${slots}u + first;
        var t = lanePart[o];
        for (var q = 1u; q < parts; q++) { t += lanePart[o + q]; }
        (*v)[c * ${outs}u + i] = t;
      }
    }
  }
}`;
}

/**
 * WGSL for `count` sums over the whole workgroup at once, the answers spread over the
 * first `count` invocations: `fn workgroupSumsAt(v: ptr<function, array<f32, count>>,
 * lid, sgSize) -> f32` returns, to invocation i < count, the workgroup's sum of
 * (*v)[i] (0 to the others). Each subgroup adds with subgroupAdd, its first lane stores
 * the sums, invocation i adds the subgroups' sums of value i in order. Any subgroup
 * size; contains a barrier: call in uniform control flow.
 */
export function workgroupSumsAtWgsl(wg: number, count: number): string {
  const slots = Math.ceil(wg / MIN_SUBGROUP_SIZE);
  return `
var<workgroup> sumsPart: array<f32, ${count * slots}>;  // [${count}, ${slots}]: one sum per subgroup
fn workgroupSumsAt(v: ptr<function, array<f32, ${count}>>, lid: u32, sgSize: u32) -> f32 {
  for (var i = 0u; i < ${count}u; i++) {
    let s = subgroupAdd((*v)[i]);
    if (lid % sgSize == 0u) { sumsPart[i * ${slots}u + lid / sgSize] = s; }
  }
  workgroupBarrier();
  if (lid >= ${count}u) { return 0.0; }
  let n = (${wg}u + sgSize - 1u) / sgSize;
  var t = sumsPart[lid * ${slots}u];
  for (var q = 1u; q < n; q++) { t += sumsPart[lid * ${slots}u + q]; }
  return t;
}`;
}
