/**
 * The Language Self-Play trainer: one iteration of the game, rewards, advantages, the
 * two roles' losses with a KL penalty to the reference, and one LoRA update; plus
 * checkpoints, export/import and evaluation. The same code runs in the browser's
 * worker and in Node (`npm run selfplay`).
 *
 * One iteration (step()) is a pipeline over one flat list of rollouts (rollouts.ts):
 *   play    the Challenger, the policy under the challenger prompt, samples N queries (one
 *           prompt, N rows, prefilled once); the Solver answers each G times (N prompts x G
 *           rows, one batch).
 *   reward  rewards per answer from the enabled sources (verifiable arithmetic, the user's
 *           reward, a reward model, the reference model as judge), then group values and
 *           both roles' advantages (advantages.ts).
 *   score   the reference pass: log-probs of every answer and query with no adapter.
 *   update  the policy pass over the same micro-batches (answers, then queries): a recorded
 *           forward gives log-probs and entropies (one readback), the host turns them into
 *           dL/dlogp (losses.ts, with aggregation coefficients of the whole iteration), and
 *           the backward adds the LoRA grads. Then one AdamW step with clipping. A
 *           non-finite loss skips the backward passes and the step; a non-finite gradient
 *           is caught by the GPU's skip flag; either way the adapter and optimizer state
 *           stay as they were and the skip is reported.
 *   record  games and metrics, the exam when due, events and the checkpoint.
 * Sampling seeds are a hash of (run seed, iteration, role), so a resumed run draws
 * exactly what the uninterrupted run would have.
 */
import { nonFiniteCount } from '../formats/finite';
import { writeSafetensors, parseSafetensors } from '../formats/safetensors';
import type { Gpu } from '../gpu/gpu';
import { generate } from '../model/generate';
import { sequenceScore } from '../model/llama';
import type { LoadedModel } from '../model/load';
import { LoraAdapter, type LoraOptimizerState, type PeftInput } from '../model/lora';
import type { ChatTokenizer } from '../model/tokenizer';
import { computeAdvantages, type RewardSource } from './advantages';
import type { RewardHook } from './custom-reward';
import { chunks } from './batch';
import { makeConfig, scheduledLr, validateConfig, type TrainerConfig } from './config';
import { runExam as answerExam, type ExamProblem, type ExamResult } from './exam';
import { GamesLog, MemoryChunkStore, type GameChunkStore, type GameQuery, type GameSearchResult, type GamesLogState } from './games-log';
import { judgeMessages, resolveJudgeScore, type ChatMessage } from './judge';
import {
  EVAL_INSTRUCTIONS,
  arithmeticChallengerMessages,
  arithmeticChallengerPrompt,
  arithmeticQuery,
  arithmeticWorldReward,
  challengerMessages,
  numberTokenIds,
  pairScore,
  pairwiseMessages,
  parsePairVerdict,
  solverMessages,
  verifiableReward,
  type ArithmeticWorldSettings,
} from './prompts';
import {
  answerTable,
  applyAdvantages,
  batchGradient,
  finiteLoss,
  iterationValues,
  lossCoefficients,
  newRollout,
  ofRole,
  queryTexts,
  recordGames,
  scoreRollouts,
  scoringBatches,
  verifiableRewards,
  zeroLossParts,
  type IterationFacts,
  type IterationRewards,
  type Rollout,
  type ScoringBatch,
  type UpdateReport,
} from './rollouts';
import type { EvaluationItem, EvaluationJudge, EvaluationResult, GameRecord, IterationMetrics, IterationPhase, RunFiles, RunStore, TrainerEvent } from './types';

export interface TrainerModels {
  gpu: Gpu;
  model: LoadedModel;
  tokenizer: ChatTokenizer;
  /** A LlamaForSequenceClassification model on the same device (rewards.rewardModel). */
  rewardModel?: { model: LoadedModel; tokenizer: ChatTokenizer };
}

export interface TrainerOptions {
  store?: RunStore;
  /** Start from this adapter instead of a fresh one (its rank, alpha and targets win). */
  adapter?: PeftInput;
  onEvent?: (e: TrainerEvent) => void;
}

export const RUN_STATE_FORMAT = 'selfplay-lab.run';
export const RUN_STATE_VERSION = 1;
/** Games kept in a checkpoint's games.json at most (memory keeps fewer, games-log.ts; older games are in the games log). */
export const MAX_SAVED_GAMES = 2000;
/** Consecutive skipped updates after which the run stops with an error. */
export const MAX_CONSECUTIVE_SKIPS = 3;

export class TrainerError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'TrainerError';
  }
}

interface RunState {
  format: string;
  version: number;
  iteration: number;
  model: { source: string; vocabSize: number; hiddenSize: number; numLayers: number };
  config: TrainerConfig;
  history: IterationMetrics[];
  consecutiveSkips: number;
  /** The games-log chunks that belong to this checkpoint (absent: none). */
  gamesLog?: GamesLogState;
}

