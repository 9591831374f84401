/**
 * Size-bucketed pool of storage buffers with byte accounting.
 *
 * Buffers are rounded up to a bucket (2^k * (1 + j/8)), so at most 12.5% is wasted
 * and a training loop that asks for the same shapes every step reuses the same
 * buffers. `inUseBytes` counts what tensors hold; `allocatedBytes` also counts the
 * free list. Peaks of both are kept so a run can report its memory high-water mark.
 */

import { BufferUsage } from './flags';

export const STORAGE_USAGE = BufferUsage.STORAGE | BufferUsage.COPY_SRC | BufferUsage.COPY_DST;

export function bucketBytes(bytes: number): number {
  const min = 256;
  if (bytes <= min) return min;
  const k = Math.floor(Math.log2(bytes));
  const base = 2 ** k;
  if (base === bytes) return bytes;
  const step = Math.max(base / 8, 4);
  return base + Math.ceil((bytes - base) / step) * step;
}

export interface PoolStats {
  inUseBytes: number;
  allocatedBytes: number;
  peakInUseBytes: number;
  peakAllocatedBytes: number;
  liveBuffers: number;
  freeBuffers: number;
}

export class BufferPool {
  private free = new Map<number, GPUBuffer[]>();
  private sizes = new WeakMap<GPUBuffer, number>();
  private inUse = 0;
  private allocated = 0;
  private peakInUse = 0;
  private peakAllocated = 0;
  private live = 0;
  private freeCount = 0;
  /** acquire() calls so far (tests count them per decode step) */
  acquisitions = 0;

  constructor(
    private readonly device: GPUDevice,
    private readonly maxBufferSize: number,
    /** called after trim() destroyed buffers (the runtime drops bind groups that name them) */
    private readonly onTrim?: () => void,
  ) {}

  acquire(bytes: number, label = ''): GPUBuffer {
    this.acquisitions++;
    if (!(bytes > 0) || !Number.isFinite(bytes)) {
      throw new Error(`BufferPool: cannot allocate ${bytes} bytes${label ? ` for ${label}` : ''}`);
    }
    const size = bucketBytes(bytes);
    if (size > this.maxBufferSize) {
      throw new Error(
        `BufferPool: ${label || 'a buffer'} needs ${size} bytes but this device allows at most ` +
          `${this.maxBufferSize} bytes per buffer; use a smaller model or a GPU with larger limits`,
      );
    }
    const list = this.free.get(size);
    let buffer = list?.pop();
    if (buffer) {
      this.freeCount--;
    } else {
      buffer = this.device.createBuffer({ size, usage: STORAGE_USAGE, label });
      this.sizes.set(buffer, size);
      this.allocated += size;
      this.live++;
      this.peakAllocated = Math.max(this.peakAllocated, this.allocated);
    }
    this.inUse += size;
    this.peakInUse = Math.max(this.peakInUse, this.inUse);
    return buffer;
  }

  release(buffer: GPUBuffer): void {
    const size = this.sizes.get(buffer);
    if (size === undefined) throw new Error('BufferPool: released a buffer it does not own');
    this.inUse -= size;
    let list = this.free.get(size);
    if (!list) this.free.set(size, (list = []));
    list.push(buffer);
    this.freeCount++;
  }

  /**
   * Takes `buffer` off the free list (it counts as in use again) and returns true, or
   * returns false when it is not free. A CommandList uses it to keep the scratch
   * buffers its commands name; it hands them back with release().
   */
  take(buffer: GPUBuffer): boolean {
    const size = this.sizes.get(buffer);
    const list = size === undefined ? undefined : this.free.get(size);
    const i = list ? list.lastIndexOf(buffer) : -1;
    if (i < 0) return false;
    list!.splice(i, 1);
    this.freeCount--;
    this.inUse += size!;
    this.peakInUse = Math.max(this.peakInUse, this.inUse);
    return true;
  }

  /** Destroys every free buffer, returning their memory to the device. */
  trim(): void {
    for (const list of this.free.values()) {
      for (const b of list) {
        this.allocated -= this.sizes.get(b)!;
        this.live--;
        b.destroy();
      }
    }
    this.free.clear();
    this.freeCount = 0;
    this.onTrim?.();
  }

  resetPeaks(): void {
    this.peakInUse = this.inUse;
    this.peakAllocated = this.allocated;
  }

  stats(): PoolStats {
    return {
      inUseBytes: this.inUse,
      allocatedBytes: this.allocated,
      peakInUseBytes: this.peakInUse,
      peakAllocatedBytes: this.peakAllocated,
      liveBuffers: this.live,
      freeBuffers: this.freeCount,
    };
  }
}
