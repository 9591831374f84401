/**
 * Loads a Hugging Face Llama checkpoint (config.json, generation_config.json,
 * model.safetensors or shards + model.safetensors.index.json; BF16, F16 or F32) onto
 * the GPU as LlamaWeights.
 *
 * Everything is checked before anything is uploaded: the config, every tensor's
 * presence, shape and dtype, and the shard index against the shard headers. Then the
 * tensors stream in file order, a row chunk (at most maxChunkBytes) at a time, so JS
 * memory holds about one chunk whatever the checkpoint's size:
 *   q4:  raw 16-bit (or f32) rows go into a GPU staging buffer and are quantized there
 *        (quantizeQ4); tensors larger than the staging buffer are quantized in row
 *        blocks and copied into the weight's shards. All seven projections per layer
 *        and the embedding (the LM head too when untied) are 4-bit; norms stay f32.
 *   f32: rows are widened to f32 on the CPU and written in place (tests, the oracle).
 * Every tensor's NaN and infinities are counted as it passes (by the quantize kernel,
 * or on the CPU chunks widened to f32; nonfinite.ts) and read back once at the end: a
 * damaged checkpoint is refused naming the file and the first bad tensor, the score
 * head of a reward model included.
 *
 * With a ModelCache, a cached entry is loaded without touching the source; otherwise
 * the loaded weights are read back and stored for next time. An ONNX export is cached
 * as its files (downloaded once, byte for byte, straight into the cache) and loaded
 * from there. An AbortSignal cancels a load between reads; whatever it had stored of
 * the model is removed and the cache's other entries are untouched.
 */
import { packDecodeProjections } from './pack';
import { FormatError, isPlainObject, show } from '../formats/errors';
import { checkLlamaTensors, llamaTensorShapes, parseLlamaConfig, type LlamaConfig } from '../formats/llama-config';
import {
  DTYPE_SIZE,
  checkShards,
  openSafetensors,
  parseShardIndex,
  toF32,
  type SafetensorsFile,
  type SafetensorsHeader,
  type TensorInfo,
} from '../formats/safetensors';
import type { Gpu } from '../gpu/gpu';
import type { Tensor } from '../gpu/tensor';
import { f32Linear, q4Linear, type FrozenLinear } from '../kernels/linear';
import { q4Pieces } from '../kernels/q4';
import { Q4_BLOCK_BYTES, q4Blocks, q4ShardRows, type Q4Shard, type Q4Weight } from '../kernels/q4-layout';
import { quantizeQ4, type Q4SourceType } from '../kernels/quantize';
import { ropeInvFreq } from '../kernels/rope';
import { NonFiniteCheck } from './nonfinite';
import {
  CACHE_FORMAT_VERSION,
  ModelCacheError,
  cachedModelSource,
  modelCacheKey,
  tensorFiles,
  type CacheFile,
  type CacheManifest,
  type CachedEntry,
  type CachedTensor,
  type ModelCache,
} from './cache';
import {
  cancellableFile,
  cancellableSource,
  closeFile,
  isLoadCancelled,
  loadCancelledError,
  throwIfCancelled,
  type ModelFile,
  type ModelSource,
} from './source';
import type { EmbeddingTable, LayerWeights, LlamaWeights, WeightFormat } from './weights';

export interface LoadProgress {
  /** 'weights': reading the checkpoint; 'cache-read' / 'cache-write': the model cache */
  phase: 'weights' | 'cache-read' | 'cache-write';
  file: string;
  tensor: string | null;
  bytesDone: number;
  bytesTotal: number;
}

export interface LoadOptions {
  format: WeightFormat;
  onProgress?(p: LoadProgress): void;
  /** Largest read from the source (and from the cache) in bytes; default 16 MiB. */
  maxChunkBytes?: number;
  /** Largest GPU staging buffer for raw rows before quantization; default 256 MiB (capped by the device). */
  maxStagingBytes?: number;
  /** Largest buffer of one 4-bit shard; default the device's storage binding limit. */
  maxShardBytes?: number;
  /** 4-bit zero points (asymmetric blocks); default true. */
  q4Zeros?: boolean;
  /** Load from here when the model is cached; store it here after a load from the source. */
  cache?: ModelCache | null;
  /** Load this ONNX decoder (e.g. "onnx/model_q4.onnx") with the ONNX importer (onnx-load.ts). Without it, ONNX is used when the source holds onnx/model*.onnx and no safetensors. */
  onnxFile?: string;
  /** ONNX, format q4: the largest dense embedding (bytes as f32) kept unquantized; default 256 MiB (onnx-load.ts). */
  denseEmbeddingMaxBytes?: number;
  /** Cancels the load: it ends with an AbortError (isLoadCancelled) and stores nothing partial. */
  signal?: AbortSignal;
  /**
   * Format q4, safetensors: stack each layer's q/k/v and gate/up weights into one weight
   * each for the fused decode GEMVs (pack.ts); default false until ONNX imports (whose
   * projections may be views of one fused weight) and the load tests that read each
   * projection's own buffers handle packed weights.
   */
  packDecode?: boolean;
}

/** Sampling defaults from generation_config.json, falling back to config.json's token ids. */
export interface GenerationDefaults {
  eosTokenIds: number[];
  bosTokenId: number | null;
  padTokenId: number | null;
  doSample?: boolean;
  temperature?: number;
  topP?: number;
  topK?: number;
}

export interface LoadedModel {
  weights: LlamaWeights;
  generation: GenerationDefaults;
  /** ModelSource.name of where the model came from */
  sourceName: string;
  /** The model's files (tokenizer, config): the source itself, or the cache entry when loaded from it. */
  files: ModelSource;
  fromCache: boolean;
  /** Why the cache could not be used: a damaged entry (dropped, then loaded from the source) or a failed store (e.g. storage full); the model loaded regardless. Null when all went well. */
  cacheError: Error | null;
  /** Checkpoint tensors the model does not use. */
  unusedTensors: string[];
}

