import { describe, expect, it } from 'vitest';
import { sample, type SampleOptions } from '../../src/kernels/sample';
import { argmaxRef, sampleDistributionRef, sampleRef } from '../../src/kernels/sample.ref';
import { useGpu, withoutSubgroups } from '../helpers/gpu';
import { Rng, expectClose } from '../helpers/numeric';

/**
 * Upper alpha-quantile of chi-square with df degrees of freedom (Wilson-Hilferty:
 * (X/df)^(1/3) is close to normal with mean 1 - 2/(9 df) and variance 2/(9 df)).
 * z = 4.7534 is the one-sided 1e-6 normal quantile, so a correct sampler fails a check
 * with probability about 1e-6 (the bound is within ~5% of the exact quantile for df 2..11).
 * With B = 4096 draws a cell with probability p contributes B d^2 / p for an error d, so
 * errors of about sqrt(crit * p / B) (0.04 at p = 0.2: a missing temperature, a wrong
 * renormalisation, a biased RNG) fail it; a token kept or dropped wrongly fails the
 * exact zero-count check, and the same-hash reference test pins each draw exactly.
 */
function chiSquareCritical(df: number, z = 4.7534): number {
  const v = 2 / (9 * df);
  return df * (1 - v + z * Math.sqrt(v)) ** 3;
}

