/**
 * Learning benchmark (not in CI): LSP-Zero with the verifiable reward in the free-form
 * arithmetic world on models/micro-arith, over several seeds.
 *
 *   node scripts/webgpu-env.mjs npx tsx bench/learning.ts [--seeds 0,1,2,3,4] [--iterations 24]
 *        [--exam-every 6] [--exam-size 240] [--N 64] [--G 8] [--lr 0.005] [--alpha-ch 0] [--beta 0.05] [--temperature 1]
 *        [--lr-schedule constant|linear|cosine] [--lr-warmup 0] [--lr-decay-iterations 24] [--lr-min-ratio 0] [--micro-batch 256] [--top-p 1] [--kl k3]
 *        [--max-answer 6] [--adv-scale group|none] [--aggregation grpo|bnpo|dr_grpo|dapo|seq_sum] [--rank 16 [--alpha 32]]
 *        [--sampled 32] [--model models/micro-arith] [--out out/bench-learning.json]
 *
 * Unset flags take the micro demo preset's values (microDemoConfig; --iterations its
 * MICRO_DEMO_ITERATIONS, the length of its decay). Runs fastest on
 * lavapipe (WEBGPU_ADAPTER=lavapipe), several times faster than SwiftShader here.
 *
 * Prints per seed the base and final greedy exam accuracy and the gain, then the mean
 * gain and its spread (sample standard deviation over seeds). Writes every seed's curve
 * (exam accuracy and reward per iteration) to --out, which scripts/plot-learning.mjs
 * draws. The exam never feeds training. With --sampled K it also prints, for the base
 * model and each trained adapter, per kind of problem (digits of the operands, carry or
 * not): greedy accuracy, the mean accuracy of K sampled answers (temperature 1) and the
 * share of problems answered right at least once in K (pass@K).
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { readFileSync } from 'node:fs';
import { acquireNodeGpu } from '../src/gpu/node';
import { loadLlama } from '../src/model/load';
import { openModelDir } from '../src/model/node-source';
import { loadTokenizer } from '../src/model/tokenizer';
import { mean, stdUnbiased } from '../src/selfplay/advantages';
import { gradeExam, parseExam, type ExamProblem } from '../src/selfplay/exam';
import { generate } from '../src/model/generate';
import type { Gpu } from '../src/gpu/gpu';
import type { LoadedModel } from '../src/model/load';
import type { ChatTokenizer } from '../src/model/tokenizer';
import type { InferenceLora } from '../src/model/infer';
import { solverMessages } from '../src/selfplay/prompts';
import { SelfPlayTrainer } from '../src/selfplay/trainer';
import { parseFlags } from '../src/cli/flags';
import { MICRO_DEMO_ITERATIONS, MICRO_DEMO_SETTINGS, microDemoConfig, type TrainerConfig } from '../src/selfplay/config';

/** "1+2 carry": the operands' digit counts, smaller first, and whether the units carry. */
function kindOf(question: string): string {
  const [a, b] = question.match(/\d+/g)!.map(Number) as [number, number];
  const digits = [String(a).length, String(b).length].sort().join('+');
  return `${digits} ${(a % 10) + (b % 10) >= 10 ? 'carry' : 'no carry'}`;
}

