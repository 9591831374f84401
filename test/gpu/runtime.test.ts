import { describe, expect, it } from 'vitest';
import { GpuDeviceLostError, GpuError, f16ToF32, f32ToF16 } from '../../src/gpu/gpu';
import { acquireNodeGpu } from '../../src/gpu/node';
import { Params, uniforms } from '../../src/gpu/params';
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

describe('uniforms: one declaration for the WGSL struct and the Params writer', () => {
  it('writes fields in declared order whatever the order of the values, and names bad input', () => {
    const U = uniforms('Params', { n: 'u32', s: 'f32', b: 'i32' });
    expect(U.wgsl).toBe('struct Params { n: u32, s: f32, b: i32 }');
    const bytes = U.params({ b: -3, s: 1.5, n: 7 }).bytes();
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    expect([view.getUint32(0, true), view.getFloat32(4, true), view.getInt32(8, true)]).toEqual([7, 1.5, -3]);
    expect(() => U.params({ n: 1, s: 2 } as never)).toThrow(/field b has no value/);
    expect(() => U.params({ n: 1, s: 2, b: 0, extra: 1 } as never)).toThrow(/unknown field\(s\) extra/);
    expect(() => U.params({ n: -1, s: 0, b: 0 })).toThrow(/not a u32/);
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
    // 1200 dispatches (a 3B decode step with LoRA records about 1100) ping-ponging a and b:
    // the uniform arena holds them all, so nothing is submitted before the read.
    let src = x;
    for (let i = 0; i < 1200; i++) {
      const dst = i % 2 === 0 ? a : b;
      g.dispatch(affine, [dst, src], [Math.ceil(n / 64)], new Params().u32(n).f32(1).f32(1));
      src = dst;
    }
    expect(g.submits - submits).toBe(0);
    const out = await g.readF32(src);
    expect(g.submits - submits).toBe(1);
    expectClose(out, new Float32Array(n).fill(1201), { atol: 0, rtol: 0, label: 'chained affine' });
    for (const t of [x, a, b]) t.release();
  });

  it('warms pipelines asynchronously; a warmed kernel dispatches without building again', async () => {
    const g = gpu();
    const warmed: KernelSource = { label: 'test_affine warmed', code: affine.code.replace('workgroup_size(64)', 'workgroup_size(32)') };
    const size = g.pipelines.size;
    await g.pipelines.warm([warmed, warmed]);
    expect(g.pipelines.size).toBe(size + 1);
    const n = 64;
    const x = g.upload(new Float32Array(n).fill(2), [n]);
    const y = g.empty([n]);
    const lookups = g.pipelines.codeLookups;
    g.dispatch(warmed, [y, x], [2], new Params().u32(n).f32(3).f32(1));
    expect(g.pipelines.codeLookups).toBe(lookups);
    expect(g.pipelines.size).toBe(size + 1);
    expectClose(await g.readF32(y), new Float32Array(n).fill(7), { atol: 0, rtol: 0, label: 'warmed affine' });
    x.release();
    y.release();
  });

  it('finds pipelines by their source object and reuses bind groups across identical steps', async () => {
    const g = gpu();
    const n = 256;
    const x = g.upload(new Float32Array(n).fill(1), [n]);
    const a = g.empty([n]);
    const b = g.empty([n]);
    // One "step": 10 chained dispatches whose uniforms differ per round (s = round + 2).
    const step = (s: number) => {
      let src = x;
      for (let i = 0; i < 10; i++) {
        const dst = i % 2 === 0 ? a : b;
        g.dispatch(affine, [dst, src], [Math.ceil(n / 64)], new Params().u32(n).f32(s).f32(0));
        src = dst;
      }
      return src;
    };
    const lookups = g.pipelines.codeLookups;
    const created0 = g.bindGroupsCreated;
    const r1 = await g.readF32(step(1));
    const created1 = g.bindGroupsCreated - created0;
    expect(created1).toBeGreaterThan(0);
    expect(created1).toBeLessThanOrEqual(10);
    const r2 = await g.readF32(step(2));
    expect(g.bindGroupsCreated - created0).toBe(created1); // the second step created none
    expect(g.pipelines.codeLookups - lookups).toBeLessThanOrEqual(1); // the affine object keyed by text at most once
    expectClose(r1, new Float32Array(n).fill(1), { atol: 0, rtol: 0, label: 'step s=1' });
    expectClose(r2, new Float32Array(n).fill(2 ** 10), { atol: 0, rtol: 0, label: 'step s=2 (new uniforms under reused bind groups)' });
    // A second object with the same WGSL shares the pipeline; its first use keys by text once.
    const size = g.pipelines.size;
    const twin: KernelSource = { label: 'test_affine twin', code: affine.code };
    g.dispatch(twin, [a, x], [Math.ceil(n / 64)], new Params().u32(n).f32(3).f32(1));
    expectClose(await g.readF32(a), new Float32Array(n).fill(4), { atol: 0, rtol: 0, label: 'twin' });
    expect(g.pipelines.size).toBe(size);
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
