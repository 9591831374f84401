import { describe, expect, it } from 'vitest';
import { f32ToF16 } from '../../src/gpu/gpu';
import {
  BlobSource,
  MAX_HEADER_BYTES,
  MemorySource,
  bf16BytesToF32,
  checkShards,
  f16BytesToF32,
  f32BytesToF32,
  f32ToBf16,
  openSafetensors,
  parseSafetensors,
  parseSafetensorsHeader,
  parseShardIndex,
  toF32,
  writeSafetensors,
  type ByteSource,
  type TensorToWrite,
} from '../../src/formats/safetensors';
import { asyncFormatErrorOf, f32Bytes, formatErrorOf, rawSafetensors } from './helpers';

const FILE = 'model-00001-of-00002.safetensors';
const parse = (bytes: Uint8Array) => parseSafetensorsHeader(bytes, FILE, bytes.length);

function sampleTensors(): TensorToWrite[] {
  return [
    { name: 'w.f32', dtype: 'F32', shape: [2, 3], data: new Float32Array([1, -2, 3.5, 0, 1e-7, -65504]) },
    { name: 'b.f16', dtype: 'F16', shape: [3], data: f32ToF16([0.5, -1.25, 2048]) },
    { name: 'a.bf16', dtype: 'BF16', shape: [2, 2], data: f32ToBf16([1, -2, 0.15625, 3e38]) },
    { name: 'ids', dtype: 'I64', shape: [2], data: new BigInt64Array([7n, -1n]) },
    { name: 'mask', dtype: 'BOOL', shape: [4], data: new Uint8Array([1, 0, 0, 1]) },
    { name: 'count', dtype: 'U32', shape: [], data: new Uint32Array([4000000000]) },
    { name: 'empty', dtype: 'F32', shape: [0, 5], data: new Float32Array(0) },
  ];
}

