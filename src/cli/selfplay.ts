/**
 * Headless self-play: `npm run selfplay -- --model models/tiny-llama [options]`.
 *
 * Runs Language Self-Play iterations with the same trainer the browser's worker uses,
 * printing metrics per iteration. With --run DIR the run is checkpointed there and a
 * later command with the same --run resumes it exactly where it stopped.
 *
 * Options:
 *   --model PATH|REPO    --format q4|f32      --token HF_TOKEN
 *   --mode lsp|lsp-zero  --world open|arithmetic|freeform-arithmetic   --task TEXT  --template TEXT
 *   --operators +,-  (free-form arithmetic)  --exam FILE (default: exam.json in the model folder)  --exam-every K
 *   --iterations N       --N queries  --G answers  --max-query T  --max-answer T
 *   --temperature T  --top-p P  --beta B  --kl k1|k3  --kl-placement loss|reward
 *   --alpha-ch A  --aggregation grpo|bnpo|dr_grpo|dapo|seq_sum  --scale none|group
 *   --lr LR  --lr-schedule constant|linear|cosine  --lr-warmup K  --lr-decay-iterations K  --lr-min-ratio F
 *   --weight-decay WD  --max-grad-norm C  --micro-batch M
 *   --rank R  --alpha A  --targets q_proj,v_proj,...  --rslora  --seed S
 *   --verifiable [WEIGHT]  --judge-weight W  --judge-max-tokens T  --max-operand K
 *   --reward-model PATH|REPO [--reward-model-weight W]
 *   --adapter DIR (start from a PEFT adapter)  --run DIR [--name NAME] (checkpoints, resume)
 *   --reward-fn FILE.js [--reward-fn-weight W] [--reward-fn-timeout MS] [--reward-fn-fallback R] [--reward-fn-name NAME]
 *                        (your own reward: a JavaScript function of (query, answer) returning a number, run sandboxed)
 *   --export DIR (PEFT + config + metrics, completions.jsonl + metrics.csv)  --eval [COUNT] (win rate vs the base model)
 *   [--eval-judge reference|reward-model] (who compares base and adapter answers; reward-model needs --reward-model)
 */
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { LlamaProjection } from '../formats/peft';
import { acquireNodeGpu } from '../gpu/node';
import { loadLlama } from '../model/load';
import { openModelDir } from '../model/node-source';
import { hubModelSource, isHubRepoId, type ModelSource } from '../model/source';
import { loadTokenizer } from '../model/tokenizer';
import { makeConfig, type DeepPartial, type TrainerConfig } from '../selfplay/config';
import { parseExam } from '../selfplay/exam';
import type { ArithOp } from '../selfplay/prompts';
import { CustomReward, DEFAULT_CUSTOM_REWARD, summarizeFailures } from '../selfplay/custom-reward';
import { nodeSandbox } from '../selfplay/custom-reward-node';
import { reportFiles } from '../selfplay/report';
import { openRunStore } from '../selfplay/node-store';
import { EVAL_INSTRUCTIONS } from '../selfplay/prompts';
import { SelfPlayTrainer, type TrainerModels } from '../selfplay/trainer';
import type { EvaluationJudge, RunStore } from '../selfplay/types';
import { parseFlags } from './flags';

async function openSource(model: string, token: string | undefined): Promise<ModelSource> {
  if (isHubRepoId(model) && !model.startsWith('.') && !model.startsWith('/') && !model.startsWith('models/')) return hubModelSource(model, { token });
  return openModelDir(model);
}

function configFromFlags(f: Map<string, string>): DeepPartial<TrainerConfig> {
  const num = (name: string): number | undefined => {
    const v = f.get(name);
    if (v === undefined) return undefined;
    const n = Number(v);
    if (!Number.isFinite(n)) throw new Error(`--${name} must be a number, got ${v}`);
    return n;
  };
  const str = <T extends string>(name: string) => f.get(name) as T | undefined;
  const o: DeepPartial<TrainerConfig> = {
    mode: str('mode'),
    world: str('world'),
    task: str('task'),
    template: str('template'),
    queriesPerIteration: num('N'),
    groupSize: num('G'),
    maxQueryTokens: num('max-query'),
    maxAnswerTokens: num('max-answer'),
    temperature: num('temperature'),
    topP: num('top-p'),
    beta: num('beta'),
    klEstimator: str('kl'),
    klPlacement: str('kl-placement'),
    alphaCh: num('alpha-ch'),
    aggregation: str('aggregation'),
    advantageScale: str('scale'),
    lr: num('lr'),
    lrSchedule: str('lr-schedule'),
    lrWarmup: num('lr-warmup'),
    lrDecayIterations: num('lr-decay-iterations'),
    lrMinRatio: num('lr-min-ratio'),
    weightDecay: num('weight-decay'),
    maxGradNorm: num('max-grad-norm'),
    microBatch: num('micro-batch'),
    seed: num('seed'),
    arithmeticMaxOperand: num('max-operand'),
    arithmeticOperators: f.get('operators')?.split(',').map((x) => x.trim()) as ArithOp[] | undefined,
    examEvery: num('exam-every'),
    lora: {
      r: num('rank'),
      alpha: num('alpha'),
      targets: f.get('targets')?.split(',') as LlamaProjection[] | undefined,
      useRslora: f.has('rslora') ? true : undefined,
    },
    rewards: {
      judge: { weight: num('judge-weight'), maxTokens: num('judge-max-tokens') },
      verifiable: f.has('verifiable') ? { enabled: true, weight: f.get('verifiable') === 'true' ? 1 : num('verifiable') } : {},
      rewardModel: f.has('reward-model') ? { enabled: true, weight: num('reward-model-weight') } : {},
    },
  };
  // Drop unset fields so defaults apply.
  return JSON.parse(JSON.stringify(o)) as DeepPartial<TrainerConfig>;
}

