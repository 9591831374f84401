import { describe, expect, it } from 'vitest';
import type { Gpu } from '../../src/gpu/gpu';
import { STORAGE_USAGE } from '../../src/gpu/pool';
import { Tensor } from '../../src/gpu/tensor';
import {
  adamwStep,
  clipCoefficient,
  globalGradNorm,
  gradClipState,
  gradNormPartialCount,
  gradNormSquared,
  reduceGradNorm,
  zeroGrads,
  type AdamWHyper,
  type GradRef,
} from '../../src/kernels/optim';
import { adamwStepRef, clipCoefficientRef, globalGradNormRef } from '../../src/kernels/optim.ref';
import { useGpu } from '../helpers/gpu';
import { Rng, expectClose, toF64 } from '../helpers/numeric';

const wrapped = new WeakSet<GPUBuffer>();

/** Pool tensor (vec4 kernels), or with `exact` a buffer of exactly n * 4 bytes (scalar kernels when n % 4 != 0). */
function upload(g: Gpu, data: Float32Array, exact = false): Tensor {
  if (!exact) return g.upload(data, [data.length]);
  const buffer = g.device.createBuffer({ size: Math.max(4, data.length * 4), usage: STORAGE_USAGE });
  wrapped.add(buffer);
  const t = new Tensor(g, buffer, [data.length], 'f32', false);
  g.write(t, data);
  return t;
}

function done(...ts: Tensor[]): void {
  for (const t of ts) {
    t.release();
    if (wrapped.has(t.buffer)) t.buffer.destroy();
  }
}

async function readBits(g: Gpu, t: Tensor): Promise<Uint32Array> {
  return new Uint32Array(await g.readBytes(t.buffer, 0, t.size * 4));
}

const SIZES = [1, 7, 33, 1001, 4099, 300001];