describe('writeSafetensors / parseSafetensorsHeader round trip', () => {
  it('writes a canonical file: padded header, name order, contiguous offsets, exact data', () => {
    const bytes = writeSafetensors(sampleTensors(), { format: 'pt', note: 'ünïcode' });
    const h = parse(bytes);
    expect(h.headerLength % 8).toBe(0);
    expect(h.dataStart).toBe(8 + h.headerLength);
    expect(h.metadata).toEqual({ format: 'pt', note: 'ünïcode' });
    const text = new TextDecoder().decode(bytes.subarray(8, h.dataStart));
    expect(text.startsWith('{"__metadata__":{"format":"pt","note":"ünïcode"},"a.bf16":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]}')).toBe(true);
    expect(/^[^ ]*\} *$/.test(text)).toBe(true);
    expect([...h.tensors.keys()]).toEqual(['a.bf16', 'b.f16', 'count', 'empty', 'ids', 'mask', 'w.f32']);
    expect([...h.tensors.values()].map((t) => [t.begin, t.end])).toEqual([
      [0, 8],
      [8, 14],
      [14, 18],
      [18, 18],
      [18, 34],
      [34, 38],
      [38, 62],
    ]);
    expect(bytes.length).toBe(h.dataStart + 62);

    const st = parseSafetensors(bytes, FILE);
    expect(Array.from(toF32('F32', st.bytes('w.f32')))).toEqual([1, -2, 3.5, 0, Math.fround(1e-7), -65504]);
    expect(Array.from(toF32('F16', st.bytes('b.f16')))).toEqual([0.5, -1.25, 2048]);
    expect(Array.from(toF32('BF16', st.bytes('a.bf16')))).toEqual([1, -2, 0.15625, 1.765625 * 2 ** 127]);
    const ids = st.tensor('ids');
    expect(ids.dtype).toBe('I64');
    expect(Array.from(new BigInt64Array(ids.data.slice().buffer))).toEqual([7n, -1n]);
    expect(Array.from(st.bytes('mask'))).toEqual([1, 0, 0, 1]);
    expect(new Uint32Array(st.bytes('count').slice().buffer)[0]).toBe(4000000000);
    expect(st.tensor('empty').shape).toEqual([0, 5]);
    expect(st.bytes('empty').length).toBe(0);
  });

  it('keeps the given order when asked, and omits __metadata__ without metadata', () => {
    const bytes = writeSafetensors(sampleTensors(), undefined, { order: 'given' });
    const h = parse(bytes);
    expect([...h.tensors.keys()]).toEqual(['w.f32', 'b.f16', 'a.bf16', 'ids', 'mask', 'count', 'empty']);
    expect(h.metadata).toEqual({});
    expect(new TextDecoder().decode(bytes.subarray(8, 16))).toBe('{"w.f32"');
  });

  it('writes exactly the bytes of a hand-assembled reference file', () => {
    const bytes = writeSafetensors([{ name: 'x', dtype: 'F32', shape: [2], data: new Float32Array([1, 2]) }], { format: 'pt' });
    const json = '{"__metadata__":{"format":"pt"},"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}';
    expect(json.length).toBe(85);
    const expected = new Uint8Array(8 + 88 + 8);
    expected[0] = 88;
    expected.set(new TextEncoder().encode(json.padEnd(88, ' ')), 8);
    expected.set(f32Bytes([1, 2]), 96);
    expect(Array.from(bytes)).toEqual(Array.from(expected));
  });

  it('round-trips numeric names without reordering them', () => {
    const t = (name: string, v: number): TensorToWrite => ({ name, dtype: 'F32', shape: [1], data: new Float32Array([v]) });
    const bytes = writeSafetensors([t('10', 10), t('2', 2), t('b', 3)]);
    const st = parseSafetensors(bytes, FILE);
    expect([...st.header.tensors.keys()]).toEqual(['10', '2', 'b']);
    expect(toF32('F32', st.bytes('2'))[0]).toBe(2);
  });

  it('refuses bad input to the writer', () => {
    const t: TensorToWrite = { name: 'x', dtype: 'F32', shape: [3], data: new Float32Array(2) };
    expect(() => writeSafetensors([t])).toThrow('F32 [3] needs 12 bytes, data has 8');
    const ok: TensorToWrite = { name: 'x', dtype: 'F32', shape: [1], data: new Float32Array(1) };
    expect(() => writeSafetensors([ok, ok])).toThrow('duplicate name');
    expect(() => writeSafetensors([{ ...ok, name: '__metadata__' }])).toThrow('invalid name');
  });
});

