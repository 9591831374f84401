/**
 * The built lab in headless Chromium (WebGPU on whatever adapter the machine has;
 * SwiftShader without a GPU): load the tiny model from models/, play two iterations
 * of the arithmetic world, watch games stream and charts advance, export the adapter
 * and check its files, reload and continue the saved run with the model read from the
 * browser's cache. Screenshots go to test-results/screenshots/ (git-ignored); with
 * UPDATE_SCREENSHOTS=1 they replace the README's images in docs/screenshots/.
 */
import { mkdirSync, readFileSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import type { Browser, BrowserContext, Download, Page } from 'playwright-core';
import { build, preview, type PreviewServer } from 'vite';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseLlamaConfig } from '../../src/formats/llama-config';
import { LLAMA_PROJECTIONS, loraKey, loraModelShape, loraShape, readAdapter } from '../../src/formats/peft';
import { parseSafetensors } from '../../src/formats/safetensors';
import { launchChromium } from '../helpers/browser';

const ROOT = process.cwd();
const SHOTS = resolve(ROOT, process.env.UPDATE_SCREENSHOTS === '1' ? 'docs/screenshots' : 'test-results/screenshots');
const TINY = parseLlamaConfig(JSON.parse(readFileSync(resolve(ROOT, 'models/tiny-llama/config.json'), 'utf8')), 'config.json');

