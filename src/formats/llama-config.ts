/**
 * A Hugging Face Llama config.json, checked and turned into the numbers the engine
 * needs, plus the tensor names and shapes such a checkpoint must contain. Every
 * architectural number comes from the file; the only defaults are the ones
 * transformers itself applies when a field is absent.
 */
import { FormatError, isPlainObject, parseJsonInput, show } from './errors';

export type LlamaArchitecture = 'LlamaForCausalLM' | 'LlamaForSequenceClassification';
const ARCHITECTURES: readonly LlamaArchitecture[] = ['LlamaForCausalLM', 'LlamaForSequenceClassification'];

export interface Llama3RopeScaling {
  type: 'llama3';
  factor: number;
  lowFreqFactor: number;
  highFreqFactor: number;
  originalMaxPositionEmbeddings: number;
}

export interface LlamaConfig {
  architecture: LlamaArchitecture;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  vocabSize: number;
  maxPositionEmbeddings: number | null;
  ropeTheta: number;
  ropeScaling: Llama3RopeScaling | null;
  rmsNormEps: number;
  tieWordEmbeddings: boolean;
  /** LlamaForSequenceClassification only: rows of score.weight. */
  numLabels: number | null;
  bosTokenId: number | null;
  /** eos_token_id as a list (a single id becomes a one-element list). */
  eosTokenIds: number[];
  padTokenId: number | null;
  /** torch_dtype (or dtype in newer files): 'bfloat16' | 'float16' | 'float32', or null. */
  torchDtype: string | null;
}

const HINT_CONFIG = "Use the model's original config.json from its Hugging Face repository.";

/** Parses config.json (parsed JSON, text or bytes) of a Llama-architecture checkpoint. */
export function parseLlamaConfig(json: unknown, fileName: string): LlamaConfig {
  const c = parseJsonInput(json, fileName);
  if (!isPlainObject(c)) throw new FormatError(fileName, null, 'is not a JSON object', HINT_CONFIG);
  const fail = (field: string, problem: string, hint = HINT_CONFIG): never => {
    throw new FormatError(fileName, field, problem, hint);
  };

  const architecture = readArchitecture(c, fileName);
  if (c.model_type !== undefined && c.model_type !== 'llama') {
    fail('model_type', `is ${show(c.model_type)} but ${architecture} needs "llama"`);
  }

  const posInt = (field: string, fallback?: number): number => {
    const v = c[field] ?? fallback;
    if (v === undefined) return fail(field, 'is missing');
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v <= 0) return fail(field, `is ${show(v)}, expected a positive integer`);
    return v;
  };
  const posNum = (field: string, v: unknown): number => {
    if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0) return fail(field, `is ${show(v)}, expected a positive number`);
    return v;
  };
  const bool = (field: string, fallback: boolean): boolean => {
    const v = c[field] ?? fallback;
    if (typeof v !== 'boolean') return fail(field, `is ${show(v)}, expected true or false`);
    return v;
  };

  const hiddenSize = posInt('hidden_size');
  const intermediateSize = posInt('intermediate_size');
  const numLayers = posInt('num_hidden_layers');
  const numHeads = posInt('num_attention_heads');
  const numKvHeads = posInt('num_key_value_heads', numHeads);
  const vocabSize = posInt('vocab_size');
  if (c.head_dim === undefined || c.head_dim === null) {
    if (hiddenSize % numHeads !== 0) {
      fail('head_dim', `is absent and hidden_size ${hiddenSize} is not divisible by num_attention_heads ${numHeads}`);
    }
  }
  const headDim = posInt('head_dim', hiddenSize / numHeads);
  if (headDim % 2 !== 0) fail('head_dim', `is ${headDim}; rotary embeddings need an even head dimension`);
  if (numHeads % numKvHeads !== 0) {
    fail('num_key_value_heads', `is ${numKvHeads}, which does not divide num_attention_heads ${numHeads}`);
  }
  const maxPositionEmbeddings = c.max_position_embeddings === undefined ? null : posInt('max_position_embeddings');

  if ((c.hidden_act ?? 'silu') !== 'silu') {
    fail('hidden_act', `is ${show(c.hidden_act)}; Llama-architecture models use "silu"`);
  }
  for (const field of ['attention_bias', 'mlp_bias']) {
    if (bool(field, false)) fail(field, 'is true; this lab runs Llama models without biases');
  }

  // transformers 5 moves RoPE settings into rope_parameters; older files use the top level.
  const ropeParams = c.rope_parameters;
  if (ropeParams !== undefined && ropeParams !== null && !isPlainObject(ropeParams)) {
    fail('rope_parameters', `is ${show(ropeParams)}, expected an object`);
  }
  const ropeThetaRaw = (isPlainObject(ropeParams) ? ropeParams.rope_theta : undefined) ?? c.rope_theta ?? 10000;
  const ropeTheta = posNum('rope_theta', ropeThetaRaw);
  const ropeScaling = readRopeScaling(
    isPlainObject(ropeParams) ? ropeParams : c.rope_scaling,
    isPlainObject(ropeParams) ? 'rope_parameters' : 'rope_scaling',
    fileName,
  );

  const rmsNormEps = posNum('rms_norm_eps', c.rms_norm_eps ?? 1e-6);
  const tieWordEmbeddings = bool('tie_word_embeddings', false);

  let numLabels: number | null = null;
  if (architecture === 'LlamaForSequenceClassification') {
    if (c.num_labels !== undefined) numLabels = posInt('num_labels');
    else if (isPlainObject(c.id2label)) numLabels = Object.keys(c.id2label).length;
    else numLabels = 2; // transformers' default when neither is saved
    if (numLabels === 0) fail('id2label', 'is empty; a classification head needs at least one label');
  }

  const tokenId = (field: string, v: unknown): number => {
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0 || v >= vocabSize) {
      return fail(field, `is ${show(v)}, expected a token id below vocab_size ${vocabSize}`);
    }
    return v;
  };
  const optionalId = (field: string): number | null => (c[field] === undefined || c[field] === null ? null : tokenId(field, c[field]));
  const bosTokenId = optionalId('bos_token_id');
  const padTokenId = optionalId('pad_token_id');
  const eos = c.eos_token_id;
  const eosTokenIds = eos === undefined || eos === null ? [] : Array.isArray(eos) ? eos.map((v) => tokenId('eos_token_id', v)) : [tokenId('eos_token_id', eos)];

  const dtypeRaw = c.torch_dtype ?? c.dtype ?? null;
  if (dtypeRaw !== null && !['bfloat16', 'float16', 'float32'].includes(dtypeRaw as string)) {
    fail(c.torch_dtype !== undefined ? 'torch_dtype' : 'dtype', `is ${show(dtypeRaw)}, expected "bfloat16", "float16" or "float32"`);
  }

  return {
    architecture,
    hiddenSize,
    intermediateSize,
    numLayers,
    numHeads,
    numKvHeads,
    headDim,
    vocabSize,
    maxPositionEmbeddings,
    ropeTheta,
    ropeScaling,
    rmsNormEps,
    tieWordEmbeddings,
    numLabels,
    bosTokenId,
    eosTokenIds,
    padTokenId,
    torchDtype: dtypeRaw as string | null,
  };
}

