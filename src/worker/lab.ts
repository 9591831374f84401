/**
 * The lab as the worker runs it: one GPU device, at most one loaded model and one
 * self-play run. It answers the protocol's commands and reports everything else as
 * events. GPU work is serialised (a step, an export and an evaluation never overlap);
 * pausing lets the iteration in flight finish, then stops.
 */
import { FormatError } from '../formats/errors';
import type { Gpu } from '../gpu/gpu';
import { cachedModelSource, type ModelCache } from '../model/cache';
import { findCachedModel, loadLlama, readModelConfigs, type LoadedModel, type LoadProgress } from '../model/load';
import { generate } from '../model/generate';
import type { InferenceLora } from '../model/infer';
import type { PeftInput } from '../model/lora';
import { formatMemoryPlan } from '../model/memory';
import type { ModelSource } from '../model/source';
import { loadTokenizer, type ChatTokenizer } from '../model/tokenizer';
import { DEFAULT_CONFIG, makeConfig, type TrainerConfig } from '../selfplay/config';
import { CustomReward, summarizeFailures, type CustomRewardSpec, type RewardHook, type SandboxFactory } from '../selfplay/custom-reward';
import { parseExam, type ExamProblem } from '../selfplay/exam';
import { gameMatches, SEARCH_LIMIT, type GameQuery, type GameSearchResult } from '../selfplay/games-log';
import { reportFiles } from '../selfplay/report';
import type { EvaluationJudge, EvaluationResult, GameRecord, IterationMetrics, RunFiles, RunStore, TrainerEvent } from '../selfplay/types';
import { modelLabel, planSettingsFor } from './catalog';
import { CachedOnlySource, checkRunFits, downloadBytes, parameterCount, planFor, refFor, sourceFor } from './models';
import {
  errorInfo,
  type Args,
  type CachedModelInfo,
  type CapabilityReport,
  type ChatAnswer,
  type CommandKind,
  type ErrorContext,
  type LabEvent,
  type ModelInfo,
  type ModelRef,
  type Result,
  type RunInfo,
  type RunState,
  type SavedRunInfo,
  type WeightFormat,
} from './protocol';

/** The trainer as the lab drives it (src/selfplay/trainer.ts's SelfPlayTrainer). */
export interface Trainer {
  readonly config: TrainerConfig;
  iteration: number;
  history: IterationMetrics[];
  games: GameRecord[];
  onEvent: (e: TrainerEvent) => void;
  /** One iteration; aborting `signal` ends it early, discarded, with the trainer as it was before. */
  step(opts?: { signal?: AbortSignal }): Promise<IterationMetrics>;
  checkpoint(): Promise<void>;
  exportFiles(): Promise<RunFiles>;
  importAdapter(files: PeftInput): void;
  evaluate(opts?: { instructions?: string[]; maxTokens?: number; judge?: EvaluationJudge }): Promise<EvaluationResult>;
  release(): void;
  /** The user's own reward, scored from the next iteration on (null: none). */
  customReward?: RewardHook | null;
  /** The run's adapter, for chat (absent: chat answers with the base model only). */
  readonly lora?: InferenceLora;
  /** The held-out exam the model's folder ships (exam.json), run every config.examEvery iterations. */
  exam?: ExamProblem[] | null;
  /** The whole game history when `games` holds only the newest (games-log.ts); absent: `games` is all of it. */
  readonly gamesTotal?: number;
  searchGames?(q: GameQuery): Promise<GameSearchResult>;
  allGames?(): Promise<GameRecord[]>;
}

/** Search over games in memory only (a trainer without a games log). */
function searchInMemory(games: readonly GameRecord[], q: GameQuery): GameSearchResult {
  const all = games.filter((g) => gameMatches(g, q)).reverse();
  return { games: all.slice(0, q.limit ?? SEARCH_LIMIT), total: all.length, searched: games.length };
}

export interface TrainerModels {
  gpu: Gpu;
  model: LoadedModel;
  tokenizer: ChatTokenizer;
  rewardModel?: { model: LoadedModel; tokenizer: ChatTokenizer };
}

