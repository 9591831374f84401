/**
 * One self-play iteration as a pipeline over a flat list of rollouts:
 *
 *   play -> reward -> score -> update -> record
 *
 * A rollout is one sampled sequence of either role: the Challenger's query i (group i),
 * or one of the Solver's G answers to it (group i). The stages fill its fields in turn:
 *   play     role, group, prompt, completion, text, finishReason   (trainer.ts: generation)
 *   reward   rewards, reward, advantage                            (applyAdvantages)
 *   score    refLogp (reference pass, adapter null), then logp and entropy (policy pass),
 *            both by scoreRollouts over the same micro-batches (scoringBatches)
 *   update   dL/dlogp per micro-batch of the policy pass (batchGradient), one optimizer step
 *   record   the games and the iteration's metrics (recordGames, iterationValues)
 * Every stage but the GPU passes is plain arithmetic on the list, tested on its own.
 * The Solver's rollouts are scored and trained first, then the Challenger's; within a
 * role the list's order (query i, answer j) is kept, so sums run in that order.
 */
import type { Gpu } from '../gpu/gpu';
import type { Tensor } from '../gpu/tensor';
import type { FinishReason } from '../model/generate';
import { sequenceLogprobs, type LogprobPass, type TokenBatch } from '../model/llama';
import type { LoraAdapter } from '../model/lora';
import type { LlamaWeights } from '../model/weights';
import { mean, stdUnbiased, type Advantages, type RewardSource } from './advantages';
import { chunks, completionBatch } from './batch';
import type { TrainerConfig } from './config';
import { klSequence } from './kl';
import { aggregationCoefficients, sequenceTerms } from './losses';
import type { AnswerRecord, GameRecord } from './types';

export type Role = 'challenger' | 'solver';

export interface Rollout {
  role: Role;
  /** The query's index i: the Challenger's query i, or one of the Solver's answers to it. */
  group: number;
  /** Token ids of the prompt, and of the sampled completion the loss is taken over. */
  prompt: readonly number[];
  completion: readonly number[];
  /** The completion as text (the query, or the answer). */
  text: string;
  finishReason: FinishReason;
  /** Raw (unweighted) reward per source name; the Solver's only (the Challenger's is derived). */
  rewards: Record<string, number>;
  /** Solver: the weighted total reward R(i,j). Challenger: -V(i) + w V_Q(i). */
  reward: number;
  advantage: number;
  /** [T] log-probs of the completion under the reference (adapter off); null: not scored. */
  refLogp: Float32Array | null;
  /** [T] the same under the policy, and its entropy per token; null: not scored. */
  logp: Float32Array | null;
  entropy: Float32Array | null;
  /** The judge's text and parsed score (runs with the judge; Solver only). */
  judge?: NonNullable<AnswerRecord['judge']>;
}

/** A rollout fresh from play: every later field empty. */
export function newRollout(role: Role, group: number, prompt: readonly number[], completion: readonly number[], text: string, finishReason: FinishReason): Rollout {
  return { role, group, prompt, completion, text, finishReason, rewards: {}, reward: 0, advantage: 0, refLogp: null, logp: null, entropy: null };
}

export function ofRole(rollouts: readonly Rollout[], role: Role): Rollout[] {
  return rollouts.filter((r) => r.role === role);
}

/** [N][G] of `f` over the Solver's rollouts, row i holding the answers to query i in order. */
export function answerTable<T>(rollouts: readonly Rollout[], f: (r: Rollout) => T): T[][] {
  const n = ofRole(rollouts, 'challenger').length;
  const rows = Array.from({ length: n }, (): T[] => []);
  for (const r of ofRole(rollouts, 'solver')) {
    const row = rows[r.group];
    if (!row) throw new Error(`rollouts: a Solver rollout answers query ${r.group}, but there are ${n} queries`);
    row.push(f(r));
  }
  return rows;
}

/** The Challenger's query texts, by group. */
export function queryTexts(rollouts: readonly Rollout[]): string[] {
  return ofRole(rollouts, 'challenger').map((r) => r.text);
}

export interface CheckedReward {
  valid: boolean;
  reward: number;
}

