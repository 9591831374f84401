/** Float64 CPU reference for embedding.ts: out[n, :] = table[ids[n], :], zeros for ids >= V. */
export function embeddingRef(table: ArrayLike<number>, ids: ArrayLike<number>, N: number, C: number): Float64Array {
  const V = table.length / C;
  const out = new Float64Array(N * C);
  for (let n = 0; n < N; n++) {
    const id = ids[n]!;
    if (id < 0 || id >= V) continue;
    for (let c = 0; c < C; c++) out[n * C + c] = table[id * C + c]!;
  }
  return out;
}