export interface TrainerFactory {
  start(models: TrainerModels, config: TrainerConfig, opts: { store?: RunStore; adapter?: PeftInput; onEvent?: (e: TrainerEvent) => void }): Promise<Trainer>;
  resume(models: TrainerModels, store: RunStore, opts: { onEvent?: (e: TrainerEvent) => void }): Promise<Trainer | null>;
}

/** Where the run's small description lives next to its checkpoint (which model, which format). */
export interface RunMetaStore {
  load(): Promise<SavedRunInfo | null>;
  save(info: SavedRunInfo): Promise<void>;
  clear(): Promise<void>;
}

export interface LabEnvironment {
  acquireGpu(): Promise<Gpu>;
  /** The model cache (OPFS in the browser); null where there is none. */
  modelCache(): Promise<ModelCache | null>;
  /** The store the current run checkpoints to. */
  runStore(): Promise<RunStore>;
  runMeta: RunMetaStore;
  trainers: TrainerFactory;
  /** Where the user's own reward runs (a sandboxed worker); absent: custom rewards are refused with a reason. */
  rewardSandbox?: SandboxFactory;
}

const EXAM_FILE = 'exam.json';

interface Loaded {
  model: LoadedModel;
  tokenizer: ChatTokenizer;
  ref: ModelRef;
  format: WeightFormat;
  info: ModelInfo;
  /** The model folder's exam.json, when it has one. */
  exam: ExamProblem[] | null;
}

/** Progress of a download with its rate over the last few seconds. */
class RateMeter {
  private samples: { t: number; bytes: number }[] = [];
  private lastEmit = 0;

  constructor(private readonly windowMs = 4000) {}

  /** Bytes per second, or 0 until two samples exist. */
  add(bytes: number, now = Date.now()): number {
    this.samples.push({ t: now, bytes });
    while (this.samples.length > 2 && now - this.samples[0]!.t > this.windowMs) this.samples.shift();
    const first = this.samples[0]!;
    const dt = (now - first.t) / 1000;
    return dt > 0 ? (bytes - first.bytes) / dt : 0;
  }

  /** At most every `ms` milliseconds (and always for the last update). */
  due(now = Date.now(), ms = 100): boolean {
    if (now - this.lastEmit < ms) return false;
    this.lastEmit = now;
    return true;
  }
}

export class Lab {
  private gpu: Gpu | null = null;
  private capabilities: CapabilityReport | null = null;
  private checking: Promise<CapabilityReport> | null = null;
  private loaded: Loaded | null = null;
  /** Cancels the model load in flight (cancelLoad). */
  private loadAbort: AbortController | null = null;
  private rewardModel: Loaded | null = null;
  private trainer: Trainer | null = null;
  private store: RunStore | null = null;
  private pending: TrainerConfig = DEFAULT_CONFIG;
  private state: RunState = 'idle';
  /** GPU work in order: each step, export, import and evaluation waits for the one before. */
  private queue: Promise<unknown> = Promise.resolve();
  private loop: Promise<void> | null = null;
  /** Aborts the step in flight (Stop now). */
  private stepAbort: AbortController | null = null;
  private chatId = 0;
  /** Iterations Stop now discarded (to tell stopNow's caller whether one was). */
  private discarded = 0;
  /** The user's own reward, compiled in its sandbox; used by the current and later runs. */
  private customReward: CustomReward | null = null;

  constructor(
    private readonly env: LabEnvironment,
    private readonly emit: (e: LabEvent) => void,
  ) {}

  async handle<K extends CommandKind>(kind: K, args: Args<K>): Promise<Result<K>> {
    const handler = this.handlers[kind] as (a: Args<K>) => Promise<Result<K>>;
    if (!handler) throw new Error(`unknown command ${String(kind)}`);
    return handler(args);
  }

