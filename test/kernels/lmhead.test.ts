import { describe, expect, it } from 'vitest';
import { f32VocabProjection, lmHeadBackward, lmHeadForward } from '../../src/kernels/lmhead';
import { lmHeadRef } from '../../src/kernels/lmhead.ref';
import type { Gpu } from '../../src/gpu/gpu';
import { useGpu, withoutSubgroups } from '../helpers/gpu';
import { Rng, expectClose, finiteDiff, toF64 } from '../helpers/numeric';

const IGNORED = 0xffffffff;

function makeCase(N: number, C: number, V: number, seed: number) {
  const rng = new Rng(seed);
  const h = rng.f32(N * C);
  const w = rng.f32(V * C, 0.5);
  const targets = new Uint32Array(N).map(() => rng.int(V));
  return { h, w, targets };
}

/** The forward on one case (target 1 ignored where N > 2) against the f64 log-softmax: logp, entropy, lse; records without submitting. */
async function checkForward(g: Gpu, [N, C, V, chunk, temperature]: readonly [number, number, number, number, number], seed: number, subgroups?: boolean) {
  const { h, w, targets } = makeCase(N, C, V, seed);
  if (N > 2) targets[1] = IGNORED;
  const th = g.upload(h, [N, C]);
  const tw = g.upload(w, [V, C]);
  const tt = g.upload(targets, [N], 'u32');
  const logp = g.empty([N]);
  const entropy = g.empty([N]);
  const lse = g.empty([N]);
  const submits = g.submits;
  lmHeadForward(g, { logp, entropy, lse }, th, tt, f32VocabProjection(tw, V, C), N, { temperature, chunk, subgroups });
  expect(g.submits, 'the forward records work without submitting or reading back').toBe(submits);
  const ref = lmHeadRef(h, w, targets, N, C, V, temperature);
  const label = `N=${N} V=${V} chunk=${chunk}`;
  expectClose(await g.readF32(logp), ref.logp, { atol: 1e-4, rtol: 1e-5, label: `${label} logp` });
  expectClose(await g.readF32(entropy), ref.entropy, { atol: 1e-4, rtol: 1e-5, label: `${label} entropy` });
  expectClose(await g.readF32(lse), ref.lse, { atol: 1e-4, rtol: 1e-5, label: `${label} lse` });
  for (const t of [th, tw, tt, logp, entropy, lse]) t.release();
}