describe('parseSafetensorsHeader rejects malformed files, naming the file and tensor', () => {
  const entry = (dtype: string, shape: number[], begin: number, end: number) => ({ dtype, shape, data_offsets: [begin, end] });
  const expectRejected = (bytes: Uint8Array, ...parts: string[]) => {
    const e = formatErrorOf(() => parse(bytes));
    expect(e.message).toContain(FILE);
    for (const p of parts) expect(e.message).toContain(p);
    return e;
  };

  it('header length over 100 MB', () => {
    const bytes = new Uint8Array(64);
    new DataView(bytes.buffer).setUint32(0, MAX_HEADER_BYTES + 1, true);
    const e = formatErrorOf(() => parseSafetensorsHeader(bytes, FILE, 2 * MAX_HEADER_BYTES));
    expect(e.message).toBe(
      `${FILE}: header length 100000001 is larger than the 100 MB limit, so this is not a valid safetensors file. The file is damaged or incomplete: re-download it.`,
    );
    const huge = new Uint8Array(8).fill(0xff);
    expect(formatErrorOf(() => parseSafetensorsHeader(huge, FILE, 1e12)).message).toContain('header length 18446744073709552000');
  });

  it('asks for more bytes when given only part of the header', () => {
    const bytes = writeSafetensors([{ name: 'x', dtype: 'U8', shape: [1], data: new Uint8Array(1) }]);
    expect(() => parseSafetensorsHeader(bytes.subarray(0, 20), FILE, bytes.length)).toThrow(`${FILE}: parseSafetensorsHeader needs the first 64 bytes, got 20`);
  });

  it('header longer than the file', () => {
    const bytes = rawSafetensors({});
    expectRejected(bytes.subarray(0, 9), 'header claims 2 bytes but the file is only 9 bytes long (truncated)', 're-download');
  });

  it('file shorter than 8 bytes', () => {
    expectRejected(new Uint8Array(5), 'is 5 bytes, too short to be a safetensors file');
  });

  it('bad JSON', () => {
    expectRejected(rawSafetensors('{"x": {"dtype": "F32",'), 'header is not valid JSON', 're-download');
  });

  it('header not starting with {', () => {
    expectRejected(rawSafetensors('[1, 2, 3]'), 'header does not start with "{"');
  });

  it('invalid UTF-8 in the header', () => {
    const bytes = rawSafetensors('{"ab"}');
    bytes[10] = 0xff;
    expectRejected(bytes, 'header is not valid UTF-8');
  });

  it('unknown dtype', () => {
    const e = expectRejected(rawSafetensors({ 'model.embed_tokens.weight': entry('F8_E4M3', [2], 0, 2) }, 2), 'tensor "model.embed_tokens.weight"', 'unsupported dtype "F8_E4M3"');
    expect(e.message).toContain('Convert the checkpoint to BF16, F16 or F32');
    expect(e.item).toBe('tensor "model.embed_tokens.weight"');
  });

  it('size mismatch between dtype x shape and offsets', () => {
    expectRejected(
      rawSafetensors({ 'layers.0.w': entry('BF16', [3, 4], 0, 20) }, 20),
      'tensor "layers.0.w"',
      'data_offsets [0, 20] cover 20 bytes but BF16 [3,4] needs 24',
      're-download',
    );
  });

  it('offsets past the end of the data (truncated file)', () => {
    expectRejected(
      rawSafetensors({ a: entry('F32', [2], 0, 8), b: entry('F32', [4], 8, 24) }, 20),
      'tensor "b"',
      'data_offsets [8, 24] run past the end of the data section (20 bytes; the file is truncated)',
    );
  });

  it('overlapping tensors', () => {
    expectRejected(
      rawSafetensors({ a: entry('F32', [2], 0, 8), b: entry('F32', [2], 4, 12) }, 12),
      'tensor "b"',
      'overlap tensor "a" [0, 8]',
    );
  });

  it('a gap between tensors', () => {
    expectRejected(
      rawSafetensors({ a: entry('F32', [1], 0, 4), b: entry('F32', [1], 8, 12) }, 12),
      'tensor "b"',
      'data is not contiguous: 4 unused bytes after tensor "a" (offset 4 to 8)',
    );
  });

  it('a gap at the start of the data', () => {
    expectRejected(rawSafetensors({ a: entry('U8', [4], 4, 8) }, 8), 'tensor "a"', '4 unused bytes at the start of the data section');
  });

  it('trailing bytes after the last tensor', () => {
    expectRejected(rawSafetensors({ a: entry('F32', [2], 0, 8) }, 11), 'the header describes 8 data bytes but the file holds 11 (3 trailing bytes)');
  });

  it('an empty header with data after it', () => {
    expectRejected(rawSafetensors({}, 4), 'describes 0 data bytes but the file holds 4');
  });

  it('offsets that end before they begin', () => {
    expectRejected(rawSafetensors({ a: entry('U8', [0], 4, 0) }, 4), 'tensor "a"', 'data_offsets [4, 0] end before they begin');
  });

  it('malformed shape and offsets', () => {
    expectRejected(rawSafetensors({ a: { dtype: 'F32', shape: [-1], data_offsets: [0, 4] } }, 4), 'tensor "a"', '"shape" is [-1], expected a list of non-negative integers');
    expectRejected(rawSafetensors({ a: { dtype: 'F32', shape: [1.5], data_offsets: [0, 4] } }, 4), '"shape" is [1.5]');
    expectRejected(rawSafetensors({ a: { dtype: 'F32', shape: [1], data_offsets: [0] } }, 4), '"data_offsets" is [0], expected a list of 2 non-negative integers');
    expectRejected(rawSafetensors({ a: [1, 2] }, 0), 'tensor "a"', 'entry is [1,2], expected an object');
  });

  it('non-string metadata', () => {
    expectRejected(rawSafetensors({ __metadata__: { format: 1 } }), '__metadata__.format', 'is 1, expected a string');
  });

  it('accepts zero-sized tensors sharing an offset and unpadded headers', () => {
    const h = parse(rawSafetensors({ z1: entry('F32', [0], 4, 4), a: entry('F32', [1], 0, 4), z2: entry('I8', [3, 0], 4, 4) }, 4));
    expect([...h.tensors.keys()]).toEqual(['a', 'z1', 'z2']);
    expect(h.headerLength).toBe(JSON.stringify({ z1: entry('F32', [0], 4, 4), a: entry('F32', [1], 0, 4), z2: entry('I8', [3, 0], 4, 4) }).length);
  });
});

