/**
 * Float64 CPU reference for lmhead.ts: the full [N, V] log-softmax of h W^T / temperature,
 * with no chunking. Targets >= V are ignored positions (logp = 0).
 */
export function lmHeadRef(
  h: ArrayLike<number>,
  w: ArrayLike<number>,
  targets: ArrayLike<number>,
  N: number,
  C: number,
  V: number,
  temperature = 1,
) {
  const logp = new Float64Array(N);
  const entropy = new Float64Array(N);
  const lse = new Float64Array(N);
  const z = new Float64Array(V);
  for (let n = 0; n < N; n++) {
    let max = -Infinity;
    for (let v = 0; v < V; v++) {
      let s = 0;
      for (let c = 0; c < C; c++) s += h[n * C + c]! * w[v * C + c]!;
      z[v] = s / temperature;
      max = Math.max(max, z[v]!);
    }
    let sum = 0;
    for (let v = 0; v < V; v++) sum += Math.exp(z[v]! - max);
    const l = max + Math.log(sum);
    let ez = 0;
    for (let v = 0; v < V; v++) ez += Math.exp(z[v]! - l) * z[v]!;
    lse[n] = l;
    entropy[n] = l - ez;
    const t = targets[n]!;
    logp[n] = t < V ? z[t]! - l : 0;
  }
  return { logp, entropy, lse };
}
