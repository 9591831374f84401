/** Float64 CPU references for elementwise.ts. */
type Vec = ArrayLike<number>;

function map(n: number, f: (i: number) => number): Float64Array {
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) out[i] = f(i);
  return out;
}

export const addRef = (a: Vec, b: Vec, n: number) => map(n, (i) => a[i]! + b[i]!);
export const scaleRef = (a: Vec, s: number, n: number) => map(n, (i) => s * a[i]!);
export const axpyRef = (y: Vec, alpha: number, x: Vec, n: number) => map(n, (i) => y[i]! + alpha * x[i]!);

export function siluRef(x: number): number {
  return x / (1 + Math.exp(-x));
}

export const swigluForwardRef = (gate: Vec, up: Vec, n: number) => map(n, (i) => siluRef(gate[i]!) * up[i]!);

/** Analytic gradients; the tests check them against finite differences of swigluForwardRef. */
export function swigluBackwardRef(dout: Vec, gate: Vec, up: Vec, n: number) {
  const dgate = new Float64Array(n);
  const dup = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    const g = gate[i]!;
    const sig = 1 / (1 + Math.exp(-g));
    dup[i] = dout[i]! * g * sig;
    dgate[i] = dout[i]! * up[i]! * sig * (1 + g * (1 - sig));
  }
  return { dgate, dup };
}
