import { describe, expect, it } from 'vitest';
import type { LlamaConfig } from '../../src/formats/llama-config';
import { recordingGpu } from '../../src/gpu/record';
import { KvCache, decodeStep, prefillShared } from '../../src/model/infer';
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
});
