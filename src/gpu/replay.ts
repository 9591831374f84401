/**
 * A recorded command list: what a step dispatched, copied and cleared, kept as flat
 * commands (pipeline, bind group, workgroup counts; copy and clear ranges) and
 * replayed by Gpu.replay without running the code that recorded it. Made by
 * Gpu.record.
 *
 * Why: a decode step records the same few hundred dispatches on the same buffers
 * every token; building them again (kernel look-ups, uniform blocks, scratch tensors,
 * bind group keys) costs the host milliseconds per token, replaying them microseconds.
 *
 * What a list owns, so that its commands stay valid between replays:
 * - its uniform buffer (one 256-byte slot per dispatch, written once when recorded:
 *   uniforms are part of what was recorded, so a step whose uniforms would differ
 *   must be recorded again);
 * - the scratch buffers the recorded code took from the pool and gave back (they are
 *   taken off the free list, so nothing else can be handed them);
 * - its outputs (tensors the recorded code returned): each replay lends them out as
 *   tensors whose release() hands them back to the list, and a list whose loans are
 *   still out cannot be replayed (the next replay would overwrite them).
 * Everything else its commands name (weights, caches, inputs) belongs to the caller,
 * who writes new data into those buffers between replays; a list whose inputs were
 * released reports itself not replayable.
 */
import type { BufferPool } from './pool';
import { Tensor } from './tensor';

export type ReplayCommand =
  /** pipeline null: the previous command set the same pipeline in the same pass */
  | { kind: 'dispatch'; pipeline: GPUComputePipeline | null; bindGroup: GPUBindGroup; x: number; y: number; z: number }
  | { kind: 'copy'; src: GPUBuffer; srcOffset: number; dst: GPUBuffer; dstOffset: number; bytes: number }
  | { kind: 'clear'; buffer: GPUBuffer; offset: number; size: number };

export class CommandList {
  readonly dispatches: number;
  private loans: Tensor[] = [];
  private inputsCheckedAt = -1;
  private released = false;

  constructor(
    readonly label: string,
    readonly commands: readonly ReplayCommand[],
    private readonly pool: BufferPool,
    private readonly uniforms: GPUBuffer | null,
    /** scratch buffers taken off the pool's free list */
    private readonly held: readonly GPUBuffer[],
    private readonly outputs: readonly Tensor[],
    /** caller-owned tensors the commands bind */
    private readonly inputs: readonly Tensor[],
    /** submits recorded work (the uniform buffer must not be destroyed under unsubmitted commands) */
    private readonly flush: () => void,
    /** how many tensors bound by any list have been released so far (Gpu.boundReleases) */
    private readonly boundReleases: () => number,
  ) {
    let n = 0;
    for (const c of commands) if (c.kind === 'dispatch') n++;
    this.dispatches = n;
  }

  /** Whether Gpu.replay may run it: not released, every loan back, every input alive. */
  get replayable(): boolean {
    if (this.released) return false;
    for (const t of this.loans) if (!t.isReleased) return false;
    // Scan the inputs only when some tensor bound by a list was released since the last scan.
    const seen = this.boundReleases();
    if (seen !== this.inputsCheckedAt) {
      for (const t of this.inputs) if (t.isReleased) return false;
      this.inputsCheckedAt = seen;
    }
    return true;
  }

  /** Why replayable is false (for error messages), or null. */
  get unreplayableReason(): string | null {
    if (this.released) return 'it was released';
    const loan = this.loans.findIndex((t) => !t.isReleased);
    if (loan >= 0) return `output ${loan} of the previous replay (${this.loans[loan]}) is still held`;
    const input = this.inputs.find((t) => t.isReleased);
    if (input) return `a tensor it binds (${input}) was released`;
    return null;
  }

  /** New loans of the outputs (Gpu.replay calls it after encoding the commands). */
  lend(): Tensor[] {
    this.loans = this.outputs.map(
      (t) =>
        new Tensor(t.gpu, t.buffer, t.shape, t.dtype, false, () => {
          // Released after the list itself: the output goes back to the pool now.
          if (this.released && !t.isReleased) t.release();
        }),
    );
    return this.loans;
  }

  /** Hands the scratch buffers and outputs back to the pool (an output still on loan goes back when its loan is released). */
  release(): void {
    if (this.released) return;
    this.released = true;
    for (const b of this.held) this.pool.release(b);
    this.outputs.forEach((t, i) => {
      const loan = this.loans[i];
      if (!loan || loan.isReleased) t.release();
    });
    if (this.uniforms) {
      this.flush();
      this.uniforms.destroy();
    }
  }
}
