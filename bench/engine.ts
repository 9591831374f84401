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
 */
import type { LlamaConfig } from '../src/formats/llama-config';
import { LLAMA_PROJECTIONS } from '../src/formats/peft';
import type { Gpu } from '../src/gpu/gpu';
import { acquireNodeGpu } from '../src/gpu/node';
import { fill } from '../src/kernels/elementwise';
import { q4Linear } from '../src/kernels/linear';
import { releaseQ4, type Q4Weight } from '../src/kernels/q4-layout';
import { ropeInvFreq } from '../src/kernels/rope';
import { generate } from '../src/model/generate';
import { KvCache, prefillShared } from '../src/model/infer';
import { sequenceLogprobs } from '../src/model/llama';
import { LoraAdapter } from '../src/model/lora';
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

/** A model of the given shape with random 4-bit weights and unit norms. */
function randomWeights(gpu: Gpu, config: LlamaConfig): LlamaWeights {
  const { hiddenSize: C, intermediateSize: F, numHeads: H, numKvHeads: HK, headDim: D, vocabSize: V } = config;
  const q4s: Q4Weight[] = [];
  const q = (M: number, K: number) => {
    const w = randomQ4(gpu, M, K);
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
      q4s.forEach(releaseQ4);
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

async function main(): Promise<void> {
  const flags = parseFlags(process.argv.slice(2));
  const config = configFrom(flags);
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
