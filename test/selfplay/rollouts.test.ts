/**
 * The iteration's stages on hand-made rollouts (no GPU): rewards per answer, advantages
 * written into the rollouts, the scoring micro-batches, loss coefficients and dL/dlogp,
 * and the games and metrics the record stage makes. Expected values are worked out by
 * hand in the comments. The GPU passes (scoreRollouts) run in trainer.test.ts.
 */
import { describe, expect, it } from 'vitest';
import { computeAdvantages, type RewardSource } from '../../src/selfplay/advantages';
import { arithmeticQuery, verifiableReward } from '../../src/selfplay/prompts';
import {
  answerTable,
  applyAdvantages,
  batchGradient,
  finiteLoss,
  iterationValues,
  lossCoefficients,
  newRollout,
  recordGames,
  scoringBatches,
  verifiableRewards,
  type IterationRewards,
  type Rollout,
} from '../../src/selfplay/rollouts';
import { METRIC_NAMES } from '../../src/selfplay/types';

const query = (group: number, text: string, completion: number[] = [7]) => newRollout('challenger', group, [1, 2], completion, text, 'stop');
const answer = (group: number, text: string, completion: number[] = [5]) => newRollout('solver', group, [3], completion, text, 'stop');

describe('reward stage', () => {
  it('checks each answer against its own query; a query the checker cannot read is invalid and pays the Solver 1', () => {
    // Mixed order on purpose: groups and the order within a group decide, not list positions.
    const rollouts = [answer(0, '3'), query(0, arithmeticQuery(1, 2)), answer(1, 'no idea'), answer(0, 'it is 4'), query(1, 'hello'), answer(1, '3')];
    expect(answerTable(rollouts, (r) => r.text)).toEqual([['3', 'it is 4'], ['no idea', '3']]);
    const v = verifiableRewards(rollouts, verifiableReward);
    // 1 + 2 = 3: "3" is right (1), "it is 4" is wrong (0); "hello" poses nothing: both answers get 1.
    expect(v.rewards).toEqual([[1, 0], [1, 1]]);
    expect(v.queryValid).toEqual([true, false]);
  });

  it('an answer to a query that does not exist is an error', () => {
    expect(() => answerTable([query(0, 'q'), answer(1, 'a')], (r) => r.text)).toThrow(/answers query 1, but there are 1 queries/);
  });

  it('writes rewards and advantages of both roles into the rollouts', () => {
    const rollouts = [query(0, 'q0'), query(1, 'q1'), answer(0, 'a00'), answer(0, 'a01'), answer(1, 'a10'), answer(1, 'a11')];
    const sources: RewardSource[] = [
      { name: 'verifiable', kind: 'game', weight: 1, rewards: [[1, 0], [1, 1]] },
      { name: 'judge', kind: 'quality', weight: 1, rewards: [[7, 5], [3, 3]] },
    ];
    // R = [[8, 5], [4, 4]], group means [6.5, 4] -> A_sol = [[1.5, -1.5], [0, 0]]
    // V = [0.5, 1], V_Q = [6, 3] -> C = -V + V_Q = [5.5, 2], mean 3.75 -> A_ch = [1.75, -1.75]
    applyAdvantages(rollouts, sources, computeAdvantages(sources, { scale: 'none' }));
    const [q0, q1, a00, a01, a10, a11] = rollouts as [Rollout, Rollout, Rollout, Rollout, Rollout, Rollout];
    expect(a00.rewards).toEqual({ verifiable: 1, judge: 7 });
    expect(a01.rewards).toEqual({ verifiable: 0, judge: 5 });
    expect([a00.reward, a01.reward, a10.reward, a11.reward]).toEqual([8, 5, 4, 4]);
    expect([a00.advantage, a01.advantage, a10.advantage, a11.advantage]).toEqual([1.5, -1.5, 0, 0]);
    expect([q0.reward, q1.reward]).toEqual([5.5, 2]);
    expect([q0.advantage, q1.advantage]).toEqual([1.75, -1.75]);
    expect(q0.rewards).toEqual({});
  });
});

