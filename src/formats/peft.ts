/**
 * PEFT LoRA adapters for Llama models: adapter_config.json + adapter_model.safetensors,
 * with the key names and shapes PEFT, vLLM and llama.cpp's converter read.
 *
 * For a projection W [out, in]: lora_A is [r, in], lora_B is [out, r], and the layer
 * computes y = W x + scale * B (A x) with scale = alpha / r (alpha / sqrt(r) with rsLoRA).
 */
import { FormatError, isPlainObject, parseJsonInput, show } from './errors';
import { refuseNonFinite } from './finite';
import type { LlamaConfig } from './llama-config';
import { parseSafetensors, toF32, writeSafetensors, numel, type TensorToWrite } from './safetensors';

export const LLAMA_PROJECTIONS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] as const;
export type LlamaProjection = (typeof LLAMA_PROJECTIONS)[number];

/** The fields PEFT writes for a plain LoRA adapter; PEFT fills any others with defaults. */
export interface LoraAdapterConfig {
  peft_type: 'LORA';
  task_type: 'CAUSAL_LM';
  base_model_name_or_path: string | null;
  r: number;
  lora_alpha: number;
  lora_dropout: number;
  /** In the order of LLAMA_PROJECTIONS. */
  target_modules: LlamaProjection[];
  bias: 'none';
  fan_in_fan_out: false;
  use_rslora: boolean;
  use_dora: false;
  modules_to_save: null;
  init_lora_weights: boolean | 'gaussian';
  inference_mode: boolean;
}

/** The dimensions LoRA shapes depend on. */
export interface LoraModelShape {
  layers: number;
  hidden: number;
  intermediate: number;
  heads: number;
  kvHeads: number;
  headDim: number;
}

export function loraModelShape(config: LlamaConfig): LoraModelShape {
  return {
    layers: config.numLayers,
    hidden: config.hiddenSize,
    intermediate: config.intermediateSize,
    heads: config.numHeads,
    kvHeads: config.numKvHeads,
    headDim: config.headDim,
  };
}

/** in/out features of a projection's base weight. */
export function projectionDims(model: LoraModelShape, module: LlamaProjection): { inFeatures: number; outFeatures: number } {
  const q = model.heads * model.headDim;
  const kv = model.kvHeads * model.headDim;
  switch (module) {
    case 'q_proj':
      return { inFeatures: model.hidden, outFeatures: q };
    case 'k_proj':
    case 'v_proj':
      return { inFeatures: model.hidden, outFeatures: kv };
    case 'o_proj':
      return { inFeatures: q, outFeatures: model.hidden };
    case 'gate_proj':
    case 'up_proj':
      return { inFeatures: model.hidden, outFeatures: model.intermediate };
    case 'down_proj':
      return { inFeatures: model.intermediate, outFeatures: model.hidden };
  }
}

/** Shape of one LoRA matrix: A [r, in], B [out, r]. */
export function loraShape(model: LoraModelShape, module: LlamaProjection, which: 'A' | 'B', r: number): [number, number] {
  const { inFeatures, outFeatures } = projectionDims(model, module);
  return which === 'A' ? [r, inFeatures] : [outFeatures, r];
}

const isAttention = (m: LlamaProjection): boolean => m === 'q_proj' || m === 'k_proj' || m === 'v_proj' || m === 'o_proj';

export function loraKey(layer: number, module: LlamaProjection, which: 'A' | 'B'): string {
  return `base_model.model.model.layers.${layer}.${isAttention(module) ? 'self_attn' : 'mlp'}.${module}.lora_${which}.weight`;
}

const KEY_RE = /^base_model\.model\.model\.layers\.(0|[1-9]\d*)\.(self_attn|mlp)\.([a-z_]+)\.lora_(A|B)\.weight$/;

/** The inverse of loraKey; null for anything that is not a Llama LoRA key. */
export function parseLoraKey(key: string): { layer: number; module: LlamaProjection; which: 'A' | 'B' } | null {
  const m = KEY_RE.exec(key);
  if (!m) return null;
  const module = m[3] as LlamaProjection;
  if (!LLAMA_PROJECTIONS.includes(module)) return null;
  if ((m[2] === 'self_attn') !== isAttention(module)) return null;
  return { layer: Number(m[1]), module, which: m[4] as 'A' | 'B' };
}

export function loraScale(config: Pick<LoraAdapterConfig, 'r' | 'lora_alpha' | 'use_rslora'>): number {
  return config.use_rslora ? config.lora_alpha / Math.sqrt(config.r) : config.lora_alpha / config.r;
}

