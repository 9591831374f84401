import { describe, expect, it } from 'vitest';
import { LLAMA_SIZE_LIMITS, MAX_LLAMA_PARAMETERS, checkLlamaTensors, llamaParameterCount, llamaTensorShapes, parseLlamaConfig, type LlamaSizeField } from '../../src/formats/llama-config';
import { formatErrorOf } from './helpers';

/** meta-llama/Llama-3.2-3B-Instruct config.json. */
const LLAMA_32_3B = `{
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": [128001, 128008, 128009],
  "head_dim": 128,
  "hidden_act": "silu",
  "hidden_size": 3072,
  "initializer_range": 0.02,
  "intermediate_size": 8192,
  "max_position_embeddings": 131072,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 24,
  "num_hidden_layers": 28,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3"
  },
  "rope_theta": 500000.0,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.45.0.dev0",
  "use_cache": true,
  "vocab_size": 128256
}`;

const base = (): Record<string, unknown> => JSON.parse(LLAMA_32_3B) as Record<string, unknown>;
const errorOf = (cfg: unknown) => formatErrorOf(() => parseLlamaConfig(cfg, 'config.json')).message;

describe('parseLlamaConfig', () => {
  it('reads every number of Llama-3.2-3B-Instruct', () => {
    expect(parseLlamaConfig(LLAMA_32_3B, 'config.json')).toEqual({
      architecture: 'LlamaForCausalLM',
      hiddenSize: 3072,
      intermediateSize: 8192,
      numLayers: 28,
      numHeads: 24,
      numKvHeads: 8,
      headDim: 128,
      vocabSize: 128256,
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
    });
  });

  it('applies transformers defaults for absent fields', () => {
    const c = base();
    for (const k of ['num_key_value_heads', 'head_dim', 'rope_scaling', 'rope_theta', 'rms_norm_eps', 'tie_word_embeddings', 'torch_dtype', 'hidden_act', 'attention_bias', 'mlp_bias']) delete c[k];
    c.eos_token_id = 2;
    const p = parseLlamaConfig(c, 'config.json');
    expect([p.numKvHeads, p.headDim, p.ropeScaling, p.ropeTheta, p.rmsNormEps, p.tieWordEmbeddings, p.torchDtype]).toEqual([24, 128, null, 10000, 1e-6, false, null]);
    expect(p.eosTokenIds).toEqual([2]);
    expect(parseLlamaConfig({ ...base(), rope_scaling: null }, 'config.json').ropeScaling).toBeNull();
    expect(parseLlamaConfig({ ...base(), rope_scaling: { rope_type: 'default' } }, 'config.json').ropeScaling).toBeNull();
  });

  it('reads transformers 5 rope_parameters and dtype', () => {
    const c = base();
    delete c.rope_scaling;
    delete c.rope_theta;
    delete c.torch_dtype;
    c.dtype = 'float16';
    c.rope_parameters = { rope_type: 'llama3', rope_theta: 500000.0, factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 };
    const p = parseLlamaConfig(c, 'config.json');
    expect(p.ropeTheta).toBe(500000);
    expect(p.ropeScaling).toEqual({ type: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 });
    expect(p.torchDtype).toBe('float16');
  });

  it('reads a sequence-classification head', () => {
    const c = { ...base(), architectures: ['LlamaForSequenceClassification'], id2label: { '0': 'LABEL_0' }, label2id: { LABEL_0: 0 }, pad_token_id: 128004 };
    const p = parseLlamaConfig(c, 'config.json');
    expect([p.architecture, p.numLabels, p.padTokenId]).toEqual(['LlamaForSequenceClassification', 1, 128004]);
    expect(parseLlamaConfig({ ...c, num_labels: 3 }, 'config.json').numLabels).toBe(3);
  });

  it('rejects other architectures', () => {
    const qwen2 = {
      architectures: ['Qwen2ForCausalLM'],
      model_type: 'qwen2',
      hidden_size: 896,
      intermediate_size: 4864,
      num_hidden_layers: 24,
      num_attention_heads: 14,
      num_key_value_heads: 2,
      vocab_size: 151936,
      rope_theta: 1000000.0,
      tie_word_embeddings: true,
    };
    expect(errorOf(qwen2)).toBe(
      'config.json, architectures: unsupported architecture Qwen2ForCausalLM: this lab runs Llama-architecture models (LlamaForCausalLM, LlamaForSequenceClassification). ' +
        'Pick a Llama-architecture checkpoint (Llama 3.x, SmolLM2, TinyLlama).',
    );
    const gpt2 = { architectures: ['GPT2LMHeadModel'], model_type: 'gpt2', n_embd: 768, n_layer: 12, n_head: 12, vocab_size: 50257 };
    expect(errorOf(gpt2)).toContain('unsupported architecture GPT2LMHeadModel: this lab runs Llama-architecture models (LlamaForCausalLM, LlamaForSequenceClassification)');
    expect(errorOf({ ...base(), architectures: ['MistralForCausalLM'], model_type: 'mistral' })).toContain('unsupported architecture MistralForCausalLM');
    expect(errorOf({ model_type: 'gpt2', n_embd: 768 })).toContain('unsupported architecture (model_type gpt2)');
    expect(errorOf({ ...base(), model_type: 'mistral' })).toContain('config.json, model_type: is "mistral" but LlamaForCausalLM needs "llama"');
    const noArch = base();
    delete noArch.architectures;
    expect(parseLlamaConfig(noArch, 'config.json').architecture).toBe('LlamaForCausalLM');
  });

  it('rejects unknown RoPE scaling', () => {
    expect(errorOf({ ...base(), rope_scaling: { type: 'yarn', factor: 4.0, original_max_position_embeddings: 32768 } })).toBe(
      'config.json, rope_scaling: uses RoPE scaling type "yarn", which this lab does not implement (it supports "llama3" scaling or none). ' +
        'Pick a checkpoint without RoPE scaling or with Llama 3 scaling.',
    );
    expect(errorOf({ ...base(), rope_scaling: { rope_type: 'dynamic', factor: 2 } })).toContain('RoPE scaling type "dynamic"');
    expect(errorOf({ ...base(), rope_scaling: { rope_type: 'llama3', factor: 32, low_freq_factor: 1, high_freq_factor: 4 } })).toContain(
      'config.json, rope_scaling.original_max_position_embeddings: is undefined, expected a positive number',
    );
    expect(errorOf({ ...base(), rope_scaling: { rope_type: 'llama3', factor: 32, low_freq_factor: 4, high_freq_factor: 4, original_max_position_embeddings: 8192 } })).toContain(
      'high_freq_factor 4 must be larger than low_freq_factor 4',
    );
  });

  it('rejects features and numbers the engine does not handle', () => {
    expect(errorOf({ ...base(), attention_bias: true })).toContain('config.json, attention_bias: is true; this lab runs Llama models without biases');
    expect(errorOf({ ...base(), mlp_bias: true })).toContain('config.json, mlp_bias: is true');
    expect(errorOf({ ...base(), hidden_act: 'gelu' })).toContain('config.json, hidden_act: is "gelu"; Llama-architecture models use "silu"');
    expect(errorOf({ ...base(), num_key_value_heads: 7 })).toContain('num_key_value_heads: is 7, which does not divide num_attention_heads 24');
    expect(errorOf({ ...base(), hidden_size: 3072.5 })).toContain('config.json, hidden_size: is 3072.5, expected a positive integer');
    const noVocab = base();
    delete noVocab.vocab_size;
    expect(errorOf(noVocab)).toContain('config.json, vocab_size: is missing');
    const noHeadDim = base();
    delete noHeadDim.head_dim;
    expect(errorOf({ ...noHeadDim, hidden_size: 3100 })).toContain('head_dim: is absent and hidden_size 3100 is not divisible by num_attention_heads 24');
    expect(errorOf({ ...noHeadDim, hidden_size: 3000 })).toContain('config.json, head_dim: is 125; rotary embeddings need an even head dimension');
    expect(errorOf({ ...base(), eos_token_id: [128001, 200000] })).toContain('config.json, eos_token_id: is 200000, expected a token id below vocab_size 128256');
    expect(errorOf({ ...base(), torch_dtype: 'int8' })).toContain('config.json, torch_dtype: is "int8"');
    expect(errorOf('{"architectures": [')).toContain('config.json: is not valid JSON');
  });
});

