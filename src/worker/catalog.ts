/**
 * What the page needs to know about models without loading any engine code: the
 * models offered in the picker, their labels, and the run shape a trainer setting
 * implies (for the memory plan).
 */
import { DEFAULT_MODEL_ID, SMALL_MODEL_ID } from '../model/source';
import type { TrainerConfig } from '../selfplay/config';
import type { ModelChoice, ModelRef, PlanSettings, WeightFormat } from './protocol';

export interface KnownModel {
  id: string;
  label: string;
  note: string;
}

/** Hub models offered in the picker; any other Llama-architecture repo id can be typed in. */
export const KNOWN_MODELS: KnownModel[] = [
  { id: DEFAULT_MODEL_ID, label: 'Llama-3.2-3B-Instruct', note: 'the paper\'s model; about 6.4 GB download, 2-4 GB GPU memory in 4-bit' },
  { id: SMALL_MODEL_ID, label: 'Llama-3.2-1B-Instruct', note: 'smaller GPUs; about 2.5 GB download' },
  { id: 'HuggingFaceTB/SmolLM2-360M-Instruct', label: 'SmolLM2-360M-Instruct', note: 'small Llama-architecture model; about 0.7 GB download' },
  { id: 'HuggingFaceTB/SmolLM2-135M-Instruct', label: 'SmolLM2-135M-Instruct', note: 'tiny, for trying the lab out; about 0.27 GB download' },
  { id: 'TinyLlama/TinyLlama-1.1B-Chat-v1.0', label: 'TinyLlama-1.1B-Chat', note: 'Llama-2-style chat model; about 2.2 GB download' },
];

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

