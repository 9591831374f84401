/**
 * The fused decode path on tiny-llama's 4-bit weights with the fixture LoRA adapter:
 * a decode step (fused GEMVs, RoPE with the cache write, LoRA B in the epilogues)
 * gives the logits of a full prefill (the general kernels), before and after q/k/v and
 * gate/up are packed into one weight each; packing changes no logits of either path
 * and cuts a step's dispatches where bindings were the limit.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Gpu } from '../../src/gpu/gpu';
import type { Tensor } from '../../src/gpu/tensor';
import { fusedDecodeCarry, fusedDecodeSupported } from '../../src/model/decode-fused';
import type { KvDtype } from '../../src/kernels/attention';
import { KvCache, decodeStep, prefill, type InferenceLora } from '../../src/model/infer';
import { loadLlama } from '../../src/model/load';
import { LoraAdapter } from '../../src/model/lora';
import { openModelDir } from '../../src/model/node-source';
import { packDecodeProjections } from '../../src/model/pack';
import type { LlamaWeights } from '../../src/model/weights';
import { useGpu } from '../helpers/gpu';
import { ROOT, TINY_DIR, smallVocab } from '../helpers/model-files';
import { expectClose } from '../helpers/numeric';

const ADAPTER_DIR = join(ROOT, 'models', 'tiny-llama-lora');
const SMALL_V = 1024;


async function readLogits(gpu: Gpu, t: Tensor): Promise<Float32Array> {
  const out = await gpu.readF32(t);
  t.release();
  return out;
}

const prompts = [
  [5, 17, 300, 42, 9],
  [800, 3, 3, 61],
];
const next = [77, 512];

/** Logits of a decode step after each prompt (B = 2 rows) and the step's dispatch count. */
async function decodeLogits(gpu: Gpu, w: LlamaWeights, lora: InferenceLora | null, dtype: KvDtype = 'f32'): Promise<{ logits: Float32Array; dispatches: number }> {
  const cache = new KvCache(gpu, w.config, 2, 8, { dtype });
  try {
    (await readLogits(gpu, prefill(gpu, w, lora, prompts, cache))).fill(0);
    const ids = gpu.upload(Uint32Array.from(next), [2], 'u32');
    const before = gpu.dispatches;
    const t = decodeStep(gpu, w, lora, ids, cache);
    const dispatches = gpu.dispatches - before;
    const logits = await readLogits(gpu, t);
    ids.release();
    return { logits, dispatches };
  } finally {
    cache.release();
  }
}

/** Last-position logits of a full prefill of each prompt followed by its next token. */
async function prefillLogits(gpu: Gpu, w: LlamaWeights, lora: InferenceLora | null): Promise<Float32Array> {
  const cache = new KvCache(gpu, w.config, 2, 8);
  try {
    return await readLogits(gpu, prefill(gpu, w, lora, prompts.map((p, i) => [...p, next[i]!]), cache));
  } finally {
    cache.release();
  }
}

