/**
 * safetensors: header validation, tensor-by-tensor reading from any byte source
 * (memory, a browser File, an HTTP URL with range requests), sharded-checkpoint
 * indexes, a canonical writer and dtype conversion.
 *
 * Layout: u64 little-endian header length N, N bytes of JSON, then the data. Offsets
 * in the JSON are relative to the data start, end-exclusive, and must tile the data
 * exactly. All typed-array views here assume a little-endian host, which every
 * browser and Node platform is.
 */
import { f16ToF32 } from '../gpu/gpu';
import { FormatError, HINT_REDOWNLOAD, HINT_REEXPORT, isPlainObject, parseJsonInput, show } from './errors';

export type SafetensorsDType = 'F64' | 'F32' | 'F16' | 'BF16' | 'I64' | 'I32' | 'U32' | 'I16' | 'I8' | 'U8' | 'BOOL';

export const DTYPE_SIZE: Readonly<Record<SafetensorsDType, number>> = {
  F64: 8,
  F32: 4,
  F16: 2,
  BF16: 2,
  I64: 8,
  I32: 4,
  U32: 4,
  I16: 2,
  I8: 1,
  U8: 1,
  BOOL: 1,
};

/** The limit the reference implementation enforces; a larger N means a corrupt file. */
export const MAX_HEADER_BYTES = 100_000_000;

export interface TensorInfo {
  name: string;
  dtype: SafetensorsDType;
  shape: number[];
  /** Byte range relative to the start of the data section, end exclusive. */
  begin: number;
  end: number;
  byteLength: number;
}

export interface SafetensorsHeader {
  fileName: string;
  fileSize: number;
  /** N, the JSON length including padding. */
  headerLength: number;
  /** Absolute file offset of the data section (8 + N). */
  dataStart: number;
  metadata: Record<string, string>;
  /** Every tensor, in data-offset order. */
  tensors: Map<string, TensorInfo>;
}

export function isSafetensorsDType(s: unknown): s is SafetensorsDType {
  return typeof s === 'string' && Object.prototype.hasOwnProperty.call(DTYPE_SIZE, s);
}

