import { describe, expect, it } from 'vitest';
import {
  LLAMA_PROJECTIONS,
  loraKey,
  loraScale,
  loraShape,
  makeAdapterConfig,
  parseLoraKey,
  readAdapter,
  validateAdapterConfig,
  writeAdapter,
  type LlamaProjection,
  type LoraModelShape,
  type LoraTensor,
} from '../../src/formats/peft';
import { f32ToBf16, parseSafetensors, writeSafetensors, type TensorToWrite } from '../../src/formats/safetensors';
import { formatErrorOf } from './helpers';

const LLAMA_3B: LoraModelShape = { layers: 28, hidden: 3072, intermediate: 8192, heads: 24, kvHeads: 8, headDim: 128 };
const SMALL: LoraModelShape = { layers: 2, hidden: 8, intermediate: 12, heads: 2, kvHeads: 1, headDim: 4 };

describe('PEFT key names and shapes', () => {
  it('names every Llama projection as PEFT does', () => {
    expect(LLAMA_PROJECTIONS.map((m) => loraKey(3, m, 'A'))).toEqual([
      'base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight',
      'base_model.model.model.layers.3.self_attn.k_proj.lora_A.weight',
      'base_model.model.model.layers.3.self_attn.v_proj.lora_A.weight',
      'base_model.model.model.layers.3.self_attn.o_proj.lora_A.weight',
      'base_model.model.model.layers.3.mlp.gate_proj.lora_A.weight',
      'base_model.model.model.layers.3.mlp.up_proj.lora_A.weight',
      'base_model.model.model.layers.3.mlp.down_proj.lora_A.weight',
    ]);
    expect(loraKey(27, 'down_proj', 'B')).toBe('base_model.model.model.layers.27.mlp.down_proj.lora_B.weight');
  });

  it('parses keys back and rejects anything else', () => {
    expect(parseLoraKey('base_model.model.model.layers.12.mlp.up_proj.lora_B.weight')).toEqual({ layer: 12, module: 'up_proj', which: 'B' });
    for (const bad of [
      'base_model.model.model.layers.0.mlp.q_proj.lora_A.weight',
      'base_model.model.model.layers.0.self_attn.gate_proj.lora_A.weight',
      'base_model.model.model.layers.01.self_attn.q_proj.lora_A.weight',
      'base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight',
      'base_model.model.lm_head.lora_A.weight',
      'base_model.model.model.embed_tokens.lora_embedding_A',
      'model.layers.0.self_attn.q_proj.lora_A.weight',
    ]) {
      expect(parseLoraKey(bad)).toBeNull();
    }
  });

  it('gives lora_A [r, in] and lora_B [out, r] for Llama-3.2-3B', () => {
    const r = 16;
    const shapes = Object.fromEntries(LLAMA_PROJECTIONS.map((m) => [m, [loraShape(LLAMA_3B, m, 'A', r), loraShape(LLAMA_3B, m, 'B', r)]]));
    expect(shapes).toEqual({
      q_proj: [[16, 3072], [3072, 16]],
      k_proj: [[16, 3072], [1024, 16]],
      v_proj: [[16, 3072], [1024, 16]],
      o_proj: [[16, 3072], [3072, 16]],
      gate_proj: [[16, 3072], [8192, 16]],
      up_proj: [[16, 3072], [8192, 16]],
      down_proj: [[16, 8192], [3072, 16]],
    });
  });

  it('scales by alpha / r, or alpha / sqrt(r) with rsLoRA', () => {
    expect(loraScale({ r: 16, lora_alpha: 32, use_rslora: false })).toBe(2);
    expect(loraScale({ r: 16, lora_alpha: 32, use_rslora: true })).toBe(8);
    expect(loraScale({ r: 8, lora_alpha: 16, use_rslora: true })).toBe(16 / Math.sqrt(8));
  });
});