describe('fused decode on 4-bit weights, unpacked and packed', () => {
  const getGpu = useGpu();
  let full: LlamaWeights;
  let w: LlamaWeights;
  let adapter: LoraAdapter;
  beforeAll(async () => {
    const gpu = getGpu();
    full = (await loadLlama(gpu, await openModelDir(TINY_DIR), { format: 'q4' })).weights;
    w = smallVocab(full, SMALL_V);
    adapter = LoraAdapter.fromPeft(gpu, full.config, {
      'adapter_config.json': readFileSync(join(ADAPTER_DIR, 'adapter_config.json'), 'utf8'),
      'adapter_model.safetensors': new Uint8Array(readFileSync(join(ADAPTER_DIR, 'adapter_model.safetensors'))),
    });
  });
  afterAll(() => {
    adapter?.release();
    full?.release();
  });

  it('decode logits equal a full prefill with and without LoRA; packing changes neither path', async () => {
    const gpu = getGpu();
    const tol = { atol: 1e-4, rtol: 1e-4 };
    const lora: InferenceLora = adapter;
    expect(fusedDecodeSupported(w, lora.layers, 2)).toBe(true);
    const before = { base: await decodeLogits(gpu, w, null), lora: await decodeLogits(gpu, w, lora) };
    const refBase = await prefillLogits(gpu, w, null);
    const refLora = await prefillLogits(gpu, w, lora);
    expectClose(before.base.logits, refBase, { ...tol, label: 'decode (unpacked, base) vs prefill' });
    expectClose(before.lora.logits, refLora, { ...tol, label: 'decode (unpacked, LoRA) vs prefill' });

    expect(packDecodeProjections(gpu, full)).toBe(2 * full.config.numLayers);
    expect(packDecodeProjections(gpu, full)).toBe(0); // once per model
    const after = { base: await decodeLogits(gpu, w, null), lora: await decodeLogits(gpu, w, lora) };
    expectClose(after.base.logits, before.base.logits, { atol: 1e-6, rtol: 1e-6, label: 'packed vs unpacked decode, base' });
    expectClose(after.lora.logits, before.lora.logits, { atol: 1e-6, rtol: 1e-6, label: 'packed vs unpacked decode, LoRA' });
    // The row views serve the general kernels too (prefill, training).
    expectClose(await prefillLogits(gpu, w, lora), refLora, { atol: 1e-6, rtol: 1e-6, label: 'prefill through packed row views' });
    expect(after.lora.dispatches).toBeLessThanOrEqual(before.lora.dispatches);
    // Packed, LoRA on all seven projections costs no dispatch per layer: o's and down's A
    // products ride in their GEMVs and their B products in the next norm and GEMV; the
    // last layer's down B product is the one extra dispatch of the step.
    if (fusedDecodeCarry(gpu, w, lora.layers, 2).defer) expect(after.lora.dispatches).toBe(after.base.dispatches + 1);
    else console.log(`LoRA B products not deferred: the adapter allows ${gpu.caps.maxStorageBuffersPerShaderStage} storage bindings per stage`);
    const L = full.config.numLayers;
    console.log(`decode step dispatches (B=2, LoRA on, ${L} layers): ${before.lora.dispatches} unpacked, ${after.lora.dispatches} packed; base ${before.base.dispatches} / ${after.base.dispatches}`);
  }, 300_000);

  it('loadLlama with packDecode packs 4-bit safetensors weights at load, and the packed model decodes as the unpacked one', async () => {
    const gpu = getGpu();
    const loaded = (await loadLlama(gpu, await openModelDir(TINY_DIR), { format: 'q4', packDecode: true })).weights;
    try {
      expect(packDecodeProjections(gpu, loaded)).toBe(0); // already packed at load
      const fromLoad = await decodeLogits(gpu, smallVocab(loaded, SMALL_V), adapter);
      expectClose(fromLoad.logits, (await decodeLogits(gpu, w, adapter)).logits, { atol: 1e-6, rtol: 1e-6, label: 'packed at load vs packed later' });
    } finally {
      loaded.release();
    }
  }, 300_000);

  it('with an f16 KV cache (RoPE writes rounded keys and values) the decode step stays at the prefill logits', async (ctx) => {
    const gpu = getGpu();
    if (!gpu.caps.f16) {
      console.log(`skipped: adapter ${gpu.caps.adapterName} lacks shader-f16`);
      ctx.skip('adapter lacks shader-f16');
    }
    const lora: InferenceLora = adapter;
    const half = await decodeLogits(gpu, w, lora, 'f16');
    // f16 K/V carry a relative rounding of 2^-11; the f32-cache path above is held to 1e-4.
    expectClose(half.logits, await prefillLogits(gpu, w, lora), { atol: 1e-2, rtol: 1e-2, label: 'decode (f16 cache, LoRA) vs prefill' });
  }, 300_000);
});
