/**
 * Kernel benchmark: `npm run bench:kernels [-- --quick]`.
 *
 * Prints the adapter, a plain copy kernel's bandwidth, and for each kernel its
 * GB/s or GFLOP/s plus the ratio to the copy kernel measured in the same run on the
 * same device (bandwidth-bound kernels: effective bytes moved / time / copy GB/s).
 * Shapes are Llama-3.2-3B's. --quick shrinks repetitions for slow software adapters.
 */
import { acquireNodeGpu } from '../src/gpu/node';
import { q4Matmul, q4MatmulBackward } from '../src/kernels/q4';
import { q4Bytes, releaseQ4 } from '../src/kernels/q4-layout';
import { attentionBenchCases } from './attention-cases';
import { copyBandwidth, parseFlags, printTable, randomQ4, timeGpu } from './harness';

const flags = parseFlags(process.argv.slice(2));
const quick = flags.has('quick');
const timing = quick ? { warmup: 1, iters: 3, reps: 3, budgetMs: 1000 } : { warmup: 3, iters: 20, reps: 7, budgetMs: 4000 };

async function main(): Promise<void> {
  const gpu = await acquireNodeGpu();
  console.log(`adapter: ${gpu.caps.adapterName}`);
  console.log(`features: f16=${gpu.caps.f16} subgroups=${gpu.caps.subgroups} timestamp-query=${gpu.caps.timestampQuery}`);
  const copyBytes = Math.min(256 * 2 ** 20, gpu.caps.maxStorageBufferBindingSize);
  const copy = await copyBandwidth(gpu, copyBytes, timing);
  console.log(`copy kernel: ${copy.gbps.toFixed(1)} GB/s (read+write of ${copyBytes / 2 ** 20} MiB)\n`);

  const rows: (string | number)[][] = [];
  const push = (row: (string | number)[]) => {
    rows.push(row);
    console.log(`  ${row[0]}: ${(row[1] as number).toFixed(2)} ms`);
  };
  const shapes: [string, number, number][] = [
    ['q_proj/o_proj 3072x3072', 3072, 3072],
    ['gate/up 8192x3072', 8192, 3072],
    ['down 3072x8192', 3072, 8192],
    ['lm_head 128256x3072', 128256, 3072],
  ];
  for (const [name, M, K] of shapes) {
    const W = randomQ4(gpu, M, K);
    for (const N of [1, 8]) {
      const x = gpu.zeros([N, K]);
      const y = gpu.empty([N, M]);
      const t = await timeGpu(gpu, () => q4Matmul(gpu, y, x, W, N), timing);
      const bytes = q4Bytes(M, K, true) + 4 * N * (K + M);
      const gbps = bytes / (t.ms * 1e-3) / 1e9;
      push([`q4 GEMV N=${N} ${name}`, t.ms, gbps, (2 * N * M * K) / (t.ms * 1e-3) / 1e9, gbps / copy.gbps]);
      x.release();
      y.release();
    }
    if (M !== 128256) {
      const N = 512;
      const x = gpu.zeros([N, K]);
      const y = gpu.empty([N, M]);
      const t = await timeGpu(gpu, () => q4Matmul(gpu, y, x, W, N), timing);
      const flops = (2 * N * M * K) / (t.ms * 1e-3) / 1e9;
      const gbps = (q4Bytes(M, K, true) + 4 * N * (K + M)) / (t.ms * 1e-3) / 1e9;
      push([`q4 GEMM N=${N} ${name}`, t.ms, gbps, flops, gbps / copy.gbps]);
      const tb = await timeGpu(gpu, () => q4MatmulBackward(gpu, x, y, W, N), timing);
      const gbpsB = (q4Bytes(M, K, true) + 4 * N * (K + M)) / (tb.ms * 1e-3) / 1e9;
      push([`q4 GEMM dx N=${N} ${name}`, tb.ms, gbpsB, (2 * N * M * K) / (tb.ms * 1e-3) / 1e9, gbpsB / copy.gbps]);
      x.release();
      y.release();
    }
    releaseQ4(W);
  }
  for (const c of await attentionBenchCases(gpu, timing)) push([c.name, c.ms, c.gbps, c.gflops, c.gbps / copy.gbps]);

  printTable(['kernel', 'ms', 'GB/s', 'GFLOP/s', 'GB/s / copy'], rows);
  console.log(`\ncopy kernel ${copy.gbps.toFixed(1)} GB/s on ${gpu.caps.adapterName}; ratios measured in this run`);
  gpu.destroy();
  process.exit(0);
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