describe('score stage: micro-batches', () => {
  const V = 100;
  const rollouts = [
    query(0, 'q0', [8, 9]),
    newRollout('solver', 0, [1, 2], [3, 4], 'a', 'stop'),
    newRollout('solver', 0, [5], [6], 'b', 'stop'),
    newRollout('solver', 0, [7, 7, 7], [], 'c', 'stop'),
    query(1, 'q1', [10]),
  ];

  it('Solver rollouts first, then the Challenger, each in micro-batches of its own, list order kept', () => {
    const b = scoringBatches(rollouts, { microBatch: 2, vocabSize: V, challenger: true });
    expect(b.map((x) => x.rollouts.map((r) => r.text))).toEqual([['a', 'b'], ['c'], ['q0', 'q1']]);
    // Batch 0: T = max(2 + 2, 1 + 1) = 4. Row t predicts token t + 1, so "a"'s completion
    // (after a 2-token prompt) sits at rows 1, 2 and "b"'s at row 4 + 0 = 4.
    expect(b[0]!.batch.T).toBe(4);
    expect(b[0]!.flat).toEqual([1, 2, 4]);
    expect(b[0]!.rows).toEqual([[0, 1], [2]]);
    expect([...b[0]!.batch.targets!]).toEqual([V, 3, 4, V, 6, V, V, V]);
    // An empty completion: nothing to score.
    expect(b[1]!.flat).toEqual([]);
    expect(b[1]!.rows).toEqual([[]]);
  });

  it('without the Challenger (alpha_ch 0) its queries are not batched', () => {
    const b = scoringBatches(rollouts, { microBatch: 4, vocabSize: V, challenger: false });
    expect(b.map((x) => x.rollouts.map((r) => r.text))).toEqual([['a', 'b', 'c']]);
  });
});

describe('update stage: coefficients and dL/dlogp', () => {
  const rollouts = [answer(0, 'a', [1, 1]), answer(0, 'b', [1]), answer(1, 'c', [1, 1, 1]), query(0, 'q', [2, 2]), query(1, 'r', [2, 2])];

  it('aggregation coefficients over each role of the whole iteration', () => {
    // grpo: 1 / (S * T_s): answers S = 3, T = [2, 1, 3]; queries S = 2, T = [2, 2].
    const grpo = lossCoefficients(rollouts, 'grpo', { solver: 4, challenger: 2 });
    const expected = [1 / 6, 1 / 3, 1 / 9, 1 / 4, 1 / 4];
    rollouts.forEach((r, k) => expect(grpo.get(r)).toBeCloseTo(expected[k]!, 15));
    // dr_grpo: 1 / (S * T_max) with each role's length bound: 1 / 12 and 1 / 4.
    const dr = lossCoefficients(rollouts, 'dr_grpo', { solver: 4, challenger: 2 });
    rollouts.forEach((r, k) => expect(dr.get(r)).toBeCloseTo(k < 3 ? 1 / 12 : 1 / 4, 15));
  });

  it("one micro-batch's gradient and loss shares, the Challenger's scaled by alpha_ch", () => {
    const a = answer(0, 'a', [1, 1]);
    a.logp = Float32Array.of(-1, -2);
    a.refLogp = Float32Array.of(-1.5, -2);
    a.advantage = 0.5;
    const q = query(0, 'q', [2]);
    q.logp = Float32Array.of(-3);
    q.refLogp = Float32Array.of(-2);
    q.advantage = -1;
    const b = scoringBatches([a, q], { microBatch: 2, vocabSize: 10, challenger: true });
    // Two batches (one per role); put both in one by hand to see the positions interleave.
    const batch = { ...b[0]!, rollouts: [a, q], rows: [[0, 1], [2]], flat: [0, 1, 2] };
    const coef = new Map([[a, 0.25], [q, 0.5]]);
    const parts = { solverPg: 1, solverKl: 0, chPg: 0, chKl: 0 };
    const dl = batchGradient(batch, coef, { aggregation: 'grpo', beta: 0.1, klEstimator: 'k1', klPlacement: 'loss', alphaCh: 0.5 }, parts);
    // k1: dkl/dlogp = 1, so per token dl = coef * (-A + beta):
    //   answer: 0.25 * (-0.5 + 0.1) = -0.1 on both tokens
    //   query:  alpha 0.5 * 0.5 * (1 + 0.1) = 0.275
    expect(dl[0]).toBeCloseTo(-0.1, 6);
    expect(dl[1]).toBeCloseTo(-0.1, 6);
    expect(dl[2]).toBeCloseTo(0.275, 6);
    // answer pg = 0.25 * (-0.5 * -1 + -0.5 * -2) = 0.375 (added onto the 1 already there),
    //        kl = 0.25 * ((-1 + 1.5) + (-2 + 2)) = 0.125
    // query  pg = 0.5 * (1 * -3) = -1.5, kl = 0.5 * (-3 + 2) = -0.5 (alpha_ch not included)
    expect(parts.solverPg).toBeCloseTo(1.375, 12);
    expect(parts.solverKl).toBeCloseTo(0.125, 12);
    expect(parts.chPg).toBeCloseTo(-1.5, 12);
    expect(parts.chKl).toBeCloseTo(-0.5, 12);
    expect(finiteLoss(dl, parts)).toBe(true);
    a.logp = Float32Array.of(Number.NaN, -2);
    const bad = { solverPg: 0, solverKl: 0, chPg: 0, chKl: 0 };
    expect(finiteLoss(batchGradient(batch, coef, { aggregation: 'grpo', beta: 0.1, klEstimator: 'k1', klPlacement: 'loss', alphaCh: 0.5 }, bad), bad)).toBe(false);
  });
});

