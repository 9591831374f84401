/**
 * Model sources: a hub repository over HTTP (served locally in the hub's URL layout,
 * with gating), a dev-server folder, dropped files and a Node folder.
 */
import { createServer, type Server } from 'node:http';
import { mkdtemp, readFile, readdir, rm, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FormatError } from '../../src/formats/errors';
import { downloadQ4 } from '../../src/kernels/q4-layout';
import { loadLlama } from '../../src/model/load';
import { openModelDir } from '../../src/model/node-source';
import { BF16_MODEL_ID, DEFAULT_MODEL_ID, DroppedFilesSource, SMALL_MODEL_ID, hubModelSource, isHubRepoId, modelSourceFrom, servedModelSource } from '../../src/model/source';
import { useGpu } from '../helpers/gpu';
import { TINY_DIR, expectSameBytes } from '../helpers/model-files';

const TOKEN = 'hf_test_token';
let server: Server;
let base = '';
const files = new Map<string, Uint8Array>();
const seenAuth: string[] = [];

beforeAll(async () => {
  for (const f of await readdir(TINY_DIR)) files.set(f, new Uint8Array(await readFile(join(TINY_DIR, f))));
  server = createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://x');
    // The hub's layout: /<owner>/<name>/resolve/<revision>/<file>; "gated" needs the token.
    const hub = /^\/([^/]+)\/([^/]+)\/resolve\/([^/]+)\/(.+)$/.exec(url.pathname);
    const served = /^\/models\/tiny-llama\/(.+)$/.exec(url.pathname);
    const file = hub ? decodeURIComponent(hub[4]!) : served ? decodeURIComponent(served[1]!) : null;
    if (hub) seenAuth.push(req.headers.authorization ?? '');
    if (hub?.[2] === 'gated') {
      if (!req.headers.authorization) return void res.writeHead(401).end('{"error":"Access to model owner/gated is restricted."}');
      if (req.headers.authorization !== `Bearer ${TOKEN}`) return void res.writeHead(403).end('{"error":"not accepted"}');
    }
    const body = file !== null && (hub?.[2] !== 'missing') ? files.get(file) : undefined;
    if (!body) {
      // A dev server answers unknown paths with its page (single-page-app fallback).
      if (served) return void res.writeHead(200, { 'Content-Type': 'text/html' }).end('<!doctype html><title>app</title>');
      return void res.writeHead(404).end('Entry not found');
    }
    const type = file!.endsWith('.json') ? 'application/json' : 'application/octet-stream';
    const m = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '');
    if (!m) return void res.writeHead(200, { 'Content-Type': type, 'Content-Length': body.length }).end(req.method === 'HEAD' ? undefined : body);
    const start = Number(m[1]);
    const end = Math.min(Number(m[2]), body.length - 1);
    res.writeHead(206, { 'Content-Type': type, 'Content-Range': `bytes ${start}-${end}/${body.length}`, 'Content-Length': end - start + 1 });
    res.end(body.subarray(start, end + 1));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const addr = server.address();
  if (!addr || typeof addr === 'string') throw new Error('no port');
  base = `http://127.0.0.1:${addr.port}`;
});

afterAll(() => new Promise<void>((resolve) => server.close(() => resolve())));

async function rejection(p: Promise<unknown>): Promise<FormatError> {
  const e = await p.then(() => null, (x: unknown) => x);
  if (!(e instanceof FormatError)) throw new Error(`expected a FormatError, got ${String(e)}`);
  return e;
}

