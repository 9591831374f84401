/**
 * Rewards -> group values -> advantages for both roles of the self-play game.
 *
 * Shapes: every reward table is [N queries][G answers]. Sources are combined
 * with weights; a source of kind 'quality' (the self-judge R_Q) is the one the
 * Challenger is rewarded *with*, every other ('game') source is the one the
 * Challenger plays *against*:
 *   Solver reward      R(i,j)  = sum_s w_s R_s(i,j)                  (all sources)
 *   group value        V(i)    = mean_j R_game(i,j),  V_Q(i) = mean_j R_quality(i,j)
 *   Solver advantage   A_sol   = R(i,j) - mean_j R(i,j)   [ / (std_j R(i,.) + eps) ]
 *   Challenger reward  C(i)    = -V(i) + challengerQualityWeight * V_Q(i)
 *   Challenger adv.    A_ch(i) = C(i) - mean_k C(k)   (= mean_k V(k) - V(i) in LSP-Zero)
 * With no quality source this is LSP-Zero; with one it is LSP.
 */

export type RewardKind = 'game' | 'quality';

export interface RewardSource {
  name: string;
  /** game: the Challenger is rewarded by -V; quality: by +V_Q (LSP). */
  kind: RewardKind;
  weight: number;
  /** [N][G] raw rewards. */
  rewards: number[][];
}

/** 'none': mean-centred only (the paper); 'group': also divided by the group std + eps (TRL). */
export type AdvantageScale = 'none' | 'group';

export interface AdvantageOptions {
  scale: AdvantageScale;
  /** Added to the std before dividing (TRL uses 1e-4). */
  stdEps?: number;
  /** Weight of V_Q in the Challenger reward; 1 is the paper's LSP, 0 turns it off. */
  challengerQualityWeight?: number;
}

export interface SourceStats {
  name: string;
  /** Mean and unbiased std of the raw (unweighted) rewards over all N*G answers. */
  mean: number;
  std: number;
}

export interface Advantages {
  /** [N][G] weighted total Solver reward. */
  solverReward: number[][];
  /** [N] mean_j of the total Solver reward (the baseline the Solver advantage uses). */
  solverGroupMean: number[];
  /** [N] unbiased std_j of the total Solver reward (0 when G = 1). */
  solverGroupStd: number[];
  /** [N][G] Solver advantages. */
  solverAdvantage: number[][];
  /** [N] V(q_i) from game sources, V_Q(q_i) from quality sources (weights applied). */
  value: number[];
  qualityValue: number[];
  /** [N] Challenger rewards and advantages. */
  challengerReward: number[];
  challengerAdvantage: number[];
  /** Fraction of groups whose total Solver rewards all coincide (no learning signal). */
  fracRewardZeroStd: number;
  /** Mean / unbiased std of the total Solver reward over all answers (TRL: reward, reward_std). */
  rewardMean: number;
  rewardStd: number;
  perSource: SourceStats[];
}

export function mean(xs: readonly number[]): number {
  if (xs.length === 0) return 0;
  let s = 0;
  for (const x of xs) s += x;
  return s / xs.length;
}

/** Unbiased (n - 1) std, as torch.std; 0 for fewer than two values. */
export function stdUnbiased(xs: readonly number[]): number {
  if (xs.length < 2) return 0;
  const m = mean(xs);
  let s = 0;
  for (const x of xs) s += (x - m) * (x - m);
  return Math.sqrt(s / (xs.length - 1));
}

function checkShapes(sources: readonly RewardSource[]): [number, number] {
  if (sources.length === 0) throw new Error('computeAdvantages: no reward sources');
  const n = sources[0].rewards.length;
  const g = n > 0 ? sources[0].rewards[0].length : 0;
  for (const s of sources) {
    if (s.rewards.length !== n) throw new Error(`reward source ${s.name}: expected ${n} queries, got ${s.rewards.length}`);
    for (const row of s.rewards) {
      if (row.length !== g) throw new Error(`reward source ${s.name}: expected ${g} answers per query, got ${row.length}`);
    }
  }
  return [n, g];
}

function weightedSum(sources: readonly RewardSource[], n: number, g: number, keep: (s: RewardSource) => boolean): number[][] {
  const out = Array.from({ length: n }, () => new Array<number>(g).fill(0));
  for (const s of sources) {
    if (!keep(s)) continue;
    for (let i = 0; i < n; i++) for (let j = 0; j < g; j++) out[i][j] += s.weight * s.rewards[i][j];
  }
  return out;
}

export function computeAdvantages(sources: readonly RewardSource[], opts: AdvantageOptions): Advantages {
  const [n, g] = checkShapes(sources);
  const eps = opts.stdEps ?? 1e-4;
  const qualityWeight = opts.challengerQualityWeight ?? 1;

  const solverReward = weightedSum(sources, n, g, () => true);
  const game = weightedSum(sources, n, g, (s) => s.kind === 'game');
  const quality = weightedSum(sources, n, g, (s) => s.kind === 'quality');

  const solverGroupMean = solverReward.map(mean);
  const solverGroupStd = solverReward.map(stdUnbiased);
  const solverAdvantage = solverReward.map((row, i) =>
    row.map((r) => {
      const centred = r - solverGroupMean[i];
      return opts.scale === 'group' ? centred / (solverGroupStd[i] + eps) : centred;
    }),
  );

  const value = game.map(mean);
  const qualityValue = quality.map(mean);
  const challengerReward = value.map((v, i) => -v + qualityWeight * qualityValue[i]);
  const cMean = mean(challengerReward);
  const cStd = stdUnbiased(challengerReward);
  const challengerAdvantage = challengerReward.map((c) =>
    opts.scale === 'group' ? (c - cMean) / (cStd + eps) : c - cMean,
  );

  // Zero spread as TRL tests it: torch.isclose(std, 0), i.e. |std| <= 1e-8.
  let zeroStd = 0;
  for (const s of solverGroupStd) if (s <= 1e-8) zeroStd++;

  const all = solverReward.flat();
  return {
    solverReward,
    solverGroupMean,
    solverGroupStd,
    solverAdvantage,
    value,
    qualityValue,
    challengerReward,
    challengerAdvantage,
    fracRewardZeroStd: n === 0 ? 0 : zeroStd / n,
    rewardMean: mean(all),
    rewardStd: stdUnbiased(all),
    perSource: sources.map((s) => {
      const flat = s.rewards.flat();
      return { name: s.name, mean: mean(flat), std: stdUnbiased(flat) };
    }),
  };
}
