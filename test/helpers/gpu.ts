import { afterAll, beforeAll, expect } from 'vitest';
import type { Gpu } from '../../src/gpu/gpu';
import { acquireNodeGpu } from '../../src/gpu/node';

/** Prints which adapter a test file runs on, with the features its kernels pick from. */
export function reportAdapter(gpu: Gpu): void {
  const c = gpu.caps;
  const file = expect.getState().testPath?.split('/test/').pop() ?? 'test';
  console.log(`[adapter] ${file}: ${c.adapterName}; shader-f16 ${c.f16 ? 'yes' : 'no'}, subgroups ${c.subgroups ? 'yes' : 'no'}, max binding ${(c.maxStorageBufferBindingSize / 2 ** 20).toFixed(0)} MiB`);
}

/**
 * A second device on the same adapter, asked without the subgroups feature, for what a
 * device lacking it does (both test drivers offer subgroups); destroyed after `fn`.
 */
export async function withoutSubgroups<T>(fn: (g: Gpu) => Promise<T> | T): Promise<T> {
  const g = await acquireNodeGpu({ subgroups: false });
  try {
    expect(g.caps.subgroups, 'a device asked without subgroups').toBe(false);
    return await fn(g);
  } finally {
    g.destroy();
  }
}

/** One GPU runtime per test file, destroyed when the file's tests finish. */
export function useGpu(): () => Gpu {
  let gpu: Gpu | null = null;
  beforeAll(async () => {
    gpu = await acquireNodeGpu();
    reportAdapter(gpu);
  });
  afterAll(() => {
    gpu?.destroy();
    gpu = null;
  });
  return () => {
    if (!gpu) throw new Error('useGpu: GPU not ready (call inside a test)');
    return gpu;
  };
}
