/**
 * Engine benchmark: `npm run bench:engine [-- --shape 3b|1b|small|tiny] [options]`.
 *
 * Builds a Llama of the given shape with random 4-bit weights (speed does not depend
 * on the values, so no checkpoint is needed) and measures, in one run on one device:
 * prefill tok/s, decode tok/s at batch 1 and for a group of G (aggregate), a LoRA
 * training step's tokens/s and its cost relative to a forward pass over the same
 * tokens, and peak GPU bytes. Batch-1 decode is also given as a fraction of its
 * bandwidth bound: weight bytes per token / the copy kernel's bandwidth.
 *
 * Options: --prompt-tokens P (256)  --new-tokens N (32)  --G (8)  --train-tokens (512)
 *          --rank R (16)  --layers/--hidden/--intermediate/--heads/--kv-heads/--vocab
 *          --unpacked (keep q/k/v and gate/up as separate weights, see src/model/pack.ts)
 *
 * `--record-only` runs the real decode loop (decodeStep, sampling, the step's
 * readback) against a recording-only device (src/gpu/record.ts: no GPU work, buffers
 * hold no data) and prints the host's cost per token for B in {1, 8, 32}, LoRA off
 * and on: dispatches, submits, bind groups, host ms (median and spread of timed
 * blocks, see recordOnly), and the bytes a step reads. It needs no GPU and finishes
 * in seconds for the 3B shape. Record-only options: --new-tokens (64 per block)
 * --reps (7 blocks)  --batch B and --lora on|off (one configuration only)
 * --no-replay (every step recorded afresh, as before decode steps were replayed).
 */
import type { LlamaConfig } from '../src/formats/llama-config';
import { LLAMA_PROJECTIONS } from '../src/formats/peft';
import type { Gpu } from '../src/gpu/gpu';
import { acquireNodeGpu } from '../src/gpu/node';
import { recordingGpu } from '../src/gpu/record';
import type { Tensor } from '../src/gpu/tensor';
import { fill } from '../src/kernels/elementwise';
import { q4Linear } from '../src/kernels/linear';
import { Q4_BLOCK_BYTES, q4Blocks, q4ShardRows, releaseQ4, type Q4Weight } from '../src/kernels/q4-layout';
import { sample } from '../src/kernels/sample';
import { ropeInvFreq } from '../src/kernels/rope';
import { generate } from '../src/model/generate';
import { KvCache, decodeStep, prefillShared } from '../src/model/infer';
import { sequenceLogprobs } from '../src/model/llama';
import { LoraAdapter } from '../src/model/lora';
import { packDecodeProjections } from '../src/model/pack';
import type { LayerWeights, LlamaWeights } from '../src/model/weights';
import { copyBandwidth, parseFlags, printTable, randomQ4 } from './harness';

const SHAPES: Record<string, Partial<LlamaConfig>> = {
  '3b': { hiddenSize: 3072, intermediateSize: 8192, numLayers: 28, numHeads: 24, numKvHeads: 8, headDim: 128 },
  '1b': { hiddenSize: 2048, intermediateSize: 8192, numLayers: 16, numHeads: 32, numKvHeads: 8, headDim: 64 },
  small: { hiddenSize: 1024, intermediateSize: 2816, numLayers: 8, numHeads: 16, numKvHeads: 4, headDim: 64 },
  tiny: { hiddenSize: 256, intermediateSize: 704, numLayers: 4, numHeads: 4, numKvHeads: 2, headDim: 64 },
};

function configFrom(flags: Map<string, string>): LlamaConfig {
  const shape = flags.get('shape') ?? '3b';
  const base = SHAPES[shape];
  if (!base) throw new Error(`--shape must be one of ${Object.keys(SHAPES).join(', ')}`);
  const n = (name: string, fallback: number) => (flags.has(name) ? Number(flags.get(name)) : fallback);
  const hidden = n('hidden', base.hiddenSize!);
  const heads = n('heads', base.numHeads!);
  return {
    architecture: 'LlamaForCausalLM',
    hiddenSize: hidden,
    intermediateSize: n('intermediate', base.intermediateSize!),
    numLayers: n('layers', base.numLayers!),
    numHeads: heads,
    numKvHeads: n('kv-heads', base.numKvHeads!),
    headDim: n('head-dim', flags.has('hidden') || flags.has('heads') ? hidden / heads : base.headDim!),
    vocabSize: n('vocab', 128256),
    maxPositionEmbeddings: 131072,
    ropeTheta: 500000,
    ropeScaling: { type: 'llama3', factor: 32, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 },
    rmsNormEps: 1e-5,
    tieWordEmbeddings: true,
    numLabels: null,
    bosTokenId: 128000,
    eosTokenIds: [128001, 128008, 128009],
    padTokenId: null,
    torchDtype: 'bfloat16',
  };
}