  private readonly handlers: { [K in CommandKind]: (args: Args<K>) => Promise<Result<K>> } = {
    check: async () => ({ capabilities: await this.check(), savedRun: await this.savedRun(), cached: await this.listCached() }),
    planModel: async ({ model, token, settings }) => {
      const gpu = await this.requireGpu();
      const source = sourceFor(model, token);
      // A cached model is planned from its cached config: nothing read from the network.
      const { config } = await this.readConfigs(source, settings.format, true);
      const plan = planFor(config, settings, gpu.caps);
      return {
        label: modelLabel(model),
        architecture: config.architecture,
        layers: config.numLayers,
        hiddenSize: config.hiddenSize,
        vocabSize: config.vocabSize,
        parameters: parameterCount(config),
        downloadBytes: downloadBytes(config, model),
        plan,
        planLines: formatMemoryPlan(plan),
      };
    },
    loadModel: async ({ model, token, format, useCache }) => {
      await this.stopLoop();
      const source = sourceFor(model, token);
      return (await this.load(source, refFor(model, source), format, useCache)).info;
    },
    loadRewardModel: async ({ model, token, format, useCache }) => {
      const source = sourceFor(model, token);
      return (await this.loadReward(source, refFor(model, source), format, useCache)).info;
    },
    unloadRewardModel: async () => {
      if (this.trainer?.config.rewards.rewardModel.enabled) throw new Error('The run in progress scores with this reward model: reset the run (or start one without it) first.');
      await this.serial(async () => {
        this.rewardModel?.model.weights.release();
        this.rewardModel = null;
      });
      this.emit({ type: 'reward-model', info: null });
      return { ok: true as const };
    },
    start: async ({ config }) => {
      const cfg = makeConfig(config);
      await this.stopLoop();
      await this.newRun(cfg);
      this.runLoop(Infinity);
      return this.runInfo();
    },
    pause: async () => {
      if (this.state === 'running') this.setState('pausing');
      await this.loop;
      return { iteration: this.trainer?.iteration ?? 0 };
    },
    chat: async ({ messages, adapter, maxTokens = 256, temperature = 0 }) => {
      if (this.state === 'running' || this.state === 'pausing') throw new Error('An iteration is running on the GPU: pause the run (or press Stop now), then chat; the chat answers from the adapter as it is then.');
      const loaded = this.loaded;
      const gpu = this.gpu;
      if (!loaded || !gpu) throw new Error('No model is loaded: load one on the start screen first.');
      if (messages.length === 0 || messages.at(-1)!.role !== 'user') throw new Error('The chat needs a user message to answer.');
      if (!(Number.isInteger(maxTokens) && maxTokens >= 1 && maxTokens <= 4096)) throw new Error(`maxTokens must be a whole number from 1 to 4096, got ${maxTokens}`);
      const lora = this.trainer?.lora ?? null;
      if (adapter !== 'off' && !lora) throw new Error('There is no adapter yet: start a run or import an adapter to chat with it; "adapter off" answers with the base model.');
      const sides = adapter === 'both' ? [true, false] : [adapter === 'on'];
      const id = ++this.chatId;
      const tok = loaded.tokenizer;
      const prompt = tok.applyChatTemplate(messages, { addGenerationPrompt: true });
      return this.serial(async () => {
        const answers: ChatAnswer[] = [];
        for (const on of sides) {
          const ids: number[] = [];
          let sent = '';
          const t0 = performance.now();
          const rate = () => ids.length / Math.max(1e-3, (performance.now() - t0) / 1000);
          const before = lora?.enabled ?? true;
          if (lora) lora.enabled = true;
          try {
            const gen = await generate(gpu, loaded.model.weights, on ? lora : null, {
              prompt, G: 1, maxNewTokens: maxTokens, temperature, seed: id, stopTokens: tok.eosTokenIds,
              onToken: (_row, t) => {
                ids.push(t);
                const text = tok.decode(ids, { skipSpecialTokens: true }).replace(/\uFFFD+$/, '');
                if (text.length > sent.length && text.startsWith(sent)) {
                  this.emit({ type: 'chat-token', id, adapter: on, delta: text.slice(sent.length), tokens: ids.length, tokensPerSecond: rate() });
                  sent = text;
                }
              },
            });
            const a = gen.answers[0]!;
            const seconds = (performance.now() - t0) / 1000;
            answers.push({ adapter: on, text: tok.decode(a.tokens, { skipSpecialTokens: true }), tokens: a.tokens.length, seconds, tokensPerSecond: a.tokens.length / Math.max(1e-3, seconds), finishReason: a.finishReason });
          } finally {
            if (lora) lora.enabled = before;
          }
        }
        return { id, answers };
      });
    },
    stopNow: async () => {
      const abort = this.stepAbort;
      const inFlight = abort !== null && (this.state === 'running' || this.state === 'pausing');
      if (inFlight) {
        this.setState('pausing');
        abort.abort(new DOMException('Stopped by the user: the iteration in flight was discarded.', 'AbortError'));
      }
      const before = this.discarded;
      await this.loop;
      return { iteration: this.trainer?.iteration ?? 0, discarded: this.discarded > before };
    },
    resume: async () => {
      if (!this.trainer) throw new Error('There is no run to resume: start one first.');
      if (this.state !== 'running' && this.state !== 'pausing') this.runLoop(Infinity);
      else this.setState('running');
      return { iteration: this.trainer.iteration };
    },
    step: async ({ config }) => {
      if (this.state === 'running' || this.state === 'pausing') throw new Error('The run is already going: pause it before stepping one iteration at a time.');
      if (!this.trainer) await this.newRun(makeConfig(config ?? this.pending));
      this.runLoop(1);
      await this.loop;
      return { iteration: this.trainer?.iteration ?? 0 };
    },
    updateSettings: async ({ config }) => {
      this.pending = makeConfig(config);
      return { config: this.pending, appliesNow: false };
    },
    exportRun: async () => {
      const trainer = this.requireTrainer();
      const files = await this.serial(() => trainer.exportFiles());
      const games = (await trainer.allGames?.()) ?? trainer.games;
      for (const [name, bytes] of reportFiles(games, trainer.history)) files.set(name, bytes);
      return { files: [...files].map(([name, bytes]) => ({ name, bytes: bytes.slice().buffer as ArrayBuffer })) };
    },
    importAdapter: async ({ files, config }) => {
      const peft = peftInput(files);
      if (this.trainer) {
        const trainer = this.trainer;
        await this.serial(async () => trainer.importAdapter(peft));
      } else {
        await this.newRun(makeConfig(config ?? this.pending), peft);
      }
      return this.runInfo();
    },
    evaluate: async (opts) => {
      const trainer = this.requireTrainer();
      return this.serial(() => trainer.evaluate(opts));
    },
    resumeSaved: async ({ token, files }) => this.resumeSaved(token, files),
    resetRun: async () => {
      await this.stopLoop();
      await this.serial(async () => {
        this.trainer?.release();
        this.trainer = null;
        const store = this.store ?? (await this.env.runStore());
        await store.clear();
        await this.env.runMeta.clear();
      });
      this.setState('idle');
      this.emit({ type: 'run-reset', config: null });
      this.emit({ type: 'saved-run', info: null });
      return { ok: true as const };
    },
    listCached: async () => this.listCached(),
    cancelLoad: async () => {
      const abort = this.loadAbort;
      abort?.abort();
      return { cancelled: abort !== null };
    },
    deleteCached: async ({ key }) => {
      const cache = await this.env.modelCache();
      await cache?.delete(key);
      return this.listCached();
    },
    // Not serialised with GPU work: it reads only complete chunks of the games log, so a search answers while a run steps.
    searchGames: async (q) => {
      const t = this.trainer;
      if (!t) return { games: [], total: 0, searched: 0 };
      return t.searchGames ? t.searchGames(q) : searchInMemory(t.games, q);
    },
    setCustomReward: async ({ spec }) => {
      await this.setCustomReward(spec);
      if (this.trainer) await this.saveMeta(this.trainer.iteration);
      return { name: this.customReward?.name ?? null };
    },
    tryCustomReward: async ({ spec, query, answer }) => {
      const r = await CustomReward.create(spec, this.requireSandbox());
      try {
        return await r.call(query, answer);
      } finally {
        r.release();
      }
    },
  };

