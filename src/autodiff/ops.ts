/**
 * Differentiable ops over the kernel library. Each op runs its forward kernel,
 * allocates outputs on the tape, and records a backward that returns one gradient
 * (or null) per input. Defining an op through `op()` requires a backward, so an op
 * without a derivative does not type-check.
 */
import type { Tensor } from '../gpu/tensor';
import { add as addKernel, swigluBackward, swigluForward } from '../kernels/elementwise';
import { rmsnormBackward, rmsnormForward } from '../kernels/rmsnorm';
import type { Tape, Var } from './tape';

interface OpSpec<A> {
  name: string;
  /** Runs the forward kernels; returns outputs and the extra tensors backward needs. */
  forward: (tape: Tape, inputs: Var[], attrs: A) => { outputs: Tensor[]; saved?: Tensor[] };
  /** Gradients of the inputs given the outputs' gradients. */
  backward: (tape: Tape, grads: (Tensor | null)[], inputs: Var[], saved: Tensor[], outputs: Tensor[], attrs: A) => (Tensor | null)[];
}

export function op<A>(spec: OpSpec<A>): (tape: Tape, inputs: Var[], attrs: A) => Var[] {
  return (tape, inputs, attrs) => {
    const { outputs, saved = [] } = spec.forward(tape, inputs, attrs);
    const requiresGrad = inputs.some((v) => v.requiresGrad);
    for (const s of saved) tape.own(s);
    const outVars = outputs.map((t) => tape.output(t, requiresGrad));
    tape.record(outVars, inputs, (grads) => spec.backward(tape, grads, inputs, saved, outputs, attrs));
    return outVars;
  };
}

const addOp = op<void>({
  name: 'add',
  forward: (tape, [a, b]) => {
    const out = tape.gpu.empty(a!.shape);
    addKernel(tape.gpu, out, a!.value, b!.value, a!.value.size);
    return { outputs: [out] };
  },
  backward: (tape, [g], [a, b]) => [a!.requiresGrad ? copyOf(tape, g!) : null, b!.requiresGrad ? copyOf(tape, g!) : null],
});

/** a + b (same shape): the residual connection. */
export function add(tape: Tape, a: Var, b: Var): Var {
  if (a.value.size !== b.value.size) throw new Error(`add: ${a.value} and ${b.value} differ in size`);
  return addOp(tape, [a, b], undefined)[0]!;
}

const rmsnormOp = op<{ N: number; C: number; eps: number }>({
  name: 'rmsnorm',
  forward: (tape, [x, w], { N, C, eps }) => {
    const out = tape.gpu.empty([N, C]);
    const rstd = tape.gpu.empty([N]);
    rmsnormForward(tape.gpu, out, rstd, x!.value, w!.value, N, C, eps);
    return { outputs: [out], saved: [rstd] };
  },
  backward: (tape, [g], [x, w], [rstd], _out, { N, C }) => {
    const gpu = tape.gpu;
    // The kernel always writes dx; it is dropped when x needs no gradient.
    const dx = gpu.empty([N, C]);
    const dw = w!.requiresGrad ? gpu.zeros([C]) : null;
    rmsnormBackward(gpu, dx, dw, g!, x!.value, rstd!, w!.value, N, C);
    if (x!.requiresGrad) return [dx, dw];
    dx.release();
    return [null, dw];
  },
});

/** RMSNorm over the last dimension of x [N, C] with weight w [C]. */
export function rmsnorm(tape: Tape, x: Var, w: Var, eps: number): Var {
  const C = w.value.size;
  return rmsnormOp(tape, [x, w], { N: x.value.size / C, C, eps })[0]!;
}

const swigluOp = op<void>({
  name: 'swiglu',
  forward: (tape, [gate, up]) => {
    const out = tape.gpu.empty(gate!.shape);
    swigluForward(tape.gpu, out, gate!.value, up!.value, gate!.value.size);
    return { outputs: [out] };
  },
  backward: (tape, [g], [gate, up]) => {
    const n = gate!.value.size;
    const dgate = tape.gpu.empty(gate!.shape);
    const dup = tape.gpu.empty(up!.shape);
    swigluBackward(tape.gpu, dgate, dup, g!, gate!.value, up!.value, n);
    return [dgate, dup];
  },
});

/** silu(gate) * up: Llama's MLP activation. */
export function swiglu(tape: Tape, gate: Var, up: Var): Var {
  return swigluOp(tape, [gate, up], undefined)[0]!;
}

function copyOf(tape: Tape, t: Tensor): Tensor {
  const c = tape.gpu.empty(t.shape, t.dtype);
  tape.gpu.copy(t, c);
  return c;
}
