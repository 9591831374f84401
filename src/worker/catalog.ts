/**
 * What the page needs to know about models without loading any engine code: the
 * models offered in the picker, their labels, and the run shape a trainer setting
 * implies (for the memory plan).
 */
import { BF16_MODEL_ID, DEFAULT_MODEL_ID, SMALL_MODEL_ID } from '../model/source';
import { MICRO_DEMO_SETTINGS, type TrainerConfig } from '../selfplay/config';
import type { ModelChoice, ModelRef, PlanSettings, WeightFormat } from './protocol';

export interface KnownModel {
  id: string;
  label: string;
  note: string;
  /** What is downloaded, e.g. "ONNX q4f16 (4-bit, copied as is)". */
  weights: string;
  /** Architecture family, for tests and notes (e.g. "Llama-3.2-3B"). */
  family: string;
  /** About how many bytes the download is (the files the lab reads). */
  downloadBytes: number;
  /** About how many bytes the 4-bit weights take on the GPU (the engine's memory plan; a run adds its KV cache and activations). */
  gpuBytes: number;
  /** The export stores its own 4-bit LM head beside the embedding. */
  separateLmHead?: boolean;
}

/**
 * Hub models offered in the picker; any other Llama-architecture repo id can be typed
 * in. The default is the pre-quantized 4-bit ONNX export: a third of the bf16
 * checkpoint's download, cached after the first load.
 */
export const KNOWN_MODELS: KnownModel[] = [
  {
    id: DEFAULT_MODEL_ID,
    label: 'Llama-3.2-3B-Instruct (4-bit)',
    note: "the paper's model, pre-quantized to 4 bits and copied as is; cached in the browser after the first download",
    weights: 'ONNX q4f16 (4-bit)',
    family: 'Llama-3.2-3B',
    downloadBytes: 2.5e9,
    gpuBytes: 2.09e9,
    separateLmHead: true,
  },
  {
    id: BF16_MODEL_ID,
    label: 'Llama-3.2-3B-Instruct (bf16)',
    note: 'the original bf16 checkpoint, quantized to 4 bits in the tab; a larger download, same GPU memory',
    weights: 'safetensors bf16',
    family: 'Llama-3.2-3B',
    downloadBytes: 6.43e9,
    gpuBytes: 1.86e9,
  },
  { id: SMALL_MODEL_ID, label: 'Llama-3.2-1B-Instruct', note: 'smaller GPUs', weights: 'safetensors bf16', family: 'Llama-3.2-1B', downloadBytes: 2.47e9, gpuBytes: 0.72e9 },
  { id: 'HuggingFaceTB/SmolLM2-360M-Instruct', label: 'SmolLM2-360M-Instruct', note: 'small Llama-architecture model', weights: 'safetensors bf16', family: 'SmolLM2-360M', downloadBytes: 0.72e9, gpuBytes: 0.22e9 },
  { id: 'HuggingFaceTB/SmolLM2-135M-Instruct', label: 'SmolLM2-135M-Instruct', note: 'tiny, for trying the lab out', weights: 'safetensors bf16', family: 'SmolLM2-135M', downloadBytes: 0.27e9, gpuBytes: 0.08e9 },
  { id: 'TinyLlama/TinyLlama-1.1B-Chat-v1.0', label: 'TinyLlama-1.1B-Chat', note: 'Llama-2-style chat model', weights: 'safetensors bf16', family: 'TinyLlama-1.1B', downloadBytes: 2.2e9, gpuBytes: 0.64e9 },
];

export function knownModel(id: string): KnownModel | null {
  return KNOWN_MODELS.find((m) => m.id === id.trim()) ?? null;
}

export function modelLabel(m: ModelChoice | ModelRef): string {
  if (m.kind === 'hub') return m.id;
  if (m.kind === 'served') return `models/${m.folder}`;
  return m.name;
}

/** Tokens the chat template adds around a query (system header, date line, turn markers). */
const CHAT_OVERHEAD_TOKENS = 64;
/** The judge's instructions (the 7-point rubric) around query and answer. */
const JUDGE_RUBRIC_TOKENS = 320;

/** The run shape whose buffers the trainer allocates, from its settings. */
export function planSettingsFor(config: TrainerConfig, format: WeightFormat): PlanSettings {
  const judge = config.mode === 'lsp' || config.world === 'open' ? config.rewards.judge.maxTokens : 0;
  const solverPrompt = CHAT_OVERHEAD_TOKENS + config.maxQueryTokens;
  return {
    format,
    loraRank: config.lora.r,
    loraTargets: config.lora.targets,
    groupSize: config.groupSize,
    // Generation's longest prompt: the judge's (rubric, query and answer) when it runs, else the Solver's.
    maxPromptTokens: solverPrompt + (judge > 0 ? config.maxAnswerTokens + JUDGE_RUBRIC_TOKENS : 0),
    maxNewTokens: Math.max(config.maxAnswerTokens, config.maxQueryTokens, judge),
    // Training runs on the Solver's sequences (and the Challenger's shorter ones), never the judge's.
    trainTokensPerStep: config.microBatch * (solverPrompt + config.maxAnswerTokens),
  };
}


/**
 * The quick demo: the committed micro model (models/micro-arith, served by the dev
 * server; a 0.3 MB f32 Llama that adds numbers up to 99, about half right) in the
 * free-form arithmetic world with the verifiable reward, its held-out exam every 6
 * iterations (eval/exam_accuracy). Fits any GPU; offered first when the GPU is small.
 */
export const QUICK_DEMO = {
  label: 'Quick demo: micro model learns addition',
  note: 'a 0.3 MB model pretrained to be half right at adding numbers up to 99; watch its held-out exam accuracy while it plays against itself',
  model: { kind: 'served' as const, folder: 'micro-arith' } satisfies ModelChoice,
  format: 'f32' as WeightFormat,
  /** The folder's held-out exam; the lab reads exam.json from any model folder that has one. */
  examFile: 'exam.json',
  /** The settings microDemoConfig() in src/selfplay/config.ts starts from. */
  config: MICRO_DEMO_SETTINGS,
};

/**
 * A GPU on which the quick demo is offered first. WebGPU does not say how much memory
 * a GPU has, so "small" is what the adapter does say: a software adapter, no
 * shader-f16, or buffers under 1 GiB (the default 3B model needs several GB).
 */
export function isSmallGpu(caps: { adapterName: string; f16: boolean; maxBufferSize: number }): boolean {
  return /swiftshader|llvmpipe|lavapipe|software|microsoft basic render/i.test(caps.adapterName) || !caps.f16 || caps.maxBufferSize < 2 ** 30;
}