  // ---- device ---------------------------------------------------------------------

  private check(): Promise<CapabilityReport> {
    // One device per lab, however many checks arrive at once (React runs effects twice in development).
    if (this.capabilities && (this.gpu || this.capabilities.error)) return Promise.resolve(this.capabilities);
    this.checking ??= this.acquire().finally(() => (this.checking = null));
    return this.checking;
  }

  private async acquire(): Promise<CapabilityReport> {
    try {
      const gpu = await this.env.acquireGpu();
      this.gpu = gpu;
      gpu.onLost((err) => this.deviceLost(err));
      this.capabilities = { caps: gpu.caps, error: null, notes: gpu.caps.missing };
    } catch (e) {
      this.capabilities = { caps: null, error: errorInfo(e).message, notes: [] };
    }
    this.emit({ type: 'capabilities', report: this.capabilities });
    return this.capabilities;
  }

  private async requireGpu(): Promise<Gpu> {
    const report = await this.check();
    if (!this.gpu) throw new Error(report.error ?? 'No GPU device.');
    return this.gpu;
  }

  private deviceLost(err: Error): void {
    // Everything on the device is gone; the checkpoint in storage is not.
    const inFlight = this.trainer !== null && (this.state === 'running' || this.state === 'pausing');
    this.gpu = null;
    this.capabilities = null;
    this.trainer = null;
    this.loaded = null;
    this.rewardModel = null;
    this.loop = null;
    this.queue = Promise.resolve();
    this.setState('idle');
    this.emit({ type: 'model-unloaded', reason: err.message });
    this.emit({ type: 'reward-model', info: null });
    // What to do next depends on the saved run: name its iteration and how to continue it.
    void this.savedRun().then((info) => {
      const run = info
        ? ` Your run is saved at iteration ${info.iteration}${inFlight ? ' (the iteration in flight is lost)' : ''}: "Resume saved run" on the start screen continues it from there.`
        : '';
      this.emit({ type: 'error', context: 'gpu', error: { ...errorInfo(err), message: err.message + run }, runPreserved: true });
      this.emit({ type: 'saved-run', info });
    });
  }