/** A 4-bit weight of the right shards and sizes whose contents are never written (for the recording device). */
function emptyQ4(gpu: Gpu, M: number, K: number): Q4Weight {
  const nb = q4Blocks(K);
  const zb = Math.ceil(nb / 2);
  const rowsPer = q4ShardRows(M, K, gpu.caps.maxStorageBufferBindingSize);
  const shards: Q4Weight['shards'] = [];
  for (let r0 = 0; r0 < M; r0 += rowsPer) {
    const rows = Math.min(rowsPer, M - r0);
    shards.push({
      rowStart: r0,
      rows,
      qweight: gpu.empty([(rows * nb * Q4_BLOCK_BYTES) / 4], 'u32', 'q4.qweight'),
      scales: gpu.empty([Math.ceil((rows * nb) / 2)], 'u32', 'q4.scales'),
      zeros: gpu.empty([Math.ceil((rows * zb) / 4)], 'u32', 'q4.zeros'),
    });
  }
  return { M, K, nb, shards };
}

/** A model of the given shape with random 4-bit weights and unit norms (`makeQ4`: emptyQ4 on the recording device). */
function randomWeights(gpu: Gpu, config: LlamaConfig, makeQ4: (gpu: Gpu, M: number, K: number) => Q4Weight = randomQ4): LlamaWeights {
  const { hiddenSize: C, intermediateSize: F, numHeads: H, numKvHeads: HK, headDim: D, vocabSize: V } = config;
  const q4s: Q4Weight[] = [];
  const q = (M: number, K: number) => {
    const w = makeQ4(gpu, M, K);
    q4s.push(w);
    return w;
  };
  const ones = () => gpu.upload(new Float32Array(C).fill(1), [C]);
  const norms = [ones()];
  const layers: LayerWeights[] = [];
  for (let l = 0; l < config.numLayers; l++) {
    const [inputNorm, postNorm] = [ones(), ones()];
    norms.push(inputNorm, postNorm);
    layers.push({
      inputNorm,
      q: q4Linear(q(H * D, C)),
      k: q4Linear(q(HK * D, C)),
      v: q4Linear(q(HK * D, C)),
      o: q4Linear(q(C, H * D)),
      postNorm,
      gate: q4Linear(q(F, C)),
      up: q4Linear(q(F, C)),
      down: q4Linear(q(C, F)),
    });
  }
  const embed = q(V, C);
  const invFreq = gpu.upload(ropeInvFreq(D, config.ropeTheta, config.ropeScaling), [D / 2]);
  const buffers = [...norms, invFreq, ...q4s.flatMap((w) => w.shards.flatMap((s) => [s.qweight, s.scales, s.zeros!]))];
  return {
    config,
    format: 'q4',
    embed: { format: 'q4', table: embed },
    layers,
    finalNorm: norms[0]!,
    lmHead: q4Linear(embed),
    score: null,
    invFreq,
    bytes: buffers.reduce((s, t) => s + t.buffer.size, 0),
    release() {
      // packDecodeProjections may have released (and replaced) some of these already.
      for (const q of q4s) if (!q.shards[0]!.qweight.isReleased) releaseQ4(q);
      norms.forEach((t) => t.release());
      invFreq.release();
    },
  };
}

async function timed<T>(gpu: Gpu, fn: () => Promise<T> | T): Promise<{ ms: number; value: T }> {
  await gpu.sync();
  const t0 = performance.now();
  const value = await fn();
  await gpu.sync();
  return { ms: performance.now() - t0, value };
}

