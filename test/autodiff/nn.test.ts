import { describe, it } from 'vitest';
import { linear, rope, attention, tokenLogp, type Lora } from '../../src/autodiff/nn';
import { Tape, leaf } from '../../src/autodiff/tape';
import type { Gpu } from '../../src/gpu/gpu';
import { attentionRef } from '../../src/kernels/attention.ref';
import { f32Linear, q4Linear, type FrozenLinear } from '../../src/kernels/linear';
import { lmHeadRef } from '../../src/kernels/lmhead.ref';
import { matmulRef } from '../../src/kernels/matmul.ref';
import { dequantizeQ4Ref, quantizeQ4Ref } from '../../src/kernels/q4.ref';
import { releaseQ4, uploadQ4 } from '../../src/kernels/q4-layout';
import { ropeInvFreq } from '../../src/kernels/rope';
import { ropeRef } from '../../src/kernels/rope.ref';
import { useGpu } from '../helpers/gpu';
import { Rng, expectClose, finiteDiff, toF64 } from '../helpers/numeric';

/**
 * A miniature attention block with LoRA on q and v, feeding the fused LM head:
 *   q = rope(x Wq^T + s xAq^T Bq^T), k = rope(x Wk^T), v = x Wv^T + s xAv^T Bv^T
 *   o = attention(q, k, v) Wo^T;  loss = sum_n w_n log p(target_n | o_n)
 * The f64 reference composes the kernels' own references; grads by finite differences.
 */
const [B, T, C, H, HK, D, R, V] = [2, 5, 32, 4, 2, 8, 4, 40];
const N = B * T;
const S = 1.5; // LoRA scale

interface Weights {
  Wq: Float64Array; Wk: Float64Array; Wv: Float64Array; Wo: Float64Array; Wlm: Float64Array;
  Aq: Float64Array; Bq: Float64Array; Av: Float64Array; Bv: Float64Array;
}

function setup(seed: number, quantized: boolean) {
  const rng = new Rng(seed);
  const dense = (M: number, K: number, sc: number) => Float64Array.from(rng.f32(M * K, sc));
  const maybeQ = (w: Float64Array, M: number, K: number) => (quantized ? dequantizeQ4Ref(quantizeQ4Ref(w, M, K)) : w);
  const w: Weights = {
    Wq: maybeQ(dense(H * D, C, 0.3), H * D, C),
    Wk: maybeQ(dense(HK * D, C, 0.3), HK * D, C),
    Wv: maybeQ(dense(HK * D, C, 0.3), HK * D, C),
    Wo: maybeQ(dense(C, H * D, 0.3), C, H * D),
    Wlm: dense(V, C, 0.5),
    Aq: dense(R, C, 0.3), Bq: dense(H * D, R, 0.3), Av: dense(R, C, 0.3), Bv: dense(HK * D, R, 0.3),
  };
  const x = Float64Array.from(rng.f32(N * C));
  const targets = Uint32Array.from({ length: N }, () => rng.int(V));
  const lossW = Float64Array.from({ length: N }, (_, i) => ((i % 3) - 1) * 0.7 + 0.2);
  const positions = Uint32Array.from({ length: N }, (_, i) => (i % T) + 3);
  const invFreq = ropeInvFreq(D, 10000, { type: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 16 });
  return { w, x, targets, lossW, positions, invFreq };
}

function lossRef(p: ReturnType<typeof setup>, w: Weights, x: Float64Array): number {
  const lin = (inp: Float64Array, W: Float64Array, M: number, K: number, A?: Float64Array, Bm?: Float64Array) => {
    const y = matmulRef(inp, W, N, M, K, { transB: true });
    if (A && Bm) {
      const u = matmulRef(inp, A, N, R, K, { transB: true });
      const d = matmulRef(u, Bm, N, M, R, { transB: true });
      for (let i = 0; i < y.length; i++) y[i] += S * d[i]!;
    }
    return y;
  };
  const q = ropeRef(lin(x, w.Wq, H * D, C, w.Aq, w.Bq), p.invFreq, p.positions, N, H, D);
  const k = ropeRef(lin(x, w.Wk, HK * D, C), p.invFreq, p.positions, N, HK, D);
  const v = lin(x, w.Wv, HK * D, C, w.Av, w.Bv);
  const att = attentionRef(q, k, v, B, T, T, H, HK, D).out;
  const o = lin(att, w.Wo, C, H * D);
  const { logp } = lmHeadRef(o, w.Wlm, p.targets, N, C, V);
  return logp.reduce((s, l, i) => s + l * p.lossW[i]!, 0);
}

