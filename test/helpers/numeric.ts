/** Seeded RNG (mulberry32) and comparison helpers shared by every kernel test. */
export class Rng {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0;
  }
  next(): number {
    let t = (this.s = (this.s + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  uniform(lo = -1, hi = 1): number {
    return lo + (hi - lo) * this.next();
  }
  normal(): number {
    const u = Math.max(this.next(), 1e-12);
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * this.next());
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  f32(n: number, scale = 1): Float32Array {
    const a = new Float32Array(n);
    for (let i = 0; i < n; i++) a[i] = this.normal() * scale;
    return a;
  }
}

export interface CloseOptions {
  atol?: number;
  rtol?: number;
  label?: string;
}

/**
 * Throws unless |a - e| <= atol + rtol * |e| everywhere; the message names the worst
 * element (index, both values, error), the count of violations and the max error.
 */
export function expectClose(actual: ArrayLike<number>, expected: ArrayLike<number>, opts: CloseOptions = {}): void {
  const { atol = 1e-5, rtol = 1e-4, label = 'values' } = opts;
  if (actual.length !== expected.length) {
    throw new Error(`${label}: length ${actual.length} != expected ${expected.length}`);
  }
  let worst = -1;
  let worstExcess = -Infinity;
  let bad = 0;
  let maxAbs = 0;
  for (let i = 0; i < actual.length; i++) {
    const a = actual[i]!;
    const e = expected[i]!;
    const err = Math.abs(a - e);
    const excess = Number.isNaN(a) !== Number.isNaN(e) || (!Number.isFinite(err) && a !== e) ? Infinity : err - (atol + rtol * Math.abs(e));
    if (Number.isFinite(err)) maxAbs = Math.max(maxAbs, err);
    if (excess > 0) bad++;
    if (excess > worstExcess) {
      worstExcess = excess;
      worst = i;
    }
  }
  if (bad > 0) {
    throw new Error(
      `${label}: ${bad}/${actual.length} elements outside atol=${atol} rtol=${rtol}; worst at [${worst}]: ` +
        `got ${actual[worst]}, expected ${expected[worst]} (|err| ${Math.abs(actual[worst]! - expected[worst]!)}); max |err| ${maxAbs}`,
    );
  }
}

/** Central finite difference of a scalar function of one array entry, in float64. */
export function finiteDiff(f: (x: Float64Array) => number, x: Float64Array, i: number, h = 1e-5): number {
  const old = x[i]!;
  x[i] = old + h;
  const fp = f(x);
  x[i] = old - h;
  const fm = f(x);
  x[i] = old;
  return (fp - fm) / (2 * h);
}

export function toF64(a: ArrayLike<number>): Float64Array {
  return Float64Array.from(a);
}

/** log softmax(row)[target], computed in float64. */
export function logSoftmaxAt(row: Float32Array, target: number): number {
  let max = -Infinity;
  for (const v of row) max = Math.max(max, v);
  let sum = 0;
  for (const v of row) sum += Math.exp(v - max);
  return row[target]! - max - Math.log(sum);
}