/** Counts reads so the tests can see that tensors are fetched piece by piece. */
class CountingSource implements ByteSource {
  reads: [number, number][] = [];
  constructor(private readonly inner: ByteSource) {}
  get size() {
    return this.inner.size;
  }
  get name() {
    return this.inner.name;
  }
  read(offset: number, length: number) {
    this.reads.push([offset, length]);
    return this.inner.read(offset, length);
  }
}

describe('openSafetensors', () => {
  const rows = 37;
  const cols = 11;
  const big = new Float32Array(rows * cols).map((_, i) => i * 0.5 - 7);
  const file = writeSafetensors([
    { name: 'big', dtype: 'F32', shape: [rows, cols], data: big },
    { name: 'scalar', dtype: 'F64', shape: [], data: new Float64Array([Math.PI]) },
    { name: 'vec', dtype: 'BF16', shape: [5], data: f32ToBf16([1, 2, 3, 4, 5]) },
  ]);

  it('reads tensors from memory with metadata', async () => {
    const st = await openSafetensors(new MemorySource(file, 'm.safetensors'));
    expect(st.name).toBe('m.safetensors');
    expect(st.tensors.get('big')).toMatchObject({ dtype: 'F32', shape: [37, 11], byteLength: 37 * 11 * 4 });
    const t = await st.readTensor('big');
    expect(t.shape).toEqual([37, 11]);
    expect(Array.from(f32BytesToF32(t.data))).toEqual(Array.from(big));
    expect((await st.readTensorF32('scalar'))[0]).toBe(Math.fround(Math.PI));
    expect(Array.from(await st.readTensorF32('vec'))).toEqual([1, 2, 3, 4, 5]);
  });

  it('streams row-aligned chunks that reassemble exactly', async () => {
    const src = new CountingSource(new MemorySource(file, 'm.safetensors'));
    const st = await openSafetensors(src);
    src.reads = [];
    const chunks = [];
    for await (const c of st.readTensorChunks('big', 200)) chunks.push(c);
    // 44 bytes per row -> 4 rows (176 bytes) per chunk, 37 rows -> 10 chunks, the last 1 row.
    expect(chunks.map((c) => [c.rowStart, c.rowCount])).toEqual([
      [0, 4], [4, 4], [8, 4], [12, 4], [16, 4], [20, 4], [24, 4], [28, 4], [32, 4], [36, 1],
    ]);
    expect(chunks[9]!.shape).toEqual([1, 11]);
    expect(chunks.every((c) => c.data.length === c.rowCount * 44 && c.data.length <= 200)).toBe(true);
    expect(src.reads.length).toBe(10);
    const joined = new Uint8Array(chunks.reduce((n, c) => n + c.data.length, 0));
    let at = 0;
    for (const c of chunks) {
      joined.set(c.data, at);
      at += c.data.length;
    }
    expect(Array.from(f32BytesToF32(joined))).toEqual(Array.from(big));
  });

  it('yields one row per chunk when a row is larger than maxBytes', async () => {
    const st = await openSafetensors(new MemorySource(file));
    const chunks = [];
    for await (const c of st.readTensorChunks('big', 10)) chunks.push(c);
    expect(chunks.length).toBe(37);
    expect(Array.from(f32BytesToF32(chunks[5]!.data))).toEqual(Array.from(big.subarray(55, 66)));
    const scalar = [];
    for await (const c of st.readTensorChunks('scalar', 1)) scalar.push(c);
    expect(scalar.map((c) => [c.rowCount, c.shape, c.data.length])).toEqual([[1, [], 8]]);
  });

  it('names the missing tensor', async () => {
    const st = await openSafetensors(new MemorySource(file, 'm.safetensors'));
    const e = await asyncFormatErrorOf(() => st.readTensor('lm_head.weight'));
    expect(e.message).toContain('m.safetensors, tensor "lm_head.weight": no such tensor in this file (it holds 3: "big", "scalar", "vec")');
  });

  it('rejects a truncated file', async () => {
    const cut = file.subarray(0, file.length - 3);
    const e = await asyncFormatErrorOf(() => openSafetensors(new MemorySource(cut, 'cut.safetensors')));
    expect(e.message).toContain('cut.safetensors, tensor "vec": data_offsets [1636, 1646] run past the end of the data section (1643 bytes; the file is truncated)');
    expect(e.message).toContain('re-download');
    const headerOnly = file.subarray(0, 20);
    const e2 = await asyncFormatErrorOf(() => openSafetensors(new MemorySource(headerOnly, 'h.safetensors')));
    expect(e2.message).toMatch(/^h\.safetensors: header claims \d+ bytes but the file is only 20 bytes long \(truncated\)/);
  });

  it('reads a header larger than the first read', async () => {
    const many: TensorToWrite[] = [];
    for (let i = 0; i < 2000; i++) many.push({ name: `model.layers.${i}.some_long_tensor_name.weight`, dtype: 'U8', shape: [1], data: new Uint8Array([i & 255]) });
    const bytes = writeSafetensors(many);
    const src = new CountingSource(new MemorySource(bytes));
    const st = await openSafetensors(src);
    expect(src.reads.length).toBe(2);
    expect(st.header.headerLength).toBeGreaterThan(1 << 16);
    expect(Array.from((await st.readTensor('model.layers.1999.some_long_tensor_name.weight')).data)).toEqual([1999 & 255]);
  });

  it('reads through a Blob, one slice at a time', async () => {
    const blob = new Blob([file]);
    const src = new BlobSource(blob, 'blob.safetensors');
    expect(src.size).toBe(file.length);
    const st = await openSafetensors(src);
    expect(Array.from(await st.readTensorF32('vec'))).toEqual([1, 2, 3, 4, 5]);
    const chunks = [];
    for await (const c of st.readTensorChunks('big', 44 * 10)) chunks.push(c);
    expect(chunks.map((c) => c.rowCount)).toEqual([10, 10, 10, 7]);
    expect(Array.from(f32BytesToF32(chunks[3]!.data))).toEqual(Array.from(big.subarray(30 * 11)));
    await expect(src.read(file.length - 2, 3)).rejects.toThrow('is outside the file');
  });

  it('takes the name of a File', () => {
    const f = new File([file], 'picked.safetensors');
    expect(new BlobSource(f).name).toBe('picked.safetensors');
  });
});

