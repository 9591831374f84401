import { describe, expect, it } from 'vitest';
import type { Gpu } from '../../src/gpu/gpu';
import { STORAGE_USAGE } from '../../src/gpu/pool';
import { Tensor } from '../../src/gpu/tensor';
import {
  add,
  addInPlace,
  axpy,
  fill,
  scale,
  scaleInPlace,
  swigluBackward,
  swigluForward,
} from '../../src/kernels/elementwise';
import { addRef, axpyRef, scaleRef, swigluBackwardRef, swigluForwardRef } from '../../src/kernels/elementwise.ref';
import { useGpu } from '../helpers/gpu';
import { Rng, expectClose } from '../helpers/numeric';

const SIZES = [1, 3, 255, 257, 100003];
const SENTINEL = 12345.5;
// Exact-size buffers are wrapped, not pooled: destroy them when done.
const wrapped = new WeakSet<GPUBuffer>();

/**
 * A tensor of n elements. `exact` wraps a buffer of exactly n * 4 bytes (rounded to 4),
 * too short for the vec4 view whenever n % 4 != 0, which exercises the scalar kernels;
 * otherwise a pool tensor whose slack past n is filled with a sentinel.
 */
function make(g: Gpu, data: Float32Array, exact: boolean): Tensor {
  const n = data.length;
  if (exact) {
    const buffer = g.device.createBuffer({ size: Math.max(4, n * 4), usage: STORAGE_USAGE });
    const t = new Tensor(g, buffer, [n], 'f32', false);
    wrapped.add(buffer);
    g.write(t, data);
    return t;
  }
  const t = g.empty([n]);
  const padded = new Float32Array(t.buffer.size / 4).fill(SENTINEL);
  padded.set(data);
  g.write(t, padded);
  return t;
}

function done(...ts: Tensor[]): void {
  for (const t of ts) {
    t.release();
    if (wrapped.has(t.buffer)) t.buffer.destroy();
  }
}

/** Reads the whole buffer and checks the first n against `expected` and the slack against the sentinel. */
async function expectTensor(g: Gpu, t: Tensor, expected: ArrayLike<number>, n: number, tol: { atol: number; rtol: number }, label: string) {
  const all = new Float32Array(await g.readBytes(t.buffer, 0, t.buffer.size));
  expectClose(all.subarray(0, n), expected, { ...tol, label });
  const slack = all.subarray(n);
  if (slack.length > 0 && !wrapped.has(t.buffer)) {
    expect(slack.every((v) => v === SENTINEL), `${label}: memory past n was modified`).toBe(true);
  }
}

