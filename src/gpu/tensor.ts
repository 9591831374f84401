import type { Gpu } from './gpu';

/**
 * Element types a tensor can hold. `q4` tensors are opaque packed 4-bit weights
 * (see src/kernels/q4.ts for their layout); their shape is the logical [M, K].
 */
export type DType = 'f32' | 'f16' | 'u32' | 'i32';

export const DTYPE_BYTES: Record<DType, number> = { f32: 4, f16: 2, u32: 4, i32: 4 };

export function numel(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/** A GPU buffer with a shape. Owned: call release() when done (no GC for GPU memory). */
export class Tensor {
  private released = false;

  constructor(
    readonly gpu: Gpu,
    readonly buffer: GPUBuffer,
    readonly shape: readonly number[],
    readonly dtype: DType,
    /** true when the pool owns the buffer; false for wrapped external buffers */
    private readonly pooled = true,
    /** called once when the tensor is released (a CommandList's loans use it) */
    private readonly onRelease: (() => void) | null = null,
  ) {}

  get size(): number {
    return numel(this.shape);
  }

  /** Bytes of data (the buffer itself may be larger: pool buckets, 4-byte padding). */
  get byteLength(): number {
    return Math.ceil((this.size * DTYPE_BYTES[this.dtype]) / 4) * 4;
  }

  get isReleased(): boolean {
    return this.released;
  }

  release(): void {
    if (this.released) throw new Error(`Tensor [${this.shape}] released twice`);
    this.released = true;
    if (this.pooled) this.gpu.pool.release(this.buffer);
    this.gpu.noteReleased(this);
    this.onRelease?.();
  }

  toString(): string {
    return `Tensor(${this.dtype}[${this.shape.join(', ')}])`;
  }
}
