/**
 * The settings of a self-play run, their defaults (the paper's where it states them),
 * a one-line explanation of each for the UI, and validation that names the bad field.
 */
import { LLAMA_PROJECTIONS, type LlamaProjection } from '../formats/peft';
import type { AdvantageScale } from './advantages';
import type { JudgeFallbackPolicy } from './judge';
import type { KlEstimator } from './kl';
import type { KlPlacement, LossAggregation } from './losses';
import type { ArithOp } from './prompts';

export type LrSchedule = 'constant' | 'linear' | 'cosine';

/** 'lsp': zero-sum game plus the reference model's quality self-reward; 'lsp-zero': the game alone. */
export type SelfPlayMode = 'lsp' | 'lsp-zero';

/**
 * 'open': the Challenger writes any query for the task (the paper's setting).
 * 'arithmetic': the toy world. The Challenger picks the two operands of "a + b" (its
 *   sampling restricted to number tokens) and the Solver answers with one number
 *   token; the verifiable reward checks the sum. Small enough to learn on a tiny model.
 * 'freeform-arithmetic': the Challenger writes an arithmetic problem as text (chat
 *   format, any tokens) for a plain-English prompt; code reads it (operators and operand
 *   range are settings), an unreadable or out-of-range problem is invalid and costs the
 *   Challenger; the Solver answers in free text and the verifiable reward checks its
 *   last number. The setting of models/micro-arith and of Instruct models alike.
 */
export type World = 'open' | 'arithmetic' | 'freeform-arithmetic';

export interface RewardSettings {
  /**
   * The reference model (LoRA off) grades each answer 0..7. In 'lsp' it is the quality
   * reward R_Q; in 'lsp-zero' it serves as the game reward when no reward model or
   * verifiable reward is on (so the open world always has a reward without a second model).
   */
  judge: { weight: number; maxTokens: number; temperature: number; fallback: JudgeFallbackPolicy };
  /** A sequence-classification reward model on the same engine (loaded separately; optional). */
  rewardModel: { enabled: boolean; weight: number };
  /** Exact-match arithmetic checked by code: 1 when the answer's last number equals the query's result. */
  verifiable: { enabled: boolean; weight: number };
}

export interface TrainerConfig {
  mode: SelfPlayMode;
  world: World;
  /** The task the Challenger writes inputs for ("" lets it choose freely). */
  task: string;
  /** A template whose {placeholders} the Challenger fills ("" for none). */
  template: string;
  /** N: queries per iteration (paper: 8). */
  queriesPerIteration: number;
  /** G: Solver answers per query. */
  groupSize: number;
  maxQueryTokens: number;
  maxAnswerTokens: number;
  temperature: number;
  topP: number;
  /** KL coefficient beta (paper: 0.05). */
  beta: number;
  klEstimator: KlEstimator;
  klPlacement: KlPlacement;
  /** Weight of the Challenger's loss alpha_ch. */
  alphaCh: number;
  aggregation: LossAggregation;
  advantageScale: AdvantageScale;
  /** Weight of V_Q in the Challenger's reward (LSP). */
  challengerQualityWeight: number;
  rewards: RewardSettings;
  lr: number;
  /**
   * How the learning rate moves over the iterations (scheduledLr): 'constant', or after
   * lrWarmup iterations of linear warm-up a 'linear' or 'cosine' decay from lr to
   * lr * lrMinRatio at iteration lrDecayIterations, held there after.
   */
  lrSchedule: LrSchedule;
  lrWarmup: number;
  lrDecayIterations: number;
  lrMinRatio: number;
  weightDecay: number;
  maxGradNorm: number;
  /** Sequences per forward/backward pass; the passes of one iteration accumulate into one step. */
  microBatch: number;
  lora: { r: number; alpha: number; targets: LlamaProjection[]; useRslora: boolean };
  seed: number;
  /** Save a checkpoint every this many iterations (0: only when asked). */
  checkpointEvery: number;
  /** The arithmetic worlds' largest operand. */
  arithmeticMaxOperand: number;
  /** Operators the free-form arithmetic world's problems may use. */
  arithmeticOperators: ArithOp[];
  /** Run the held-out exam (when the run has one) after every this many iterations (0: never). */
  examEvery: number;
}

