/**
 * Attention benchmark cases at Llama-3.2-3B head shapes (H=24, HK=8, D=128):
 * training forward and backward at 1024 tokens, and G=8 decode over a shared
 * 512-token prompt plus 512 tokens of each answer.
 */
import type { Gpu } from '../src/gpu/gpu';
import { attentionBackward, attentionDecode, attentionForward } from '../src/kernels/attention';
import { timeGpu, type Timing } from './harness';

export interface BenchRow {
  name: string;
  ms: number;
  gbps: number;
  gflops: number;
}

export async function attentionBenchCases(gpu: Gpu, timing: Parameters<typeof timeGpu>[2]): Promise<BenchRow[]> {
  const [H, HK, D] = [24, 8, 128];
  const rows: BenchRow[] = [];
  const per = (t: Timing, bytes: number, flops: number, name: string) =>
    rows.push({ name, ms: t.ms, gbps: bytes / (t.ms * 1e-3) / 1e9, gflops: flops / (t.ms * 1e-3) / 1e9 });

  {
    const T = 1024;
    const q = gpu.zeros([T, H, D]);
    const k = gpu.zeros([T, HK, D]);
    const v = gpu.zeros([T, HK, D]);
    const out = gpu.empty([T, H, D]);
    const lse = gpu.empty([H, T]);
    const dq = gpu.empty([T, H, D]);
    const dk = gpu.empty([T, HK, D]);
    const dv = gpu.empty([T, HK, D]);
    const causalPairs = (T * (T + 1)) / 2;
    const fwdFlops = 4 * causalPairs * H * D; // QK^T and PV
    const ioBytes = 4 * (2 * T * H * D + 2 * T * HK * D);
    per(await timeGpu(gpu, () => attentionForward(gpu, out, lse, q, k, v, 1, T, T, H, HK, D), timing), ioBytes, fwdFlops, `attention fwd T=${T}`);
    // backward recomputes QK^T, then dV, dP, dQ, dK: 5 matmuls of the causal size (dq and dkdv kernels each recompute P)
    const bwdFlops = 2 * causalPairs * H * D * 6;
    per(
      await timeGpu(gpu, () => attentionBackward(gpu, dq, dk, dv, out, out, lse, q, k, v, 1, T, T, H, HK, D), timing),
      2 * ioBytes,
      bwdFlops,
      `attention bwd T=${T}`,
    );
    for (const t of [q, k, v, out, lse, dq, dk, dv]) t.release();
  }
  {
    const [B, P, L] = [8, 512, 512];
    const q = gpu.zeros([B, H, D]);
    const out = gpu.empty([B, H, D]);
    const kc = gpu.zeros([B, L, HK, D]);
    const vc = gpu.zeros([B, L, HK, D]);
    const pk = gpu.zeros([P, HK, D]);
    const pv = gpu.zeros([P, HK, D]);
    const lengths = gpu.upload(new Uint32Array(B).fill(L), [B], 'u32');
    const kvBytes = 4 * 2 * (P + B * L) * HK * D;
    per(
      await timeGpu(gpu, () => attentionDecode(gpu, out, q, kc, vc, lengths, { k: pk, v: pv, P }, B, L, H, HK, D), timing),
      kvBytes,
      4 * B * (P + L) * H * D,
      `attention decode G=${B} prefix=${P} + ${L}`,
    );
    for (const t of [q, out, kc, vc, pk, pv, lengths]) t.release();
  }
  return rows;
}
