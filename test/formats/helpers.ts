/** Hand-built safetensors files for the rejection tests. */
import { FormatError } from '../../src/formats/errors';

/** 8-byte N, the header text as given (no padding unless included), then `data`. */
export function rawSafetensors(header: unknown, data: Uint8Array | number = 0): Uint8Array {
  const text = typeof header === 'string' ? header : JSON.stringify(header);
  const json = new TextEncoder().encode(text);
  const body = typeof data === 'number' ? new Uint8Array(data) : data;
  const out = new Uint8Array(8 + json.length + body.length);
  new DataView(out.buffer).setUint32(0, json.length, true);
  out.set(json, 8);
  out.set(body, 8 + json.length);
  return out;
}

/** Runs `fn`, expects a FormatError, and returns it for assertions on its message. */
export function formatErrorOf(fn: () => unknown): FormatError {
  try {
    fn();
  } catch (e) {
    if (e instanceof FormatError) return e;
    throw new Error(`expected a FormatError, got ${String(e)}`);
  }
  throw new Error('expected a FormatError, nothing was thrown');
}

export async function asyncFormatErrorOf(fn: () => Promise<unknown>): Promise<FormatError> {
  try {
    await fn();
  } catch (e) {
    if (e instanceof FormatError) return e;
    throw new Error(`expected a FormatError, got ${String(e)}`);
  }
  throw new Error('expected a FormatError, nothing was thrown');
}

export function f32Bytes(values: number[]): Uint8Array {
  return new Uint8Array(new Float32Array(values).buffer);
}