describe('adapter_config.json', () => {
  it('fills PEFT defaults', () => {
    const c = makeAdapterConfig({ baseModel: 'meta-llama/Llama-3.2-3B-Instruct', r: 16, alpha: 32, targetModules: ['v_proj', 'q_proj'], useRslora: false });
    expect(c).toEqual({
      peft_type: 'LORA',
      task_type: 'CAUSAL_LM',
      base_model_name_or_path: 'meta-llama/Llama-3.2-3B-Instruct',
      r: 16,
      lora_alpha: 32,
      lora_dropout: 0,
      target_modules: ['q_proj', 'v_proj'],
      bias: 'none',
      fan_in_fan_out: false,
      use_rslora: false,
      use_dora: false,
      modules_to_save: null,
      init_lora_weights: true,
      inference_mode: true,
    });
    expect(() => makeAdapterConfig({ baseModel: 'x', r: 0, alpha: 1, targetModules: ['q_proj'] })).toThrow('adapter_config.json, r: is 0, expected a positive integer');
  });

  it('accepts a config as PEFT writes it, with its extra fields', () => {
    const peftJson = {
      alpha_pattern: {},
      auto_mapping: null,
      base_model_name_or_path: 'meta-llama/Llama-3.2-1B-Instruct',
      bias: 'none',
      corda_config: null,
      eva_config: null,
      exclude_modules: null,
      fan_in_fan_out: false,
      inference_mode: true,
      init_lora_weights: true,
      layer_replication: null,
      layers_pattern: null,
      layers_to_transform: null,
      loftq_config: {},
      lora_alpha: 16,
      lora_bias: false,
      lora_dropout: 0.05,
      megatron_config: null,
      megatron_core: 'megatron.core',
      modules_to_save: null,
      peft_type: 'LORA',
      r: 8,
      rank_pattern: {},
      revision: null,
      target_modules: ['down_proj', 'o_proj', 'k_proj', 'q_proj', 'gate_proj', 'up_proj', 'v_proj'],
      task_type: 'CAUSAL_LM',
      trainable_token_indices: null,
      use_dora: false,
      use_rslora: false,
    };
    const { config, warnings } = validateAdapterConfig(JSON.stringify(peftJson), 'adapter_config.json');
    expect(config.target_modules).toEqual([...LLAMA_PROJECTIONS]);
    expect(config.r).toBe(8);
    expect(config.lora_dropout).toBe(0.05);
    expect(warnings).toEqual([]);
    expect(validateAdapterConfig({ ...peftJson, target_modules: 'all-linear' }, 'a.json').config.target_modules).toEqual([...LLAMA_PROJECTIONS]);
  });

  it('rejects what this lab cannot apply, naming the field', () => {
    const ok = makeAdapterConfig({ baseModel: 'm', r: 8, alpha: 16, targetModules: ['q_proj'] });
    const bad = (patch: Record<string, unknown>) => formatErrorOf(() => validateAdapterConfig({ ...ok, ...patch }, 'cfg.json')).message;
    expect(bad({ peft_type: 'IA3' })).toBe('cfg.json, peft_type: is "IA3", expected "LORA". Save the adapter with PEFT (LoraConfig) or export it from this lab.');
    expect(bad({ r: 4.5 })).toContain('cfg.json, r: is 4.5, expected a positive integer');
    expect(bad({ r: -8 })).toContain('cfg.json, r: is -8');
    expect(bad({ target_modules: ['q_proj', 'lm_head'] })).toContain(
      'cfg.json, target_modules: includes "lm_head"; this lab adapts only the Llama projections q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj',
    );
    expect(bad({ target_modules: '.*proj' })).toContain('target_modules: is the pattern ".*proj"');
    expect(bad({ target_modules: [] })).toContain('target_modules: is empty');
    expect(bad({ use_dora: true })).toContain('cfg.json, use_dora: is true; DoRA adapters are not supported');
    expect(bad({ fan_in_fan_out: true })).toContain('cfg.json, fan_in_fan_out: is true');
    expect(bad({ bias: 'all' })).toContain('cfg.json, bias: is "all"');
    expect(bad({ modules_to_save: ['lm_head'] })).toContain('cfg.json, modules_to_save: is ["lm_head"]; this lab supports only null');
    expect(bad({ rank_pattern: { q_proj: 4 } })).toContain('cfg.json, rank_pattern');
    expect(bad({ layers_to_transform: [0, 1] })).toContain('cfg.json, layers_to_transform');
    expect(bad({ init_lora_weights: 'pissa' })).toContain('cfg.json, init_lora_weights: is "pissa"');
    expect(bad({ task_type: 'SEQ_2_SEQ_LM' })).toContain('cfg.json, task_type: is "SEQ_2_SEQ_LM"');
    expect(bad({ lora_dropout: 1 })).toContain('cfg.json, lora_dropout: is 1');
    expect(formatErrorOf(() => validateAdapterConfig('{"r": 8,', 'cfg.json')).message).toContain('cfg.json: is not valid JSON');
  });

  it('returns vLLM and llama.cpp interop warnings without throwing', () => {
    const warn = (r: number, useRslora = false) => validateAdapterConfig(makeAdapterConfig({ baseModel: 'm', r, alpha: 16, targetModules: ['q_proj'], useRslora }), 'a.json').warnings;
    expect(warn(16)).toEqual([]);
    expect(warn(12)).toEqual(['vLLM: rank r=12 is not one vLLM supports (1, 8, 16, 32, 64, 128, 256); it will refuse to load this adapter.']);
    expect(warn(64)).toEqual(['vLLM: rank r=64 is above the default max_lora_rank 16; start vLLM with --max-lora-rank 64.']);
    expect(warn(24)).toEqual([
      'vLLM: rank r=24 is not one vLLM supports (1, 8, 16, 32, 64, 128, 256); it will refuse to load this adapter.',
      'vLLM: rank r=24 is above the default max_lora_rank 16; start vLLM with --max-lora-rank 32.',
    ]);
    expect(warn(16, true)).toEqual([
      'llama.cpp: its converter ignores use_rslora and scales by alpha/r = 1 instead of alpha/sqrt(r) = 4; set lora_alpha to 4 with use_rslora false for the same result there.',
    ]);
  });
});