describe('sample', () => {
  const gpu = useGpu();

  async function run(logits: Float32Array, B: number, V: number, opts: Omit<SampleOptions, 'logp'>, withLogp = true) {
    const g = gpu();
    const tl = g.upload(logits, [B, V]);
    const ids = g.empty([B], 'u32');
    const logp = g.empty([B]);
    sample(g, ids, tl, { ...opts, logp: withLogp ? logp : null }, B, V);
    const out = { ids: (await g.read(ids)) as Uint32Array, logp: await g.readF32(logp) };
    for (const t of [tl, ids, logp]) t.release();
    return out;
  }

  it('temperature 0 is argmax (lowest index on ties), with its log-prob', async () => {
    const [B, V] = [8, 1000];
    const logits = new Rng(1).f32(B * V, 2);
    logits[10] = 9;
    logits[700] = 9; // tie in row 0: index 10 wins
    const { ids, logp } = await run(logits, B, V, { temperature: 0, seed: 1, step: 0 });
    const ref = sampleRef(logits, B, V, { temperature: 0, seed: 1, step: 0 });
    expect(ids[0]).toBe(10);
    expect(Array.from(ids)).toEqual(Array.from({ length: B }, (_, b) => argmaxRef(logits, b * V, V)));
    expectClose(logp, ref.logp, { atol: 1e-5, rtol: 1e-5, label: 'greedy logp' });
  });

  it('topK = 1 is argmax at any temperature and seed', async () => {
    const [B, V] = [8, 1000];
    const logits = new Rng(2).f32(B * V, 2);
    for (const [temperature, seed] of [[0.7, 3], [1.5, 4]] as const) {
      const { ids } = await run(logits, B, V, { temperature, topK: 1, seed, step: 0 }, false);
      expect(Array.from(ids)).toEqual(Array.from({ length: B }, (_, b) => argmaxRef(logits, b * V, V)));
    }
  });

  it.each([
    { temperature: 1 },
    { temperature: 0.8, topK: 40 },
    { temperature: 1.2, topP: 0.9 },
    { temperature: 0.7, topK: 100, topP: 0.8 },
  ])('matches the f64 Gumbel-max reference with the same hash (%o)', async (cfg) => {
    const [B, V] = [8, 1000];
    const logits = new Rng(3).f32(B * V, 2);
    const opts = { ...cfg, seed: 12345, step: 7 };
    const { ids, logp } = await run(logits, B, V, opts);
    const ref = sampleRef(logits, B, V, opts);
    expect(Array.from(ids)).toEqual(Array.from(ref.ids));
    expectClose(logp, ref.logp, { atol: 1e-5, rtol: 1e-5, label: 'logp' });
  });

  // Workgroups of 32 (V <= 4096) and 256 threads, vocabularies narrower than a workgroup
  // and ragged, so subgroups hold lanes without a candidate; ties between and within
  // subgroups, and -0 against +0, must go to the lowest index as the tree sends them.
  for (const sg of [true, false]) {
    it(`${sg ? 'subgroupMax / subgroupMin / subgroupAdd' : 'workgroup-memory'} reductions match the f64 reference`, async (ctx) => {
      const g = gpu();
      console.log(`adapter: ${g.caps.adapterName} (subgroups ${g.caps.subgroups ? 'yes' : 'no'})`);
      if (sg && !g.caps.subgroups) {
        console.log(`skipped: adapter ${g.caps.adapterName} lacks subgroups`);
        ctx.skip();
      }
      for (const [B, V] of [
        [3, 5],
        [5, 37],
        [3, 1001],
        [2, 5003],
      ] as const) {
        const logits = new Rng(V).f32(B * V, 2);
        // Row 0: equal maxima in different lanes and subgroups; row 1: +0 after -0 as the maximum.
        for (const i of [V - 1, Math.floor(V / 2), 1]) logits[i] = 7;
        for (let i = V; i < 2 * V; i++) logits[i] = -Math.abs(logits[i]!) - 1;
        logits[V + V - 1] = 0;
        logits[V + Math.floor(V / 3)] = -0;
        for (const cfg of [{ temperature: 0 }, { temperature: 0.9, topK: 4 }, { temperature: 1.1, topP: 0.7 }]) {
          const opts = { ...cfg, seed: 31, step: 2 };
          const tl = g.upload(logits, [B, V]);
          const ids = g.empty([B], 'u32');
          const logp = g.empty([B]);
          sample(g, ids, tl, { ...opts, logp, subgroups: sg }, B, V);
          const got = (await g.read(ids)) as Uint32Array;
          const ref = sampleRef(logits, B, V, opts);
          const label = `B=${B} V=${V} ${JSON.stringify(cfg)}`;
          expect(Array.from(got), label).toEqual(Array.from(ref.ids));
          expectClose(await g.readF32(logp), ref.logp, { atol: 1e-5, rtol: 1e-5, label: `${label} logp` });
          if (cfg.temperature === 0) expect(got[0], `${label}: the lowest of equal maxima`).toBe(1);
          if (cfg.temperature === 0) expect(got[1], `${label}: -0 and +0 tie`).toBe(Math.floor(V / 3));
          for (const t of [tl, ids, logp]) t.release();
        }
      }
    });
  }

  it('refuses subgroup reductions in plain words where the feature is missing', async () => {
    await withoutSubgroups((g) => {
      const ids = g.empty([1], 'u32');
      const tl = g.empty([4]);
      expect(() => sample(g, ids, tl, { temperature: 0, seed: 0, step: 0, subgroups: true }, 1, 4)).toThrow(/subgroups feature/);
      for (const t of [ids, tl]) t.release();
    });
  });

  it('is deterministic in (seed, step) and changes with either', async () => {
    const [B, V] = [64, 1000];
    const logits = new Rng(4).f32(B * V);
    const base = { temperature: 1, topP: 0.95 };
    const a = await run(logits, B, V, { ...base, seed: 7, step: 0 }, false);
    const a2 = await run(logits, B, V, { ...base, seed: 7, step: 0 }, false);
    const b = await run(logits, B, V, { ...base, seed: 8, step: 0 }, false);
    const c = await run(logits, B, V, { ...base, seed: 7, step: 1 }, false);
    expect(Array.from(a2.ids)).toEqual(Array.from(a.ids));
    // 64 rows with hundreds of plausible tokens each: equal draws would need ~1e-100 luck.
    expect(Array.from(b.ids)).not.toEqual(Array.from(a.ids));
    expect(Array.from(c.ids)).not.toEqual(Array.from(a.ids));
  });

  // Identical logits in every row; each row draws from its own stream (row is hashed).
  const V12 = Float32Array.from([0.3, 2.0, -0.4, 1.1, 1.6, -1.5, 0.8, 0.0, 1.3, -0.7, 0.5, -1.0]);
  it.each([
    { temperature: 1, seed: 11 },
    { temperature: 0.7, topK: 5, seed: 12 },
    { temperature: 1.3, topP: 0.8, seed: 13 },
    { temperature: 0.9, topK: 8, topP: 0.7, seed: 14 },
    { temperature: 2, topK: 3, topP: 0.95, seed: 15 },
  ])('empirical frequencies match the truncated distribution (V=12, B=4096, %o)', async (cfg) => {
    const [B, V] = [4096, 12];
    const logits = new Float32Array(B * V);
    for (let b = 0; b < B; b++) logits.set(V12, b * V);
    const { ids } = await run(logits, B, V, { ...cfg, step: 3 }, false);
    const dist = sampleDistributionRef(V12, V, cfg);
    // The test is meaningful only if no top-p decision sits within f32 rounding of the boundary.
    expect(dist.topPMargin).toBeGreaterThan(1e-3);
    const counts = new Array<number>(V).fill(0);
    for (const id of ids) counts[id]!++;
    let chi2 = 0;
    let kept = 0;
    for (let i = 0; i < V; i++) {
      if (!dist.keep[i]) {
        expect(counts[i], `token ${i} is outside top-k/top-p`).toBe(0);
        continue;
      }
      kept++;
      const expected = B * dist.probs[i]!;
      expect(expected, 'chi-square needs >= 5 expected draws per cell').toBeGreaterThan(5);
      chi2 += (counts[i]! - expected) ** 2 / expected;
    }
    if (kept > 1) expect(chi2).toBeLessThan(chiSquareCritical(kept - 1));
    else expect(counts[argmaxRef(V12)]).toBe(B);
  });

  it('a 128256-token vocabulary: returns a kept token, as the reference does', async () => {
    const [B, V] = [2, 128256];
    const logits = new Rng(5).f32(B * V, 3);
    for (const cfg of [
      { temperature: 0.8, topK: 50, topP: 0.9, seed: 21, step: 0 },
      { temperature: 1, topP: 0.95, seed: 22, step: 5 },
    ]) {
      const { ids, logp } = await run(logits, B, V, cfg);
      const ref = sampleRef(logits, B, V, cfg);
      for (let b = 0; b < B; b++) {
        const d = sampleDistributionRef(logits.subarray(b * V, (b + 1) * V), V, cfg);
        expect(d.keep[ids[b]!], `row ${b}: token ${ids[b]} kept`).toBe(1);
      }
      expect(Array.from(ids)).toEqual(Array.from(ref.ids));
      expectClose(logp, ref.logp, { atol: 1e-4, rtol: 1e-5, label: 'logp' });
    }
  });
});
