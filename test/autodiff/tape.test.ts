import { describe, expect, it } from 'vitest';
import { add, rmsnorm, swiglu } from '../../src/autodiff/ops';
import { Tape, leaf, type Var } from '../../src/autodiff/tape';
import type { Gpu } from '../../src/gpu/gpu';
import type { Tensor } from '../../src/gpu/tensor';
import { addRef, swigluForwardRef } from '../../src/kernels/elementwise.ref';
import { rmsnormRef } from '../../src/kernels/rmsnorm.ref';
import { useGpu } from '../helpers/gpu';
import { Rng, expectClose, finiteDiff, toF64 } from '../helpers/numeric';

const EPS = 1e-5;

/** One residual block: y = x + swiglu(rmsnorm(x, w1), rmsnorm(x, w2)). */
function block(tape: Tape, x: Var, w1: Var, w2: Var): Var {
  return add(tape, x, swiglu(tape, rmsnorm(tape, x, w1, EPS), rmsnorm(tape, x, w2, EPS)));
}

function blockRef(x: Float64Array, w1: Float64Array, w2: Float64Array, N: number, C: number): Float64Array {
  const a = rmsnormRef(x, w1, N, C, EPS).out;
  const b = rmsnormRef(x, w2, N, C, EPS).out;
  return Float64Array.from(addRef(x, swigluForwardRef(a, b, N * C), N * C));
}

interface Problem {
  N: number;
  C: number;
  L: number;
  x: Float32Array;
  ws: Float32Array[]; // 2 per layer
  r: Float32Array; // loss = sum(y * r)
}

function makeProblem(seed: number, N: number, C: number, L: number): Problem {
  const rng = new Rng(seed);
  return {
    N,
    C,
    L,
    x: rng.f32(N * C),
    ws: Array.from({ length: 2 * L }, () => Float32Array.from(rng.f32(C), (v) => 1 + 0.3 * v)),
    r: rng.f32(N * C),
  };
}

function lossRef(p: Problem, x: Float64Array, ws: Float64Array[]): number {
  let h = x;
  for (let l = 0; l < p.L; l++) h = blockRef(h, ws[2 * l]!, ws[2 * l + 1]!, p.N, p.C);
  let s = 0;
  for (let i = 0; i < h.length; i++) s += h[i]! * p.r[i]!;
  return s;
}

/** Runs forward + backward on the GPU; returns dx and the (accumulated) weight grads. */
async function gpuGrads(g: Gpu, p: Problem, checkpoint: boolean, gradInit?: Float32Array[]) {
  const { N, C } = p;
  const tx = g.upload(p.x, [N, C]);
  const tws = p.ws.map((w) => g.upload(w, [C]));
  const tgs = p.ws.map((_, i) => (gradInit ? g.upload(gradInit[i]!, [C]) : g.zeros([C])));
  const tr = g.upload(p.r, [N, C]);
  const x = leaf(tx, true);
  const ws = tws.map((w, i) => leaf(w, true, tgs[i]!));
  const tape = new Tape(g);
  let h = x;
  for (let l = 0; l < p.L; l++) {
    const [w1, w2] = [ws[2 * l]!, ws[2 * l + 1]!];
    h = checkpoint ? tape.checkpoint((t, [hin]) => [block(t, hin!, w1, w2)], [h])[0]! : block(tape, h, w1, w2);
  }
  tape.backward(h, tr);
  const dx = await g.readF32(x.grad!);
  const dws = await Promise.all(tgs.map((t) => g.readF32(t)));
  tape.dispose();
  x.grad!.release();
  for (const t of [tx, tr, ...tws, ...tgs] as Tensor[]) t.release();
  return { dx, dws };
}