/**
 * Host cost of the decode loop on a recording-only device: per token, for B in
 * {1, 8, 32} with LoRA off and on. Bytes read are the step's compulsory traffic:
 * every layer weight and the LM head once, the LoRA factors once, the embedding rows
 * of the B tokens, and the K/V each row attends over (the shared prefix counted once).
 *
 * How host ms is measured: every configuration first runs WARMUP_STEPS untimed steps
 * (pipelines built, bind groups and decode recordings made, the JIT settled; one
 * untimed pass over all configurations goes first so the first one is not penalised).
 * Then `--reps` blocks of `--new-tokens` consecutive tokens are timed, each block as
 * a whole with this process's CPU time (user + system, so other processes on a loaded
 * machine do not inflate it; GC and the occasional re-recording as the cache grows
 * fall inside the blocks). A block's figure is its CPU ms / tokens; the table gives
 * the median block, the spread (fastest - slowest block) and the mean over all timed
 * tokens (the re-recordings amortised: decodeStep records its step again when the
 * attention length bound doubles, after 16, 32, 64, ... tokens).
 */
/** Untimed steps per configuration: pipelines, bind groups and the JIT settle. */
const WARMUP_STEPS = 8;

interface RecordRow {
  B: number;
  on: boolean;
  dispatches: number;
  submits: number;
  bindGroups: number;
  /** decode steps recorded (the rest replayed) during the timed tokens */
  recordings: number;
  blocks: number[];
  bytes: number;
  kvBytes: number;
}

async function recordOnly(config: LlamaConfig, flags: Map<string, string>): Promise<void> {
  const P = Number(flags.get('prompt-tokens') ?? 256);
  const tokens = Number(flags.get('new-tokens') ?? 64);
  const reps = Number(flags.get('reps') ?? 7);
  const rank = Number(flags.get('rank') ?? 16);
  const batches = flags.has('batch') ? [Number(flags.get('batch'))] : [1, 8, 32];
  const loraModes = flags.has('lora') ? [flags.get('lora') === 'on'] : [false, true];
  const replay = !flags.has('no-replay');
  const { gpu, rec } = recordingGpu();
  const c = config;
  console.log(`recording-only device (no GPU work): ${c.numLayers} layers, hidden ${c.hiddenSize}, mlp ${c.intermediateSize}, heads ${c.numHeads}/${c.numKvHeads}x${c.headDim}, vocab ${c.vocabSize}; ${P}-token shared prompt, LoRA r=${rank} on all projections, f32 KV cache`);
  if (!replay) console.log('--no-replay: every decode step recorded afresh (decodeStep replay: false)');
  console.log(`host ms: CPU time of this process per token, ${reps} blocks of ${tokens} consecutive tokens after ${WARMUP_STEPS} warm-up steps (and one untimed pass over every configuration); median block, spread = fastest-slowest block, mean = all timed tokens`);
  const w = randomWeights(gpu, config, emptyQ4);
  // As the loaders should: q/k/v and gate/up each in one 4-bit weight (--unpacked keeps them apart).
  const packedGroups = flags.has('unpacked') ? 0 : packDecodeProjections(gpu, w);
  console.log(`projection groups packed for the fused decode GEMVs: ${packedGroups} (maxStorageBuffersPerShaderStage ${gpu.caps.maxStorageBuffersPerShaderStage})`);
  const lora = LoraAdapter.create(gpu, config, { r: rank, alpha: 2 * rank, targets: LLAMA_PROJECTIONS, seed: 1 });
  const { hiddenSize: C, numLayers: L, numKvHeads: HK, headDim: D } = config;
  // w.bytes holds the tied embedding once: the LM head reads all of it, the embedding B rows more.
  const embedRowBytes = q4Blocks(C) * (Q4_BLOCK_BYTES + 2.5);
  const weightBytes = w.bytes;
  const loraBytes = lora.modules.reduce((s, m) => s + 4 * rank * (m.K + m.M), 0);

  /** Runs `timedBlocks` blocks of `tokens` steps of one configuration (none: warm-up only). */
  const measure = async (B: number, on: boolean, timedBlocks: number): Promise<RecordRow> => {
    lora.enabled = on;
    const cache = new KvCache(gpu, config, B, WARMUP_STEPS + timedBlocks * tokens + 2, { dtype: 'f32' });
    prefillShared(gpu, w, lora, Array.from({ length: P }, (_, i) => (i * 7919 + 13) % config.vocabSize), cache).release();
    const ids = gpu.zeros([B], 'u32', 'sampled-ids');
    const logp = gpu.empty([B], 'f32', 'sampled-logp');
    const readback = gpu.empty([2 * B], 'u32', 'sampled-readback');
    let s = 0;
    const step = async () => {
      const logits: Tensor = decodeStep(gpu, w, lora, ids, cache, undefined, { replay });
      sample(gpu, ids, logits, { temperature: 1, seed: 3, step: s++, logp }, B, config.vocabSize);
      logits.release();
      gpu.copy(ids, readback, B * 4, 0, 0);
      gpu.copy(logp, readback, B * 4, 0, B * 4);
      await gpu.readBytes(readback.buffer, 0, 2 * B * 4);
    };
    for (let i = 0; i < WARMUP_STEPS; i++) await step();
    const ctx0 = cache.lengths.reduce((n, x) => n + x, 0);
    const recordings0 = cache.decodeReplay?.recordings ?? 0;
    rec.reset();
    const blocks: number[] = [];
    for (let r = 0; r < timedBlocks; r++) {
      const t0 = process.cpuUsage();
      for (let i = 0; i < tokens; i++) await step();
      const d = process.cpuUsage(t0);
      blocks.push((d.user + d.system) / 1000 / tokens);
    }
    const n = Math.max(1, timedBlocks * tokens);
    const k = rec.counts;
    const recordings = (cache.decodeReplay?.recordings ?? 0) - recordings0;
    // K/V read per step: the prefix once, then each row's own entries (mean over the timed steps).
    const ownPerStep = B * (ctx0 / B + (n + 1) / 2);
    const kvBytes = 2 * L * HK * D * 4 * (P + ownPerStep);
    const bytes = weightBytes + (on ? loraBytes : 0) + B * embedRowBytes + kvBytes;
    cache.release();
    ids.release();
    logp.release();
    readback.release();
    return { B, on, dispatches: k.dispatches / n, submits: k.submits / n, bindGroups: k.bindGroups / n, recordings, blocks, bytes, kvBytes };
  };

  for (const B of batches) for (const on of loraModes) await measure(B, on, 0);
  const rows: (string | number)[][] = [];
  for (const B of batches) {
    for (const on of loraModes) {
      const r = await measure(B, on, reps);
      const sorted = [...r.blocks].sort((a, b) => a - b);
      const median = sorted[Math.floor(sorted.length / 2)]!;
      const mean = r.blocks.reduce((a, b) => a + b, 0) / r.blocks.length;
      rows.push([
        String(B), on ? 'on' : 'off', r.dispatches, r.dispatches / L, r.submits, r.bindGroups, `${r.recordings} / ${reps * tokens}`, median,
        `${sorted[0]!.toFixed(3)}-${sorted[sorted.length - 1]!.toFixed(3)}`,
        mean,
        `${(r.bytes / 1e9).toFixed(3)} GB (KV ${(r.kvBytes / 1e6).toFixed(1)} MB)`,
      ]);
    }
  }
  printTable(['B', 'LoRA', 'dispatches/token', 'per layer', 'submits/token', 'bind groups/token', 'steps recorded', 'host CPU ms/token (median)', 'spread', 'mean', 'bytes read/token'], rows);
  console.log(`\npipelines built: ${gpu.pipelines.size}; weights ${(w.bytes / 2 ** 30).toFixed(3)} GiB (LM head tied to the embedding), LoRA A+B ${(loraBytes / 2 ** 20).toFixed(1)} MiB`);
  lora.release();
  w.release();
  gpu.destroy();
}