function readArchitecture(c: Record<string, unknown>, fileName: string): LlamaArchitecture {
  const archs = c.architectures;
  const unsupported = (name: string): never => {
    throw new FormatError(
      fileName,
      'architectures',
      `unsupported architecture ${name}: this lab runs Llama-architecture models (${ARCHITECTURES.join(', ')})`,
      'Pick a Llama-architecture checkpoint (Llama 3.x, SmolLM2, TinyLlama).',
    );
  };
  if (archs === undefined || archs === null) {
    // Some older exports omit architectures; model_type alone still identifies a Llama.
    if (c.model_type === 'llama') return 'LlamaForCausalLM';
    return unsupported(typeof c.model_type === 'string' ? `(model_type ${c.model_type})` : '(none named)');
  }
  if (!Array.isArray(archs) || archs.length === 0 || !archs.every((a) => typeof a === 'string')) {
    throw new FormatError(fileName, 'architectures', `is ${show(archs)}, expected a list of class names`, HINT_CONFIG);
  }
  for (const a of archs as string[]) {
    if (!(ARCHITECTURES as readonly string[]).includes(a)) unsupported(a);
  }
  if (archs.length > 1) {
    throw new FormatError(fileName, 'architectures', `names ${archs.length} classes (${archs.join(', ')}); expected one`, HINT_CONFIG);
  }
  return archs[0] as LlamaArchitecture;
}

