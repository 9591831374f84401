/**
 * The quantized-model cache: a second load reads nothing from the source and gives the
 * same weights byte for byte; a full store leaves no partial entry behind.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { downloadQ4 } from '../../src/kernels/q4-layout';
import { MemoryModelCache, ModelCacheError, OpfsModelCache, modelCacheKey, opfsFileName, type CacheManifest, type ModelCache } from '../../src/model/cache';
import { FormatError } from '../../src/formats/errors';
import { MemorySource } from '../../src/formats/safetensors';
import { loadLlama, type LoadedModel } from '../../src/model/load';
import { openModelDir } from '../../src/model/node-source';
import { loadTokenizer } from '../../src/model/tokenizer';
import type { Gpu } from '../../src/gpu/gpu';
import { useGpu } from '../helpers/gpu';
import { ROOT, TINY_DIR, countingSource, expectSameBytes, linearValues, memorySource, syntheticModel } from '../helpers/model-files';
import { FakeDirectory, FakeQuota } from '../helpers/model-opfs';
import { llamaOnnxFolder, type LlamaOnnxOptions } from '../../src/formats/onnx-llama';
import { readCheckpoint, type CheckpointValues } from '../peer/onnx-model';

/** Every weight of two loaded models is the same, byte for byte. */
async function expectSameWeights(gpu: Gpu, a: LoadedModel, b: LoadedModel): Promise<void> {
  const [x, y] = [a.weights, b.weights];
  expect(y.bytes).toBe(x.bytes);
  expect(y.config).toEqual(x.config);
  expect(b.generation).toEqual(a.generation);
  if (x.embed.format === 'q4' && y.embed.format === 'q4') {
    const [p, q] = [await downloadQ4(gpu, x.embed.table), await downloadQ4(gpu, y.embed.table)];
    expectSameBytes(q.qweight, p.qweight, 'embedding qweight');
    expectSameBytes(q.scales, p.scales, 'embedding scales');
    expectSameBytes(q.zeros!, p.zeros!, 'embedding zeros');
  } else if (x.embed.format === 'f32' && y.embed.format === 'f32') {
    expectSameBytes(await gpu.readF32(y.embed.table), await gpu.readF32(x.embed.table), 'embedding');
  } else {
    throw new Error('embedding formats differ');
  }
  for (let l = 0; l < x.layers.length; l++) {
    for (const f of ['q', 'k', 'v', 'o', 'gate', 'up', 'down'] as const) {
      expectSameBytes(await linearValues(gpu, y.layers[l]![f]), await linearValues(gpu, x.layers[l]![f]), `layer ${l} ${f}`);
    }
    expectSameBytes(await gpu.readF32(y.layers[l]!.inputNorm), await gpu.readF32(x.layers[l]!.inputNorm), `layer ${l} input norm`);
    expectSameBytes(await gpu.readF32(y.layers[l]!.postNorm), await gpu.readF32(x.layers[l]!.postNorm), `layer ${l} post norm`);
  }
  expectSameBytes(await gpu.readF32(y.finalNorm), await gpu.readF32(x.finalNorm), 'final norm');
  expectSameBytes(await gpu.readF32(y.invFreq), await gpu.readF32(x.invFreq), 'invFreq');
}

