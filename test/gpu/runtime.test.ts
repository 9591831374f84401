import { describe, expect, it } from 'vitest';
import { GpuDeviceLostError, GpuError, f16ToF32, f32ToF16 } from '../../src/gpu/gpu';
import { acquireNodeGpu } from '../../src/gpu/node';
import { Params } from '../../src/gpu/params';
import { bucketBytes } from '../../src/gpu/pool';
import type { KernelSource } from '../../src/gpu/pipelines';
import { useGpu } from '../helpers/gpu';
import { Rng, expectClose } from '../helpers/numeric';

/** y[i] = x[i] * s + b: a kernel small enough to reason about in runtime tests. */
const affine: KernelSource = {
  label: 'test_affine',
  code: `
struct Params { n: u32, s: f32, b: f32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3u) {
  if (gid.x < p.n) { y[gid.x] = x[gid.x] * p.s + p.b; }
}`,
};

describe('bucketBytes', () => {
  it('never shrinks, wastes at most 12.5% above 256 bytes, and is stable', () => {
    const rng = new Rng(1);
    for (let i = 0; i < 2000; i++) {
      const n = 1 + rng.int(1 << 28);
      const b = bucketBytes(n);
      expect(b).toBeGreaterThanOrEqual(n);
      if (n > 256) expect(b / n).toBeLessThanOrEqual(1.125);
      expect(bucketBytes(b)).toBe(b);
      expect(b % 4).toBe(0);
    }
  });
});

describe('Gpu runtime', () => {
  const gpu = useGpu();

  it('reports adapter name and limits', () => {
    const c = gpu().caps;
    expect(c.adapterName.length).toBeGreaterThan(0);
    expect(c.maxStorageBufferBindingSize).toBeGreaterThanOrEqual(128 * 2 ** 20);
    expect(typeof c.f16).toBe('boolean');
  });

  it('round-trips data and counts bytes in use, peak and free', async () => {
    const g = gpu();
    const before = g.stats();
    const data = new Rng(2).f32(1000);
    const t = g.upload(data, [10, 100]);
    expect(g.stats().inUseBytes - before.inUseBytes).toBe(bucketBytes(4000));
    expect(Array.from(await g.readF32(t))).toEqual(Array.from(data));
    t.release();
    expect(g.stats().inUseBytes).toBe(before.inUseBytes);
    expect(g.stats().peakInUseBytes).toBeGreaterThanOrEqual(before.inUseBytes + bucketBytes(4000));
    // Same size again reuses the freed buffer: nothing new is allocated.
    const alloc = g.stats().allocatedBytes;
    const t2 = g.empty([1000]);
    expect(g.stats().allocatedBytes).toBe(alloc);
    t2.release();
    expect(() => t2.release()).toThrow(/released twice/);
  });

  it('batches many dispatches into one submit and reads back only when asked', async () => {
    const g = gpu();
    const n = 1000;
    const x = g.upload(new Float32Array(n).fill(1), [n]);
    const a = g.empty([n]);
    const b = g.empty([n]);
    const submits = g.submits;
    // 600 dispatches (more than one uniform arena of 256 slots) ping-ponging a and b.
    let src = x;
    for (let i = 0; i < 600; i++) {
      const dst = i % 2 === 0 ? a : b;
      g.dispatch(affine, [dst, src], [Math.ceil(n / 64)], new Params().u32(n).f32(1).f32(1));
      src = dst;
    }
    expect(g.submits - submits).toBeLessThanOrEqual(2); // only arena overflows submit
    const out = await g.readF32(src);
    expectClose(out, new Float32Array(n).fill(601), { atol: 0, rtol: 0, label: 'chained affine' });
    for (const t of [x, a, b]) t.release();
  });

  it('orders a host write after work already recorded on a reused buffer', async () => {
    const g = gpu();
    const n = 64;
    const x = g.upload(new Float32Array(n).fill(3), [n]);
    const y = g.empty([n]);
    g.dispatch(affine, [y, x], [1], new Params().u32(n).f32(2).f32(0));
    x.release();
    const x2 = g.empty([n]); // the pool hands back x's buffer
    g.write(x2, new Float32Array(n).fill(100));
    expectClose(await g.readF32(y), new Float32Array(n).fill(6), { atol: 0, rtol: 0, label: 'y' });
    x2.release();
    y.release();
  });

  it('refuses to bind a released tensor and names the kernel', () => {
    const g = gpu();
    const x = g.empty([4]);
    const y = g.empty([4]);
    x.release();
    expect(() => g.dispatch(affine, [y, x], [1], new Params().u32(4).f32(1).f32(0))).toThrow(/test_affine.*released/);
    y.release();
  });

  it('reports a shader that does not compile with its label', async () => {
    const g = gpu();
    const bad: KernelSource = { label: 'broken_kernel', code: '@compute @workgroup_size(1) fn main() { let x: f32 = 1u; }' };
    g.dispatch(bad, [], [1]);
    await expect(g.sync()).rejects.toThrow(/broken_kernel/);
  });

  it('rejects allocations beyond the device limit with a clear message', () => {
    const g = gpu();
    expect(() => g.empty([g.caps.maxBufferSize])).toThrow(/allows at most/);
  });
});

describe('device loss', () => {
  it('surfaces as GpuDeviceLostError to callers and listeners', async () => {
    const g = await acquireNodeGpu();
    let heard: GpuDeviceLostError | null = null;
    g.onLost((e) => (heard = e));
    const t = g.upload(new Float32Array(4), [4]);
    g.device.destroy(); // what a driver reset looks like to the page
    await g.device.lost;
    await new Promise((r) => setTimeout(r, 0));
    expect(g.isLost).toBe(true);
    expect(heard).toBeInstanceOf(GpuDeviceLostError);
    expect(() => g.empty([4])).toThrow(GpuDeviceLostError);
    await expect(g.read(t)).rejects.toThrow(/device was lost/);
    expect(GpuDeviceLostError.prototype).toBeInstanceOf(GpuError);
  });
});

describe('f16 conversion', () => {
  it('matches exact f16 values and rounds to nearest even', () => {
    const exact = [0, 1, -2, 0.5, 65504, 2 ** -14, 2 ** -24, -0.333251953125];
    expect(Array.from(f16ToF32(f32ToF16(exact)))).toEqual(exact);
    // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: ties to even (1).
    expect(f16ToF32(f32ToF16([1 + 2 ** -11]))[0]).toBe(1);
    expect(f16ToF32(f32ToF16([1 + 3 * 2 ** -11]))[0]).toBe(1 + 2 * 2 ** -10);
    expect(f16ToF32(f32ToF16([1e6]))[0]).toBe(Infinity);
    expect(Number.isNaN(f16ToF32(f32ToF16([NaN]))[0])).toBe(true);
  });
});