export function numel(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

const tensorItem = (name: string): string => `tensor ${JSON.stringify(name)}`;

/** Reads and checks N from the first 8 bytes. */
export function readHeaderLength(first8: Uint8Array, fileName: string, fileSize: number): number {
  if (fileSize < 8 || first8.length < 8) {
    throw new FormatError(
      fileName,
      null,
      `is ${fileSize} bytes, too short to be a safetensors file (at least 8 bytes)`,
      HINT_REDOWNLOAD,
    );
  }
  const view = new DataView(first8.buffer, first8.byteOffset, 8);
  const n = view.getUint32(0, true) + view.getUint32(4, true) * 2 ** 32;
  if (n > MAX_HEADER_BYTES) {
    throw new FormatError(
      fileName,
      null,
      `header length ${n} is larger than the ${MAX_HEADER_BYTES / 1e6} MB limit, so this is not a valid safetensors file`,
      HINT_REDOWNLOAD,
    );
  }
  if (n < 2) {
    throw new FormatError(fileName, null, `header length ${n} is too small to hold a JSON object`, HINT_REDOWNLOAD);
  }
  if (8 + n > fileSize) {
    throw new FormatError(
      fileName,
      null,
      `header claims ${n} bytes but the file is only ${fileSize} bytes long (truncated)`,
      HINT_REDOWNLOAD,
    );
  }
  return n;
}

function checkDims(v: unknown, fileName: string, name: string, field: string, count?: number): number[] {
  const ok =
    Array.isArray(v) &&
    (count === undefined || v.length === count) &&
    v.every((d) => typeof d === 'number' && Number.isSafeInteger(d) && d >= 0);
  if (!ok) {
    const want = count === undefined ? 'a list of non-negative integers' : `a list of ${count} non-negative integers`;
    throw new FormatError(fileName, tensorItem(name), `"${field}" is ${show(v)}, expected ${want}`, HINT_REEXPORT);
  }
  return v as number[];
}

/**
 * Validates a safetensors header. `bytes` must hold at least the first 8 + N bytes
 * of the file; `fileSize` is the size of the whole file, so the header can be checked
 * against it without reading the data.
 */
export function parseSafetensorsHeader(bytes: Uint8Array, fileName: string, fileSize: number): SafetensorsHeader {
  const n = readHeaderLength(bytes.subarray(0, 8), fileName, fileSize);
  if (bytes.length < 8 + n) {
    throw new RangeError(`${fileName}: parseSafetensorsHeader needs the first ${8 + n} bytes, got ${bytes.length}`);
  }
  const headerBytes = bytes.subarray(8, 8 + n);
  if (headerBytes[0] !== 0x7b /* { */) {
    throw new FormatError(fileName, null, 'header does not start with "{"', HINT_REDOWNLOAD);
  }
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(headerBytes);
  } catch {
    throw new FormatError(fileName, null, 'header is not valid UTF-8', HINT_REDOWNLOAD);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new FormatError(fileName, null, `header is not valid JSON (${(e as Error).message})`, HINT_REDOWNLOAD);
  }
  if (!isPlainObject(json)) {
    throw new FormatError(fileName, null, 'header JSON is not an object', HINT_REDOWNLOAD);
  }

  const metadata: Record<string, string> = {};
  const infos: TensorInfo[] = [];
  for (const [name, entry] of Object.entries(json)) {
    if (name === '__metadata__') {
      if (!isPlainObject(entry)) {
        throw new FormatError(fileName, '__metadata__', `is ${show(entry)}, expected an object of strings`, HINT_REEXPORT);
      }
      for (const [k, v] of Object.entries(entry)) {
        if (typeof v !== 'string') {
          throw new FormatError(fileName, `__metadata__.${k}`, `is ${show(v)}, expected a string`, HINT_REEXPORT);
        }
        metadata[k] = v;
      }
      continue;
    }
    if (!isPlainObject(entry)) {
      throw new FormatError(fileName, tensorItem(name), `entry is ${show(entry)}, expected an object`, HINT_REEXPORT);
    }
    const dtype = entry.dtype;
    if (!isSafetensorsDType(dtype)) {
      throw new FormatError(
        fileName,
        tensorItem(name),
        `unsupported dtype ${show(dtype)} (this lab reads ${Object.keys(DTYPE_SIZE).join(', ')})`,
        'Convert the checkpoint to BF16, F16 or F32.',
      );
    }
    const shape = checkDims(entry.shape, fileName, name, 'shape');
    const [begin, end] = checkDims(entry.data_offsets, fileName, name, 'data_offsets', 2) as [number, number];
    if (end < begin) {
      throw new FormatError(fileName, tensorItem(name), `data_offsets [${begin}, ${end}] end before they begin`, HINT_REDOWNLOAD);
    }
    const expected = numel(shape) * DTYPE_SIZE[dtype];
    if (!Number.isSafeInteger(expected) || expected !== end - begin) {
      throw new FormatError(
        fileName,
        tensorItem(name),
        `data_offsets [${begin}, ${end}] cover ${end - begin} bytes but ${dtype} ${show(shape)} needs ${expected}`,
        HINT_REDOWNLOAD,
      );
    }
    infos.push({ name, dtype, shape, begin, end, byteLength: end - begin });
  }

  const dataSize = fileSize - 8 - n;
  infos.sort((a, b) => a.begin - b.begin || a.end - b.end);
  let cursor = 0;
  let prev: TensorInfo | null = null;
  for (const t of infos) {
    if (t.end > dataSize) {
      throw new FormatError(
        fileName,
        tensorItem(t.name),
        `data_offsets [${t.begin}, ${t.end}] run past the end of the data section (${dataSize} bytes; the file is truncated)`,
        HINT_REDOWNLOAD,
      );
    }
    if (t.begin < cursor) {
      throw new FormatError(
        fileName,
        tensorItem(t.name),
        `data_offsets [${t.begin}, ${t.end}] overlap tensor ${JSON.stringify(prev!.name)} [${prev!.begin}, ${prev!.end}]`,
        HINT_REDOWNLOAD,
      );
    }
    if (t.begin > cursor) {
      const after = prev ? `after tensor ${JSON.stringify(prev.name)}` : 'at the start of the data section';
      throw new FormatError(
        fileName,
        tensorItem(t.name),
        `data is not contiguous: ${t.begin - cursor} unused bytes ${after} (offset ${cursor} to ${t.begin})`,
        HINT_REDOWNLOAD,
      );
    }
    cursor = t.end;
    prev = t;
  }
  if (cursor !== dataSize) {
    throw new FormatError(
      fileName,
      null,
      `the header describes ${cursor} data bytes but the file holds ${dataSize} (${dataSize - cursor} trailing bytes)`,
      HINT_REDOWNLOAD,
    );
  }
  return {
    fileName,
    fileSize,
    headerLength: n,
    dataStart: 8 + n,
    metadata,
    tensors: new Map(infos.map((t) => [t.name, t])),
  };
}