/** Greedy accuracy, mean sampled accuracy and pass@K per kind of problem (--sampled K). */
async function sampledReport(name: string, gpu: Gpu, model: LoadedModel, tokenizer: ChatTokenizer, lora: InferenceLora | null, exam: readonly ExamProblem[], K: number): Promise<void> {
  const prompts = exam.map((p) => tokenizer.applyChatTemplate(solverMessages(p.question), { addGenerationPrompt: true, dateString: '22 Nov 2026' }));
  const text = (tokens: number[]) => tokenizer.decode(tokens, { skipSpecialTokens: true }).trim();
  const greedy = await generate(gpu, model.weights, lora, { prompt: prompts, G: 1, maxNewTokens: 6, temperature: 0, stopTokens: tokenizer.eosTokenIds });
  const greedyRight = gradeExam(exam, greedy.answers.map((a) => text(a.tokens)));
  const right = new Array<number>(exam.length).fill(0);
  const sampled = await generate(gpu, model.weights, lora, { prompt: prompts, G: K, maxNewTokens: 6, temperature: 1, seed: 1000, stopTokens: tokenizer.eosTokenIds });
  for (const a of sampled.answers) if (gradeExam([exam[a.prompt]!], [text(a.tokens)])[0]) right[a.prompt]!++;
  const rows = new Map<string, { n: number; greedy: number; sampled: number; found: number }>();
  exam.forEach((p, k) => {
    const r = rows.get(kindOf(p.question)) ?? { n: 0, greedy: 0, sampled: 0, found: 0 };
    r.n++;
    r.greedy += greedyRight[k] ? 1 : 0;
    r.sampled += right[k]! / K;
    r.found += right[k]! > 0 ? 1 : 0;
    rows.set(kindOf(p.question), r);
  });
  const all = [...rows.values()].reduce((t, r) => ({ n: t.n + r.n, greedy: t.greedy + r.greedy, sampled: t.sampled + r.sampled, found: t.found + r.found }));
  const line = (r: typeof all) => `greedy ${(r.greedy / r.n).toFixed(3)}, sampled ${(r.sampled / r.n).toFixed(3)}, pass@${K} ${(r.found / r.n).toFixed(3)}`;
  console.log(`${name}: ${line(all)}`);
  for (const [kind, r] of [...rows].sort()) console.log(`  ${kind.padEnd(12)} (${String(r.n).padStart(3)}): ${line(r)}`);
}

