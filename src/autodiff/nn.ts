/**
 * The model-level differentiable ops: a frozen linear layer with an optional LoRA
 * adapter, RoPE, causal attention and the fused LM-head log-prob. Parameter grads
 * (LoRA A and B) are accumulated straight into their leaves' grad buffers.
 */
import type { Tensor } from '../gpu/tensor';
import { attentionBackward, attentionForward } from '../kernels/attention';
import { embeddingForwardF32, scatterAddRowsF32 } from '../kernels/embedding';
import type { FrozenLinear } from '../kernels/linear';
import { lmHeadBackward, lmHeadForward } from '../kernels/lmhead';
import { matmul } from '../kernels/matmul';
import { SMALL_K, rowsBackward, rowsForward } from '../kernels/smallk';
import { ropeBackward, ropeForward } from '../kernels/rope';
import { op } from './ops';
import type { Tape, Var } from './tape';

export interface Lora {
  /** [R, K] */
  A: Var;
  /** [M, R] */
  B: Var;
  /** alpha / r, or alpha / sqrt(r) with rsLoRA */
  scale: number;
}

/** Returns the leaf's own grad buffer to accumulate into, or a fresh zeroed one to hand back. */
function gradTarget(tape: Tape, v: Var): { t: Tensor; fresh: boolean } {
  return v.grad ? { t: v.grad, fresh: false } : { t: tape.gpu.zeros(v.shape), fresh: true };
}

/**
 * A small model's LoRA products (both of the layer's widths at most SMALL_K) run on the
 * barrier-free row kernels, as its base projection does; the tiled matmul otherwise.
 */
function smallLora(base: FrozenLinear): boolean {
  return base.C <= SMALL_K && base.V <= SMALL_K;
}

const linearOp = op<{ base: FrozenLinear; scale: number; N: number; R: number; lora: boolean }>({
  name: 'lora_linear',
  forward: (tape, inputs, { base, scale, N, R, lora }) => {
    const gpu = tape.gpu;
    const [x, A, B] = inputs;
    const y = gpu.empty([N, base.V]);
    base.logits(gpu, y, x!.value, N, 0, base.V);
    if (!lora) return { outputs: [y] };
    const u = gpu.empty([N, R]);
    if (smallLora(base)) {
      rowsForward(gpu, u, x!.value, A!.value, N, base.C, 0, R);
      rowsForward(gpu, y, u, B!.value, N, R, 0, base.V, true, scale);
    } else {
      matmul(gpu, u, x!.value, A!.value, N, R, base.C, { transB: true });
      matmul(gpu, y, u, B!.value, N, base.V, R, { transB: true, alpha: scale, accumulate: true });
    }
    return { outputs: [y], saved: [u] };
  },
  backward: (tape, [dy], inputs, saved, _outputs, { base, scale, N, R, lora }) => {
    const gpu = tape.gpu;
    const [x, A, B] = inputs;
    const [M, K] = [base.V, base.C];
    let dx: Tensor | null = null;
    if (x!.requiresGrad) {
      dx = gpu.empty([N, K]);
      base.backward(gpu, dx, dy!, N, 0, M, false);
    }
    if (!lora) return [dx];
    const u = saved[0]!;
    const du = gpu.empty([N, R]);
    if (smallLora(base)) {
      rowsBackward(gpu, du, dy!, B!.value, N, R, 0, M, false, scale);
      if (dx) rowsBackward(gpu, dx, du, A!.value, N, K, 0, R, true);
    } else {
      matmul(gpu, du, dy!, B!.value, N, R, M, { alpha: scale });
      if (dx) matmul(gpu, dx, du, A!.value, N, K, R, { accumulate: true });
    }
    let gA: Tensor | null = null;
    let gB: Tensor | null = null;
    if (B!.requiresGrad) {
      const tB = gradTarget(tape, B!);
      matmul(gpu, tB.t, dy!, u, M, R, N, { transA: true, alpha: scale, accumulate: true });
      if (tB.fresh) gB = tB.t;
    }
    if (A!.requiresGrad) {
      const tA = gradTarget(tape, A!);
      matmul(gpu, tA.t, du, x!.value, R, K, N, { transA: true, accumulate: true });
      if (tA.fresh) gA = tA.t;
    }
    du.release();
    return [dx, gA, gB];
  },
});

/** y [N, M] = x W^T (+ scale * (x A^T) B^T when a LoRA adapter is attached and enabled). */
export function linear(tape: Tape, x: Var, base: FrozenLinear, lora: Lora | null): Var {
  const N = x.value.size / base.C;
  if (!Number.isInteger(N)) throw new Error(`linear: input ${x.value} is not a multiple of ${base.C} features`);
  if (!lora) return linearOp(tape, [x], { base, scale: 0, N, R: 0, lora: false })[0]!;
  const R = lora.A.shape[0]!;
  return linearOp(tape, [x, lora.A, lora.B], { base, scale: lora.scale, N, R, lora: true })[0]!;
}