export interface AdapterConfigOptions {
  baseModel: string;
  r: number;
  alpha: number;
  targetModules: readonly LlamaProjection[];
  useRslora?: boolean;
  dropout?: number;
}

export function makeAdapterConfig(o: AdapterConfigOptions): LoraAdapterConfig {
  const raw = {
    peft_type: 'LORA',
    task_type: 'CAUSAL_LM',
    base_model_name_or_path: o.baseModel,
    r: o.r,
    lora_alpha: o.alpha,
    lora_dropout: o.dropout ?? 0,
    target_modules: [...o.targetModules],
    bias: 'none',
    fan_in_fan_out: false,
    use_rslora: o.useRslora ?? false,
    use_dora: false,
    modules_to_save: null,
    init_lora_weights: true,
    inference_mode: true,
  };
  return validateAdapterConfig(raw, 'adapter_config.json').config;
}

/** vLLM's supported LoRA ranks. */
export const VLLM_RANKS = [1, 8, 16, 32, 64, 128, 256] as const;
/** vLLM's default --max-lora-rank. */
export const VLLM_DEFAULT_MAX_RANK = 16;

const HINT_ADAPTER = 'Save the adapter with PEFT (LoraConfig) or export it from this lab.';
const HINT_NONFINITE_ADAPTER =
  'The adapter is damaged (or was saved after training diverged): download or export it again, or use an earlier checkpoint of the run.';
const HINT_NONFINITE_EXPORT =
  'Training diverged before this export; nothing was written. Export an earlier checkpoint of the run, or lower the learning rate and resume from one.';

/**
 * Checks an adapter_config.json (parsed JSON, text or bytes). Fields that would change
 * what the adapter computes in ways this lab does not implement are errors; problems
 * only other tools have are returned as warnings.
 */
export function validateAdapterConfig(json: unknown, fileName: string): { config: LoraAdapterConfig; warnings: string[] } {
  const c = parseJsonInput(json, fileName);
  if (!isPlainObject(c)) throw new FormatError(fileName, null, 'is not a JSON object', HINT_ADAPTER);
  const fail = (field: string, problem: string, hint = HINT_ADAPTER): never => {
    throw new FormatError(fileName, field, problem, hint);
  };
  const absentOr = (field: string, ok: (v: unknown) => boolean, want: string): void => {
    const v = c[field];
    if (v !== undefined && v !== null && !ok(v)) fail(field, `is ${show(v)}; this lab supports only ${want}`);
  };
  const isEmpty = (v: unknown): boolean => (Array.isArray(v) ? v.length === 0 : isPlainObject(v) && Object.keys(v).length === 0);

  if (c.peft_type !== 'LORA') fail('peft_type', `is ${show(c.peft_type)}, expected "LORA"`);
  if (c.task_type !== undefined && c.task_type !== null && c.task_type !== 'CAUSAL_LM') {
    fail('task_type', `is ${show(c.task_type)}; this lab trains and reads "CAUSAL_LM" adapters`);
  }
  const base = c.base_model_name_or_path ?? null;
  if (base !== null && typeof base !== 'string') fail('base_model_name_or_path', `is ${show(base)}, expected a string`);

  const r = c.r;
  if (typeof r !== 'number' || !Number.isSafeInteger(r) || r <= 0) fail('r', `is ${show(r)}, expected a positive integer`);
  const alpha = c.lora_alpha ?? 8;
  if (typeof alpha !== 'number' || !Number.isFinite(alpha) || alpha <= 0) fail('lora_alpha', `is ${show(alpha)}, expected a positive number`);
  const dropout = c.lora_dropout ?? 0;
  if (typeof dropout !== 'number' || !(dropout >= 0 && dropout < 1)) fail('lora_dropout', `is ${show(dropout)}, expected a number in [0, 1)`);

  const tm = c.target_modules;
  let targets: string[];
  if (tm === 'all-linear') targets = [...LLAMA_PROJECTIONS];
  else if (Array.isArray(tm) && tm.every((m) => typeof m === 'string')) targets = tm as string[];
  else if (typeof tm === 'string') return fail('target_modules', `is the pattern ${show(tm)}; list the modules instead (any of ${LLAMA_PROJECTIONS.join(', ')})`);
  else return fail('target_modules', `is ${show(tm)}, expected a list of module names`);
  if (targets.length === 0) fail('target_modules', 'is empty');
  for (const m of targets) {
    if (!(LLAMA_PROJECTIONS as readonly string[]).includes(m)) {
      fail('target_modules', `includes ${show(m)}; this lab adapts only the Llama projections ${LLAMA_PROJECTIONS.join(', ')}`);
    }
  }
  const target_modules = LLAMA_PROJECTIONS.filter((m) => targets.includes(m));

  if ((c.bias ?? 'none') !== 'none') fail('bias', `is ${show(c.bias)}; this lab supports only "none"`);
  if ((c.fan_in_fan_out ?? false) !== false) fail('fan_in_fan_out', 'is true; that layout is for GPT-2 Conv1D weights, Llama adapters use false');
  if ((c.use_dora ?? false) !== false) fail('use_dora', 'is true; DoRA adapters are not supported, train a plain LoRA adapter');
  const rslora = c.use_rslora ?? false;
  if (typeof rslora !== 'boolean') fail('use_rslora', `is ${show(rslora)}, expected true or false`);
  absentOr('modules_to_save', isEmpty, 'null (no fully trained extra modules)');
  absentOr('layers_to_transform', () => false, 'null (every layer adapted)');
  absentOr('layer_replication', () => false, 'null');
  absentOr('rank_pattern', isEmpty, 'an empty rank_pattern (one rank for every module)');
  absentOr('alpha_pattern', isEmpty, 'an empty alpha_pattern (one alpha for every module)');
  absentOr('lora_bias', (v) => v === false, 'false');
  const init = c.init_lora_weights ?? true;
  if (init !== true && init !== false && init !== 'gaussian') {
    fail('init_lora_weights', `is ${show(init)}; initialisations that rewrite the base weights (PiSSA, OLoRA, LoftQ, ...) are not supported`);
  }
  const inference = c.inference_mode ?? true;
  if (typeof inference !== 'boolean') fail('inference_mode', `is ${show(inference)}, expected true or false`);

  const config: LoraAdapterConfig = {
    peft_type: 'LORA',
    task_type: 'CAUSAL_LM',
    base_model_name_or_path: base as string | null,
    r: r as number,
    lora_alpha: alpha as number,
    lora_dropout: dropout as number,
    target_modules,
    bias: 'none',
    fan_in_fan_out: false,
    use_rslora: rslora as boolean,
    use_dora: false,
    modules_to_save: null,
    init_lora_weights: init as boolean | 'gaussian',
    inference_mode: inference as boolean,
  };
  return { config, warnings: interopWarnings(config) };
}