/** The store's games log, or memory for a run without one. */
function chunkStoreOf(store: RunStore | null): GameChunkStore {
  if (store?.writeGameChunk && store.readGameChunk) return { writeGameChunk: (n, b) => store.writeGameChunk!(n, b), readGameChunk: (n) => store.readGameChunk!(n) };
  return new MemoryChunkStore();
}

/** A 32-bit seed from (run seed, iteration, role). */
export function deriveSeed(seed: number, iteration: number, role: number): number {
  let h = (seed ^ 0x9e3779b9) >>> 0;
  for (const v of [iteration, role]) {
    h = Math.imul(h ^ (v >>> 0), 0x85ebca6b) >>> 0;
    h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35) >>> 0;
    h = (h ^ (h >>> 16)) >>> 0;
  }
  return h;
}

const ROLE = { challenger: 1, solver: 2, judge: 3, evalBase: 4, evalAdapter: 5, evalJudge: 6 } as const;

/** Streams decoded text per generation row as deltas, holding back incomplete characters. */
class TextStreams {
  private tokens: number[][];
  private sent: string[];
  constructor(
    rows: number,
    private readonly decode: (ids: number[]) => string,
    private readonly emit: (row: number, delta: string) => void,
  ) {
    this.tokens = Array.from({ length: rows }, () => []);
    this.sent = new Array<string>(rows).fill('');
  }
  push(row: number, id: number): void {
    this.tokens[row]!.push(id);
    const text = this.decode(this.tokens[row]!).replace(/\uFFFD+$/, '');
    const prev = this.sent[row]!;
    if (text.length > prev.length && text.startsWith(prev)) {
      this.emit(row, text.slice(prev.length));
      this.sent[row] = text;
    }
  }
}

export class SelfPlayTrainer {
  iteration = 0;
  history: IterationMetrics[] = [];
  /** The run's games: the newest in memory, older ones paged out to the store's games log after each iteration. */
  gamesLog: GamesLog;
  onEvent: (e: TrainerEvent) => void;
  private consecutiveSkips = 0;
  private numberIds: number[] | null = null;
  private released = false;
  /** The user's own reward (custom-reward.ts), a game reward scored in its sandbox; null for none. Not saved with the run. */
  customReward: RewardHook | null = null;
  /** The held-out exam (exam.ts), run every config.examEvery iterations as eval/exam_accuracy; never trained on. Not saved with the run. */
  exam: ExamProblem[] | null = null;

  private constructor(
    readonly models: TrainerModels,
    readonly config: TrainerConfig,
    readonly lora: LoraAdapter,
    readonly store: RunStore | null,
    onEvent?: (e: TrainerEvent) => void,
  ) {
    this.onEvent = onEvent ?? (() => undefined);
    this.gamesLog = new GamesLog(chunkStoreOf(store));
  }

  /** The newest games (at most MEMORY_GAMES after each iteration), oldest first; searchGames() covers the whole history. */
  get games(): GameRecord[] {
    return this.gamesLog.recent;
  }

  /** Games in the whole history (memory and games log). */
  get gamesTotal(): number {
    return this.gamesLog.total;
  }

  /** Games of the whole history (memory and games log), newest first. */
  searchGames(q: GameQuery = {}): Promise<GameSearchResult> {
    return this.gamesLog.search(q);
  }

  /** Every game of the run, oldest first (reads the whole games log). */
  allGames(): Promise<GameRecord[]> {
    return this.gamesLog.all();
  }

  /** A new run from a fresh adapter (or the given one). */
  static start(models: TrainerModels, config: TrainerConfig, opts: TrainerOptions = {}): SelfPlayTrainer {
    validateConfig(config);
    const { gpu, model } = models;
    checkModels(models, config);
    let lora: LoraAdapter;
    let cfg = config;
    if (opts.adapter) {
      lora = LoraAdapter.fromPeft(gpu, model.weights.config, opts.adapter);
      const c = adapterSettings(opts.adapter);
      cfg = makeConfig({ ...config, lora: { ...config.lora, ...c } });
    } else {
      lora = LoraAdapter.create(gpu, model.weights.config, { r: cfg.lora.r, alpha: cfg.lora.alpha, targets: cfg.lora.targets, useRslora: cfg.lora.useRslora, seed: cfg.seed, baseModel: model.sourceName });
    }
    return new SelfPlayTrainer(models, cfg, lora, opts.store ?? null, opts.onEvent);
  }

  /** The run saved in `store`, exactly where it stopped; null when the store holds none. */
  static async resume(models: TrainerModels, store: RunStore, opts: { onEvent?: (e: TrainerEvent) => void } = {}): Promise<SelfPlayTrainer | null> {
    const files = await store.load();
    if (!files) return null;
    return SelfPlayTrainer.fromFiles(models, files, { store, onEvent: opts.onEvent });
  }