export const DEFAULT_MAX_CHUNK_BYTES = 16 << 20;
export const DEFAULT_MAX_STAGING_BYTES = 256 << 20;

/** Small files kept with a cached model so it (and its tokenizer) load offline. */
export const MODEL_TEXT_FILES = ['config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json'];

const SUPPORTED_DTYPES = new Set(['BF16', 'F16', 'F32']);
const HINT_MISMATCH = 'Check that config.json and the weights come from the same model, and that every file downloaded completely.';

// ---------------------------------------------------------------------------------
// Entry point

/** Cache keys a source may be stored under, in the order loadLlama tries them: quantized tensors, then an ONNX export's files. */
export function modelCacheKeys(source: Pick<ModelSource, 'name' | 'revision'>, options: Pick<LoadOptions, 'format' | 'q4Zeros' | 'onnxFile'>): string[] {
  const cacheFormat = options.format === 'q4' && !(options.q4Zeros ?? true) ? 'q4-symmetric' : options.format;
  const onnx = modelCacheKey(source.name, source.revision, options.onnxFile !== undefined ? `onnx-${options.onnxFile}` : 'onnx');
  return options.onnxFile !== undefined ? [onnx] : [modelCacheKey(source.name, source.revision, cacheFormat), onnx];
}

/** The complete cache entry loadLlama would load the source from, or null (reads nothing from the source). */
export async function findCachedModel(cache: ModelCache, source: Pick<ModelSource, 'name' | 'revision'>, options: Pick<LoadOptions, 'format' | 'q4Zeros' | 'onnxFile'>): Promise<CachedEntry | null> {
  for (const key of modelCacheKeys(source, options)) {
    const entry = await cache.get(key);
    if (entry) return entry;
  }
  return null;
}

/**
 * Loads a Llama checkpoint (safetensors or ONNX, from the source or the cache) onto the
 * GPU. With packDecode, 4-bit weights are then packed for the fused decode step, after
 * the cache has its copy (packing replaces the per-projection weights with row views).
 */
export async function loadLlama(gpu: Gpu, source: ModelSource, options: LoadOptions): Promise<LoadedModel> {
  const model = await loadLlamaWeights(gpu, source, options);
  if (options.format === 'q4' && options.packDecode) packDecodeProjections(gpu, model.weights);
  return model;
}

async function loadLlamaWeights(gpu: Gpu, source: ModelSource, options: LoadOptions): Promise<LoadedModel> {
  const format = options.format;
  if (format !== 'q4' && format !== 'f32') throw new Error(`loadLlama: unknown format ${show(format)} (use "q4" or "f32")`);
  const signal = options.signal ?? null;
  throwIfCancelled(signal);
  if (signal) source = cancellableSource(source, signal);
  const zeros = options.q4Zeros ?? true;
  const cacheFormat = format === 'q4' && !zeros ? 'q4-symmetric' : format;
  const keys = modelCacheKeys(source, options);
  const key = keys[0]!;
  const onnxKey = keys[keys.length - 1]!;
  let cacheError: Error | null = null;
  if (options.cache) {
    for (const k of keys) {
      const found = await options.cache.get(k);
      if (!found) continue;
      const entry = signal ? cancellableEntry(found, signal) : found;
      try {
        return found.manifest.format === 'onnx' ? await loadOnnxFromCache(gpu, entry, options, true) : await loadFromCache(gpu, entry, options);
      } catch (e) {
        // A damaged entry is dropped and the model loads from its source instead.
        if (!(e instanceof FormatError || e instanceof ModelCacheError)) throw e;
        cacheError = e;
        await options.cache.delete(k);
      }
    }
  }
  if (await usesOnnx(source, options)) {
    const model = await loadOnnx(gpu, source, onnxKey, options);
    model.cacheError ??= cacheError;
    return model;
  }
  const { model, byName } = await loadFromSource(gpu, source, options);
  model.cacheError = cacheError;
  if (options.cache) {
    try {
      await storeInCache(gpu, options.cache, key, cacheFormat, source, byName, options);
    } catch (e) {
      // The put removed what it wrote; a cancelled load also gives back the weights.
      if (isLoadCancelled(e) || signal?.aborted) {
        model.weights.release();
        throw loadCancelledError();
      }
      model.cacheError = e as Error;
    }
  }
  return model;
}

/** An entry whose file reads stop once `signal` is aborted. */
function cancellableEntry(entry: CachedEntry, signal: AbortSignal): CachedEntry {
  return { manifest: entry.manifest, open: async (file) => cancellableFile(await entry.open(file), signal) };
}

// ---------------------------------------------------------------------------------
// ONNX exports: cached as their own files

/**
 * An ONNX decoder: with a cache, its files are copied into it as they are (the
 * decoder, its external data, the text files) and the model loads from the entry, so
 * the source is read once; without one (or when storing fails, e.g. storage full),
 * from the source.
 */
async function loadOnnx(gpu: Gpu, source: ModelSource, key: string, options: LoadOptions): Promise<LoadedModel> {
  const { loadLlamaOnnx, findOnnxModel } = await import('./onnx-load');
  const cache = options.cache;
  const fileName = options.onnxFile ?? (await findOnnxModel(source));
  if (!cache || !fileName) return loadLlamaOnnx(gpu, source, options);
  let storeError: Error | null = null;
  try {
    await storeOnnxFiles(cache, key, source, fileName, options);
  } catch (e) {
    if (isLoadCancelled(e) || options.signal?.aborted) throw loadCancelledError();
    // A source that cannot be read is the load's error; a store that failed is a note.
    if (e instanceof FormatError) throw e;
    storeError = e as Error;
  }
  if (storeError) {
    const model = await loadLlamaOnnx(gpu, source, options);
    model.cacheError = storeError;
    return model;
  }
  const stored = await cache.get(key);
  if (!stored) throw new ModelCacheError(`cache entry ${key} vanished right after it was stored`);
  try {
    const model = await loadOnnxFromCache(gpu, options.signal ? cancellableEntry(stored, options.signal) : stored, options, false);
    return { ...model, sourceName: source.name };
  } catch (e) {
    // An export the importer refuses is not kept (it would only fail again).
    if (e instanceof FormatError) await cache.delete(key);
    throw e;
  }
}

