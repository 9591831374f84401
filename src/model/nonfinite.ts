/**
 * Refuses non-finite weights at load without an extra pass over the file or a
 * readback per tensor. Each tensor gets one slot: 4-bit tensors are counted by the
 * quantize kernel as it reads them (quantizeQ4's nonFinite option) into a small GPU
 * counts buffer; tensors widened to f32 on the CPU (format f32, the norms and score
 * head) are counted on the CPU chunk by chunk, which costs less than a GPU pass on
 * the software adapters the f32 format serves (tests, the oracle). verify() reads the
 * GPU counts back once, at the end of the load, and names the first bad tensor in
 * load order.
 */
import { FormatError } from '../formats/errors';
import { nonFiniteCount, nonFiniteProblem } from '../formats/finite';
import type { Gpu } from '../gpu/gpu';
import type { Tensor } from '../gpu/tensor';

export const HINT_DAMAGED_WEIGHTS =
  'The checkpoint is damaged (or was saved from a training run that diverged): download it again, or re-export it from a model whose weights are finite.';

interface Slot {
  file: string;
  name: string;
  /** values the tensor holds */
  total: number;
  /** non-finite values found on the CPU */
  host: number;
  onGpu: boolean;
}

export class NonFiniteCheck {
  private counts: Tensor | null = null;
  private readonly slots: Slot[] = [];
  private readonly byName = new Map<string, number>();

  /** `capacity`: the number of distinct tensors that will be counted. */
  constructor(
    private readonly gpu: Gpu,
    private readonly capacity: number,
    private readonly hint = HINT_DAMAGED_WEIGHTS,
  ) {}

  /** Where quantizeQ4 adds the non-finite count of tensor `name` (of `total` values, in `file`); row blocks share it. */
  gpuSlot(file: string, name: string, total: number): { counts: Tensor; slot: number } {
    const slot = this.slot(file, name, total);
    this.slots[slot]!.onGpu = true;
    this.counts ??= this.gpu.zeros([Math.max(1, this.capacity)], 'u32', 'load.nonFinite');
    return { counts: this.counts, slot };
  }

  /** Counts a chunk of tensor `name` already on the CPU. */
  scan(file: string, name: string, total: number, values: ArrayLike<number>): void {
    this.slots[this.slot(file, name, total)]!.host += nonFiniteCount(values);
  }

  /** Reads the GPU counts back (once, when any were taken); throws a FormatError naming the first tensor that holds a NaN or an infinity. */
  async verify(): Promise<void> {
    const gpuCounts = this.counts ? ((await this.gpu.read(this.counts)) as Uint32Array) : null;
    const found = this.slots.map((s, i) => s.host + (s.onGpu ? gpuCounts![i]! : 0));
    const bad = found.findIndex((n) => n > 0);
    if (bad < 0) return;
    const s = this.slots[bad]!;
    const others = found.filter((n, i) => i > bad && n > 0).length;
    const more = others > 0 ? ` (and ${others} more tensor${others === 1 ? '' : 's'} after it)` : '';
    throw new FormatError(s.file, `tensor ${JSON.stringify(s.name)}`, nonFiniteProblem(found[bad]!, s.total) + more, this.hint);
  }

  release(): void {
    if (this.counts && !this.counts.isReleased) this.counts.release();
  }

  private slot(file: string, name: string, total: number): number {
    let i = this.byName.get(name);
    if (i === undefined) {
      i = this.slots.length;
      if (i >= this.capacity) throw new Error(`NonFiniteCheck: more than ${this.capacity} tensors counted`);
      this.byName.set(name, i);
      this.slots.push({ file, name, total, host: 0, onGpu: false });
    }
    return i;
  }
}