  // ---- models ---------------------------------------------------------------------

  private async load(source: ModelSource, ref: ModelRef, format: WeightFormat, useCache: boolean): Promise<Loaded> {
    await this.requireGpu();
    const previous = this.loaded?.info.label ?? null;
    await this.serial(async () => {
      this.trainer?.release();
      this.trainer = null;
      this.loaded?.model.weights.release();
      this.loaded = null;
    });
    // The page stops showing the old model and run: if this load fails or is cancelled, neither is there any more (the checkpoint in storage is).
    if (previous) this.emit({ type: 'model-unloaded', reason: `${previous} was unloaded to load ${modelLabel(ref)}.` });
    this.setState('idle');
    this.loaded = await this.loadWeights(source, ref, format, useCache, 'policy');
    this.emit({ type: 'model-loaded', info: this.loaded.info });
    return this.loaded;
  }

  private async loadReward(source: ModelSource, ref: ModelRef, format: WeightFormat, useCache: boolean): Promise<Loaded> {
    await this.requireGpu();
    const { config } = await this.readConfigs(source, format, useCache);
    if (config.architecture !== 'LlamaForSequenceClassification') {
      throw new Error(`${modelLabel(ref)} is a ${config.architecture}, not a reward model: pick a LlamaForSequenceClassification checkpoint such as Skywork/Skywork-Reward-V2-Llama-3.2-1B.`);
    }
    const loaded = await this.loadWeights(source, ref, format, useCache, 'reward');
    await this.serial(async () => {
      this.rewardModel?.model.weights.release();
      this.rewardModel = loaded;
    });
    this.emit({ type: 'reward-model', info: loaded.info });
    return loaded;
  }

  /**
   * config.json and generation_config.json, from the model cache when the model is
   * there (so a cached model loads with no network and no dropped files), else from
   * the source.
   */
  private async readConfigs(source: ModelSource, format: WeightFormat, useCache: boolean): ReturnType<typeof readModelConfigs> {
    const cache = useCache ? await this.env.modelCache().catch(() => null) : null;
    const entry = cache ? await findCachedModel(cache, source, { format }).catch(() => null) : null;
    return readModelConfigs(entry ? cachedModelSource(entry) : source);
  }

