/**
 * What a self-play run produces and reports: games (kept whole for inspection),
 * per-iteration metrics (TRL's names where one exists), the events streamed while an
 * iteration runs, and the checkpoint files a run store keeps.
 */
import type { FinishReason } from '../model/generate';
import type { JudgeParseReason } from './judge';

export interface AnswerRecord {
  text: string;
  tokens: number;
  finishReason: FinishReason;
  /** Raw (unweighted) reward per source name: 'judge', 'reward_model', 'verifiable'. */
  rewards: Record<string, number>;
  /** Weighted total Solver reward. */
  reward: number;
  advantage: number;
  /** Sum of the answer's token log-probs under the policy and the reference. */
  logp: number;
  logpRef: number;
  /** Mean per-token KL estimate (the run's estimator). */
  kl: number;
  /** The judge's text and how its score was parsed (judge runs only). */
  judge?: { text: string; reason: JudgeParseReason; score: number };
}

export interface GameRecord {
  iteration: number;
  /** Query index i within the iteration. */
  index: number;
  query: string;
  queryTokens: number;
  queryFinishReason: FinishReason;
  /** Whether the query poses a problem the verifiable reward can check (null: not checked). */
  queryValid: boolean | null;
  queryLogp: number;
  queryLogpRef: number;
  queryKl: number;
  /** V(q) from game sources, V_Q(q) from the quality source. */
  value: number;
  qualityValue: number;
  challengerReward: number;
  challengerAdvantage: number;
  answers: AnswerRecord[];
}

/** One iteration's metrics; `values` uses TRL's names where one exists. */
export interface IterationMetrics {
  iteration: number;
  /** Wall-clock time the iteration ended (ms since the epoch). */
  time: number;
  values: Record<string, number>;
}

/** Metric names (beyond per-source `rewards/<name>/mean|std`). */
export const METRIC_NAMES = [
  'reward',
  'reward_std',
  'challenger/reward',
  'challenger/reward_std',
  'kl',
  'challenger/kl',
  'entropy',
  'loss',
  'loss/solver',
  'loss/challenger',
  'loss/solver_pg',
  'loss/solver_kl',
  'completions/mean_length',
  'completions/max_length',
  'completions/min_length',
  'completions/clipped_ratio',
  'queries/mean_length',
  'frac_reward_zero_std',
  'grad_norm',
  'clip_coef',
  'learning_rate',
  'step_skipped',
  'judge/fallback_count',
  /** Share of the Challenger's queries the verifiable reward could not read (or out of range). */
  'challenger/invalid_ratio',
  /** Greedy exact-match accuracy on the held-out exam (only on iterations the exam runs). */
  'eval/exam_accuracy',
  'step_time',
  'time/generate',
  'time/reward',
  'time/train',
  'tokens_per_second',
  'gpu/peak_mib',
] as const;

export type IterationPhase = 'challenger' | 'solver' | 'judge' | 'reward_model' | 'scoring' | 'training' | 'checkpoint' | 'evaluation';

export type TrainerEvent =
  | { type: 'phase'; iteration: number; phase: IterationPhase }
  /** New text of one generation row: Challenger query i, Solver answer (i, j), judge of (i, j). */
  | { type: 'token'; iteration: number; role: 'challenger' | 'solver' | 'judge'; query: number; answer: number; delta: string }
  | { type: 'game'; game: GameRecord }
  | { type: 'iteration'; metrics: IterationMetrics }
  /** The update was not applied (non-finite loss or gradient); the adapter is the last good one. */
  | { type: 'skipped'; iteration: number; reason: string }
  | { type: 'checkpoint'; iteration: number; bytes: number }
  | { type: 'evaluation'; result: EvaluationResult };

export interface EvaluationItem {
  instruction: string;
  base: string;
  adapter: string;
  /** Verdicts of the two orders: adapter first, then base first ('A' | 'B' | 'tie' | null when unparsed). */
  verdicts: [string | null, string | null];
  /** 1 win, 0.5 tie or disagreement, 0 loss for the adapter. */
  score: number;
  /** The reward model's scores, when it judged. */
  rewardScores?: { base: number; adapter: number };
}

/** Who compares base and adapter answers: the frozen reference model (pairwise) or the loaded reward model. */
export type EvaluationJudge = 'reference' | 'reward-model';

export interface EvaluationResult {
  iteration: number;
  judge: EvaluationJudge;
  /** Adapter win rate against the base model, ties counted half. */
  winRate: number;
  wins: number;
  ties: number;
  losses: number;
  /** Judgements whose verdict could not be parsed. */
  unparsed: number;
  items: EvaluationItem[];
  /** Held-out exam accuracy of base and adapter (graded by code), when the run has an exam. */
  exam?: { base: number; adapter: number; problems: number };
}

/** The files of one saved run state; all names are plain file names. */
export type RunFiles = Map<string, Uint8Array>;

/**
 * Where a run's checkpoints live: origin storage in the browser, a folder in Node.
 * save() is all-or-nothing: a failed save (storage full) leaves the previous checkpoint
 * loadable and says so in its error.
 */
export interface RunStore {
  readonly name: string;
  save(files: RunFiles): Promise<void>;
  /** The last complete checkpoint, or null when there is none. */
  load(): Promise<RunFiles | null>;
  /** Deletes every checkpoint of this run (and its games log). */
  clear(): Promise<void>;
  /**
   * The run's games log (games-log.ts): chunk n of the games paged out of memory, kept
   * beside the checkpoints, not inside them. Written whole; a chunk n a failed or
   * unsaved iteration left is written over. Stores without these keep older games in memory.
   */
  writeGameChunk?(n: number, bytes: Uint8Array): Promise<void>;
  readGameChunk?(n: number): Promise<Uint8Array | null>;
}