const SHOWN = ['eval/exam_accuracy', 'reward', 'challenger/invalid_ratio', 'reward/custom_fallback_count', 'challenger/reward', 'kl', 'entropy', 'loss', 'grad_norm', 'completions/mean_length', 'frac_reward_zero_std', 'judge/fallback_count', 'step_skipped', 'time/generate', 'time/reward', 'time/train', 'step_time', 'tokens_per_second'];

async function main(): Promise<void> {
  const f = parseFlags(process.argv.slice(2));
  const modelPath = f.get('model');
  if (!modelPath) throw new Error('usage: npm run selfplay -- --model <folder or hub repo id> [--mode lsp|lsp-zero] [--world open|arithmetic] [--iterations N] ...');
  const format = (f.get('format') ?? 'q4') as 'q4' | 'f32';
  if (format !== 'q4' && format !== 'f32') throw new Error(`--format must be q4 or f32, got ${format}`);
  const iterations = Number(f.get('iterations') ?? 2);
  if (!(Number.isInteger(iterations) && iterations >= 0)) throw new Error(`--iterations must be a whole number, got ${f.get('iterations')}`);

  const gpu = await acquireNodeGpu();
  console.log(`adapter: ${gpu.caps.adapterName}`);
  const loaded = await loadLlama(gpu, await openSource(modelPath, f.get('token')), { format });
  const tokenizer = await loadTokenizer(loaded.files, loaded.weights.config.vocabSize);
  console.log(`loaded ${loaded.sourceName} (${format}): ${loaded.weights.config.numLayers} layers, hidden ${loaded.weights.config.hiddenSize}`);
  const models: TrainerModels = { gpu, model: loaded, tokenizer };
  const rmPath = f.get('reward-model');
  if (rmPath && rmPath !== 'true') {
    const rm = await loadLlama(gpu, await openSource(rmPath, f.get('token')), { format });
    models.rewardModel = { model: rm, tokenizer: await loadTokenizer(rm.files, rm.weights.config.vocabSize) };
    console.log(`reward model ${rm.sourceName}`);
  }

  let store: RunStore | undefined;
  const runDir = f.get('run');
  if (runDir) store = await openRunStore(runDir, f.get('name') ?? 'run');
  let trainer: SelfPlayTrainer | null = store ? await SelfPlayTrainer.resume(models, store) : null;
  if (trainer) {
    console.log(`resumed run "${store!.name}" at iteration ${trainer.iteration} from ${runDir}`);
  } else {
    const config = makeConfig(configFromFlags(f));
    const adapterDir = f.get('adapter');
    const adapter = adapterDir
      ? { 'adapter_config.json': await readFile(join(adapterDir, 'adapter_config.json'), 'utf8'), 'adapter_model.safetensors': new Uint8Array(await readFile(join(adapterDir, 'adapter_model.safetensors'))) }
      : undefined;
    trainer = SelfPlayTrainer.start(models, config, { store, adapter });
    console.log(`new ${config.mode} run in the ${config.world} world: N=${config.queriesPerIteration}, G=${config.groupSize}, lr ${trainer.config.lr}, LoRA r=${trainer.config.lora.r}`);
  }
  trainer.onEvent = (e) => {
    if (e.type === 'skipped') console.log(`  iteration ${e.iteration}: ${e.reason}`);
  };
  const rewardFn = await customRewardFromFlags(f);
  if (rewardFn) {
    trainer.customReward = rewardFn;
    console.log(`reward "${rewardFn.name}" from ${f.get('reward-fn')} (weight ${rewardFn.weight}, ${rewardFn.spec.timeoutMs} ms per call, fallback ${rewardFn.spec.fallback})`);
  }
  const examFile = f.get('exam') ?? (modelPath.startsWith('.') || modelPath.startsWith('/') || modelPath.startsWith('models/') ? join(modelPath, 'exam.json') : undefined);
  if (examFile && (f.has('exam') || (await readFile(examFile).then(() => true, () => false)))) {
    trainer.exam = parseExam(JSON.parse(await readFile(examFile, 'utf8')), examFile).problems;
    if (trainer.config.examEvery > 0 && trainer.iteration === 0) {
      const base = await trainer.runExam({ adapter: false });
      console.log(`exam ${examFile}: ${trainer.exam.length} problems, base model greedy accuracy ${fmt(base.accuracy)}; rerun every ${trainer.config.examEvery} iterations`);
    }
  }
  const end = trainer.iteration + iterations;
  while (trainer.iteration < end) {
    const m = await trainer.step();
    const game = trainer.games[trainer.games.length - trainer.config.queriesPerIteration]!;
    console.log(`iteration ${m.iteration}: ` + SHOWN.filter((k) => k in m.values).map((k) => `${k} ${fmt(m.values[k]!)}`).join(', '));
    console.log(`  query: ${JSON.stringify(game.query.slice(0, 160))}  answer: ${JSON.stringify(game.answers[0]!.text.slice(0, 160))}`);
  }
  if (store) await trainer.checkpoint();

  const evalCount = f.get('eval');
  if (evalCount !== undefined) {
    const n = evalCount === 'true' ? EVAL_INSTRUCTIONS.length : Number(evalCount);
    const judge = (f.get('eval-judge') ?? 'reference') as EvaluationJudge;
    const r = await trainer.evaluate({ instructions: EVAL_INSTRUCTIONS.slice(0, n), judge });
    console.log(`evaluation on ${n} instructions, judged by the ${judge === 'reward-model' ? 'reward model' : 'reference model'}: adapter win rate ${(100 * r.winRate).toFixed(1)}% (${r.wins} wins, ${r.ties} ties, ${r.losses} losses; ${r.unparsed} verdicts unparsed)`);
    if (r.exam) console.log(`held-out exam (${r.exam.problems} problems): base ${r.exam.base.toFixed(3)}, adapter ${r.exam.adapter.toFixed(3)}`);
  }
  const out = f.get('export');
  if (out) {
    await mkdir(out, { recursive: true });
    for (const [name, data] of await trainer.exportFiles()) await writeFile(join(out, name), data);
    for (const [name, data] of reportFiles(await trainer.allGames(), trainer.history)) await writeFile(join(out, name), data);
    console.log(`adapter, run config, metrics (metrics.json, metrics.csv) and games (completions.jsonl) written to ${out}`);
  }
  trainer.release();
  rewardFn?.release();
  loaded.weights.release();
  gpu.destroy();
}

