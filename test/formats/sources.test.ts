import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NodeFileSource } from '../../src/formats/node-source';
import { HttpRangeSource, f32BytesToF32, openSafetensors, writeSafetensors } from '../../src/formats/safetensors';
import { asyncFormatErrorOf } from './helpers';

const values = new Float32Array(5000).map((_, i) => Math.sin(i));
const FILE = writeSafetensors(
  [
    { name: 'emb', dtype: 'F32', shape: [500, 10], data: values },
    { name: 'norm', dtype: 'F32', shape: [3], data: new Float32Array([1, 2, 3]) },
  ],
  { format: 'pt' },
);

type Handler = (req: IncomingMessage, res: ServerResponse) => void;

/** Serves FILE honouring single byte ranges, as static servers and the HF CDN do. */
const rangeServer: Handler = (req, res) => {
  const m = /^bytes=(\d+)-(\d+)?$/.exec(req.headers.range ?? '');
  if (!m) {
    res.writeHead(200, { 'Content-Length': FILE.length });
    res.end(FILE);
    return;
  }
  const start = Number(m[1]);
  const end = Math.min(m[2] === undefined ? FILE.length - 1 : Number(m[2]), FILE.length - 1);
  if (start >= FILE.length) {
    res.writeHead(416, { 'Content-Range': `bytes */${FILE.length}` });
    res.end();
    return;
  }
  res.writeHead(206, { 'Content-Range': `bytes ${start}-${end}/${FILE.length}`, 'Content-Length': end - start + 1 });
  res.end(FILE.subarray(start, end + 1));
};

const routes: Record<string, Handler> = {
  '/ok/model.safetensors': rangeServer,
  '/no-ranges/model.safetensors': (_req, res) => {
    res.writeHead(200, { 'Content-Length': FILE.length });
    res.end(FILE);
  },
  '/gated/model.safetensors': (_req, res) => {
    res.writeHead(403, 'Forbidden');
    res.end('gated');
  },
  '/short/model.safetensors': (req, res) => {
    // Honours the size probe, then sends one byte too few for every later range.
    if (req.headers.range === 'bytes=0-0') return rangeServer(req, res);
    const m = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '')!;
    const start = Number(m[1]);
    const end = Number(m[2]) - 1;
    res.writeHead(206, { 'Content-Range': `bytes ${start}-${end}/${FILE.length}` });
    res.end(FILE.subarray(start, end + 1));
  },
};

let server: Server;
let base = '';
const requests: string[] = [];

