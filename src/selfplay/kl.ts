/**
 * Per-token KL estimators of pi against pi_ref from sampled tokens.
 *   k1 = logp - logp_ref                       (the paper: the sampled log-ratio)
 *   k3 = exp(r) - r - 1,  r = logp_ref - logp  (TRL: unbiased, always >= 0)
 * and their derivatives with respect to logp, so a trainer can form dL/dlogp:
 *   d k1 / d logp = 1
 *   d k3 / d logp = 1 - exp(r)      (dr/dlogp = -1)
 */

export type KlEstimator = 'k1' | 'k3';

export function klToken(estimator: KlEstimator, logp: number, logpRef: number): number {
  if (estimator === 'k1') return logp - logpRef;
  const r = logpRef - logp;
  return Math.exp(r) - r - 1;
}

export function klTokenGrad(estimator: KlEstimator, logp: number, logpRef: number): number {
  if (estimator === 'k1') return 1;
  return 1 - Math.exp(logpRef - logp);
}

function checkLengths(logp: ArrayLike<number>, logpRef: ArrayLike<number>): void {
  if (logp.length !== logpRef.length) throw new Error(`kl: ${logp.length} log-probs vs ${logpRef.length} reference log-probs`);
}

/** [T] per-token KL of one sequence. */
export function klPerToken(estimator: KlEstimator, logp: ArrayLike<number>, logpRef: ArrayLike<number>): Float64Array {
  checkLengths(logp, logpRef);
  const out = new Float64Array(logp.length);
  for (let t = 0; t < logp.length; t++) out[t] = klToken(estimator, logp[t], logpRef[t]);
  return out;
}

/** [T] per-token d(kl_t)/d(logp_t) of one sequence. */
export function klGradPerToken(estimator: KlEstimator, logp: ArrayLike<number>, logpRef: ArrayLike<number>): Float64Array {
  checkLengths(logp, logpRef);
  const out = new Float64Array(logp.length);
  for (let t = 0; t < logp.length; t++) out[t] = klTokenGrad(estimator, logp[t], logpRef[t]);
  return out;
}

/** Sum and token mean of one sequence's KL (mean is 0 for an empty sequence). */
export function klSequence(estimator: KlEstimator, logp: ArrayLike<number>, logpRef: ArrayLike<number>): { sum: number; mean: number } {
  const kl = klPerToken(estimator, logp, logpRef);
  let sum = 0;
  for (const k of kl) sum += k;
  return { sum, mean: kl.length === 0 ? 0 : sum / kl.length };
}