  /** A run from checkpoint files (see checkpointFiles()). */
  static fromFiles(models: TrainerModels, files: RunFiles, opts: { store?: RunStore; onEvent?: (e: TrainerEvent) => void } = {}): SelfPlayTrainer {
    const need = ['trainer_state.json', 'adapter_config.json', 'adapter_model.safetensors', 'optimizer.safetensors'];
    for (const n of need) if (!files.has(n)) throw new TrainerError(`the saved run is missing ${n}; it cannot be resumed (export its adapter instead, if present)`);
    const state = JSON.parse(new TextDecoder().decode(files.get('trainer_state.json'))) as RunState;
    if (state.format !== RUN_STATE_FORMAT || state.version !== RUN_STATE_VERSION) {
      throw new TrainerError(`trainer_state.json is not a version-${RUN_STATE_VERSION} run of this lab (format ${String(state.format)}, version ${String(state.version)})`);
    }
    const mc = models.model.weights.config;
    if (state.model.vocabSize !== mc.vocabSize || state.model.hiddenSize !== mc.hiddenSize || state.model.numLayers !== mc.numLayers) {
      throw new TrainerError(
        `the saved run was trained on ${state.model.source} (${state.model.numLayers} layers, hidden ${state.model.hiddenSize}), ` +
          `but the loaded model is ${models.model.sourceName} (${mc.numLayers} layers, hidden ${mc.hiddenSize}); load ${state.model.source} to resume it`,
      );
    }
    const config = makeConfig(state.config);
    checkModels(models, config);
    const lora = LoraAdapter.fromPeft(models.gpu, mc, { 'adapter_config.json': files.get('adapter_config.json'), 'adapter_model.safetensors': files.get('adapter_model.safetensors')! });
    try {
      lora.importOptimizerState(readOptimizerState(files.get('optimizer.safetensors')!));
    } catch (e) {
      lora.release();
      throw e;
    }
    const t = new SelfPlayTrainer(models, config, lora, opts.store ?? null, opts.onEvent);
    t.iteration = state.iteration;
    t.history = state.history;
    t.consecutiveSkips = state.consecutiveSkips ?? 0;
    const games = files.get('games.json');
    const recent = games ? (JSON.parse(new TextDecoder().decode(games)) as GameRecord[]) : [];
    t.gamesLog = new GamesLog(chunkStoreOf(opts.store ?? null), { recent, state: state.gamesLog });
    return t;
  }

  private emit(e: TrainerEvent): void {
    this.onEvent(e);
  }

  private phase(phase: IterationPhase): void {
    this.emit({ type: 'phase', iteration: this.iteration, phase });
  }

  private chat(messages: ChatMessage[], tokenizer = this.models.tokenizer): number[] {
    return tokenizer.applyChatTemplate(messages, { addGenerationPrompt: true, dateString: '22 Nov 2026' });
  }

  private decode(ids: readonly number[]): string {
    return this.models.tokenizer.decode(ids, { skipSpecialTokens: true });
  }

  private numberTokens(): number[] {
    if (!this.numberIds) this.numberIds = numberTokenIds((t) => this.models.tokenizer.encode(t, { addSpecialTokens: false }), 2 * this.config.arithmeticMaxOperand);
    return this.numberIds;
  }

  /**
   * Plays one iteration and applies one update; returns its metrics. An abort of
   * `opts.signal` (Stop now) ends the iteration within one decode step (or one scoring
   * micro-batch), throwing the signal's reason; the iteration is discarded, and the adapter,
   * optimizer, games and metrics stay exactly as they were before it.
   */
  async step(opts: { signal?: AbortSignal } = {}): Promise<IterationMetrics> {
    if (this.released) throw new TrainerError('the trainer was released');
    const abortCheck = () => opts.signal?.throwIfAborted();
    abortCheck();
    const { gpu, model } = this.models;
    const c = this.config;
    const it = this.iteration;
    const start = performance.now();
    gpu.pool.resetPeaks();
    this.lora.enabled = true;

    const rollouts = await this.play(it, abortCheck);
    const played = performance.now();
    const rewards = await this.reward(it, rollouts, opts.signal, abortCheck);
    const rewarded = performance.now();

    abortCheck();
    this.phase('scoring');
    gpu.pool.trim();
    const batches = scoringBatches(rollouts, { microBatch: c.microBatch, vocabSize: model.weights.config.vocabSize, challenger: c.alphaCh > 0 });
    await scoreRollouts(gpu, model.weights, null, batches, { temperature: temperatureOf(c), train: false, beforeBatch: abortCheck });
    this.phase('training');
    const update = await this.update(it, rollouts, batches, opts.signal);
    const updated = performance.now();

    return this.record(it, rollouts, rewards, update, { start, played, rewarded, updated });
  }