  /** Weights and tokenizer onto the GPU, with progress; the policy needs a chat template. */
  private async loadWeights(source: ModelSource, ref: ModelRef, format: WeightFormat, useCache: boolean, role: 'policy' | 'reward'): Promise<Loaded> {
    const gpu = await this.requireGpu();
    const label = modelLabel(ref);
    // cancelLoad aborts this load from here on (loadLlama stops between reads).
    const abort = new AbortController();
    this.loadAbort?.abort();
    this.loadAbort = abort;
    this.emit({ type: 'load-progress', phase: 'config', file: 'config.json', bytesDone: 0, bytesTotal: 0, rate: 0, etaSeconds: null });
    const { config } = await this.readConfigs(source, format, useCache);
    if (role === 'policy') {
      const plan = planFor(config, planSettingsFor(this.pending, format), gpu.caps);
      this.emit({ type: 'memory-plan', plan, lines: formatMemoryPlan(plan) });
      const tooLarge = plan.problems.find((p) => p.kind === 'buffer-too-large');
      if (tooLarge) throw new Error(`${tooLarge.message} ${tooLarge.fix}`);
    }
    const meter = new RateMeter();
    const onProgress = (p: LoadProgress) => {
      const rate = meter.add(p.bytesDone);
      if (!meter.due() && p.bytesDone < p.bytesTotal) return;
      const eta = rate > 0 ? (p.bytesTotal - p.bytesDone) / rate : null;
      this.emit({ type: 'load-progress', phase: p.phase, file: p.file, bytesDone: p.bytesDone, bytesTotal: p.bytesTotal, rate, etaSeconds: eta });
    };
    const cache = useCache ? await this.env.modelCache().catch(() => null) : null;
    const model = await this.serial(() => loadLlama(gpu, source, { format, onProgress, cache, signal: abort.signal })).finally(() => {
      if (this.loadAbort === abort) this.loadAbort = null;
    });
    this.emit({ type: 'load-progress', phase: 'tokenizer', file: 'tokenizer.json', bytesDone: 0, bytesTotal: 0, rate: 0, etaSeconds: null });
    let tokenizer: ChatTokenizer;
    try {
      tokenizer = await loadTokenizer(model.files, model.weights.config.vocabSize);
    } catch (e) {
      model.weights.release();
      throw e;
    }
    if (role === 'policy' && !tokenizer.hasChatTemplate) {
      model.weights.release();
      throw new Error(`${label} has no chat template, so it cannot play the Challenger and Solver roles. Pick an instruction-tuned (chat) model, e.g. one whose name ends in -Instruct.`);
    }
    const cfg = model.weights.config;
    const info: ModelInfo = {
      label,
      format,
      fromCache: model.fromCache,
      cacheNote: model.cacheError ? model.cacheError.message : null,
      layers: cfg.numLayers,
      hiddenSize: cfg.hiddenSize,
      vocabSize: cfg.vocabSize,
      gpuBytes: model.weights.bytes,
      hasChatTemplate: tokenizer.hasChatTemplate,
      examProblems: 0,
    };
    // A model read from the cache reads nothing from the network, not even to look for an exam.
    const exam = role === 'policy' ? await this.readExam(model.files, model.fromCache ? model.files : source) : null;
    info.examProblems = exam?.length ?? 0;
    this.emit({ type: 'load-progress', phase: 'done', file: '', bytesDone: 1, bytesTotal: 1, rate: 0, etaSeconds: 0 });
    return { model, tokenizer, ref, format, info, exam };
  }

  /**
   * The held-out exam a model folder may ship (exam.json, as models/micro-arith does),
   * from the loaded files or else the original source (the cache keeps only what the
   * engine loads). A folder without one has none; a damaged one is reported and the
   * model works without an exam.
   */
  private async readExam(files: ModelSource, source: ModelSource): Promise<ExamProblem[] | null> {
    for (const s of files === source ? [files] : [files, source]) {
      let present = false;
      try {
        present = await s.has(EXAM_FILE);
      } catch {
        continue; // e.g. the hub unreachable for a cached model: no exam from there
      }
      if (!present) continue;
      try {
        return parseExam(await s.readJson(EXAM_FILE), `${s.name}/${EXAM_FILE}`).problems;
      } catch (e) {
        this.emit({ type: 'error', context: 'load', error: errorInfo(e), runPreserved: true });
        return null;
      }
    }
    return null;
  }

  private async listCached(): Promise<CachedModelInfo[]> {
    const cache = await this.env.modelCache().catch(() => null);
    if (!cache) return [];
    const list = await cache.list();
    return list.map((m) => ({ key: m.key, source: m.source, revision: m.revision, format: m.format, bytes: m.bytes, createdAt: m.createdAt }));
  }

  // ---- runs -----------------------------------------------------------------------

