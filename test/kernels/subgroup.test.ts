/**
 * Subgroup reductions (the `subgroups` feature) against the float64 references, next to
 * the workgroup-memory fallback on the same inputs. SwiftShader runs them with
 * subgroups of 4, lavapipe with 8; rows narrower, wider and not a multiple of the
 * workgroup cover partial subgroups and several passes. Skips the subgroup path, with
 * the reason printed, on adapters without the feature.
 */
import { describe, expect, it } from 'vitest';
import { rmsnormBackward, rmsnormForward, rmsnormWorkgroup } from '../../src/kernels/rmsnorm';
import { rmsnormRef } from '../../src/kernels/rmsnorm.ref';
import { useGpu, withoutSubgroups } from '../helpers/gpu';
import { Rng, expectClose } from '../helpers/numeric';

describe('subgroup reductions', () => {
  const gpu = useGpu();

  for (const sg of [true, false]) {
    it(`RMSNorm forward and dx with ${sg ? 'subgroupAdd' : 'the workgroup-memory tree'} vs the float64 reference`, async (ctx) => {
      const g = gpu();
      console.log(`adapter: ${g.caps.adapterName} (subgroups ${g.caps.subgroups ? 'yes' : 'no'})`);
      if (sg && !g.caps.subgroups) {
        console.log(`skipped: adapter ${g.caps.adapterName} lacks subgroups`);
        ctx.skip();
      }
      const rng = new Rng(5);
      // Workgroups of 32, 64 and 256 threads (rmsnormWorkgroup), full and ragged last passes.
      for (const C of [3, 20, 128, 1000, 3072, 3077]) {
        const N = 5;
        const x = rng.f32(N * C, 2);
        const w = rng.f32(C);
        const eps = 1e-5;
        const tx = g.upload(x, [N, C]);
        const tw = g.upload(w, [C]);
        const out = g.empty([N, C]);
        const rstd = g.empty([N]);
        rmsnormForward(g, out, rstd, tx, tw, N, C, eps, { subgroups: sg });
        const ref = rmsnormRef(x, w, N, C, eps);
        const label = `C=${C} wg=${rmsnormWorkgroup(C)}`;
        expectClose(await g.readF32(out), ref.out, { atol: 1e-5, rtol: 1e-5, label: `${label} out` });
        expectClose(await g.readF32(rstd), ref.rstd, { atol: 1e-6, rtol: 1e-5, label: `${label} rstd` });
        // dx = r (w dout - x k), k = r^2 / C * sum_c w dout x, in float64.
        const dout = rng.f32(N * C);
        const dx64 = new Float64Array(N * C);
        for (let n = 0; n < N; n++) {
          const r = ref.rstd[n]!;
          let dot = 0;
          for (let c = 0; c < C; c++) dot += w[c]! * dout[n * C + c]! * x[n * C + c]!;
          const k = (dot * r * r) / C;
          for (let c = 0; c < C; c++) dx64[n * C + c] = r * (w[c]! * dout[n * C + c]! - x[n * C + c]! * k);
        }
        const td = g.upload(dout, [N, C]);
        const dx = g.empty([N, C]);
        rmsnormBackward(g, dx, null, td, tx, rstd, tw, N, C, { subgroups: sg });
        expectClose(await g.readF32(dx), dx64, { atol: 1e-5, rtol: 1e-4, label: `${label} dx` });
        for (const t of [tx, tw, out, rstd, td, dx]) t.release();
      }
    });
  }

  it('refuses the subgroup path in plain words where the feature is missing', async () => {
    await withoutSubgroups((g) => {
      const t = g.empty([4]);
      expect(() => rmsnormForward(g, t, t, t, t, 1, 4, 1e-5, { subgroups: true })).toThrow(/subgroups feature/);
      t.release();
    });
  });
});
