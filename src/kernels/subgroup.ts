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
