/**
 * CPU reference for the non-finite count quantizeQ4 takes on request (quantize.ts):
 * every value decoded to a float64 the long way (sign, exponent, mantissa) and tested
 * with Number.isFinite, independent of the kernel's exponent-bit test.
 */
import type { Q4SourceType } from './quantize';

function f16Number(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 31;
  const m = h & 1023;
  if (e === 31) return m ? NaN : s * Infinity;
  return e === 0 ? s * m * 2 ** -24 : s * (1 + m / 1024) * 2 ** (e - 15);
}

/** The number of non-finite values among the first `count` values of raw little-endian `bytes`. */
export function countNonFiniteRef(bytes: Uint8Array, type: Q4SourceType, count: number): number {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let n = 0;
  for (let i = 0; i < count; i++) {
    const v =
      type === 'f32' ? view.getFloat32(4 * i, true) : type === 'bf16' ? new Float32Array(new Uint32Array([view.getUint16(2 * i, true) << 16]).buffer)[0]! : f16Number(view.getUint16(2 * i, true));
    if (!Number.isFinite(v)) n++;
  }
  return n;
}