describe('llamaTensorShapes / checkLlamaTensors', () => {
  const cfg = parseLlamaConfig(LLAMA_32_3B, 'config.json');

  it('lists the tensors of a tied Llama-3.2-3B checkpoint', () => {
    const shapes = llamaTensorShapes(cfg);
    expect(shapes.size).toBe(1 + 28 * 9 + 1);
    expect(shapes.get('model.embed_tokens.weight')).toEqual([128256, 3072]);
    expect(shapes.get('model.layers.27.self_attn.q_proj.weight')).toEqual([3072, 3072]);
    expect(shapes.get('model.layers.0.self_attn.k_proj.weight')).toEqual([1024, 3072]);
    expect(shapes.get('model.layers.0.self_attn.v_proj.weight')).toEqual([1024, 3072]);
    expect(shapes.get('model.layers.0.self_attn.o_proj.weight')).toEqual([3072, 3072]);
    expect(shapes.get('model.layers.0.mlp.gate_proj.weight')).toEqual([8192, 3072]);
    expect(shapes.get('model.layers.0.mlp.up_proj.weight')).toEqual([8192, 3072]);
    expect(shapes.get('model.layers.0.mlp.down_proj.weight')).toEqual([3072, 8192]);
    expect(shapes.get('model.layers.5.input_layernorm.weight')).toEqual([3072]);
    expect(shapes.get('model.layers.5.post_attention_layernorm.weight')).toEqual([3072]);
    expect(shapes.get('model.norm.weight')).toEqual([3072]);
    expect(shapes.has('lm_head.weight')).toBe(false);
    expect(shapes.has('model.layers.28.input_layernorm.weight')).toBe(false);
  });

  it('adds lm_head when untied and score for classification', () => {
    const untied = parseLlamaConfig({ ...base(), tie_word_embeddings: false }, 'config.json');
    expect(llamaTensorShapes(untied).get('lm_head.weight')).toEqual([128256, 3072]);
    const rm = parseLlamaConfig({ ...base(), architectures: ['LlamaForSequenceClassification'], num_labels: 1 }, 'config.json');
    const shapes = llamaTensorShapes(rm);
    expect(shapes.get('score.weight')).toEqual([1, 3072]);
    expect(shapes.has('lm_head.weight')).toBe(false);
  });

  it('finds missing tensors, wrong shapes and extras', () => {
    const have = new Map(llamaTensorShapes(cfg));
    have.set('model.layers.3.self_attn.rotary_emb.inv_freq', [64]);
    have.set('lm_head.weight', [128256, 3072]);
    have.set('model.vision_tower.weight', [4]);
    expect(checkLlamaTensors(cfg, have, 'model.safetensors')).toEqual(['model.vision_tower.weight']);

    const wrong = new Map(have);
    wrong.set('model.layers.4.self_attn.k_proj.weight', [3072, 3072]);
    expect(formatErrorOf(() => checkLlamaTensors(cfg, wrong, 'model.safetensors')).message).toBe(
      'model.safetensors, tensor "model.layers.4.self_attn.k_proj.weight": has shape [3072,3072] but config.json implies [1024,3072]. ' +
        'Check that config.json and the weights come from the same model.',
    );
    const missing = new Map(have);
    missing.delete('model.layers.20.mlp.down_proj.weight');
    expect(formatErrorOf(() => checkLlamaTensors(cfg, missing, 'model.safetensors')).message).toContain(
      'model.safetensors, tensor "model.layers.20.mlp.down_proj.weight": is missing from the checkpoint',
    );
  });
});

