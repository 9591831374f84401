/**
 * WebGPU in Node through Dawn (the `webgpu` package). Only Node entry points (tests,
 * benchmarks, the headless runner) import this file; the browser uses navigator.gpu.
 * On machines without a GPU, scripts/webgpu-env.mjs points Vulkan at SwiftShader.
 */
import { acquireGpu, type AcquireOptions, type Gpu } from './gpu';

let entry: GPU | null = null;

export async function nodeWebGpu(): Promise<GPU> {
  if (entry) return entry;
  const dawn = (await import('webgpu')) as unknown as {
    create: (flags: string[]) => GPU;
    globals: Record<string, unknown>;
  };
  Object.assign(globalThis, dawn.globals);
  entry = dawn.create([]);
  return entry;
}

export async function acquireNodeGpu(options: Omit<AcquireOptions, 'gpu'> = {}): Promise<Gpu> {
  return acquireGpu({ ...options, gpu: await nodeWebGpu() });
}
