import { describe, expect, it } from 'vitest';
import { klToken } from '../../src/selfplay/kl';
import {
  aggregationCoefficients,
  roleLoss,
  selfPlayLoss,
  type LossAggregation,
  type LossOptions,
  type ScoredSequence,
} from '../../src/selfplay/losses';

const close = (a: number, b: number, digits = 10) => expect(a).toBeCloseTo(b, digits);
const closeAll = (a: ArrayLike<number>, b: number[], digits = 10) => {
  expect(a.length).toBe(b.length);
  for (let i = 0; i < b.length; i++) close(a[i], b[i], digits);
};

// Two ragged answers: lengths 1 and 3, advantages +1 and -2.
const answers: ScoredSequence[] = [
  { logp: [-1], logpRef: [-1.5], advantage: 1 },
  { logp: [-1, -2, -3], logpRef: [-1.5, -1.5, -1.5], advantage: -2 },
];

describe('aggregation coefficients on lengths [1, 3]', () => {
  // S = 2 sequences, 4 tokens
  //   grpo    1/(S T_s)    = [1/2, 1/6]
  //   bnpo    1/4 each
  //   dr_grpo 1/(S T_max)  = 1/8 each with maxLength 4, 1/6 each with the default T_max = 3
  //   dapo    1/T_global   = 1/8 with globalTokens 8, else 1/4 (= bnpo)
  //   seq_sum 1/S          = 1/2 each
  it('matches hand values', () => {
    closeAll(aggregationCoefficients([1, 3], { aggregation: 'grpo' }), [1 / 2, 1 / 6]);
    closeAll(aggregationCoefficients([1, 3], { aggregation: 'bnpo' }), [1 / 4, 1 / 4]);
    closeAll(aggregationCoefficients([1, 3], { aggregation: 'dr_grpo', maxLength: 4 }), [1 / 8, 1 / 8]);
    closeAll(aggregationCoefficients([1, 3], { aggregation: 'dr_grpo' }), [1 / 6, 1 / 6]);
    closeAll(aggregationCoefficients([1, 3], { aggregation: 'dapo', globalTokens: 8 }), [1 / 8, 1 / 8]);
    closeAll(aggregationCoefficients([1, 3], { aggregation: 'dapo' }), [1 / 4, 1 / 4]);
    closeAll(aggregationCoefficients([1, 3], { aggregation: 'seq_sum' }), [1 / 2, 1 / 2]);
  });

  it('gives empty sequences no weight and rejects impossible settings', () => {
    closeAll(aggregationCoefficients([0, 2], { aggregation: 'grpo' }), [0, 1 / 4]);
    expect(aggregationCoefficients([], { aggregation: 'bnpo' })).toEqual([]);
    expect(() => aggregationCoefficients([1, 5], { aggregation: 'dr_grpo', maxLength: 4 })).toThrow();
    expect(() => aggregationCoefficients([1, 5], { aggregation: 'dapo', globalTokens: 4 })).toThrow();
  });
});

