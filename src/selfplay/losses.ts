/**
 * REINFORCE-with-KL losses of the two roles and their per-token gradients dL/dlogp.
 *
 * Per token t of sequence s (advantage A_s, estimator kl from kl.ts):
 *   l_st = -(A_s * logp_st - beta * kl_st)
 *   dl_st/dlogp_st = -A_s + beta * dkl_st/dlogp_st
 * A role's loss aggregates l_st with a coefficient c_s per sequence:
 *   grpo     c_s = 1 / (S * T_s)       mean over each sequence's tokens, then over sequences
 *   bnpo     c_s = 1 / sum_s T_s       mean over all tokens of this batch
 *   dr_grpo  c_s = 1 / (S * T_max)     T_max = the max completion length setting
 *   dapo     c_s = 1 / T_global        T_global = tokens of the whole global batch (every
 *                                      micro-batch of the gradient-accumulation step); given
 *                                      by the caller, it defaults to this batch's tokens, which
 *                                      makes dapo equal to bnpo. With accumulation, bnpo
 *                                      normalises each micro-batch by its own tokens and the
 *                                      trainer then averages micro-batches; dapo normalises
 *                                      every micro-batch by the same global count, so the
 *                                      accumulated gradient is an exact token mean.
 *   seq_sum  c_s = 1 / S               the paper's literal form: sequence log-prob summed
 * (S = number of sequences, T_s = tokens of s; an empty sequence contributes nothing.)
 * Then L = L_sol + alpha_ch * L_ch, and the Challenger's weights carry the alpha_ch factor.
 * The gradient at the sampled policy equals that of the stop-gradient-ratio form.
 *
 * Where the KL sits (klPlacement):
 *   'loss'   (default; the paper's formula and TRL): kl_st is differentiated directly, as above.
 *            Note that k1 used this way has zero expected gradient (E_pi[grad logp] = 0); only
 *            k3 then pulls the policy toward pi_ref in expectation.
 *   'reward' the KL is a stop-gradient penalty on the advantage, l_st = -(A_s - beta*sg(kl_st)) logp_st,
 *            so dl_st/dlogp_st = -(A_s - beta*kl_st). With k1 its expectation is the gradient of
 *            KL(pi || pi_ref) per token. Here tokenWeights are the gradient of that surrogate, not of
 *            the returned `loss` (which still reports pgLoss + beta*kl for metrics).
 */

import { type KlEstimator, klToken, klTokenGrad } from './kl';

export type LossAggregation = 'grpo' | 'bnpo' | 'dr_grpo' | 'dapo' | 'seq_sum';

export interface ScoredSequence {
  /** [T] log-probs of the sampled tokens under the policy. */
  logp: ArrayLike<number>;
  /** [T] the same tokens under the reference policy (adapter off). */
  logpRef: ArrayLike<number>;
  advantage: number;
}

export interface AggregationOptions {
  aggregation: LossAggregation;
  /** dr_grpo: the max completion length setting; defaults to the longest sequence given. */
  maxLength?: number;
  /** dapo: token count of the global batch; defaults to this batch's token count. */
  globalTokens?: number;
}

export interface RoleLoss {
  /** [S][T_s] dL/dlogp per token (role weight included). */
  tokenWeights: Float64Array[];
  /** Aggregated -A*logp (role weight not included). */
  pgLoss: number;
  /** Aggregated beta*kl (role weight not included). */
  klTerm: number;
  /** Aggregated kl without beta: the metric `kl`. */
  kl: number;
  /** pgLoss + klTerm. */
  loss: number;
}

export type KlPlacement = 'loss' | 'reward';

export interface LossOptions extends AggregationOptions {
  beta: number;
  klEstimator: KlEstimator;
  /** Default 'loss'; see the file comment. */
  klPlacement?: KlPlacement;
  /** Weight of the Challenger loss alpha_ch. */
  alphaCh: number;
  /** dr_grpo for the Challenger's queries: its max query length (defaults to the longest). */
  challengerMaxLength?: number;
  /** dapo for the Challenger: global query-token count (defaults to this batch's). */
  challengerGlobalTokens?: number;
}

export interface SelfPlayLoss {
  solver: RoleLoss;
  challenger: RoleLoss;
  /** L_sol + alpha_ch * L_ch. */
  loss: number;
}

