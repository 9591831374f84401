/**
 * The committed micro-arith model (scripts/train-micro.py) through the engine's normal
 * path: loadLlama on the folder, its own character-level tokenizer and chat template
 * through loadTokenizer, and the held-out exam answered greedily on the GPU, which must
 * reproduce the base accuracy (and the answers) the script recorded in micro.json from
 * its own PyTorch forward.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadLlama, type LoadedModel } from '../../src/model/load';
import { openModelDir } from '../../src/model/node-source';
import { loadTokenizer, type ChatTokenizer } from '../../src/model/tokenizer';
import { parseExam, runExam } from '../../src/selfplay/exam';
import { useGpu } from '../helpers/gpu';
import { ROOT } from '../helpers/model-files';

const DIR = join(ROOT, 'models', 'micro-arith');
const record = JSON.parse(readFileSync(join(DIR, 'micro.json'), 'utf8')) as { baseExamAccuracy: number; baseExamAnswers: string[]; challengerPrompt: string };
const exam = parseExam(JSON.parse(readFileSync(join(DIR, 'exam.json'), 'utf8')));

describe('micro-arith', () => {
  const gpu = useGpu();
  let model: LoadedModel;
  let tokenizer: ChatTokenizer;

  beforeAll(async () => {
    model = await loadLlama(gpu(), await openModelDir(DIR), { format: 'f32' });
    tokenizer = await loadTokenizer(model.files);
  });
  afterAll(() => model?.weights.release());

  it('is a small Llama with its own tokenizer and chat template', () => {
    const c = model.weights.config;
    expect([c.vocabSize, c.hiddenSize, c.numLayers]).toEqual([100, 64, 2]);
    expect(tokenizer.hasChatTemplate).toBe(true);
    expect(tokenizer.eosTokenIds).toEqual([2]);
    expect(tokenizer.renderChat([{ role: 'user', content: '12 + 34' }])).toBe('<s><u>12 + 34<a>');
    const ids = tokenizer.applyChatTemplate([{ role: 'user', content: '12 + 34' }]);
    expect(ids).toEqual([1, 3, 22, 23, 5, 16, 5, 24, 25, 4]); // one token per character, specials whole
    expect(tokenizer.decode([22, 23, 2], { skipSpecialTokens: true })).toBe('12');
  });

  it('reproduces the base exam accuracy recorded by scripts/train-micro.py', { timeout: 600_000 }, async () => {
    const t0 = performance.now();
    const r = await runExam(gpu(), model.weights, null, tokenizer, exam.problems, { maxTokens: 6 });
    const differ = r.answers.map((a, k) => (a === record.baseExamAnswers[k] ? null : `${exam.problems[k]!.question}: ${a} vs ${record.baseExamAnswers[k]}`)).filter((x) => x !== null);
    console.log(`micro-arith exam: ${exam.problems.length} problems, accuracy ${r.accuracy.toFixed(4)} (script ${record.baseExamAccuracy.toFixed(4)}), ${differ.length} answers differ, ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    expect(record.baseExamAccuracy).toBeGreaterThanOrEqual(0.2);
    expect(record.baseExamAccuracy).toBeLessThanOrEqual(0.6);
    // f32 on the GPU vs f32 in PyTorch: a near-tie may flip an argmax; allow one problem.
    expect(differ.length, differ.join('; ')).toBeLessThanOrEqual(1);
    expect(Math.abs(r.accuracy - record.baseExamAccuracy)).toBeLessThanOrEqual(1 / exam.problems.length + 1e-9);
  });
});
