/**
 * A small reverse-mode tape over GPU tensors.
 *
 * Ops (src/autodiff/ops.ts) run their forward kernel, and when the tape records they
 * push an entry holding what their backward needs. `backward(loss)` walks the entries
 * in reverse. Accumulation rule: leaf (parameter) grads `+=` into persistent buffers;
 * grads of intermediate values are summed when a value feeds several ops and released
 * as soon as the op that produced the value has consumed them.
 *
 * Memory: a tape owns every tensor its ops allocate and releases them in dispose().
 * `checkpoint()` runs a block without recording and keeps only its inputs; the block
 * is re-run under a fresh inner tape during backward (gradient checkpointing), so a
 * 28-layer model holds one block's activations at a time.
 */
import type { Gpu } from '../gpu/gpu';
import type { Tensor } from '../gpu/tensor';
import { addInPlace } from '../kernels/elementwise';

export class Var {
  /** Gradient of the loss w.r.t. this value, once backward has reached it. */
  grad: Tensor | null = null;

  constructor(
    readonly value: Tensor,
    readonly requiresGrad: boolean,
    /** Leaves are parameters or inputs owned outside any tape; their grads persist. */
    readonly isLeaf = false,
  ) {}

  get shape(): readonly number[] {
    return this.value.shape;
  }
}

/** A trainable or constant input. A trainable leaf may bring its own grad buffer to `+=` into. */
export function leaf(value: Tensor, requiresGrad = false, grad: Tensor | null = null): Var {
  const v = new Var(value, requiresGrad, true);
  v.grad = grad;
  return v;
}

interface Entry {
  outputs: Var[];
  inputs: Var[];
  /** Given the outputs' grads (null where no grad reached an output), returns one grad or null per input. */
  backward: (gradOutputs: (Tensor | null)[]) => (Tensor | null)[];
}

export class Tape {
  private entries: Entry[] = [];
  private owned: Tensor[] = [];
  /** Root grads handed in by a caller: read, never released by this tape. */
  private borrowed = new Set<Tensor>();
  private disposed = false;
  /** Whether any op saw an input that requires grad (checkpoint() uses it). */
  sawGradInput = false;

  constructor(
    readonly gpu: Gpu,
    /** false: ops run forward only and save nothing (inference, checkpointed forward). */
    readonly recording = true,
  ) {}

  /** Takes ownership of a tensor allocated for this tape's lifetime. */
  own<T extends Tensor>(t: T): T {
    this.owned.push(t);
    return t;
  }

  /** Allocates an owned tensor. */
  alloc(shape: readonly number[], dtype: Tensor['dtype'] = 'f32', label = ''): Tensor {
    return this.own(this.gpu.empty(shape, dtype, label));
  }

  /**
   * Wraps an op's freshly allocated output, owned by the tape. `anyInputRequiresGrad`
   * is computed by the op from its inputs (including parameters it closes over).
   */
  output(value: Tensor, anyInputRequiresGrad: boolean): Var {
    this.own(value);
    if (anyInputRequiresGrad) this.sawGradInput = true;
    return new Var(value, anyInputRequiresGrad && this.recording);
  }

  /** Records an op's backward. A no-op when the tape does not record. */
  record(outputs: Var[], inputs: Var[], backward: Entry['backward']): void {
    if (!this.recording || !inputs.some((v) => v.requiresGrad)) return;
    this.entries.push({ outputs, inputs, backward });
  }

  /**
   * Runs `block` on `inputs`, keeping only the inputs and outputs for backward; the
   * block is recomputed under a fresh tape when its outputs' grads arrive. The block
   * must be deterministic; parameters it closes over receive their grads during the
   * recomputation.
   */
  checkpoint(block: (tape: Tape, inputs: Var[]) => Var[], inputs: Var[]): Var[] {
    if (!this.recording) return block(this, inputs);
    const inner = new Tape(this.gpu, false);
    const innerOut = block(inner, inputs);
    const needsGrad = inner.sawGradInput || inputs.some((v) => v.requiresGrad);
    const outputs = innerOut.map((v) => this.output(inner.disown(v.value), needsGrad));
    inner.dispose(); // the block's intermediates go back to the pool now
    this.record(outputs, needsGrad ? [...inputs, GRAD_ANCHOR] : inputs, (gradOutputs) => {
      const replay = new Tape(this.gpu, true);
      try {
        // Non-leaf inputs become leaves of the replay, collecting their grads there.
        const replayIn = inputs.map((v) => (v.isLeaf ? v : new Var(v.value, v.requiresGrad, true)));
        const replayOut = block(replay, replayIn);
        replay.backwardFrom(replayOut, gradOutputs);
        const grads = replayIn.map((v, i) => {
          if (v === inputs[i]) return null; // true leaves were accumulated in place
          const g = v.grad;
          v.grad = null;
          return g;
        });
        return [...grads, null];
      } finally {
        replay.dispose();
      }
    });
    return outputs;
  }

  /** Backpropagates from `root` seeded with `gradRoot` (borrowed: the caller still owns it). */
  backward(root: Var, gradRoot: Tensor): void {
    this.backwardFrom([root], [gradRoot]);
  }

  backwardFrom(roots: Var[], gradRoots: (Tensor | null)[]): void {
    if (!this.recording) throw new Error('backward on a tape that did not record');
    roots.forEach((r, i) => {
      const g = gradRoots[i];
      if (!g || !r.requiresGrad) return;
      assertSameShape(g, r.value);
      if (r.grad) {
        addInPlace(this.gpu, r.grad, g, g.size);
      } else {
        this.borrowed.add(g);
        r.grad = g;
      }
    });
    for (let e = this.entries.length - 1; e >= 0; e--) {
      const entry = this.entries[e]!;
      const gradOutputs = entry.outputs.map((o) => o.grad);
      if (gradOutputs.every((g) => g === null)) continue;
      const gradInputs = entry.backward(gradOutputs);
      if (gradInputs.length !== entry.inputs.length) {
        throw new Error(`backward returned ${gradInputs.length} grads for ${entry.inputs.length} inputs`);
      }
      // The outputs' grads are consumed: release them (queue order keeps this safe).
      for (const o of entry.outputs) {
        if (o.grad && !o.isLeaf) {
          if (!this.borrowed.has(o.grad)) o.grad.release();
          o.grad = null;
        }
      }
      gradInputs.forEach((g, i) => {
        if (!g) return;
        const input = entry.inputs[i]!;
        if (!input.requiresGrad) {
          g.release();
          return;
        }
        assertSameShape(g, input.value);
        if (input.grad) {
          addInPlace(this.gpu, input.grad, g, g.size);
          g.release();
        } else {
          input.grad = g; // a leaf without its own buffer hands it to its owner
        }
      });
    }
    this.entries = [];
  }

  /** Gives up ownership of one tensor (the caller now owns it). */
  disown(t: Tensor): Tensor {
    const i = this.owned.lastIndexOf(t);
    if (i < 0) throw new Error(`tape does not own ${t}`);
    this.owned.splice(i, 1);
    return t;
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    for (const t of this.owned) if (!t.isReleased) t.release();
    this.owned = [];
    this.entries = [];
    this.borrowed.clear();
  }
}

/**
 * Stands in for parameters a checkpointed block closes over, so the block's entry is
 * recorded (and replayed) even when none of its explicit inputs requires grad.
 */
const GRAD_ANCHOR = new Var(null as unknown as Tensor, true, true);

function assertSameShape(g: Tensor, value: Tensor): void {
  if (g.size !== value.size) throw new Error(`gradient ${g} does not match its value ${value}`);
}
