/**
 * The trainer on the tiny model (Dawn): exact resume from a checkpoint, PEFT export
 * round trip, the NaN guard, the KL pull toward the reference, LSP with the judge,
 * and evaluation. The arithmetic of advantages and losses is tested in the pure
 * files beside this one; the learning test is in learning.test.ts.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loraModelShape, readAdapter } from '../../src/formats/peft';
import { sequenceLogprobs, type TokenBatch } from '../../src/model/llama';
import { loadLlama, type LoadedModel } from '../../src/model/load';
import { LoraAdapter } from '../../src/model/lora';
import { openModelDir } from '../../src/model/node-source';
import { loadTokenizer, type ChatTokenizer } from '../../src/model/tokenizer';
import { completionBatch } from '../../src/selfplay/batch';
import { makeConfig, type DeepPartial, type TrainerConfig } from '../../src/selfplay/config';
import { arithmeticChallengerPrompt, numberTokenIds } from '../../src/selfplay/prompts';
import { DirectoryRunStore, MemoryRunStore } from '../../src/selfplay/store';
import { SelfPlayTrainer, type TrainerModels } from '../../src/selfplay/trainer';
import type { TrainerEvent } from '../../src/selfplay/types';
import { useGpu } from '../helpers/gpu';
import { FakeDirectory } from '../helpers/model-opfs';
import { ROOT, TINY_DIR } from '../helpers/model-files';

const TIMEOUT = 600_000;

const toy = (o: DeepPartial<TrainerConfig> = {}): TrainerConfig =>
  makeConfig({ mode: 'lsp-zero', world: 'arithmetic', arithmeticMaxOperand: 2, queriesPerIteration: 2, groupSize: 3, lr: 0.01, microBatch: 4, lora: { r: 4, alpha: 8, targets: ['q_proj', 'v_proj', 'down_proj'] }, seed: 11, ...o });

async function fixtureAdapter() {
  const dir = join(ROOT, 'models', 'tiny-llama-lora');
  return {
    'adapter_config.json': await readFile(join(dir, 'adapter_config.json'), 'utf8'),
    'adapter_model.safetensors': new Uint8Array(await readFile(join(dir, 'adapter_model.safetensors'))),
  };
}

describe('self-play trainer', () => {
  const gpu = useGpu();
  let model: LoadedModel;
  let tokenizer: ChatTokenizer;
  let models: TrainerModels;

  beforeAll(async () => {
    model = await loadLlama(gpu(), await openModelDir(TINY_DIR), { format: 'f32' });
    tokenizer = await loadTokenizer(model.files);
    models = { gpu: gpu(), model, tokenizer };
  });
  afterAll(() => model?.weights.release());

  it('a resumed run continues exactly where it stopped; the adapter exports as PEFT and round-trips', { timeout: TIMEOUT }, async () => {
    const straight = SelfPlayTrainer.start(models, toy());
    await straight.step();
    await straight.step();

    const store = new DirectoryRunStore(new FakeDirectory(), 'run');
    const events: TrainerEvent['type'][] = [];
    const first = SelfPlayTrainer.start(models, toy({ checkpointEvery: 1 }), { store, onEvent: (e) => events.push(e.type) });
    await first.step();
    expect(events).toContain('checkpoint');
    expect(events).toContain('game');
    expect(events.filter((e) => e === 'token').length).toBeGreaterThanOrEqual(2 * 2 + 2 * 3); // 2 tokens per query, 1 per answer
    first.release(); // the "tab" closes

    const resumed = (await SelfPlayTrainer.resume(models, store))!;
    expect(resumed.iteration).toBe(1);
    expect(resumed.history).toHaveLength(1);
    expect(resumed.games).toHaveLength(2);
    expect(resumed.lora.stepCount).toBe(1);
    await resumed.step();
    const a = straight.games.slice(2);
    const b = resumed.games.slice(2);
    expect(b.map((g) => [g.query, g.answers.map((x) => x.text)])).toEqual(a.map((g) => [g.query, g.answers.map((x) => x.text)]));
    for (const k of ['reward', 'loss', 'kl', 'grad_norm']) expect(resumed.history[1]!.values[k]).toBeCloseTo(straight.history[1]!.values[k]!, 5);
    const fa = await straight.exportFiles();
    const fb = await resumed.exportFiles();
    expect(fb.get('adapter_model.safetensors')).toEqual(fa.get('adapter_model.safetensors'));

    // PEFT: names, shapes and config fields, checked by the reader against the model's shape.
    const files = { 'adapter_config.json': new TextDecoder().decode(fa.get('adapter_config.json')), 'adapter_model.safetensors': fa.get('adapter_model.safetensors')! };
    const peft = readAdapter(files, loraModelShape(model.weights.config));
    expect(peft.config.r).toBe(4);
    expect(peft.config.lora_alpha).toBe(8);
    expect(peft.config.target_modules).toEqual(['q_proj', 'v_proj', 'down_proj']);
    expect(peft.config.base_model_name_or_path).toBe(model.sourceName);
    expect([...peft.tensors.keys()]).toContain('base_model.model.model.layers.1.mlp.down_proj.lora_B.weight');
    expect(peft.tensors.get('base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight')!.shape).toEqual([4, 64]);
    expect(JSON.parse(new TextDecoder().decode(fa.get('run_config.json'))).config.world).toBe('arithmetic');
    expect(JSON.parse(new TextDecoder().decode(fa.get('metrics.json')))).toHaveLength(2);

    // Export -> import -> identical log-probs.
    const imported = LoraAdapter.fromPeft(gpu(), model.weights.config, files);
    const seqs = straight.games.slice(0, 2).map((g) => ({ prompt: tokenizer.encode(g.query), completion: [tokenizer.encode(g.answers[0]!.text, { addSpecialTokens: false })[0]!] }));
    const { batch } = completionBatch(seqs, model.weights.config.vocabSize);
    const lp = async (l: LoraAdapter) => {
      const p = sequenceLogprobs(gpu(), model.weights, l, batch);
      const v = await gpu().readF32(p.logp);
      p.release();
      return v;
    };
    expect(await lp(imported)).toEqual(await lp(straight.lora));
    imported.release();
    straight.release();
    resumed.release();
  });

  it('a non-finite loss skips the update: adapter, optimizer and step count are kept, the skip is reported', { timeout: TIMEOUT }, async () => {
    const events: TrainerEvent[] = [];
    const t = SelfPlayTrainer.start(models, toy(), { adapter: await fixtureAdapter(), onEvent: (e) => events.push(e) });
    expect(t.config.lora.r).toBe(8); // the imported adapter's settings win
    // A NaN in lora_B on the GPU (an import with one is refused, naming the key): the loss turns non-finite.
    const q = t.lora.modules.find((m) => m.layer === 0 && m.module === 'q_proj')!;
    models.gpu.write(q.B.value, Float32Array.of(Number.NaN), 3 * 4);
    const values = () => Promise.all(t.lora.modules.flatMap((mod) => [models.gpu.readF32(mod.A.value), models.gpu.readF32(mod.B.value)]));
    const before = await values();
    const m = await t.step();
    expect(m.values.step_skipped).toBe(1);
    expect(t.lora.stepCount).toBe(0);
    expect(t.iteration).toBe(1);
    expect(events.find((e) => e.type === 'skipped')).toMatchObject({ type: 'skipped', iteration: 0 });
    expect(await values()).toEqual(before); // NaN included: toEqual compares with Object.is
    // Such an adapter never reaches a file: the export refuses it, naming the tensor.
    await expect(t.exportFiles()).rejects.toThrow(/base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_B\.weight: holds 1 non-finite value/);
    await t.step();
    await expect(t.step()).rejects.toThrow(/3 updates in a row were skipped.*lower the learning rate/);
    t.release();
  });

  it('with beta > 0 and zero advantages the update moves the policy toward the reference', { timeout: TIMEOUT }, async () => {
    // One query and one answer per iteration: every advantage is exactly 0, only the KL term acts.
    // After each update, the log-prob gap to the reference of the sequences it trained on shrinks.
    // (A small learning rate: Adam's first steps move every parameter by about lr, and a large
    // step overshoots the reference, which says nothing about the gradient's direction.)
    const t = SelfPlayTrainer.start(models, toy({ queriesPerIteration: 1, groupSize: 1, beta: 1, klEstimator: 'k3', lr: 1e-5, maxGradNorm: 100 }), { adapter: await fixtureAdapter() });
    const nums = numberTokenIds((x) => tokenizer.encode(x, { addSpecialTokens: false }), 4);
    const logps = async (batch: TokenBatch, enabled: boolean) => {
      t.lora.enabled = enabled;
      const p = sequenceLogprobs(gpu(), model.weights, t.lora, batch);
      const v = await gpu().readF32(p.logp);
      p.release();
      t.lora.enabled = true;
      return v.reduce((a, b) => a + b, 0);
    };
    for (let i = 0; i < 3; i++) {
      const m = await t.step();
      expect(m.values.reward_std).toBe(0);
      expect(m.values['loss/solver_pg']).toBe(0);
      const g = t.games[i]!;
      expect(g.challengerAdvantage).toBe(0);
      expect(g.answers[0]!.advantage).toBe(0);
      const [a, b] = g.query.match(/\d+/g)!.map(Number);
      const query = { prompt: tokenizer.encode(arithmeticChallengerPrompt(2)), completion: [nums[a!]!, nums[b!]!] };
      const answer = { prompt: tokenizer.encode(g.query), completion: [nums[Number(g.answers[0]!.text)]!] };
      for (const [seq, before, ref] of [[query, g.queryLogp, g.queryLogpRef], [answer, g.answers[0]!.logp, g.answers[0]!.logpRef]] as const) {
        const { batch } = completionBatch([seq], model.weights.config.vocabSize);
        expect(await logps(batch, false)).toBeCloseTo(ref, 3); // the recorded reference log-prob
        const after = await logps(batch, true);
        expect(Math.abs(after - ref)).toBeLessThan(Math.abs(before - ref));
      }
    }
    t.release();
  });

  it('LSP in the open world: the reference model judges every answer, unparsed grades fall back and are counted', { timeout: TIMEOUT }, async () => {
    const config = makeConfig({ mode: 'lsp', world: 'open', task: 'Arithmetic', queriesPerIteration: 1, groupSize: 2, maxQueryTokens: 3, maxAnswerTokens: 3, microBatch: 4, rewards: { judge: { maxTokens: 3, fallback: 'midpoint' } }, lora: { r: 2, alpha: 4, targets: ['v_proj'] } });
    const roles = new Set<string>();
    const t = SelfPlayTrainer.start(models, config, { store: new MemoryRunStore(), onEvent: (e) => e.type === 'token' && roles.add(e.role) });
    const m = await t.step();
    expect(roles).toEqual(new Set(['challenger', 'solver', 'judge']));
    const game = t.games[0]!;
    // A random tiny model writes no <score> tag: every grade is the fallback, counted.
    const parsedOk = game.answers.filter((a) => a.judge!.reason === 'ok').length;
    expect(m.values['judge/fallback_count']).toBe(2 - parsedOk);
    for (const a of game.answers) {
      expect(a.judge!.text.length).toBeGreaterThan(0);
      if (a.judge!.reason !== 'ok') expect(a.rewards.judge).toBe(3.5);
    }
    // LSP with the judge as the only source: the judge is the quality reward, V = 0, Challenger reward = V_Q.
    expect(game.value).toBe(0);
    expect(game.qualityValue).toBeCloseTo((game.answers[0]!.rewards.judge! + game.answers[1]!.rewards.judge!) / 2, 10);
    expect(game.challengerReward).toBeCloseTo(game.qualityValue, 10);
    expect(m.values['completions/clipped_ratio']).toBe(game.answers.filter((a) => a.finishReason === 'length').length / 2);
    t.release();
  });

  it('evaluation: with a fresh adapter (B = 0) base and adapter answer alike; verdicts from both orders are tallied', { timeout: TIMEOUT }, async () => {
    const t = SelfPlayTrainer.start(models, toy());
    const r = await t.evaluate({ instructions: ['Say hi.', 'Name a colour.'], maxTokens: 3, judgeMaxTokens: 3 });
    expect(r.items).toHaveLength(2);
    for (const item of r.items) expect(item.adapter).toBe(item.base);
    expect(r.wins + r.ties + r.losses).toBe(2);
    expect(r.winRate).toBeCloseTo((r.wins + 0.5 * r.ties) / 2, 10);
    expect(r.unparsed).toBe(r.items.reduce((s, i) => s + i.verdicts.filter((v) => v === null).length, 0));
    t.release();
  });
});