// ---------------------------------------------------------------------------------
// Byte sources

/** Random access to a file's bytes; `read` returns exactly `length` bytes or throws. */
export interface ByteSource {
  size: number;
  name: string;
  read(offset: number, length: number): Promise<Uint8Array>;
}

function checkRange(source: ByteSource, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > source.size) {
    throw new RangeError(`${source.name}: read of ${length} bytes at ${offset} is outside the file (${source.size} bytes)`);
  }
}

/** Bytes already in memory; reads return views, not copies. */
export class MemorySource implements ByteSource {
  readonly size: number;
  constructor(
    readonly bytes: Uint8Array,
    readonly name: string = 'memory',
  ) {
    this.size = bytes.length;
  }
  read(offset: number, length: number): Promise<Uint8Array> {
    checkRange(this, offset, length);
    return Promise.resolve(this.bytes.subarray(offset, offset + length));
  }
}

/** A browser File or Blob, read slice by slice so the file never sits in memory whole. */
export class BlobSource implements ByteSource {
  readonly size: number;
  readonly name: string;
  constructor(
    readonly blob: Blob,
    name?: string,
  ) {
    this.size = blob.size;
    this.name = name ?? ((blob as { name?: unknown }).name as string | undefined) ?? 'blob';
  }
  async read(offset: number, length: number): Promise<Uint8Array> {
    checkRange(this, offset, length);
    const bytes = new Uint8Array(await this.blob.slice(offset, offset + length).arrayBuffer());
    if (bytes.length !== length) {
      throw new FormatError(this.name, null, `reading ${length} bytes at ${offset} returned ${bytes.length}`, 'The file changed while it was being read: open it again.');
    }
    return bytes;
  }
}

export interface HttpSourceOptions {
  /** Shown in errors; defaults to the last path segment of the URL. */
  name?: string;
  /** Extra request headers (e.g. Authorization). */
  headers?: Record<string, string>;
  /** Skip the size probe when the size is already known. */
  size?: number;
  fetch?: typeof fetch;
}

const HINT_RANGES =
  'Serve the file from a server that supports HTTP range requests (Hugging Face and most static file servers do), or open it as a local file.';

