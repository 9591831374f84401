/**
 * Frozen linear weights behind one interface (lmhead.ts's VocabProjection): the
 * 4-bit weights of a quantized model and plain f32 weights both serve the LoRA
 * linear op and the LM head, row slices included.
 */
import { f32VocabProjection, type VocabProjection } from './lmhead';
import { q4Matmul, q4MatmulBackward } from './q4';
import type { Q4Weight } from './q4-layout';

export type FrozenLinear = VocabProjection;

/** Rows [rowStart, rowStart + rows) of a 4-bit weight that a linear layer is. */
export interface Q4Rows {
  W: Q4Weight;
  rowStart: number;
  rows: number;
}

const q4Weights = new WeakMap<FrozenLinear, Q4Rows>();

/** The 4-bit rows behind a q4Linear / q4RowsLinear (fused decode kernels bind them directly), or null for other linears. */
export function q4RowsOf(linear: FrozenLinear): Q4Rows | null {
  return q4Weights.get(linear) ?? null;
}

/**
 * Rows [first, first + rows) of W as a linear layer of its own: one projection of a
 * packed weight (q, k and v stacked in one Q4Weight, read by one fused GEMV).
 */
export function q4RowsLinear(W: Q4Weight, first: number, rows: number): FrozenLinear {
  if (!(Number.isInteger(first) && Number.isInteger(rows) && first >= 0 && rows >= 1 && first + rows <= W.M)) {
    throw new Error(`q4RowsLinear: rows [${first}, ${first + rows}) are outside the weight's ${W.M} rows`);
  }
  const check = (rowStart: number, count: number) => {
    if (rowStart < 0 || rowStart + count > rows) throw new Error(`q4RowsLinear: rows [${rowStart}, ${rowStart + count}) are outside this projection's ${rows}`);
  };
  const linear: FrozenLinear = {
    V: rows,
    C: W.K,
    logits(gpu, out, h, N, rowStart, count, accumulate = false) {
      check(rowStart, count);
      q4Matmul(gpu, out, h, W, N, { rowStart: first + rowStart, rowCount: count, accumulate });
    },
    backward(gpu, dh, dlogits, N, rowStart, count, accumulate) {
      check(rowStart, count);
      q4MatmulBackward(gpu, dh, dlogits, W, N, { rowStart: first + rowStart, rowCount: count, accumulate });
    },
  };
  q4Weights.set(linear, { W, rowStart: first, rows });
  return linear;
}

export function q4Linear(W: Q4Weight): FrozenLinear {
  const linear: FrozenLinear = {
    V: W.M,
    C: W.K,
    logits(gpu, out, h, N, rowStart, rows, accumulate = false) {
      q4Matmul(gpu, out, h, W, N, { rowStart, rowCount: rows, accumulate });
    },
    backward(gpu, dh, dlogits, N, rowStart, rows, accumulate) {
      q4MatmulBackward(gpu, dh, dlogits, W, N, { rowStart, rowCount: rows, accumulate });
    },
  };
  q4Weights.set(linear, { W, rowStart: 0, rows: W.M });
  return linear;
}

export const f32Linear = f32VocabProjection;