describe('record stage', () => {
  function iteration() {
    const q0 = query(0, 'q0', [7, 8]);
    q0.logp = Float32Array.of(-1, -1);
    q0.refLogp = Float32Array.of(-1.5, -0.5);
    const q1 = query(1, 'q1', [9]); // scored by the reference only (the update stopped before it)
    q1.refLogp = Float32Array.of(-2);
    const a00 = answer(0, 'x', [1]);
    a00.logp = Float32Array.of(-0.5);
    a00.refLogp = Float32Array.of(-1);
    a00.entropy = Float32Array.of(2);
    a00.judge = { text: '<score>5</score>', reason: 'ok', score: 5 };
    const a01 = newRollout('solver', 0, [3], [1, 2], 'yy', 'length');
    a01.logp = Float32Array.of(-1, -1);
    a01.refLogp = Float32Array.of(-1, -2);
    a01.entropy = Float32Array.of(1, 3);
    const a10 = answer(1, 'z', [3]);
    a10.logp = Float32Array.of(-2);
    a10.refLogp = Float32Array.of(-2);
    a10.entropy = Float32Array.of(4);
    const a11 = answer(1, '', []);
    a11.logp = new Float32Array(0);
    a11.refLogp = new Float32Array(0);
    a11.entropy = new Float32Array(0);
    const rollouts = [q0, q1, a00, a01, a10, a11];
    const sources: RewardSource[] = [{ name: 'verifiable', kind: 'game', weight: 1, rewards: [[1, 0], [1, 1]] }];
    const advantages = computeAdvantages(sources, { scale: 'none' });
    applyAdvantages(rollouts, sources, advantages);
    const rewards: IterationRewards = { sources, advantages, queryValid: [true, false], judged: true, judgeFallbacks: 1, customFallbacks: 2 };
    return { rollouts, rewards };
  }

  it('games: sums of log-probs, mean KL per token, NaN log-probs for what the policy did not score', () => {
    const { rollouts, rewards } = iteration();
    const [g0, g1] = recordGames(rollouts, rewards, 7, 'k1');
    // q0: logp -1 - 1 = -2, ref -1.5 - 0.5 = -2, k1 per token [0.5, -0.5] -> mean 0.
    // V = [0.5, 1], C = -V = [-0.5, -1], mean -0.75 -> A_ch = [0.25, -0.25].
    expect(g0).toMatchObject({ iteration: 7, index: 0, query: 'q0', queryTokens: 2, queryFinishReason: 'stop', queryValid: true, queryLogp: -2, queryLogpRef: -2, queryKl: 0, value: 0.5, qualityValue: 0, challengerReward: -0.5, challengerAdvantage: 0.25 });
    expect(g1).toMatchObject({ index: 1, queryTokens: 1, queryValid: false, queryLogpRef: -2, queryKl: 0, value: 1, challengerReward: -1, challengerAdvantage: -0.25 });
    expect(g1!.queryLogp).toBeNaN();
    // a01: k1 per token [0, 1] -> mean 0.5; reward 0, advantage 0 - 0.5.
    expect(g0!.answers).toEqual([
      { text: 'x', tokens: 1, finishReason: 'stop', rewards: { verifiable: 1 }, reward: 1, advantage: 0.5, logp: -0.5, logpRef: -1, kl: 0.5, judge: { text: '<score>5</score>', reason: 'ok', score: 5 } },
      { text: 'yy', tokens: 2, finishReason: 'length', rewards: { verifiable: 0 }, reward: 0, advantage: -0.5, logp: -2, logpRef: -3, kl: 0.5 },
    ]);
    expect(g1!.answers.map((a) => [a.tokens, a.logp, a.kl, a.advantage])).toEqual([[1, -2, 0, 0], [0, 0, 0, 0]]);
  });

  it('metrics: losses from the parts, lengths, entropy over answer tokens, timing, counters', () => {
    const { rollouts, rewards } = iteration();
    const update = { parts: { solverPg: 0.2, solverKl: 0.1, chPg: -0.4, chKl: 0.3 }, gradNorm: 3, clipCoef: 0.5, learningRate: 0.01, skipped: null };
    const times = { start: 1000, played: 3000, rewarded: 3500, updated: 5000 };
    const v = iterationValues({ rollouts, rewards, update, config: { world: 'open', beta: 0.5, alphaCh: 0.25 }, times, gpuPeakMib: 12, examAccuracy: 0.4 });
    const expected: Record<string, number> = {
      // Solver rewards [1, 0, 1, 1]: mean 0.75, unbiased std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5.
      reward: 0.75,
      reward_std: 0.5,
      // Challenger rewards [-0.5, -1]: mean -0.75, std sqrt(2 * 0.0625 / 1).
      'challenger/reward': -0.75,
      'challenger/reward_std': Math.sqrt(0.125),
      kl: 0.1,
      'challenger/kl': 0.3,
      // Answer tokens' entropies [2, 1, 3, 4] (the queries' do not count).
      entropy: 2.5,
      // L_sol = 0.2 + 0.5 * 0.1 = 0.25, L_ch = -0.4 + 0.5 * 0.3 = -0.25, L = 0.25 + 0.25 * -0.25.
      loss: 0.1875,
      'loss/solver': 0.25,
      'loss/challenger': -0.25,
      'loss/solver_pg': 0.2,
      'loss/solver_kl': 0.05,
      // Answer lengths [1, 2, 1, 0], query lengths [2, 1]; one answer of four hit the length limit.
      'completions/mean_length': 1,
      'completions/max_length': 2,
      'completions/min_length': 0,
      'completions/clipped_ratio': 0.25,
      'queries/mean_length': 1.5,
      // Group 1's rewards [1, 1] have no spread.
      frac_reward_zero_std: 0.5,
      grad_norm: 3,
      clip_coef: 0.5,
      learning_rate: 0.01,
      step_skipped: 0,
      'judge/fallback_count': 1,
      'reward/custom_fallback_count': 2,
      'time/generate': 2,
      'time/reward': 0.5,
      'time/train': 1.5,
      step_time: 4,
      // 4 answer + 3 query tokens + one judge verdict per answer (4), over 4 s.
      tokens_per_second: 11 / 4,
      'gpu/peak_mib': 12,
      'challenger/invalid_ratio': 0.5,
      'eval/exam_accuracy': 0.4,
      'rewards/verifiable/mean': 0.75,
      'rewards/verifiable/std': 0.5,
    };
    expect(Object.keys(v)).toEqual(Object.keys(expected));
    for (const [k, x] of Object.entries(expected)) expect(v[k], k).toBeCloseTo(x, 12);
    const known = new Set<string>(METRIC_NAMES);
    for (const k of Object.keys(v)) if (!k.startsWith('rewards/') && k !== 'reward/custom_fallback_count') expect(known.has(k), k).toBe(true);

    // The toy world's one-token answers are never clipped; no custom reward, no exam, no check: no such keys.
    const toy = iterationValues({ rollouts, rewards: { ...rewards, queryValid: [null, null], customFallbacks: null }, update: { ...update, skipped: 'a gradient is not finite' }, config: { world: 'arithmetic', beta: 0.5, alphaCh: 0.25 }, times, gpuPeakMib: 12 });
    expect(toy['completions/clipped_ratio']).toBe(0);
    expect(toy.step_skipped).toBe(1);
    for (const k of ['reward/custom_fallback_count', 'challenger/invalid_ratio', 'eval/exam_accuracy']) expect(k in toy, k).toBe(false);
  });
});
