/** Float64 CPU reference for rmsnorm.ts. */
export function rmsnormRef(x: ArrayLike<number>, w: ArrayLike<number>, N: number, C: number, eps: number) {
  const out = new Float64Array(N * C);
  const rstd = new Float64Array(N);
  for (let n = 0; n < N; n++) {
    let ss = 0;
    for (let c = 0; c < C; c++) ss += x[n * C + c]! ** 2;
    const r = 1 / Math.sqrt(ss / C + eps);
    rstd[n] = r;
    for (let c = 0; c < C; c++) out[n * C + c] = w[c]! * x[n * C + c]! * r;
  }
  return { out, rstd };
}
