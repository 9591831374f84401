/**
 * Weight fixtures and float64 references shared by the 4-bit kernel tests.
 */
import { f16ToF32, f32ToF16 } from '../../src/gpu/gpu';
import type { Gpu } from '../../src/gpu/gpu';
import type { Tensor } from '../../src/gpu/tensor';
import { Rng } from './numeric';

/** y[n, r] = sum_k x[n, k] * w[rowStart + r, k], in float64. */
export function q4MatmulRef(x: ArrayLike<number>, w: ArrayLike<number>, N: number, K: number, rowStart: number, rowCount: number): Float64Array {
  const y = new Float64Array(N * rowCount);
  for (let n = 0; n < N; n++) {
    for (let r = 0; r < rowCount; r++) {
      let s = 0;
      const wo = (rowStart + r) * K;
      for (let k = 0; k < K; k++) s += x[n * K + k]! * w[wo + k]!;
      y[n * rowCount + r] = s;
    }
  }
  return y;
}

/** dx[n, k] = sum_r dy[n, r] * w[rowStart + r, k], in float64. */
export function q4MatmulBackwardRef(dy: ArrayLike<number>, w: ArrayLike<number>, N: number, K: number, rowStart: number, rowCount: number): Float64Array {
  const dx = new Float64Array(N * K);
  for (let n = 0; n < N; n++) {
    for (let r = 0; r < rowCount; r++) {
      const d = dy[n * rowCount + r]!;
      const wo = (rowStart + r) * K;
      for (let k = 0; k < K; k++) dx[n * K + k] += d * w[wo + k]!;
    }
  }
  return dx;
}

/** Gaussian weights scaled like a linear layer's (std 0.05), with a few blocks set to zero. */
export function randomWeights(rng: Rng, M: number, K: number): Float32Array {
  const w = rng.f32(M * K, 0.05);
  if (M * K >= 64) w.fill(0, 32, 64);
  return w;
}

/** f16 midpoint (between two adjacent f16 values) near x. */
function f16Midpoint(x: number): number {
  const h = f32ToF16([x])[0]! & 0x7bff;
  const [a, b] = f16ToF32(Uint16Array.of(h, h + 1));
  return (a! + b!) / 2;
}

function ulp32(x: number): number {
  const e = Math.floor(Math.log2(Math.abs(x)));
  return 2 ** (e - 23);
}

/**
 * Blocks of 32 that stress the quantizer's rounding rules, each row one block:
 * all zeros, one-signed and constant blocks, exact ties of v / scale and of the zero
 * point, scales whose float64 -> f32 -> f16 rounding differs from rounding the exact
 * quotient once, f16-subnormal, zero and infinite scales, operands of very different
 * magnitudes and f32 subnormals. Returns [M, 32] values.
 */
export function edgeBlocks(rng: Rng): Float32Array {
  const blocks: number[][] = [];
  const block = (f: (j: number) => number) => blocks.push(Array.from({ length: 32 }, (_, j) => f(j)));
  block(() => 0);
  block(() => rng.uniform(0.1, 1));
  block(() => -rng.uniform(0.1, 1));
  block(() => 0.37);
  block(() => -0.37);
  block((j) => (j === 5 ? 2.5 : 0));
  // scale = 7/512 exactly (f16); values on exact half-way points of v / scale
  const s = 7 / 512;
  block((j) => (j === 0 ? 7 * s : j === 1 ? -8 * s : (((j % 15) - 7) + 0.5) * s));
  block((j) => (j === 0 ? 7.5 * s : j === 1 ? -7.5 * s : ((j % 14) - 7 + 0.5) * s)); // zero point 7.5 -> 8
  block((j) => (j === 0 ? 8.5 * s : j === 1 ? -6.5 * s : ((j % 13) - 6 + 0.5) * s)); // zero point 6.5 -> 6
  block((j) => (j === 0 ? 7 * s : ((j % 15) - 7 + 0.5) * s)); // symmetric ties: amax / 7 = s
  // hi = 15 * (an f16 midpoint), lo a fraction of hi's ulp below zero
  for (const frac of [0, 0.3, 0.45, 0.47, 0.48, 0.49, 0.5, 0.51, 0.75, 1.5, 2 ** -20]) {
    for (const base of [0.3, 0.011, 3.3]) {
      const hi = Math.fround(15 * f16Midpoint(base * rng.uniform(0.9, 1.1)));
      const lo = -Math.fround(frac * ulp32(hi));
      block((j) => (j === 0 ? hi : j === 1 ? lo : rng.uniform(lo, hi)));
      // same for the symmetric rule: amax = 7 * midpoint
      const amax = Math.fround(7 * f16Midpoint(base));
      block((j) => (j === 0 ? amax : j === 1 ? -Math.fround(frac * ulp32(amax)) : rng.uniform(-amax, amax)));
    }
  }
  block(() => rng.uniform(-1, 1) * 1e-5); // f16-subnormal scale
  block(() => rng.uniform(-1, 1) * 4e-7);
  block(() => rng.uniform(-1, 1) * 1e-9); // scale rounds to 0
  block((j) => (j === 3 ? 3e-7 : 0));
  block(() => rng.uniform(-1, 1) * 2e6); // scale rounds to f16 infinity
  block((j) => (j === 0 ? 1 : j === 1 ? -(2 ** -40) * 1.2345 : 0)); // sum beyond 53 bits
  block((j) => (j === 0 ? 2 ** -20 : j === 1 ? -3 : rng.uniform(-3, 0)));
  block((j) => (j % 3 === 0 ? 1e-40 : j % 3 === 1 ? -3e-41 : 0)); // f32 subnormals
  block((j) => (j % 2 === 0 ? 1e-40 : 0.25));
  // random magnitudes across many binades
  for (let i = 0; i < 24; i++) block(() => (rng.next() < 0.5 ? -1 : 1) * 2 ** rng.uniform(-30, 6) * (rng.next() < 0.1 ? 0 : 1));
  return Float32Array.from(blocks.flat());
}

/** Values as f16 bits (round to nearest even), kept finite (|v| <= 65504). */
export function toF16Bits(v: Float32Array): Uint16Array {
  return f32ToF16(Array.from(v, (x) => Math.max(-65504, Math.min(65504, x))));
}

/** Values as bf16 bits (round to nearest even). */
export function toBf16Bits(v: Float32Array): Uint16Array {
  const u = new Uint32Array(v.buffer.slice(v.byteOffset, v.byteOffset + v.byteLength));
  const out = new Uint16Array(v.length);
  for (let i = 0; i < v.length; i++) {
    const x = u[i]!;
    out[i] = (x + 0x7fff + ((x >>> 16) & 1)) >>> 16;
  }
  return out;
}

export function bf16ToF32(h: Uint16Array): Float32Array {
  const u = new Uint32Array(h.length);
  for (let i = 0; i < h.length; i++) u[i] = h[i]! << 16;
  return new Float32Array(u.buffer);
}

/** Uploads 16-bit values packed two per u32 word (low half = even element). */
export function upload16(gpu: Gpu, bits: Uint16Array): Tensor {
  const padded = new Uint16Array(bits.length + (bits.length & 1));
  padded.set(bits);
  return gpu.upload(padded, [padded.length / 2], 'u32', 'q4-test.src16');
}