describe('the lab in Chromium (built app, tiny model)', () => {
  let out: string;
  let server: PreviewServer;
  let browser: Browser;
  let context: BrowserContext;
  let page: Page;
  let url: string;
  const log: string[] = [];

  beforeAll(async () => {
    out = await mkdtemp(join(tmpdir(), 'lab-ui-'));
    const t0 = Date.now();
    await build({ root: ROOT, configFile: resolve(ROOT, 'vite.config.ts'), logLevel: 'error', build: { outDir: join(out, 'dist'), emptyOutDir: true, sourcemap: false } });
    server = await preview({ root: ROOT, configFile: resolve(ROOT, 'vite.config.ts'), logLevel: 'error', build: { outDir: join(out, 'dist') }, preview: { host: '127.0.0.1', port: 0 } });
    url = server.resolvedUrls!.local[0]!;
    console.log(`built and serving in ${((Date.now() - t0) / 1000).toFixed(1)} s at ${url}`);
    browser = await launchChromium();
    context = await browser.newContext({ acceptDownloads: true, viewport: { width: 1360, height: 1000 } });
    page = await context.newPage();
    page.on('console', (m) => log.push(`[${m.type()}] ${m.text()}`));
    page.on('pageerror', (e) => log.push(`[pageerror] ${e.message}`));
    mkdirSync(SHOTS, { recursive: true });
  });

  afterAll(async () => {
    if (log.some((l) => l.startsWith('[pageerror]') || l.startsWith('[error]'))) console.log(log.join('\n'));
    await context?.close();
    await browser?.close();
    await new Promise<void>((r) => (server ? server.httpServer.close(() => r()) : r()));
    if (out) await rm(out, { recursive: true, force: true });
  });

  const text = async (testid: string) => (await page.getByTestId(testid).first().textContent())?.trim() ?? '';
  const iteration = async () => Number(await text('iteration'));
  const untilPaused = () =>
    page.waitForFunction(() => document.querySelector('[data-testid="run-state"]')?.textContent?.startsWith('Paused'), null, { timeout: 240_000 });
  const noErrors = async () => {
    const errors = await page.getByTestId('error').allTextContents();
    expect(errors, errors.join('\n')).toEqual([]);
  };

  it('loads the tiny model, plays two iterations, exports the adapter and resumes after a reload', async () => {
    const t0 = Date.now();
    const lap = (what: string) => console.log(`${what}: ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    await page.goto(url);
    await page.getByTestId('adapter-name').waitFor({ timeout: 60_000 });
    expect(await text('adapter-name')).not.toBe('');

    // Start screen: the local folder, its size and memory estimate from the engine's plan.
    // The radio is enabled once the served folders' list (/models/index.json) has arrived.
    await page.locator('[data-testid="pick-local"]:enabled').waitFor({ timeout: 60_000 });
    await page.getByTestId('pick-local').check();
    await page.getByTestId('local-folder').selectOption('tiny-llama');
    // Another served folder (micro-arith) may be summarised first: wait for this one's.
    await page.getByTestId('model-summary').filter({ hasText: 'models/tiny-llama' }).waitFor({ timeout: 30_000 });
    await page.getByTestId('memory-estimate').waitFor({ timeout: 30_000 });
    expect(await text('model-summary')).toContain('models/tiny-llama');
    expect(await text('memory-estimate')).toMatch(/\d+(\.\d+)? (MiB|KiB)/);
    await page.screenshot({ path: join(SHOTS, 'start.png'), fullPage: true });

    // Requests the page and its worker make for the model's files.
    const modelRequests: string[] = [];
    page.on('request', (r) => {
      if (r.url().includes('/models/tiny-llama/')) modelRequests.push(r.url());
    });
    await page.getByTestId('format').selectOption('f32');
    await page.getByTestId('load-model').click();
    await page.getByTestId('controls').waitFor({ timeout: 120_000 });
    expect(modelRequests.some((u) => u.endsWith('/model.safetensors'))).toBe(true);
    lap('model loaded');
    await noErrors();

    // Two iterations of the toy world: start, pause (the iteration in flight finishes), step.
    await page.getByTestId('preset-toy').click();
    await page.getByTestId('start').click();
    await page.getByTestId('query-text').first().waitFor({ timeout: 120_000 });
    await page.waitForFunction(() => Number(document.querySelector('[data-testid="iteration"]')?.textContent) >= 1, null, { timeout: 180_000 });
    lap('first iteration');
    await page.getByTestId('pause').click();
    await untilPaused();
    if ((await iteration()) < 2) {
      await page.getByTestId('step').click();
      await page.waitForFunction(() => Number(document.querySelector('[data-testid="iteration"]')?.textContent) >= 2, null, { timeout: 180_000 });
      await untilPaused();
    }
    const done = await iteration();
    expect(done).toBe(2);
    lap('two iterations');
    await noErrors();

    // Scored games: N = 2 queries of G = 2 answers per iteration, with rewards, advantages, KL.
    const cards = page.getByTestId('live-game').getByTestId('game-card');
    expect(await cards.count()).toBe(2);
    for (const card of await cards.all()) {
      expect(await card.getByTestId('query-text').textContent()).toMatch(/\d+\s*\+\s*\d+/);
      expect(await card.getByTestId('answer').count()).toBe(2);
      for (const v of await card.getByTestId('answer-reward').allTextContents()) expect(Number(v)).toBeGreaterThanOrEqual(0);
      for (const v of await card.getByTestId('answer-kl').allTextContents()) expect(Number.isFinite(Number(v))).toBe(true);
      for (const v of await card.getByTestId('answer-advantage').allTextContents()) expect(Number.isFinite(Number(v))).toBe(true);
    }
    expect(await page.getByTestId('history-item').count()).toBe(4);
    // Charts advanced one point per iteration.
    for (const id of ['reward', 'challenger', 'kl', 'loss', 'entropy', 'lengths', 'speed', 'memory']) {
      expect(await page.getByTestId(`chart-${id}`).getAttribute('data-points'), id).toBe('2');
    }
    expect(await text('chart-reward-latest')).toMatch(/verifiable/);
    expect(await text('checkpoint')).toContain('iteration 2');
    await page.screenshot({ path: join(SHOTS, 'run.png'), fullPage: true });

    // A game from the history, opened in full.
    await page.getByTestId('history-item').last().click();
    await page.getByTestId('game-detail').waitFor();
    expect(await page.getByTestId('game-detail').getByTestId('answer').count()).toBe(2);
    await page.getByTestId('game-detail').screenshot({ path: join(SHOTS, 'game.png') });

    // Export: six files (the adapter, its run config and metrics, and the run report), PEFT adapter keys and shapes as its config implies.
    const downloads: Download[] = [];
    const gotAll = new Promise<void>((done) =>
      page.on('download', (d) => {
        downloads.push(d);
        if (downloads.length === 6) done();
      }),
    );
    await page.getByTestId('export').click();
    await gotAll;
    const files = new Map<string, Buffer>();
    for (const d of downloads) files.set(d.suggestedFilename(), await readFile((await d.path())!));
    expect([...files.keys()].sort()).toEqual(['adapter_config.json', 'adapter_model.safetensors', 'completions.jsonl', 'metrics.csv', 'metrics.json', 'run_config.json']);
    // The run report: one JSON line per answer (2 iterations x 2 queries x 2 answers here), one CSV row per iteration.
    const completions = files.get('completions.jsonl')!.toString('utf8').trimEnd().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(completions.map((c) => c.step)).toEqual([0, 0, 0, 0, 1, 1, 1, 1]);
    for (const c of completions) expect(Object.keys(c)).toEqual(expect.arrayContaining(['prompt', 'completion', 'verifiable', 'reward', 'advantage', 'kl', 'completion_length']));
    const csv = files.get('metrics.csv')!.toString('utf8').trimEnd().split('\n');
    expect(csv).toHaveLength(3);
    expect(csv[0]!.split(',').slice(0, 3)).toEqual(['step', 'time', 'reward']);
    const adapterConfig = JSON.parse(files.get('adapter_config.json')!.toString('utf8'));
    expect(adapterConfig).toMatchObject({ peft_type: 'LORA', task_type: 'CAUSAL_LM', r: 4, lora_alpha: 8, base_model_name_or_path: 'models/tiny-llama' });
    expect([...adapterConfig.target_modules].sort()).toEqual([...LLAMA_PROJECTIONS].sort());
    const model = loraModelShape(TINY);
    const st = parseSafetensors(new Uint8Array(files.get('adapter_model.safetensors')!), 'adapter_model.safetensors');
    const expected = new Map<string, number[]>();
    for (let l = 0; l < TINY.numLayers; l++) for (const m of LLAMA_PROJECTIONS) for (const w of ['A', 'B'] as const) expected.set(loraKey(l, m, w), loraShape(model, m, w, 4));
    expect(new Map([...st.header.tensors].map(([k, t]) => [k, t.shape]))).toEqual(expected);
    const adapter = readAdapter({ 'adapter_config.json': files.get('adapter_config.json')!.toString('utf8'), 'adapter_model.safetensors': new Uint8Array(files.get('adapter_model.safetensors')!) }, model);
    // PEFT init: A random, B zero; B moves exactly when an applied update had a gradient
    // (with all rewards equal and the policy still the reference, every gradient is zero).
    const a = adapter.tensors.get(loraKey(0, 'q_proj', 'A'))!.data;
    const b = adapter.tensors.get(loraKey(1, 'down_proj', 'B'))!.data;
    expect(a.some((v) => v !== 0) && a.every(Number.isFinite) && b.every(Number.isFinite)).toBe(true);
    const runConfig = JSON.parse(files.get('run_config.json')!.toString('utf8'));
    expect(runConfig).toMatchObject({ model: 'models/tiny-llama', iteration: 2, config: { world: 'arithmetic', mode: 'lsp-zero', queriesPerIteration: 2, groupSize: 2 } });
    const metrics = JSON.parse(files.get('metrics.json')!.toString('utf8')) as { iteration: number; values: Record<string, number> }[];
    expect(metrics.map((m) => m.iteration)).toEqual([0, 1]);
    for (const m of metrics) expect(Object.keys(m.values)).toEqual(expect.arrayContaining(['reward', 'kl', 'loss', 'grad_norm', 'rewards/verifiable/mean']));
    const updated = metrics.some((m) => m.values.grad_norm! > 0 && m.values.step_skipped === 0);
    console.log(`grad norms ${metrics.map((m) => m.values.grad_norm).join(', ')}; rewards ${metrics.map((m) => m.values.reward).join(', ')}`);
    expect(b.some((v) => v !== 0)).toBe(updated);
    lap('exported');

    // A bad adapter file shows a message naming the problem; the run is untouched.
    await page.getByTestId('import').setInputFiles({ name: 'adapter_config.json', mimeType: 'application/json', buffer: Buffer.from('{"peft_type": "LORA"}') });
    await page.getByTestId('error').first().waitFor();
    expect(await text('error')).toContain('adapter_model.safetensors');
    expect(await iteration()).toBe(2);
    // The exported adapter imports back into the run.
    await page.getByRole('button', { name: 'Dismiss' }).click();
    await page.getByTestId('import').setInputFiles(
      ['adapter_config.json', 'adapter_model.safetensors'].map((name) => ({ name, mimeType: 'application/octet-stream', buffer: files.get(name)! })),
    );
    await page.getByText('Adapter imported (adapter_config.json, adapter_model.safetensors).').waitFor({ timeout: 30_000 });
    await noErrors();
    expect(await iteration()).toBe(2);

    // Reload: the saved run is offered, and continues with the model from the cache.
    await page.reload();
    modelRequests.length = 0;
    await page.getByTestId('saved-run').waitFor({ timeout: 60_000 });
    expect(await text('saved-iteration')).toBe('2');
    // The model cache in origin storage lists the loaded model with its size.
    await page.getByTestId('cached-model').first().waitFor({ timeout: 30_000 });
    expect(await page.getByTestId('cached-model').allTextContents()).toEqual([expect.stringMatching(/^models\/tiny-llamaf32\d+(\.\d+)? MiB/)]);
    await page.getByTestId('resume-saved').click();
    await page.getByTestId('controls').waitFor({ timeout: 120_000 });
    await page.waitForFunction(() => document.querySelector('[data-testid="run-state"]')?.textContent?.startsWith('Paused'), null, { timeout: 60_000 });
    await noErrors();
    expect(await iteration()).toBe(2);
    expect(await text('controls')).toContain('from the cache');
    // The second load read nothing over the network: weights, config and tokenizer came from OPFS.
    expect(modelRequests).toEqual([]);
    expect(await page.getByTestId('history-item').count()).toBe(4);
    expect(await page.getByTestId('chart-reward').getAttribute('data-points')).toBe('2');
    lap('resumed after reload');
    await page.getByTestId('step').click();
    await page.waitForFunction(() => Number(document.querySelector('[data-testid="iteration"]')?.textContent) >= 3, null, { timeout: 180_000 });
    await untilPaused();
    expect(await page.getByTestId('chart-loss').getAttribute('data-points')).toBe('3');
    expect(await page.getByTestId('history-item').count()).toBe(6);
    await noErrors();
    lap('third iteration after resume');
  }, 360_000);
});
