/**
 * A cache of loaded models in origin storage, so the second load of a model reads
 * nothing from the network: the GPU-quantized tensors (packed 4-bit bytes, or f32) as
 * one file each, or (format "onnx") a pre-quantized ONNX export's files as they were
 * downloaded, the model's small text files (config, generation and tokenizer
 * files), and a JSON manifest written last. An entry without its manifest does not
 * exist: a put that fails part-way removes what it wrote.
 *
 * OpfsModelCache keeps entries in the browser's origin private file system;
 * MemoryModelCache keeps them in memory (Node tests, and a fallback).
 */
import { FormatError, isPlainObject } from '../formats/errors';
import { BlobSource, MemorySource, type ByteSource } from '../formats/safetensors';
import { fingerprint, type ModelSource } from './source';

/** Bumped whenever the stored layout changes; older entries are ignored. */
export const CACHE_FORMAT_VERSION = 1;

export const MANIFEST_FILE = 'manifest.json';

/** A tensor as stored: q4 as three files `<name>.qweight|.scales|.zeros`, f32 as `<name>.f32`. */
export type CachedTensor =
  | { name: string; kind: 'q4'; M: number; K: number; zeros: boolean }
  | { name: string; kind: 'f32'; shape: number[] };

export interface CacheManifest {
  version: number;
  key: string;
  /** ModelSource.name and .revision the entry was made from */
  source: string;
  revision: string | null;
  /** weight format, e.g. "q4"; "onnx": the export's own files, byte for byte */
  format: string;
  /** format "onnx": the decoder file among `files` (e.g. "onnx/model_q4f16.onnx") */
  onnxFile?: string;
  createdAt: string;
  /** the parsed config.json, for listings */
  config: unknown;
  tensors: CachedTensor[];
  /** every stored file but the manifest, in write order */
  files: { name: string; size: number }[];
  /** sum of the file sizes */
  bytes: number;
}

/** One file of a put: its bytes arrive as parts so a large tensor never sits in memory whole. */
export interface CacheFile {
  name: string;
  parts: AsyncIterable<Uint8Array> | Iterable<Uint8Array>;
}

export interface CachedEntry {
  manifest: CacheManifest;
  open(file: string): Promise<ByteSource>;
}

export interface ModelCache {
  /** The complete entry under `key`, or null. */
  get(key: string): Promise<CachedEntry | null>;
  /**
   * Stores an entry (replacing any old one): `files` must yield exactly
   * `manifest.files`, in that order and of those sizes. All or nothing.
   */
  put(key: string, manifest: CacheManifest, files: AsyncIterable<CacheFile> | Iterable<CacheFile>): Promise<void>;
  /** Manifests of the complete entries. */
  list(): Promise<CacheManifest[]>;
  delete(key: string): Promise<void>;
}

export class ModelCacheError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ModelCacheError';
  }
}

const MB = (n: number): string => `${(n / 1e6).toFixed(0)} MB`;

export function storageFullError(needed: number, detail = ''): ModelCacheError {
  return new ModelCacheError(
    `Storage full: caching this model needs ${MB(needed)} of browser storage${detail ? ` (${detail})` : ''}. ` +
      'Free space or delete cached models, then load again; the model itself loaded and works, it just will not load offline next time.',
  );
}

/** The cache key for a source, revision and weight format: safe as a file name. */
export function modelCacheKey(source: string, revision: string | null, format: string): string {
  const readable = `${source}@${revision ?? 'unversioned'}.${format}`.replace(/[^A-Za-z0-9._@-]+/g, '_').slice(0, 96);
  return `${readable}.v${CACHE_FORMAT_VERSION}-${fingerprint([source, revision ?? '', format])}`;
}

/** File names of a cached tensor. */
export function tensorFiles(t: CachedTensor): string[] {
  return t.kind === 'q4' ? [`${t.name}.qweight`, `${t.name}.scales`, ...(t.zeros ? [`${t.name}.zeros`] : [])] : [`${t.name}.f32`];
}

function checkManifest(json: unknown, key: string): CacheManifest | null {
  if (!isPlainObject(json) || json.version !== CACHE_FORMAT_VERSION || json.key !== key) return null;
  if (!Array.isArray(json.files) || !Array.isArray(json.tensors) || typeof json.format !== 'string') return null;
  return json as unknown as CacheManifest;
}

function checkPutArgs(key: string, manifest: CacheManifest): void {
  if (manifest.key !== key) throw new ModelCacheError(`cache put: manifest key ${manifest.key} differs from ${key}`);
  if (manifest.files.some((f) => f.name === MANIFEST_FILE)) throw new ModelCacheError(`cache put: ${MANIFEST_FILE} is reserved`);
}