describe('per-token weights and loss values', () => {
  it('beta = 0: weight = -A * c_s', () => {
    // grpo: seq0 [-1 * 1/2], seq1 [2/6, 2/6, 2/6]
    const grpo = roleLoss(answers, 0, 'k1', { aggregation: 'grpo' });
    closeAll(grpo.tokenWeights[0], [-0.5]);
    closeAll(grpo.tokenWeights[1], [1 / 3, 1 / 3, 1 / 3]);
    // bnpo: seq0 [-1/4], seq1 [1/2, 1/2, 1/2]
    const bnpo = roleLoss(answers, 0, 'k1', { aggregation: 'bnpo' });
    closeAll(bnpo.tokenWeights[0], [-0.25]);
    closeAll(bnpo.tokenWeights[1], [0.5, 0.5, 0.5]);
    // dr_grpo, maxLength 4: seq0 [-1/8], seq1 [2/8, 2/8, 2/8]
    const dr = roleLoss(answers, 0, 'k1', { aggregation: 'dr_grpo', maxLength: 4 });
    closeAll(dr.tokenWeights[0], [-1 / 8]);
    closeAll(dr.tokenWeights[1], [0.25, 0.25, 0.25]);
  });

  it('grpo with k1, beta = 0.1: hand-computed loss parts and weights', () => {
    // pg = sum c_s * (-A_s) * logp_st
    //    = 1/2 * (-1)(-1) + 1/6 * 2 * (-1 - 2 - 3) = 0.5 - 2 = -1.5
    // kl (k1 = logp - ref): seq0 0.5 -> 1/2 * 0.5 = 0.25; seq1 0.5 - 0.5 - 1.5 = -1.5 -> 1/6 * -1.5 = -0.25
    //    kl = 0, klTerm = 0
    // weights c_s * (-A_s + beta * 1): seq0 1/2 * -0.9 = -0.45; seq1 1/6 * 2.1 = 0.35
    const r = roleLoss(answers, 0.1, 'k1', { aggregation: 'grpo' });
    close(r.pgLoss, -1.5);
    close(r.kl, 0);
    close(r.klTerm, 0);
    close(r.loss, -1.5);
    closeAll(r.tokenWeights[0], [-0.45]);
    closeAll(r.tokenWeights[1], [0.35, 0.35, 0.35]);
  });

  it('bnpo with k3, beta = 0.5: hand-computed loss parts and weights', () => {
    // c = 1/4. r = ref - logp per token: [-0.5], [-0.5, 0.5, 1.5]
    // k3 = e^r - r - 1; dk3 = 1 - e^r
    // pg = 1/4 * [ -1 * -1 + 2 * (-6) ] = 1/4 * (1 - 12) = -2.75
    const rs = [-0.5, -0.5, 0.5, 1.5];
    const k3 = rs.map((r) => Math.exp(r) - r - 1);
    const k3sum = k3.reduce((a, b) => a + b, 0);
    const res = roleLoss(answers, 0.5, 'k3', { aggregation: 'bnpo' });
    close(res.pgLoss, -2.75);
    close(res.kl, k3sum / 4);
    close(res.klTerm, (0.5 * k3sum) / 4);
    closeAll(res.tokenWeights[0], [(-1 + 0.5 * (1 - Math.exp(-0.5))) / 4]);
    closeAll(
      res.tokenWeights[1],
      [-0.5, 0.5, 1.5].map((r) => (2 + 0.5 * (1 - Math.exp(r))) / 4),
    );
  });

  it('L = L_sol + alpha_ch * L_ch, with alpha_ch inside the Challenger weights', () => {
    // one query of 2 tokens, A_ch = 3, beta 0 , grpo: c = 1/2, weight = alpha * 1/2 * -3
    const queries: ScoredSequence[] = [{ logp: [-2, -4], logpRef: [-2, -4], advantage: 3 }];
    const opts: LossOptions = { aggregation: 'grpo', beta: 0, klEstimator: 'k1', alphaCh: 0.25 };
    const l = selfPlayLoss(answers, queries, opts);
    // L_ch = 1/2 * (-3)(-6) = 9; L_sol = -1.5 (above with beta 0); L = -1.5 + 0.25 * 9
    close(l.challenger.loss, 9);
    close(l.solver.loss, -1.5);
    close(l.loss, -1.5 + 0.25 * 9);
    closeAll(l.challenger.tokenWeights[0], [-0.375, -0.375]);
  });
});

describe('per-token weights are dL/dlogp (finite differences)', () => {
  const queries: ScoredSequence[] = [
    { logp: [-0.3, -2.2], logpRef: [-0.4, -1.9], advantage: 0.7 },
    { logp: [-1.1, -0.2, -0.9, -3.0, -0.05], logpRef: [-1.0, -0.6, -0.9, -2.5, -0.1], advantage: -0.35 },
    { logp: [], logpRef: [], advantage: 1 },
  ];
  const ans: ScoredSequence[] = [
    { logp: [-0.8], logpRef: [-1.2], advantage: 0.4 },
    { logp: [-0.1, -1.7, -2.4], logpRef: [-0.3, -1.6, -2.9], advantage: -1.3 },
    { logp: [-0.6, -0.6, -0.4, -1.5, -2.2, -0.01], logpRef: [-0.5, -0.9, -0.4, -1.2, -2.0, -0.02], advantage: 0.9 },
  ];
  const modes: LossAggregation[] = ['grpo', 'bnpo', 'dr_grpo', 'dapo', 'seq_sum'];
  for (const aggregation of modes) {
    for (const klEstimator of ['k1', 'k3'] as const) {
      it(`${aggregation} / ${klEstimator}`, () => {
        const opts: LossOptions = {
          aggregation, klEstimator, beta: 0.2, alphaCh: 0.6,
          maxLength: 8, globalTokens: 17, challengerMaxLength: 6, challengerGlobalTokens: 11,
        };
        const base = selfPlayLoss(ans, queries, opts);
        const h = 1e-6;
        const perturb = (seqs: ScoredSequence[], s: number, t: number, d: number) =>
          seqs.map((q, k) => (k !== s ? q : { ...q, logp: Array.from(q.logp, (v, u) => (u === t ? v + d : v)) }));
        for (const role of ['solver', 'challenger'] as const) {
          const seqs = role === 'solver' ? ans : queries;
          seqs.forEach((q, s) => {
            for (let t = 0; t < q.logp.length; t++) {
              const lossAt = (d: number) =>
                role === 'solver'
                  ? selfPlayLoss(perturb(ans, s, t, d), queries, opts).loss
                  : selfPlayLoss(ans, perturb(queries, s, t, d), opts).loss;
              const fd = (lossAt(h) - lossAt(-h)) / (2 * h);
              expect(base[role].tokenWeights[s][t]).toBeCloseTo(fd, 6);
            }
          });
        }
        expect(base.challenger.tokenWeights[2].length).toBe(0);
      });
    }
  }
});

