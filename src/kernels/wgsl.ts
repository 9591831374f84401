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

/** Memoizes a kernel generator on its (JSON-serialisable) arguments. */
export function kernelCache<A extends unknown[]>(make: (...args: A) => KernelSource): (...args: A) => KernelSource {
  const cache = new Map<string, KernelSource>();
  return (...args: A) => {
    const key = JSON.stringify(args);
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