describe('hub repositories over HTTP', () => {
  const gpu = useGpu();

  it('default ids: the 4-bit ONNX export, and ungated Llama-3.2 Instruct copies', () => {
    expect(DEFAULT_MODEL_ID).toBe('onnx-community/Llama-3.2-3B-Instruct-ONNX');
    expect(hubModelSource(DEFAULT_MODEL_ID).url('onnx/model_q4f16.onnx_data')).toBe('https://huggingface.co/onnx-community/Llama-3.2-3B-Instruct-ONNX/resolve/main/onnx/model_q4f16.onnx_data');
    expect(BF16_MODEL_ID).toBe('unsloth/Llama-3.2-3B-Instruct');
    expect(SMALL_MODEL_ID).toBe('unsloth/Llama-3.2-1B-Instruct');
    const hub = hubModelSource(BF16_MODEL_ID);
    expect(hub.url('model-00001-of-00002.safetensors')).toBe('https://huggingface.co/unsloth/Llama-3.2-3B-Instruct/resolve/main/model-00001-of-00002.safetensors');
    expect(hub.revision).toBe('main');
    expect(isHubRepoId('owner/name')).toBe(true);
    for (const bad of ['owner', 'a/b/c', '../x/y', 'owner/..', 'https://x/y']) expect(isHubRepoId(bad)).toBe(false);
    expect(() => hubModelSource('not a repo')).toThrow(/is not a Hugging Face model id/);
    expect(modelSourceFrom(' unsloth/Llama-3.2-1B-Instruct ').name).toBe('unsloth/Llama-3.2-1B-Instruct');
    expect(modelSourceFrom(`${base}/models/tiny-llama/`).name).toBe(`${base}/models/tiny-llama`);
  });

  it('loads a repository through range requests, the same as from the folder, sending the token', async () => {
    seenAuth.length = 0;
    const hub = hubModelSource('owner/gated', { endpoint: base, token: TOKEN });
    const a = await loadLlama(gpu(), hub, { format: 'q4', maxChunkBytes: 4 << 20 });
    const b = await loadLlama(gpu(), await openModelDir(TINY_DIR), { format: 'q4' });
    expect(a.sourceName).toBe('owner/gated');
    if (a.weights.embed.format !== 'q4' || b.weights.embed.format !== 'q4') throw new Error('q4 expected');
    expectSameBytes((await downloadQ4(gpu(), a.weights.embed.table)).qweight, (await downloadQ4(gpu(), b.weights.embed.table)).qweight, 'embedding');
    expect(a.generation).toEqual(b.generation);
    expect(seenAuth.length).toBeGreaterThan(5);
    expect(seenAuth.every((h) => h === `Bearer ${TOKEN}`)).toBe(true);
    a.weights.release();
    b.weights.release();
  });

  it('gated without a token (401) or with a refused one (403): says to accept the licence and give a token', async () => {
    const e401 = await rejection(loadLlama(gpu(), hubModelSource('owner/gated', { endpoint: base }), { format: 'q4' }));
    expect(e401.message).toBe(
      `config.json: access denied (HTTP 401) for ${base}/owner/gated/resolve/main/config.json. ` +
        `The model is gated or private: accept the licence on the model page (${base}/owner/gated) and give an access token.`,
    );
    const e403 = await rejection(hubModelSource('owner/gated', { endpoint: base, token: 'wrong' }).open('model.safetensors'));
    expect(e403.message).toMatch(/^model\.safetensors: access denied \(HTTP 403\).*accept the licence on the model page.*The access token given was refused/);
  });

  it('a missing repository or file: 404 named', async () => {
    const e = await rejection(loadLlama(gpu(), hubModelSource('owner/missing', { endpoint: base }), { format: 'q4' }));
    expect(e.message).toMatch(new RegExp(`^config\\.json: not found \\(HTTP 404\\) at ${base.replace(/[.]/g, '\\.')}/owner/missing/resolve/main/config\\.json\\. Check the model name`));
    expect(await hubModelSource('owner/tiny', { endpoint: base }).has('model.safetensors.index.json')).toBe(false);
    expect(await hubModelSource('owner/tiny', { endpoint: base }).has('model.safetensors')).toBe(true);
  });

  it("a dev-server folder, whose missing files come back as the app's HTML page", async () => {
    const served = servedModelSource('tiny-llama', { baseUrl: base });
    expect(served.name).toBe('models/tiny-llama');
    expect(await served.has('model.safetensors.index.json')).toBe(false);
    await expect(served.readText('nothing.json')).rejects.toThrow(/^nothing\.json: not found \(HTTP 404\)/);
    const m = await loadLlama(gpu(), served, { format: 'q4' });
    expect(m.weights.config.vocabSize).toBe(128256);
    m.weights.release();
  });
});

describe('dropped files and Node folders', () => {
  const fileOf = async (name: string, rel = '', lastModified = 1000): Promise<File> => {
    const f = new File([await readFile(join(TINY_DIR, name))], name, { lastModified });
    if (rel) Object.defineProperty(f, 'webkitRelativePath', { value: rel });
    return f;
  };

  it('matches dropped files by name, or by path inside a dropped folder', async () => {
    const loose = new DroppedFilesSource([await fileOf('config.json'), await fileOf('generation_config.json')]);
    expect(loose.name).toBe('dropped files');
    expect(await loose.has('config.json')).toBe(true);
    expect(await loose.has('model.safetensors')).toBe(false);
    expect(((await loose.readJson('config.json')) as { hidden_size: number }).hidden_size).toBe(64);
    const e = await rejection(loose.open('model.safetensors'));
    expect(e.message).toMatch(/^model\.safetensors: was not among the dropped files \(config\.json, generation_config\.json\)\. Drop the whole model folder/);

    const folder = new DroppedFilesSource([await fileOf('config.json', 'tiny-llama/config.json'), await fileOf('model.safetensors', 'tiny-llama/model.safetensors')]);
    expect(folder.name).toBe('tiny-llama');
    const f = await folder.open('model.safetensors');
    expect(f.size).toBe(files.get('model.safetensors')!.length);
    expectSameBytes(await f.read(100, 64), files.get('model.safetensors')!.subarray(100, 164), 'bytes');
    // Same names, another date: another revision (cache entry).
    const later = new DroppedFilesSource([await fileOf('config.json', 'tiny-llama/config.json', 2000), await fileOf('model.safetensors', 'tiny-llama/model.safetensors')]);
    expect(later.revision).not.toBe(folder.revision);
    const twice = new DroppedFilesSource([await fileOf('config.json', 'a/x/config.json'), await fileOf('config.json', 'b/x/config.json')]);
    await expect(twice.readText('x/config.json')).rejects.toThrow(/^x\/config\.json: was dropped 2 times/);
  });

  it('a Node folder: revision follows the files, names cannot leave the folder', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'model-src-'));
    try {
      await writeFile(join(dir, 'config.json'), '{"a": 1}');
      const a = await openModelDir(dir);
      await utimes(join(dir, 'config.json'), new Date(5e12), new Date(5e12));
      const b = await openModelDir(dir);
      expect(b.revision).not.toBe(a.revision);
      expect(await a.readJson('config.json')).toEqual({ a: 1 });
      expect(await a.has('tokenizer.json')).toBe(false);
      await expect(a.open('model.safetensors')).rejects.toThrow(/^model\.safetensors: is missing from /);
      await expect(a.readText('../etc/passwd')).rejects.toThrow(/is not a plain path inside the model folder/);
      await writeFile(join(dir, 'bad.json'), '{oops');
      await expect(a.readJson('bad.json')).rejects.toThrow(/^bad\.json: is not valid JSON/);
      await expect(openModelDir(join(dir, 'nope'))).rejects.toThrow(/is not a readable folder/);
    } finally {
      await rm(dir, { recursive: true });
    }
  });
});