async function main(): Promise<void> {
  const flags = parseFlags(process.argv.slice(2));
  const config = configFrom(flags);
  if (flags.has('record-only')) return recordOnly(config, flags);
  const P = Number(flags.get('prompt-tokens') ?? 256);
  const newTokens = Number(flags.get('new-tokens') ?? 32);
  const G = Number(flags.get('G') ?? 8);
  const trainTokens = Number(flags.get('train-tokens') ?? 512);
  const rank = Number(flags.get('rank') ?? 16);

  const gpu = await acquireNodeGpu();
  console.log(`adapter: ${gpu.caps.adapterName}`);
  const c = config;
  console.log(`model: ${c.numLayers} layers, hidden ${c.hiddenSize}, mlp ${c.intermediateSize}, heads ${c.numHeads}/${c.numKvHeads}x${c.headDim}, vocab ${c.vocabSize}, random 4-bit weights`);
  const copy = await copyBandwidth(gpu, Math.min(256 * 2 ** 20, gpu.caps.maxStorageBufferBindingSize), { warmup: 1, iters: 5, reps: 3, budgetMs: 2000 });
  const w = randomWeights(gpu, config);
  if (!flags.has('unpacked')) packDecodeProjections(gpu, w);
  const lora = LoraAdapter.create(gpu, config, { r: rank, alpha: 2 * rank, targets: LLAMA_PROJECTIONS, seed: 1 });
  gpu.pool.trim(); // drop the copy test's freed buffers so the peak counts only this run
  gpu.pool.resetPeaks();
  console.log(`weights ${(w.bytes / 2 ** 30).toFixed(3)} GiB, LoRA r=${rank} on all projections ${(lora.bytes / 2 ** 20).toFixed(1)} MiB (A, B, grads, AdamW); copy kernel ${copy.gbps.toFixed(1)} GB/s`);

  const rng = (n: number) => Array.from({ length: n }, (_, i) => (i * 7919 + 13) % 120000);
  const prompt = rng(P);
  const rows: (string | number)[][] = [];

  // Prefill: the prompt once (warm-up run first compiles the pipelines).
  for (let rep = 0; rep < 2; rep++) {
    const cache = new KvCache(gpu, config, 1, 8);
    const r = await timed(gpu, () => prefillShared(gpu, w, lora, prompt, cache));
    r.value.release();
    cache.release();
    if (rep === 1) rows.push([`prefill ${P} tokens`, r.ms, (P / r.ms) * 1000, '']);
  }

  // Decode: time of N new tokens minus time of 1 new token (same prefill), per step.
  const decodeRate = async (g: number) => {
    const run = (n: number) => timed(gpu, () => generate(gpu, w, lora, { prompt, G: g, maxNewTokens: n, temperature: 1, seed: 3, stopTokens: [] }));
    await run(2);
    const one = await run(1);
    const many = await run(newTokens + 1);
    const stepMs = (many.ms - one.ms) / newTokens;
    return { stepMs, tokS: (g / stepMs) * 1000 };
  };
  const d1 = await decodeRate(1);
  const boundTokS = (copy.gbps * 1e9) / w.bytes;
  rows.push(['decode batch 1', d1.stepMs, d1.tokS, `${((d1.tokS / boundTokS) * 100).toFixed(0)}% of bandwidth bound (${boundTokS.toFixed(1)} tok/s)`]);
  const dg = await decodeRate(G);
  rows.push([`decode group G=${G} (aggregate)`, dg.stepMs, dg.tokS, `${(dg.tokS / d1.tokS).toFixed(2)}x batch 1`]);

  // Training: forward-only scoring vs a LoRA step (forward with tape, backward, AdamW) on the same tokens.
  const ids = Uint32Array.from(rng(trainTokens));
  const batch = { ids, B: 1, T: trainTokens };
  const dlogp = gpu.empty([trainTokens]);
  fill(gpu, dlogp, -1 / trainTokens, trainTokens);
  const forward = async () => {
    const pass = sequenceLogprobs(gpu, w, lora, batch);
    await gpu.readF32(pass.logp);
    pass.release();
  };
  const trainStep = async () => {
    lora.zeroGrad();
    const pass = sequenceLogprobs(gpu, w, lora, batch, { train: true });
    pass.backward(dlogp);
    pass.release();
    await lora.step({ lr: 1e-5 }).read();
  };
  await forward();
  const fwd = await timed(gpu, forward);
  await trainStep();
  const step = await timed(gpu, trainStep);
  rows.push([`forward (scoring) ${trainTokens} tokens`, fwd.ms, (trainTokens / fwd.ms) * 1000, '']);
  rows.push([`LoRA train step ${trainTokens} tokens`, step.ms, (trainTokens / step.ms) * 1000, `${(step.ms / fwd.ms).toFixed(2)}x forward`]);
  dlogp.release();

  printTable(['engine', 'ms', 'tok/s', 'note'], rows);
  const st = gpu.stats();
  console.log(`\npeak GPU bytes: ${(st.peakAllocatedBytes / 2 ** 30).toFixed(3)} GiB (weights ${(w.bytes / 2 ** 30).toFixed(3)} GiB included)`);
  console.log(`copy kernel ${copy.gbps.toFixed(1)} GB/s on ${gpu.caps.adapterName}; all figures from this run`);
  lora.release();
  w.release();
  gpu.destroy();
}

main().then(
  () => process.exit(0),
  (e: unknown) => {
    console.error(e);
    process.exit(1);
  },
);