function interopWarnings(config: LoraAdapterConfig): string[] {
  const w: string[] = [];
  const r = config.r;
  if (!(VLLM_RANKS as readonly number[]).includes(r)) {
    w.push(`vLLM: rank r=${r} is not one vLLM supports (${VLLM_RANKS.join(', ')}); it will refuse to load this adapter.`);
  }
  if (r > VLLM_DEFAULT_MAX_RANK) {
    const need = VLLM_RANKS.find((x) => x >= r) ?? r;
    w.push(`vLLM: rank r=${r} is above the default max_lora_rank ${VLLM_DEFAULT_MAX_RANK}; start vLLM with --max-lora-rank ${need}.`);
  }
  if (config.use_rslora) {
    w.push(
      `llama.cpp: its converter ignores use_rslora and scales by alpha/r = ${config.lora_alpha / r} instead of alpha/sqrt(r) = ${loraScale(config)}; ` +
        `set lora_alpha to ${config.lora_alpha / Math.sqrt(r)} with use_rslora false for the same result there.`,
    );
  }
  return w;
}

export interface LoraTensor {
  shape: number[];
  data: Float32Array;
}

export interface AdapterFiles {
  'adapter_config.json': string;
  'adapter_model.safetensors': Uint8Array<ArrayBuffer>;
}

/**
 * Serialises an adapter as PEFT saves it (F32 tensors, metadata {"format": "pt"}).
 * With `model`, every adapted layer and module must be present with exact shapes.
 */