describe('loadLlama with a model cache', () => {
  const gpu = useGpu();

  it('second load of tiny-llama (q4) reads nothing from the source and gives identical weights and tokenizer', async () => {
    const cache = new MemoryModelCache();
    const first = await loadLlama(gpu(), await openModelDir(TINY_DIR), { format: 'q4', cache });
    expect(first.fromCache).toBe(false);
    expect(first.cacheError).toBeNull();
    const [manifest] = await cache.list();
    expect(manifest!.format).toBe('q4');
    expect(manifest!.files.map((f) => f.name)).toEqual(expect.arrayContaining(['config.json', 'tokenizer.json', 'tokenizer_config.json', 'model.embed_tokens.weight.qweight']));
    // 4-bit payload: what the GPU holds, without pool rounding (plus the text files).
    const texts = manifest!.files.filter((f) => f.name.endsWith('.json')).reduce((a, f) => a + f.size, 0);
    expect(manifest!.bytes - texts).toBeLessThanOrEqual(first.weights.bytes);

    const { source, log } = countingSource(await openModelDir(TINY_DIR));
    const events: string[] = [];
    const second = await loadLlama(gpu(), source, { format: 'q4', cache, onProgress: (p) => events.push(p.phase) });
    expect(log.calls).toEqual([]);
    expect(log.reads).toBe(0);
    expect(second.fromCache).toBe(true);
    expect(new Set(events)).toEqual(new Set(['cache-read']));
    await expectSameWeights(gpu(), first, second);

    // The tokenizer comes from the cached files as well.
    const fixture = JSON.parse(await readFile(join(ROOT, 'test', 'fixtures', 'tiny-llama.json'), 'utf8')) as { sequences: { name: string; ids: number[]; messages: { role: string; content: string }[]; date_string: string }[] };
    const chat = fixture.sequences.find((s) => s.name === 'chat')!;
    const tok = await loadTokenizer(second.files);
    expect(tok.applyChatTemplate(chat.messages, { dateString: chat.date_string })).toEqual(chat.ids);
    expect(log.calls).toEqual([]);
    first.weights.release();
    second.weights.release();
  });

  it('the cached bytes re-shard for another device limit; f32 models cache too', async () => {
    const m = syntheticModel({ vocab: 1000, seed: 29 });
    const cache = new MemoryModelCache();
    const first = await loadLlama(gpu(), memorySource(m.files), { format: 'q4', cache });
    const second = await loadLlama(gpu(), memorySource({}), { format: 'q4', cache, maxShardBytes: 4 << 10, maxChunkBytes: 3000 });
    expect(second.fromCache).toBe(true);
    if (second.weights.embed.format !== 'q4') throw new Error('q4 expected');
    expect(second.weights.embed.table.shards.length).toBe(8);
    await expectSameWeights(gpu(), { ...first, weights: { ...first.weights, bytes: second.weights.bytes } }, second);

    const f1 = await loadLlama(gpu(), memorySource(m.files), { format: 'f32', cache });
    expect(f1.fromCache).toBe(false);
    const f2 = await loadLlama(gpu(), memorySource({}), { format: 'f32', cache });
    expect(f2.fromCache).toBe(true);
    await expectSameWeights(gpu(), f1, f2);
    expect((await cache.list()).map((e) => e.format).sort()).toEqual(['f32', 'q4']);
    for (const x of [first, second, f1, f2]) x.weights.release();
  });

  it('another revision of the same source is a different entry', async () => {
    const m = syntheticModel({ seed: 31 });
    const cache = new MemoryModelCache();
    const a = await loadLlama(gpu(), memorySource(m.files, 'repo', 'r1'), { format: 'q4', cache });
    const b = await loadLlama(gpu(), memorySource(m.files, 'repo', 'r2'), { format: 'q4', cache });
    expect(b.fromCache).toBe(false);
    expect((await cache.list()).map((e) => e.revision).sort()).toEqual(['r1', 'r2']);
    expect(modelCacheKey('repo', 'r1', 'q4')).not.toBe(modelCacheKey('repo', 'r2', 'q4'));
    expect(modelCacheKey('owner/name', 'main', 'q4')).toMatch(/^[A-Za-z0-9._@-]+$/);
    a.weights.release();
    b.weights.release();
  });

  it('a full store: the model still loads, the error says so, and nothing partial is kept', async () => {
    const m = syntheticModel({ seed: 37 });
    const cache = new MemoryModelCache(10_000);
    const a = await loadLlama(gpu(), memorySource(m.files), { format: 'q4', cache });
    expect(a.fromCache).toBe(false);
    expect(a.cacheError).toBeInstanceOf(ModelCacheError);
    expect(a.cacheError!.message).toMatch(/^Storage full: caching this model needs \d+ MB of browser storage .*Free space or delete cached models/);
    expect(await cache.list()).toEqual([]);
    expect(await linearValues(gpu(), a.weights.layers[0]!.q)).toHaveLength(64 * 64);
    a.weights.release();
  });
});