export const DEFAULT_CONFIG: TrainerConfig = {
  mode: 'lsp',
  world: 'open',
  task: '',
  template: '',
  queriesPerIteration: 8,
  groupSize: 4,
  maxQueryTokens: 128,
  maxAnswerTokens: 256,
  temperature: 1,
  topP: 1,
  beta: 0.05,
  klEstimator: 'k3',
  klPlacement: 'loss',
  alphaCh: 1,
  aggregation: 'grpo',
  advantageScale: 'none',
  challengerQualityWeight: 1,
  rewards: {
    judge: { weight: 1, maxTokens: 192, temperature: 0, fallback: 'zero' },
    rewardModel: { enabled: false, weight: 1 },
    verifiable: { enabled: false, weight: 1 },
  },
  lr: 2e-5,
  lrSchedule: 'constant',
  lrWarmup: 0,
  lrDecayIterations: 100,
  lrMinRatio: 0,
  weightDecay: 0,
  maxGradNorm: 1,
  microBatch: 4,
  lora: { r: 16, alpha: 32, targets: [...LLAMA_PROJECTIONS], useRslora: false },
  seed: 0,
  checkpointEvery: 1,
  arithmeticMaxOperand: 4,
  arithmeticOperators: ['+'],
  examEvery: 0,
};

/** Short explanations of each setting, for the controls. */
export const CONFIG_HELP: Record<string, string> = {
  mode: 'LSP adds a quality self-reward judged by the frozen reference model; LSP-Zero is the pure zero-sum game, which tends to degenerate.',
  world: 'Open: the Challenger writes any query for the task. Arithmetic: a toy world where the Challenger picks a + b and the answer is checked by code.',
  task: 'The task the Challenger writes inputs for, e.g. "Pure & Applied Mathematics". Empty: it chooses freely.',
  template: 'Optional template for the query, with {placeholders} the Challenger fills.',
  queriesPerIteration: 'N: queries the Challenger writes per iteration (paper: 8).',
  groupSize: 'G: answers the Solver samples per query; their mean reward is the query\'s value.',
  maxQueryTokens: 'Longest query the Challenger may write, in tokens.',
  maxAnswerTokens: 'Longest answer the Solver may write, in tokens; cut answers count as clipped.',
  temperature: 'Sampling temperature of Challenger and Solver (log-probs use the same temperature).',
  topP: 'Nucleus sampling mass (1 = off).',
  beta: 'KL penalty coefficient toward the reference policy (paper: 0.05).',
  klEstimator: 'k1: the sampled log-ratio (paper); k3: exp(r) - r - 1 (TRL), always >= 0.',
  klPlacement: 'loss: the KL term is differentiated (paper, TRL); reward: a stop-gradient penalty on the advantage.',
  alphaCh: 'Weight of the Challenger\'s loss in L = L_sol + alpha_ch L_ch.',
  aggregation: 'How token losses are averaged: grpo (per sequence), bnpo (per token), dr_grpo (fixed length), dapo (global tokens), seq_sum (summed log-prob, the paper\'s literal form).',
  advantageScale: 'none: advantages are reward minus group mean (paper); group: also divided by the group std (TRL).',
  challengerQualityWeight: 'Weight of the judged quality V_Q in the Challenger\'s reward (LSP).',
  lr: 'AdamW learning rate of the LoRA adapter (paper, full fine-tuning: 3e-6; LoRA usually 1e-5..1e-4).',
  lrSchedule: 'Learning-rate schedule: constant, or a linear or cosine decay to lr x min ratio at the decay iteration (after the warm-up).',
  lrWarmup: 'Iterations of linear learning-rate warm-up from 0 (0: none).',
  lrDecayIterations: 'Iteration at which a linear or cosine schedule reaches its floor (lr x min ratio); the rate stays there after.',
  lrMinRatio: 'Floor of a decaying schedule as a fraction of lr (0: decays to zero).',
  weightDecay: 'AdamW decoupled weight decay.',
  maxGradNorm: 'Clip the global gradient norm to this.',
  microBatch: 'Sequences per forward/backward pass; smaller uses less GPU memory, gradients accumulate into one step.',
  'lora.r': 'LoRA rank.',
  'lora.alpha': 'LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA).',
  'lora.targets': 'Projections that get an adapter.',
  seed: 'Seed of the adapter init and of all sampling; the same seed replays the same run.',
  checkpointEvery: 'Save the run every this many iterations (0: only on demand).',
  arithmeticMaxOperand: 'Arithmetic worlds: operands run from 0 to this.',
  arithmeticOperators: 'Free-form arithmetic: the operators a problem may use (+ - * /).',
  examEvery: 'Run the held-out exam (greedy, graded by code, never trained on) every this many iterations (0: never).',
};

export class ConfigError extends Error {
  constructor(
    readonly field: string,
    message: string,
  ) {
    super(`setting ${field}: ${message}`);
    this.name = 'ConfigError';
  }
}

function positiveInt(field: string, v: number, max: number): void {
  if (!(Number.isInteger(v) && v >= 1 && v <= max)) throw new ConfigError(field, `must be a whole number from 1 to ${max}, got ${v}`);
}

function inRange(field: string, v: number, lo: number, hi: number): void {
  if (!(Number.isFinite(v) && v >= lo && v <= hi)) throw new ConfigError(field, `must be between ${lo} and ${hi}, got ${v}`);
}