  private models(): TrainerModels {
    const gpu = this.gpu;
    if (!gpu || !this.loaded) throw new Error('No model is loaded: load one on the start screen first.');
    const rm = this.rewardModel;
    return { gpu, model: this.loaded.model, tokenizer: this.loaded.tokenizer, ...(rm ? { rewardModel: { model: rm.model, tokenizer: rm.tokenizer } } : {}) };
  }

  private requireTrainer(): Trainer {
    if (!this.trainer) throw new Error('There is no run yet: start one (or import an adapter) first.');
    return this.trainer;
  }

  private onTrainerEvent = (e: TrainerEvent): void => {
    this.emit(e);
    if (e.type === 'checkpoint') void this.saveMeta(e.iteration);
  };

  private async newRun(config: TrainerConfig, adapter?: PeftInput): Promise<void> {
    const models = this.models();
    await this.serial(async () => {
      const store = (this.store ??= await this.env.runStore());
      // The memory check on the device: a run that cannot fit is refused with the settings that do, before it can lose the device.
      const fit = await checkRunFits(models.gpu, models.model.weights.config, config, this.loaded!.format);
      this.emit({ type: 'memory-plan', plan: fit.plan, lines: formatMemoryPlan(fit.plan) });
      if (!fit.ok) throw new Error(fit.message!);
      // The new run first: if it cannot start (bad settings, no reward model), the old one is untouched.
      const next = await this.env.trainers.start(models, config, { store, adapter, onEvent: this.onTrainerEvent });
      this.trainer?.release();
      this.trainer = next;
      next.customReward = this.customReward;
      next.exam = this.loaded!.exam;
      this.pending = config;
      // Before any event of the new run: the page drops the old run's games and metrics.
      this.emit({ type: 'run-reset', config: next.config });
      await store.clear();
    });
    await this.saveMeta(this.trainer!.iteration);
    this.setState('paused');
  }

  private async saveMeta(iteration: number): Promise<void> {
    if (!this.loaded || !this.trainer) return;
    const info: SavedRunInfo = {
      model: this.loaded.ref,
      modelLabel: this.loaded.info.label,
      format: this.loaded.format,
      rewardModel: this.trainer.config.rewards.rewardModel.enabled && this.rewardModel ? { model: this.rewardModel.ref, format: this.rewardModel.format } : null,
      iteration,
      savedAt: new Date().toISOString(),
      config: this.trainer.config,
      customReward: this.customReward?.spec ?? null,
    };
    try {
      await this.env.runMeta.save(info);
      this.emit({ type: 'saved-run', info });
    } catch (e) {
      this.emit({ type: 'error', context: 'storage', error: errorInfo(e), runPreserved: true });
    }
  }

  private async savedRun(): Promise<SavedRunInfo | null> {
    try {
      return await this.env.runMeta.load();
    } catch {
      return null;
    }
  }

  private async resumeSaved(token?: string, files?: { path: string; file: File }[]): Promise<RunInfo> {
    const saved = await this.savedRun();
    if (!saved) throw new Error('There is no saved run in this browser.');
    await this.stopLoop();
    const ref = saved.model;
    let source: ModelSource;
    if (ref.kind === 'files') {
      if (files && files.length > 0) {
        source = sourceFor({ kind: 'files', name: ref.name, files }, token);
      } else {
        source = new CachedOnlySource(ref.name, ref.revision);
      }
    } else {
      source = sourceFor(ref, token);
    }
    this.pending = saved.config;
    await this.load(source, ref, saved.format, true);
    if (saved.rewardModel && saved.config.rewards.rewardModel.enabled) {
      const rm = saved.rewardModel.model;
      const rmSource = rm.kind === 'files' ? new CachedOnlySource(rm.name, rm.revision) : sourceFor(rm, token);
      await this.loadReward(rmSource, rm, saved.rewardModel.format, true);
    }
    const models = this.models();
    const store = (this.store ??= await this.env.runStore());
    const trainer = await this.serial(() => this.env.trainers.resume(models, store, { onEvent: this.onTrainerEvent }));
    if (!trainer) throw new Error('The saved run has no checkpoint to continue from (it was saved before its first iteration finished). Start a new run.');
    this.trainer = trainer;
    trainer.exam = this.loaded!.exam;
    if (saved.customReward && this.env.rewardSandbox) {
      try {
        await this.setCustomReward(saved.customReward);
      } catch (e) {
        this.emit({ type: 'error', context: 'settings', error: errorInfo(e), runPreserved: true });
      }
    } else trainer.customReward = this.customReward;
    this.setState('paused');
    return this.runInfo();
  }

