/**
 * The model picker's numbers (src/worker/catalog.ts): the GPU memory shown for each
 * known model is the engine's own memory plan of its 4-bit weights for that model's
 * config.json (formats.md and the models' configs), within rounding.
 */
import { describe, expect, it } from 'vitest';
import { parseLlamaConfig } from '../../src/formats/llama-config';
import { planMemory } from '../../src/model/memory';
import { isSmallGpu, KNOWN_MODELS, knownModel, QUICK_DEMO } from '../../src/worker/catalog';
import { parseExam } from '../../src/selfplay/exam';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

const llama = (o: { hidden: number; inter: number; layers: number; heads: number; kv: number; headDim: number; vocab: number; tied: boolean }) =>
  parseLlamaConfig(
    {
      architectures: ['LlamaForCausalLM'],
      model_type: 'llama',
      hidden_size: o.hidden,
      intermediate_size: o.inter,
      num_hidden_layers: o.layers,
      num_attention_heads: o.heads,
      num_key_value_heads: o.kv,
      head_dim: o.headDim,
      vocab_size: o.vocab,
      max_position_embeddings: 8192,
      rope_theta: 500000,
      rms_norm_eps: 1e-5,
      tie_word_embeddings: o.tied,
      bos_token_id: 1,
      eos_token_id: 2,
      torch_dtype: 'bfloat16',
    },
    'config.json',
  );

/** config.json values of the known models (hidden, MLP, layers, heads, KV heads, head dim, vocabulary, tied). */
const CONFIGS: Record<string, ReturnType<typeof llama>> = {
  'Llama-3.2-3B': llama({ hidden: 3072, inter: 8192, layers: 28, heads: 24, kv: 8, headDim: 128, vocab: 128256, tied: true }),
  'Llama-3.2-1B': llama({ hidden: 2048, inter: 8192, layers: 16, heads: 32, kv: 8, headDim: 64, vocab: 128256, tied: true }),
  'SmolLM2-360M': llama({ hidden: 960, inter: 2560, layers: 32, heads: 15, kv: 5, headDim: 64, vocab: 49152, tied: true }),
  'SmolLM2-135M': llama({ hidden: 576, inter: 1536, layers: 30, heads: 9, kv: 3, headDim: 64, vocab: 49152, tied: true }),
  'TinyLlama-1.1B': llama({ hidden: 2048, inter: 5632, layers: 22, heads: 32, kv: 4, headDim: 64, vocab: 32000, tied: false }),
};
const LIMITS = { maxBufferSize: 2 ** 31, maxStorageBufferBindingSize: 2 ** 31 };
const RUN = { format: 'q4' as const, loraRank: 0, loraTargets: [], groupSize: 1, maxPromptTokens: 1, maxNewTokens: 1, checkpointing: true as const };

describe('the model picker', () => {
  it('offers the 4-bit ONNX Llama-3.2-3B first, with bf16 safetensors as an option', () => {
    const first = KNOWN_MODELS[0]!;
    expect(first.id).toBe('onnx-community/Llama-3.2-3B-Instruct-ONNX');
    expect(first.weights).toMatch(/ONNX q4f16/);
    expect(first.downloadBytes).toBeLessThan(2.6e9);
    expect(KNOWN_MODELS.some((m) => m.id === 'unsloth/Llama-3.2-3B-Instruct' && /bf16/.test(m.weights))).toBe(true);
    expect(knownModel('unsloth/Llama-3.2-3B-Instruct')!.downloadBytes).toBeGreaterThan(6e9);
  });

  it('shows the GPU memory of each choice as the engine plans its 4-bit weights', () => {
    for (const m of KNOWN_MODELS) {
      const config = CONFIGS[m.family];
      expect(config, m.id).toBeDefined();
      // An export with its own 4-bit LM head keeps it beside the embedding, as an untied model does.
      const planned = planMemory(m.separateLmHead ? { ...config!, tieWordEmbeddings: false } : config!, RUN, LIMITS).weights;
      console.log(`${m.id}: planned ${planned} bytes, shown ${m.gpuBytes}`);
      expect(Math.abs(m.gpuBytes - planned) / planned, m.id).toBeLessThan(0.05);
    }
  });
});

describe('the quick demo', () => {
  it('is offered first on a software adapter, without shader-f16 or with buffers under 1 GiB, and after the picker on a capable GPU', () => {
    const gpu = { adapterName: 'nvidia / ada / RTX 4090', f16: true, maxBufferSize: 4 * 2 ** 30 };
    expect(isSmallGpu(gpu)).toBe(false);
    expect(isSmallGpu({ ...gpu, adapterName: 'google / swiftshader / SwiftShader Device (Subzero)' })).toBe(true);
    expect(isSmallGpu({ ...gpu, adapterName: 'mesa / llvmpipe (LLVM 19, 256 bits)' })).toBe(true);
    expect(isSmallGpu({ ...gpu, f16: false })).toBe(true);
    expect(isSmallGpu({ ...gpu, maxBufferSize: 2 ** 30 - 1 })).toBe(true);
  });

  it('loads the committed micro model, which ships the exam the demo charts', () => {
    const dir = join('models', QUICK_DEMO.model.folder);
    expect(existsSync(join(dir, 'config.json'))).toBe(true);
    const exam = parseExam(JSON.parse(readFileSync(join(dir, QUICK_DEMO.examFile), 'utf8')));
    expect(exam.problems.length).toBeGreaterThanOrEqual(200);
    expect(QUICK_DEMO.config.examEvery).toBeGreaterThan(0);
  });
});