describe('dtype conversion', () => {
  it('widens bf16, f16 and f32 bytes, including unaligned views', () => {
    const bf = new Uint8Array(1 + 8);
    bf.set(new Uint8Array(f32ToBf16([1.5, -0.0078125, Infinity, NaN]).buffer), 1);
    const out = bf16BytesToF32(bf.subarray(1));
    expect(Array.from(out.subarray(0, 3))).toEqual([1.5, -0.0078125, Infinity]);
    expect(Number.isNaN(out[3])).toBe(true);

    const h = new Uint8Array(7);
    h.set(new Uint8Array(f32ToF16([65504, -(2 ** -24), 0.1]).buffer), 1);
    expect(Array.from(f16BytesToF32(h.subarray(1)))).toEqual([65504, -(2 ** -24), 0.0999755859375]);

    const f = new Uint8Array(9);
    f.set(f32Bytes([3.25, -1]), 1);
    expect(Array.from(f32BytesToF32(f.subarray(1)))).toEqual([3.25, -1]);
    expect(() => toF32('I32', new Uint8Array(4))).toThrow('not a floating-point type');
    expect(() => bf16BytesToF32(new Uint8Array(3))).toThrow('3 bytes is not a multiple of 2');
  });

  it('rounds f32 to bf16 to nearest even', () => {
    // 1 + 2^-8 is halfway between bf16 1 and 1 + 2^-7: ties to even (1).
    // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to even (1 + 2^-6).
    const b = f32ToBf16([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20]);
    expect(Array.from(bf16BytesToF32(new Uint8Array(b.buffer)))).toEqual([1, 1 + 2 ** -6, 1 + 2 ** -7]);
  });
});

