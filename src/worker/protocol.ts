/**
 * The whole message protocol between the page and the lab's worker (which owns the
 * GPU device, the model and the trainer).
 *
 * Requests: { id, kind, args } with `kind` a key of Commands; the worker answers each
 * with { type: 'return', id, result } or { type: 'throw', id, error }. Everything else
 * the worker says is an event: { type: 'event', event: LabEvent }. Bulk bytes (exported
 * files) cross as transferable ArrayBuffers.
 */
import type { GpuCapabilities } from '../gpu/gpu';
import type { MemoryPlan } from '../model/memory';
import type { DeepPartial, TrainerConfig } from '../selfplay/config';
import type { CustomRewardSpec, SandboxReply } from '../selfplay/custom-reward';
import type { GameQuery, GameSearchResult } from '../selfplay/games-log';
import type { EvaluationJudge, EvaluationResult, GameRecord, IterationMetrics, TrainerEvent } from '../selfplay/types';

/** Where a model comes from, in a form that can cross to the worker and be saved with a run. */
export type ModelChoice =
  | { kind: 'hub'; id: string; revision?: string }
  | { kind: 'served'; folder: string }
  /** Dropped or picked files; `path` relative to the dropped folder. */
  | { kind: 'files'; name: string; files: { path: string; file: File }[] };

/** A ModelChoice without the File objects: what a saved run remembers. */
export type ModelRef =
  | { kind: 'hub'; id: string; revision?: string }
  | { kind: 'served'; folder: string }
  | { kind: 'files'; name: string; revision: string };

export type WeightFormat = 'q4' | 'f32';

/** The run shape the memory plan is computed for (the trainer settings that size GPU buffers). */
export interface PlanSettings {
  format: WeightFormat;
  loraRank: number;
  loraTargets: TrainerConfig['lora']['targets'];
  groupSize: number;
  maxPromptTokens: number;
  maxNewTokens: number;
  /** Rows of one training forward/backward: micro-batch sequences of prompt plus completion. */
  trainTokensPerStep: number;
}

/** Why a device cannot run the lab, or what it will run slower; plain words. */
export interface CapabilityReport {
  caps: GpuCapabilities | null;
  /** Blocking: no WebGPU, no adapter. */
  error: string | null;
  /** Not blocking: features this device lacks and what that costs. */
  notes: string[];
}

export interface SavedRunInfo {
  model: ModelRef;
  modelLabel: string;
  format: WeightFormat;
  /** The reward model the run scored with (rewards.rewardModel), loaded again on resume. */
  rewardModel?: { model: ModelRef; format: WeightFormat } | null;
  iteration: number;
  savedAt: string;
  config: TrainerConfig;
  /** The user's own reward the run scored with (set again on resume). */
  customReward?: CustomRewardSpec | null;
}

export interface CachedModelInfo {
  key: string;
  source: string;
  revision: string | null;
  format: string;
  bytes: number;
  createdAt: string;
}

export interface ModelInfo {
  label: string;
  format: WeightFormat;
  fromCache: boolean;
  /** Why the cache could not be used (the model loaded regardless). */
  cacheNote: string | null;
  layers: number;
  hiddenSize: number;
  vocabSize: number;
  gpuBytes: number;
  hasChatTemplate: boolean;
  /** Problems in the held-out exam the model folder ships (exam.json); 0 when it has none. */
  examProblems: number;
}

export interface ModelSummary {
  label: string;
  architecture: string;
  layers: number;
  hiddenSize: number;
  vocabSize: number;
  /** Parameters, from config.json's tensor shapes. */
  parameters: number;
  /** Bytes to download: parameters times the checkpoint's dtype size. */
  downloadBytes: number;
  plan: MemoryPlan;
  planLines: string[];
}

export interface RunInfo {
  iteration: number;
  config: TrainerConfig;
  history: IterationMetrics[];
  /** The newest games (at most MEMORY_GAMES); searchGames finds older ones. */
  games: GameRecord[];
  /** Games of the whole run (absent: `games` is all of them). */
  gamesTotal?: number;
}

export interface ChatAnswer {
  /** Whether the run's adapter was on (false: the base model). */
  adapter: boolean;
  text: string;
  tokens: number;
  seconds: number;
  tokensPerSecond: number;
  finishReason: string;
}

export interface ExportedFile {
  name: string;
  bytes: ArrayBuffer;
}

