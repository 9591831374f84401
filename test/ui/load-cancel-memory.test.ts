/**
 * Cancelling a download and the memory check before a run, in headless Chromium (the
 * built lab, models/micro-arith and models/tiny-llama):
 *   - the micro model is loaded (and cached in OPFS); the tiny model's download is slowed
 *     (each request for its weights held back) and cancelled part-way: the load ends with
 *     a message saying so, no more of the file is fetched, the cache is as it was (the
 *     micro model kept, nothing of the tiny one), and loading the tiny model again works;
 *   - the tiny model as a 4-bit ONNX export (the default route: its files are copied into
 *     the cache as they download), served from memory, its weights file held back while
 *     the cache entry is half written: cancelled there, the partial entry is removed, the
 *     other entries are kept, and the export then loads;
 *   - settings whose plan needs a buffer larger than the device allows: Start is refused
 *     by the probe on the device with the settings that would fit named, no run starts,
 *     and a run with sane settings then starts and generates on the same device.
 */
import type { Page, Route } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { llamaOnnxFolder } from '../../src/formats/onnx-llama';
import { serveBuiltLab, type ServedLab } from '../helpers/browser';
import { TINY_DIR } from '../helpers/model-files';
import { readCheckpoint } from '../peer/onnx-model';

/** The model cache's folder in the origin private file system (src/model/cache.ts). */
const CACHE_DIR = 'selfplay-lab-models';
/** How long each request for the slowed model file is held back. */
const HOLD_MS = 1500;

/** Every cache entry (a folder per model) with the names of its files, read in the page. */
function cacheEntries(page: Page): Promise<Record<string, string[]>> {
  return page.evaluate(async (dirName) => {
    const top = await navigator.storage.getDirectory();
    const root = await top.getDirectoryHandle(dirName, { create: true });
    const out: Record<string, string[]> = {};
    const it = root as unknown as { entries(): AsyncIterable<[string, FileSystemHandle]> };
    for await (const [name, handle] of it.entries()) {
      const files: string[] = [];
      if (handle.kind === 'directory') for await (const f of (handle as unknown as { keys(): AsyncIterable<string> }).keys()) files.push(f);
      out[name] = files.sort();
    }
    return out;
  }, CACHE_DIR);
}

/**
 * Answers a request for a file of `files` as the lab's served models/ folder does (HEAD,
 * whole GET, single byte ranges); `hold` may keep a range request waiting.
 */
async function serveFromMemory(route: Route, files: ReadonlyMap<string, Uint8Array>, prefix: string, hold?: (file: string, range: string) => Promise<void>): Promise<void> {
  const req = route.request();
  const name = decodeURIComponent(new URL(req.url()).pathname.slice(prefix.length));
  const body = files.get(name);
  if (!body) return route.fulfill({ status: 404, contentType: 'text/plain', body: 'not found' });
  const headers = { 'Accept-Ranges': 'bytes', 'Content-Type': name.endsWith('.json') ? 'application/json' : 'application/octet-stream', 'Cache-Control': 'no-cache' };
  if (req.method() === 'HEAD') return route.fulfill({ status: 200, headers: { ...headers, 'Content-Length': String(body.length) } });
  const range = req.headers().range ?? '';
  const m = /^bytes=(\d+)-(\d+)$/.exec(range);
  if (!m) return route.fulfill({ status: 200, headers, body: Buffer.from(body) });
  const start = Number(m[1]);
  const end = Math.min(Number(m[2]), body.length - 1);
  await hold?.(name, range);
  await route.fulfill({ status: 206, headers: { ...headers, 'Content-Range': `bytes ${start}-${end}/${body.length}` }, body: Buffer.from(body.subarray(start, end + 1)) });
}