function readRopeScaling(v: unknown, field: string, fileName: string): Llama3RopeScaling | null {
  if (v === undefined || v === null) return null;
  if (!isPlainObject(v)) throw new FormatError(fileName, field, `is ${show(v)}, expected an object or null`, HINT_CONFIG);
  const type = v.rope_type ?? v.type ?? 'default';
  if (type === 'default') return null;
  if (type !== 'llama3') {
    throw new FormatError(
      fileName,
      field,
      `uses RoPE scaling type ${show(type)}, which this lab does not implement (it supports "llama3" scaling or none)`,
      'Pick a checkpoint without RoPE scaling or with Llama 3 scaling.',
    );
  }
  const num = (key: string): number => {
    const x = v[key];
    if (typeof x !== 'number' || !Number.isFinite(x) || x <= 0) {
      throw new FormatError(fileName, `${field}.${key}`, `is ${show(x)}, expected a positive number`, HINT_CONFIG);
    }
    return x;
  };
  const scaling: Llama3RopeScaling = {
    type: 'llama3',
    factor: num('factor'),
    lowFreqFactor: num('low_freq_factor'),
    highFreqFactor: num('high_freq_factor'),
    originalMaxPositionEmbeddings: num('original_max_position_embeddings'),
  };
  if (scaling.highFreqFactor <= scaling.lowFreqFactor) {
    throw new FormatError(
      fileName,
      field,
      `high_freq_factor ${scaling.highFreqFactor} must be larger than low_freq_factor ${scaling.lowFreqFactor}`,
      HINT_CONFIG,
    );
  }
  return scaling;
}

/**
 * Every tensor a Hugging Face checkpoint of this config must hold, name -> shape
 * (torch layout: Linear weights are [out_features, in_features]).
 */
export function llamaTensorShapes(config: LlamaConfig): Map<string, number[]> {
  const { hiddenSize: C, intermediateSize: I, numHeads: NH, numKvHeads: KV, headDim: HD, vocabSize: V } = config;
  const m = new Map<string, number[]>();
  m.set('model.embed_tokens.weight', [V, C]);
  for (let l = 0; l < config.numLayers; l++) {
    const p = `model.layers.${l}`;
    m.set(`${p}.input_layernorm.weight`, [C]);
    m.set(`${p}.self_attn.q_proj.weight`, [NH * HD, C]);
    m.set(`${p}.self_attn.k_proj.weight`, [KV * HD, C]);
    m.set(`${p}.self_attn.v_proj.weight`, [KV * HD, C]);
    m.set(`${p}.self_attn.o_proj.weight`, [C, NH * HD]);
    m.set(`${p}.post_attention_layernorm.weight`, [C]);
    m.set(`${p}.mlp.gate_proj.weight`, [I, C]);
    m.set(`${p}.mlp.up_proj.weight`, [I, C]);
    m.set(`${p}.mlp.down_proj.weight`, [C, I]);
  }
  m.set('model.norm.weight', [C]);
  if (config.architecture === 'LlamaForSequenceClassification') m.set('score.weight', [config.numLabels!, C]);
  else if (!config.tieWordEmbeddings) m.set('lm_head.weight', [V, C]);
  return m;
}

/** Names a checkpoint may hold that the engine ignores (older exports saved RoPE buffers). */
function ignorable(name: string, config: LlamaConfig): boolean {
  if (/^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$/.test(name)) return true;
  // Some tied checkpoints still store a copy of the embedding as lm_head.
  return name === 'lm_head.weight' && config.tieWordEmbeddings;
}

/**
 * Checks a checkpoint's tensor list against the config: throws on the first missing
 * tensor or wrong shape, naming it; returns the names it holds that the model does
 * not use (besides the known harmless ones).
 */
export function checkLlamaTensors(
  config: LlamaConfig,
  tensors: Iterable<readonly [string, readonly number[]]>,
  fileName: string,
): string[] {
  const expected = llamaTensorShapes(config);
  const have = new Map(tensors);
  for (const [name, shape] of expected) {
    const got = have.get(name);
    if (!got) {
      throw new FormatError(fileName, `tensor ${JSON.stringify(name)}`, 'is missing from the checkpoint', 'Check that config.json and the weights come from the same model, and that every shard was downloaded.');
    }
    if (got.length !== shape.length || got.some((d, i) => d !== shape[i])) {
      throw new FormatError(
        fileName,
        `tensor ${JSON.stringify(name)}`,
        `has shape ${show(got)} but config.json implies ${show(shape)}`,
        'Check that config.json and the weights come from the same model.',
      );
    }
  }
  return [...have.keys()].filter((n) => !expected.has(n) && !ignorable(n, config));
}
