/**
 * Model choices as the page offers them, turned into ModelSources in the worker, plus
 * the numbers shown before a download: parameter count, download size and the
 * engine's memory plan for the run shape the settings imply.
 */
import { FormatError } from '../formats/errors';
import { llamaTensorShapes, type LlamaConfig } from '../formats/llama-config';
import type { Gpu } from '../gpu/gpu';
import { planMemory, type MemoryPlan, type RunShape } from '../model/memory';
import { checkRunMemory, type MemoryCheck } from '../model/memory-probe';
import type { TrainerConfig } from '../selfplay/config';
import { knownModel, planSettingsFor } from './catalog';
import { DroppedFilesSource, hubModelSource, servedModelSource, type ModelSource } from '../model/source';
import type { ModelChoice, ModelRef, PlanSettings, WeightFormat } from './protocol';


/** Files dropped on the page, keyed by their path inside the dropped folder. */
export function droppedSource(name: string, files: readonly { path: string; file: File }[]): DroppedFilesSource {
  // Only the folder's top level holds a Hugging Face checkpoint; deeper files (e.g. original/) are not needed.
  const top = files.filter((f) => f.path.length > 0 && !f.path.includes('/'));
  if (top.length === 0) {
    throw new FormatError(name, null, 'holds no files at its top level', 'Drop the model folder itself (config.json, tokenizer files and safetensors files).');
  }
  return new DroppedFilesSource(
    top.map((f) => (f.file.name === f.path ? f.file : new File([f.file], f.path, { lastModified: f.file.lastModified, type: f.file.type }))),
    name,
  );
}

export function sourceFor(m: ModelChoice, token?: string): ModelSource {
  if (m.kind === 'hub') return hubModelSource(m.id.trim(), { token: token || undefined, revision: m.revision });
  if (m.kind === 'served') return servedModelSource(m.folder);
  return droppedSource(m.name, m.files);
}

export function refFor(m: ModelChoice, source: ModelSource): ModelRef {
  if (m.kind === 'files') return { kind: 'files', name: m.name, revision: source.revision ?? '' };
  return m;
}

/**
 * A saved run's dropped-files model without the files: it names the same cache entry,
 * so the model loads from the cache; anything else asks for the files again.
 */
export class CachedOnlySource implements ModelSource {
  constructor(
    readonly name: string,
    readonly revision: string,
  ) {}

  private missing(): never {
    throw new FormatError(this.name, null, 'came from dropped files and is not in the model cache any more', 'Drop the same model folder again to continue the saved run.');
  }

  has(): Promise<boolean> {
    return Promise.resolve(this.missing());
  }
  open(): Promise<never> {
    return Promise.resolve(this.missing());
  }
  readJson(): Promise<never> {
    return Promise.resolve(this.missing());
  }
  readText(): Promise<never> {
    return Promise.resolve(this.missing());
  }
}

export function runShape(s: PlanSettings): RunShape {
  return {
    format: s.format,
    loraRank: s.loraRank,
    loraTargets: s.loraTargets,
    groupSize: s.groupSize,
    maxPromptTokens: s.maxPromptTokens,
    maxNewTokens: s.maxNewTokens,
    trainTokensPerStep: s.trainTokensPerStep,
    checkpointing: true,
  };
}

export function planFor(config: LlamaConfig, s: PlanSettings, limits: { maxBufferSize: number; maxStorageBufferBindingSize: number }): MemoryPlan {
  return planMemory(config, runShape(s), limits);
}

/**
 * The memory check before a run: the run's peak probed on the device (what this page
 * already holds on it, the loaded weights and pooled buffers, counts towards the peak).
 * When it does not fit, `message` names the largest settings that do.
 */
export function checkRunFits(gpu: Gpu, config: LlamaConfig, trainer: TrainerConfig, format: WeightFormat): Promise<MemoryCheck> {
  const run = runShape(planSettingsFor(trainer, format));
  const held = gpu.stats().allocatedBytes;
  const limits = { maxBufferSize: gpu.caps.maxBufferSize, maxStorageBufferBindingSize: gpu.caps.maxStorageBufferBindingSize };
  const peak = planMemory(config, run, limits).total;
  return checkRunMemory(gpu.device, config, { run, microBatch: trainer.microBatch }, limits, Math.min(held, peak));
}

const DTYPE_BYTES: Record<string, number> = { bfloat16: 2, float16: 2, float32: 4 };

export function parameterCount(config: LlamaConfig): number {
  let n = 0;
  for (const shape of llamaTensorShapes(config).values()) n += shape.reduce((a, b) => a * b, 1);
  return n;
}

/** Bytes to download: a known model's files as the picker lists them, else parameters times the checkpoint's dtype size. */
export function downloadBytes(config: LlamaConfig, model?: ModelChoice): number {
  const known = model?.kind === 'hub' ? knownModel(model.id) : null;
  if (known) return known.downloadBytes;
  return parameterCount(config) * (DTYPE_BYTES[config.torchDtype ?? 'bfloat16'] ?? 2);
}