describe('a damaged cache entry', () => {
  const gpu = useGpu();

  it('is dropped, and the model loads from its source and is stored again', async () => {
    const m = syntheticModel({ seed: 47 });
    const cache = new MemoryModelCache();
    const good = await loadLlama(gpu(), memorySource(m.files), { format: 'q4', cache });
    // Every cached tensor file now reads one byte short.
    const damaged: ModelCache = {
      ...cache,
      list: () => cache.list(),
      put: (k, man, files) => cache.put(k, man, files),
      delete: (k) => cache.delete(k),
      get: async (k) => {
        const e = await cache.get(k);
        return e && { manifest: e.manifest, open: async (f) => {
          const src = await e.open(f);
          return f.endsWith('.json') ? src : new MemorySource(await src.read(0, src.size - 1), f);
        } };
      },
    };
    const { source, log } = countingSource(memorySource(m.files));
    const again = await loadLlama(gpu(), source, { format: 'q4', cache: damaged });
    expect(again.fromCache).toBe(false);
    expect(again.cacheError).toBeInstanceOf(FormatError);
    expect(again.cacheError!.message).toMatch(/holds \d+ bytes, expected \d+\. Delete the cached model/);
    expect(log.reads).toBeGreaterThan(0);
    expect(await cache.list()).toHaveLength(1);
    await expectSameWeights(gpu(), good, again);
    good.weights.release();
    again.weights.release();
  });
});

describe('OpfsModelCache (on an in-memory file system)', () => {
  const gpu = useGpu();

  it('round-trips a model through files and manifest', async () => {
    const m = syntheticModel({ seed: 41 });
    const root = new FakeDirectory();
    const cache = new OpfsModelCache(root);
    const first = await loadLlama(gpu(), memorySource(m.files), { format: 'q4', cache });
    expect(first.cacheError).toBeNull();
    const [manifest] = await cache.list();
    const dir = root.dirs.get(manifest!.key)!;
    expect([...dir.files.keys()].sort()).toEqual([...manifest!.files.map((f) => f.name), 'manifest.json'].sort());
    const second = await loadLlama(gpu(), memorySource({}), { format: 'q4', cache });
    expect(second.fromCache).toBe(true);
    await expectSameWeights(gpu(), first, second);
    await cache.delete(manifest!.key);
    expect(await cache.list()).toEqual([]);
    expect(root.bytes()).toBe(0);
    first.weights.release();
    second.weights.release();
  });

  it('stores each file under one OPFS entry name: "/" escaped (and "%", so names stay distinct)', () => {
    expect(opfsFileName('onnx/model_q4f16.onnx_data')).toBe('onnx%2Fmodel_q4f16.onnx_data');
    expect(opfsFileName('model.layers.0.mlp.up_proj.weight.qweight')).toBe('model.layers.0.mlp.up_proj.weight.qweight');
    expect(opfsFileName('a%2Fb')).not.toBe(opfsFileName('a/b'));
    for (const n of ['onnx/model.onnx', 'a%2Fb', 'a/b/c']) expect(opfsFileName(n)).not.toMatch(/[/\\]/);
  });

  it('QuotaExceededError part-way: a clear error and no entry left', async () => {
    const m = syntheticModel({ seed: 43 });
    const quota = new FakeQuota(15_000);
    const root = new FakeDirectory(quota);
    const cache = new OpfsModelCache(root);
    const a = await loadLlama(gpu(), memorySource(m.files), { format: 'q4', cache });
    expect(a.cacheError).toBeInstanceOf(ModelCacheError);
    expect(a.cacheError!.message).toMatch(/^Storage full: .*Free space or delete cached models/);
    expect(quota.filesWritten).toBeGreaterThan(3); // it failed part-way through the entry
    expect(root.dirs.size).toBe(0);
    expect(quota.used).toBe(0);
    expect(await cache.list()).toEqual([]);
    a.weights.release();
  });

  it('refuses up front when the storage estimate leaves too little room', async () => {
    const root = new FakeDirectory();
    const cache = new OpfsModelCache(root, () => Promise.resolve({ usage: 900, quota: 1000 }));
    const manifest = { version: 1, key: 'k', files: [{ name: 'a', size: 500 }], bytes: 500 } as unknown as CacheManifest;
    await expect(cache.put('k', manifest, [{ name: 'a', parts: [new Uint8Array(500)] }])).rejects.toThrow(/^Storage full: caching this model needs 0 MB of browser storage \(0 MB free\)/);
    expect(root.dirs.size).toBe(0);
  });

  it('drops entries a closed tab left without a manifest', async () => {
    const root = new FakeDirectory();
    await root.getDirectoryHandle('half-written', { create: true });
    const cache = new OpfsModelCache(root);
    expect(await cache.get('half-written')).toBeNull();
    expect(await cache.list()).toEqual([]);
    expect(root.dirs.size).toBe(0);
  });
});