describe('absurd sizes in config.json', () => {
  /** Runs f, which must throw, and returns its message with the time it took. */
  const timed = (f: () => unknown): { message: string; ms: number } => {
    const t0 = performance.now();
    const message = formatErrorOf(f).message;
    return { message, ms: performance.now() - t0 };
  };
  const rm = (): Record<string, unknown> => ({ ...base(), architectures: ['LlamaForSequenceClassification'], num_labels: 1 });

  it('refuses num_hidden_layers = 1e9 at once, naming the field, before any walk over the layers', () => {
    const { message, ms } = timed(() => parseLlamaConfig({ ...base(), num_hidden_layers: 1e9 }, 'config.json'));
    expect(message).toBe(
      'config.json, num_hidden_layers: is 1000000000, far beyond any real model (Llama 3.1 405B has 126); the lab accepts at most 1024. ' +
        "The file is damaged or was edited by hand: use the original config.json from the model's repository.",
    );
    expect(ms).toBeLessThan(1000);
  });

  it('refuses every other size far beyond any real model, naming it', () => {
    for (const field of Object.keys(LLAMA_SIZE_LIMITS) as LlamaSizeField[]) {
      const cfg = field === 'num_labels' ? rm() : base();
      const { message, ms } = timed(() => parseLlamaConfig({ ...cfg, [field]: 1e9 }, 'config.json'));
      expect(message, field).toContain(`config.json, ${field}: is 1000000000, far beyond any real model`);
      expect(ms, field).toBeLessThan(1000);
      // One past the cap is refused; the cap itself is not refused for being too large.
      const max = LLAMA_SIZE_LIMITS[field].max;
      expect(timed(() => parseLlamaConfig({ ...cfg, [field]: max + 1 }, 'config.json')).message, field).toContain(`${field}: is ${max + 1}, far beyond`);
      let atCap = '';
      try {
        parseLlamaConfig({ ...cfg, [field]: max }, 'config.json');
      } catch (e) {
        atCap = (e as Error).message;
      }
      expect(atCap, field).not.toContain('far beyond');
    }
  });

  it('refuses a model too large for any device, naming the fields, and accepts the largest real one', () => {
    const huge = { ...base(), num_hidden_layers: 1024, hidden_size: 65536, intermediate_size: 262144, num_attention_heads: 512, num_key_value_heads: 8 };
    const { message, ms } = timed(() => parseLlamaConfig(huge, 'config.json'));
    expect(message).toMatch(
      /^config\.json, num_hidden_layers, hidden_size, intermediate_size, num_attention_heads, head_dim, vocab_size: num_hidden_layers 1024, hidden_size 65536, intermediate_size 262144, num_attention_heads 512 x head_dim 128 and vocab_size 128256 make 6\.17e\+13 parameters \(30\.9 TB even in 4 bits\), more than any device holds; the lab accepts at most 1e12 parameters\. /,
    );
    expect(ms).toBeLessThan(1000);
    // Llama 3.1 405B's config.json (meta-llama/Llama-3.1-405B-Instruct) loads.
    const llama405b = parseLlamaConfig(
      { ...base(), num_hidden_layers: 126, hidden_size: 16384, intermediate_size: 53248, num_attention_heads: 128, num_key_value_heads: 8, tie_word_embeddings: false },
      'config.json',
    );
    expect(llamaParameterCount(llama405b)).toBeLessThan(MAX_LLAMA_PARAMETERS);
    expect(llamaParameterCount(llama405b) / 1e9).toBeCloseTo(405.85, 1);
  });

  it('counts parameters in closed form, as the tensor list sums them', () => {
    const sum = (c: Parameters<typeof llamaTensorShapes>[0]) => [...llamaTensorShapes(c).values()].reduce((n, s) => n + s.reduce((a, b) => a * b, 1), 0);
    const configs = [base(), { ...base(), tie_word_embeddings: false }, { ...rm(), num_labels: 3 }, { ...base(), num_hidden_layers: 3, hidden_size: 64, head_dim: 16, num_attention_heads: 4, num_key_value_heads: 2, intermediate_size: 96 }];
    for (const c of configs) {
      const cfg = parseLlamaConfig(c, 'config.json');
      expect(llamaParameterCount(cfg)).toBe(sum(cfg));
    }
    // Llama-3.2-3B as its model card states it: 3.21B.
    expect(llamaParameterCount(parseLlamaConfig(LLAMA_32_3B, 'config.json'))).toBe(3212749824);
  });

  it('llamaTensorShapes refuses a hand-built config with a billion layers at once', () => {
    const cfg = parseLlamaConfig(LLAMA_32_3B, 'config.json');
    const { message, ms } = timed(() => llamaTensorShapes({ ...cfg, numLayers: 1e9 }));
    expect(message).toContain('config.json, num_hidden_layers: is 1000000000, far beyond any real model');
    expect(ms).toBeLessThan(1000);
    expect(timed(() => llamaTensorShapes({ ...cfg, vocabSize: 2 ** 40 })).message).toContain('config.json, vocab_size: is 1099511627776');
    expect(timed(() => llamaTensorShapes({ ...cfg, numLayers: 0.5 })).message).toContain('config.json, num_hidden_layers: is 0.5, expected a positive integer');
  });
});