describe('with beta > 0 and zero advantages the weights pull logp toward logp_ref', () => {
  // A gradient-descent step changes logp by -lr * weight. Where logp > logp_ref it must lower logp
  // (weight > 0); with k3 where logp < logp_ref it must raise logp (weight < 0). k1's derivative
  // is the constant 1, so per token it always lowers logp (and in expectation it does nothing, see
  // below); the test checks the k1 case only where logp > logp_ref.
  const seqs: ScoredSequence[] = [
    { logp: [-0.5, -2.0, -1.0], logpRef: [-1.0, -1.5, -1.0], advantage: 0 },
    { logp: [-0.2], logpRef: [-3.0], advantage: 0 },
  ];
  for (const aggregation of ['grpo', 'bnpo', 'dr_grpo', 'dapo', 'seq_sum'] as LossAggregation[]) {
    it(aggregation, () => {
      const lr = 0.1;
      for (const est of ['k1', 'k3'] as const) {
        const r = roleLoss(seqs, 0.05, est, { aggregation });
        seqs.forEach((q, s) =>
          Array.from(q.logp).forEach((lp, t) => {
            const ref = q.logpRef[t];
            const w = r.tokenWeights[s][t];
            const stepped = lp - lr * w;
            if (lp > ref) {
              expect(w).toBeGreaterThan(0);
              expect(Math.abs(stepped - ref)).toBeLessThan(Math.abs(lp - ref));
            } else if (lp < ref && est === 'k3') {
              expect(w).toBeLessThan(0);
              expect(Math.abs(stepped - ref)).toBeLessThan(Math.abs(lp - ref));
            } else if (lp === ref && est === 'k3') {
              expect(w).toBe(0);
            }
            // and the step lowers this token's KL under k3
            if (est === 'k3' && lp !== ref) expect(klToken('k3', stepped, ref)).toBeLessThan(klToken('k3', lp, ref));
          }),
        );
      }
    });
  }
});

describe('expected update of a one-token categorical policy with zero advantages', () => {
  // pi = softmax(theta) over 3 tokens, one-token sequences, c = 1. The expected gradient of the
  // sampled loss is g = sum_a pi(a) * w(a) * (e_a - pi), w(a) = dL/dlogp(a).
  //   k3: w(a) = beta (1 - ref(a)/pi(a))  ->  g = beta (pi - ref): a step moves pi toward ref.
  //   k1: w(a) = beta                     ->  g = beta (pi - pi) = 0: as a loss term, k1 has no
  //       expected gradient (it pulls toward ref only when used as a stop-gradient penalty on the reward).
  const softmax = (x: number[]) => {
    const m = Math.max(...x);
    const e = x.map((v) => Math.exp(v - m));
    const z = e.reduce((a, b) => a + b, 0);
    return e.map((v) => v / z);
  };
  const klDiv = (p: number[], q: number[]) => p.reduce((s, pa, a) => s + pa * Math.log(pa / q[a]), 0);
  const theta = [1.5, -0.5, 0.2];
  const ref = softmax([0, 0.3, -0.2]);
  const expectedGrad = (est: 'k1' | 'k3', beta: number) => {
    const pi = softmax(theta);
    const g = [0, 0, 0];
    for (let a = 0; a < 3; a++) {
      const w = roleLoss([{ logp: [Math.log(pi[a])], logpRef: [Math.log(ref[a])], advantage: 0 }], beta, est, {
        aggregation: 'grpo',
      }).tokenWeights[0][0];
      for (let k = 0; k < 3; k++) g[k] += pi[a] * w * ((k === a ? 1 : 0) - pi[k]);
    }
    return { pi, g };
  };

  it('k3 moves the policy toward the reference', () => {
    const beta = 0.5;
    const { pi, g } = expectedGrad('k3', beta);
    closeAll(g, pi.map((p, k) => beta * (p - ref[k])));
    const stepped = softmax(theta.map((t, k) => t - 0.5 * g[k]));
    expect(klDiv(stepped, ref)).toBeLessThan(klDiv(pi, ref));
  });

  it('k1 as a loss term has zero expected gradient', () => {
    const { g } = expectedGrad('k1', 0.5);
    closeAll(g, [0, 0, 0]);
  });
});