/** Copies the export's files from the source into the cache entry `key`, in reads of at most maxChunkBytes. */
async function storeOnnxFiles(cache: ModelCache, key: string, source: ModelSource, fileName: string, options: LoadOptions): Promise<void> {
  const { onnxExternalFiles } = await import('./onnx-load');
  // The config first: a wrong or inaccessible model fails before the download.
  await readModelConfigs(source);
  const maxChunk = options.maxChunkBytes ?? DEFAULT_MAX_CHUNK_BYTES;
  const texts: [string, Uint8Array][] = [];
  for (const f of MODEL_TEXT_FILES) {
    if (await source.has(f)) texts.push([f, new TextEncoder().encode(await source.readText(f))]);
  }
  const main = await source.open(fileName);
  let decoder: Uint8Array;
  try {
    decoder = await main.read(0, main.size);
  } finally {
    await closeFile(main);
  }
  const external = onnxExternalFiles(decoder, fileName);
  const opened: ModelFile[] = [];
  try {
    for (const name of external) opened.push(await source.open(name));
    const config = JSON.parse(new TextDecoder().decode(texts.find(([n]) => n === 'config.json')![1])) as unknown;
    const files = [
      ...texts.map(([name, b]) => ({ name, size: b.length })),
      { name: fileName, size: decoder.length },
      ...opened.map((f, i) => ({ name: external[i]!, size: f.size })),
    ];
    const manifest: CacheManifest = {
      version: CACHE_FORMAT_VERSION,
      key,
      source: source.name,
      revision: source.revision,
      format: 'onnx',
      onnxFile: fileName,
      createdAt: new Date().toISOString(),
      config,
      tensors: [],
      files,
      bytes: files.reduce((a, f) => a + f.size, 0),
    };
    let done = 0;
    const progress = (file: string, n: number): void => {
      done += n;
      options.onProgress?.({ phase: 'weights', file, tensor: null, bytesDone: done, bytesTotal: manifest.bytes });
    };
    async function* chunks(f: ModelFile, name: string): AsyncGenerator<Uint8Array> {
      for (let at = 0; at < f.size; at += maxChunk) {
        const bytes = await f.read(at, Math.min(maxChunk, f.size - at));
        progress(name, bytes.length);
        yield bytes;
      }
    }
    async function* all(): AsyncGenerator<CacheFile> {
      for (const [name, bytes] of texts) {
        progress(name, bytes.length);
        yield { name, parts: [bytes] };
      }
      progress(fileName, decoder.length);
      yield { name: fileName, parts: [decoder] };
      for (const [i, f] of opened.entries()) yield { name: external[i]!, parts: chunks(f, external[i]!) };
    }
    await cache.put(key, manifest, all());
  } finally {
    await Promise.all(opened.map(closeFile));
  }
}

/** Loads a cached ONNX export through the importer, reading only the entry. */
async function loadOnnxFromCache(gpu: Gpu, entry: CachedEntry, options: LoadOptions, fromCache: boolean): Promise<LoadedModel> {
  const { loadLlamaOnnx } = await import('./onnx-load');
  const { manifest } = entry;
  const onnxFile = manifest.onnxFile;
  if (typeof onnxFile !== 'string') {
    throw new FormatError(`cached ${manifest.source}`, null, 'is an ONNX entry that names no decoder file', 'Delete the cached model and load it again from its source.');
  }
  const files = cachedModelSource(entry);
  const onProgress = options.onProgress;
  const model = await loadLlamaOnnx(gpu, files, {
    ...options,
    onnxFile,
    onProgress: onProgress && ((p) => onProgress({ ...p, phase: fromCache ? 'cache-read' : p.phase })),
  });
  return { ...model, sourceName: manifest.source, files, fromCache };
}

/** ONNX when asked for, or when the source holds an ONNX decoder and no safetensors weights. */
async function usesOnnx(source: ModelSource, options: LoadOptions): Promise<boolean> {
  if (options.onnxFile !== undefined) return true;
  // config.json first: access errors (gated, private) and a missing config are reported on it.
  if (!(await source.has('config.json'))) return false;
  if ((await source.has('model.safetensors')) || (await source.has('model.safetensors.index.json'))) return false;
  const { findOnnxModel } = await import('./onnx-load');
  return (await findOnnxModel(source)) !== null;
}

// ---------------------------------------------------------------------------------
// Config and generation config