/** --reward-fn FILE: the user's reward function, compiled in its sandbox (a source that does not load stops here). */
async function customRewardFromFlags(f: Map<string, string>): Promise<CustomReward | null> {
  const file = f.get('reward-fn');
  if (file === undefined) return null;
  if (file === 'true') throw new Error('--reward-fn needs a file: --reward-fn my-reward.js (a JavaScript function of (query, answer) returning a number)');
  let source: string;
  try {
    source = await readFile(file, 'utf8');
  } catch (e) {
    throw new Error(`--reward-fn: cannot read ${file} (${e instanceof Error ? e.message : String(e)})`);
  }
  const num = (name: string, dflt: number): number => {
    const v = f.get(name);
    if (v === undefined) return dflt;
    const n = Number(v);
    if (!Number.isFinite(n)) throw new Error(`--${name} must be a number, got ${v}`);
    return n;
  };
  const spec = {
    name: f.get('reward-fn-name') ?? DEFAULT_CUSTOM_REWARD.name,
    source,
    weight: num('reward-fn-weight', DEFAULT_CUSTOM_REWARD.weight),
    timeoutMs: num('reward-fn-timeout', DEFAULT_CUSTOM_REWARD.timeoutMs),
    fallback: num('reward-fn-fallback', DEFAULT_CUSTOM_REWARD.fallback),
  };
  return CustomReward.create(spec, nodeSandbox, (failures) => console.log(`  ${summarizeFailures(spec.name, failures, spec.fallback)}`));
}

function fmt(v: number): string {
  return Math.abs(v) >= 100 || v === 0 ? v.toFixed(0) : v.toPrecision(4);
}

main().then(
  () => process.exit(0),
  (e: unknown) => {
    console.error(`error: ${e instanceof Error ? e.message : String(e)}`);
    process.exit(1);
  },
);
