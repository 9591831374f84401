import { afterAll, beforeAll } from 'vitest';
import type { Gpu } from '../../src/gpu/gpu';
import { acquireNodeGpu } from '../../src/gpu/node';

/** One GPU runtime per test file, destroyed when the file's tests finish. */
export function useGpu(): () => Gpu {
  let gpu: Gpu | null = null;
  beforeAll(async () => {
    gpu = await acquireNodeGpu();
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