/** generation_config.json (optional) over config.json's token ids. */
export function parseGenerationConfig(json: unknown, config: LlamaConfig, fileName = 'generation_config.json'): GenerationDefaults {
  const out: GenerationDefaults = { eosTokenIds: config.eosTokenIds.slice(), bosTokenId: config.bosTokenId, padTokenId: config.padTokenId };
  if (json === null || json === undefined) return out;
  if (!isPlainObject(json)) throw new FormatError(fileName, null, 'is not a JSON object', "Use the model's original generation_config.json.");
  const fail = (field: string, v: unknown, want: string): never => {
    throw new FormatError(fileName, field, `is ${show(v)}, expected ${want}`, "Use the model's original generation_config.json.");
  };
  const id = (field: string, v: unknown): number =>
    typeof v === 'number' && Number.isSafeInteger(v) && v >= 0 && v < config.vocabSize ? v : fail(field, v, `a token id below ${config.vocabSize}`);
  const num = (field: string, min: number, max: number): number | undefined => {
    const v = json[field];
    if (v === undefined || v === null) return undefined;
    return typeof v === 'number' && Number.isFinite(v) && v >= min && v <= max ? v : fail(field, v, `a number in [${min}, ${max}]`);
  };
  const eos = json.eos_token_id;
  if (eos !== undefined && eos !== null) out.eosTokenIds = Array.isArray(eos) ? eos.map((v) => id('eos_token_id', v)) : [id('eos_token_id', eos)];
  if (json.bos_token_id !== undefined && json.bos_token_id !== null) out.bosTokenId = id('bos_token_id', json.bos_token_id);
  if (json.pad_token_id !== undefined && json.pad_token_id !== null) out.padTokenId = id('pad_token_id', json.pad_token_id);
  if (json.do_sample !== undefined) {
    if (typeof json.do_sample !== 'boolean') fail('do_sample', json.do_sample, 'true or false');
    out.doSample = json.do_sample as boolean;
  }
  const temperature = num('temperature', 0, 100);
  const topP = num('top_p', 0, 1);
  const topK = num('top_k', 0, config.vocabSize);
  if (temperature !== undefined) out.temperature = temperature;
  if (topP !== undefined) out.topP = topP;
  if (topK !== undefined) {
    if (!Number.isInteger(topK)) fail('top_k', topK, 'an integer');
    out.topK = topK;
  }
  return out;
}

/** config.json and generation_config.json of a source, checked (e.g. to plan memory before loading). */
export async function readModelConfigs(source: ModelSource): Promise<{ config: LlamaConfig; generation: GenerationDefaults }> {
  const config = parseLlamaConfig(await source.readJson('config.json'), 'config.json');
  const genJson = (await source.has('generation_config.json')) ? await source.readJson('generation_config.json') : null;
  return { config, generation: parseGenerationConfig(genJson, config) };
}

// ---------------------------------------------------------------------------------
// The checkpoint's tensors

interface CheckpointTensor {
  file: SafetensorsFile;
  info: TensorInfo;
}

interface Checkpoint {
  tensors: Map<string, CheckpointTensor>;
  files: ModelFile[];
  /** The file errors about the whole tensor list name (model.safetensors or the index). */
  listName: string;
}

async function openCheckpoint(source: ModelSource): Promise<Checkpoint> {
  const files: ModelFile[] = [];
  const tensors = new Map<string, CheckpointTensor>();
  try {
    if (await source.has('model.safetensors')) {
      const f = await source.open('model.safetensors');
      files.push(f);
      const st = await openSafetensors(f);
      for (const info of st.tensors.values()) tensors.set(info.name, { file: st, info });
      return { tensors, files, listName: 'model.safetensors' };
    }
    const indexName = 'model.safetensors.index.json';
    if (!(await source.has(indexName))) {
      throw new FormatError(
        source.name,
        null,
        'holds neither model.safetensors nor model.safetensors.index.json',
        'The lab reads safetensors weights (not .bin, .pth or .gguf): pick a repository or folder that has them.',
      );
    }
    const index = parseShardIndex(await source.readJson(indexName), indexName);
    const headers = new Map<string, SafetensorsHeader>();
    const opened = new Map<string, SafetensorsFile>();
    for (const shard of index.shards) {
      const f = await source.open(shard);
      files.push(f);
      const st = await openSafetensors(f);
      headers.set(shard, st.header);
      opened.set(shard, st);
    }
    checkShards(index, headers);
    for (const [name, shard] of index.weightMap) {
      const st = opened.get(shard)!;
      tensors.set(name, { file: st, info: st.info(name) });
    }
    return { tensors, files, listName: indexName };
  } catch (e) {
    await Promise.all(files.map(closeFile));
    throw e;
  }
}

/** Checks presence, shape and dtype of every tensor the model needs; returns the unused ones. */
function checkCheckpoint(config: LlamaConfig, ckpt: Checkpoint): string[] {
  const unused = checkLlamaTensors(config, [...ckpt.tensors].map(([n, t]) => [n, t.info.shape] as const), ckpt.listName);
  for (const name of llamaTensorShapes(config).keys()) {
    const t = ckpt.tensors.get(name)!;
    if (!SUPPORTED_DTYPES.has(t.info.dtype)) {
      throw new FormatError(
        t.file.name,
        `tensor ${JSON.stringify(name)}`,
        `has dtype ${t.info.dtype}; the lab loads BF16, F16 or F32 weights`,
        'Use the original (unquantized) checkpoint; GPTQ/AWQ/bitsandbytes exports are not supported.',
      );
    }
  }
  return unused;
}

/** Rows [rowStart, rowStart + rowCount) of a tensor in reads of at most maxBytes (rows kept multiples of `rowAlign`). */
async function* readRows(
  t: CheckpointTensor,
  rowStart: number,
  rowCount: number,
  maxBytes: number,
  rowAlign: number,
): AsyncGenerator<{ row: number; rows: number; data: Uint8Array }> {
  const { info, file } = t;
  const totalRows = info.shape[0] ?? 1;
  const rowBytes = info.byteLength / totalRows;
  const fit = Math.max(1, Math.floor(maxBytes / rowBytes));
  const per = Math.max(rowAlign, fit - (fit % rowAlign));
  for (let r = rowStart; r < rowStart + rowCount; r += per) {
    const rows = Math.min(per, rowStart + rowCount - r);
    const length = rows * rowBytes;
    const data = await file.source.read(file.header.dataStart + info.begin + r * rowBytes, length);
    if (data.length !== length) {
      throw new FormatError(file.name, `tensor ${JSON.stringify(info.name)}`, `read returned ${data.length} of ${length} bytes`, HINT_MISMATCH);
    }
    yield { row: r, rows, data };
  }
}

// ---------------------------------------------------------------------------------
// GPU placement