describe('optim', () => {
  const gpu = useGpu();

  it('global grad norm matches float64 over tensors of odd sizes (vec4 and scalar paths)', async () => {
    const g = gpu();
    const rng = new Rng(1);
    const host = SIZES.map((n, i) => rng.f32(n, 0.5 + i));
    const grads: GradRef[] = host.map((d, i) => ({ tensor: upload(g, d, i % 2 === 1), n: d.length }));
    // A tensor with slack past n holding garbage that must not count.
    const slack = g.upload(Float32Array.from({ length: 64 }, (_, i) => (i < 10 ? host[0]![0]! + i : 1e6)), [64]);
    grads.push({ tensor: slack, n: 10 });
    host.push(Float32Array.from({ length: 10 }, (_, i) => host[0]![0]! + i));
    const norm = g.zeros([1]);
    globalGradNorm(g, norm, grads);
    const expected = globalGradNormRef(host);
    expectClose(await g.readF32(norm), [expected], { atol: 0, rtol: 1e-5, label: 'norm' });

    // The two stages separately, with the partials visible.
    const P = gradNormPartialCount(grads);
    expect(P).toBeGreaterThan(grads.length); // the large tensor spreads over several workgroups
    const partials = g.empty([P]);
    expect(gradNormSquared(g, partials, grads)).toBe(P);
    const parts = await g.readF32(partials);
    expect(parts.every((v) => v >= 0)).toBe(true);
    expectClose([parts.reduce((s, v) => s + v, 0)], [expected ** 2], { atol: 0, rtol: 1e-5, label: 'sum of partials' });
    const norm2 = g.zeros([1]);
    reduceGradNorm(g, norm2, partials, P);
    expectClose(await g.readF32(norm2), [expected], { atol: 0, rtol: 1e-5, label: 'norm (two stages)' });
    done(norm, norm2, partials, ...grads.map((r) => r.tensor));
  });

  it.each([
    ['NaN', NaN],
    ['+Inf', Infinity],
    ['-Inf', -Infinity],
    ['a square that overflows f32', 3e19],
  ])('a %s gradient yields a NaN/Inf norm and a skip flag', async (_name, bad) => {
    const g = gpu();
    const rng = new Rng(2);
    const host = [rng.f32(1001), rng.f32(4099), rng.f32(7)];
    host[1]![2049] = bad;
    const grads = host.map((d, i) => ({ tensor: upload(g, d, i === 2), n: d.length }));
    const norm = g.zeros([1]);
    const clip = g.zeros([2]);
    gradClipState(g, clip, norm, grads, 1.0);
    const n = (await g.readF32(norm))[0]!;
    expect(Number.isFinite(n)).toBe(false);
    expect(Array.from(await g.readF32(clip))).toEqual([0, 1]);
    done(norm, clip, ...grads.map((r) => r.tensor));
  });

  it.each([
    [0.5, 10],
    [100, 10],
    [3, null],
  ])('clip coefficient matches min(1, maxNorm / (norm + 1e-6)) (norm %f, maxNorm %s)', async (normValue, maxNorm) => {
    const g = gpu();
    const norm = g.upload(Float32Array.of(normValue), [1]);
    const clip = g.zeros([2]);
    clipCoefficient(g, clip, norm, maxNorm);
    const ref = clipCoefficientRef(normValue, maxNorm);
    expectClose(await g.readF32(clip), [ref.coef, ref.skip ? 1 : 0], { atol: 0, rtol: 1e-6, label: 'clip' });
    done(norm, clip);
  });

  const hyper = (step: number): AdamWHyper => ({ lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.1, step });

  it.each([
    [1, false, false],
    [7, true, true],
    [1003, false, true],
    [1003, true, false],
    [4096, true, true],
  ])('adamw over 5 steps matches float64 PyTorch AdamW (n=%i, exact buffers %s, clipping %s)', async (n, exact, clipping) => {
    const g = gpu();
    const rng = new Rng(n * 3 + (exact ? 1 : 0));
    const p0 = rng.f32(n);
    const param = upload(g, p0, exact);
    const m = upload(g, new Float32Array(n), exact);
    const v = upload(g, new Float32Array(n), exact);
    const pRef = toF64(p0);
    const mRef = new Float64Array(n);
    const vRef = new Float64Array(n);
    const norm = g.zeros([1]);
    const clip = g.zeros([2]);
    const maxNorm = clipping ? 0.05 * Math.sqrt(n) : null;
    const gradTensors: Tensor[] = [];
    for (let step = 1; step <= 5; step++) {
      const gradHost = rng.f32(n, 0.3 * step);
      const grad = upload(g, gradHost, exact);
      gradClipState(g, clip, norm, [{ tensor: grad, n }], maxNorm);
      adamwStep(g, param, grad, m, v, n, hyper(step), clip);
      const { coef } = clipCoefficientRef(globalGradNormRef([gradHost]), maxNorm);
      if (clipping) expect(coef).toBeLessThan(1);
      adamwStepRef(pRef, gradHost, mRef, vRef, hyper(step), coef);
      gradTensors.push(grad);
    }
    expectClose(await g.readF32(m), mRef, { atol: 1e-6, rtol: 1e-5, label: 'm' });
    expectClose(await g.readF32(v), vRef, { atol: 1e-7, rtol: 1e-5, label: 'v' });
    expectClose(await g.readF32(param), pRef, { atol: 1e-6, rtol: 1e-5, label: 'param' });
    done(param, m, v, norm, clip, ...gradTensors);
  });

  it('adamw without a clip state is the plain update', async () => {
    const g = gpu();
    const n = 257;
    const rng = new Rng(9);
    const p0 = rng.f32(n);
    const g0 = rng.f32(n);
    const m0 = rng.f32(n, 0.1);
    const v0 = Float32Array.from(rng.f32(n, 0.1), (x) => x * x);
    const [param, grad, m, v] = [p0, g0, m0, v0].map((d) => upload(g, d));
    adamwStep(g, param!, grad!, m!, v!, n, hyper(3), null);
    const [pRef, mRef, vRef] = [p0, m0, v0].map(toF64);
    adamwStepRef(pRef!, g0, mRef!, vRef!, hyper(3));
    expectClose(await g.readF32(param!), pRef!, { atol: 1e-6, rtol: 1e-5, label: 'param' });
    expectClose(await g.readF32(m!), mRef!, { atol: 1e-6, rtol: 1e-5, label: 'm' });
    expectClose(await g.readF32(v!), vRef!, { atol: 1e-7, rtol: 1e-5, label: 'v' });
    done(param!, grad!, m!, v!);
  });

  it('a NaN in any gradient leaves every param, m and v bit-identical, without a host round trip', async () => {
    const g = gpu();
    const rng = new Rng(10);
    const sizes = [1003, 7, 64];
    const params = sizes.map((n, i) => upload(g, rng.f32(n), i === 1));
    const ms = sizes.map((n, i) => upload(g, rng.f32(n, 0.1), i === 1));
    const vs = sizes.map((n, i) => upload(g, Float32Array.from(rng.f32(n, 0.1), (x) => x * x), i === 1));
    const gradHost = sizes.map((n) => rng.f32(n));
    gradHost[2]![17] = NaN;
    const grads = gradHost.map((d, i) => upload(g, d, i === 1));
    const refs = grads.map((tensor, i) => ({ tensor, n: sizes[i]! }));
    const before = await Promise.all([...params, ...ms, ...vs].map((t) => readBits(g, t)));
    const norm = g.zeros([1]);
    const clip = g.zeros([2]);
    await g.sync();

    const submits = g.submits;
    const dispatches = g.dispatches;
    gradClipState(g, clip, norm, refs, 1.0);
    sizes.forEach((n, i) => adamwStep(g, params[i]!, grads[i]!, ms[i]!, vs[i]!, n, hyper(4), clip));
    expect(g.submits).toBe(submits); // recorded only: nothing was submitted or read back
    expect(g.dispatches - dispatches).toBe(sizes.length + 2 + sizes.length);

    const after = await Promise.all([...params, ...ms, ...vs].map((t) => readBits(g, t)));
    after.forEach((bits, i) => expect(bits, `tensor ${i} changed`).toEqual(before[i]));

    // The next healthy step goes through.
    g.write(grads[2]!, rng.f32(64));
    gradClipState(g, clip, norm, refs, 1.0);
    adamwStep(g, params[2]!, grads[2]!, ms[2]!, vs[2]!, 64, hyper(4), clip);
    expect(Array.from(await g.readF32(clip))[1]).toBe(0);
    expect(await readBits(g, params[2]!)).not.toEqual(before[2]);
    done(norm, clip, ...params, ...ms, ...vs, ...grads);
  });

  it('zeroGrads clears gradient buffers', async () => {
    const g = gpu();
    const a = g.upload(Float32Array.of(1, 2, 3), [3]);
    const b = g.upload(Float32Array.of(4, 5), [2]);
    zeroGrads(g, [a, { tensor: b, n: 2 }]);
    expect(Array.from(await g.readF32(a))).toEqual([0, 0, 0]);
    expect(Array.from(await g.readF32(b))).toEqual([0, 0]);
    done(a, b);
  });
});