/** Writes `files` through `write`, checking names and sizes against the manifest. */
async function writeAll(
  manifest: CacheManifest,
  files: AsyncIterable<CacheFile> | Iterable<CacheFile>,
  write: (name: string, parts: AsyncIterable<Uint8Array>, onBytes: (n: number) => void) => Promise<void>,
): Promise<void> {
  let i = 0;
  for await (const f of files) {
    const want = manifest.files[i++];
    if (!want || want.name !== f.name) {
      throw new ModelCacheError(`cache put: file ${i} is ${f.name} but the manifest lists ${want?.name ?? 'nothing more'}`);
    }
    let size = 0;
    await write(f.name, toAsync(f.parts), (n) => (size += n));
    if (size !== want.size) throw new ModelCacheError(`cache put: ${f.name} has ${size} bytes, the manifest says ${want.size}`);
  }
  if (i !== manifest.files.length) throw new ModelCacheError(`cache put: ${manifest.files.length - i} listed files were not given`);
}

async function* toAsync(parts: AsyncIterable<Uint8Array> | Iterable<Uint8Array>): AsyncGenerator<Uint8Array> {
  for await (const p of parts) yield p;
}

/** A cached entry's text files (config, tokenizer) as a ModelSource, so nothing else is read. */
export function cachedModelSource(entry: CachedEntry): ModelSource {
  const { manifest } = entry;
  const sizes = new Map(manifest.files.map((f) => [f.name, f.size]));
  const hint = 'Delete the cached model and load it again from its source.';
  /** A listed file of the listed size: anything else is a damaged entry. */
  const open = async (file: string): Promise<ByteSource> => {
    const want = sizes.get(file);
    if (want === undefined) throw new FormatError(file, null, `is not in the cached copy of ${manifest.source}`, hint);
    const src = await entry.open(file);
    if (src.size !== want) throw new FormatError(`cached ${manifest.source}`, file, `holds ${src.size} bytes, expected ${want}`, hint);
    return src;
  };
  const readText = async (file: string): Promise<string> => {
    const src = await open(file);
    return new TextDecoder().decode(await src.read(0, src.size));
  };
  return {
    name: manifest.source,
    revision: manifest.revision,
    has: (file) => Promise.resolve(sizes.has(file)),
    open,
    readText,
    readJson: async (file) => {
      const text = await readText(file);
      try {
        return JSON.parse(text) as unknown;
      } catch (e) {
        throw new FormatError(file, null, `cached copy is not valid JSON (${(e as Error).message})`, 'Delete the cached model and load it again.');
      }
    },
  };
}

// ---------------------------------------------------------------------------------
// In memory

export class MemoryModelCache implements ModelCache {
  private entries = new Map<string, { manifest: CacheManifest; files: Map<string, Uint8Array> }>();

  /** `capacityBytes` simulates a storage quota: a put that would exceed it fails. */
  constructor(readonly capacityBytes = Infinity) {}

  get usedBytes(): number {
    let n = 0;
    for (const e of this.entries.values()) n += e.manifest.bytes;
    return n;
  }

  get(key: string): Promise<CachedEntry | null> {
    const e = this.entries.get(key);
    if (!e) return Promise.resolve(null);
    return Promise.resolve({
      manifest: e.manifest,
      open: (file: string) => {
        const bytes = e.files.get(file);
        if (!bytes) return Promise.reject(new ModelCacheError(`cache entry ${key} has no file ${file}`));
        return Promise.resolve(new MemorySource(bytes, file));
      },
    });
  }

  async put(key: string, manifest: CacheManifest, files: AsyncIterable<CacheFile> | Iterable<CacheFile>): Promise<void> {
    checkPutArgs(key, manifest);
    const old = this.entries.get(key);
    const used = this.usedBytes - (old?.manifest.bytes ?? 0);
    if (used + manifest.bytes > this.capacityBytes) {
      throw storageFullError(manifest.bytes, `${MB(this.capacityBytes - used)} free`);
    }
    const stored = new Map<string, Uint8Array>();
    await writeAll(manifest, files, async (name, parts, onBytes) => {
      const chunks: Uint8Array[] = [];
      let size = 0;
      for await (const p of parts) {
        chunks.push(p.slice());
        size += p.length;
        onBytes(p.length);
      }
      const out = new Uint8Array(size);
      let at = 0;
      for (const c of chunks) {
        out.set(c, at);
        at += c.length;
      }
      stored.set(name, out);
    });
    this.entries.set(key, { manifest: structuredClone(manifest), files: stored });
  }

  list(): Promise<CacheManifest[]> {
    return Promise.resolve([...this.entries.values()].map((e) => e.manifest));
  }

  delete(key: string): Promise<void> {
    this.entries.delete(key);
    return Promise.resolve();
  }
}

// ---------------------------------------------------------------------------------
// Origin private file system

/** The parts of the File System Access API the cache uses (OPFS, Chrome 102+). */
export interface DirectoryHandleLike {
  getDirectoryHandle(name: string, options?: { create?: boolean }): Promise<DirectoryHandleLike>;
  getFileHandle(name: string, options?: { create?: boolean }): Promise<FileHandleLike>;
  removeEntry(name: string, options?: { recursive?: boolean }): Promise<void>;
  keys(): AsyncIterable<string>;
}

export interface FileHandleLike {
  getFile(): Promise<Blob>;
  createWritable(): Promise<WritableLike>;
}

export interface WritableLike {
  write(data: Uint8Array): Promise<void>;
  close(): Promise<void>;
  abort(reason?: unknown): Promise<void>;
}