/** A loaded tensor: 4-bit (sharded) or f32. */
type GpuTensor = { kind: 'q4'; w: Q4Weight } | { kind: 'f32'; t: Tensor };

/** Shared state of one load: allocations (released on failure) and progress. */
class Loader {
  readonly owned: Tensor[] = [];
  bytesDone = 0;
  bytesTotal = 0;
  readonly maxChunk: number;
  readonly maxStaging: number;
  readonly maxShard: number;
  readonly zeros: boolean;
  /** Counts the tensors' non-finite values as they pass (loads from the source; nonfinite.ts). */
  finite: NonFiniteCheck | null = null;

  constructor(
    readonly gpu: Gpu,
    readonly options: LoadOptions,
  ) {
    const deviceMax = Math.min(gpu.caps.maxBufferSize, gpu.caps.maxStorageBufferBindingSize);
    this.maxChunk = options.maxChunkBytes ?? DEFAULT_MAX_CHUNK_BYTES;
    if (!(this.maxChunk >= 1) || !Number.isSafeInteger(this.maxChunk)) throw new RangeError(`loadLlama: maxChunkBytes must be a positive integer, got ${this.maxChunk}`);
    this.maxStaging = Math.min(options.maxStagingBytes ?? DEFAULT_MAX_STAGING_BYTES, deviceMax);
    this.maxShard = Math.min(options.maxShardBytes ?? gpu.caps.maxStorageBufferBindingSize, deviceMax);
    this.zeros = options.q4Zeros ?? true;
  }

  own(t: Tensor): Tensor {
    this.owned.push(t);
    return t;
  }

  progress(phase: LoadProgress['phase'], file: string, tensor: string | null, bytes: number): void {
    this.bytesDone += bytes;
    this.options.onProgress?.({ phase, file, tensor, bytesDone: this.bytesDone, bytesTotal: this.bytesTotal });
  }

  releaseAll(): void {
    for (const t of this.owned) if (!t.isReleased) t.release();
    this.owned.length = 0;
  }

  /** Empty shards for W [M, K] laid out as quantizeQ4 would (q4ShardRows). */
  allocQ4(M: number, K: number, label: string): Q4Weight {
    const nb = q4Blocks(K);
    const zb = Math.ceil(nb / 2);
    const rowsPer = q4ShardRows(M, K, this.maxShard);
    const shards: Q4Shard[] = [];
    for (let r0 = 0; r0 < M; r0 += rowsPer) {
      const rows = Math.min(rowsPer, M - r0);
      shards.push({
        rowStart: r0,
        rows,
        qweight: this.own(this.gpu.empty([rows * nb * 4], 'u32', `${label}.qweight`)),
        scales: this.own(this.gpu.empty([Math.ceil((rows * nb) / 2)], 'u32', `${label}.scales`)),
        zeros: this.zeros ? this.own(this.gpu.empty([Math.ceil((rows * zb) / 4)], 'u32', `${label}.zeros`)) : null,
      });
    }
    return { M, K, nb, shards };
  }

  /** Refuses clearly when the device cannot hold an f32 tensor of `shape` in one buffer. */
  checkF32(shape: readonly number[], label: string): void {
    const bytes = shape.reduce((a, b) => a * b, 4);
    const limit = Math.min(this.gpu.caps.maxBufferSize, this.gpu.caps.maxStorageBufferBindingSize);
    if (bytes > limit) {
      throw new Error(`${label}: format "f32" needs ${bytes} bytes in one buffer but this device allows ${limit}; load the model with format "q4".`);
    }
  }

  allocF32(shape: number[], label: string): Tensor {
    this.checkF32(shape, label);
    return this.own(this.gpu.empty(shape, 'f32', label));
  }
}

/** Streams a checkpoint tensor into a new f32 tensor, widening on the CPU chunk by chunk. */
async function uploadF32(ld: Loader, name: string, t: CheckpointTensor): Promise<Tensor> {
  const shape = t.info.shape;
  const out = ld.allocF32(shape, name);
  const rowElems = shape.slice(1).reduce((a, b) => a * b, 1);
  const rows = shape[0] ?? 1;
  for await (const c of readRows(t, 0, rows, ld.maxChunk, 1)) {
    const f = toF32(t.info.dtype, c.data, `${t.file.name}, tensor ${JSON.stringify(name)}`);
    ld.finite?.scan(t.file.name, name, out.size, f);
    ld.gpu.write(out, f, c.row * rowElems * 4);
    ld.progress('weights', t.file.name, name, c.data.length);
  }
  return out;
}

/**
 * Streams W [M, K] into the GPU and quantizes it there. Rows go through one staging
 * buffer of raw values; a tensor that fits it is quantized in one pass, a larger one
 * (the embedding of a big vocabulary) in row blocks, each copied into its rows of the
 * final shards.
 */
async function uploadQ4(ld: Loader, name: string, t: CheckpointTensor): Promise<Q4Weight> {
  const { gpu } = ld;
  const [M, K] = t.info.shape as [number, number];
  const srcType: Q4SourceType = t.info.dtype === 'BF16' ? 'bf16' : t.info.dtype === 'F16' ? 'f16' : 'f32';
  const rowBytes = K * DTYPE_SIZE[t.info.dtype];
  // Row chunks stay multiples of 4 bytes (GPU writes) and of 8 rows (shard alignment).
  const rowAlign = rowBytes % 4 === 0 ? 1 : 2;
  let blockRows = Math.floor(ld.maxStaging / rowBytes);
  if (blockRows >= M) blockRows = M;
  else blockRows -= blockRows % 8;
  if (blockRows < 1) throw new Error(`${name}: one row of ${rowBytes} bytes does not fit a ${ld.maxStaging}-byte staging buffer`);
  const staging = gpu.empty([Math.ceil((blockRows * rowBytes) / 4)], 'u32', 'load.staging');
  try {
    // The quantize kernel counts NaN and infinities as it reads the rows (nonfinite.ts).
    const opts = { srcType, zeros: ld.zeros, maxShardBytes: ld.maxShard, nonFinite: ld.finite?.gpuSlot(t.file.name, name, M * K) };
    if (blockRows === M) {
      await stageRows(ld, name, t, staging, 0, M, rowAlign);
      const w = quantizeQ4(gpu, staging, M, K, opts);
      for (const s of w.shards) for (const b of [s.qweight, s.scales, s.zeros]) if (b) ld.own(b);
      return w;
    }
    const w = ld.allocQ4(M, K, name);
    for (let r0 = 0; r0 < M; r0 += blockRows) {
      const rows = Math.min(blockRows, M - r0);
      await stageRows(ld, name, t, staging, r0, rows, rowAlign);
      const block = quantizeQ4(gpu, staging, rows, K, opts);
      copyQ4Rows(gpu, w, r0, block);
      for (const s of block.shards) for (const b of [s.qweight, s.scales, s.zeros]) b?.release();
    }
    return w;
  } finally {
    staging.release();
  }
}

