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

/**
 * The largest size each config.json field may state, with the largest real value we know
 * of. The caps sit far above every real Llama-family model (Llama 3.1 405B: 126 layers,
 * hidden 16384, intermediate 53248, 128 heads, 8 KV heads, head_dim 128, vocab 128256;
 * other families reach 256k vocabularies and 10M-token contexts) so no real checkpoint
 * meets them, yet they refuse a damaged file at once: without them a config with 1e9
 * layers loops over a billion layers (tensor lists, memory plans) before anything fails.
 */
export const LLAMA_SIZE_LIMITS = {
  num_hidden_layers: { max: 1024, largest: 'Llama 3.1 405B has 126' },
  hidden_size: { max: 65536, largest: 'Llama 3.1 405B has 16384' },
  intermediate_size: { max: 262144, largest: 'Llama 3.1 405B has 53248' },
  num_attention_heads: { max: 1024, largest: 'Llama 3.1 405B has 128' },
  num_key_value_heads: { max: 1024, largest: 'Llama 3.1 405B has 8' },
  head_dim: { max: 1024, largest: 'Llama models use 64 or 128, other families up to 256' },
  vocab_size: { max: 1 << 20, largest: 'Llama 3 has 128256, the largest other families about 256k' },
  // Not used to size any buffer (the run's own context is), so the cap is loose.
  max_position_embeddings: { max: 1 << 26, largest: 'the longest real context is about 10M tokens' },
  num_labels: { max: 1 << 20, largest: 'reward models use 1' },
} as const;
export type LlamaSizeField = keyof typeof LLAMA_SIZE_LIMITS;

/**
 * The most parameters a config may describe: 2.5x Llama 3.1 405B. Even in 4 bits such
 * weights (over 500 GB) exceed the memory of any single accelerator (the largest hold
 * under 300 GB), let alone what a browser tab gets, so a config past it is refused
 * before a memory plan is drawn up.
 */
export const MAX_LLAMA_PARAMETERS = 1e12;

/** The config field behind each size of a LlamaConfig, for messages. */
const SIZE_FIELDS: readonly (readonly [keyof LlamaConfig, LlamaSizeField])[] = [
  ['numLayers', 'num_hidden_layers'],
  ['hiddenSize', 'hidden_size'],
  ['intermediateSize', 'intermediate_size'],
  ['numHeads', 'num_attention_heads'],
  ['numKvHeads', 'num_key_value_heads'],
  ['headDim', 'head_dim'],
  ['vocabSize', 'vocab_size'],
  ['maxPositionEmbeddings', 'max_position_embeddings'],
  ['numLabels', 'num_labels'],
];

const HINT_SIZE = "The file is damaged or was edited by hand: use the original config.json from the model's repository.";

function tooLarge(field: LlamaSizeField, v: number): string | null {
  const { max, largest } = LLAMA_SIZE_LIMITS[field];
  return v > max ? `is ${v}, far beyond any real model (${largest}); the lab accepts at most ${max}` : null;
}

/**
 * Parameters of a Llama checkpoint of this config, counted from the shapes in closed
 * form (no walk over the layers): the same total as summing llamaTensorShapes.
 */
export function llamaParameterCount(config: LlamaConfig): number {
  const { hiddenSize: C, intermediateSize: I, numLayers: L, numHeads: NH, numKvHeads: KV, headDim: HD, vocabSize: V } = config;
  const perLayer = 2 * C + 2 * NH * HD * C + 2 * KV * HD * C + 3 * I * C;
  const head = config.architecture === 'LlamaForSequenceClassification' ? (config.numLabels ?? 0) * C : config.tieWordEmbeddings ? 0 : V * C;
  return V * C + L * perLayer + C + head;
}

/**
 * Throws a FormatError naming the field when a size is beyond LLAMA_SIZE_LIMITS or the
 * whole model beyond MAX_LLAMA_PARAMETERS. parseLlamaConfig applies it to every file; the
 * functions that walk the layers (llamaTensorShapes, hence memory plans, parameter counts
 * and loaders) apply it again, so a config built by hand cannot start a runaway loop.
 */
export function checkLlamaSizes(config: LlamaConfig, fileName = 'config.json'): void {
  for (const [key, field] of SIZE_FIELDS) {
    const v = config[key];
    if (v === null) continue;
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v <= 0) {
      throw new FormatError(fileName, field, `is ${show(v)}, expected a positive integer`, HINT_CONFIG);
    }
    const problem = tooLarge(field, v);
    if (problem) throw new FormatError(fileName, field, problem, HINT_SIZE);
  }
  const n = llamaParameterCount(config);
  if (n > MAX_LLAMA_PARAMETERS) {
    const { numLayers: L, hiddenSize: C, intermediateSize: I, numHeads: NH, headDim: HD, vocabSize: V } = config;
    throw new FormatError(
      fileName,
      'num_hidden_layers, hidden_size, intermediate_size, num_attention_heads, head_dim, vocab_size',
      `num_hidden_layers ${L}, hidden_size ${C}, intermediate_size ${I}, num_attention_heads ${NH} x head_dim ${HD} and vocab_size ${V} make ${n.toExponential(2)} parameters ` +
        `(${(n / 2 / 1e12).toFixed(1)} TB even in 4 bits), more than any device holds; the lab accepts at most ${MAX_LLAMA_PARAMETERS.toExponential(0).replace('+', '')} parameters`,
      HINT_SIZE,
    );
  }
}

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
    const problem = field in LLAMA_SIZE_LIMITS ? tooLarge(field as LlamaSizeField, v) : null;
    if (problem) fail(field, problem, HINT_SIZE);
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

  const config: LlamaConfig = {
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
  checkLlamaSizes(config, fileName);
  return config;
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
  checkLlamaSizes(config);
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