describe('lmhead', () => {
  const gpu = useGpu();

  it.each([
    // N, C, V, chunk, temperature
    [1, 16, 1000, 256, 1],
    [19, 16, 1000, 256, 0.7],
    [19, 16, 1000, 1024, 1.3],
    [19, 16, 1000, 1000, 1],
    [3, 5, 77, 10, 2],
  ])('forward matches the f64 log-softmax (N=%i C=%i V=%i chunk=%i T=%f)', async (N, C, V, chunk, temperature) => {
    await checkForward(gpu(), [N, C, V, chunk, temperature], N * 7 + V + chunk);
  });

  // Chunks narrower than, equal to and wider than the 256-thread workgroup, ragged last
  // chunks and passes: partial subgroups and several subgroup partials per reduction.
  for (const sg of [true, false]) {
    it(`forward reduces with ${sg ? 'subgroupMax / subgroupAdd' : 'the workgroup-memory tree'} to the f64 log-softmax`, async (ctx) => {
      const g = gpu();
      console.log(`adapter: ${g.caps.adapterName} (subgroups ${g.caps.subgroups ? 'yes' : 'no'})`);
      if (sg && !g.caps.subgroups) {
        console.log(`skipped: adapter ${g.caps.adapterName} lacks subgroups`);
        ctx.skip();
      }
      for (const c of [
        [3, 5, 77, 10, 2],
        [7, 9, 1001, 333, 0.9],
        [5, 7, 513, 513, 1.1],
      ] as const) await checkForward(g, c, c[0] * 5 + c[2], sg);
    });
  }

  it('refuses subgroup reductions in plain words where the feature is missing', async () => {
    await withoutSubgroups((g) => {
      const t = g.empty([4]);
      const tt = g.empty([1], 'u32');
      expect(() => lmHeadForward(g, { logp: t, lse: t }, t, tt, f32VocabProjection(t, 1, 4), 1, { subgroups: true })).toThrow(/subgroups feature/);
      for (const x of [t, tt]) x.release();
    });
  });

  it('forward without an entropy output', async () => {
    const g = gpu();
    const [N, C, V] = [4, 8, 200];
    const { h, w, targets } = makeCase(N, C, V, 99);
    const th = g.upload(h, [N, C]);
    const tw = g.upload(w, [V, C]);
    const tt = g.upload(targets, [N], 'u32');
    const logp = g.empty([N]);
    const lse = g.empty([N]);
    lmHeadForward(g, { logp, lse }, th, tt, f32VocabProjection(tw, V, C), N, { chunk: 64 });
    expectClose(await g.readF32(logp), lmHeadRef(h, w, targets, N, C, V).logp, { atol: 1e-4, rtol: 1e-5, label: 'logp' });
    for (const t of [th, tw, tt, logp, lse]) t.release();
  });

  it.each([
    // N, C, V, chunk, temperature, accumulate
    [5, 12, 300, 128, 0.8, false],
    [19, 16, 1000, 256, 1, true],
    [1, 7, 50, 64, 1.5, false],
  ])('backward matches finite differences of the reference (N=%i C=%i V=%i chunk=%i T=%f acc=%s)', async (N, C, V, chunk, temperature, accumulate) => {
    const g = gpu();
    const { h, w, targets } = makeCase(N, C, V, N * 13 + V);
    if (N > 2) targets[2] = IGNORED;
    const rng = new Rng(N + C);
    const dlogp = rng.f32(N);
    const dh0 = rng.f32(N * C);
    const loss = (hh: Float64Array) => {
      const { logp } = lmHeadRef(hh, w, targets, N, C, V, temperature);
      let s = 0;
      for (let n = 0; n < N; n++) s += dlogp[n]! * logp[n]!;
      return s;
    };
    const h64 = toF64(h);
    const dhRef = new Float64Array(N * C).map((_, i) => finiteDiff(loss, h64, i) + (accumulate ? dh0[i]! : 0));

    const th = g.upload(h, [N, C]);
    const tw = g.upload(w, [V, C]);
    const tt = g.upload(targets, [N], 'u32');
    const logp = g.empty([N]);
    const lse = g.empty([N]);
    const tdl = g.upload(dlogp, [N]);
    const dh = g.upload(dh0, [N, C]);
    const proj = f32VocabProjection(tw, V, C);
    lmHeadForward(g, { logp, lse }, th, tt, proj, N, { temperature, chunk });
    lmHeadBackward(g, dh, tdl, th, tt, lse, proj, N, { temperature, chunk, accumulate });
    expectClose(await g.readF32(dh), dhRef, { atol: 1e-4, rtol: 1e-3, label: 'dh' });
    for (const t of [th, tw, tt, logp, lse, tdl, dh]) t.release();
  });

  it('a large vocabulary runs in chunk-sized scratch (V=50000, N=4, C=32, chunk=4096)', async () => {
    const g = gpu();
    const [N, C, V, chunk] = [4, 32, 50000, 4096];
    const { h, w, targets } = makeCase(N, C, V, 4242);
    const th = g.upload(h, [N, C]);
    const tw = g.upload(w, [V, C]);
    const tt = g.upload(targets, [N], 'u32');
    const logp = g.empty([N]);
    const entropy = g.empty([N]);
    const lse = g.empty([N]);
    const dl = g.upload(new Float32Array(N).fill(1), [N]);
    const dh = g.empty([N, C]);
    const proj = f32VocabProjection(tw, V, C);
    await g.sync();
    const before = g.stats().inUseBytes;
    g.pool.resetPeaks();
    lmHeadForward(g, { logp, entropy, lse }, th, tt, proj, N, { chunk });
    lmHeadBackward(g, dh, dl, th, tt, lse, proj, N, { chunk });
    await g.sync();
    const scratch = g.stats().peakInUseBytes - before;
    const full = N * V * 4;
    console.log(`lmhead V=${V} N=${N}: peak scratch ${scratch} bytes vs ${full} for whole logits`);
    // The chunk logits are N * chunk * 4 = 64 KiB (+ small state / split-K partials).
    expect(scratch).toBeLessThan(full / 4);
    expect(g.stats().inUseBytes).toBe(before);
    const ref = lmHeadRef(h, w, targets, N, C, V);
    expectClose(await g.readF32(logp), ref.logp, { atol: 2e-4, rtol: 1e-5, label: 'logp' });
    expectClose(await g.readF32(entropy), ref.entropy, { atol: 2e-4, rtol: 1e-5, label: 'entropy' });
    for (const t of [th, tw, tt, logp, entropy, lse, dl, dh]) t.release();
  });
});