  private runInfo(): RunInfo {
    const t = this.requireTrainer();
    return { iteration: t.iteration, config: t.config, history: t.history.slice(), games: t.games.slice(), gamesTotal: t.gamesTotal ?? t.games.length };
  }

  private setState(state: RunState): void {
    this.state = state;
    this.emit({ type: 'run-state', state, iteration: this.trainer?.iteration ?? 0 });
  }

  /** Steps until `count` iterations ran, the run is paused, or a step fails. */
  private runLoop(count: number): void {
    const trainer = this.requireTrainer();
    this.setState('running');
    const loop = (async () => {
      for (let done = 0; done < count && this.state === 'running' && this.trainer === trainer; done++) {
        const abort = new AbortController();
        this.stepAbort = abort;
        try {
          await this.serial(() => trainer.step({ signal: abort.signal }));
        } catch (e) {
          if (this.trainer !== trainer) return;
          if (abort.signal.aborted) {
            this.discarded++;
            this.emit({ type: 'iteration-discarded', iteration: trainer.iteration });
            break;
          }
          const info = errorInfo(e);
          const context: ErrorContext = /storage|quota/i.test(info.message) ? 'storage' : 'run';
          // A checkpoint that could not be saved: the iteration it would have kept lives on in this tab.
          if (context === 'storage') {
            info.message += ` The run stays here at iteration ${trainer.iteration}: once there is space, the next iteration's checkpoint (Step or Resume) saves it, and Export keeps its adapter now.`;
          }
          this.emit({ type: 'error', context, error: info, runPreserved: true });
          break;
        }
      }
      this.stepAbort = null;
      if (this.trainer === trainer) this.setState('paused');
    })();
    this.loop = loop;
  }

  private async stopLoop(): Promise<void> {
    if (this.state === 'running') this.setState('pausing');
    await this.loop;
    this.loop = null;
  }

  private requireSandbox(): SandboxFactory {
    const f = this.env.rewardSandbox;
    if (!f) throw new Error('This lab has no sandbox to run a reward function in (it needs Web Workers).');
    return f;
  }

  /** Compiles the user's reward (or drops it), then swaps it in between iterations. */
  private async setCustomReward(spec: CustomRewardSpec | null): Promise<void> {
    const next = spec ? await CustomReward.create(spec, this.requireSandbox()) : null;
    if (next) {
      next.onFailures = (failures) =>
        this.emit({ type: 'custom-reward', iteration: this.trainer?.iteration ?? 0, message: summarizeFailures(next.name, failures, next.spec.fallback), fallbacks: failures.length });
    }
    await this.serial(async () => {
      this.customReward?.release();
      this.customReward = next;
      if (this.trainer) this.trainer.customReward = next;
    });
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.queue.then(fn, fn);
    this.queue = next.catch(() => undefined);
    return next;
  }
}

/** adapter_config.json and adapter_model.safetensors from picked files (other files are ignored). */
export function peftInput(files: readonly { name: string; bytes: ArrayBuffer }[]): PeftInput {
  const byName = new Map(files.map((f) => [f.name.split('/').pop()!, f.bytes]));
  const config = byName.get('adapter_config.json');
  const weights = byName.get('adapter_model.safetensors');
  const names = files.map((f) => f.name).join(', ') || 'none';
  if (!config) throw new FormatError('adapter_config.json', null, `was not among the picked files (${names})`, 'Pick both adapter_config.json and adapter_model.safetensors of a PEFT LoRA adapter.');
  if (!weights) throw new FormatError('adapter_model.safetensors', null, `was not among the picked files (${names})`, 'Pick both adapter_config.json and adapter_model.safetensors of a PEFT LoRA adapter (adapter_model.bin is not supported).');
  return { 'adapter_config.json': new Uint8Array(config), 'adapter_model.safetensors': new Uint8Array(weights) };
}