  /** Play: the Challenger's N queries, then the Solver's G answers to each, as rollouts (queries first). */
  private async play(it: number, abortCheck: () => void): Promise<Rollout[]> {
    const { gpu, model, tokenizer } = this.models;
    const w = model.weights;
    const c = this.config;
    const N = c.queriesPerIteration;
    const G = c.groupSize;
    const arith = c.world === 'arithmetic';
    const eos = tokenizer.eosTokenIds;
    const sampling = { temperature: c.temperature, topP: c.topP };

    this.phase('challenger');
    const cs = this.stream(it, 'challenger', N, 1);
    let queries: Rollout[];
    if (arith) {
      const nums = this.numberTokens();
      const prompt = tokenizer.encode(arithmeticChallengerPrompt(c.arithmeticMaxOperand));
      const gen = await generate(gpu, w, this.lora, {
        prompt, G: N, maxNewTokens: 2, ...sampling, seed: deriveSeed(c.seed, it, ROLE.challenger),
        stopTokens: [], allowedTokens: nums.slice(0, c.arithmeticMaxOperand + 1), onToken: (row, id) => (abortCheck(), cs.push(row, id)),
      });
      queries = gen.answers.map((a, i) => {
        const [x, y] = a.tokens.map((id) => nums.indexOf(id));
        return newRollout('challenger', i, prompt, a.tokens, arithmeticQuery(x!, y!), a.finishReason);
      });
    } else {
      const prompt = this.chat(c.world === 'freeform-arithmetic' ? arithmeticChallengerMessages(this.worldSettings()) : challengerMessages(c.task, c.template));
      const gen = await generate(gpu, w, this.lora, {
        prompt, G: N, maxNewTokens: c.maxQueryTokens, ...sampling, seed: deriveSeed(c.seed, it, ROLE.challenger),
        stopTokens: eos, onToken: (row, id) => (abortCheck(), cs.push(row, id)),
      });
      queries = gen.answers.map((a, i) => newRollout('challenger', i, prompt, a.tokens, this.decode(a.tokens).trim(), a.finishReason));
    }

    this.phase('solver');
    // The toy world plays on bare text prompts (no chat template): a tiny model has no chat skills, and short prompts keep it fast.
    const prompts = queries.map((q) => (arith ? tokenizer.encode(q.text) : this.chat(solverMessages(q.text))));
    const ss = this.stream(it, 'solver', N * G, G);
    const gen = await generate(gpu, w, this.lora, {
      prompt: prompts, G, maxNewTokens: arith ? 1 : c.maxAnswerTokens, ...sampling,
      seed: deriveSeed(c.seed, it, ROLE.solver), stopTokens: arith ? [] : eos, allowedTokens: arith ? this.numberTokens() : undefined,
      onToken: (row, id) => (abortCheck(), ss.push(row, id)),
    });
    // generate's rows are query-major: row i*G + j is answer j to query i.
    const answers = gen.answers.map((a, row) => newRollout('solver', Math.floor(row / G), prompts[Math.floor(row / G)]!, a.tokens, this.decode(a.tokens).trim(), a.finishReason));
    return [...queries, ...answers];
  }

