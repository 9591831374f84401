import { describe, expect, it } from 'vitest';
import type { LlamaConfig } from '../../src/formats/llama-config';
import { recordingGpu } from '../../src/gpu/record';
import { KvCache, decodeStep, prefillShared } from '../../src/model/infer';
import { sample } from '../../src/kernels/sample';
import { LoraAdapter } from '../../src/model/lora';
import { LLAMA_PROJECTIONS } from '../../src/formats/peft';
import type { Gpu } from '../../src/gpu/gpu';
import { q4Linear } from '../../src/kernels/linear';
import { Q4_BLOCK_BYTES, q4Blocks, type Q4Weight } from '../../src/kernels/q4-layout';
import type { LayerWeights, LlamaWeights } from '../../src/model/weights';

/** A small Llama whose buffers are never written (the recording device holds no data). */
function shapeOnlyWeights(gpu: Gpu): { w: LlamaWeights; config: LlamaConfig } {
  const config: LlamaConfig = {
    architecture: 'LlamaForCausalLM', hiddenSize: 64, intermediateSize: 128, numLayers: 2, numHeads: 4, numKvHeads: 2, headDim: 16,
    vocabSize: 96, maxPositionEmbeddings: 256, ropeTheta: 10000, ropeScaling: null, rmsNormEps: 1e-5, tieWordEmbeddings: true,
    numLabels: null, bosTokenId: 1, eosTokenIds: [2], padTokenId: null, torchDtype: 'float32',
  };
  const q = (M: number, K: number): Q4Weight => {
    const nb = q4Blocks(K);
    return {
      M, K, nb,
      shards: [{ rowStart: 0, rows: M, qweight: gpu.empty([(M * nb * Q4_BLOCK_BYTES) / 4], 'u32'), scales: gpu.empty([Math.ceil((M * nb) / 2)], 'u32'), zeros: null }],
    };
  };
  const { hiddenSize: C, intermediateSize: F, numHeads: H, numKvHeads: HK, headDim: D } = config;
  const layers: LayerWeights[] = Array.from({ length: config.numLayers }, () => ({
    inputNorm: gpu.empty([C]), q: q4Linear(q(H * D, C)), k: q4Linear(q(HK * D, C)), v: q4Linear(q(HK * D, C)), o: q4Linear(q(C, H * D)),
    postNorm: gpu.empty([C]), gate: q4Linear(q(F, C)), up: q4Linear(q(F, C)), down: q4Linear(q(C, F)),
  }));
  const table = q(config.vocabSize, C);
  const w: LlamaWeights = {
    config, format: 'q4', embed: { format: 'q4', table }, layers, finalNorm: gpu.empty([C]), lmHead: q4Linear(table), score: null,
    invFreq: gpu.empty([D / 2]), bytes: 0, release() {},
  };
  return { w, config };
}