async function stageRows(ld: Loader, name: string, t: CheckpointTensor, staging: Tensor, r0: number, rows: number, rowAlign: number): Promise<void> {
  const rowBytes = t.info.byteLength / t.info.shape[0]!;
  for await (const c of readRows(t, r0, rows, ld.maxChunk, rowAlign)) {
    ld.gpu.write(staging, c.data, (c.row - r0) * rowBytes);
    ld.progress('weights', t.file.name, name, c.data.length);
  }
}

/**
 * Copies a quantized row block (rows dstRow0 .. of W) into W's shards. Block and shard
 * boundaries are multiples of 8 rows, so every offset is 4-byte aligned and only the
 * tensor's last piece has a ragged end (covered by the buffers' 4-byte padding).
 */
function copyQ4Rows(gpu: Gpu, dst: Q4Weight, dstRow0: number, block: Q4Weight): void {
  const nb = dst.nb;
  const zb = Math.ceil(nb / 2);
  const pad4 = (n: number): number => Math.ceil(n / 4) * 4;
  for (const s of block.shards) {
    for (const pc of q4Pieces(dst, dstRow0 + s.rowStart, s.rows)) {
      const from = pc.offset;
      const to = pc.local;
      gpu.copy(s.qweight, pc.shard.qweight, pc.rows * nb * Q4_BLOCK_BYTES, from * nb * Q4_BLOCK_BYTES, to * nb * Q4_BLOCK_BYTES);
      gpu.copy(s.scales, pc.shard.scales, pad4(pc.rows * nb * 2), from * nb * 2, to * nb * 2);
      if (s.zeros && pc.shard.zeros) gpu.copy(s.zeros, pc.shard.zeros, pad4(pc.rows * zb), from * zb, to * zb);
    }
  }
}

/** The frozen linear weights of the model: which tensors are 4-bit in format q4 (norms and the score head stay f32). */
export function isQuantizedTensor(name: string): boolean {
  return name === 'model.embed_tokens.weight' || name === 'lm_head.weight' || /\.(q|k|v|o|gate|up|down)_proj\.weight$/.test(name);
}

/** Builds LlamaWeights from loaded tensors by name (shared by the source and cache paths). */
function assemble(config: LlamaConfig, format: WeightFormat, byName: Map<string, GpuTensor>, ld: Loader): LlamaWeights {
  const get = (name: string): GpuTensor => {
    const t = byName.get(name);
    if (!t) throw new Error(`loadLlama: tensor ${name} was not loaded`);
    return t;
  };
  const f32 = (name: string): Tensor => {
    const t = get(name);
    if (t.kind !== 'f32') throw new Error(`loadLlama: ${name} should be f32`);
    return t.t;
  };
  const linear = (name: string): FrozenLinear => {
    const t = get(name);
    if (t.kind === 'q4') return q4Linear(t.w);
    const [M, K] = t.t.shape as [number, number];
    return f32Linear(t.t, M, K);
  };
  const embedT = get('model.embed_tokens.weight');
  const embed: EmbeddingTable = embedT.kind === 'q4' ? { format: 'q4', table: embedT.w } : { format: 'f32', table: embedT.t };
  const layers: LayerWeights[] = [];
  for (let l = 0; l < config.numLayers; l++) {
    const p = `model.layers.${l}`;
    layers.push({
      inputNorm: f32(`${p}.input_layernorm.weight`),
      q: linear(`${p}.self_attn.q_proj.weight`),
      k: linear(`${p}.self_attn.k_proj.weight`),
      v: linear(`${p}.self_attn.v_proj.weight`),
      o: linear(`${p}.self_attn.o_proj.weight`),
      postNorm: f32(`${p}.post_attention_layernorm.weight`),
      gate: linear(`${p}.mlp.gate_proj.weight`),
      up: linear(`${p}.mlp.up_proj.weight`),
      down: linear(`${p}.mlp.down_proj.weight`),
    });
  }
  // A sequence classifier has no LM head; the embedding serves if one is asked for.
  const untied = config.architecture === 'LlamaForCausalLM' && !config.tieWordEmbeddings;
  const lmHead = untied ? linear('lm_head.weight') : linear('model.embed_tokens.weight');
  const score = config.architecture === 'LlamaForSequenceClassification' ? f32('score.weight') : null;
  const invFreq = ld.own(ld.gpu.upload(ropeInvFreq(config.headDim, config.ropeTheta, config.ropeScaling), [config.headDim / 2], 'f32', 'rope.invFreq'));
  const owned = ld.owned.slice();
  let released = false;
  return {
    config,
    format,
    embed,
    layers,
    finalNorm: f32('model.norm.weight'),
    lmHead,
    score,
    invFreq,
    bytes: owned.reduce((a, t) => a + t.buffer.size, 0),
    release() {
      if (released) return;
      released = true;
      for (const t of owned) if (!t.isReleased) t.release();
    },
  };
}