/** Per-sequence aggregation coefficients c_s (see the file comment). */
export function aggregationCoefficients(lengths: readonly number[], opts: AggregationOptions): number[] {
  const s = lengths.length;
  if (s === 0) return [];
  const total = lengths.reduce((a, b) => a + b, 0);
  switch (opts.aggregation) {
    case 'grpo':
      return lengths.map((t) => (t === 0 ? 0 : 1 / (s * t)));
    case 'bnpo':
      return lengths.map(() => (total === 0 ? 0 : 1 / total));
    case 'dr_grpo': {
      const tMax = opts.maxLength ?? Math.max(...lengths);
      if (tMax > 0 && lengths.some((t) => t > tMax)) throw new Error(`dr_grpo: a sequence is longer than maxLength ${tMax}`);
      return lengths.map(() => (tMax === 0 ? 0 : 1 / (s * tMax)));
    }
    case 'dapo': {
      const global = opts.globalTokens ?? total;
      if (global < total) throw new Error(`dapo: globalTokens ${global} is below this batch's ${total} tokens`);
      return lengths.map(() => (global === 0 ? 0 : 1 / global));
    }
    case 'seq_sum':
      return lengths.map(() => 1 / s);
  }
}

export interface SequenceTerms {
  /** [T] dL/dlogp per token (coefficient and role weight included). */
  weights: Float64Array;
  /** This sequence's share of the aggregated -A*logp and of the aggregated kl (no beta). */
  pgLoss: number;
  kl: number;
}

/**
 * One sequence's per-token gradient and loss shares, given its aggregation coefficient
 * c_s. Summing the shares of every sequence with coefficients from aggregationCoefficients
 * over the whole batch gives roleLoss; the trainer uses this to process a batch in
 * micro-batches with the batch's own aggregation.
 */
export function sequenceTerms(
  q: ScoredSequence,
  coef: number,
  beta: number,
  klEstimator: KlEstimator,
  roleWeight = 1,
  klPlacement: KlPlacement = 'loss',
): SequenceTerms {
  if (q.logp.length !== q.logpRef.length) throw new Error(`sequence: ${q.logp.length} log-probs vs ${q.logpRef.length} reference`);
  let pgLoss = 0;
  let kl = 0;
  const w = new Float64Array(q.logp.length);
  for (let t = 0; t < w.length; t++) {
    const klt = klToken(klEstimator, q.logp[t], q.logpRef[t]);
    pgLoss += coef * -q.advantage * q.logp[t];
    kl += coef * klt;
    const dl = klPlacement === 'loss' ? -q.advantage + beta * klTokenGrad(klEstimator, q.logp[t], q.logpRef[t]) : -(q.advantage - beta * klt);
    w[t] = roleWeight * coef * dl;
  }
  return { weights: w, pgLoss, kl };
}

/** One role's aggregated loss and per-token dL/dlogp, every weight scaled by roleWeight. */
export function roleLoss(
  sequences: readonly ScoredSequence[],
  beta: number,
  klEstimator: KlEstimator,
  agg: AggregationOptions,
  roleWeight = 1,
  klPlacement: KlPlacement = 'loss',
): RoleLoss {
  const coef = aggregationCoefficients(sequences.map((q) => q.logp.length), agg);
  let pgLoss = 0;
  let kl = 0;
  const tokenWeights = sequences.map((q, s) => {
    const terms = sequenceTerms(q, coef[s]!, beta, klEstimator, roleWeight, klPlacement);
    pgLoss += terms.pgLoss;
    kl += terms.kl;
    return terms.weights;
  });
  const klTerm = beta * kl;
  return { tokenWeights, pgLoss, klTerm, kl, loss: pgLoss + klTerm };
}

/** L = L_sol + alpha_ch * L_ch over the Solver's answers and the Challenger's queries. */
export function selfPlayLoss(
  answers: readonly ScoredSequence[],
  queries: readonly ScoredSequence[],
  opts: LossOptions,
): SelfPlayLoss {
  const solver = roleLoss(answers, opts.beta, opts.klEstimator, opts, 1, opts.klPlacement);
  const challenger = roleLoss(
    queries,
    opts.beta,
    opts.klEstimator,
    { aggregation: opts.aggregation, maxLength: opts.challengerMaxLength, globalTokens: opts.challengerGlobalTokens },
    opts.alphaCh,
    opts.klPlacement,
  );
  return { solver, challenger, loss: solver.loss + opts.alphaCh * challenger.loss };
}