/** A verifiable reward per answer, and per query whether the checker could read it (from its first answer's check). */
export function verifiableRewards(rollouts: readonly Rollout[], check: (query: string, answer: string) => CheckedReward): { rewards: number[][]; queryValid: boolean[] } {
  const queries = queryTexts(rollouts);
  const res = answerTable(rollouts, (r) => check(queries[r.group]!, r.text));
  return { rewards: res.map((row) => row.map((x) => x.reward)), queryValid: res.map((row) => row[0]!.valid) };
}

/** The reward stage's output: per-source rewards, the advantages of both roles, and what it counted. */
export interface IterationRewards {
  sources: RewardSource[];
  advantages: Advantages;
  /** [N] whether each query poses a problem the verifiable reward can check (null: not checked). */
  queryValid: (boolean | null)[];
  /** Whether the reference model judged every answer (its tokens count toward tokens_per_second). */
  judged: boolean;
  judgeFallbacks: number;
  /** The user's reward's fallbacks; null when the run has no custom reward. */
  customFallbacks: number | null;
}

/** Writes each rollout's rewards, reward and advantage from the sources and their advantages. */
export function applyAdvantages(rollouts: readonly Rollout[], sources: readonly RewardSource[], adv: Advantages): void {
  const seen = new Map<number, number>();
  for (const r of rollouts) {
    const i = r.group;
    if (r.role === 'challenger') {
      r.reward = adv.challengerReward[i]!;
      r.advantage = adv.challengerAdvantage[i]!;
      continue;
    }
    const j = seen.get(i) ?? 0;
    seen.set(i, j + 1);
    r.rewards = Object.fromEntries(sources.map((s) => [s.name, s.rewards[i]![j]!]));
    r.reward = adv.solverReward[i]![j]!;
    r.advantage = adv.solverAdvantage[i]![j]!;
  }
}

/** One micro-batch of the scoring passes: its rollouts, their padded batch, and where each completion token's log-prob sits. */
export interface ScoringBatch {
  rollouts: Rollout[];
  batch: TokenBatch;
  /** Per rollout, the position of each completion token in the pass's output (indices into `flat`). */
  rows: number[][];
  /** The batch rows the pass scores, each once. */
  flat: number[];
}

/**
 * The Solver's rollouts in micro-batches, then the Challenger's. With `challenger` false
 * (alpha_ch 0: its loss weighs nothing) the queries are neither scored nor trained.
 */
export function scoringBatches(rollouts: readonly Rollout[], opts: { microBatch: number; vocabSize: number; challenger: boolean }): ScoringBatch[] {
  const roles: Role[] = opts.challenger ? ['solver', 'challenger'] : ['solver'];
  return roles.flatMap((role) => {
    const list = ofRole(rollouts, role);
    return chunks(list.length, opts.microBatch).map((g) => {
      const members = g.map((k) => list[k]!);
      const { batch, rows } = completionBatch(members, opts.vocabSize);
      const flat: number[] = [];
      const at = rows.map((r) => r.map((row) => flat.push(row) - 1));
      return { rollouts: members, batch, rows: at, flat };
    });
  });
}

export interface ScorePassOptions {
  /** Log-probs are taken at this sampling temperature. */
  temperature: number;
  /** The policy pass: recorded for a backward, with entropies; fills logp and entropy (else refLogp). */
  train: boolean;
  /** Runs before each micro-batch (Stop now). */
  beforeBatch?: () => void;
}

/**
 * The scoring loop of both passes: each micro-batch's completion log-probs under
 * `adapter` (null: the reference model), written into its rollouts. The policy pass
 * hands each recorded pass to `onBatch` (the update's backward) before releasing it;
 * `onBatch` returning false ends the loop, leaving later rollouts unscored.
 */
