/**
 * Proof that the self-play loop learns: LSP-Zero in the toy arithmetic world on the
 * tiny model (random weights, f32, Dawn), with the verifiable exact-match reward.
 *
 * The Challenger picks a + b with a, b in {0, 1} (its sampling restricted to those
 * number tokens) and the Solver answers with one number token in 0..2. Both roles are
 * trained (alpha_ch = 1): the full zero-sum game. Everything is seeded (adapter init,
 * every sampling step).
 *
 * Why passing is not luck: the baseline is not another noisy run but the untrained
 * game's exact expected reward E0 = sum over (a, b) of P_challenger(a, b) *
 * P_solver(a + b | a, b), computed here from the base model's restricted softmaxes. One
 * iteration's reward is a mean of 16 Bernoulli draws, so the mean of the last three
 * iterations (48 draws) has a standard deviation of at most 0.5 / sqrt(48) = 0.072
 * around whatever the policy's true accuracy is. The test requires that mean to exceed
 * E0 by 0.25 (3.5 of those standard deviations). The Challenger plays against the
 * Solver (it is rewarded for posing the problems the Solver gets wrong), which works
 * against passing, not for it. Measured with seed 0: E0 0.432, iteration rewards 0.500
 * 0.375 0.938 1.000 1.000 0.875 0.750 0.938, last three 0.854.
 *
 * The greedy answers to all four problems are printed, not asserted: the Solver learns
 * the problems the Challenger poses, and the Challenger concentrates on a few of them.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { generate } from '../../src/model/generate';
import { sequenceLogprobs } from '../../src/model/llama';
import { loadLlama, type LoadedModel } from '../../src/model/load';
import { openModelDir } from '../../src/model/node-source';
import { loadTokenizer, type ChatTokenizer } from '../../src/model/tokenizer';
import { mean } from '../../src/selfplay/advantages';
import { completionBatch } from '../../src/selfplay/batch';
import { makeConfig } from '../../src/selfplay/config';
import { arithmeticChallengerPrompt, arithmeticQuery, numberTokenIds } from '../../src/selfplay/prompts';
import { SelfPlayTrainer } from '../../src/selfplay/trainer';
import { useGpu } from '../helpers/gpu';
import { TINY_DIR } from '../helpers/model-files';

const MAX = 1;
const ITERATIONS = 8;

describe('self-play learns', () => {
  const gpu = useGpu();
  let model: LoadedModel;
  let tokenizer: ChatTokenizer;

  beforeAll(async () => {
    model = await loadLlama(gpu(), await openModelDir(TINY_DIR), { format: 'f32' });
    tokenizer = await loadTokenizer(model.files);
  });
  afterAll(() => model?.weights.release());

  it('LSP-Zero on verifiable arithmetic: the reward rises far above the untrained game\'s expected reward', { timeout: 900_000 }, async () => {
    const config = makeConfig({
      mode: 'lsp-zero',
      world: 'arithmetic',
      arithmeticMaxOperand: MAX,
      queriesPerIteration: 2,
      groupSize: 8,
      lr: 0.005,
      microBatch: 32,
      seed: 0,
      lora: { r: 8, alpha: 16 },
    });
    const trainer = SelfPlayTrainer.start({ gpu: gpu(), model, tokenizer }, config);
    const nums = numberTokenIds((t) => tokenizer.encode(t, { addSpecialTokens: false }), 2 * MAX);
    const V = model.weights.config.vocabSize;
    const logps = async (seqs: { prompt: number[]; completion: number[] }[]) => {
      const { batch, rows } = completionBatch(seqs, V);
      const p = sequenceLogprobs(gpu(), model.weights, null, batch);
      const all = await gpu().readF32(p.logp);
      p.release();
      return rows.map((r) => r.map((row) => all[row]!));
    };
    const restricted = (lp: number[]) => {
      const m = Math.max(...lp);
      const z = lp.reduce((s, x) => s + Math.exp(x - m), 0);
      return lp.map((x) => Math.exp(x - m) / z);
    };

    // E0: the base model's Challenger distribution over (a, b) times its Solver's chance of a + b.
    const cp = tokenizer.encode(arithmeticChallengerPrompt(MAX));
    const pairs: [number, number][] = [];
    for (let a = 0; a <= MAX; a++) for (let b = 0; b <= MAX; b++) pairs.push([a, b]);
    const ch = await logps(pairs.map(([a, b]) => ({ prompt: cp, completion: [nums[a]!, nums[b]!] })));
    const pA = restricted(Array.from({ length: MAX + 1 }, (_, a) => ch[a * (MAX + 1)]![0]!));
    const answers = await logps(pairs.flatMap(([a, b]) => nums.map((n) => ({ prompt: tokenizer.encode(arithmeticQuery(a, b)), completion: [n] }))));
    let e0 = 0;
    pairs.forEach(([a, b], k) => {
      const pB = restricted(Array.from({ length: MAX + 1 }, (_, b2) => ch[a * (MAX + 1) + b2]![1]!))[b]!;
      const pCorrect = restricted(nums.map((_, n) => answers[k * nums.length + n]![0]!))[a + b]!;
      e0 += pA[a]! * pB * pCorrect;
    });

    const exam = async () => {
      const g = await generate(gpu(), model.weights, trainer.lora, { prompt: pairs.map(([a, b]) => tokenizer.encode(arithmeticQuery(a, b))), maxNewTokens: 1, temperature: 0, allowedTokens: nums, stopTokens: [] });
      return g.answers.filter((x, i) => nums.indexOf(x.tokens[0]!) === pairs[i]![0] + pairs[i]![1]).length / pairs.length;
    };
    const before = await exam();
    const rewards: number[] = [];
    for (let i = 0; i < ITERATIONS; i++) rewards.push((await trainer.step()).values.reward!);
    const after = await exam();
    const last = mean(rewards.slice(-3));
    console.log(`learning: E0 ${e0.toFixed(3)}; rewards ${rewards.map((r) => r.toFixed(3)).join(' ')}; last three ${last.toFixed(3)}; greedy exam ${before.toFixed(2)} -> ${after.toFixed(2)}`);
    expect(e0).toBeGreaterThan(0);
    expect(e0).toBeLessThan(0.75);
    expect(last).toBeGreaterThanOrEqual(e0 + 0.25);
    trainer.release();
  });
});