function urlFileName(url: string): string {
  const path = url.split(/[?#]/)[0]!;
  const last = path.slice(path.lastIndexOf('/') + 1);
  return last ? decodeURIComponent(last) : url;
}

/** A file behind an HTTP(S) URL, read with `Range` requests. */
export class HttpRangeSource implements ByteSource {
  private constructor(
    readonly url: string,
    readonly name: string,
    readonly size: number,
    private readonly headers: Record<string, string>,
    private readonly fetchFn: typeof fetch,
  ) {}

  static async open(url: string, options: HttpSourceOptions = {}): Promise<HttpRangeSource> {
    const name = options.name ?? urlFileName(url);
    const fetchFn = options.fetch ?? globalThis.fetch.bind(globalThis);
    const headers = options.headers ?? {};
    if (options.size !== undefined) return new HttpRangeSource(url, name, options.size, headers, fetchFn);

    const res = await HttpRangeSource.request(fetchFn, url, name, { ...headers, Range: 'bytes=0-0' });
    const total = /\/(\d+)\s*$/.exec(res.headers.get('Content-Range') ?? '');
    if (res.status === 416 && total) {
      await res.arrayBuffer();
      return new HttpRangeSource(url, name, Number(total[1]), headers, fetchFn);
    }
    HttpRangeSource.checkPartial(res, url, name);
    await res.arrayBuffer();
    let size = total ? Number(total[1]) : NaN;
    if (!Number.isFinite(size)) {
      // Content-Range can be hidden from scripts by CORS; Content-Length of a HEAD is the fallback.
      const head = await fetchFn(url, { method: 'HEAD', headers });
      size = Number(head.headers.get('Content-Length') ?? NaN);
      if (!head.ok || !Number.isFinite(size)) {
        throw new FormatError(name, null, `the server at ${url} does not report the file size (no Content-Range or Content-Length)`, HINT_RANGES);
      }
    }
    return new HttpRangeSource(url, name, size, headers, fetchFn);
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    checkRange(this, offset, length);
    if (length === 0) return new Uint8Array(0);
    const range = `bytes=${offset}-${offset + length - 1}`;
    const res = await HttpRangeSource.request(this.fetchFn, this.url, this.name, { ...this.headers, Range: range });
    HttpRangeSource.checkPartial(res, this.url, this.name);
    const start = /bytes\s+(\d+)-/.exec(res.headers.get('Content-Range') ?? '');
    if (start && Number(start[1]) !== offset) {
      await res.body?.cancel();
      throw new FormatError(this.name, null, `asked for ${range} but the server sent bytes from ${start[1]}`, HINT_RANGES);
    }
    const bytes = new Uint8Array(await res.arrayBuffer());
    if (bytes.length !== length) {
      throw new FormatError(
        this.name,
        null,
        `asked for ${range} (${length} bytes) but the server sent ${bytes.length} bytes`,
        'The download was cut short or the file changed on the server: retry.',
      );
    }
    return bytes;
  }

  private static async request(fetchFn: typeof fetch, url: string, name: string, headers: Record<string, string>): Promise<Response> {
    let res: Response;
    try {
      res = await fetchFn(url, { headers });
    } catch (e) {
      throw new FormatError(name, null, `could not fetch ${url} (${(e as Error).message})`, 'Check the network connection and the URL, then retry.');
    }
    if (!res.ok && res.status !== 416) {
      await res.body?.cancel();
      throw new FormatError(
        name,
        null,
        `the server answered HTTP ${res.status}${res.statusText ? ` ${res.statusText}` : ''} for ${url}`,
        res.status === 401 || res.status === 403
          ? 'The file may be gated or private: log in or pass an access token.'
          : 'Check the URL, then retry.',
      );
    }
    return res;
  }

  private static checkPartial(res: Response, url: string, name: string): void {
    if (res.status === 206) return;
    void res.body?.cancel();
    if (res.status === 200) {
      throw new FormatError(
        name,
        null,
        `the server at ${url} ignored the Range request (it answered 200 with the whole file instead of 206 Partial Content)`,
        HINT_RANGES,
      );
    }
    throw new FormatError(name, null, `the server answered HTTP ${res.status} to a Range request for ${url}`, HINT_RANGES);
  }
}

// ---------------------------------------------------------------------------------
// Reading

export interface TensorData {
  name: string;
  dtype: SafetensorsDType;
  shape: number[];
  /** Raw little-endian bytes; may be a view into the source's memory. */
  data: Uint8Array;
}

export interface TensorChunk {
  /** First row (index along dimension 0) in this chunk. */
  rowStart: number;
  rowCount: number;
  /** [rowCount, ...shape.slice(1)]. */
  shape: number[];
  data: Uint8Array;
}

/** First read size: one request usually covers the header of a model file. */
const HEADER_PREFETCH = 1 << 16;

export async function openSafetensors(source: ByteSource): Promise<SafetensorsFile> {
  if (source.size < 8) readHeaderLength(new Uint8Array(0), source.name, source.size);
  const first = await source.read(0, Math.min(source.size, HEADER_PREFETCH));
  const n = readHeaderLength(first.subarray(0, 8), source.name, source.size);
  const headerBytes = 8 + n <= first.length ? first.subarray(0, 8 + n) : await source.read(0, 8 + n);
  return new SafetensorsFile(source, parseSafetensorsHeader(headerBytes, source.name, source.size));
}

export class SafetensorsFile {
  constructor(
    readonly source: ByteSource,
    readonly header: SafetensorsHeader,
  ) {}

  get name(): string {
    return this.source.name;
  }
  get metadata(): Record<string, string> {
    return this.header.metadata;
  }
  get tensors(): Map<string, TensorInfo> {
    return this.header.tensors;
  }

  info(name: string): TensorInfo {
    const t = this.header.tensors.get(name);
    if (!t) {
      const names = [...this.header.tensors.keys()];
      const some = names.slice(0, 5).map((s) => JSON.stringify(s)).join(', ');
      throw new FormatError(
        this.name,
        tensorItem(name),
        `no such tensor in this file (it holds ${names.length}${names.length ? `: ${some}${names.length > 5 ? ', ...' : ''}` : ''})`,
        'Check that this is the right checkpoint file, or the shard the index names.',
      );
    }
    return t;
  }

  async readTensor(name: string): Promise<TensorData> {
    const t = this.info(name);
    const data = await this.readBytes(t, t.begin, t.byteLength);
    return { name, dtype: t.dtype, shape: t.shape.slice(), data };
  }

  async readTensorF32(name: string): Promise<Float32Array> {
    const t = await this.readTensor(name);
    return toF32(t.dtype, t.data, `${this.name}, ${tensorItem(name)}`);
  }

  /**
   * Streams a tensor in whole rows (along dimension 0), each chunk at most `maxBytes`
   * unless a single row is larger, in which case every chunk is one row. A tensor
   * with no data yields one empty chunk.
   */
  async *readTensorChunks(name: string, maxBytes: number): AsyncGenerator<TensorChunk> {
    if (!(maxBytes >= 1) || !Number.isSafeInteger(maxBytes)) {
      throw new RangeError(`readTensorChunks: maxBytes must be a positive integer, got ${maxBytes}`);
    }
    const t = this.info(name);
    const rows = t.shape.length === 0 ? 1 : t.shape[0]!;
    const rest = t.shape.slice(1);
    if (t.byteLength === 0) {
      yield { rowStart: 0, rowCount: rows, shape: t.shape.length ? [rows, ...rest] : [], data: new Uint8Array(0) };
      return;
    }
    const rowBytes = t.byteLength / rows;
    const perChunk = Math.max(1, Math.floor(maxBytes / rowBytes));
    for (let r = 0; r < rows; r += perChunk) {
      const count = Math.min(perChunk, rows - r);
      const data = await this.readBytes(t, t.begin + r * rowBytes, count * rowBytes);
      yield { rowStart: r, rowCount: count, shape: t.shape.length ? [count, ...rest] : [], data };
    }
  }

  private async readBytes(t: TensorInfo, begin: number, length: number): Promise<Uint8Array> {
    const data = await this.source.read(this.header.dataStart + begin, length);
    if (data.length !== length) {
      throw new FormatError(this.name, tensorItem(t.name), `read returned ${data.length} of ${length} bytes`, HINT_REDOWNLOAD);
    }
    return data;
  }
}

/** A whole safetensors file already in memory, read synchronously. */
export interface SafetensorsBuffer {
  header: SafetensorsHeader;
  /** A tensor's raw bytes (a view into the buffer). */
  bytes(name: string): Uint8Array;
  tensor(name: string): TensorData;
}

export function parseSafetensors(bytes: Uint8Array, fileName: string): SafetensorsBuffer {
  const header = parseSafetensorsHeader(bytes, fileName, bytes.length);
  const file = new SafetensorsFile(new MemorySource(bytes, fileName), header);
  const raw = (name: string): Uint8Array => {
    const t = file.info(name);
    return bytes.subarray(header.dataStart + t.begin, header.dataStart + t.end);
  };
  return {
    header,
    bytes: raw,
    tensor: (name) => {
      const t = file.info(name);
      return { name, dtype: t.dtype, shape: t.shape.slice(), data: raw(name) };
    },
  };
}

// ---------------------------------------------------------------------------------
// Sharded checkpoints

export interface ShardIndex {
  fileName: string;
  metadata: Record<string, unknown>;
  /** metadata.total_size when present: the sum of tensor data sizes in bytes. */
  totalSize: number | null;
  /** Tensor name -> shard file name. */
  weightMap: Map<string, string>;
  /** Distinct shard file names, in first-mention order. */
  shards: string[];
}

/** Validates a model.safetensors.index.json (parsed JSON, text or bytes). */
export function parseShardIndex(json: unknown, fileName: string): ShardIndex {
  const obj = parseJsonInput(json, fileName);
  if (!isPlainObject(obj)) throw new FormatError(fileName, null, 'is not a JSON object', HINT_REDOWNLOAD);
  const meta = obj.metadata ?? {};
  if (!isPlainObject(meta)) throw new FormatError(fileName, 'metadata', `is ${show(meta)}, expected an object`, HINT_REDOWNLOAD);
  let totalSize: number | null = null;
  if (meta.total_size !== undefined && meta.total_size !== null) {
    if (typeof meta.total_size !== 'number' || !Number.isSafeInteger(meta.total_size) || meta.total_size < 0) {
      throw new FormatError(fileName, 'metadata.total_size', `is ${show(meta.total_size)}, expected a non-negative integer`, HINT_REDOWNLOAD);
    }
    totalSize = meta.total_size;
  }
  const wm = obj.weight_map;
  if (!isPlainObject(wm)) {
    throw new FormatError(fileName, 'weight_map', wm === undefined ? 'is missing' : `is ${show(wm)}, expected an object`, HINT_REDOWNLOAD);
  }
  const weightMap = new Map<string, string>();
  const shards: string[] = [];
  for (const [tensor, shard] of Object.entries(wm)) {
    const item = `weight_map[${JSON.stringify(tensor)}]`;
    if (typeof shard !== 'string' || shard.length === 0) {
      throw new FormatError(fileName, item, `is ${show(shard)}, expected a shard file name`, HINT_REDOWNLOAD);
    }
    if (!shard.endsWith('.safetensors')) {
      throw new FormatError(fileName, item, `names ${JSON.stringify(shard)}, which is not a .safetensors file`, 'Use a safetensors checkpoint (not .bin).');
    }
    if (shard.startsWith('/') || shard.includes('\\') || shard.split('/').includes('..')) {
      throw new FormatError(fileName, item, `names ${JSON.stringify(shard)}, which points outside the checkpoint folder`, HINT_REDOWNLOAD);
    }
    weightMap.set(tensor, shard);
    if (!shards.includes(shard)) shards.push(shard);
  }
  if (weightMap.size === 0) throw new FormatError(fileName, 'weight_map', 'is empty', HINT_REDOWNLOAD);
  return { fileName, metadata: meta, totalSize, weightMap, shards };
}

/**
 * Cross-checks an index against the headers of its shards: every shard present,
 * every mapped tensor inside the shard that the index names, and nothing unlisted.
 */
export function checkShards(index: ShardIndex, headers: ReadonlyMap<string, SafetensorsHeader>): void {
  for (const shard of index.shards) {
    if (!headers.has(shard)) {
      throw new FormatError(index.fileName, null, `lists shard ${JSON.stringify(shard)} but that file was not provided`, 'Download every shard the index lists.');
    }
  }
  for (const [tensor, shard] of index.weightMap) {
    if (!headers.get(shard)!.tensors.has(tensor)) {
      throw new FormatError(shard, tensorItem(tensor), `is missing, though ${index.fileName} places it in this shard`, HINT_REDOWNLOAD);
    }
  }
  for (const [shard, header] of headers) {
    for (const tensor of header.tensors.keys()) {
      const mapped = index.weightMap.get(tensor);
      if (mapped !== shard) {
        const why = mapped === undefined ? `${index.fileName} does not list it` : `${index.fileName} places it in ${mapped}`;
        throw new FormatError(shard, tensorItem(tensor), `is in this shard but ${why}`, HINT_REDOWNLOAD);
      }
    }
  }
}

// ---------------------------------------------------------------------------------
// Writing

export interface TensorToWrite {
  name: string;
  dtype: SafetensorsDType;
  shape: readonly number[];
  /** Little-endian element bytes (any typed array; its bytes are used as they are). */
  data: ArrayBufferView;
}

export interface WriteOptions {
  /**
   * 'name' (default): tensors sorted by name, so the bytes do not depend on the
   * caller's order. 'given': the order passed in. (The reference writer groups by
   * dtype, largest first, then sorts by name; readers accept any order.)
   */
  order?: 'name' | 'given';
}

/** A complete safetensors file: header padded with spaces to a multiple of 8, data contiguous. */
export function writeSafetensors(
  tensors: readonly TensorToWrite[],
  metadata?: Record<string, string>,
  options: WriteOptions = {},
): Uint8Array<ArrayBuffer> {
  const list = options.order === 'given' ? tensors.slice() : tensors.slice().sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const seen = new Set<string>();
  const parts: string[] = [];
  if (metadata) {
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== 'string') throw new TypeError(`writeSafetensors: metadata ${JSON.stringify(k)} must be a string, got ${show(v)}`);
    }
    parts.push(`"__metadata__":${JSON.stringify(metadata)}`);
  }
  let offset = 0;
  for (const t of list) {
    const where = `writeSafetensors: tensor ${JSON.stringify(t.name)}`;
    if (!t.name || t.name === '__metadata__') throw new TypeError(`${where}: invalid name`);
    if (seen.has(t.name)) throw new TypeError(`${where}: duplicate name`);
    seen.add(t.name);
    if (!isSafetensorsDType(t.dtype)) throw new TypeError(`${where}: unknown dtype ${show(t.dtype)}`);
    if (!t.shape.every((d) => Number.isSafeInteger(d) && d >= 0)) throw new TypeError(`${where}: bad shape ${show(t.shape)}`);
    const bytes = numel(t.shape) * DTYPE_SIZE[t.dtype];
    if (t.data.byteLength !== bytes) {
      throw new TypeError(`${where}: ${t.dtype} ${show(t.shape)} needs ${bytes} bytes, data has ${t.data.byteLength}`);
    }
    parts.push(`${JSON.stringify(t.name)}:{"dtype":"${t.dtype}","shape":${JSON.stringify(t.shape)},"data_offsets":[${offset},${offset + bytes}]}`);
    offset += bytes;
  }
  const json = new TextEncoder().encode(`{${parts.join(',')}}`);
  const n = Math.ceil(json.length / 8) * 8;
  const out = new Uint8Array(8 + n + offset);
  const view = new DataView(out.buffer);
  view.setUint32(0, n % 2 ** 32, true);
  view.setUint32(4, Math.floor(n / 2 ** 32), true);
  out.set(json, 8);
  out.fill(0x20, 8 + json.length, 8 + n);
  let at = 8 + n;
  for (const t of list) {
    out.set(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength), at);
    at += t.data.byteLength;
  }
  return out;
}

