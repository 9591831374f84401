/**
 * Frozen linear weights behind one interface (lmhead.ts's VocabProjection): the
 * 4-bit weights of a quantized model and plain f32 weights both serve the LoRA
 * linear op and the LM head, row slices included.
 */
import { f32VocabProjection, type VocabProjection } from './lmhead';
import { q4Matmul, q4MatmulBackward } from './q4';
import type { Q4Weight } from './q4-layout';

export type FrozenLinear = VocabProjection;

export function q4Linear(W: Q4Weight): FrozenLinear {
  return {
    V: W.M,
    C: W.K,
    logits(gpu, out, h, N, rowStart, rows, accumulate = false) {
      q4Matmul(gpu, out, h, W, N, { rowStart, rowCount: rows, accumulate });
    },
    backward(gpu, dh, dlogits, N, rowStart, rows, accumulate) {
      q4MatmulBackward(gpu, dh, dlogits, W, N, { rowStart, rowCount: rows, accumulate });
    },
  };
}

export const f32Linear = f32VocabProjection;