/** The recording device records the real decode path without a GPU (what bench:engine --record-only measures). */
describe('recording-only device', () => {
  it('records a decode step: one submit per token, no bind groups or pipelines rebuilt after the first step', async () => {
    const { gpu, rec } = recordingGpu();
    console.log(`[adapter] gpu/record.test.ts: ${gpu.caps.adapterName}`);
    const { w, config } = shapeOnlyWeights(gpu);
    const lora = LoraAdapter.create(gpu, config, { r: 4, alpha: 8, targets: LLAMA_PROJECTIONS, seed: 1 });
    const B = 3;
    const cache = new KvCache(gpu, config, B, 8);
    prefillShared(gpu, w, lora, [1, 2, 3, 4, 5], cache).release();
    const ids = gpu.zeros([B], 'u32');
    const counts: { dispatches: number; submits: number; bindGroups: number; pipelines: number }[] = [];
    for (let s = 0; s < 3; s++) {
      rec.reset();
      const logits = decodeStep(gpu, w, lora, ids, cache);
      await gpu.readBytes(logits.buffer, 0, 16);
      logits.release();
      counts.push({ ...rec.counts });
    }
    expect(cache.lengths).toEqual([3, 3, 3]);
    // Step 0 also submits the prefill still recorded when its uploads ran.
    for (const c of counts.slice(1)) {
      expect(c.submits).toBe(1);
      expect(c.dispatches).toBe(counts[0]!.dispatches);
      expect(c.dispatches).toBeGreaterThan(config.numLayers * 7); // every projection at least
    }
    expect(counts[1]!.pipelines).toBe(0);
    expect(counts[2]!.bindGroups).toBe(0);
    lora.release();
    w.release();
    gpu.destroy();
  });

  it('a decode token replays its recorded step: no pool allocation, pipeline or bind group look-up, one upload of the per-token values', async () => {
    const { gpu, rec } = recordingGpu();
    const { w, config } = shapeOnlyWeights(gpu);
    const lora = LoraAdapter.create(gpu, config, { r: 4, alpha: 8, targets: LLAMA_PROJECTIONS, seed: 1 });
    const B = 3;
    const V = config.vocabSize;
    const cache = new KvCache(gpu, config, B, 200);
    prefillShared(gpu, w, lora, [1, 2, 3, 4, 5], cache).release();
    const ids = gpu.zeros([B], 'u32');
    const logp = gpu.empty([B], 'f32');
    const readback = gpu.empty([2 * B], 'u32');
    // One token as generate() runs it: decode, sample, one readback.
    const token = async (s: number) => {
      const logits = decodeStep(gpu, w, lora, ids, cache);
      sample(gpu, ids, logits, { temperature: 1, seed: 1, step: s, logp }, B, V);
      logits.release();
      gpu.copy(ids, readback, B * 4, 0, 0);
      gpu.copy(logp, readback, B * 4, 0, B * 4);
      await gpu.readBytes(readback.buffer, 0, 2 * B * 4);
    };
    await token(0);
    const recorded = cache.decodeReplay!.list!.dispatches;
    expect(recorded).toBeGreaterThan(config.numLayers * 5);
    const perToken: Record<string, number>[] = [];
    for (let s = 1; s < 70; s++) {
      rec.reset();
      const before = { acquisitions: gpu.pool.acquisitions, lookups: gpu.pipelines.lookups, bindGroupLookups: gpu.bindGroupLookups, recordings: cache.decodeReplay!.recordings };
      await token(s);
      perToken.push({
        acquisitions: gpu.pool.acquisitions - before.acquisitions,
        pipelineLookups: gpu.pipelines.lookups - before.lookups,
        bindGroupLookups: gpu.bindGroupLookups - before.bindGroupLookups,
        recordings: cache.decodeReplay!.recordings - before.recordings,
        bindGroups: rec.counts.bindGroups,
        pipelines: rec.counts.pipelines,
        writeBuffers: rec.counts.writeBuffers,
        writeBytes: rec.counts.writeBytes,
        submits: rec.counts.submits,
        dispatches: rec.counts.dispatches,
      });
    }
    // The length bound doubles from 16 when the longest row needs 17, 33, 65 entries
    // (tokens 16, 32, 64): those tokens record the step again; the others only replay it.
    const replayed = {
      acquisitions: 0, pipelineLookups: 1, bindGroupLookups: 1, recordings: 0, bindGroups: 0, pipelines: 0,
      writeBuffers: 2, writeBytes: 3 * B * 4 + 256, submits: 1, dispatches: recorded + 1,
    };
    perToken.forEach((c, i) => {
      const s = i + 1;
      if (s === 16 || s === 32 || s === 64) {
        expect(c.recordings, `token ${s}`).toBe(1);
        expect(c.dispatches, `token ${s}`).toBe(recorded + 1);
      } else {
        // the sample dispatch is the one pipeline and bind group look-up; the writes are
        // the decode step's [3, B] values and the sample's uniform slot
        expect(c, `token ${s}`).toEqual(replayed);
      }
    });
    expect(cache.decodeReplay!.recordings).toBe(4);
    // Switching the adapter off (or on) is another step: recorded once, then replayed.
    lora.enabled = false;
    await token(70);
    await token(71);
    expect(cache.decodeReplay!.recordings).toBe(5);
    expect(cache.decodeReplay!.list!.dispatches).toBeLessThan(recorded);
    const inUse = gpu.stats().inUseBytes;
    cache.release();
    expect(gpu.stats().inUseBytes).toBeLessThan(inUse); // the recording's scratch went back to the pool
    for (const t of [ids, logp, readback]) t.release();
    lora.release();
    gpu.destroy();
  });
});