describe("klPlacement 'reward' (stop-gradient KL penalty on the advantage)", () => {
  it('weights are -(A - beta * kl) * c_s', () => {
    // grpo, k1, beta 0.1 on `answers`: k1 = [0.5], [0.5, -0.5, -1.5]
    //   seq0: 1/2 * -(1 - 0.05) = -0.475
    //   seq1: 1/6 * -(-2 - 0.1 * [0.5, -0.5, -1.5]) = [2.05, 1.95, 1.85] / 6
    const r = roleLoss(answers, 0.1, 'k1', { aggregation: 'grpo' }, 1, 'reward');
    closeAll(r.tokenWeights[0], [-0.475]);
    closeAll(r.tokenWeights[1], [2.05 / 6, 1.95 / 6, 1.85 / 6]);
    // the reported loss parts do not depend on the placement
    close(r.pgLoss, -1.5);
    close(r.kl, 0);
  });

  it('with k1, the expected update of a categorical policy is beta * grad KL(pi || ref)', () => {
    // w(a) = beta * log(pi(a)/ref(a)); g = beta * sum_a pi(a) log(pi(a)/ref(a)) (e_a - pi),
    // which is beta times the exact gradient of KL(pi || ref) w.r.t. the logits.
    const softmax = (x: number[]) => {
      const e = x.map((v) => Math.exp(v));
      const z = e.reduce((a, b) => a + b, 0);
      return e.map((v) => v / z);
    };
    const klDiv = (p: number[], q: number[]) => p.reduce((s, pa, a) => s + pa * Math.log(pa / q[a]), 0);
    const theta = [1.5, -0.5, 0.2];
    const ref = softmax([0, 0.3, -0.2]);
    const beta = 0.5;
    const pi = softmax(theta);
    const g = [0, 0, 0];
    for (let a = 0; a < 3; a++) {
      const w = roleLoss([{ logp: [Math.log(pi[a])], logpRef: [Math.log(ref[a])], advantage: 0 }], beta, 'k1', {
        aggregation: 'grpo',
      }, 1, 'reward').tokenWeights[0][0];
      for (let k = 0; k < 3; k++) g[k] += pi[a] * w * ((k === a ? 1 : 0) - pi[k]);
    }
    const h = 1e-6;
    for (let k = 0; k < 3; k++) {
      const plus = theta.map((t, u) => (u === k ? t + h : t));
      const minus = theta.map((t, u) => (u === k ? t - h : t));
      const fd = (klDiv(softmax(plus), ref) - klDiv(softmax(minus), ref)) / (2 * h);
      expect(g[k]).toBeCloseTo(beta * fd, 6);
    }
    const stepped = softmax(theta.map((t, k) => t - 0.5 * g[k]));
    expect(klDiv(stepped, ref)).toBeLessThan(klDiv(pi, ref));
  });

  it('selfPlayLoss passes the placement to both roles', () => {
    const q: ScoredSequence[] = [{ logp: [-1], logpRef: [-2], advantage: 0 }];
    const l = selfPlayLoss(q, q, { aggregation: 'grpo', beta: 1, klEstimator: 'k1', alphaCh: 2, klPlacement: 'reward' });
    // k1 = 1: solver weight 1 * (0 + 1) = 1; challenger 2 * 1 = 2
    closeAll(l.solver.tokenWeights[0], [1]);
    closeAll(l.challenger.tokenWeights[0], [2]);
  });
});
