/**
 * The page's state: one zustand store built from slices. Only the bridge
 * (./bridge.ts) writes worker events into it; components read slices with shallow
 * selectors. Per-token text is not here but in ./live.ts.
 */
import { create } from 'zustand';
import { DEFAULT_CONFIG, type TrainerConfig } from '../selfplay/config';
import type { CustomRewardSpec } from '../selfplay/custom-reward';
import type { EvaluationResult, GameRecord, IterationMetrics, IterationPhase } from '../selfplay/types';
import type { MemoryPlan } from '../model/memory';
import type {
  CachedModelInfo,
  CapabilityReport,
  ErrorContext,
  LoadProgressEvent,
  ModelInfo,
  ModelSummary,
  RunState,
  SavedRunInfo,
  WeightFormat,
} from '../worker/protocol';

export interface DeviceSlice {
  capabilities: CapabilityReport | null;
  checking: boolean;
}

export interface ModelSlice {
  model: ModelInfo | null;
  /** The reward model beside the policy (rewards.rewardModel), if one is loaded. */
  rewardModel: ModelInfo | null;
  loading: boolean;
  progress: LoadProgressEvent | null;
  memoryPlan: { plan: MemoryPlan; lines: string[] } | null;
  /** The picked model's size and memory estimate, before loading. */
  summary: ModelSummary | null;
  summaryError: string | null;
  format: WeightFormat;
  cached: CachedModelInfo[];
  savedRun: SavedRunInfo | null;
}

export interface RunSlice {
  runState: RunState;
  iteration: number;
  phase: IterationPhase | null;
  /** The settings of the run in progress (null before a run starts). */
  runConfig: TrainerConfig | null;
  /** The settings the next run starts with. */
  draft: TrainerConfig;
  history: IterationMetrics[];
  /** The newest games (at most MEMORY_GAMES); older ones are searched in the worker (searchGames). */
  games: GameRecord[];
  /** Games of the whole run, in memory or not. */
  gamesTotal: number;
  skipped: { iteration: number; reason: string }[];
  lastCheckpoint: { iteration: number; bytes: number } | null;
  evaluation: EvaluationResult | null;
  evaluating: boolean;
  /** The user's own reward in use (null: none). */
  customReward: CustomRewardSpec | null;
  /** Fallbacks of the user's reward, one line per iteration that had any (the last 20). */
  customRewardNotes: { iteration: number; message: string; fallbacks: number }[];
  /** The chat answer streaming or last streamed, per side (adapter on / off). */
  chat: { id: number; on: ChatSide | null; off: ChatSide | null } | null;
  chatting: boolean;
}

export interface ChatSide {
  text: string;
  tokens: number;
  tokensPerSecond: number;
  done: boolean;
}

export interface LabMessage {
  id: number;
  context: ErrorContext;
  name: string;
  message: string;
  runPreserved: boolean;
}

export interface MessageSlice {
  errors: LabMessage[];
  notices: string[];
}

export type LabState = DeviceSlice & ModelSlice & RunSlice & MessageSlice;

export const initialState: LabState = {
  capabilities: null,
  checking: true,
  model: null,
  rewardModel: null,
  loading: false,
  progress: null,
  memoryPlan: null,
  summary: null,
  summaryError: null,
  format: 'q4',
  cached: [],
  savedRun: null,
  runState: 'idle',
  iteration: 0,
  phase: null,
  runConfig: null,
  draft: DEFAULT_CONFIG,
  history: [],
  games: [],
  gamesTotal: 0,
  skipped: [],
  lastCheckpoint: null,
  evaluation: null,
  evaluating: false,
  customReward: null,
  customRewardNotes: [],
  chat: null,
  chatting: false,
  errors: [],
  notices: [],
};

export const useLab = create<LabState>()(() => initialState);

let nextErrorId = 1;

export function addError(context: ErrorContext, e: { name?: string; message: string }, runPreserved = true): void {
  const msg: LabMessage = { id: nextErrorId++, context, name: e.name ?? 'Error', message: e.message, runPreserved };
  useLab.setState((s) => ({ errors: [...s.errors.slice(-9), msg] }));
}

export function dismissError(id: number): void {
  useLab.setState((s) => ({ errors: s.errors.filter((e) => e.id !== id) }));
}