describe('cancel a download and the memory check, in Chromium (built lab, micro and tiny models)', () => {
  let lab: ServedLab;
  let page: Page;

  beforeAll(async () => {
    lab = await serveBuiltLab();
    page = lab.page;
  }, 240_000);

  afterAll(async () => {
    if (lab?.log.some((l) => l.startsWith('[pageerror]'))) console.log(lab.log.join('\n'));
    await lab?.close();
  });

  const text = async (testid: string) => (await page.getByTestId(testid).first().textContent())?.trim() ?? '';
  const errors = () => page.getByTestId('error').allTextContents();
  const dismissErrors = async () => {
    while ((await page.getByTestId('error').count()) > 0) await page.getByTestId('error').first().getByRole('button', { name: 'Dismiss' }).click();
  };
  /** Picks a served folder (f32 weights) on the start screen, once its summary is shown. */
  const pick = async (folder: string, format: 'f32' | 'q4' = 'f32') => {
    // The radio is enabled once the served folders' list (/models/index.json) has arrived.
    await page.locator('[data-testid="pick-local"]:enabled').waitFor({ timeout: 60_000 });
    await page.getByTestId('pick-local').check();
    await page.getByTestId('local-folder').selectOption(folder);
    const summary = page.getByTestId('model-summary');
    await summary.filter({ hasText: `models/${folder}` }).or(summary.locator('.error')).first().waitFor({ timeout: 60_000 });
    expect(await summary.locator('.error').count(), (await summary.textContent()) ?? '').toBe(0);
    await page.getByTestId('format').selectOption(format);
  };
  const loadPicked = async () => {
    await page.locator('[data-testid="load-model"]:enabled').click();
    await page.getByTestId('controls').waitFor({ timeout: 180_000 });
  };

  it('cancels a slowed download part-way: a clear message, no partial cache entry, the cached model kept, and a later load works', async () => {
    await page.goto(lab.url);
    await pick('micro-arith');
    await loadPicked();
    const before = await cacheEntries(page);
    const microKeys = Object.keys(before);
    expect(microKeys, JSON.stringify(before)).toHaveLength(1);
    expect(microKeys[0]).toMatch(/^models_micro-arith@/);
    expect(before[microKeys[0]!]).toContain('manifest.json');

    // Each request (the worker's range reads included) for the tiny model's weights is held back.
    const held: string[] = [];
    const slow = async (route: Route) => {
      held.push(route.request().headers().range ?? 'whole file');
      await new Promise((r) => setTimeout(r, HOLD_MS));
      await route.continue().catch(() => undefined);
    };
    await page.route('**/models/tiny-llama/model.safetensors', slow);
    await page.getByRole('button', { name: 'Load another model' }).click();
    await pick('tiny-llama');
    await page.locator('[data-testid="load-model"]:enabled').click();
    // Part-way: the file was opened and its tensors are being read.
    await expect.poll(() => held.length, { timeout: 120_000, interval: 50 }).toBeGreaterThanOrEqual(3);
    await page.getByTestId('cancel-load').click();
    await page.getByTestId('error').filter({ hasText: 'cancelled' }).waitFor({ timeout: 60_000 });
    expect(await errors()).toEqual([expect.stringMatching(/^Loading the model: Loading the model was cancelled; nothing partial was kept\./)]);
    expect(await page.getByTestId('load-progress').count()).toBe(0);
    expect(await page.getByTestId('load-model').isEnabled()).toBe(true);
    // The micro model was unloaded for this load: the page no longer offers its run.
    expect(await page.getByRole('button', { name: 'Back to the run' }).count()).toBe(0);
    expect(await page.getByTestId('controls').count()).toBe(0);
    // The download stopped: no more reads of the file once the cancelled one came back.
    const requested = held.length;
    await new Promise((r) => setTimeout(r, 3 * HOLD_MS));
    expect(held.length).toBe(requested);
    // The cache is as it was: the micro model's entry, file for file, and nothing of the tiny model.
    expect(await cacheEntries(page)).toEqual(before);

    await page.unroute('**/models/tiny-llama/model.safetensors', slow);
    await dismissErrors();
    await loadPicked();
    expect(await text('controls')).toContain('models/tiny-llama');
    expect(await errors()).toEqual([]);
    const after = await cacheEntries(page);
    const tinyKeys = Object.keys(after).filter((k) => !microKeys.includes(k));
    expect(tinyKeys).toEqual([expect.stringMatching(/^models_tiny-llama@/)]);
    expect(after[microKeys[0]!]).toEqual(before[microKeys[0]!]);
    for (const files of Object.values(after)) expect(files).toContain('manifest.json');
  }, 420_000);

  it('cancels a 4-bit ONNX export while its cache entry is half written: the partial entry is removed, the others kept, and it then loads', async () => {
    const ckpt = await readCheckpoint(TINY_DIR);
    const files = new Map(Object.entries(llamaOnnxFolder(ckpt.configJson, ckpt.textFiles, ckpt.config, ckpt.values, { weights: 'q4', embedding: 'q4' })).map(([k, v]) => [k, typeof v === 'string' ? new TextEncoder().encode(v) : v]));
    const DATA = 'onnx/model_q4.onnx_data';
    expect([...files.keys()]).toContain(DATA);
    const bytes = [...files.values()].reduce((a, b) => a + b.length, 0);
    // The export is offered beside the served folders and answered from memory.
    await page.route('**/models/index.json', async (route) => {
      const res = await route.fetch();
      await route.fulfill({ response: res, json: [...((await res.json()) as unknown[]), { folder: 'tiny-onnx', bytes }] });
    });
    // The external data's reads after its size check (bytes=0-0) wait until the test lets them go.
    let holding = true;
    const heldReads: string[] = [];
    const waiting: (() => void)[] = [];
    const hold = (file: string, range: string) => {
      if (file !== DATA || range === 'bytes=0-0' || !holding) return Promise.resolve();
      heldReads.push(range);
      return new Promise<void>((r) => waiting.push(r));
    };
    const letGo = () => {
      holding = false;
      for (const r of waiting.splice(0)) r();
    };
    const requests: string[] = [];
    await page.route('**/models/tiny-onnx/**', (route) => {
      requests.push(`${route.request().method()} ${route.request().url()}`);
      return serveFromMemory(route, files, '/models/tiny-onnx/', hold);
    });

    const before = await cacheEntries(page);
    expect(Object.keys(before).some((k) => k.startsWith('models_tiny-onnx@'))).toBe(false);
    await page.getByRole('button', { name: 'Load another model' }).click();
    await pick('tiny-onnx', 'q4');
    await page.locator('[data-testid="load-model"]:enabled').click();
    await expect.poll(() => heldReads.length, { timeout: 120_000, interval: 50 }).toBe(1);
    // Part-way: the entry's folder holds the text files and the decoder, no manifest.
    const partial = await cacheEntries(page);
    const keys = Object.keys(partial).filter((k) => !(k in before));
    expect(keys, JSON.stringify(partial)).toEqual([expect.stringMatching(/^models_tiny-onnx@.*onnx/)]);
    console.log(`partial entry while the weights download: ${JSON.stringify(partial[keys[0]!])}`);
    expect(partial[keys[0]!]!.length).toBeGreaterThan(0);
    expect(partial[keys[0]!]).not.toContain('manifest.json');
    await page.getByTestId('cancel-load').click();
    letGo();
    await page.getByTestId('error').filter({ hasText: 'cancelled' }).waitFor({ timeout: 60_000 });
    expect(await errors()).toEqual([expect.stringMatching(/^Loading the model: Loading the model was cancelled; nothing partial was kept\./)]);
    expect(await cacheEntries(page)).toEqual(before);

    await dismissErrors();
    await loadPicked();
    expect(await text('controls')).toContain('models/tiny-onnx');
    expect(await errors()).toEqual([]);
    const after = await cacheEntries(page);
    const onnxKeys = Object.keys(after).filter((k) => !(k in before));
    expect(onnxKeys).toEqual([expect.stringMatching(/^models_tiny-onnx@/)]);
    expect(after[onnxKeys[0]!]).toContain('manifest.json');
    for (const k of Object.keys(before)) expect(after[k]).toEqual(before[k]);

    // After a reload the export is planned and loaded from the cache: not one request for its files.
    await page.reload();
    requests.length = 0;
    await pick('tiny-onnx', 'q4');
    await page.getByTestId('memory-estimate').waitFor({ timeout: 60_000 });
    await loadPicked();
    expect(await text('controls')).toContain('from the cache');
    expect(requests).toEqual([]);
    expect(await errors()).toEqual([]);
    await page.unroute('**/models/tiny-onnx/**');
    await page.unroute('**/models/index.json');
  }, 420_000);

  it('refuses a run whose plan does not fit the device, naming the settings that would, and the device still runs a sane one', async () => {
    await page.reload();
    await pick('tiny-llama');
    await loadPicked();
    expect(await text('controls')).toContain('from the cache');
    await page.getByTestId('preset-toy').click();

    // Every training sequence 4096 + 8192 tokens long, 1024 of them per step: one activation buffer alone is several GiB.
    const settings = page.getByTestId('settings');
    await settings.locator('summary', { hasText: 'Optimizer' }).click();
    await page.locator('#setting-microBatch').fill('1024');
    await page.locator('#setting-maxQueryTokens').fill('4096');
    await page.locator('#setting-maxAnswerTokens').fill('8192');
    expect(await page.getByTestId('settings-error').count()).toBe(0);
    await page.getByTestId('start').click();
    await page.getByTestId('error').first().waitFor({ timeout: 120_000 });
    const refusal = await errors();
    console.log(`refusal: ${refusal.join(' | ')}`);
    expect(refusal).toHaveLength(1);
    expect(refusal[0]).toMatch(/^The run: This run does not fit this GPU: its peak is about \d+ MiB and the GPU refused its largest buffer \(.+; this GPU allows \d+ MiB per buffer\)\./);
    // The settings that would fit, each with its value now (a shorter answer alone is not enough here: the query is 4096 tokens too).
    expect(refusal[0]).toMatch(/It fits with any one of: ([^;]+ \d+ \(now \d+\); )*micro-batch \d+ \(now 1024\)\. Change one of these settings and start again\./);
    const fits = Number(/micro-batch (\d+) \(now 1024\)/.exec(refusal[0]!)![1]);
    expect(fits).toBeGreaterThanOrEqual(1);
    expect(fits).toBeLessThan(1024);
    // No run started.
    expect(await text('run-state')).toBe('No run yet.');
    expect(await text('iteration')).toBe('0');
    expect(await page.getByTestId('query-text').count()).toBe(0);

    // The device was not lost: sane settings start a run that generates on it.
    await dismissErrors();
    await page.getByTestId('preset-toy').click();
    await page.getByTestId('start').click();
    await page.getByTestId('query-text').first().waitFor({ timeout: 180_000 });
    expect(await text('run-state')).toMatch(/^Running\./);
    await page.getByTestId('stop-now').click();
    await page.waitForFunction(() => document.querySelector('[data-testid="run-state"]')?.textContent?.startsWith('Paused'), null, { timeout: 120_000 });
    expect(await errors()).toEqual([]);
    expect(await text('controls')).toContain('models/tiny-llama');
  }, 420_000);
});