async function main(): Promise<void> {
  const f = parseFlags(process.argv.slice(2));
  const seeds = (f.get('seeds') ?? '0,1,2,3,4').split(',').map(Number);
  const iterations = Number(f.get('iterations') ?? MICRO_DEMO_ITERATIONS);
  const examEvery = Number(f.get('exam-every') ?? MICRO_DEMO_SETTINGS.examEvery);
  const modelDir = f.get('model') ?? 'models/micro-arith';
  const examSize = Number(f.get('exam-size') ?? 240);
  const sampledK = f.has('sampled') ? Number(f.get('sampled')) : 0;
  const out = f.get('out') ?? 'out/bench-learning.json';
  await mkdir(dirname(out), { recursive: true });
  const exam = parseExam(JSON.parse(readFileSync(join(modelDir, 'exam.json'), 'utf8'))).problems.slice(0, examSize);
  const gpu = await acquireNodeGpu();
  console.log(`adapter: ${gpu.caps.adapterName}`);
  const model = await loadLlama(gpu, await openModelDir(modelDir), { format: 'f32' });
  const tokenizer = await loadTokenizer(model.files);
  if (sampledK > 0) await sampledReport('base', gpu, model, tokenizer, null, exam, sampledK);
  const runs: { seed: number; base: number; final: number; curve: { iteration: number; reward: number; examAccuracy?: number }[] }[] = [];
  for (const seed of seeds) {
    const config = microDemoConfig({
      seed,
      examEvery,
      ...(f.has('N') ? { queriesPerIteration: Number(f.get('N')) } : {}),
      ...(f.has('G') ? { groupSize: Number(f.get('G')) } : {}),
      ...(f.has('lr') ? { lr: Number(f.get('lr')) } : {}),
      ...(f.has('lr-schedule') ? { lrSchedule: f.get('lr-schedule') as TrainerConfig['lrSchedule'] } : {}),
      ...(f.has('lr-warmup') ? { lrWarmup: Number(f.get('lr-warmup')) } : {}),
      ...(f.has('lr-decay-iterations') ? { lrDecayIterations: Number(f.get('lr-decay-iterations')) } : {}),
      ...(f.has('lr-min-ratio') ? { lrMinRatio: Number(f.get('lr-min-ratio')) } : {}),
      ...(f.has('micro-batch') ? { microBatch: Number(f.get('micro-batch')) } : {}),
      ...(f.has('top-p') ? { topP: Number(f.get('top-p')) } : {}),
      ...(f.has('kl') ? { klEstimator: f.get('kl') as TrainerConfig['klEstimator'] } : {}),
      ...(f.has('alpha-ch') ? { alphaCh: Number(f.get('alpha-ch')) } : {}),
      ...(f.has('beta') ? { beta: Number(f.get('beta')) } : {}),
      ...(f.has('temperature') ? { temperature: Number(f.get('temperature')) } : {}),
      ...(f.has('max-answer') ? { maxAnswerTokens: Number(f.get('max-answer')) } : {}),
      ...(f.has('adv-scale') ? { advantageScale: f.get('adv-scale') as 'none' | 'group' } : {}),
      ...(f.has('aggregation') ? { aggregation: f.get('aggregation') as TrainerConfig['aggregation'] } : {}),
      ...(f.has('rank') ? { lora: { r: Number(f.get('rank')), alpha: Number(f.get('alpha') ?? 2 * Number(f.get('rank'))) } } : {}),
    });
    const trainer = SelfPlayTrainer.start({ gpu, model, tokenizer }, config);
    trainer.exam = exam;
    const base = (await trainer.runExam({ adapter: false })).accuracy;
    const curve: (typeof runs)[number]['curve'] = [{ iteration: 0, reward: NaN, examAccuracy: base }];
    const t0 = performance.now();
    for (let i = 0; i < iterations; i++) {
      const m = await trainer.step();
      curve.push({ iteration: m.iteration + 1, reward: m.values.reward!, examAccuracy: m.values['eval/exam_accuracy'] });
      const e = m.values['eval/exam_accuracy'];
      await writeFile(out, JSON.stringify({ model: modelDir, examSize: exam.length, iterations, examEvery, config, runs: [...runs, { seed, base, final: NaN, curve }] }, null, 1) + '\n');
      console.log(`seed ${seed} iteration ${m.iteration}: reward ${m.values.reward!.toFixed(3)}, invalid ${m.values['challenger/invalid_ratio']!.toFixed(3)}` + (e !== undefined ? `, exam ${e.toFixed(3)}` : '') + `, kl ${m.values.kl!.toFixed(4)}, gen ${m.values['time/generate']!.toFixed(1)} s, train ${m.values['time/train']!.toFixed(1)} s, ${m.values.step_time!.toFixed(1)} s`);
    }
    const final = iterations % examEvery === 0 ? curve[curve.length - 1]!.examAccuracy! : (await trainer.runExam()).accuracy;
    console.log(`seed ${seed}: base ${base.toFixed(3)} -> final ${final.toFixed(3)} (gain ${(final - base).toFixed(3)}) in ${((performance.now() - t0) / 1000).toFixed(0)} s`);
    runs.push({ seed, base, final, curve });
    if (sampledK > 0) await sampledReport(`seed ${seed}`, gpu, model, tokenizer, trainer.lora, exam, sampledK);
    trainer.release();
    await writeFile(out, JSON.stringify({ model: modelDir, examSize: exam.length, iterations, examEvery, config, runs }, null, 1) + '\n');
  }
  const gains = runs.map((r) => r.final - r.base);
  console.log('seed  base   final  gain');
  for (const r of runs) console.log(`${String(r.seed).padEnd(5)} ${r.base.toFixed(3)}  ${r.final.toFixed(3)}  ${(r.final - r.base).toFixed(3)}`);
  const spread = gains.length > 1 ? stdUnbiased(gains) : NaN;
  console.log(`mean gain ${mean(gains).toFixed(3)}, spread (std over ${gains.length} seeds) ${spread.toFixed(3)}; a CI bound must be <= mean - 3 * spread = ${(mean(gains) - 3 * spread).toFixed(3)}`);
  model.weights.release();
  gpu.destroy();
}

main().catch((e: unknown) => {
  console.error(e instanceof Error ? e.message : e);
  process.exit(1);
});