describe('an ONNX export (onnx-community layout) in the cache', () => {
  const gpu = useGpu();
  let ckpt: CheckpointValues | null = null;
  const folder = async (options: LlamaOnnxOptions): Promise<Record<string, Uint8Array | string>> => {
    ckpt ??= await readCheckpoint(TINY_DIR);
    return llamaOnnxFolder(ckpt.configJson, ckpt.textFiles, ckpt.config, ckpt.values, options);
  };
  const asBytes = (v: Uint8Array | string): Uint8Array => (typeof v === 'string' ? new TextEncoder().encode(v) : v);

  it('is stored byte for byte in OPFS; the second load reads nothing from the source and gives the same weights', async () => {
    const files = await folder({ weights: 'q4', embedding: 'q4' });
    const root = new FakeDirectory();
    const cache = new OpfsModelCache(root);
    const reference = await loadLlama(gpu(), memorySource(files, 'onnx-community/tiny-ONNX', 'main'), { format: 'q4' });
    const a = countingSource(memorySource(files, 'onnx-community/tiny-ONNX', 'main'));
    const first = await loadLlama(gpu(), a.source, { format: 'q4', cache, maxChunkBytes: 1 << 16 });
    expect(first.cacheError).toBeNull();
    expect(first.fromCache).toBe(false);
    expect(first.sourceName).toBe('onnx-community/tiny-ONNX');
    // The source was read once: each byte of the external data exactly once.
    const dataSize = asBytes(files['onnx/model_q4.onnx_data']!).length;
    const onnxSize = asBytes(files['onnx/model_q4.onnx']!).length;
    expect(a.log.bytesRead).toBe(dataSize + onnxSize);
    expect(a.log.largestRead).toBeLessThanOrEqual(Math.max(1 << 16, onnxSize));
    const [manifest] = await cache.list();
    expect(manifest!.format).toBe('onnx');
    expect(manifest!.onnxFile).toBe('onnx/model_q4.onnx');
    const dir = root.dirs.get(manifest!.key)!;
    // OPFS refuses "/" in an entry name (as the fake does): the export's onnx/ files are stored under escaped names.
    expect([...dir.files.keys()]).toEqual(expect.arrayContaining(['onnx%2Fmodel_q4.onnx', 'onnx%2Fmodel_q4.onnx_data', 'config.json']));
    for (const name of ['onnx/model_q4.onnx', 'onnx/model_q4.onnx_data', 'config.json', 'tokenizer.json']) {
      expectSameBytes(dir.files.get(opfsFileName(name))!, asBytes(files[name]!), `cached ${name}`);
    }
    expect(manifest!.bytes).toBe(root.bytes() - dir.files.get('manifest.json')!.length);

    const b = countingSource(memorySource(files, 'onnx-community/tiny-ONNX', 'main'));
    const events = new Set<string>();
    const second = await loadLlama(gpu(), b.source, { format: 'q4', cache, onProgress: (p) => events.add(p.phase) });
    expect(b.log.calls).toEqual([]);
    expect(b.log.reads).toBe(0);
    expect(second.fromCache).toBe(true);
    expect(second.cacheError).toBeNull();
    expect(events).toEqual(new Set(['cache-read']));
    await expectSameWeights(gpu(), reference, first);
    await expectSameWeights(gpu(), reference, second);
    // The tokenizer comes from the cached files too.
    const tok = await loadTokenizer(second.files);
    expect(tok.encode('The capital of France').length).toBeGreaterThan(0);
    expect(b.log.calls).toEqual([]);
    // The same entry serves format f32 (the files are stored, not the GPU layout).
    const f32 = await loadLlama(gpu(), b.source, { format: 'f32', cache });
    expect(f32.fromCache).toBe(true);
    expect(b.log.reads).toBe(0);
    for (const m of [reference, first, second, f32]) m.weights.release();
  });

  it('a large dense (f16) embedding of a 4-bit export is quantized on the GPU, as the memory plan assumes', async () => {
    const files = await folder({ weights: 'q4', scales: 'f16', zeroPoints: false, embedding: 'f16' });
    const exact = await loadLlama(gpu(), memorySource(files), { format: 'q4' });
    const small = await loadLlama(gpu(), memorySource(files), { format: 'q4', denseEmbeddingMaxBytes: 1 << 20 });
    try {
      expect(exact.weights.embed.format).toBe('f32');
      expect(small.weights.embed.format).toBe('q4');
      const { vocabSize: V, hiddenSize: C } = small.weights.config;
      // The f32 table (V x C x 4 bytes) became 4-bit rows (C/2 bytes, plus f16 scales and zero points per 32).
      expect(exact.weights.bytes - small.weights.bytes).toBeGreaterThan(V * C * 4 - V * C * (0.5 + 2 / 32 + 1 / 64) - (4 << 20));
      // Layer weights are the file's bytes either way.
      expectSameBytes(await linearValues(gpu(), small.weights.layers[1]!.down), await linearValues(gpu(), exact.weights.layers[1]!.down), 'layer 1 down');
    } finally {
      exact.weights.release();
      small.weights.release();
    }
  });

  it('a damaged entry is reported, dropped, and the model downloads again; a full store still loads', async () => {
    const files = await folder({ weights: 'q4', scales: 'f16', zeroPoints: false, embedding: 'f16' });
    const root = new FakeDirectory();
    const cache = new OpfsModelCache(root);
    const first = await loadLlama(gpu(), memorySource(files, 'onnx-model', 'r1'), { format: 'q4', cache });
    const [manifest] = await cache.list();
    expect(manifest!.onnxFile).toBe('onnx/model_q4f16.onnx');
    const dir = root.dirs.get(manifest!.key)!;
    const stored = opfsFileName('onnx/model_q4f16.onnx_data');
    const data = dir.files.get(stored)!;
    dir.files.set(stored, data.subarray(0, data.length - 100));
    const again = countingSource(memorySource(files, 'onnx-model', 'r1'));
    const second = await loadLlama(gpu(), again.source, { format: 'q4', cache });
    expect(second.fromCache).toBe(false);
    expect(second.cacheError).toBeInstanceOf(FormatError);
    expect(second.cacheError!.message).toMatch(/onnx_data: holds \d+ bytes, expected \d+\. Delete the cached model/);
    expect(again.log.reads).toBeGreaterThan(0);
    expect(root.dirs.get(manifest!.key)!.files.get(stored)!.length).toBe(data.length);
    await expectSameWeights(gpu(), first, second);
    // A lost file (not just a short one) is reported the same way.
    root.dirs.get(manifest!.key)!.files.delete(stored);
    const third = await loadLlama(gpu(), memorySource(files, 'onnx-model', 'r1'), { format: 'q4', cache });
    expect(third.cacheError).toBeInstanceOf(ModelCacheError);
    expect(third.cacheError!.message).toMatch(/lost its file onnx\/model_q4f16.onnx_data/);

    const quota = new FakeQuota(5_000);
    const full = new OpfsModelCache(new FakeDirectory(quota));
    const small = await loadLlama(gpu(), memorySource(files, 'onnx-model', 'r1'), { format: 'q4', cache: full });
    expect(small.cacheError).toBeInstanceOf(ModelCacheError);
    expect(small.cacheError!.message).toMatch(/^Storage full: .*Free space or delete cached models/);
    expect(quota.used).toBe(0);
    expect(await full.list()).toEqual([]);
    await expectSameWeights(gpu(), first, small);
    for (const m of [first, second, third, small]) m.weights.release();
  });
});

