/**
 * The user's reward inside real iterations on the tiny model (Dawn): it becomes a game
 * reward of its own (rewards.custom on each answer, rewards/custom/mean), a function
 * that loops on every call costs fallbacks counted in reward/custom_fallback_count and
 * the run goes on, and the run report written from those iterations parses back.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadLlama, type LoadedModel } from '../../src/model/load';
import { openModelDir } from '../../src/model/node-source';
import { loadTokenizer } from '../../src/model/tokenizer';
import { makeConfig } from '../../src/selfplay/config';
import { CustomReward, DEFAULT_CUSTOM_REWARD, type CustomRewardFailure } from '../../src/selfplay/custom-reward';
import { nodeSandbox } from '../../src/selfplay/custom-reward-node';
import { completionsJsonl, metricsCsv } from '../../src/selfplay/report';
import { SelfPlayTrainer, type TrainerModels } from '../../src/selfplay/trainer';
import { useGpu } from '../helpers/gpu';
import { TINY_DIR } from '../helpers/model-files';

describe('custom reward in the trainer', () => {
  const gpu = useGpu();
  let model: LoadedModel;
  let models: TrainerModels;

  beforeAll(async () => {
    model = await loadLlama(gpu(), await openModelDir(TINY_DIR), { format: 'f32' });
    models = { gpu: gpu(), model, tokenizer: await loadTokenizer(model.files) };
  });
  afterAll(() => model?.weights.release());

  it('scores answers as a game reward, counts the fallbacks of a looping function, and reports both', { timeout: 600_000 }, async () => {
    const config = makeConfig({ mode: 'lsp-zero', world: 'arithmetic', arithmeticMaxOperand: 2, queriesPerIteration: 2, groupSize: 3, lr: 0.01, microBatch: 4, lora: { r: 4, alpha: 8, targets: ['q_proj', 'v_proj'] }, seed: 5 });
    const trainer = SelfPlayTrainer.start(models, config);
    const good = await CustomReward.create({ ...DEFAULT_CUSTOM_REWARD, source: '(query, answer) => answer.length + query.length / 1000', weight: 0.5 }, nodeSandbox);
    trainer.customReward = good;
    const m0 = await trainer.step();
    for (const g of trainer.games) {
      for (const a of g.answers) {
        expect(a.rewards.custom).toBeCloseTo(a.text.length + g.query.length / 1000, 12);
        expect(a.reward).toBeCloseTo(a.rewards.verifiable! + 0.5 * a.rewards.custom!, 9);
      }
    }
    expect(m0.values['reward/custom_fallback_count']).toBe(0);
    expect(m0.values['rewards/custom/mean']).toBeGreaterThan(0);
    good.release();

    const failures: CustomRewardFailure[] = [];
    const looping = await CustomReward.create({ ...DEFAULT_CUSTOM_REWARD, source: 'function reward(q, a) { for (;;) {} }', timeoutMs: 40, fallback: -2 }, nodeSandbox, (f) => failures.push(...f));
    trainer.customReward = looping;
    const m1 = await trainer.step();
    looping.release();
    expect(m1.values['reward/custom_fallback_count']).toBe(6);
    expect(failures.map((f) => f.reason)).toEqual(new Array(6).fill('timeout'));
    const last = trainer.games.slice(-2);
    for (const g of last) for (const a of g.answers) expect(a.rewards.custom).toBe(-2);
    expect(trainer.iteration).toBe(2);
    expect(Number.isFinite(m1.values.loss!)).toBe(true);

    // The report of these two iterations.
    const lines = completionsJsonl(trainer.games).trimEnd().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(lines).toHaveLength(2 * 2 * 3);
    expect(lines.map((l) => l.step)).toEqual([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]);
    const g0 = trainer.games[0]!;
    expect(lines[0]).toMatchObject({ prompt: g0.query, completion: g0.answers[0]!.text, custom: g0.answers[0]!.rewards.custom, verifiable: g0.answers[0]!.rewards.verifiable, advantage: g0.answers[0]!.advantage, completion_length: g0.answers[0]!.tokens });
    expect(lines[0]!.kl).toBeCloseTo(g0.answers[0]!.kl, 12);
    const [header, ...rows] = metricsCsv(trainer.history).trimEnd().split('\n').map((l) => l.split(','));
    expect(header!.slice(0, 3)).toEqual(['step', 'time', 'reward']);
    expect(rows).toHaveLength(2);
    const col = header!.indexOf('reward/custom_fallback_count');
    expect(rows.map((r) => Number(r[col]))).toEqual([0, 6]);
    const rc = header!.indexOf('rewards/custom/mean');
    expect(Number(rows[0]![rc])).toBeCloseTo(m0.values['rewards/custom/mean']!, 12);
    trainer.release();
  });
});
