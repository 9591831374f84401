/**
 * Small helpers shared by the WGSL generators. Every kernel module generates its
 * WGSL from a TypeScript function of (dtype, workgroup size, flags) and caches the
 * KernelSource it returns; nothing is string-patched afterwards.
 */
import type { KernelSource } from '../gpu/pipelines';

export const MAX_WORKGROUPS_PER_DIM = 65535;

/**
 * Workgroup counts for `n` independent workgroup-sized items, folded into y when x
 * would exceed the per-dimension limit. Pair with `WG_LINEAR` in the shader.
 */
export function grid(nWorkgroups: number): [number, number] {
  if (nWorkgroups <= MAX_WORKGROUPS_PER_DIM) return [nWorkgroups, 1];
  const y = Math.ceil(nWorkgroups / MAX_WORKGROUPS_PER_DIM);
  return [Math.ceil(nWorkgroups / y), y];
}

/** WGSL expression for the linear workgroup index under `grid()`. Needs `wid` and `nwg` builtins. */
export const WG_LINEAR = '(wid.x + wid.y * nwg.x)';

/**
 * Memoizes a kernel generator on its (JSON-serialisable) arguments, so one set of
 * arguments always yields the same KernelSource object (the pipeline cache keys on
 * the object). Scalar arguments key by a short joined string; objects by JSON.
 */
export function kernelCache<A extends unknown[]>(make: (...args: A) => KernelSource): (...args: A) => KernelSource {
  const cache = new Map<string, KernelSource>();
  return (...args: A) => {
    let key = '';
    for (const a of args) {
      key += typeof a === 'object' && a !== null ? JSON.stringify(a) : `${typeof a}:${String(a)}`;
      key += ',';
    }
    let k = cache.get(key);
    if (!k) cache.set(key, (k = make(...args)));
    return k;
  };
}

export function ceilDiv(a: number, b: number): number {
  return Math.floor((a + b - 1) / b);
}

/** `enable f16;` when the kernel stores or computes in f16. */
export function enables(opts: { f16?: boolean; subgroups?: boolean }): string {
  return [opts.f16 ? 'enable f16;' : '', opts.subgroups ? 'enable subgroups;' : ''].filter(Boolean).join('\n');
}

/**
 * WGSL for tree reductions across one workgroup: declares `var<workgroup> red` of
 * `wg` f32 and, per requested op, `fn workgroupSum / workgroupMax(v: f32, lid: u32) -> f32`.
 * Every invocation must call them (they contain barriers); each returns the result to all.
 */
export function workgroupReduceWgsl(wg: number, ops: readonly ('sum' | 'max')[]): string {
  const combine = { sum: 'red[lid] + red[lid + s]', max: 'max(red[lid], red[lid + s])' };
  const fns = ops.map(
    (op) => `
fn workgroup${op === 'sum' ? 'Sum' : 'Max'}(v: f32, lid: u32) -> f32 {
  red[lid] = v;
  workgroupBarrier();
  for (var s = ${wg / 2}u; s > 0u; s >>= 1u) {
    if (lid < s) { red[lid] = ${combine[op]}; }
    workgroupBarrier();
  }
  let r = red[0];
  workgroupBarrier();
  return r;
}`,
  );
  return `var<workgroup> red: array<f32, ${wg}>;${fns.join('')}`;
}