describe('sharded checkpoints', () => {
  const index = {
    metadata: { total_size: 24 },
    weight_map: {
      'model.embed_tokens.weight': 'model-00001-of-00002.safetensors',
      'model.norm.weight': 'model-00002-of-00002.safetensors',
      'lm_head.weight': 'model-00002-of-00002.safetensors',
    },
  };
  const NAME = 'model.safetensors.index.json';

  it('parses the weight map from text, bytes or an object', () => {
    for (const input of [index, JSON.stringify(index), new TextEncoder().encode(JSON.stringify(index))]) {
      const idx = parseShardIndex(input, NAME);
      expect(idx.totalSize).toBe(24);
      expect(idx.shards).toEqual(['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']);
      expect(idx.weightMap.get('lm_head.weight')).toBe('model-00002-of-00002.safetensors');
      expect(idx.weightMap.size).toBe(3);
    }
  });

  it('rejects malformed indexes', () => {
    const bad = (v: unknown) => formatErrorOf(() => parseShardIndex(v, NAME)).message;
    expect(bad('{"weight_map": ')).toContain(`${NAME}: is not valid JSON`);
    expect(bad({ metadata: {} })).toBe(`${NAME}, weight_map: is missing. The file is damaged or incomplete: re-download it.`);
    expect(bad({ weight_map: {} })).toContain(`${NAME}, weight_map: is empty`);
    expect(bad({ weight_map: { a: 3 } })).toContain('weight_map["a"]: is 3, expected a shard file name');
    expect(bad({ weight_map: { a: 'pytorch_model-00001.bin' } })).toContain('which is not a .safetensors file');
    expect(bad({ weight_map: { a: '../secret.safetensors' } })).toContain('points outside the checkpoint folder');
    expect(bad({ metadata: { total_size: -1 }, weight_map: { a: 'x.safetensors' } })).toContain('metadata.total_size: is -1');
  });

  it('cross-checks shard headers against the index', () => {
    const idx = parseShardIndex(index, NAME);
    const t = (name: string) => ({ name, dtype: 'F32' as const, shape: [2], data: new Float32Array(2) });
    const header = (name: string, bytes: Uint8Array) => parseSafetensorsHeader(bytes, name, bytes.length);
    const s1 = header('model-00001-of-00002.safetensors', writeSafetensors([t('model.embed_tokens.weight')]));
    const s2 = header('model-00002-of-00002.safetensors', writeSafetensors([t('model.norm.weight'), t('lm_head.weight')]));
    expect(() => checkShards(idx, new Map([[s1.fileName, s1], [s2.fileName, s2]]))).not.toThrow();

    expect(formatErrorOf(() => checkShards(idx, new Map([[s1.fileName, s1]]))).message).toContain(
      'lists shard "model-00002-of-00002.safetensors" but that file was not provided',
    );
    const s2missing = header('model-00002-of-00002.safetensors', writeSafetensors([t('model.norm.weight')]));
    expect(formatErrorOf(() => checkShards(idx, new Map([[s1.fileName, s1], [s2.fileName, s2missing]]))).message).toContain(
      'model-00002-of-00002.safetensors, tensor "lm_head.weight": is missing, though model.safetensors.index.json places it in this shard',
    );
    const s1extra = header('model-00001-of-00002.safetensors', writeSafetensors([t('model.embed_tokens.weight'), t('model.norm.weight')]));
    expect(formatErrorOf(() => checkShards(idx, new Map([[s1.fileName, s1extra], [s2.fileName, s2]]))).message).toContain(
      'tensor "model.norm.weight": is in this shard but model.safetensors.index.json places it in model-00002-of-00002.safetensors',
    );
  });
});
