/**
 * Headless Chromium (Debian's /usr/bin/chromium) with WebGPU on whatever adapter the
 * machine has (SwiftShader without a GPU), driven by playwright-core.
 */
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { chromium, type Browser, type BrowserContext, type Page } from 'playwright-core';
import { build, preview, type PreviewServer } from 'vite';

export const CHROMIUM_PATHS = ['/usr/bin/chromium', '/usr/bin/chromium-browser', '/usr/bin/google-chrome'];

export function chromiumPath(): string {
  const p = process.env.CHROMIUM_PATH ?? CHROMIUM_PATHS.find((c) => existsSync(c));
  if (!p) throw new Error(`No Chromium found (looked for ${CHROMIUM_PATHS.join(', ')}); install Debian's chromium package or set CHROMIUM_PATH`);
  return p;
}

export async function launchChromium(): Promise<Browser> {
  const args = [
    '--headless=new',
    '--no-sandbox',
    '--enable-unsafe-webgpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ];
  if (process.env.WEBGPU_ADAPTER !== 'system') args.push('--use-webgpu-adapter=swiftshader');
  return chromium.launch({ executablePath: chromiumPath(), args, headless: true });
}

export interface ServedLab {
  url: string;
  browser: Browser;
  context: BrowserContext;
  page: Page;
  /** The page's console lines and uncaught errors ("[pageerror] ..."), in order. */
  log: string[];
  close(): Promise<void>;
}

/**
 * The lab built by its own Vite config into a temporary folder, served by `vite preview`
 * on 127.0.0.1 (models/ included), and one Chromium page on it. `input`: another HTML
 * entry to build instead of the lab's index.html (a test page); `url` then points at it.
 */
export async function serveBuiltLab(options: { input?: string; acceptDownloads?: boolean } = {}): Promise<ServedLab> {
  const root = process.cwd();
  const configFile = resolve(root, 'vite.config.ts');
  const out = await mkdtemp(join(tmpdir(), 'lab-browser-'));
  const rolldownOptions = options.input ? { rolldownOptions: { input: resolve(root, options.input) } } : {};
  await build({ root, configFile, logLevel: 'error', build: { outDir: join(out, 'dist'), emptyOutDir: true, sourcemap: false, ...rolldownOptions } });
  const server: PreviewServer = await preview({ root, configFile, logLevel: 'error', build: { outDir: join(out, 'dist') }, preview: { host: '127.0.0.1', port: 0 } });
  const browser = await launchChromium();
  const context = await browser.newContext({ acceptDownloads: options.acceptDownloads ?? false, viewport: { width: 1360, height: 1000 } });
  const page = await context.newPage();
  const log: string[] = [];
  page.on('console', (m) => log.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => log.push(`[pageerror] ${e.message}`));
  const base = server.resolvedUrls!.local[0]!;
  return {
    url: options.input ? `${base}${options.input}` : base,
    browser,
    context,
    page,
    log,
    close: async () => {
      await context.close().catch(() => undefined);
      await browser.close();
      await new Promise<void>((r) => server.httpServer.close(() => r()));
      await rm(out, { recursive: true, force: true });
    },
  };
}
