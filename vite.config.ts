import { createReadStream, existsSync, readdirSync, statSync } from 'node:fs';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { join, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';
import react from '@vitejs/plugin-react';
import { defineConfig, type Plugin } from 'vite';

/**
 * Serves the repository's models/ folder at /models/ in `vite` and `vite preview`
 * (with HTTP range requests, which the loader uses), without copying the weights into
 * every build. /models/index.json lists the folders that hold a config.json.
 */
function modelsFolder(dir = fileURLToPath(new URL('./models', import.meta.url))): Plugin {
  const handle = (req: IncomingMessage, res: ServerResponse, next: () => void) => {
    const url = new URL(req.url ?? '/', 'http://localhost');
    if (!url.pathname.startsWith('/models/')) return next();
    if (req.method !== 'GET' && req.method !== 'HEAD') return next();
    const rel = decodeURIComponent(url.pathname.slice('/models/'.length));
    if (rel === 'index.json') return json(res, listModels(dir));
    const file = resolve(dir, rel);
    if (!file.startsWith(dir + sep) || rel.split('/').includes('..')) return notFound(res);
    let size: number;
    try {
      const st = statSync(file);
      if (!st.isFile()) return notFound(res);
      size = st.size;
    } catch {
      return notFound(res);
    }
    res.setHeader('Accept-Ranges', 'bytes');
    res.setHeader('Content-Type', file.endsWith('.json') ? 'application/json' : 'application/octet-stream');
    res.setHeader('Cache-Control', 'no-cache');
    const range = /^bytes=(\d*)-(\d*)$/.exec(req.headers.range ?? '');
    let start = 0;
    let end = size - 1;
    if (range) {
      start = range[1] ? Number(range[1]) : Math.max(0, size - Number(range[2]));
      end = range[1] && range[2] ? Math.min(Number(range[2]), size - 1) : size - 1;
      if (start >= size || start > end) {
        res.statusCode = 416;
        res.setHeader('Content-Range', `bytes */${size}`);
        return res.end();
      }
      res.statusCode = 206;
      res.setHeader('Content-Range', `bytes ${start}-${end}/${size}`);
    }
    res.setHeader('Content-Length', String(end - start + 1));
    if (req.method === 'HEAD') return res.end();
    createReadStream(file, { start, end }).pipe(res);
  };
  return {
    name: 'selfplay-lab-models-folder',
    configureServer: (server) => void server.middlewares.use(handle),
    configurePreviewServer: (server) => void server.middlewares.use(handle),
  };
}

function listModels(dir: string): { folder: string; bytes: number }[] {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { withFileTypes: true })
    .filter((d) => d.isDirectory() && existsSync(join(dir, d.name, 'config.json')))
    .map((d) => ({
      folder: d.name,
      bytes: readdirSync(join(dir, d.name)).reduce((s, f) => s + statSync(join(dir, d.name, f)).size, 0),
    }));
}

function json(res: ServerResponse, value: unknown): void {
  res.setHeader('Content-Type', 'application/json');
  res.setHeader('Cache-Control', 'no-cache');
  res.end(JSON.stringify(value));
}

function notFound(res: ServerResponse): void {
  res.statusCode = 404;
  res.setHeader('Content-Type', 'text/plain');
  res.end('not found');
}

export default defineConfig({
  plugins: [react(), modelsFolder()],
  worker: { format: 'es' },
  build: { target: 'es2022', sourcemap: true },
  server: { host: '127.0.0.1' },
  preview: { host: '127.0.0.1' },
});
