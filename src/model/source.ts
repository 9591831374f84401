/**
 * Where a model's files come from: a Hugging Face repository, a folder served over
 * HTTP (the dev server's /models/<name>/), or files the user dropped on the page.
 * Every source hands out the same four operations on file names relative to the
 * model folder, so the loader and the tokenizer never care which one it is.
 *
 * Node directories live in ./node-source.ts (it imports node:fs and must stay out of
 * the browser bundle).
 */
import { FormatError, parseJsonInput } from '../formats/errors';
import { BlobSource, HttpRangeSource, type ByteSource } from '../formats/safetensors';

/** The lab's default model: Llama-3.2-3B-Instruct pre-quantized to 4 bits (onnx/model_q4f16.onnx), loaded byte for byte. */
export const DEFAULT_MODEL_ID = 'onnx-community/Llama-3.2-3B-Instruct-ONNX';
/** The bf16 safetensors checkpoint of the same model (an ungated copy), quantized in the tab. */
export const BF16_MODEL_ID = 'unsloth/Llama-3.2-3B-Instruct';
/** The 1B sibling, for smaller GPUs. */
export const SMALL_MODEL_ID = 'unsloth/Llama-3.2-1B-Instruct';

export const HF_ENDPOINT = 'https://huggingface.co';

/** A file opened for random access; Node files hold a handle until closed. */
export type ModelFile = ByteSource & { close?(): Promise<void> };

export interface ModelSource {
  /** Shown in messages and part of the cache key (a repo id, folder or URL). */
  readonly name: string;
  /**
   * What identifies this exact content without reading it (a hub revision, or a
   * fingerprint of file sizes and dates); null when the source cannot tell.
   */
  readonly revision: string | null;
  has(file: string): Promise<boolean>;
  open(file: string): Promise<ModelFile>;
  readJson(file: string): Promise<unknown>;
  readText(file: string): Promise<string>;
}

/** Closes a file if it holds a handle (Node); a no-op for the others. */
export async function closeFile(file: ModelFile): Promise<void> {
  await file.close?.();
}

const HINT_GATED = 'The model is gated or private: accept the licence on the model page and give an access token.';

/** Rejects names that would leave the model folder. */
export function checkFileName(sourceName: string, file: string): void {
  if (!file || file.startsWith('/') || file.includes('\\') || file.split('/').some((p) => p === '..' || p === '')) {
    throw new FormatError(sourceName, null, `file name ${JSON.stringify(file)} is not a plain path inside the model folder`, 'Use names such as "config.json" or "model-00001-of-00002.safetensors".');
  }
}

function decodeUtf8(bytes: Uint8Array, file: string): string {
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch {
    throw new FormatError(file, null, 'is not valid UTF-8 text', 'The file is damaged or incomplete: re-download it.');
  }
}

// ---------------------------------------------------------------------------------
// HTTP: a served folder or a Hugging Face repository

export interface HttpModelSourceOptions {
  /** Shown in messages; default the base URL. */
  name?: string;
  /** Part of the cache key; default null (unknown). */
  revision?: string | null;
  /** A Hugging Face access token, sent as `Authorization: Bearer <token>`. */
  token?: string;
  /** Where to send users who hit a gated model (its page on the hub). */
  pageUrl?: string;
  fetch?: typeof fetch;
}

/**
 * Files under a base URL: `${baseUrl}/${file}`. Serves both a folder on the dev server
 * and a hub repository (see hubModelSource).
 */
export class HttpModelSource implements ModelSource {
  readonly name: string;
  readonly revision: string | null;
  private readonly base: string;
  private readonly headers: Record<string, string>;
  private readonly fetchFn: typeof fetch;
  private readonly pageUrl: string | null;

  constructor(baseUrl: string, options: HttpModelSourceOptions = {}) {
    this.base = baseUrl.replace(/\/+$/, '');
    this.name = options.name ?? this.base;
    this.revision = options.revision ?? null;
    this.headers = options.token ? { Authorization: `Bearer ${options.token}` } : {};
    this.fetchFn = options.fetch ?? globalThis.fetch.bind(globalThis);
    this.pageUrl = options.pageUrl ?? null;
  }

  url(file: string): string {
    checkFileName(this.name, file);
    return `${this.base}/${file.split('/').map(encodeURIComponent).join('/')}`;
  }

  async has(file: string): Promise<boolean> {
    const res = await this.request(file, 'HEAD');
    if (res.status === 404 || servedHtmlFallback(file, res)) return false;
    this.check(file, res);
    return true;
  }

  async open(file: string): Promise<ModelFile> {
    const url = this.url(file);
    try {
      return await HttpRangeSource.open(url, { name: file, headers: this.headers, fetch: this.fetchFn });
    } catch (e) {
      const status = e instanceof FormatError ? /HTTP (\d{3})/.exec(e.problem)?.[1] : undefined;
      if (status) throw this.statusError(file, Number(status));
      throw e;
    }
  }