export async function scoreRollouts(
  gpu: Gpu,
  weights: LlamaWeights,
  adapter: LoraAdapter | null,
  batches: readonly ScoringBatch[],
  opts: ScorePassOptions,
  onBatch?: (b: ScoringBatch, pass: LogprobPass) => Promise<boolean | void> | boolean | void,
): Promise<void> {
  for (const b of batches) {
    opts.beforeBatch?.();
    if (b.flat.length === 0) {
      for (const r of b.rollouts) {
        if (opts.train) r.logp = new Float32Array(0);
        else r.refLogp = new Float32Array(0);
      }
      continue;
    }
    const pass = sequenceLogprobs(gpu, weights, adapter, b.batch, opts.train ? { temperature: opts.temperature, entropy: true, train: true, rows: b.flat } : { temperature: opts.temperature, rows: b.flat });
    try {
      const pick = (v: Float32Array, n: number) => Float32Array.from(b.rows[n]!, (at) => v[at]!);
      if (opts.train) {
        const [lp, ent] = await readPair(gpu, pass.logp, pass.entropy!);
        b.rollouts.forEach((r, n) => {
          r.logp = pick(lp, n);
          r.entropy = pick(ent, n);
        });
      } else {
        const lp = await gpu.readF32(pass.logp);
        b.rollouts.forEach((r, n) => (r.refLogp = pick(lp, n)));
      }
      if (onBatch && (await onBatch(b, pass)) === false) break;
    } finally {
      pass.release();
    }
  }
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

type LossSettings = Pick<TrainerConfig, 'aggregation' | 'beta' | 'klEstimator' | 'klPlacement' | 'alphaCh'>;

/**
 * Each rollout's aggregation coefficient c_s (losses.ts) over its role's rollouts of the
 * whole iteration, so micro-batches add up to the iteration's loss. `maxLength` is each
 * role's length bound (dr_grpo).
 */
export function lossCoefficients(rollouts: readonly Rollout[], aggregation: TrainerConfig['aggregation'], maxLength: Record<Role, number>): Map<Rollout, number> {
  const out = new Map<Rollout, number>();
  for (const role of ['solver', 'challenger'] as const) {
    const list = ofRole(rollouts, role);
    const coef = aggregationCoefficients(list.map((r) => r.completion.length), { aggregation, maxLength: maxLength[role] });
    list.forEach((r, k) => out.set(r, coef[k]!));
  }
  return out;
}

/** Aggregated -A*logp and kl (no beta) of each role, summed over the rollouts trained so far. */
export interface LossParts {
  solverPg: number;
  solverKl: number;
  chPg: number;
  chKl: number;
}

export function zeroLossParts(): LossParts {
  return { solverPg: 0, solverKl: 0, chPg: 0, chKl: 0 };
}

/**
 * dL/dlogp of one scored micro-batch, at the positions its pass scored (ScoringBatch.flat);
 * adds its rollouts' loss shares to `parts`. The Challenger's weights carry alpha_ch.
 */
export function batchGradient(b: ScoringBatch, coef: ReadonlyMap<Rollout, number>, c: LossSettings, parts: LossParts): Float32Array {
  const dl = new Float32Array(b.flat.length);
  b.rollouts.forEach((r, n) => {
    const solver = r.role === 'solver';
    const terms = sequenceTerms({ logp: r.logp!, logpRef: r.refLogp!, advantage: r.advantage }, coef.get(r)!, c.beta, c.klEstimator, solver ? 1 : c.alphaCh, c.klPlacement);
    if (solver) {
      parts.solverPg += terms.pgLoss;
      parts.solverKl += terms.kl;
    } else {
      parts.chPg += terms.pgLoss;
      parts.chKl += terms.kl;
    }
    b.rows[n]!.forEach((at, t) => (dl[at] = terms.weights[t]!));
  });
  return dl;
}

/** Whether the gradient and the loss so far are finite (a NaN or Inf log-prob makes them not). */
export function finiteLoss(dl: Float32Array, parts: LossParts): boolean {
  return dl.every(Number.isFinite) && Number.isFinite(parts.solverPg + parts.solverKl + parts.chPg + parts.chKl);
}

const sumOf = (a: Float32Array | null) => (a ? a.reduce((x, y) => x + y, 0) : NaN);

/** Mean per-token KL of a rollout the policy scored (0 when it was not). */
function meanKl(r: Rollout, estimator: TrainerConfig['klEstimator']): number {
  return r.logp ? klSequence(estimator, r.logp, r.refLogp!).mean : 0;
}

/** The iteration's games: one per query, with its answers; log-probs of unscored rollouts read NaN, their KL 0. */
export function recordGames(rollouts: readonly Rollout[], rewards: IterationRewards, iteration: number, klEstimator: TrainerConfig['klEstimator']): GameRecord[] {
  const adv = rewards.advantages;
  const answers = answerTable(rollouts, (r) => r);
  return ofRole(rollouts, 'challenger').map((q) => {
    const i = q.group;
    return {
      iteration,
      index: i,
      query: q.text,
      queryTokens: q.completion.length,
      queryFinishReason: q.finishReason,
      queryValid: rewards.queryValid[i]!,
      queryLogp: sumOf(q.logp),
      queryLogpRef: sumOf(q.refLogp),
      queryKl: meanKl(q, klEstimator),
      value: adv.value[i]!,
      qualityValue: adv.qualityValue[i]!,
      challengerReward: q.reward,
      challengerAdvantage: q.advantage,
      answers: answers[i]!.map((a): AnswerRecord => {
        const rec: AnswerRecord = {
          text: a.text,
          tokens: a.completion.length,
          finishReason: a.finishReason,
          rewards: a.rewards,
          reward: a.reward,
          advantage: a.advantage,
          logp: sumOf(a.logp),
          logpRef: sumOf(a.refLogp),
          kl: meanKl(a, klEstimator),
        };
        if (a.judge) rec.judge = a.judge;
        return rec;
      }),
    };
  });
}

/** What the update stage reports. */
export interface UpdateReport {
  parts: LossParts;
  gradNorm: number;
  clipCoef: number;
  learningRate: number;
  /** Why the update was skipped (non-finite loss or gradient), or null when it was applied. */
  skipped: string | null;
}

export interface IterationFacts {
  rollouts: readonly Rollout[];
  rewards: IterationRewards;
  update: UpdateReport;
  config: Pick<TrainerConfig, 'world' | 'beta' | 'alphaCh'>;
  /** performance.now() at the start, after play, after rewards, after the update (ms). */
  times: { start: number; played: number; rewarded: number; updated: number };
  gpuPeakMib: number;
  examAccuracy?: number;
}

/** The iteration's metrics (types.ts METRIC_NAMES, TRL's names where one exists), in a fixed order. */
export function iterationValues(f: IterationFacts): Record<string, number> {
  const { rewards, update, config: c, times } = f;
  const adv = rewards.advantages;
  const { parts } = update;
  const answers = ofRole(f.rollouts, 'solver');
  const queries = ofRole(f.rollouts, 'challenger');
  const lens = answers.map((r) => r.completion.length);
  const queryLens = queries.map((r) => r.completion.length);
  let entropySum = 0;
  let entropyCount = 0;
  for (const r of answers) {
    if (!r.entropy) continue;
    for (const e of r.entropy) entropySum += e;
    entropyCount += r.entropy.length;
  }
  const solverLoss = parts.solverPg + c.beta * parts.solverKl;
  const chLoss = parts.chPg + c.beta * parts.chKl;
  const totalTokens = lens.reduce((a, b) => a + b, 0) + queryLens.reduce((a, b) => a + b, 0) + (rewards.judged ? answers.length : 0);
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
    // The toy world's answers are one token by design: none is clipped.
    'completions/clipped_ratio': c.world === 'arithmetic' ? 0 : answers.filter((a) => a.finishReason === 'length').length / answers.length,
    'queries/mean_length': mean(queryLens),
    frac_reward_zero_std: adv.fracRewardZeroStd,
    grad_norm: update.gradNorm,
    clip_coef: update.clipCoef,
    learning_rate: update.learningRate,
    step_skipped: update.skipped ? 1 : 0,
    'judge/fallback_count': rewards.judgeFallbacks,
    ...(rewards.customFallbacks !== null ? { 'reward/custom_fallback_count': rewards.customFallbacks } : {}),
    'time/generate': (times.played - times.start) / 1000,
    'time/reward': (times.rewarded - times.played) / 1000,
    'time/train': (times.updated - times.rewarded) / 1000,
    step_time: (times.updated - times.start) / 1000,
    tokens_per_second: totalTokens / ((times.updated - times.start) / 1000),
    'gpu/peak_mib': f.gpuPeakMib,
  };
  if (rewards.queryValid.some((v) => v !== null)) values['challenger/invalid_ratio'] = rewards.queryValid.filter((v) => v === false).length / queries.length;
  if (f.examAccuracy !== undefined) values['eval/exam_accuracy'] = f.examAccuracy;
  for (const s of adv.perSource) {
    values[`rewards/${s.name}/mean`] = s.mean;
    values[`rewards/${s.name}/std`] = s.std;
  }
  return values;
}
