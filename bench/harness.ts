/**
 * Benchmark plumbing shared by the bench scripts: a vec4 copy kernel as the device's
 * own bandwidth yardstick, wall-clock timing of batched GPU work, and a table printer.
 * Timings are the median of several repetitions, each a batch of calls ended by one
 * queue drain, so submit overhead is amortised the way a real decode loop amortises it.
 */
import { f32ToF16, type Gpu } from '../src/gpu/gpu';
import { Params } from '../src/gpu/params';
import type { Tensor } from '../src/gpu/tensor';
import { Q4_BLOCK_BYTES, q4Blocks, uploadQ4, type Q4Weight } from '../src/kernels/q4-layout';
import { WG_LINEAR, grid, kernelCache } from '../src/kernels/wgsl';

export { parseFlags } from '../src/cli/flags';

const copyKernel = kernelCache(() => ({
  label: 'bench_copy_vec4',
  code: /* wgsl */ `
struct Params { n4: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> src: array<vec4<u32>>;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u, @builtin(local_invocation_index) lid: u32) {
  let i = ${WG_LINEAR} * 256u + lid;
  if (i < p.n4) { dst[i] = src[i]; }
}`,
}));

/** Copies `bytes` (multiple of 16) from src to dst with a plain storage-buffer kernel. */
export function copyBytes(gpu: Gpu, dst: Tensor, src: Tensor, bytes: number): void {
  const n4 = bytes / 16;
  gpu.dispatch(copyKernel(), [dst, src], grid(Math.ceil(n4 / 256)), new Params().u32(n4));
}

export interface Timing {
  /** median milliseconds per call */
  ms: number;
  reps: number;
  iters: number;
}

/**
 * Median milliseconds per call. The first (warm-up) call also sizes the batch: slow
 * calls get fewer iterations and repetitions, so a software adapter finishes in
 * minutes while a real GPU still gets a stable median of many short batches.
 */
export async function timeGpu(gpu: Gpu, fn: () => void, opts: { warmup?: number; iters?: number; reps?: number; budgetMs?: number } = {}): Promise<Timing> {
  const { warmup = 2, budgetMs = 3000 } = opts;
  let { iters = 10, reps = 5 } = opts;
  const t0 = performance.now();
  fn();
  await gpu.sync();
  const first = performance.now() - t0;
  for (let i = 1; i < warmup && first < 500; i++) fn();
  await gpu.sync();
  // Keep the whole measurement near budgetMs, never below one call per repetition.
  iters = Math.max(1, Math.min(iters, Math.floor(budgetMs / reps / Math.max(first, 1e-3))));
  if (first * reps > budgetMs) reps = Math.max(1, Math.min(reps, Math.floor(budgetMs / first)));
  const samples: number[] = [];
  for (let r = 0; r < reps; r++) {
    const t1 = performance.now();
    for (let i = 0; i < iters; i++) fn();
    await gpu.sync();
    samples.push((performance.now() - t1) / iters);
  }
  samples.sort((a, b) => a - b);
  return { ms: samples[Math.floor(samples.length / 2)]!, reps, iters };
}

/** Measures copy bandwidth (read + write bytes per second) on `bytes` of data. */
export async function copyBandwidth(gpu: Gpu, bytes: number, opts?: Parameters<typeof timeGpu>[2]): Promise<{ gbps: number; timing: Timing }> {
  const src = gpu.zeros([bytes / 4], 'u32');
  const dst = gpu.empty([bytes / 4], 'u32');
  const timing = await timeGpu(gpu, () => copyBytes(gpu, dst, src, bytes), opts);
  src.release();
  dst.release();
  return { gbps: (2 * bytes) / (timing.ms * 1e-3) / 1e9, timing };
}

export function printTable(headers: string[], rows: (string | number)[][]): string {
  const cells = rows.map((r) => r.map((c) => (typeof c === 'number' ? formatNumber(c) : c)));
  const widths = headers.map((h, i) => Math.max(h.length, ...cells.map((r) => r[i]!.length)));
  const line = (r: string[]) => `| ${r.map((c, i) => c.padEnd(widths[i]!)).join(' | ')} |`;
  const out = [line(headers), `|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`, ...cells.map(line)].join('\n');
  console.log(out);
  return out;
}

function formatNumber(x: number): string {
  if (!Number.isFinite(x)) return String(x);
  const a = Math.abs(x);
  if (a >= 100) return x.toFixed(0);
  if (a >= 10) return x.toFixed(1);
  if (a >= 1) return x.toFixed(2);
  return x.toPrecision(2);
}


/** A random 4-bit weight (valid scales, random nibbles): speed does not depend on values. */
export function randomQ4(gpu: Gpu, M: number, K: number): Q4Weight {
  const nb = q4Blocks(K);
  const qweight = new Uint8Array(M * nb * Q4_BLOCK_BYTES);
  let s = 0x9e3779b9;
  const words = new Uint32Array(qweight.buffer);
  for (let i = 0; i < words.length; i++) {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    words[i] = s >>> 0;
  }
  const scales = f32ToF16(new Float32Array(M * nb).fill(0.01));
  const zeros = new Uint8Array(M * Math.ceil(nb / 2)).fill(0x88);
  return uploadQ4(gpu, { qweight, scales, zeros }, M, K);
}