/** A full config from defaults and partial overrides (nested objects merged), validated. */
export function makeConfig(overrides: DeepPartial<TrainerConfig> = {}): TrainerConfig {
  const d = DEFAULT_CONFIG;
  const o = overrides;
  const cfg: TrainerConfig = {
    ...d,
    ...(o as Partial<TrainerConfig>),
    rewards: {
      judge: { ...d.rewards.judge, ...(o.rewards?.judge as object | undefined) },
      rewardModel: { ...d.rewards.rewardModel, ...(o.rewards?.rewardModel as object | undefined) },
      verifiable: { ...d.rewards.verifiable, ...(o.rewards?.verifiable as object | undefined) },
    },
  lora: { ...d.lora, ...(o.lora as object | undefined), targets: [...((o.lora?.targets as LlamaProjection[] | undefined) ?? d.lora.targets)] },
  arithmeticOperators: [...((o.arithmeticOperators as ArithOp[] | undefined) ?? d.arithmeticOperators)],
  };
  validateConfig(cfg);
  return cfg;
}

export type DeepPartial<T> = { [K in keyof T]?: T[K] extends (infer U)[] ? U[] : T[K] extends object ? DeepPartial<T[K]> : T[K] };

export function validateConfig(c: TrainerConfig): void {
  if (c.mode !== 'lsp' && c.mode !== 'lsp-zero') throw new ConfigError('mode', `must be lsp or lsp-zero, got ${String(c.mode)}`);
  if (c.world !== 'open' && c.world !== 'arithmetic' && c.world !== 'freeform-arithmetic') throw new ConfigError('world', `must be open, arithmetic or freeform-arithmetic, got ${String(c.world)}`);
  positiveInt('queriesPerIteration', c.queriesPerIteration, 256);
  positiveInt('groupSize', c.groupSize, 64);
  positiveInt('maxQueryTokens', c.maxQueryTokens, 4096);
  positiveInt('maxAnswerTokens', c.maxAnswerTokens, 8192);
  inRange('temperature', c.temperature, 0, 10);
  inRange('topP', c.topP, 0, 1);
  inRange('beta', c.beta, 0, 100);
  if (c.klEstimator !== 'k1' && c.klEstimator !== 'k3') throw new ConfigError('klEstimator', `must be k1 or k3, got ${String(c.klEstimator)}`);
  if (c.klPlacement !== 'loss' && c.klPlacement !== 'reward') throw new ConfigError('klPlacement', `must be loss or reward, got ${String(c.klPlacement)}`);
  inRange('alphaCh', c.alphaCh, 0, 100);
  if (!['grpo', 'bnpo', 'dr_grpo', 'dapo', 'seq_sum'].includes(c.aggregation)) throw new ConfigError('aggregation', `must be one of grpo, bnpo, dr_grpo, dapo, seq_sum, got ${String(c.aggregation)}`);
  if (c.advantageScale !== 'none' && c.advantageScale !== 'group') throw new ConfigError('advantageScale', `must be none or group, got ${String(c.advantageScale)}`);
  inRange('challengerQualityWeight', c.challengerQualityWeight, -100, 100);
  inRange('rewards.judge.weight', c.rewards.judge.weight, -100, 100);
  positiveInt('rewards.judge.maxTokens', c.rewards.judge.maxTokens, 4096);
  inRange('rewards.judge.temperature', c.rewards.judge.temperature, 0, 10);
  inRange('rewards.rewardModel.weight', c.rewards.rewardModel.weight, -100, 100);
  inRange('rewards.verifiable.weight', c.rewards.verifiable.weight, -100, 100);
  inRange('lr', c.lr, 0, 1);
  if (c.lrSchedule !== 'constant' && c.lrSchedule !== 'linear' && c.lrSchedule !== 'cosine') throw new ConfigError('lrSchedule', `must be constant, linear or cosine, got ${String(c.lrSchedule)}`);
  if (!(Number.isInteger(c.lrWarmup) && c.lrWarmup >= 0)) throw new ConfigError('lrWarmup', `must be a whole number >= 0, got ${c.lrWarmup}`);
  if (!(Number.isInteger(c.lrDecayIterations) && c.lrDecayIterations > c.lrWarmup)) throw new ConfigError('lrDecayIterations', `must be a whole number above lrWarmup (${c.lrWarmup}), got ${c.lrDecayIterations}`);
  inRange('lrMinRatio', c.lrMinRatio, 0, 1);
  inRange('weightDecay', c.weightDecay, 0, 10);
  if (!(c.maxGradNorm > 0)) throw new ConfigError('maxGradNorm', `must be positive, got ${c.maxGradNorm}`);
  positiveInt('microBatch', c.microBatch, 1024);
  positiveInt('lora.r', c.lora.r, 1024);
  if (!(Number.isFinite(c.lora.alpha) && c.lora.alpha > 0)) throw new ConfigError('lora.alpha', `must be positive, got ${c.lora.alpha}`);
  if (c.lora.targets.length === 0) throw new ConfigError('lora.targets', 'pick at least one projection');
  for (const t of c.lora.targets) if (!(LLAMA_PROJECTIONS as readonly string[]).includes(t)) throw new ConfigError('lora.targets', `unknown projection ${t}; use ${LLAMA_PROJECTIONS.join(', ')}`);
  if (!(Number.isInteger(c.seed) && c.seed >= 0 && c.seed < 2 ** 32)) throw new ConfigError('seed', `must be a whole number from 0 to 2^32-1, got ${c.seed}`);
  if (!(Number.isInteger(c.checkpointEvery) && c.checkpointEvery >= 0)) throw new ConfigError('checkpointEvery', `must be a whole number >= 0, got ${c.checkpointEvery}`);
  if (c.world === 'freeform-arithmetic') positiveInt('arithmeticMaxOperand', c.arithmeticMaxOperand, 1e9);
  else positiveInt('arithmeticMaxOperand', c.arithmeticMaxOperand, 999);
  if (!Array.isArray(c.arithmeticOperators) || c.arithmeticOperators.length === 0 || !c.arithmeticOperators.every((op) => ['+', '-', '*', '/'].includes(op))) {
    throw new ConfigError('arithmeticOperators', `must be a non-empty list of + - * /, got ${JSON.stringify(c.arithmeticOperators)}`);
  }
  if (!(Number.isInteger(c.examEvery) && c.examEvery >= 0)) throw new ConfigError('examEvery', `must be a whole number >= 0, got ${c.examEvery}`);
}