async function gpuRun(g: Gpu, p: ReturnType<typeof setup>, quantized: boolean) {
  const { w } = p;
  const owned: { release(): void }[] = [];
  const up = (a: Float64Array, shape: number[]) => {
    const t = g.upload(Float32Array.from(a), shape);
    owned.push(t);
    return t;
  };
  const base = (W: Float64Array, M: number, K: number): FrozenLinear => {
    if (!quantized) return f32Linear(up(W, [M, K]), M, K);
    // Re-quantizing the dequantized matrix reproduces the same packed bytes.
    const q = uploadQ4(g, quantizeQ4Ref(Float32Array.from(W), M, K), M, K);
    owned.push({ release: () => releaseQ4(q) });
    return q4Linear(q);
  };
  const loraOf = (A: Float64Array, Bm: Float64Array, M: number, K: number): Lora => {
    const gA = g.zeros([R, K]);
    const gB = g.zeros([M, R]);
    owned.push(gA, gB);
    return { A: leaf(up(A, [R, K]), true, gA), B: leaf(up(Bm, [M, R]), true, gB), scale: S };
  };
  const Wq = base(w.Wq, H * D, C), Wk = base(w.Wk, HK * D, C), Wv = base(w.Wv, HK * D, C), Wo = base(w.Wo, C, H * D);
  const lm = f32Linear(up(w.Wlm, [V, C]), V, C);
  const lq = loraOf(w.Aq, w.Bq, H * D, C);
  const lv = loraOf(w.Av, w.Bv, HK * D, C);
  const invFreq = g.upload(p.invFreq, [D / 2]);
  const positions = g.upload(p.positions, [N], 'u32');
  const targets = g.upload(p.targets, [N], 'u32');
  const lossW = up(p.lossW, [N]);
  owned.push(invFreq, positions, targets);
  const x = leaf(up(p.x, [N, C]), true);

  const tape = new Tape(g);
  const q = rope(tape, linear(tape, x, Wq, lq), invFreq, positions, H, D);
  const k = rope(tape, linear(tape, x, Wk, null), invFreq, positions, HK, D);
  const v = linear(tape, x, Wv, lv);
  const o = linear(tape, attention(tape, q, k, v, { B, T, H, HK, D }), Wo, null);
  const { logp } = tokenLogp(tape, o, lm, targets);
  const lp = await g.readF32(logp.value);
  tape.backward(logp, lossW);
  const grads = {
    x: await g.readF32(x.grad!),
    Aq: await g.readF32(lq.A.grad!), Bq: await g.readF32(lq.B.grad!),
    Av: await g.readF32(lv.A.grad!), Bv: await g.readF32(lv.B.grad!),
  };
  tape.dispose();
  x.grad!.release();
  owned.forEach((t) => t.release());
  return { loss: lp.reduce((s, l, i) => s + l * p.lossW[i]!, 0), grads };
}

describe('model ops: LoRA linear, RoPE, attention, fused LM head', () => {
  const gpu = useGpu();

  for (const quantized of [false, true]) {
    it(`gradients through a LoRA attention block match finite differences (${quantized ? '4-bit' : 'f32'} base)`, async () => {
      const p = setup(quantized ? 12 : 11, quantized);
      const { loss, grads } = await gpuRun(gpu(), p, quantized);
      expectClose([loss], [lossRef(p, p.w, p.x)], { atol: 1e-3, rtol: 1e-4, label: 'loss' });
      const fd = (key: keyof Weights | 'x') => {
        const arr = key === 'x' ? toF64(p.x) : toF64(p.w[key]);
        return arr.map((_, i) =>
          finiteDiff((a) => (key === 'x' ? lossRef(p, p.w, a) : lossRef(p, { ...p.w, [key]: a }, p.x)), arr, i, 1e-4),
        );
      };
      for (const key of ['Aq', 'Bq', 'Av', 'Bv', 'x'] as const) {
        expectClose(grads[key], fd(key), { atol: 2e-3, rtol: 5e-3, label: `d${key}` });
      }
    });
  }
});