// ---------------------------------------------------------------------------------
// dtype conversion

function aligned(bytes: Uint8Array, size: number, what: string): ArrayBuffer {
  if (bytes.length % size !== 0) throw new RangeError(`${what}: ${bytes.length} bytes is not a multiple of ${size}`);
  if (bytes.byteOffset % size === 0 && bytes.buffer instanceof ArrayBuffer) return bytes.buffer;
  return bytes.slice().buffer;
}

function view<T>(bytes: Uint8Array, size: number, what: string, make: (b: ArrayBuffer, off: number, len: number) => T): T {
  const buf = aligned(bytes, size, what);
  const off = buf === bytes.buffer ? bytes.byteOffset : 0;
  return make(buf, off, bytes.length / size);
}

export function bf16BytesToF32(bytes: Uint8Array): Float32Array {
  const h = view(bytes, 2, 'BF16', (b, o, n) => new Uint16Array(b, o, n));
  const out = new Float32Array(h.length);
  const bits = new Uint32Array(out.buffer);
  for (let i = 0; i < h.length; i++) bits[i] = h[i]! << 16;
  return out;
}

export function f16BytesToF32(bytes: Uint8Array): Float32Array {
  return f16ToF32(view(bytes, 2, 'F16', (b, o, n) => new Uint16Array(b, o, n)));
}

