import { describe, expect, it } from 'vitest';
import { rmsnormBackward, rmsnormForward } from '../../src/kernels/rmsnorm';
import { rmsnormRef } from '../../src/kernels/rmsnorm.ref';
import { useGpu } from '../helpers/gpu';
import { Rng, expectClose, finiteDiff, toF64 } from '../helpers/numeric';

describe('rmsnorm', () => {
  const gpu = useGpu();

  it.each([
    [1, 1],
    [3, 7],
    [5, 256],
    [2, 1000],
    [17, 300],
    [2, 3000],
  ])('forward matches the f64 reference (N=%i, C=%i)', async (N, C) => {
    const g = gpu();
    const rng = new Rng(N * 31 + C);
    const x = rng.f32(N * C, 2);
    const w = rng.f32(C);
    const eps = 1e-5;
    const tx = g.upload(x, [N, C]);
    const tw = g.upload(w, [C]);
    const out = g.empty([N, C]);
    const rstd = g.empty([N]);
    rmsnormForward(g, out, rstd, tx, tw, N, C, eps);
    const ref = rmsnormRef(x, w, N, C, eps);
    expectClose(await g.readF32(out), ref.out, { atol: 1e-5, rtol: 1e-5, label: 'out' });
    expectClose(await g.readF32(rstd), ref.rstd, { atol: 1e-6, rtol: 1e-5, label: 'rstd' });
    for (const t of [tx, tw, out, rstd]) t.release();
  });

  it.each([
    [1, 5],
    [3, 33],
    [4, 300],
  ])('backward matches finite differences of the reference (N=%i, C=%i)', async (N, C) => {
    const g = gpu();
    const rng = new Rng(7 + N * C);
    const x = rng.f32(N * C);
    const w = rng.f32(C);
    const dout = rng.f32(N * C);
    const eps = 1e-5;
    const loss = (xx: Float64Array, ww: Float64Array) => {
      const { out } = rmsnormRef(xx, ww, N, C, eps);
      let s = 0;
      for (let i = 0; i < out.length; i++) s += out[i]! * dout[i]!;
      return s;
    };
    const x64 = toF64(x);
    const w64 = toF64(w);
    const dxRef = new Float64Array(N * C).map((_, i) => finiteDiff((xx) => loss(xx, w64), x64, i));
    const dwRef = new Float64Array(C).map((_, i) => finiteDiff((ww) => loss(x64, ww), w64, i));

    const tx = g.upload(x, [N, C]);
    const tw = g.upload(w, [C]);
    const out = g.empty([N, C]);
    const rstd = g.empty([N]);
    const tdout = g.upload(dout, [N, C]);
    const dx = g.empty([N, C]);
    const dwInit = rng.f32(C);
    const dw = g.upload(dwInit, [C]);
    rmsnormForward(g, out, rstd, tx, tw, N, C, eps);
    rmsnormBackward(g, dx, dw, tdout, tx, rstd, tw, N, C);
    expectClose(await g.readF32(dx), dxRef, { atol: 1e-4, rtol: 1e-3, label: 'dx' });
    // dw accumulates: it must equal its initial value plus the gradient.
    expectClose(await g.readF32(dw), dwRef.map((v, i) => v + dwInit[i]!), { atol: 1e-4, rtol: 1e-3, label: 'dw' });
    expect(g.stats().inUseBytes).toBeGreaterThan(0);
    for (const t of [tx, tw, out, rstd, tdout, dx, dw]) t.release();
  });
});