function makeTensors(model: LoraModelShape, r: number, modules: readonly LlamaProjection[]): Map<string, LoraTensor> {
  const m = new Map<string, LoraTensor>();
  let seed = 1;
  for (let l = 0; l < model.layers; l++) {
    for (const mod of modules) {
      for (const which of ['A', 'B'] as const) {
        const shape = loraShape(model, mod, which, r);
        const data = new Float32Array(shape[0] * shape[1]).map(() => ((seed = (seed * 48271) % 2147483647) / 2147483647) * 2 - 1);
        m.set(loraKey(l, mod, which), { shape, data });
      }
    }
  }
  return m;
}

describe('writeAdapter / readAdapter', () => {
  const modules: LlamaProjection[] = ['q_proj', 'v_proj', 'down_proj'];
  const config = makeAdapterConfig({ baseModel: 'tiny', r: 4, alpha: 8, targetModules: modules });
  const tensors = makeTensors(SMALL, 4, modules);

  it('round-trips F32 tensors with PEFT metadata', () => {
    const files = writeAdapter({ config, tensors, model: SMALL });
    expect(JSON.parse(files['adapter_config.json'])).toEqual(config);
    const st = parseSafetensors(files['adapter_model.safetensors'], 'adapter_model.safetensors');
    expect(st.header.metadata).toEqual({ format: 'pt' });
    expect(st.header.tensors.size).toBe(2 * 3 * 2);
    expect([...st.header.tensors.values()].every((t) => t.dtype === 'F32')).toBe(true);
    expect(st.header.tensors.get('base_model.model.model.layers.1.mlp.down_proj.lora_A.weight')!.shape).toEqual([4, 12]);
    expect(st.header.tensors.get('base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight')!.shape).toEqual([4, 4]);

    const back = readAdapter(files, SMALL);
    expect(back.config).toEqual(config);
    expect(back.warnings).toEqual(['vLLM: rank r=4 is not one vLLM supports (1, 8, 16, 32, 64, 128, 256); it will refuse to load this adapter.']);
    expect([...back.tensors.keys()].sort()).toEqual([...tensors.keys()].sort());
    for (const [k, t] of tensors) {
      expect(back.tensors.get(k)!.shape).toEqual(t.shape);
      expect(Array.from(back.tensors.get(k)!.data)).toEqual(Array.from(t.data));
    }
  });

  it('refuses to write wrong shapes or unknown keys', () => {
    const wrong = new Map(tensors);
    wrong.set(loraKey(0, 'q_proj', 'B'), { shape: [8, 3], data: new Float32Array(24) });
    expect(formatErrorOf(() => writeAdapter({ config, tensors: wrong, model: SMALL })).message).toContain(
      'adapter_model.safetensors, base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight: has shape [8,3], expected [8,4]',
    );
    const extra = new Map(tensors);
    extra.set(loraKey(0, 'k_proj', 'A'), { shape: [4, 8], data: new Float32Array(32) });
    expect(formatErrorOf(() => writeAdapter({ config, tensors: extra })).message).toContain(
      'base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight: adapts k_proj, which target_modules (q_proj, v_proj, down_proj) does not list',
    );
    const missing = new Map(tensors);
    missing.delete(loraKey(1, 'v_proj', 'A'));
    expect(formatErrorOf(() => writeAdapter({ config, tensors: missing, model: SMALL })).message).toContain(
      'base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight: is missing',
    );
  });

  it('refuses to write an adapter holding NaN or infinity, naming the tensor', () => {
    for (const bad of [NaN, Infinity, -Infinity]) {
      const diverged = new Map(tensors);
      const key = loraKey(1, 'down_proj', 'B');
      const data = new Float32Array(tensors.get(key)!.data);
      data[5] = bad;
      diverged.set(key, { shape: tensors.get(key)!.shape, data });
      const message = formatErrorOf(() => writeAdapter({ config, tensors: diverged, model: SMALL })).message;
      expect(message).toContain(`adapter_model.safetensors, ${key}: holds 1 non-finite value (NaN or infinity) of ${data.length}`);
      expect(message).toContain('Export an earlier checkpoint');
    }
  });

  const rewrite = (edit: (list: TensorToWrite[]) => void) => {
    const list: TensorToWrite[] = [...tensors].map(([name, t]) => ({ name, dtype: 'F32', shape: t.shape, data: t.data }));
    edit(list);
    return { 'adapter_config.json': JSON.stringify(config), 'adapter_model.safetensors': writeSafetensors(list, { format: 'pt' }) };
  };

  it('rejects keys and shapes that do not fit the model, naming the key', () => {
    const shape = rewrite((l) => {
      const i = l.findIndex((t) => t.name === loraKey(1, 'down_proj', 'A'));
      l[i] = { ...l[i]!, shape: [4, 8], data: new Float32Array(32) };
    });
    expect(formatErrorOf(() => readAdapter(shape, SMALL)).message).toBe(
      'adapter_model.safetensors, base_model.model.model.layers.1.mlp.down_proj.lora_A.weight: has shape [4,8], expected [4,12] (r=4). ' +
        'Check that the adapter was trained for this base model and that adapter_config.json belongs to it.',
    );
    const lmHead = rewrite((l) => l.push({ name: 'base_model.model.lm_head.lora_A.weight', dtype: 'F32', shape: [4, 8], data: new Float32Array(32) }));
    expect(formatErrorOf(() => readAdapter(lmHead, SMALL)).message).toContain(
      'adapter_model.safetensors, base_model.model.lm_head.lora_A.weight: is not a LoRA weight of a Llama projection',
    );
    const deep = rewrite((l) => l.push({ name: loraKey(2, 'q_proj', 'A'), dtype: 'F32', shape: [4, 8], data: new Float32Array(32) }));
    expect(formatErrorOf(() => readAdapter(deep, SMALL)).message).toContain('layers.2.self_attn.q_proj.lora_A.weight: is for layer 2 but the model has 2 layers');
    const missing = rewrite((l) => l.splice(l.findIndex((t) => t.name === loraKey(0, 'v_proj', 'B')), 1));
    expect(formatErrorOf(() => readAdapter(missing, SMALL)).message).toContain('base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight: is missing');
    const ints = rewrite((l) => {
      const i = l.findIndex((t) => t.name === loraKey(0, 'q_proj', 'A'));
      l[i] = { ...l[i]!, dtype: 'I32', data: new Int32Array(32) };
    });
    expect(formatErrorOf(() => readAdapter(ints, SMALL)).message).toContain('q_proj.lora_A.weight: has dtype I32, expected F32, F16 or BF16');
  });

  it('widens a BF16 adapter to F32', () => {
    const bf = rewrite((l) => {
      for (let i = 0; i < l.length; i++) l[i] = { ...l[i]!, dtype: 'BF16', data: f32ToBf16(l[i]!.data as Float32Array) };
    });
    const back = readAdapter(bf, SMALL);
    const key = loraKey(1, 'q_proj', 'A');
    const src = tensors.get(key)!.data;
    const got = back.tensors.get(key)!.data;
    for (let i = 0; i < src.length; i++) expect(Math.abs(got[i]! - src[i]!)).toBeLessThanOrEqual(Math.abs(src[i]!) * 2 ** -8);
    expect(got[0]).not.toBe(src[0]);
  });
});