/** Iterations of the quick demo's learning-rate decay; the learning test and bench/learning.ts run this many. */
export const MICRO_DEMO_ITERATIONS = 64;

/**
 * The quick demo's settings: LSP-Zero with the verifiable reward in the free-form
 * arithmetic world on models/micro-arith (operands 0..99, "+", the range it was
 * pretrained on), short queries and answers, the exam every 8 iterations.
 */
export const MICRO_DEMO_SETTINGS = {
  mode: 'lsp-zero',
  world: 'freeform-arithmetic',
  arithmeticMaxOperand: 99,
  arithmeticOperators: ['+'],
  // Measured with bench/learning.ts (README, "micro-arith"): lr 0.01 collapses the exam,
  // 0.002 without std scaling stays flat, and N 8 or 16 is too noisy; with alpha_ch 1 the
  // exam fell in the runs measured, so the demo trains the Solver on the Challenger's
  // problems. At a constant lr the exam peaks and slips; a cosine decay to 0 holds it at
  // its peak (and from then on the adapter stays as it is). Over seeds 0-4, N 32 for 64
  // iterations gained +10.0 to +14.2 points (spread 1.7); N 64 for 24 iterations gained
  // about as much on average but spread twice as wide (+8.8 to +15.0): more, smaller
  // steps vary less from seed to seed.
  queriesPerIteration: 32,
  groupSize: 8,
  maxQueryTokens: 12,
  maxAnswerTokens: 6,
  temperature: 1,
  advantageScale: 'group',
  alphaCh: 0,
  lr: 0.005,
  lrSchedule: 'cosine',
  lrDecayIterations: MICRO_DEMO_ITERATIONS,
  microBatch: 256,
  lora: { r: 16, alpha: 32 },
  examEvery: 8,
} satisfies DeepPartial<TrainerConfig>;

/**
 * The learning rate of the update made at `iteration` (0-based): warm-up from lr / (lrWarmup + 1)
 * to lr over the first lrWarmup iterations, then constant, or a linear or cosine decay that
 * reaches lr * lrMinRatio at iteration lrDecayIterations (and stays there).
 */
export function scheduledLr(c: Pick<TrainerConfig, 'lr' | 'lrSchedule' | 'lrWarmup' | 'lrDecayIterations' | 'lrMinRatio'>, iteration: number): number {
  if (iteration < c.lrWarmup) return (c.lr * (iteration + 1)) / (c.lrWarmup + 1);
  if (c.lrSchedule === 'constant') return c.lr;
  const progress = Math.min(1, (iteration - c.lrWarmup) / (c.lrDecayIterations - c.lrWarmup));
  const shape = c.lrSchedule === 'linear' ? 1 - progress : 0.5 * (1 + Math.cos(Math.PI * progress));
  return c.lr * (c.lrMinRatio + (1 - c.lrMinRatio) * shape);
}

export function microDemoConfig(overrides: DeepPartial<TrainerConfig> = {}): TrainerConfig {
  return makeConfig({ ...MICRO_DEMO_SETTINGS, ...overrides } as DeepPartial<TrainerConfig>);
}
