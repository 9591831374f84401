/** Float64 CPU references for optim.ts, written as PyTorch's clip_grad_norm_ and AdamW compute them. */
import type { AdamWHyper } from './optim';

export function globalGradNormRef(grads: readonly ArrayLike<number>[]): number {
  let ss = 0;
  for (const g of grads) for (let i = 0; i < g.length; i++) ss += g[i]! * g[i]!;
  return Math.sqrt(ss);
}

/** { coef, skip } for a norm; maxNorm null means no clipping (coef 1) but still the NaN/Inf guard. */
export function clipCoefficientRef(norm: number, maxNorm: number | null): { coef: number; skip: boolean } {
  if (!Number.isFinite(norm)) return { coef: 0, skip: true };
  return { coef: maxNorm === null ? 1 : Math.min(1, maxNorm / (norm + 1e-6)), skip: false };
}

/** One AdamW step in place on float64 state (torch.optim.AdamW, amsgrad off, maximize off). */
export function adamwStepRef(
  param: Float64Array,
  grad: ArrayLike<number>,
  m: Float64Array,
  v: Float64Array,
  hp: AdamWHyper,
  coef = 1,
): void {
  const { lr, beta1, beta2, eps, weightDecay, step } = hp;
  const bc1 = 1 - beta1 ** step;
  const bc2 = 1 - beta2 ** step;
  for (let i = 0; i < param.length; i++) {
    const g = grad[i]! * coef;
    param[i] = param[i]! * (1 - lr * weightDecay);
    m[i] = beta1 * m[i]! + (1 - beta1) * g;
    v[i] = beta2 * v[i]! + (1 - beta2) * g * g;
    const denom = Math.sqrt(v[i]!) / Math.sqrt(bc2) + eps;
    param[i] = param[i]! - (lr / bc1) * (m[i]! / denom);
  }
}
