/** The committed tiny checkpoint and adapter (scripts/make-fixtures.py) read through every format module. */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { checkLlamaTensors, llamaTensorShapes, parseLlamaConfig } from '../../src/formats/llama-config';
import { NodeFileSource } from '../../src/formats/node-source';
import { loraModelShape, readAdapter, writeAdapter } from '../../src/formats/peft';
import { openSafetensors } from '../../src/formats/safetensors';

const ROOT = join(__dirname, '..', '..');
const MODEL = join(ROOT, 'models', 'tiny-llama');
const ADAPTER = join(ROOT, 'models', 'tiny-llama-lora');

describe('models/tiny-llama', () => {
  it('parses config.json', async () => {
    const cfg = parseLlamaConfig(await readFile(join(MODEL, 'config.json')), 'config.json');
    expect(cfg).toMatchObject({
      architecture: 'LlamaForCausalLM',
      hiddenSize: 64,
      intermediateSize: 160,
      numLayers: 2,
      numHeads: 4,
      numKvHeads: 2,
      headDim: 16,
      vocabSize: 128256,
      ropeTheta: 500000,
      ropeScaling: { type: 'llama3', factor: 32, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 },
      rmsNormEps: 1e-5,
      tieWordEmbeddings: true,
      bosTokenId: 128000,
      eosTokenIds: [128001, 128008, 128009],
      torchDtype: 'bfloat16',
    });
  });

  it('holds exactly the tensors the config implies, in BF16', async () => {
    const cfg = parseLlamaConfig(await readFile(join(MODEL, 'config.json')), 'config.json');
    const src = await NodeFileSource.open(join(MODEL, 'model.safetensors'));
    try {
      const st = await openSafetensors(src);
      const listed = [...st.tensors.values()];
      expect(checkLlamaTensors(cfg, listed.map((t) => [t.name, t.shape] as const), src.name)).toEqual([]);
      expect(listed.length).toBe(llamaTensorShapes(cfg).size);
      expect(listed.every((t) => t.dtype === 'BF16')).toBe(true);
      const norm = await st.readTensorF32('model.norm.weight');
      expect(norm.length).toBe(64);
      expect(norm.every((v) => Number.isFinite(v))).toBe(true);
      // The 16 MB embedding streamed in 1 MiB row-aligned chunks covers every row once.
      let rows = 0;
      for await (const c of st.readTensorChunks('model.embed_tokens.weight', 1 << 20)) {
        expect(c.rowStart).toBe(rows);
        expect(c.data.length).toBe(c.rowCount * 64 * 2);
        rows += c.rowCount;
      }
      expect(rows).toBe(128256);
    } finally {
      await src.close();
    }
  });
});

describe('models/tiny-llama-lora', () => {
  it('reads the PEFT adapter and writes back identical tensor bytes', async () => {
    const cfg = parseLlamaConfig(await readFile(join(MODEL, 'config.json')), 'config.json');
    const model = loraModelShape(cfg);
    const files = {
      'adapter_config.json': await readFile(join(ADAPTER, 'adapter_config.json'), 'utf8'),
      'adapter_model.safetensors': new Uint8Array(await readFile(join(ADAPTER, 'adapter_model.safetensors'))),
    };
    const adapter = readAdapter(files, model);
    expect(adapter.config.r).toBe(8);
    expect(adapter.config.lora_alpha).toBe(16);
    expect(adapter.warnings).toEqual([]);
    expect(adapter.tensors.size).toBe(2 * 7 * 2);
    expect(adapter.tensors.get('base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight')!.shape).toEqual([32, 8]);
    expect(adapter.tensors.get('base_model.model.model.layers.0.mlp.down_proj.lora_A.weight')!.shape).toEqual([8, 160]);
    const again = writeAdapter({ config: adapter.config, tensors: adapter.tensors, model });
    expect(Buffer.from(again['adapter_model.safetensors']).equals(Buffer.from(files['adapter_model.safetensors']))).toBe(true);
  });
});
