/**
 * ONNX model folders in the transformers.js layout, written from a safetensors
 * checkpoint folder (the tiny model) into a temporary directory for the peer tests
 * and the peer benchmark.
 */
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { parseLlamaConfig, type LlamaConfig } from '../../src/formats/llama-config';
import { llamaOnnxFolder, type LlamaOnnxOptions } from '../../src/formats/onnx-llama';
import { parseSafetensors, toF32 } from '../../src/formats/safetensors';
import type { Q4Packed } from '../../src/kernels/q4.ref';

export const MODEL_TEXT_FILES = ['generation_config.json', 'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json'];

/** Writes files (name -> bytes or text, names may hold one folder level such as onnx/) under dir. */
export async function writeFolder(dir: string, files: Record<string, Uint8Array | string>): Promise<void> {
  for (const [name, data] of Object.entries(files)) {
    const path = join(dir, name);
    await mkdir(dirname(path), { recursive: true });
    await writeFile(path, data);
  }
}

export interface CheckpointValues {
  configJson: Record<string, unknown>;
  config: LlamaConfig;
  textFiles: Record<string, string>;
  values: (name: string) => Float32Array;
}

/** A safetensors model folder read into memory (tensors widened to f32 on request). */
export async function readCheckpoint(dir: string): Promise<CheckpointValues> {
  const configJson = JSON.parse(await readFile(join(dir, 'config.json'), 'utf8')) as Record<string, unknown>;
  const config = parseLlamaConfig(configJson, 'config.json');
  const st = parseSafetensors(new Uint8Array(await readFile(join(dir, 'model.safetensors'))), 'model.safetensors');
  const textFiles: Record<string, string> = {};
  for (const f of MODEL_TEXT_FILES) textFiles[f] = await readFile(join(dir, f), 'utf8');
  const values = (name: string): Float32Array => {
    const t = st.tensor(name);
    return toF32(t.dtype, t.data, name);
  };
  return { configJson, config, textFiles, values };
}

/** Writes `<outDir>` as a transformers.js model folder of the checkpoint; returns the onnx file's path inside it. */
export async function writeOnnxFolder(
  ckpt: CheckpointValues,
  outDir: string,
  options: LlamaOnnxOptions,
  quantized?: (name: string) => Q4Packed | null,
): Promise<string[]> {
  const files = llamaOnnxFolder(ckpt.configJson, ckpt.textFiles, ckpt.config, ckpt.values, options, quantized);
  await writeFolder(outDir, files);
  return Object.keys(files);
}
