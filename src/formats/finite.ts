/**
 * Counting and refusing non-finite values (NaN, +-infinity) in float data already on
 * the CPU: adapters (small), ONNX initializers and 4-bit scales the importer decodes
 * anyway, the loader's rows widened to f32. A NaN or infinite weight never makes a
 * usable model; it only shows later as non-finite log-probs, so it is refused where
 * it is read, naming the tensor. (Weights quantized on the GPU are counted by the
 * quantize kernel: model/nonfinite.ts.)
 */
import { FormatError } from './errors';

/** The number of NaN or infinite values. */
export function nonFiniteCount(values: ArrayLike<number>): number {
  let n = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i]!;
    // v - v is 0 for every finite v, NaN for NaN and +-infinity (about 2 ns a value).
    if (v - v !== 0) n++;
  }
  return n;
}

/** The number of NaN or infinite values among f16 bit patterns (exponent all ones). */
export function nonFiniteF16Count(bits: Uint16Array): number {
  let n = 0;
  for (let i = 0; i < bits.length; i++) if ((bits[i]! & 0x7c00) === 0x7c00) n++;
  return n;
}

/** "holds 3 non-finite values (NaN or infinity) of 4096" */
export function nonFiniteProblem(count: number, total: number): string {
  return `holds ${count === total ? 'only' : count} non-finite value${count === 1 ? '' : 's'} (NaN or infinity)${count === total ? '' : ` of ${total}`}`;
}

/** Throws a FormatError naming `file` and `item` when `values` holds a NaN or an infinity. */
export function refuseNonFinite(file: string, item: string, values: ArrayLike<number>, hint: string): void {
  const n = nonFiniteCount(values);
  if (n > 0) throw new FormatError(file, item, nonFiniteProblem(n, values.length), hint);
}