/** Requests the page sends, by kind: their arguments and what the worker returns. */
export interface Commands {
  /** Acquires the GPU (once) and reports what it can do, the saved run and the cached models. */
  check: { args: Record<string, never>; result: { capabilities: CapabilityReport; savedRun: SavedRunInfo | null; cached: CachedModelInfo[] } };
  /** Reads config.json only and plans GPU memory for a run shape. */
  planModel: { args: { model: ModelChoice; token?: string; settings: PlanSettings }; result: ModelSummary };
  loadModel: { args: { model: ModelChoice; token?: string; format: WeightFormat; useCache: boolean }; result: ModelInfo };
  /** A LlamaForSequenceClassification reward model beside the policy (for rewards.rewardModel). */
  loadRewardModel: { args: { model: ModelChoice; token?: string; format: WeightFormat; useCache: boolean }; result: ModelInfo };
  unloadRewardModel: { args: Record<string, never>; result: { ok: true } };
  /** Cancels the model download in flight (its partial cache entry is removed); false when none was running. */
  cancelLoad: { args: Record<string, never>; result: { cancelled: boolean } };
  /** Starts a new run with these settings (replacing the saved one) and keeps stepping until paused. */
  start: { args: { config: DeepPartial<TrainerConfig> }; result: RunInfo };
  /** Finishes the current iteration, then stops. */
  pause: { args: Record<string, never>; result: { iteration: number } };
  /**
   * Stop now: aborts the iteration in flight within one decode step and discards it (no update, no games,
   * no metrics); the run stays at its last finished iteration and checkpoint, paused.
   */
  stopNow: { args: Record<string, never>; result: { iteration: number; discarded: boolean } };
  /**
   * Chat with the loaded model: the answer streams as 'chat-token' events; adapter 'both' answers with the
   * run's adapter on, then off (the base model). Refused with the reason while an iteration runs.
   */
  chat: {
    args: { messages: { role: 'system' | 'user' | 'assistant'; content: string }[]; adapter: 'on' | 'off' | 'both'; maxTokens?: number; temperature?: number };
    result: { id: number; answers: ChatAnswer[] };
  };
  /** Keeps stepping the current run. */
  resume: { args: Record<string, never>; result: { iteration: number } };
  /** One iteration (starts a run with `config` when there is none). */
  step: { args: { config?: DeepPartial<TrainerConfig> }; result: { iteration: number } };
  /** Validates settings; they apply to the next run started. */
  updateSettings: { args: { config: DeepPartial<TrainerConfig> }; result: { config: TrainerConfig; appliesNow: boolean } };
  exportRun: { args: Record<string, never>; result: { files: ExportedFile[] } };
  importAdapter: { args: { files: ExportedFile[]; config?: DeepPartial<TrainerConfig> }; result: RunInfo };
  evaluate: { args: { instructions?: string[]; maxTokens?: number; judge?: EvaluationJudge }; result: EvaluationResult };
  /** Loads the saved run's model (from the cache when it is there) and continues the run where it was saved. */
  resumeSaved: { args: { token?: string; files?: { path: string; file: File }[] }; result: RunInfo };
  /** Drops the run in memory and the saved one. */
  resetRun: { args: Record<string, never>; result: { ok: true } };
  listCached: { args: Record<string, never>; result: CachedModelInfo[] };
  /**
   * The user's own reward (null: none): compiled in its sandbox (a source that does not load is refused
   * with the reason), then used by the current run from its next iteration and by runs started later.
   */
  setCustomReward: { args: { spec: CustomRewardSpec | null }; result: { name: string | null } };
  /** Calls a reward source once on (query, answer) in a fresh sandbox: its number, or why there is none. */
  tryCustomReward: { args: { spec: CustomRewardSpec; query: string; answer: string }; result: SandboxReply };
  deleteCached: { args: { key: string }; result: CachedModelInfo[] };
  /** Searches the run's whole game history (in memory and paged out to the run store), newest first. */
  searchGames: { args: GameQuery; result: GameSearchResult };
}

export type CommandKind = keyof Commands;
export type Args<K extends CommandKind> = Commands[K]['args'];
export type Result<K extends CommandKind> = Commands[K]['result'];

export type Request = { [K in CommandKind]: { id: number; kind: K; args: Args<K> } }[CommandKind];

export interface LoadProgressEvent {
  type: 'load-progress';
  phase: 'config' | 'weights' | 'cache-read' | 'cache-write' | 'tokenizer' | 'done';
  file: string;
  bytesDone: number;
  bytesTotal: number;
  /** Bytes per second over the last few seconds (0 at the start). */
  rate: number;
  /** Seconds left at that rate (null while unknown). */
  etaSeconds: number | null;
}

export type RunState = 'idle' | 'running' | 'pausing' | 'paused';

/** What made an error: shown with the message so the user knows what was affected. */
export type ErrorContext = 'gpu' | 'load' | 'run' | 'export' | 'import' | 'evaluate' | 'storage' | 'settings';

export interface ErrorInfo {
  name: string;
  message: string;
  /** The bad setting, for ConfigError. */
  field?: string;
}

export type LabEvent =
  | TrainerEvent
  | { type: 'capabilities'; report: CapabilityReport }
  | LoadProgressEvent
  | { type: 'memory-plan'; plan: MemoryPlan; lines: string[] }
  | { type: 'model-loaded'; info: ModelInfo }
  | { type: 'reward-model'; info: ModelInfo | null }
  | { type: 'model-unloaded'; reason: string }
  | { type: 'run-state'; state: RunState; iteration: number }
  /** The run in view is gone: replaced by a new run with `config`, or reset (null). */
  | { type: 'run-reset'; config: TrainerConfig | null }
  | { type: 'saved-run'; info: SavedRunInfo | null }
  /** Answers of one iteration that got the user's reward's fallback, and why (named reasons, counted in reward/custom_fallback_count). */
  | { type: 'custom-reward'; iteration: number; message: string; fallbacks: number }
  /** Stop now ended iteration `iteration` before its update; the run is as it was before it. */
  | { type: 'iteration-discarded'; iteration: number }
  /** New text of chat answer `id` (adapter on or off), with its decode rate so far. */
  | { type: 'chat-token'; id: number; adapter: boolean; delta: string; tokens: number; tokensPerSecond: number }
  | { type: 'error'; context: ErrorContext; error: ErrorInfo; runPreserved: boolean };

export type WorkerMessage =
  | { type: 'return'; id: number; result: unknown }
  | { type: 'throw'; id: number; error: ErrorInfo }
  | { type: 'event'; event: LabEvent };

export function errorInfo(e: unknown): ErrorInfo {
  if (e instanceof Error) {
    const field = (e as { field?: unknown }).field;
    return { name: e.name, message: e.message, ...(typeof field === 'string' ? { field } : {}) };
  }
  return { name: 'Error', message: String(e) };
}

/** An error from the worker, rebuilt on the page with its name kept. */
export class LabError extends Error {
  readonly field: string | undefined;
  constructor(info: ErrorInfo) {
    super(info.message);
    this.name = info.name;
    this.field = info.field;
  }
}