export interface StorageEstimateLike {
  usage?: number;
  quota?: number;
}

const CACHE_DIR = 'selfplay-lab-models';

function isQuotaError(e: unknown): boolean {
  const err = e as { name?: string; code?: number } | null;
  return err?.name === 'QuotaExceededError' || err?.code === 22;
}

function isNotFound(e: unknown): boolean {
  const err = e as { name?: string } | null;
  return err?.name === 'NotFoundError' || err?.name === 'TypeMismatchError';
}

/**
 * A stored file's name as one OPFS entry name: OPFS refuses "/" (an ONNX export's
 * "onnx/model_q4.onnx"), so it is escaped, with "%" escaped first to keep names distinct.
 */
export function opfsFileName(file: string): string {
  return file.replace(/%/g, '%25').replace(/\//g, '%2F');
}

export class OpfsModelCache implements ModelCache {
  constructor(
    private readonly root: DirectoryHandleLike,
    private readonly estimate: () => Promise<StorageEstimateLike> = () => Promise.resolve({}),
  ) {}

  /** The cache in this origin's private file system (navigator.storage.getDirectory()). */
  static async open(): Promise<OpfsModelCache> {
    const storage = typeof navigator !== 'undefined' ? navigator.storage : undefined;
    if (!storage?.getDirectory) {
      throw new ModelCacheError('This browser has no origin private file system (navigator.storage.getDirectory): models cannot be cached and load from the network each time.');
    }
    const top = (await storage.getDirectory()) as unknown as DirectoryHandleLike;
    const root = await top.getDirectoryHandle(CACHE_DIR, { create: true });
    // Ask the browser not to evict the cache under storage pressure (best effort).
    void storage.persist?.().catch(() => false);
    return new OpfsModelCache(root, () => storage.estimate());
  }

  private async dir(key: string): Promise<DirectoryHandleLike | null> {
    try {
      return await this.root.getDirectoryHandle(key);
    } catch (e) {
      if (isNotFound(e)) return null;
      throw e;
    }
  }

  private async readManifest(dir: DirectoryHandleLike, key: string): Promise<CacheManifest | null> {
    let text: string;
    try {
      text = await (await (await dir.getFileHandle(MANIFEST_FILE)).getFile()).text();
    } catch (e) {
      if (isNotFound(e)) return null;
      throw e;
    }
    try {
      return checkManifest(JSON.parse(text), key);
    } catch {
      return null;
    }
  }

  async get(key: string): Promise<CachedEntry | null> {
    const dir = await this.dir(key);
    if (!dir) return null;
    const manifest = await this.readManifest(dir, key);
    if (!manifest) return null;
    return {
      manifest,
      open: async (file: string) => {
        let blob: Blob;
        try {
          blob = await (await dir.getFileHandle(opfsFileName(file))).getFile();
        } catch (e) {
          if (isNotFound(e)) throw new ModelCacheError(`cache entry ${key} has lost its file ${file}; delete the cached model and load it again.`);
          throw e;
        }
        return new BlobSource(blob, file);
      },
    };
  }

  async put(key: string, manifest: CacheManifest, files: AsyncIterable<CacheFile> | Iterable<CacheFile>): Promise<void> {
    checkPutArgs(key, manifest);
    await this.delete(key);
    const { usage, quota } = await this.estimate().catch((): StorageEstimateLike => ({}));
    if (usage !== undefined && quota !== undefined && quota - usage < manifest.bytes) {
      throw storageFullError(manifest.bytes, `${MB(Math.max(0, quota - usage))} free`);
    }
    const dir = await this.root.getDirectoryHandle(key, { create: true });
    try {
      await writeAll(manifest, files, async (name, parts, onBytes) => {
        const w = await (await dir.getFileHandle(opfsFileName(name), { create: true })).createWritable();
        try {
          for await (const p of parts) {
            await w.write(p);
            onBytes(p.length);
          }
        } catch (e) {
          await w.abort(e).catch(() => undefined);
          throw e;
        }
        await w.close();
      });
      const w = await (await dir.getFileHandle(MANIFEST_FILE, { create: true })).createWritable();
      await w.write(new TextEncoder().encode(JSON.stringify(manifest)));
      await w.close();
    } catch (e) {
      await this.root.removeEntry(key, { recursive: true }).catch(() => undefined);
      if (isQuotaError(e)) throw storageFullError(manifest.bytes);
      throw e;
    }
  }

  async list(): Promise<CacheManifest[]> {
    const out: CacheManifest[] = [];
    const keys: string[] = [];
    for await (const k of this.root.keys()) keys.push(k);
    for (const key of keys) {
      const dir = await this.dir(key);
      if (!dir) continue;
      const m = await this.readManifest(dir, key);
      // No manifest: a put that never finished (tab closed mid-write) or an old layout.
      if (m) out.push(m);
      else await this.delete(key);
    }
    return out;
  }

  async delete(key: string): Promise<void> {
    try {
      await this.root.removeEntry(key, { recursive: true });
    } catch (e) {
      if (!isNotFound(e)) throw e;
    }
  }
}
