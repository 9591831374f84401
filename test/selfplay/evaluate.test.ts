/**
 * Evaluation that is not the model grading itself: base vs adapter answers judged by a
 * reward model on the same engine (the higher score wins), and the held-out exam of a
 * verifiable world graded by code, on the micro-arith model with a LoRA whose B is
 * random (so base and adapter answers differ). The reward model is a small random
 * LlamaForSequenceClassification sharing the micro model's tokenizer. Each verdict is
 * checked against the reward model's score of that one conversation, computed alone
 * (batch of one) through sequenceScore, and the exam figures against runExam.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseSafetensors, writeSafetensors } from '../../src/formats/safetensors';
import { sequenceScore } from '../../src/model/llama';
import { loadLlama, type LoadedModel } from '../../src/model/load';
import { openModelDir } from '../../src/model/node-source';
import { loadTokenizer, type ChatTokenizer } from '../../src/model/tokenizer';
import { microDemoConfig } from '../../src/selfplay/config';
import { parseExam, runExam } from '../../src/selfplay/exam';
import { SelfPlayTrainer } from '../../src/selfplay/trainer';
import { useGpu } from '../helpers/gpu';
import { memorySource, ROOT, syntheticModel } from '../helpers/model-files';
import { Rng } from '../helpers/numeric';

const DIR = join(ROOT, 'models', 'micro-arith');
const TIMEOUT = 600_000;

describe('evaluation by the reward model and the exam (micro-arith)', () => {
  const gpu = useGpu();
  let model: LoadedModel;
  let tokenizer: ChatTokenizer;
  let rm: LoadedModel;
  let rmTokenizer: ChatTokenizer;

  beforeAll(async () => {
    model = await loadLlama(gpu(), await openModelDir(DIR), { format: 'f32' });
    tokenizer = await loadTokenizer(model.files);
    const synth = syntheticModel({ architecture: 'LlamaForSequenceClassification', numLabels: 1, vocab: model.weights.config.vocabSize, hidden: 32, intermediate: 48, layers: 1, heads: 2, kvHeads: 1, dtype: 'F32', seed: 41 });
    const files: Record<string, Uint8Array | string> = { ...synth.files };
    for (const f of ['tokenizer.json', 'tokenizer_config.json']) files[f] = readFileSync(join(DIR, f), 'utf8');
    rm = await loadLlama(gpu(), memorySource(files, 'micro-reward-model'), { format: 'f32' });
    rmTokenizer = await loadTokenizer(rm.files);
  });
  afterAll(() => {
    model?.weights.release();
    rm?.weights.release();
  });

  /** A trainer whose adapter has a random B, so the adapter's answers differ from the base model's. */
  async function perturbed(withRewardModel: boolean): Promise<SelfPlayTrainer> {
    const t = SelfPlayTrainer.start(
      { gpu: gpu(), model, tokenizer, ...(withRewardModel ? { rewardModel: { model: rm, tokenizer: rmTokenizer } } : {}) },
      microDemoConfig({ seed: 5, maxAnswerTokens: 6 }),
    );
    const files = await t.exportFiles();
    const st = parseSafetensors(files.get('adapter_model.safetensors')!, 'adapter_model.safetensors');
    const rng = new Rng(9);
    const tensors = [...st.header.tensors.keys()].map((name) => {
      const t = st.tensor(name);
      expect(t.dtype).toBe('F32');
      const values = new Float32Array(t.data.slice().buffer);
      return { ...t, data: name.includes('lora_B') ? rng.f32(values.length, 0.5) : values };
    });
    t.importAdapter({ 'adapter_config.json': files.get('adapter_config.json')!, 'adapter_model.safetensors': writeSafetensors(tensors) });
    return t;
  }

  it('the reward model judges: each verdict follows its scores of the two answers; refused with the reason when none is loaded', { timeout: TIMEOUT }, async () => {
    const instructions = ['12 + 34', '5 + 77', '40 + 40', '9 + 9', '63 + 18', '1 + 2'];
    const t = await perturbed(true);
    const r = await t.evaluate({ instructions, judge: 'reward-model', exam: false });
    expect(r.judge).toBe('reward-model');
    expect(r.exam).toBeUndefined();
    expect(r.items.map((i) => i.instruction)).toEqual(instructions);
    expect(r.items.some((i) => i.adapter !== i.base)).toBe(true);
    for (const item of r.items) {
      for (const side of ['base', 'adapter'] as const) {
        const ids = rmTokenizer.applyChatTemplate(
          [
            { role: 'user', content: item.instruction },
            { role: 'assistant', content: item[side] },
          ],
          { addGenerationPrompt: false },
        );
        const out = sequenceScore(gpu(), rm.weights, null, { ids: Uint32Array.from(ids), B: 1, T: ids.length, lengths: [ids.length] });
        const alone = (await gpu().readF32(out))[0]!;
        out.release();
        expect(item.rewardScores![side]).toBeCloseTo(alone, 4);
      }
      const { base, adapter } = item.rewardScores!;
      expect(item.score).toBe(adapter > base ? 1 : adapter < base ? 0 : 0.5);
    }
    expect(r.wins + r.ties + r.losses).toBe(instructions.length);
    expect(r.winRate).toBeCloseTo((r.wins + 0.5 * r.ties) / instructions.length, 12);
    expect(r.unparsed).toBe(0);
    t.release();

    const none = await perturbed(false);
    await expect(none.evaluate({ instructions, judge: 'reward-model' })).rejects.toThrow(/load a reward model/);
    none.release();
  });

  it('a run with an exam reports base and adapter exam accuracy, graded by code', { timeout: TIMEOUT }, async () => {
    const exam = parseExam(JSON.parse(readFileSync(join(DIR, 'exam.json'), 'utf8'))).problems.slice(0, 16);
    const t = await perturbed(false);
    t.exam = exam;
    const r = await t.evaluate({ instructions: ['12 + 34'], judgeMaxTokens: 2 });
    expect(r.judge).toBe('reference');
    const base = await runExam(gpu(), model.weights, null, tokenizer, exam, { maxTokens: 6 });
    expect(r.exam).toEqual({ base: base.accuracy, adapter: (await t.runExam({ adapter: true })).accuracy, problems: 16 });
    t.release();
  });
});
