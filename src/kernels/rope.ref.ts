/**
 * Float64 CPU reference for rope.ts. The angle is the f32 product of the position and
 * the f32 inverse frequency (what PyTorch's fp32 `inv_freq @ position_ids` yields);
 * everything after that is float64. `sign` -1 gives the backward (inverse rotation).
 */
export function ropeRef(
  x: ArrayLike<number>,
  invFreq: ArrayLike<number>,
  positions: ArrayLike<number>,
  N: number,
  heads: number,
  D: number,
  sign: 1 | -1 = 1,
): Float64Array {
  const half = D / 2;
  const out = new Float64Array(N * heads * D);
  for (let n = 0; n < N; n++) {
    for (let i = 0; i < half; i++) {
      const a = Math.fround(Math.fround(positions[n]!) * Math.fround(invFreq[i]!));
      const c = Math.cos(a);
      const s = sign * Math.sin(a);
      for (let h = 0; h < heads; h++) {
        const lo = (n * heads + h) * D + i;
        const x1 = x[lo]!;
        const x2 = x[lo + half]!;
        out[lo] = x1 * c - x2 * s;
        out[lo + half] = x2 * c + x1 * s;
      }
    }
  }
  return out;
}