  /**
   * Reward: each enabled source scores every answer (verifiable, the user's reward, the
   * reward model, the reference model as judge), then both roles' advantages are written
   * into the rollouts.
   */
  private async reward(it: number, rollouts: Rollout[], signal: AbortSignal | undefined, abortCheck: () => void): Promise<IterationRewards> {
    const { gpu, model } = this.models;
    const c = this.config;
    const G = c.groupSize;
    const free = c.world === 'freeform-arithmetic';
    const sources: RewardSource[] = [];
    const queries = queryTexts(rollouts);
    const answers = ofRole(rollouts, 'solver');
    let queryValid: (boolean | null)[] = queries.map(() => null);
    if (c.world === 'arithmetic' || free || c.rewards.verifiable.enabled) {
      const settings = this.worldSettings();
      const v = verifiableRewards(rollouts, free ? (q, a) => arithmeticWorldReward(q, a, settings) : verifiableReward);
      queryValid = v.queryValid;
      sources.push({ name: 'verifiable', kind: 'game', weight: c.rewards.verifiable.weight, rewards: v.rewards });
    }
    let customFallbacks: number | null = null;
    if (this.customReward) {
      const cr = this.customReward;
      const scored = await cr.score(queries, answerTable(rollouts, (r) => r.text), signal);
      customFallbacks = scored.fallbacks;
      sources.push({ name: cr.name, kind: 'game', weight: cr.weight, rewards: scored.rewards });
    }
    if (c.rewards.rewardModel.enabled) {
      this.phase('reward_model');
      const scores = await this.rewardModelScore(answers.map((a): [string, string] => [queries[a.group]!, a.text]));
      const score = new Map(answers.map((a, k) => [a, scores[k]!]));
      sources.push({ name: 'reward_model', kind: 'game', weight: c.rewards.rewardModel.weight, rewards: answerTable(rollouts, (a) => score.get(a)!) });
    }
    let judgeFallbacks = 0;
    const judgeAsGame = c.mode === 'lsp-zero';
    const judged = c.mode === 'lsp' || (judgeAsGame && sources.length === 0);
    if (judged) {
      this.phase('judge');
      const js = this.stream(it, 'judge', answers.length, G);
      // The judge is the reference model: the base weights, adapter off.
      const gen = await generate(gpu, model.weights, null, {
        prompt: answers.map((a) => this.chat(judgeMessages(queries[a.group]!, a.text))), G: 1, maxNewTokens: c.rewards.judge.maxTokens, temperature: c.rewards.judge.temperature,
        seed: deriveSeed(c.seed, it, ROLE.judge), stopTokens: this.models.tokenizer.eosTokenIds, onToken: (row, id) => (abortCheck(), js.push(row, id)),
      });
      answers.forEach((a, k) => {
        const text = this.decode(gen.answers[k]!.tokens);
        const r = resolveJudgeScore(text, c.rewards.judge.fallback);
        if (r.fallback) judgeFallbacks++;
        a.judge = { text, reason: r.reason, score: r.value };
      });
      sources.push({ name: 'judge', kind: judgeAsGame ? 'game' : 'quality', weight: c.rewards.judge.weight, rewards: answerTable(rollouts, (a) => a.judge!.score) });
    }
    const advantages = computeAdvantages(sources, { scale: c.advantageScale, challengerQualityWeight: c.challengerQualityWeight });
    applyAdvantages(rollouts, sources, advantages);
    return { sources, advantages, queryValid, judged, judgeFallbacks, customFallbacks };
  }

  /**
   * Update: the policy pass over the same micro-batches as the reference pass; after each
   * one's log-probs are read, the host forms dL/dlogp (with the iteration's aggregation
   * coefficients) and the backward adds the LoRA grads. Then one AdamW step with clipping.
   * A non-finite loss skips the remaining backward passes and the step; a non-finite
   * gradient is caught by the GPU's skip flag; either way the adapter and optimizer state
   * stay as they were.
   */
  private async update(it: number, rollouts: Rollout[], batches: ScoringBatch[], signal: AbortSignal | undefined): Promise<UpdateReport> {
    const { gpu, model } = this.models;
    const c = this.config;
    const arith = c.world === 'arithmetic';
    const coef = lossCoefficients(rollouts, c.aggregation, { solver: arith ? 1 : c.maxAnswerTokens, challenger: arith ? 2 : c.maxQueryTokens });
    const parts = zeroLossParts();
    let skipped: string | null = null;
    // An abandoned iteration leaves no gradient behind.
    const stopIfAborted = () => {
      if (signal?.aborted) this.lora.zeroGrad();
      signal?.throwIfAborted();
    };
    this.lora.zeroGrad();
    await scoreRollouts(gpu, model.weights, this.lora, batches, { temperature: temperatureOf(c), train: true, beforeBatch: stopIfAborted }, (b, pass) => {
      const dl = batchGradient(b, coef, c, parts);
      if (!finiteLoss(dl, parts)) {
        skipped = 'the loss is not finite (NaN or Inf log-probs)';
        return false;
      }
      const dlogp = gpu.upload(dl, [dl.length], 'f32', 'selfplay.dlogp');
      try {
        pass.backward(dlogp);
      } finally {
        dlogp.release();
      }
    });
    let gradNorm = NaN;
    let clipCoef = NaN;
    stopIfAborted();
    const learningRate = scheduledLr(c, it);
    if (!skipped) {
      const report = await this.lora.step({ lr: learningRate, weightDecay: c.weightDecay, maxGradNorm: c.maxGradNorm }).read();
      gradNorm = report.gradNorm;
      clipCoef = report.clipCoef;
      if (report.skipped) {
        this.lora.stepCount--; // the GPU left A, B and the moments untouched; so does the bias-correction count
        skipped = 'a gradient is not finite (NaN or Inf)';
      }
    }
    this.lora.zeroGrad();
    return { parts, gradNorm, clipCoef, learningRate, skipped };
  }