export function writeAdapter(adapter: { config: LoraAdapterConfig; tensors: ReadonlyMap<string, LoraTensor>; model?: LoraModelShape }): AdapterFiles {
  const { config } = validateAdapterConfig(adapter.config, 'adapter_config.json');
  const file = 'adapter_model.safetensors';
  const list: TensorToWrite[] = [];
  for (const [key, t] of adapter.tensors) {
    const k = checkKey(key, config, adapter.model ?? null, file);
    const want = adapter.model ? loraShape(adapter.model, k.module, k.which, config.r) : null;
    const rankOk = k.which === 'A' ? t.shape[0] === config.r : t.shape[1] === config.r;
    if (t.shape.length !== 2 || !rankOk || (want && (t.shape[0] !== want[0] || t.shape[1] !== want[1]))) {
      const expect = want ? show(want) : k.which === 'A' ? `[${config.r}, in_features]` : `[out_features, ${config.r}]`;
      throw new FormatError(file, key, `has shape ${show(t.shape)}, expected ${expect}`, 'Check the rank and model dimensions the adapter was built with.');
    }
    if (t.data.length !== numel(t.shape)) {
      throw new FormatError(file, key, `has ${t.data.length} values for shape ${show(t.shape)}`, 'Pass data with one value per element.');
    }
    // An adapter no reader (this lab's included) would accept is refused before any file exists.
    refuseNonFinite(file, key, t.data, HINT_NONFINITE_EXPORT);
    list.push({ name: key, dtype: 'F32', shape: t.shape, data: t.data });
  }
  if (adapter.model) checkComplete(new Set(adapter.tensors.keys()), config, adapter.model, file);
  return {
    'adapter_config.json': JSON.stringify(config, null, 2) + '\n',
    'adapter_model.safetensors': writeSafetensors(list, { format: 'pt' }),
  };
}

/**
 * Reads and checks an adapter against the model it will be applied to: every key a
 * Llama LoRA key for a configured module and existing layer, every shape exact, no
 * key missing, every value finite. F16 and BF16 tensors are widened to F32.
 */
export function readAdapter(
  files: { 'adapter_config.json': unknown; 'adapter_model.safetensors': Uint8Array },
  model: LoraModelShape,
): { config: LoraAdapterConfig; warnings: string[]; tensors: Map<string, LoraTensor> } {
  const { config, warnings } = validateAdapterConfig(files['adapter_config.json'], 'adapter_config.json');
  const file = 'adapter_model.safetensors';
  const st = parseSafetensors(files[file], file);
  const tensors = new Map<string, LoraTensor>();
  for (const [key, info] of st.header.tensors) {
    const k = checkKey(key, config, model, file);
    const want = loraShape(model, k.module, k.which, config.r);
    if (info.shape.length !== 2 || info.shape[0] !== want[0] || info.shape[1] !== want[1]) {
      throw new FormatError(
        file,
        key,
        `has shape ${show(info.shape)}, expected ${show(want)} (r=${config.r})`,
        'Check that the adapter was trained for this base model and that adapter_config.json belongs to it.',
      );
    }
    if (info.dtype !== 'F32' && info.dtype !== 'F16' && info.dtype !== 'BF16') {
      throw new FormatError(file, key, `has dtype ${info.dtype}, expected F32, F16 or BF16`, 'Save the adapter in a floating-point dtype.');
    }
    const data = toF32(info.dtype, st.bytes(key), `${file}, ${key}`);
    // A NaN or infinity would only show later, as non-finite log-probs and skipped steps.
    refuseNonFinite(file, key, data, HINT_NONFINITE_ADAPTER);
    tensors.set(key, { shape: info.shape.slice(), data });
  }
  checkComplete(new Set(tensors.keys()), config, model, file);
  return { config, warnings, tensors };
}

function checkKey(key: string, config: LoraAdapterConfig, model: LoraModelShape | null, file: string) {
  const k = parseLoraKey(key);
  if (!k) {
    throw new FormatError(
      file,
      key,
      'is not a LoRA weight of a Llama projection',
      `Expected keys like ${loraKey(0, 'q_proj', 'A')}; adapters that also train other modules (lm_head, embeddings) are not supported.`,
    );
  }
  if (!config.target_modules.includes(k.module)) {
    throw new FormatError(file, key, `adapts ${k.module}, which target_modules (${config.target_modules.join(', ')}) does not list`, 'Use the adapter_config.json saved with these weights.');
  }
  if (model && k.layer >= model.layers) {
    throw new FormatError(file, key, `is for layer ${k.layer} but the model has ${model.layers} layers`, 'Check that the adapter was trained for this base model.');
  }
  return k;
}

function checkComplete(keys: ReadonlySet<string>, config: LoraAdapterConfig, model: LoraModelShape, file: string): void {
  for (let l = 0; l < model.layers; l++) {
    for (const m of config.target_modules) {
      for (const which of ['A', 'B'] as const) {
        const key = loraKey(l, m, which);
        if (!keys.has(key)) {
          throw new FormatError(file, key, 'is missing', `The adapter must hold lora_A and lora_B for every layer and every module in target_modules; re-export it.`);
        }
      }
    }
  }
}
