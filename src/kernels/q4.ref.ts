/**
 * Float64 CPU reference for the 4-bit layout (q4-layout.ts): the quantizer rule the
 * GPU quantizer must reproduce exactly, and the dequantizer every q4 kernel is
 * checked against.
 *
 * Rule (round-to-nearest, per block of 32 along K; scales rounded to f16 first):
 *   asymmetric (zero points): lo = min(0, min x), hi = max(0, max x),
 *     scale = (hi - lo) / 15, zero = clamp(roundEven(-lo / scale), 0, 15)
 *   symmetric (no zero points, zero = 8): scale = max|x| / 7
 *   q = clamp(roundEven(x / scale) + zero, 0, 15)   (q = zero when scale == 0)
 */
import { f16ToF32, f32ToF16 } from '../gpu/gpu';
import { Q4_BLOCK, Q4_BLOCK_BYTES, q4Blocks } from './q4-layout';

export interface Q4Packed {
  M: number;
  K: number;
  /** [M, nb, 16] */
  qweight: Uint8Array;
  /** f16 bits [M, nb] */
  scales: Uint16Array;
  /** [M, ceil(nb/2)] 4-bit zero points, or null (zero point 8) */
  zeros: Uint8Array | null;
}

export function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

export function quantizeQ4Ref(w: ArrayLike<number>, M: number, K: number, withZeros = true): Q4Packed {
  const nb = q4Blocks(K);
  const zb = Math.ceil(nb / 2);
  const qweight = new Uint8Array(M * nb * Q4_BLOCK_BYTES);
  const scales = new Uint16Array(M * nb);
  const zeros = withZeros ? new Uint8Array(M * zb) : null;
  for (let m = 0; m < M; m++) {
    for (let b = 0; b < nb; b++) {
      const k0 = b * Q4_BLOCK;
      const k1 = Math.min(K, k0 + Q4_BLOCK);
      let lo = 0;
      let hi = 0;
      let amax = 0;
      for (let k = k0; k < k1; k++) {
        const v = w[m * K + k]!;
        lo = Math.min(lo, v);
        hi = Math.max(hi, v);
        amax = Math.max(amax, Math.abs(v));
      }
      const rawScale = withZeros ? (hi - lo) / 15 : amax / 7;
      const scaleBits = f32ToF16([rawScale])[0]!;
      const scale = f16ToF32(Uint16Array.of(scaleBits))[0]!;
      scales[m * nb + b] = scaleBits;
      let zero = 8;
      if (withZeros) {
        zero = scale > 0 ? Math.min(15, Math.max(0, roundHalfEven(-lo / scale))) : 0;
        const zi = m * zb + (b >> 1);
        zeros![zi] = zeros![zi]! | (zero << ((b & 1) * 4));
      }
      for (let j = 0; j < Q4_BLOCK; j++) {
        const k = k0 + j;
        let q = 0;
        if (k < K) {
          const v = w[m * K + k]!;
          q = scale > 0 ? Math.min(15, Math.max(0, roundHalfEven(v / scale) + zero)) : zero;
        }
        const byte = (m * nb + b) * Q4_BLOCK_BYTES + (j >> 1);
        qweight[byte] = qweight[byte]! | (q << ((j & 1) * 4));
      }
    }
  }
  return { M, K, qweight, scales, zeros };
}

/** The [M, K] float64 matrix the packed weight stands for. */
export function dequantizeQ4Ref(p: Q4Packed): Float64Array {
  const { M, K } = p;
  const nb = q4Blocks(K);
  const zb = Math.ceil(nb / 2);
  const scale = f16ToF32(p.scales);
  const out = new Float64Array(M * K);
  for (let m = 0; m < M; m++) {
    for (let k = 0; k < K; k++) {
      const b = Math.floor(k / Q4_BLOCK);
      const j = k % Q4_BLOCK;
      const q = (p.qweight[(m * nb + b) * Q4_BLOCK_BYTES + (j >> 1)]! >> ((j & 1) * 4)) & 15;
      const zero = p.zeros ? (p.zeros[m * zb + (b >> 1)]! >> ((b & 1) * 4)) & 15 : 8;
      out[m * K + k] = (q - zero) * scale[m * nb + b]!;
    }
  }
  return out;
}