  async readText(file: string): Promise<string> {
    const res = await this.request(file, 'GET');
    if (servedHtmlFallback(file, res)) {
      await res.body?.cancel();
      throw this.statusError(file, 404);
    }
    this.check(file, res);
    return decodeUtf8(new Uint8Array(await res.arrayBuffer()), file);
  }

  async readJson(file: string): Promise<unknown> {
    return parseJsonInput(await this.readText(file), file);
  }

  private async request(file: string, method: 'GET' | 'HEAD'): Promise<Response> {
    const url = this.url(file);
    try {
      return await this.fetchFn(url, { method, headers: this.headers });
    } catch (e) {
      throw new FormatError(file, null, `could not fetch ${url} (${(e as Error).message})`, 'Check the network connection and the model address, then retry.');
    }
  }

  private check(file: string, res: Response): void {
    if (res.ok) return;
    void res.body?.cancel();
    throw this.statusError(file, res.status);
  }

  private statusError(file: string, status: number): FormatError {
    const url = this.url(file);
    if (status === 401 || status === 403) {
      const page = this.pageUrl ? ` (${this.pageUrl})` : '';
      const token = this.headers.Authorization ? 'The access token given was refused: check that it is valid and that the licence was accepted with the same account.' : '';
      return new FormatError(file, null, `access denied (HTTP ${status}) for ${url}`, `${HINT_GATED.replace('model page', `model page${page}`)}${token ? ` ${token}` : ''}`);
    }
    if (status === 404) {
      return new FormatError(file, null, `not found (HTTP 404) at ${url}`, `Check the model name and that ${this.name} holds this file.`);
    }
    return new FormatError(file, null, `the server answered HTTP ${status} for ${url}`, 'Retry later, or check the address.');
  }
}

/** A dev server answering a missing file with its index.html (single-page-app fallback). */
function servedHtmlFallback(file: string, res: Response): boolean {
  return res.ok && !/\.html?$/.test(file) && (res.headers.get('Content-Type') ?? '').startsWith('text/html');
}

export interface HubOptions {
  token?: string;
  /** Branch, tag or commit; default "main". */
  revision?: string;
  endpoint?: string;
  fetch?: typeof fetch;
}

const REPO_ID = /^[A-Za-z0-9][A-Za-z0-9_.-]*\/[A-Za-z0-9][A-Za-z0-9_.-]*$/;

export function isHubRepoId(s: string): boolean {
  return REPO_ID.test(s) && !s.includes('..');
}

/** A Hugging Face repository `owner/name`: files at <endpoint>/<repo>/resolve/<revision>/<file>. */
export function hubModelSource(repoId: string, options: HubOptions = {}): HttpModelSource {
  if (!isHubRepoId(repoId)) {
    throw new FormatError(repoId, null, 'is not a Hugging Face model id', 'Give the id as "owner/name", for example "unsloth/Llama-3.2-1B-Instruct".');
  }
  const endpoint = (options.endpoint ?? HF_ENDPOINT).replace(/\/+$/, '');
  const revision = options.revision ?? 'main';
  return new HttpModelSource(`${endpoint}/${repoId}/resolve/${encodeURIComponent(revision)}`, {
    name: repoId,
    revision,
    token: options.token,
    pageUrl: `${endpoint}/${repoId}`,
    fetch: options.fetch,
  });
}

/** A folder the dev server serves under /models/<folder>/ (same origin). */
export function servedModelSource(folder: string, options: { baseUrl?: string; fetch?: typeof fetch; revision?: string | null } = {}): HttpModelSource {
  checkFileName('models/', folder);
  const origin = options.baseUrl ?? (typeof location !== 'undefined' ? location.origin : '');
  return new HttpModelSource(`${origin}/models/${folder}`, { name: `models/${folder}`, revision: options.revision ?? null, fetch: options.fetch });
}

// ---------------------------------------------------------------------------------
// Dropped files

/**
 * Files the user dropped or picked (a FileList or File[]), matched by file name. With a
 * dropped folder (webkitRelativePath set), names are taken relative to its top level.
 */
export class DroppedFilesSource implements ModelSource {
  readonly name: string;
  readonly revision: string;
  private readonly files = new Map<string, File[]>();

