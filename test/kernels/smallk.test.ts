import { describe, it } from 'vitest';
import { matmulRef } from '../../src/kernels/matmul.ref';
import { rowsBackward, rowsForward } from '../../src/kernels/smallk';
import { useGpu } from '../helpers/gpu';
import { Rng, expectClose } from '../helpers/numeric';

describe('small-K row products (barrier-free)', () => {
  const gpu = useGpu();

  it.each([
    [1, 5, 7, 0, 7],
    [3, 64, 300, 17, 200],
    [9, 33, 65, 0, 65],
    [43, 160, 130, 64, 66],
    [37, 64, 16, 0, 16],
    [50, 16, 128, 0, 128],
  ])('forward and backward match f64 matmul (N=%i K=%i M=%i rows [%i, +%i))', async (N, K, M, r0, rows) => {
    const g = gpu();
    const rng = new Rng(N * 1000 + K);
    const x = rng.f32(N * K);
    const w = rng.f32(M * K);
    const dy = rng.f32(N * rows);
    const slice = w.subarray(r0 * K, (r0 + rows) * K);
    const tw = g.upload(w, [M, K]);
    const tx = g.upload(x, [N, K]);
    const y = g.empty([N, rows]);
    rowsForward(g, y, tx, tw, N, K, r0, rows);
    expectClose(await g.readF32(y), matmulRef(x, slice, N, rows, K, { transB: true }), { atol: 1e-4, rtol: 1e-4, label: 'y' });
    // accumulate with alpha -1.5: y - 1.5 y = -0.5 y
    rowsForward(g, y, tx, tw, N, K, r0, rows, true, -1.5);
    expectClose(await g.readF32(y), matmulRef(x, slice, N, rows, K, { transB: true }).map((v) => -0.5 * v), { atol: 2e-4, rtol: 1e-4, label: 'y+=alpha' });
    const tdy = g.upload(dy, [N, rows]);
    const dx = g.empty([N, K]);
    rowsBackward(g, dx, tdy, tw, N, K, r0, rows);
    const dxRef = matmulRef(dy, slice, N, K, rows);
    expectClose(await g.readF32(dx), dxRef, { atol: 1e-4, rtol: 1e-4, label: 'dx' });
    rowsBackward(g, dx, tdy, tw, N, K, r0, rows, true, 3);
    expectClose(await g.readF32(dx), dxRef.map((v) => 4 * v), { atol: 4e-4, rtol: 1e-4, label: 'dx+=alpha' });
    for (const t of [tw, tx, y, tdy, dx]) t.release();
  });
});
