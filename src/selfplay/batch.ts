/**
 * Prompt + completion sequences as a right-padded TokenBatch whose targets are the
 * completion tokens only, and the map from each completion token to its row.
 */
import type { TokenBatch } from '../model/llama';

export interface Completion {
  prompt: readonly number[];
  completion: readonly number[];
}

export interface CompletionBatch {
  batch: TokenBatch;
  /** Per sequence: the row of each completion token's log-prob in the pass's [B*T] output. */
  rows: number[][];
}

/** Row t of a sequence predicts token t+1, so completion token j sits at row P-1+j. */
export function completionBatch(seqs: readonly Completion[], V: number): CompletionBatch {
  if (seqs.length === 0) throw new Error('completionBatch: no sequences');
  const T = Math.max(...seqs.map((s) => s.prompt.length + s.completion.length));
  const B = seqs.length;
  const ids = new Uint32Array(B * T);
  const targets = new Uint32Array(B * T).fill(V);
  const rows: number[][] = [];
  const lengths: number[] = [];
  seqs.forEach((s, b) => {
    if (s.prompt.length === 0) throw new Error(`completionBatch: sequence ${b} has an empty prompt`);
    ids.set(s.prompt, b * T);
    ids.set(s.completion, b * T + s.prompt.length);
    const r: number[] = [];
    for (let j = 0; j < s.completion.length; j++) {
      const row = b * T + s.prompt.length - 1 + j;
      targets[row] = s.completion[j]!;
      r.push(row);
    }
    rows.push(r);
    lengths.push(s.prompt.length + s.completion.length);
  });
  return { batch: { ids, B, T, lengths, targets }, rows };
}

/** Splits 0..n-1 into consecutive chunks of at most `size`. */
export function chunks(n: number, size: number): number[][] {
  const out: number[][] = [];
  for (let i = 0; i < n; i += size) out.push(Array.from({ length: Math.min(size, n - i) }, (_, k) => i + k));
  return out;
}
