import { describe, expect, it } from 'vitest';
import { klGradPerToken, klPerToken, klSequence, klToken, klTokenGrad } from '../../src/selfplay/kl';

const close = (a: number, b: number) => expect(a).toBeCloseTo(b, 10);

describe('kl estimators', () => {
  // logp = -1, logp_ref = -2: k1 = 1; r = -1, k3 = e^-1 + 1 - 1 = e^-1; dk3 = 1 - e^-1
  // logp = -2, logp_ref = -1: k1 = -1; r = 1,  k3 = e - 1 - 1 = e - 2;  dk3 = 1 - e
  // logp = logp_ref: every value and k3's derivative are 0 (k1's derivative is 1)
  it('matches hand values per token', () => {
    close(klToken('k1', -1, -2), 1);
    close(klToken('k3', -1, -2), Math.exp(-1));
    close(klTokenGrad('k1', -1, -2), 1);
    close(klTokenGrad('k3', -1, -2), 1 - Math.exp(-1));
    close(klToken('k1', -2, -1), -1);
    close(klToken('k3', -2, -1), Math.E - 2);
    close(klTokenGrad('k3', -2, -1), 1 - Math.E);
    close(klToken('k3', -0.7, -0.7), 0);
    close(klTokenGrad('k3', -0.7, -0.7), 0);
    close(klTokenGrad('k1', -0.7, -0.7), 1);
  });

  it('sums and averages over a sequence', () => {
    const logp = [-1, -2, -0.5];
    const ref = [-2, -1, -0.5];
    // k1: 1 - 1 + 0 = 0; k3: e^-1 + (e - 2) + 0
    const k1 = klSequence('k1', logp, ref);
    close(k1.sum, 0);
    close(k1.mean, 0);
    const k3 = klSequence('k3', logp, ref);
    close(k3.sum, Math.exp(-1) + Math.E - 2);
    close(k3.mean, (Math.exp(-1) + Math.E - 2) / 3);
    expect(Array.from(klPerToken('k1', logp, ref))).toEqual([1, -1, 0]);
    const g = klGradPerToken('k3', logp, ref);
    close(g[0], 1 - Math.exp(-1));
    close(g[1], 1 - Math.E);
    close(g[2], 0);
    expect(klSequence('k3', [], [])).toEqual({ sum: 0, mean: 0 });
  });

  it('k3 is never negative and its derivative is the finite difference', () => {
    const h = 1e-6;
    for (const [lp, lr] of [[-0.1, -3], [-3, -0.1], [-1.3, -1.2], [-5, -5]]) {
      expect(klToken('k3', lp, lr)).toBeGreaterThanOrEqual(0);
      for (const est of ['k1', 'k3'] as const) {
        const fd = (klToken(est, lp + h, lr) - klToken(est, lp - h, lr)) / (2 * h);
        expect(klTokenGrad(est, lp, lr)).toBeCloseTo(fd, 6);
      }
    }
  });

  it('rejects mismatched lengths', () => {
    expect(() => klPerToken('k1', [1, 2], [1])).toThrow();
  });
});