beforeAll(async () => {
  server = createServer((req, res) => {
    requests.push(`${req.url} ${req.headers.range ?? '-'}`);
    const route = routes[(req.url ?? '').split('?')[0]!];
    if (route) route(req, res);
    else {
      res.writeHead(404, 'Not Found');
      res.end();
    }
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const addr = server.address();
  if (addr === null || typeof addr === 'string') throw new Error('no port');
  base = `http://127.0.0.1:${addr.port}`;
});

afterAll(async () => {
  await new Promise<void>((resolve) => server.close(() => resolve()));
});

describe('HttpRangeSource', () => {
  it('learns the size from a one-byte probe and reads tensors with range requests', async () => {
    requests.length = 0;
    const src = await HttpRangeSource.open(`${base}/ok/model.safetensors?download=true`);
    expect(src.name).toBe('model.safetensors');
    expect(src.size).toBe(FILE.length);
    const st = await openSafetensors(src);
    expect(Array.from(await st.readTensorF32('norm'))).toEqual([1, 2, 3]);
    const got = new Float32Array(5000);
    let rows = 0;
    for await (const c of st.readTensorChunks('emb', 4000)) {
      got.set(f32BytesToF32(c.data), rows * 10);
      rows += c.rowCount;
    }
    expect(rows).toBe(500);
    expect(Array.from(got)).toEqual(Array.from(values));
    // probe, header (the first read covers the small file), norm, then 5 chunks of 100 40-byte rows
    expect(requests.length).toBe(1 + 1 + 1 + 5);
    expect(requests[0]).toBe('/ok/model.safetensors?download=true bytes=0-0');
    expect(requests[1]).toBe(`/ok/model.safetensors?download=true bytes=0-${FILE.length - 1}`);
  });

  it('uses a known size without probing', async () => {
    requests.length = 0;
    const src = await HttpRangeSource.open(`${base}/ok/model.safetensors`, { size: FILE.length, name: 'given-name' });
    expect(src.name).toBe('given-name');
    expect(Array.from(await src.read(8, 4))).toEqual(Array.from(FILE.subarray(8, 12)));
    expect(requests).toEqual(['/ok/model.safetensors bytes=8-11']);
  });

  it('falls back to HEAD Content-Length when Content-Range is hidden (CORS)', async () => {
    const calls: string[] = [];
    const hiding: typeof fetch = async (input, init) => {
      const res = await fetch(input, init);
      calls.push(`${init?.method ?? 'GET'} ${res.status}`);
      const headers = new Headers(res.headers);
      headers.delete('Content-Range');
      return new Response(init?.method === 'HEAD' ? null : res.body, { status: res.status, statusText: res.statusText, headers });
    };
    const src = await HttpRangeSource.open(`${base}/ok/model.safetensors`, { fetch: hiding });
    expect(src.size).toBe(FILE.length);
    expect(calls).toEqual(['GET 206', 'HEAD 200']);
    const st = await openSafetensors(src);
    expect(Array.from(await st.readTensorF32('norm'))).toEqual([1, 2, 3]);
  });

  it('explains a server that ignores Range', async () => {
    const e = await asyncFormatErrorOf(() => HttpRangeSource.open(`${base}/no-ranges/model.safetensors`));
    expect(e.message).toBe(
      `model.safetensors: the server at ${base}/no-ranges/model.safetensors ignored the Range request (it answered 200 with the whole file instead of 206 Partial Content). ` +
        'Serve the file from a server that supports HTTP range requests (Hugging Face and most static file servers do), or open it as a local file.',
    );
  });

  it('reports error statuses', async () => {
    const gated = await asyncFormatErrorOf(() => HttpRangeSource.open(`${base}/gated/model.safetensors`));
    expect(gated.message).toBe(
      `model.safetensors: the server answered HTTP 403 Forbidden for ${base}/gated/model.safetensors. The file may be gated or private: log in or pass an access token.`,
    );
    const missing = await asyncFormatErrorOf(() => HttpRangeSource.open(`${base}/nothing/here.safetensors`));
    expect(missing.message).toContain('here.safetensors: the server answered HTTP 404 Not Found');
    expect(missing.message).toContain('Check the URL');
  });

  it('rejects a short body', async () => {
    const src = await HttpRangeSource.open(`${base}/short/model.safetensors`);
    const e = await asyncFormatErrorOf(() => src.read(100, 50));
    expect(e.message).toContain('model.safetensors: asked for bytes=100-149 (50 bytes) but the server sent 49 bytes');
  });

  it('reports an unreachable server', async () => {
    const closed = createServer();
    await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve));
    const port = (closed.address() as { port: number }).port;
    await new Promise<void>((resolve) => closed.close(() => resolve()));
    const e = await asyncFormatErrorOf(() => HttpRangeSource.open(`http://127.0.0.1:${port}/x.safetensors`));
    expect(e.message).toContain(`x.safetensors: could not fetch http://127.0.0.1:${port}/x.safetensors`);
  });
});

describe('NodeFileSource', () => {
  let dir = '';
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'formats-'));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('reads a file from disk tensor by tensor', async () => {
    const path = join(dir, 'm.safetensors');
    await writeFile(path, FILE);
    const src = await NodeFileSource.open(path);
    try {
      expect(src.name).toBe('m.safetensors');
      expect(src.size).toBe(FILE.length);
      const st = await openSafetensors(src);
      expect(Array.from(await st.readTensorF32('emb'))).toEqual(Array.from(values));
      await expect(src.read(FILE.length, 1)).rejects.toThrow('is outside the file');
    } finally {
      await src.close();
    }
  });

  it('rejects a truncated file on disk', async () => {
    const path = join(dir, 'cut.safetensors');
    await writeFile(path, FILE.subarray(0, FILE.length - 5));
    const src = await NodeFileSource.open(path);
    try {
      const e = await asyncFormatErrorOf(() => openSafetensors(src));
      expect(e.message).toContain('cut.safetensors, tensor "norm": data_offsets [20000, 20012] run past the end of the data section');
    } finally {
      await src.close();
    }
  });
});
