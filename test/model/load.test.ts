/**
 * The loader against independent references: every tensor of models/tiny-llama read
 * straight from its safetensors file (bf16 widened on the CPU) for format f32, and the
 * float64 CPU quantizer (quantizeQ4Ref) for format q4, bit for bit.
 */
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { NodeFileSource } from '../../src/formats/node-source';
import { openSafetensors, type SafetensorsFile } from '../../src/formats/safetensors';
import { downloadQ4 } from '../../src/kernels/q4-layout';
import { dequantizeQ4Ref, quantizeQ4Ref } from '../../src/kernels/q4.ref';
import { loadLlama } from '../../src/model/load';
import { openModelDir } from '../../src/model/node-source';
import type { LlamaWeights } from '../../src/model/weights';
import { useGpu } from '../helpers/gpu';
import { TINY_DIR, expectSameBytes, linearValues } from '../helpers/model-files';

const PROJ = [
  ['q', 'self_attn.q_proj'],
  ['k', 'self_attn.k_proj'],
  ['v', 'self_attn.v_proj'],
  ['o', 'self_attn.o_proj'],
  ['gate', 'mlp.gate_proj'],
  ['up', 'mlp.up_proj'],
  ['down', 'mlp.down_proj'],
] as const;

describe('loadLlama on models/tiny-llama', () => {
  const gpu = useGpu();
  let st: SafetensorsFile;
  const ref = async (name: string): Promise<Float32Array> => st.readTensorF32(name);
  beforeAll(async () => {
    st = await openSafetensors(await NodeFileSource.open(join(TINY_DIR, 'model.safetensors')));
  });

  it('format f32: every tensor equals the checkpoint widened to f32', async () => {
    const before = gpu().stats().inUseBytes;
    const m = await loadLlama(gpu(), await openModelDir(TINY_DIR), { format: 'f32' });
    const w = m.weights;
    expect(w.format).toBe('f32');
    expect(w.embed.format).toBe('f32');
    expect(w.layers.length).toBe(2);
    if (w.embed.format !== 'f32') throw new Error('unreachable');
    expectSameBytes(await gpu().readF32(w.embed.table), await ref('model.embed_tokens.weight'));
    expectSameBytes(await gpu().readF32(w.finalNorm), await ref('model.norm.weight'));
    for (let l = 0; l < 2; l++) {
      const L = w.layers[l]!;
      expectSameBytes(await gpu().readF32(L.inputNorm), await ref(`model.layers.${l}.input_layernorm.weight`));
      expectSameBytes(await gpu().readF32(L.postNorm), await ref(`model.layers.${l}.post_attention_layernorm.weight`));
      for (const [field, mod] of PROJ) {
        expectSameBytes(await linearValues(gpu(), L[field]), await ref(`model.layers.${l}.${mod}.weight`));
      }
    }
    expect(w.score).toBeNull();
    expect(gpu().stats().inUseBytes - before).toBe(w.bytes);
    w.release();
    expect(gpu().stats().inUseBytes).toBe(before);
  });

  it('format q4: embedding and projections are bit-identical to the CPU quantizer', async () => {
    const before = gpu().stats().inUseBytes;
    const m = await loadLlama(gpu(), await openModelDir(TINY_DIR), { format: 'q4' });
    const w = m.weights;
    if (w.embed.format !== 'q4') throw new Error('embedding should be 4-bit');
    const emb = await ref('model.embed_tokens.weight');
    const want = quantizeQ4Ref(emb, 128256, 64, true);
    const got = await downloadQ4(gpu(), w.embed.table);
    expectSameBytes(got.qweight, want.qweight, 'qweight');
    expectSameBytes(got.scales, want.scales, 'scales');
    expectSameBytes(got.zeros!, want.zeros!, 'zeros');
    for (const [field, mod] of PROJ) {
      const name = `model.layers.1.${mod}.weight`;
      const values = await ref(name);
      const lin = w.layers[1]![field];
      const deq = dequantizeQ4Ref(quantizeQ4Ref(values, lin.V, lin.C, true));
      expectSameBytes(await linearValues(gpu(), lin), Float32Array.from(deq), name);
    }
    expectSameBytes(await gpu().readF32(w.layers[0]!.inputNorm), await ref('model.layers.0.input_layernorm.weight'));
    expect(gpu().stats().inUseBytes - before).toBe(w.bytes);
    w.release();
    expect(gpu().stats().inUseBytes).toBe(before);
  });
});

export type { LlamaWeights };