describe('cancelling a load', () => {
  const gpu = useGpu();

  it('mid-download of an ONNX export: an AbortError, no partial entry, the other entries kept', async () => {
    const ck = await readCheckpoint(TINY_DIR);
    const files = llamaOnnxFolder(ck.configJson, ck.textFiles, ck.config, ck.values, { weights: 'q4', embedding: 'q4' });
    const root = new FakeDirectory();
    const cache = new OpfsModelCache(root);
    const kept = await loadLlama(gpu(), memorySource(syntheticModel({ seed: 53 }).files, 'other'), { format: 'q4', cache });
    expect(kept.cacheError).toBeNull();
    const before = root.bytes();
    const ctrl = new AbortController();
    let abortedAt = 0;
    const { source, log } = countingSource(memorySource(files, 'onnx-model', 'r1'));
    const load = loadLlama(gpu(), source, {
      format: 'q4',
      cache,
      maxChunkBytes: 1 << 14,
      signal: ctrl.signal,
      onProgress: (p) => {
        if (!ctrl.signal.aborted && p.file.endsWith('_data') && p.bytesDone > p.bytesTotal / 3) {
          abortedAt = log.reads;
          ctrl.abort();
        }
      },
    });
    await expect(load).rejects.toMatchObject({ name: 'AbortError', message: /cancelled/ });
    expect(abortedAt).toBeGreaterThan(0);
    expect(log.reads).toBe(abortedAt); // no read after the cancel
    expect(root.bytes()).toBe(before);
    expect((await cache.list()).map((m) => m.source)).toEqual(['other']);
    const again = await loadLlama(gpu(), memorySource({}, 'other'), { format: 'q4', cache });
    expect(again.fromCache).toBe(true);
    await expectSameWeights(gpu(), kept, again);
    kept.weights.release();
    again.weights.release();
  });

  it('of a safetensors checkpoint, while reading or while caching: an AbortError and no entry', async () => {
    const m = syntheticModel({ seed: 59 });
    for (const phase of ['weights', 'cache-write'] as const) {
      const cache = new MemoryModelCache();
      const ctrl = new AbortController();
      const load = loadLlama(gpu(), memorySource(m.files), {
        format: 'q4',
        cache,
        maxChunkBytes: 2048,
        signal: ctrl.signal,
        onProgress: (p) => {
          if (p.phase === phase && p.bytesDone > p.bytesTotal / 2) ctrl.abort();
        },
      });
      await expect(load).rejects.toMatchObject({ name: 'AbortError' });
      expect(await cache.list()).toEqual([]);
      expect(cache.usedBytes).toBe(0);
    }
    // Already cancelled: nothing is read at all.
    const { source, log } = countingSource(memorySource(m.files));
    const ctrl = new AbortController();
    ctrl.abort();
    await expect(loadLlama(gpu(), source, { format: 'q4', signal: ctrl.signal })).rejects.toMatchObject({ name: 'AbortError' });
    expect(log.calls).toEqual([]);
  });
});