describe('elementwise', () => {
  const gpu = useGpu();
  const TOL = { atol: 1e-6, rtol: 1e-6 };

  for (const exact of [false, true]) {
    const kind = exact ? 'exact-size buffers' : 'pool buffers';

    it.each(SIZES)(`add, addInPlace, scale, scaleInPlace, axpy, fill match the reference (${kind}, n=%i)`, async (n) => {
      const g = gpu();
      const rng = new Rng(n + (exact ? 1 : 0));
      const a = rng.f32(n);
      const b = rng.f32(n, 3);
      const mk = (d: Float32Array) => make(g, d, exact);
      const ta = mk(a);
      const tb = mk(b);
      const out = mk(new Float32Array(n));
      const acc = mk(a);
      const sc = mk(a);
      const y = mk(a);
      const filled = mk(new Float32Array(n));

      add(g, out, ta, tb, n);
      addInPlace(g, acc, tb, n);
      scaleInPlace(g, sc, -0.75, n);
      axpy(g, y, 2.5, tb, n);
      fill(g, filled, -3.25, n);
      await expectTensor(g, out, addRef(a, b, n), n, TOL, 'add');
      await expectTensor(g, acc, addRef(a, b, n), n, TOL, 'addInPlace');
      await expectTensor(g, sc, scaleRef(a, -0.75, n), n, TOL, 'scaleInPlace');
      await expectTensor(g, y, axpyRef(a, 2.5, b, n), n, TOL, 'axpy');
      await expectTensor(g, filled, new Float64Array(n).fill(-3.25), n, TOL, 'fill');
      scale(g, out, tb, 1 / 3, n);
      await expectTensor(g, out, scaleRef(b, 1 / 3, n), n, TOL, 'scale');
      done(ta, tb, out, acc, sc, y, filled);
    });

    it.each(SIZES)(`swiglu forward matches the reference, backward matches finite differences (${kind}, n=%i)`, async (n) => {
      const g = gpu();
      const rng = new Rng(1000 + n + (exact ? 1 : 0));
      const gate = rng.f32(n, 3);
      const up = rng.f32(n);
      const dout = rng.f32(n);
      const mk = (d: Float32Array) => make(g, d, exact);
      const tg = mk(gate);
      const tu = mk(up);
      const tdout = mk(dout);
      const out = mk(new Float32Array(n));
      const dgate = mk(new Float32Array(n));
      const dup = mk(new Float32Array(n));
      swigluForward(g, out, tg, tu, n);
      swigluBackward(g, dgate, dup, tdout, tg, tu, n);

      // The op is element-wise (diagonal Jacobian), so one perturbation of every element
      // at once gives each element's central difference of sum(dout * out).
      const h = 1e-5;
      const shifted = (x: Float32Array, d: number) => Float64Array.from(x, (v) => v + d);
      const fgp = swigluForwardRef(shifted(gate, h), up, n);
      const fgm = swigluForwardRef(shifted(gate, -h), up, n);
      const fup = swigluForwardRef(gate, shifted(up, h), n);
      const fum = swigluForwardRef(gate, shifted(up, -h), n);
      const dgateFd = Float64Array.from(dout, (d, i) => (d * (fgp[i]! - fgm[i]!)) / (2 * h));
      const dupFd = Float64Array.from(dout, (d, i) => (d * (fup[i]! - fum[i]!)) / (2 * h));
      // The analytic reference agrees with the finite differences, too.
      const analytic = swigluBackwardRef(dout, gate, up, n);
      expectClose(analytic.dgate, dgateFd, { atol: 1e-8, rtol: 1e-6, label: 'dgate ref vs fd' });

      const tol = { atol: 2e-6, rtol: 2e-5 };
      await expectTensor(g, out, swigluForwardRef(gate, up, n), n, tol, 'swiglu out');
      await expectTensor(g, dgate, dgateFd, n, { atol: 1e-5, rtol: 1e-4 }, 'dgate');
      await expectTensor(g, dup, dupFd, n, { atol: 1e-5, rtol: 1e-4 }, 'dup');
      done(tg, tu, tdout, out, dgate, dup);
    });
  }

  it('swiglu stays finite for extreme gates', async () => {
    const g = gpu();
    const gate = Float32Array.of(-1e30, -200, -89, -30, 0, 30, 89, 200, 1e30);
    const n = gate.length;
    const up = new Float32Array(n).fill(0.5);
    const dout = new Float32Array(n).fill(2);
    const tg = g.upload(gate, [n]);
    const tu = g.upload(up, [n]);
    const td = g.upload(dout, [n]);
    const out = g.empty([n]);
    const dgate = g.empty([n]);
    const dup = g.empty([n]);
    swigluForward(g, out, tg, tu, n);
    swigluBackward(g, dgate, dup, td, tg, tu, n);
    const ref = swigluForwardRef(gate, up, n);
    const bref = swigluBackwardRef(dout, gate, up, n);
    expectClose(await g.readF32(out), ref, { atol: 1e-6, rtol: 1e-6, label: 'out' });
    expectClose(await g.readF32(dup), bref.dup, { atol: 1e-6, rtol: 1e-6, label: 'dup' });
    expectClose(await g.readF32(dgate), bref.dgate, { atol: 1e-6, rtol: 1e-5, label: 'dgate' });
    done(tg, tu, td, out, dgate, dup);
  });

  // More invocations than 65535 workgroups of 256 reach: grid() folds the dispatch into y.
  it.each([
    ['vec4', 65535 * 256 * 4 + 4 * 300 + 3],
    ['scalar', 65535 * 256 + 257],
  ])('fill covers n past the per-dimension workgroup limit (%s, n=%i)', async (path, n) => {
    const g = gpu();
    const bytes = path === 'vec4' ? Math.ceil(n / 4) * 16 + 16 : n * 4 + 4;
    if (bytes > g.caps.maxStorageBufferBindingSize) {
      console.log(`skipped: ${bytes}-byte binding exceeds this device's ${g.caps.maxStorageBufferBindingSize}`);
      return;
    }
    // Exact size n*4+4 is not a multiple of 16 past n, so the scalar path is taken.
    const buffer = g.device.createBuffer({ size: bytes, usage: STORAGE_USAGE });
    const t = new Tensor(g, buffer, [bytes / 4], 'f32', false);
    g.clear(t);
    fill(g, t, 7.5, n);
    const probe = async (start: number, count: number) => new Float32Array(await g.readBytes(buffer, start * 4, count * 4));
    expect((await probe(0, 1024)).every((v) => v === 7.5)).toBe(true);
    expect((await probe(65535 * 256 * (path === 'vec4' ? 4 : 1) - 128, 256)).every((v) => v === 7.5)).toBe(true);
    const tail = await probe(n - 1024, 1025);
    expect(tail.subarray(0, 1024).every((v) => v === 7.5)).toBe(true);
    expect(tail[1024]).toBe(0);
    t.release();
    buffer.destroy();
  });
});
