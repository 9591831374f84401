/** Float64 CPU reference for matmul.ts: C (= or +=) alpha * op(A) op(B). */
export interface MatmulRefOptions {
  transA?: boolean;
  transB?: boolean;
  alpha?: number;
  /** Initial C to accumulate into (accumulate mode); zeros when absent. */
  c?: ArrayLike<number>;
}

export function matmulRef(a: ArrayLike<number>, b: ArrayLike<number>, M: number, N: number, K: number, opts: MatmulRefOptions = {}): Float64Array {
  const { transA = false, transB = false, alpha = 1 } = opts;
  const out = new Float64Array(M * N);
  for (let m = 0; m < M; m++) {
    for (let n = 0; n < N; n++) {
      let s = 0;
      for (let k = 0; k < K; k++) {
        const av = transA ? a[k * M + m]! : a[m * K + k]!;
        const bv = transB ? b[n * K + k]! : b[k * N + n]!;
        s += av * bv;
      }
      out[m * N + n] = alpha * s + (opts.c ? opts.c[m * N + n]! : 0);
    }
  }
  return out;
}