  /** Record: the games and metrics of the iteration (and the exam when due), kept, streamed and checkpointed. */
  private async record(it: number, rollouts: Rollout[], rewards: IterationRewards, update: UpdateReport, times: IterationFacts['times']): Promise<IterationMetrics> {
    const c = this.config;
    const games = recordGames(rollouts, rewards, it, c.klEstimator);
    const gpuPeakMib = this.models.gpu.stats().peakAllocatedBytes / 2 ** 20;
    const examAccuracy = this.exam && c.examEvery > 0 && (it + 1) % c.examEvery === 0 ? (await this.runExam()).accuracy : undefined;
    const values = iterationValues({ rollouts, rewards, update, config: c, times, gpuPeakMib, examAccuracy });
    const metrics: IterationMetrics = { iteration: it, time: Date.now(), values };
    this.games.push(...games);
    this.history.push(metrics);
    this.iteration = it + 1;
    for (const g of games) this.emit({ type: 'game', game: g });
    const skipped = update.skipped;
    if (skipped) {
      this.consecutiveSkips++;
      this.emit({ type: 'skipped', iteration: it, reason: `${skipped}; the update was skipped and the adapter kept as it was` });
    } else {
      this.consecutiveSkips = 0;
    }
    this.emit({ type: 'iteration', metrics });
    await this.gamesLog.pageOut();
    if (this.store && c.checkpointEvery > 0 && this.iteration % c.checkpointEvery === 0) await this.checkpoint();
    if (this.consecutiveSkips >= MAX_CONSECUTIVE_SKIPS) {
      throw new TrainerError(
        `${this.consecutiveSkips} updates in a row were skipped (${skipped}). The adapter has not changed since; ` +
          'lower the learning rate or beta, or import an earlier adapter, then continue.',
      );
    }
    return metrics;
  }

  /** Streams one generation's text as token events; row r is (query floor(r / perQuery), answer r % perQuery). */
  private stream(it: number, role: 'challenger' | 'solver' | 'judge', rows: number, perQuery: number): TextStreams {
    return new TextStreams(rows, (ids) => this.decode(ids), (row, delta) =>
      this.emit({ type: 'token', iteration: it, role, query: Math.floor(row / perQuery), answer: row % perQuery, delta }),
    );
  }

  private worldSettings(): ArithmeticWorldSettings {
    return { maxOperand: this.config.arithmeticMaxOperand, operators: this.config.arithmeticOperators };
  }

  /** Greedy answers to the run's exam by the policy (adapter on, default) or the base model, graded by code. */
  async runExam(opts: { adapter?: boolean } = {}): Promise<ExamResult> {
    if (!this.exam) throw new TrainerError('this run has no exam; load one (an exam.json) first');
    const { gpu, model, tokenizer } = this.models;
    // The base model is the weights with no adapter (null), as in evaluate().
    return answerExam(gpu, model.weights, opts.adapter === false ? null : this.lora, tokenizer, this.exam, { maxTokens: this.config.maxAnswerTokens });
  }

  /** The reward model's score of each (query, answer) conversation, in micro-batches. */
  private async rewardModelScore(pairs: [string, string][]): Promise<number[]> {
    const rm = this.models.rewardModel;
    if (!rm) throw new TrainerError('the reward-model reward is on but no reward model is loaded; load one or turn the source off');
    const seqs = pairs.map(([q, a]) =>
      rm.tokenizer.applyChatTemplate(
        [
          { role: 'user', content: q },
          { role: 'assistant', content: a },
        ],
        { addGenerationPrompt: false, dateString: '22 Nov 2026' },
      ),
    );
    const out: number[] = [];
    for (const g of chunks(seqs.length, this.config.microBatch)) {
      const T = Math.max(...g.map((k) => seqs[k]!.length));
      const ids = new Uint32Array(g.length * T);
      g.forEach((k, b) => ids.set(seqs[k]!, b * T));
      const scores = sequenceScore(this.models.gpu, rm.model.weights, null, { ids, B: g.length, T, lengths: g.map((k) => seqs[k]!.length) });
      const v = await this.models.gpu.readF32(scores);
      scores.release();
      const labels = v.length / g.length;
      g.forEach((_, b) => out.push(v[b * labels]!));
    }
    return out;
  }

  /** The adapter as PEFT files, named for the loaded base model. */
  private async adapterFiles(): Promise<RunFiles> {
    const peft = await this.lora.exportPeft(this.models.model.sourceName);
    return new Map([
      ['adapter_config.json', new TextEncoder().encode(peft['adapter_config.json'])],
      ['adapter_model.safetensors', peft['adapter_model.safetensors']],
    ]);
  }

  /** Everything needed to resume: adapter, optimizer state, state (iteration, config, metrics), games. */
  async checkpointFiles(): Promise<RunFiles> {
    const files = await this.adapterFiles();
    files.set('optimizer.safetensors', writeOptimizerState(await this.lora.exportOptimizerState()));
    const mc = this.models.model.weights.config;
    const state: RunState = {
      format: RUN_STATE_FORMAT,
      version: RUN_STATE_VERSION,
      iteration: this.iteration,
      model: { source: this.models.model.sourceName, vocabSize: mc.vocabSize, hiddenSize: mc.hiddenSize, numLayers: mc.numLayers },
      config: this.config,
      history: this.history,
      consecutiveSkips: this.consecutiveSkips,
      gamesLog: this.gamesLog.state(),
    };
    files.set('trainer_state.json', new TextEncoder().encode(JSON.stringify(state)));
    files.set('games.json', new TextEncoder().encode(JSON.stringify(this.games.slice(-MAX_SAVED_GAMES))));
    return files;
  }

