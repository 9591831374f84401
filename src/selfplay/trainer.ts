/**
 * The Language Self-Play trainer: one iteration of the game, rewards, advantages, the
 * two roles' losses with a KL penalty to the reference, and one LoRA update; plus
 * checkpoints, export/import and evaluation. The same code runs in the browser's
 * worker and in Node (`npm run selfplay`).
 *
 * One iteration (step()):
 *   1. Challenger: the policy under the challenger prompt samples N queries (one
 *      prompt, N rows, prefilled once).
 *   2. Solver: each query as a user turn, G answers each (N prompts x G rows, one batch).
 *   3. Rewards per answer from the enabled sources (verifiable arithmetic, the
 *      reference model as judge with the adapter switched off, a reward model), then
 *      group values, Solver and Challenger advantages (advantages.ts).
 *   4. Reference log-probs (adapter off) of every answer and query, inference passes.
 *   5. Training: for each micro-batch of sequences (answers, then queries) a recorded
 *      forward pass gives the policy's log-probs and entropies (one readback), the host
 *      turns them into dL/dlogp (losses.ts, with aggregation coefficients of the whole
 *      iteration), and the backward pass adds the LoRA grads. Then one AdamW step with
 *      clipping. A non-finite loss skips the backward passes and the step; a non-finite
 *      gradient is caught by the GPU's skip flag; either way the adapter and optimizer
 *      state stay as they were and the skip is reported.
 * Sampling seeds are a hash of (run seed, iteration, role), so a resumed run draws
 * exactly what the uninterrupted run would have.
 */
import { nonFiniteCount } from '../formats/finite';
import { writeSafetensors, parseSafetensors } from '../formats/safetensors';
import type { Gpu } from '../gpu/gpu';
import type { Tensor } from '../gpu/tensor';
import { generate, type GenerateResult } from '../model/generate';
import { sequenceLogprobs, sequenceScore, type TokenBatch } from '../model/llama';
import type { LoadedModel } from '../model/load';
import { LoraAdapter, type LoraOptimizerState, type PeftInput } from '../model/lora';
import type { ChatTokenizer } from '../model/tokenizer';
import { computeAdvantages, mean, stdUnbiased, type RewardSource } from './advantages';
import type { RewardHook } from './custom-reward';
import { chunks, completionBatch, type Completion } from './batch';
import { makeConfig, scheduledLr, validateConfig, type TrainerConfig } from './config';
import { runExam as answerExam, type ExamProblem, type ExamResult } from './exam';
import { GamesLog, MemoryChunkStore, type GameChunkStore, type GameQuery, type GameSearchResult, type GamesLogState } from './games-log';
import { judgeMessages, resolveJudgeScore, type ChatMessage } from './judge';
import { klSequence } from './kl';
import { aggregationCoefficients, sequenceTerms } from './losses';
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
} from './prompts';
import type { AnswerRecord, EvaluationItem, EvaluationJudge, EvaluationResult, GameRecord, IterationMetrics, IterationPhase, RunFiles, RunStore, TrainerEvent } from './types';

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