/** Always a fresh, aligned copy. */
export function f32BytesToF32(bytes: Uint8Array): Float32Array {
  if (bytes.length % 4 !== 0) throw new RangeError(`F32: ${bytes.length} bytes is not a multiple of 4`);
  return new Float32Array(bytes.slice().buffer);
}

export function toF32(dtype: SafetensorsDType, bytes: Uint8Array, where = 'tensor'): Float32Array {
  switch (dtype) {
    case 'F32':
      return f32BytesToF32(bytes);
    case 'F16':
      return f16BytesToF32(bytes);
    case 'BF16':
      return bf16BytesToF32(bytes);
    case 'F64':
      return Float32Array.from(view(bytes, 8, 'F64', (b, o, n) => new Float64Array(b, o, n)));
    default:
      throw new TypeError(`${where}: dtype ${dtype} is not a floating-point type`);
  }
}

/** f32 -> bf16 bits with round-to-nearest-even (NaN stays NaN). */
export function f32ToBf16(values: ArrayLike<number>): Uint16Array {
  const f = Float32Array.from(values);
  const bits = new Uint32Array(f.buffer);
  const out = new Uint16Array(f.length);
  for (let i = 0; i < f.length; i++) {
    const x = bits[i]!;
    if ((x & 0x7f800000) === 0x7f800000 && x & 0x7fffff) {
      out[i] = (x >>> 16) | 0x40;
      continue;
    }
    out[i] = (x + 0x7fff + ((x >>> 16) & 1)) >>> 16;
  }
  return out;
}