const ropeOp = op<{ invFreq: Tensor; positions: Tensor; N: number; heads: number; D: number }>({
  name: 'rope',
  forward: (tape, [x], { invFreq, positions, N, heads, D }) => {
    const out = tape.gpu.empty(x!.shape);
    ropeForward(tape.gpu, out, x!.value, invFreq, positions, N, heads, D);
    return { outputs: [out] };
  },
  backward: (tape, [g], _in, _s, _o, { invFreq, positions, N, heads, D }) => {
    const dx = tape.gpu.empty(g!.shape);
    ropeBackward(tape.gpu, dx, g!, invFreq, positions, N, heads, D);
    return [dx];
  },
});

/** Rotary embedding of x [N, heads, D] at positions (u32 [N]). */
export function rope(tape: Tape, x: Var, invFreq: Tensor, positions: Tensor, heads: number, D: number): Var {
  return ropeOp(tape, [x], { invFreq, positions, N: x.value.size / (heads * D), heads, D })[0]!;
}

interface AttnDims {
  B: number;
  T: number;
  H: number;
  HK: number;
  D: number;
}

const attentionOp = op<AttnDims>({
  name: 'attention',
  forward: (tape, [q, k, v], { B, T, H, HK, D }) => {
    const out = tape.gpu.empty([B * T, H * D]);
    const lse = tape.gpu.empty([B, H, T]);
    attentionForward(tape.gpu, out, lse, q!.value, k!.value, v!.value, B, T, T, H, HK, D);
    return { outputs: [out], saved: [lse] };
  },
  backward: (tape, [g], [q, k, v], [lse], [out], { B, T, H, HK, D }) => {
    const gpu = tape.gpu;
    const dq = gpu.empty(q!.shape);
    const dk = gpu.empty(k!.shape);
    const dv = gpu.empty(v!.shape);
    attentionBackward(gpu, dq, dk, dv, g!, out!, lse!, q!.value, k!.value, v!.value, B, T, T, H, HK, D);
    return [dq, dk, dv];
  },
});

/** Causal grouped-query self-attention over B sequences of T tokens: q [B*T, H*D], k/v [B*T, HK*D]. */
export function attention(tape: Tape, q: Var, k: Var, v: Var, dims: AttnDims): Var {
  return attentionOp(tape, [q, k, v], dims)[0]!;
}

const tokenLogpOp = op<{ proj: FrozenLinear; targets: Tensor; N: number; temperature: number; entropy: boolean }>({
  name: 'token_logp',
  forward: (tape, [h], { proj, targets, N, temperature, entropy }) => {
    const gpu = tape.gpu;
    const logp = gpu.empty([N]);
    const lse = gpu.empty([N]);
    const ent = entropy ? gpu.empty([N]) : null;
    lmHeadForward(gpu, { logp, lse, entropy: ent }, h!.value, targets, proj, N, { temperature });
    return { outputs: ent ? [logp, ent] : [logp], saved: [lse] };
  },
  backward: (tape, [dlogp], [h], [lse], _o, { proj, targets, N, temperature }) => {
    if (!dlogp) return [null];
    const dh = tape.gpu.empty(h!.shape);
    lmHeadBackward(tape.gpu, dh, dlogp, h!.value, targets, lse!, proj, N, { temperature });
    return [dh];
  },
});

/**
 * Per-position log-prob of `targets` (u32 [N]) under softmax(h W^T / temperature),
 * computed in vocabulary chunks; with `entropy`, also the per-position entropy
 * (returned as a second, non-differentiated output).
 */
export function tokenLogp(
  tape: Tape,
  h: Var,
  proj: FrozenLinear,
  targets: Tensor,
  opts: { temperature?: number; entropy?: boolean } = {},
): { logp: Var; entropy: Var | null } {
  const N = h.value.size / proj.C;
  const outs = tokenLogpOp(tape, [h], { proj, targets, N, temperature: opts.temperature ?? 1, entropy: !!opts.entropy });
  return { logp: outs[0]!, entropy: outs[1] ?? null };
}

const gatherRowsOp = op<{ rows: Tensor; M: number; N: number; C: number }>({
  name: 'gatherRows',
  forward: (tape, [x], { rows, M, C }) => {
    const out = tape.gpu.empty([M, C]);
    embeddingForwardF32(tape.gpu, out, rows, x!.value, M, C);
    return { outputs: [out] };
  },
  backward: (tape, [g], _inputs, _saved, _outputs, { rows, M, N, C }) => {
    const dx = tape.gpu.zeros([N, C]);
    scatterAddRowsF32(tape.gpu, dx, rows, g!, M, N, C);
    return [dx];
  },
});

/** x[rows[m], :] for m < M (x [N, C], rows u32 [M], distinct): picks the rows that are scored. */
export function gatherRows(tape: Tape, x: Var, rows: Tensor, M: number): Var {
  const N = x.value.shape[0]!;
  const C = x.value.size / N;
  return gatherRowsOp(tape, [x], { rows, M, N, C })[0]!;
}