describe('autodiff tape', () => {
  const gpu = useGpu();

  it('gradients of a 2-block residual network match finite differences of the f64 reference', async () => {
    const p = makeProblem(3, 3, 20, 2);
    const { dx, dws } = await gpuGrads(gpu(), p, false);
    const x64 = toF64(p.x);
    const w64 = p.ws.map(toF64);
    const dxRef = x64.map((_, i) => finiteDiff((xx) => lossRef(p, xx, w64), x64, i));
    expectClose(dx, dxRef, { atol: 2e-4, rtol: 2e-3, label: 'dx' });
    for (let j = 0; j < w64.length; j++) {
      const dwRef = w64[j]!.map((_, i) => finiteDiff((ww) => lossRef(p, x64, w64.map((w, k) => (k === j ? ww : w))), w64[j]!, i));
      expectClose(dws[j]!, dwRef, { atol: 2e-4, rtol: 2e-3, label: `dw${j}` });
    }
  });

  it('parameter grads accumulate (+=) into their existing buffers', async () => {
    const p = makeProblem(4, 2, 8, 1);
    const init = p.ws.map((_, i) => new Float32Array(p.C).fill(i + 1));
    const fresh = await gpuGrads(gpu(), p, false);
    const acc = await gpuGrads(gpu(), p, false, init);
    for (let j = 0; j < p.ws.length; j++) {
      expectClose(acc.dws[j]!, fresh.dws[j]!.map((v, i) => v + init[j]![i]!), { atol: 1e-5, rtol: 1e-5, label: `dw${j}` });
    }
  });

  it('gradient checkpointing gives the same gradients as keeping all activations', async () => {
    const p = makeProblem(5, 4, 24, 3);
    const plain = await gpuGrads(gpu(), p, false);
    const ckpt = await gpuGrads(gpu(), p, true);
    expectClose(ckpt.dx, plain.dx, { atol: 1e-6, rtol: 1e-6, label: 'dx' });
    plain.dws.forEach((d, j) => expectClose(ckpt.dws[j]!, d, { atol: 1e-6, rtol: 1e-6, label: `dw${j}` }));
  });

  it('checkpointing keeps only block inputs: each extra layer costs one activation, not all of them', async () => {
    const g = gpu();
    const [N, C] = [64, 256];
    const act = N * C * 4;
    const peak = async (L: number, checkpoint: boolean) => {
      g.pool.resetPeaks();
      const base = g.stats().inUseBytes;
      await gpuGrads(g, makeProblem(6, N, C, L), checkpoint);
      return g.stats().peakInUseBytes - base;
    };
    const perLayer = async (checkpoint: boolean) => ((await peak(8, checkpoint)) - (await peak(4, checkpoint))) / 4 / act;
    const plain = await perLayer(false);
    const ckpt = await perLayer(true);
    // A block saves two norm outputs, the swiglu output and its own output (4 activations);
    // checkpointed, only its output (the next block's input) stays alive.
    expect(plain).toBeGreaterThanOrEqual(3.9);
    expect(ckpt).toBeLessThanOrEqual(1.1);
  });

  it('a thousand forward/backward steps leave the pool byte count flat', async () => {
    const g = gpu();
    const p = makeProblem(7, 4, 32, 2);
    const { N, C } = p;
    const tx = g.upload(p.x, [N, C]);
    const tws = p.ws.map((w) => g.upload(w, [C]));
    const tgs = p.ws.map(() => g.zeros([C]));
    const tr = g.upload(p.r, [N, C]);
    const step = () => {
      const tape = new Tape(g);
      const x = leaf(tx, false);
      const ws = tws.map((w, i) => leaf(w, true, tgs[i]!));
      let h: Var = x;
      for (let l = 0; l < p.L; l++) {
        const [w1, w2] = [ws[2 * l]!, ws[2 * l + 1]!];
        h = tape.checkpoint((t, [hin]) => [block(t, hin!, w1, w2)], [h])[0]!;
      }
      tape.backward(h, tr);
      tape.dispose();
    };
    for (let i = 0; i < 10; i++) step();
    await g.sync();
    const before = g.stats();
    for (let i = 0; i < 1000; i++) step();
    await g.sync();
    const after = g.stats();
    expect(after.inUseBytes).toBe(before.inUseBytes);
    expect(after.allocatedBytes).toBe(before.allocatedBytes);
    const grads = await g.readF32(tgs[0]!);
    expect(grads.every(Number.isFinite)).toBe(true);
    for (const t of [tx, tr, ...tws, ...tgs]) t.release();
  }, 600_000); // ~20 s alone on SwiftShader; dispatch-bound, so generous under load
});