interface Query {
  text: string;
  /** The Challenger's sampled tokens (the sequence its loss is taken over). */
  tokens: number[];
  finishReason: GenerateResult['answers'][number]['finishReason'];
}

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
   * `opts.signal` (Stop now) ends the iteration within one decode step (or one training
   * micro-batch), throwing the signal's reason; the iteration is discarded, and the adapter,
   * optimizer, games and metrics stay exactly as they were before it.
   */
  async step(opts: { signal?: AbortSignal } = {}): Promise<IterationMetrics> {
    if (this.released) throw new TrainerError('the trainer was released');
    const abortCheck = () => opts.signal?.throwIfAborted();
    abortCheck();
    const { gpu, model, tokenizer } = this.models;
    const w = model.weights;
    const c = this.config;
    const it = this.iteration;
    const N = c.queriesPerIteration;
    const G = c.groupSize;
    const arith = c.world === 'arithmetic';
    const free = c.world === 'freeform-arithmetic';
    const worldSettings = { maxOperand: c.arithmeticMaxOperand, operators: c.arithmeticOperators };
    const t0 = performance.now();
    gpu.pool.resetPeaks();
    this.lora.enabled = true;

    // 1. Challenger
    this.phase('challenger');
    const eos = tokenizer.eosTokenIds;
    let cpPrompt: number[];
    let queries: Query[];
    const stream = (role: 'challenger' | 'solver' | 'judge', rows: number, perQuery: number) =>
      new TextStreams(rows, (ids) => this.decode(ids), (row, delta) =>
        this.emit({ type: 'token', iteration: it, role, query: Math.floor(row / perQuery), answer: row % perQuery, delta }),
      );
    if (arith) {
      const nums = this.numberTokens();
      cpPrompt = tokenizer.encode(arithmeticChallengerPrompt(c.arithmeticMaxOperand));
      const s = stream('challenger', N, 1);
      const gen = await generate(gpu, w, this.lora, {
        prompt: cpPrompt, G: N, maxNewTokens: 2, temperature: c.temperature, topP: c.topP, seed: deriveSeed(c.seed, it, ROLE.challenger),
        stopTokens: [], allowedTokens: nums.slice(0, c.arithmeticMaxOperand + 1), onToken: (row, id) => (abortCheck(), s.push(row, id)),
      });
      queries = gen.answers.map((a) => {
        const [x, y] = a.tokens.map((id) => nums.indexOf(id));
        return { text: arithmeticQuery(x!, y!), tokens: a.tokens, finishReason: a.finishReason };
      });
    } else {
      cpPrompt = this.chat(free ? arithmeticChallengerMessages(worldSettings) : challengerMessages(c.task, c.template));
      const s = stream('challenger', N, 1);
      const gen = await generate(gpu, w, this.lora, {
        prompt: cpPrompt, G: N, maxNewTokens: c.maxQueryTokens, temperature: c.temperature, topP: c.topP, seed: deriveSeed(c.seed, it, ROLE.challenger),
        stopTokens: eos, onToken: (row, id) => (abortCheck(), s.push(row, id)),
      });
      queries = gen.answers.map((a) => ({ text: this.decode(a.tokens).trim(), tokens: a.tokens, finishReason: a.finishReason }));
    }

    // 2. Solver
    this.phase('solver');
    // The toy world plays on bare text prompts (no chat template): a tiny model has no chat skills, and short prompts keep it fast.
    const solverPrompts = queries.map((q) => (arith ? tokenizer.encode(q.text) : this.chat(solverMessages(q.text))));
    const ss = stream('solver', N * G, G);
    const genS = await generate(gpu, w, this.lora, {
      prompt: solverPrompts, G, maxNewTokens: arith ? 1 : c.maxAnswerTokens, temperature: c.temperature, topP: c.topP,
      seed: deriveSeed(c.seed, it, ROLE.solver), stopTokens: arith ? [] : eos, allowedTokens: arith ? this.numberTokens() : undefined,
      onToken: (row, id) => (abortCheck(), ss.push(row, id)),
    });
    const answerTexts = genS.answers.map((a) => this.decode(a.tokens).trim());
    const tGen = performance.now();

    // 3. Rewards
    const sources: RewardSource[] = [];
    const grid = <T>(f: (i: number, j: number) => T): T[][] => Array.from({ length: N }, (_, i) => Array.from({ length: G }, (_, j) => f(i, j)));
    let queryValid: (boolean | null)[] = queries.map(() => null);
    if (arith || free || c.rewards.verifiable.enabled) {
      const check = free ? (q: string, a: string) => arithmeticWorldReward(q, a, worldSettings) : verifiableReward;
      const res = grid((i, j) => check(queries[i]!.text, answerTexts[i * G + j]!));
      queryValid = res.map((row) => row[0]!.valid);
      sources.push({ name: 'verifiable', kind: 'game', weight: c.rewards.verifiable.weight, rewards: res.map((row) => row.map((r) => r.reward)) });
    }
    let customFallbacks = 0;
    if (this.customReward) {
      const cr = this.customReward;
      const scored = await cr.score(queries.map((q) => q.text), grid((i, j) => answerTexts[i * G + j]!), opts.signal);
      customFallbacks = scored.fallbacks;
      sources.push({ name: cr.name, kind: 'game', weight: cr.weight, rewards: scored.rewards });
    }
    if (c.rewards.rewardModel.enabled) {
      this.phase('reward_model');
      sources.push({ name: 'reward_model', kind: 'game', weight: c.rewards.rewardModel.weight, rewards: await this.rewardModelScores(queries, answerTexts) });
    }
    let judged: NonNullable<AnswerRecord['judge']>[] | null = null;
    let fallbacks = 0;
    const judgeAsGame = c.mode === 'lsp-zero';
    if (c.mode === 'lsp' || (judgeAsGame && sources.length === 0)) {
      this.phase('judge');
      const prompts = grid((i, j) => this.chat(judgeMessages(queries[i]!.text, answerTexts[i * G + j]!))).flat();
      const js = stream('judge', N * G, G);
      this.lora.enabled = false;
      let gen: GenerateResult;
      try {
        gen = await generate(gpu, w, this.lora, {
          prompt: prompts, G: 1, maxNewTokens: c.rewards.judge.maxTokens, temperature: c.rewards.judge.temperature,
          seed: deriveSeed(c.seed, it, ROLE.judge), stopTokens: eos, onToken: (row, id) => (abortCheck(), js.push(row, id)),
        });
      } finally {
        this.lora.enabled = true;
      }
      judged = gen.answers.map((a) => {
        const text = this.decode(a.tokens);
        const r = resolveJudgeScore(text, c.rewards.judge.fallback);
        if (r.fallback) fallbacks++;
        return { text, reason: r.reason, score: r.value };
      });
      sources.push({ name: 'judge', kind: judgeAsGame ? 'game' : 'quality', weight: c.rewards.judge.weight, rewards: grid((i, j) => judged![i * G + j]!.score) });
    }
    const adv = computeAdvantages(sources, { scale: c.advantageScale, challengerQualityWeight: c.challengerQualityWeight });
    const tReward = performance.now();

    // 4. Reference log-probs, 5. training
    abortCheck();
    this.phase('scoring');
    gpu.pool.trim();
    const answerSeqs: Completion[] = genS.answers.map((a, r) => ({ prompt: solverPrompts[Math.floor(r / G)]!, completion: a.tokens }));
    const querySeqs: Completion[] = queries.map((q) => ({ prompt: cpPrompt, completion: q.tokens }));
    const all = [...answerSeqs, ...querySeqs];
    // With alpha_ch 0 the Challenger's loss weighs nothing, so its sequences are neither scored
    // nor trained (the update is the same; their log-probs in the games read NaN, their KL 0).
    const queryGroups = c.alphaCh > 0 ? chunks(querySeqs.length, c.microBatch) : [];
    const groups = [...chunks(answerSeqs.length, c.microBatch), ...queryGroups.map((g) => g.map((k) => k + answerSeqs.length))];
    const batches = groups.map((g) => scoredBatch(g.map((k) => all[k]!), w.config.vocabSize));
    const refLogp: Float32Array[] = new Array(all.length);
    this.lora.enabled = false;
    try {
      for (const [gi, g] of groups.entries()) {
        const { batch, rows, flat } = batches[gi]!;
        if (flat.length === 0) {
          g.forEach((k) => (refLogp[k] = new Float32Array(0)));
          continue;
        }
        const pass = sequenceLogprobs(gpu, w, this.lora, batch, { temperature: temperatureOf(c), rows: flat });
        const lp = await gpu.readF32(pass.logp);
        pass.release();
        g.forEach((k, n) => (refLogp[k] = Float32Array.from(rows[n]!, (at) => lp[at]!)));
      }
    } finally {
      this.lora.enabled = true;
    }

    this.phase('training');
    const answerLens = answerSeqs.map((s) => s.completion.length);
    const queryLens = querySeqs.map((s) => s.completion.length);
    const coefSol = aggregationCoefficients(answerLens, { aggregation: c.aggregation, maxLength: arith ? 1 : c.maxAnswerTokens });
    const coefCh = aggregationCoefficients(queryLens, { aggregation: c.aggregation, maxLength: arith ? 2 : c.maxQueryTokens });
    const advantageOf = (k: number) => (k < answerSeqs.length ? adv.solverAdvantage[Math.floor(k / G)]![k % G]! : adv.challengerAdvantage[k - answerSeqs.length]!);
    const polLogp: Float32Array[] = new Array(all.length);
    let entropySum = 0;
    let entropyCount = 0;
    const parts = { solverPg: 0, solverKl: 0, chPg: 0, chKl: 0 };
    let nonFinite: string | null = null;
    this.lora.zeroGrad();
    for (const [gi, g] of groups.entries()) {
      if (opts.signal?.aborted) this.lora.zeroGrad();
      abortCheck();
      const { batch, rows, flat } = batches[gi]!;
      if (flat.length === 0) {
        g.forEach((k) => (polLogp[k] = new Float32Array(0)));
        continue;
      }
      const pass = sequenceLogprobs(gpu, w, this.lora, batch, { temperature: temperatureOf(c), entropy: true, train: true, rows: flat });
      let dlogp: Tensor | null = null;
      try {
        const [lp, ent] = await readPair(gpu, pass.logp, pass.entropy!);
        const dl = new Float32Array(flat.length);
        g.forEach((k, n) => {
          const r = rows[n]!;
          const logp = Float32Array.from(r, (row) => lp[row]!);
          polLogp[k] = logp;
          const isAnswer = k < answerSeqs.length;
          if (isAnswer) for (const row of r) {
            entropySum += ent[row]!;
            entropyCount++;
          }
          const terms = sequenceTerms(
            { logp, logpRef: refLogp[k]!, advantage: advantageOf(k) },
            isAnswer ? coefSol[k]! : coefCh[k - answerSeqs.length]!,
            c.beta, c.klEstimator, isAnswer ? 1 : c.alphaCh, c.klPlacement,
          );
          if (isAnswer) {
            parts.solverPg += terms.pgLoss;
            parts.solverKl += terms.kl;
          } else {
            parts.chPg += terms.pgLoss;
            parts.chKl += terms.kl;
          }
          r.forEach((row, t) => (dl[row] = terms.weights[t]!));
        });
        if (!dl.every(Number.isFinite) || !Number.isFinite(parts.solverPg + parts.solverKl + parts.chPg + parts.chKl)) {
          nonFinite = 'the loss is not finite (NaN or Inf log-probs)';
          break;
        }
        dlogp = gpu.upload(dl, [dl.length], 'f32', 'selfplay.dlogp');
        pass.backward(dlogp);
      } finally {
        dlogp?.release();
        pass.release();
      }
    }
    let gradNorm = NaN;
    let clipCoef = NaN;
    if (opts.signal?.aborted) this.lora.zeroGrad();
    abortCheck();
    if (!nonFinite) {
      const report = await this.lora.step({ lr: scheduledLr(c, it), weightDecay: c.weightDecay, maxGradNorm: c.maxGradNorm }).read();
      gradNorm = report.gradNorm;
      clipCoef = report.clipCoef;
      if (report.skipped) {
        this.lora.stepCount--; // the GPU left A, B and the moments untouched; so does the bias-correction count
        nonFinite = 'a gradient is not finite (NaN or Inf)';
      }
    }
    this.lora.zeroGrad();
    const tTrain = performance.now();

    // Records and metrics
    const solverLoss = parts.solverPg + c.beta * parts.solverKl;
    const chLoss = parts.chPg + c.beta * parts.chKl;
    const seqKl = (k: number) => (polLogp[k] ? klSequence(c.klEstimator, polLogp[k], refLogp[k]!).mean : 0);
    const sum = (a: Float32Array | undefined) => (a ? a.reduce((x, y) => x + y, 0) : NaN);
    const games: GameRecord[] = queries.map((q, i) => ({
      iteration: it,
      index: i,
      query: q.text,
      queryTokens: q.tokens.length,
      queryFinishReason: q.finishReason,
      queryValid: queryValid[i]!,
      queryLogp: sum(polLogp[answerSeqs.length + i]),
      queryLogpRef: sum(refLogp[answerSeqs.length + i]),
      queryKl: seqKl(answerSeqs.length + i),
      value: adv.value[i]!,
      qualityValue: adv.qualityValue[i]!,
      challengerReward: adv.challengerReward[i]!,
      challengerAdvantage: adv.challengerAdvantage[i]!,
      answers: Array.from({ length: G }, (_, j): AnswerRecord => {
        const r = i * G + j;
        const a = genS.answers[r]!;
        const rec: AnswerRecord = {
          text: answerTexts[r]!,
          tokens: a.tokens.length,
          finishReason: a.finishReason,
          rewards: Object.fromEntries(sources.map((s) => [s.name, s.rewards[i]![j]!])),
          reward: adv.solverReward[i]![j]!,
          advantage: adv.solverAdvantage[i]![j]!,
          logp: sum(polLogp[r]),
          logpRef: sum(refLogp[r]),
          kl: seqKl(r),
        };
        if (judged) rec.judge = judged[r]!;
        return rec;
      }),
    }));
    const lens = answerLens;
    const totalTokens = lens.reduce((a, b) => a + b, 0) + queryLens.reduce((a, b) => a + b, 0) + (judged ? judged.length : 0);
    const values: Record<string, number> = {
      reward: adv.rewardMean,
      reward_std: adv.rewardStd,
      'challenger/reward': mean(adv.challengerReward),
      'challenger/reward_std': stdUnbiased(adv.challengerReward),
      kl: parts.solverKl,
      'challenger/kl': parts.chKl,
      entropy: entropyCount ? entropySum / entropyCount : 0,
      loss: solverLoss + c.alphaCh * chLoss,
      'loss/solver': solverLoss,
      'loss/challenger': chLoss,
      'loss/solver_pg': parts.solverPg,
      'loss/solver_kl': c.beta * parts.solverKl,
      'completions/mean_length': mean(lens),
      'completions/max_length': Math.max(...lens),
      'completions/min_length': Math.min(...lens),
      'completions/clipped_ratio': arith ? 0 : genS.answers.filter((a) => a.finishReason === 'length').length / genS.answers.length,
      'queries/mean_length': mean(queryLens),
      frac_reward_zero_std: adv.fracRewardZeroStd,
      grad_norm: gradNorm,
      clip_coef: clipCoef,
      learning_rate: scheduledLr(c, it),
      step_skipped: nonFinite ? 1 : 0,
      'judge/fallback_count': fallbacks,
      ...(this.customReward ? { 'reward/custom_fallback_count': customFallbacks } : {}),
      'time/generate': (tGen - t0) / 1000,
      'time/reward': (tReward - tGen) / 1000,
      'time/train': (tTrain - tReward) / 1000,
      step_time: (tTrain - t0) / 1000,
      tokens_per_second: totalTokens / ((tTrain - t0) / 1000),
      'gpu/peak_mib': gpu.stats().peakAllocatedBytes / 2 ** 20,
    };
    if (queryValid.some((v) => v !== null)) values['challenger/invalid_ratio'] = queryValid.filter((v) => v === false).length / N;
    if (this.exam && c.examEvery > 0 && (it + 1) % c.examEvery === 0) values['eval/exam_accuracy'] = (await this.runExam()).accuracy;
    for (const s of adv.perSource) {
      values[`rewards/${s.name}/mean`] = s.mean;
      values[`rewards/${s.name}/std`] = s.std;
    }
    const metrics: IterationMetrics = { iteration: it, time: Date.now(), values };
    this.games.push(...games);
    this.history.push(metrics);
    this.iteration = it + 1;
    for (const g of games) this.emit({ type: 'game', game: g });
    if (nonFinite) {
      this.consecutiveSkips++;
      this.emit({ type: 'skipped', iteration: it, reason: `${nonFinite}; the update was skipped and the adapter kept as it was` });
    } else {
      this.consecutiveSkips = 0;
    }
    this.emit({ type: 'iteration', metrics });
    await this.gamesLog.pageOut();
    if (this.store && c.checkpointEvery > 0 && this.iteration % c.checkpointEvery === 0) await this.checkpoint();
    if (this.consecutiveSkips >= MAX_CONSECUTIVE_SKIPS) {
      throw new TrainerError(
        `${this.consecutiveSkips} updates in a row were skipped (${nonFinite}). The adapter has not changed since; ` +
          'lower the learning rate or beta, or import an earlier adapter, then continue.',
      );
    }
    return metrics;
  }

  /** Greedy answers to the run's exam by the policy (adapter on, default) or the base model, graded by code. */
  async runExam(opts: { adapter?: boolean } = {}): Promise<ExamResult> {
    if (!this.exam) throw new TrainerError('this run has no exam; load one (an exam.json) first');
    const { gpu, model, tokenizer } = this.models;
    const before = this.lora.enabled;
    this.lora.enabled = opts.adapter ?? true;
    try {
      return await answerExam(gpu, model.weights, this.lora, tokenizer, this.exam, { maxTokens: this.config.maxAnswerTokens });
    } finally {
      this.lora.enabled = before;
    }
  }

  private async rewardModelScores(queries: Query[], answers: string[]): Promise<number[][]> {
    const G = this.config.groupSize;
    const out = await this.rewardModelScore(answers.map((a, r) => [queries[Math.floor(r / G)]!.text, a]));
    return Array.from({ length: queries.length }, (_, i) => out.slice(i * G, i * G + G));
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
   * Base model vs base + adapter on held-out instructions, judged pairwise by the
   * reference model in both orders (position swap); ties and disagreements count half.
   */
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
    const answer = async (enabled: boolean, role: number) => {
      this.lora.enabled = enabled;
      try {
        const gen = await generate(gpu, w, this.lora, { prompt: prompts, G: 1, maxNewTokens: maxTokens, temperature: 0, seed: deriveSeed(c.seed, this.iteration, role), stopTokens: eos });
        return gen.answers.map((a) => this.decode(a.tokens).trim());
      } finally {
        this.lora.enabled = true;
      }
    };
    const judge = opts.judge ?? 'reference';
    if (judge !== 'reference' && judge !== 'reward-model') throw new TrainerError(`evaluation judge must be "reference" or "reward-model", got ${String(judge)}`);
    if (judge === 'reward-model' && !this.models.rewardModel) throw new TrainerError('evaluation by the reward model needs one: load a reward model (a LlamaForSequenceClassification checkpoint) first, or judge with the reference model');
    const base = await answer(false, ROLE.evalBase);
    const tuned = await answer(true, ROLE.evalAdapter);
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
    this.lora.enabled = false;
    let verdicts: string[];
    try {
      const gen = await generate(gpu, w, this.lora, { prompt: judgePrompts, G: 1, maxNewTokens: opts.judgeMaxTokens ?? c.rewards.judge.maxTokens, temperature: 0, seed: deriveSeed(c.seed, this.iteration, ROLE.evalJudge), stopTokens: eos });
      verdicts = gen.answers.map((a) => this.decode(a.tokens));
    } finally {
      this.lora.enabled = true;
    }
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

/** A completion batch whose scored rows are listed once (`flat`), with each sequence's positions in that list. */
function scoredBatch(seqs: Completion[], V: number): { batch: TokenBatch; rows: number[][]; flat: number[] } {
  const { batch, rows } = completionBatch(seqs, V);
  const flat: number[] = [];
  const at = rows.map((r) => r.map((row) => flat.push(row) - 1));
  return { batch, rows: at, flat };
}

function temperatureOf(c: TrainerConfig): number {
  // Log-probs are taken at the sampling temperature (TRL's convention); greedy sampling scores plain logits.
  return c.temperature > 0 ? c.temperature : 1;
}

async function readPair(gpu: Gpu, a: Tensor, b: Tensor): Promise<[Float32Array, Float32Array]> {
  const n = a.size;
  const both = gpu.empty([2 * n], 'f32', 'selfplay.readback');
  gpu.copy(a, both, n * 4, 0, 0);
  gpu.copy(b, both, n * 4, 0, n * 4);
  const v = await gpu.readF32(both);
  both.release();
  return [v.subarray(0, n), v.subarray(n, 2 * n)];
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