  constructor(files: FileList | readonly File[], name?: string) {
    const list = Array.from(files as ArrayLike<File>);
    let folder: string | null = null;
    for (const f of list) {
      const rel = f.webkitRelativePath || '';
      const parts = rel ? rel.split('/') : [f.name];
      if (rel && parts.length > 1) folder ??= parts[0]!;
      // Relative to the dropped folder's top level; a bare file keeps its own name.
      const key = parts.length > 1 ? parts.slice(1).join('/') : f.name;
      const same = this.files.get(key);
      if (same) same.push(f);
      else this.files.set(key, [f]);
    }
    this.name = name ?? folder ?? 'dropped files';
    // Size and modification time of every file: a different drop of the same names
    // gets a different cache entry.
    this.revision = fingerprint(list.map((f) => `${f.webkitRelativePath || f.name}:${f.size}:${f.lastModified}`));
  }

  private get(file: string): File | null {
    checkFileName(this.name, file);
    const found = this.files.get(file);
    if (!found) return null;
    if (found.length > 1) {
      throw new FormatError(file, null, `was dropped ${found.length} times (from different folders)`, 'Drop one model folder, or only the files of one model.');
    }
    return found[0]!;
  }

  async has(file: string): Promise<boolean> {
    return this.get(file) !== null;
  }

  private need(file: string): File {
    const f = this.get(file);
    if (!f) {
      const names = [...this.files.keys()].slice(0, 8).join(', ');
      throw new FormatError(file, null, `was not among the dropped files (${names || 'none'})`, "Drop the whole model folder: config.json, the tokenizer files and every safetensors file.");
    }
    return f;
  }

  async open(file: string): Promise<ModelFile> {
    return new BlobSource(this.need(file), file);
  }

  async readText(file: string): Promise<string> {
    return decodeUtf8(new Uint8Array(await this.need(file).arrayBuffer()), file);
  }

  async readJson(file: string): Promise<unknown> {
    return parseJsonInput(await this.readText(file), file);
  }
}

// ---------------------------------------------------------------------------------
// Cancelling a load

/** The error a cancelled load ends with (name "AbortError", as fetch's). */
export function loadCancelledError(): DOMException {
  return new DOMException('Loading the model was cancelled; nothing partial was kept.', 'AbortError');
}

export function isLoadCancelled(e: unknown): boolean {
  return (e as { name?: string } | null)?.name === 'AbortError';
}

export function throwIfCancelled(signal: AbortSignal | null | undefined): void {
  if (signal?.aborted) throw loadCancelledError();
}

/** A file whose reads stop once `signal` is aborted (the read in flight finishes, its bytes are dropped). */
export function cancellableFile<F extends ByteSource & { close?(): Promise<void> }>(file: F, signal: AbortSignal): ModelFile {
  return {
    name: file.name,
    size: file.size,
    read: async (offset, length) => {
      throwIfCancelled(signal);
      const bytes = await file.read(offset, length);
      throwIfCancelled(signal);
      return bytes;
    },
    close: () => file.close?.() ?? Promise.resolve(),
  };
}

/** A source whose every call (and every read of a file it opened) stops once `signal` is aborted. */
export function cancellableSource(inner: ModelSource, signal: AbortSignal): ModelSource {
  const guard = async <T>(run: () => Promise<T>): Promise<T> => {
    throwIfCancelled(signal);
    const out = await run();
    throwIfCancelled(signal);
    return out;
  };
  return {
    name: inner.name,
    revision: inner.revision,
    has: (f) => guard(() => inner.has(f)),
    readJson: (f) => guard(() => inner.readJson(f)),
    readText: (f) => guard(() => inner.readText(f)),
    open: async (f) => {
      throwIfCancelled(signal);
      const file = await inner.open(f);
      if (signal.aborted) {
        await closeFile(file);
        throw loadCancelledError();
      }
      return cancellableFile(file, signal);
    },
  };
}

/** A short stable hash (FNV-1a, 2 x 32 bits) of strings, for revisions and cache keys. */
export function fingerprint(parts: readonly string[]): string {
  let a = 0x811c9dc5;
  let b = 0x01000193 ^ 0x5bd1e995;
  for (const s of parts) {
    for (let i = 0; i < s.length; i++) {
      const c = s.charCodeAt(i);
      a = Math.imul(a ^ c, 0x01000193);
      b = Math.imul(b ^ c, 0x5bd1e995) ^ (b >>> 15);
    }
    a = Math.imul(a ^ 0x1f, 0x01000193);
    b = Math.imul(b ^ 0x1f, 0x5bd1e995) ^ (b >>> 15);
  }
  return (a >>> 0).toString(16).padStart(8, '0') + (b >>> 0).toString(16).padStart(8, '0');
}

/**
 * Turns what a user typed or picked into a source: an http(s) URL, a hub id
 * `owner/name`, or dropped files.
 */
export function modelSourceFrom(input: string | FileList | readonly File[], options: HubOptions = {}): ModelSource {
  if (typeof input !== 'string') return new DroppedFilesSource(input);
  const s = input.trim();
  if (/^https?:\/\//.test(s)) return new HttpModelSource(s, { token: options.token, fetch: options.fetch });
  return hubModelSource(s, options);
}