  /** Saves a checkpoint to the run's store (no-op without one). */
  async checkpoint(): Promise<void> {
    if (!this.store) return;
    this.phase('checkpoint');
    const files = await this.checkpointFiles();
    await this.store.save(files);
    let bytes = 0;
    for (const f of files.values()) bytes += f.length;
    this.emit({ type: 'checkpoint', iteration: this.iteration, bytes });
  }

  /** The adapter in PEFT format plus the run's configuration and metrics. */
  async exportFiles(): Promise<RunFiles> {
    const files = await this.adapterFiles();
    files.set('run_config.json', new TextEncoder().encode(JSON.stringify({ model: this.models.model.sourceName, iteration: this.iteration, config: this.config }, null, 2) + '\n'));
    files.set('metrics.json', new TextEncoder().encode(JSON.stringify(this.history, null, 1) + '\n'));
    return files;
  }

  /** Replaces the adapter's weights with a PEFT adapter of the same rank and targets (optimizer reset). */
  importAdapter(files: PeftInput): { warnings: string[] } {
    return this.lora.importPeft(files);
  }

  /**
   * Base vs adapter on held-out instructions. The judge is the frozen reference model
   * (pairwise, both orders; default) or the loaded reward model (the higher score wins,
   * equal scores tie), so the evaluation need not be the model grading itself. A run
   * with an exam also reports base and adapter exam accuracy (graded by code).
   */
  async evaluate(opts: { instructions?: readonly string[]; maxTokens?: number; judgeMaxTokens?: number; judge?: EvaluationJudge; exam?: boolean } = {}): Promise<EvaluationResult> {
    const { gpu, model } = this.models;
    const w = model.weights;
    const c = this.config;
    const instructions = opts.instructions ?? EVAL_INSTRUCTIONS;
    if (instructions.length === 0) throw new TrainerError('evaluation needs at least one instruction');
    const maxTokens = opts.maxTokens ?? c.maxAnswerTokens;
    const eos = this.models.tokenizer.eosTokenIds;
    this.emit({ type: 'phase', iteration: this.iteration, phase: 'evaluation' });
    const prompts = instructions.map((q) => this.chat(solverMessages(q)));
    // The base model is the weights with no adapter (null); the adapter's answers are the policy's.
    this.lora.enabled = true;
    const answer = async (adapter: LoraAdapter | null, role: number) => {
      const gen = await generate(gpu, w, adapter, { prompt: prompts, G: 1, maxNewTokens: maxTokens, temperature: 0, seed: deriveSeed(c.seed, this.iteration, role), stopTokens: eos });
      return gen.answers.map((a) => this.decode(a.tokens).trim());
    };
    const judge = opts.judge ?? 'reference';
    if (judge !== 'reference' && judge !== 'reward-model') throw new TrainerError(`evaluation judge must be "reference" or "reward-model", got ${String(judge)}`);
    if (judge === 'reward-model' && !this.models.rewardModel) throw new TrainerError('evaluation by the reward model needs one: load a reward model (a LlamaForSequenceClassification checkpoint) first, or judge with the reference model');
    const base = await answer(null, ROLE.evalBase);
    const tuned = await answer(this.lora, ROLE.evalAdapter);
    const exam = this.exam && (opts.exam ?? true) ? { base: (await this.runExam({ adapter: false })).accuracy, adapter: (await this.runExam({ adapter: true })).accuracy, problems: this.exam.length } : undefined;
    if (judge === 'reward-model') {
      const scores = await this.rewardModelScore(instructions.flatMap((q, k): [string, string][] => [[q, tuned[k]!], [q, base[k]!]]));
      const items = instructions.map((q, k) => {
        const rm = { adapter: scores[2 * k]!, base: scores[2 * k + 1]! };
        const score = rm.adapter > rm.base ? 1 : rm.adapter < rm.base ? 0 : 0.5;
        const verdict = score === 1 ? 'A' : score === 0 ? 'B' : 'tie';
        return { instruction: q, base: base[k]!, adapter: tuned[k]!, verdicts: [verdict, verdict] as [string | null, string | null], score, rewardScores: rm };
      });
      const result = tally(this.iteration, 'reward-model', items, 0, exam);
      this.emit({ type: 'evaluation', result });
      return result;
    }
    const judgePrompts = instructions.flatMap((q, k) => [this.chat(pairwiseMessages(q, tuned[k]!, base[k]!)), this.chat(pairwiseMessages(q, base[k]!, tuned[k]!))]);
    // The judge is the reference model: no adapter.
    const gen = await generate(gpu, w, null, { prompt: judgePrompts, G: 1, maxNewTokens: opts.judgeMaxTokens ?? c.rewards.judge.maxTokens, temperature: 0, seed: deriveSeed(c.seed, this.iteration, ROLE.evalJudge), stopTokens: eos });
    const verdicts = gen.answers.map((a) => this.decode(a.tokens));
    let unparsed = 0;
    const items = instructions.map((q, k) => {
      const v1 = parsePairVerdict(verdicts[2 * k]!);
      const v2 = parsePairVerdict(verdicts[2 * k + 1]!);
      if (v1 === null) unparsed++;
      if (v2 === null) unparsed++;
      return { instruction: q, base: base[k]!, adapter: tuned[k]!, verdicts: [v1, v2] as [string | null, string | null], score: pairScore(v1, v2) };
    });
    const result = tally(this.iteration, 'reference', items, unparsed, exam);
    this.emit({ type: 'evaluation', result });
    return result;
  }