// ---------------------------------------------------------------------------------
// From the source

async function loadFromSource(gpu: Gpu, source: ModelSource, options: LoadOptions): Promise<{ model: LoadedModel; byName: Map<string, GpuTensor> }> {
  const { config, generation } = await readModelConfigs(source);
  const ckpt = await openCheckpoint(source);
  const ld = new Loader(gpu, options);
  try {
    const unusedTensors = checkCheckpoint(config, ckpt);
    const needed = [...llamaTensorShapes(config).keys()].map((name) => [name, ckpt.tensors.get(name)!] as const);
    ld.finite = new NonFiniteCheck(gpu, needed.length);
    for (const [name, t] of needed) {
      if (!(options.format === 'q4' && isQuantizedTensor(name))) ld.checkF32(t.info.shape, name);
    }
    // File order, then data order: sequential reads from disk or the network.
    const fileOrder = new Map(ckpt.files.map((f, i) => [f.name, i]));
    needed.sort(([, a], [, b]) => fileOrder.get(a.file.name)! - fileOrder.get(b.file.name)! || a.info.begin - b.info.begin);
    ld.bytesTotal = needed.reduce((a, [, t]) => a + t.info.byteLength, 0);
    const byName = new Map<string, GpuTensor>();
    for (const [name, t] of needed) {
      if (options.format === 'q4' && isQuantizedTensor(name)) byName.set(name, { kind: 'q4', w: await uploadQ4(ld, name, t) });
      else byName.set(name, { kind: 'f32', t: await uploadF32(ld, name, t) });
      // Bounds what the driver buffers for uploads, and surfaces GPU errors at the tensor that caused them.
      await gpu.sync();
    }
    // One readback for every tensor's count: names the first that holds a NaN or an infinity.
    await ld.finite.verify();
    const weights = assemble(config, options.format, byName, ld);
    await gpu.sync();
    const model: LoadedModel = { weights, generation, sourceName: source.name, files: source, fromCache: false, cacheError: null, unusedTensors };
    return { model, byName };
  } catch (e) {
    ld.releaseAll();
    throw e;
  } finally {
    ld.finite?.release();
    await Promise.all(ckpt.files.map(closeFile));
  }
}

// ---------------------------------------------------------------------------------
// Cache: one file per q4 part (qweight, scales, zeros: the packed layout of
// q4-layout.ts, rows in order) or per f32 tensor. Shards are not stored: the cached
// bytes are re-sharded for the loading device.

const Q4_PARTS = ['qweight', 'scales', 'zeros'] as const;
type Q4Part = (typeof Q4_PARTS)[number];

function q4PartRowBytes(nb: number, part: Q4Part): number {
  return part === 'qweight' ? nb * Q4_BLOCK_BYTES : part === 'scales' ? nb * 2 : Math.ceil(nb / 2);
}

function q4PartBuffer(s: Q4Shard, part: Q4Part): Tensor | null {
  return part === 'qweight' ? s.qweight : part === 'scales' ? s.scales : s.zeros;
}

/** Rows per transfer: a multiple of 8 (4-byte aligned offsets in every part), near maxBytes. */
function transferRows(rowBytes: number, maxBytes: number): number {
  const rows = Math.floor(maxBytes / rowBytes);
  return Math.max(8, rows - (rows % 8));
}

function describe(name: string, t: GpuTensor): CachedTensor {
  return t.kind === 'q4'
    ? { name, kind: 'q4', M: t.w.M, K: t.w.K, zeros: t.w.shards[0]!.zeros !== null }
    : { name, kind: 'f32', shape: [...t.t.shape] };
}

function fileSizes(c: CachedTensor): { name: string; size: number }[] {
  if (c.kind === 'f32') return [{ name: `${c.name}.f32`, size: c.shape.reduce((a, b) => a * b, 4) }];
  const nb = q4Blocks(c.K);
  return tensorFiles(c).map((name, i) => ({ name, size: q4PartRowBytes(nb, Q4_PARTS[i]!) * c.M }));
}

async function storeInCache(
  gpu: Gpu,
  cache: ModelCache,
  key: string,
  format: string,
  source: ModelSource,
  byName: Map<string, GpuTensor>,
  options: LoadOptions,
): Promise<void> {
  const maxChunk = options.maxChunkBytes ?? DEFAULT_MAX_CHUNK_BYTES;
  const texts: [string, Uint8Array][] = [];
  for (const f of MODEL_TEXT_FILES) {
    if (await source.has(f)) texts.push([f, new TextEncoder().encode(await source.readText(f))]);
  }
  const tensors = [...byName];
  const cached = tensors.map(([name, t]) => describe(name, t));
  const files = [...texts.map(([name, b]) => ({ name, size: b.length })), ...cached.flatMap(fileSizes)];
  const manifest: CacheManifest = {
    version: CACHE_FORMAT_VERSION,
    key,
    source: source.name,
    revision: source.revision,
    format,
    createdAt: new Date().toISOString(),
    config: JSON.parse(new TextDecoder().decode(texts.find(([n]) => n === 'config.json')![1])) as unknown,
    tensors: cached,
    files,
    bytes: files.reduce((a, f) => a + f.size, 0),
  };
  let done = 0;
  const progress = (file: string, tensor: string | null, n: number): void => {
    done += n;
    options.onProgress?.({ phase: 'cache-write', file, tensor, bytesDone: done, bytesTotal: manifest.bytes });
  };
  // Reads a GPU buffer back in pieces of at most about maxChunk bytes.
  async function* readBack(file: string, tensor: string, pieces: Iterable<[GPUBuffer, number, number]>): AsyncGenerator<Uint8Array> {
    for (const [buffer, offset, bytes] of pieces) {
      throwIfCancelled(options.signal);
      const data = new Uint8Array(await gpu.readBytes(buffer, offset, bytes));
      progress(file, tensor, bytes);
      yield data;
    }
  }
  function* f32Pieces(t: Tensor): Generator<[GPUBuffer, number, number]> {
    const total = t.size * 4;
    const step = Math.max(4, maxChunk - (maxChunk % 4));
    for (let at = 0; at < total; at += step) yield [t.buffer, at, Math.min(step, total - at)];
  }
  function* q4Pieces(w: Q4Weight, part: Q4Part): Generator<[GPUBuffer, number, number]> {
    const rowBytes = q4PartRowBytes(w.nb, part);
    const per = transferRows(rowBytes, maxChunk);
    for (const s of w.shards) {
      const b = q4PartBuffer(s, part)!;
      for (let r = 0; r < s.rows; r += per) yield [b.buffer, r * rowBytes, Math.min(per, s.rows - r) * rowBytes];
    }
  }
  async function* all(): AsyncGenerator<CacheFile> {
    for (const [name, bytes] of texts) {
      progress(name, null, bytes.length);
      yield { name, parts: [bytes] };
    }
    for (const [name, t] of tensors) {
      if (t.kind === 'f32') {
        yield { name: `${name}.f32`, parts: readBack(`${name}.f32`, name, f32Pieces(t.t)) };
        continue;
      }
      for (const part of Q4_PARTS) {
        if (part === 'zeros' && !t.w.shards[0]!.zeros) continue;
        yield { name: `${name}.${part}`, parts: readBack(`${name}.${part}`, name, q4Pieces(t.w, part)) };
      }
    }
  }
  await cache.put(key, manifest, all());
}

async function loadFromCache(gpu: Gpu, entry: CachedEntry, options: LoadOptions): Promise<LoadedModel> {
  const { manifest } = entry;
  const files = cachedModelSource(entry);
  const { config, generation } = await readModelConfigs(files);
  const ld = new Loader(gpu, options);
  const hint = 'Delete the cached model and load it again from its source.';
  try {
    const expected = llamaTensorShapes(config);
    const byName = new Map<string, GpuTensor>();
    ld.bytesTotal = manifest.files.reduce((a, f) => a + f.size, 0);
    for (const c of manifest.tensors) {
      const shape = expected.get(c.name);
      const got = c.kind === 'q4' ? [c.M, c.K] : c.shape;
      if (!shape || shape.length !== got.length || shape.some((d, i) => d !== got[i])) {
        throw new FormatError(`cached ${manifest.source}`, `tensor ${JSON.stringify(c.name)}`, `has shape ${show(got)} but config.json implies ${show(shape ?? null)}`, hint);
      }
      if ((c.kind === 'q4') !== (options.format === 'q4' && isQuantizedTensor(c.name))) {
        throw new FormatError(`cached ${manifest.source}`, `tensor ${JSON.stringify(c.name)}`, `is stored as ${c.kind}, which format ${options.format} does not use`, hint);
      }
      byName.set(c.name, c.kind === 'q4' ? { kind: 'q4', w: await q4FromCache(ld, entry, c) } : { kind: 'f32', t: await f32FromCache(ld, entry, c) });
      await gpu.sync();
    }
    for (const name of expected.keys()) {
      if (!byName.has(name)) throw new FormatError(`cached ${manifest.source}`, `tensor ${JSON.stringify(name)}`, 'is missing from the cache entry', hint);
    }
    const weights = assemble(config, options.format, byName, ld);
    await gpu.sync();
    return { weights, generation, sourceName: manifest.source, files, fromCache: true, cacheError: null, unusedTensors: [] };
  } catch (e) {
    ld.releaseAll();
    throw e;
  }
}

async function openCached(entry: CachedEntry, file: string, size: number): Promise<ModelFile> {
  const src = await entry.open(file);
  if (src.size !== size) {
    throw new FormatError(`cached ${entry.manifest.source}`, file, `holds ${src.size} bytes, expected ${size}`, 'Delete the cached model and load it again from its source.');
  }
  return src;
}

async function f32FromCache(ld: Loader, entry: CachedEntry, c: Extract<CachedTensor, { kind: 'f32' }>): Promise<Tensor> {
  const [{ name, size }] = fileSizes(c) as [{ name: string; size: number }];
  const out = ld.allocF32(c.shape, c.name);
  const src = await openCached(entry, name, size);
  const step = Math.max(4, ld.maxChunk - (ld.maxChunk % 4));
  for (let at = 0; at < size; at += step) {
    const bytes = await src.read(at, Math.min(step, size - at));
    ld.gpu.write(out, bytes, at);
    ld.progress('cache-read', name, c.name, bytes.length);
  }
  return out;
}

async function q4FromCache(ld: Loader, entry: CachedEntry, c: Extract<CachedTensor, { kind: 'q4' }>): Promise<Q4Weight> {
  if (c.zeros !== ld.zeros) throw new Error(`loadLlama: cached ${c.name} has zeros=${c.zeros}, asked for ${ld.zeros}`);
  const w = ld.allocQ4(c.M, c.K, c.name);
  const sizes = fileSizes(c);
  for (const [i, part] of Q4_PARTS.slice(0, sizes.length).entries()) {
    const { name, size } = sizes[i]!;
    const src = await openCached(entry, name, size);
    const rowBytes = q4PartRowBytes(w.nb, part);
    const per = transferRows(rowBytes, ld.maxChunk);
    for (const s of w.shards) {
      const b = q4PartBuffer(s, part)!;
      for (let r = 0; r < s.rows; r += per) {
        const rows = Math.min(per, s.rows - r);
        const bytes = await src.read((s.rowStart + r) * rowBytes, rows * rowBytes);
        ld.gpu.write(b, bytes, r * rowBytes);
        ld.progress('cache-read', name, c.name, bytes.length);
      }
    }
  }
  return w;
}