  release(): void {
    if (this.released) return;
    this.released = true;
    this.lora.release();
  }
}

/** Wins (score 1), losses (0) and ties (anything between) of the adapter; the win rate counts ties half. */
function tally(iteration: number, judge: EvaluationJudge, items: EvaluationItem[], unparsed: number, exam: EvaluationResult['exam']): EvaluationResult {
  const wins = items.filter((i) => i.score === 1).length;
  const losses = items.filter((i) => i.score === 0).length;
  const ties = items.length - wins - losses;
  return { iteration, judge, winRate: (wins + 0.5 * ties) / items.length, wins, ties, losses, unparsed, items, ...(exam ? { exam } : {}) };
}

function temperatureOf(c: TrainerConfig): number {
  // Log-probs are taken at the sampling temperature (TRL's convention); greedy sampling scores plain logits.
  return c.temperature > 0 ? c.temperature : 1;
}

function checkModels(models: TrainerModels, config: TrainerConfig): void {
  if (config.rewards.rewardModel.enabled) {
    const rm = models.rewardModel;
    if (!rm) throw new TrainerError('the reward-model reward is on but no reward model is loaded; load one (a LlamaForSequenceClassification checkpoint) or turn the source off');
    if (!rm.model.weights.score) throw new TrainerError(`${rm.model.sourceName} has no score head; a reward model must be a LlamaForSequenceClassification checkpoint`);
  }
  if (!models.tokenizer.hasChatTemplate) throw new TrainerError(`${models.model.sourceName} has no chat template; self-play needs an instruction-tuned model with one`);
}

function adapterSettings(files: PeftInput): { r: number; alpha: number; targets: TrainerConfig['lora']['targets']; useRslora: boolean } {
  const raw = files['adapter_config.json'];
  const json = (typeof raw === 'string' ? JSON.parse(raw) : raw instanceof Uint8Array ? JSON.parse(new TextDecoder().decode(raw)) : raw) as {
    r: number;
    lora_alpha: number;
    target_modules: TrainerConfig['lora']['targets'];
    use_rslora?: boolean;
  };
  return { r: json.r, alpha: json.lora_alpha, targets: [...json.target_modules], useRslora: !!json.use_rslora };
}

export function writeOptimizerState(s: LoraOptimizerState): Uint8Array {
  return writeSafetensors(
    [...s.tensors].map(([name, t]) => ({ name, dtype: 'F32' as const, shape: t.shape, data: t.data })),
    { format: 'pt', step: String(s.step) },
  );
}

export function readOptimizerState(bytes: Uint8Array): LoraOptimizerState {
  const st = parseSafetensors(bytes, 'optimizer.safetensors');
  const step = Number(st.header.metadata?.step);
  if (!Number.isInteger(step) || step < 0) throw new TrainerError('optimizer.safetensors has no valid "step" in its metadata; the checkpoint is damaged');
  const tensors = new Map<string, { shape: number[]; data: Float32Array }>();
  for (const [name, info] of st.header.tensors) {
    if (info.dtype !== 'F32') throw new TrainerError(`optimizer.safetensors: ${name} is ${info.dtype}, expected F32`);
    const raw = st.bytes(name);
    const data = new Float32Array(raw.slice().buffer);
    const bad = nonFiniteCount(data);
    if (bad > 0) throw new TrainerError(`optimizer.safetensors: ${name} holds ${bad} non-finite value(s) (NaN or infinity); the checkpoint is damaged, resume from an earlier one or start the run again from its exported adapter`);
    tensors.set(name, { shape: info.shape.slice(), data });
  }
  return { step, tensors };
}
