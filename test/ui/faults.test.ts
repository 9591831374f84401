/**
 * Faults in the middle of an iteration, in headless Chromium: the lab's page and worker
 * built with fault hooks (test/ui/faults-page.tsx, test/ui/faults-worker.ts; the shipped
 * worker has none), the tiny model, the toy world. After one checkpointed iteration:
 *   (a) the GPU device is lost while the Challenger samples,
 *   (b) the device is lost while the AdamW step is on the GPU,
 *   (c) the page reloads while a checkpoint file is half written,
 *   (d) storage is full while a checkpoint is saved.
 * Each time the page names the problem and what to do, the last complete checkpoint is
 * left as it was (every file's bytes), the run resumes from it, and the resumed run's
 * adapter is bit-identical to the saved one.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import type { Browser, Page } from 'playwright-core';
import { build, preview, type PreviewServer } from 'vite';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { launchChromium } from '../helpers/browser';
import type { FaultsHandle, SavedCheckpoint } from './faults-page';
import type { FaultName, FaultStruck } from './faults-worker';

const ROOT = process.cwd();
const ADAPTER = 'adapter_model.safetensors';

describe('faults in the middle of an iteration (Chromium, lab page with fault hooks, tiny model)', () => {
  let out: string;
  let server: PreviewServer;
  let browser: Browser;
  let page: Page;
  let url: string;
  const log: string[] = [];
  /** The checkpoint after the first iteration: what every fault must leave intact. */
  let saved: SavedCheckpoint;

  beforeAll(async () => {
    out = await mkdtemp(join(tmpdir(), 'lab-faults-'));
    const t0 = Date.now();
    await build({
      root: ROOT,
      configFile: resolve(ROOT, 'vite.config.ts'),
      logLevel: 'error',
      build: { outDir: join(out, 'dist'), emptyOutDir: true, sourcemap: false, rolldownOptions: { input: resolve(ROOT, 'test/ui/faults-page.html') } },
    });
    server = await preview({ root: ROOT, configFile: resolve(ROOT, 'vite.config.ts'), logLevel: 'error', build: { outDir: join(out, 'dist') }, preview: { host: '127.0.0.1', port: 0 } });
    url = `${server.resolvedUrls!.local[0]!}test/ui/faults-page.html`;
    console.log(`built and serving in ${((Date.now() - t0) / 1000).toFixed(1)} s at ${url}`);
    browser = await launchChromium();
    const context = await browser.newContext({ viewport: { width: 1360, height: 1000 } });
    page = await context.newPage();
    page.on('console', (m) => log.push(`[${m.type()}] ${m.text()}`));
    page.on('pageerror', (e) => log.push(`[pageerror] ${e.message}`));
  });

  afterAll(async () => {
    if (log.some((l) => l.startsWith('[pageerror]'))) console.log(log.join('\n'));
    else if (log.some((l) => l.includes('removeEntry'))) console.log(log.filter((l) => l.includes('removeEntry')).join('\n'));
    await browser?.close();
    await new Promise<void>((r) => (server ? server.httpServer.close(() => r()) : r()));
    if (out) await rm(out, { recursive: true, force: true });
  });

  const t0 = Date.now();
  const lap = (what: string) => console.log(`${what}: ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  const text = async (testid: string) => (await page.getByTestId(testid).first().textContent())?.trim() ?? '';
  const iteration = async () => Number(await text('iteration'));
  const faults = {
    arm: (fault: FaultName) => page.evaluate((f) => (window as unknown as { __faults: FaultsHandle }).__faults.arm(f), fault),
    struck: () => page.evaluate(() => (window as unknown as { __faults: FaultsHandle }).__faults.struck) as Promise<FaultStruck[]>,
    until: (fault: FaultName) =>
      page.waitForFunction((f) => (window as unknown as { __faults: FaultsHandle }).__faults.struck.some((s) => s.fault === f), fault, { timeout: 240_000 }),
    checkpoint: () => page.evaluate(() => (window as unknown as { __faults: FaultsHandle }).__faults.checkpoint()),
    exportRun: () => page.evaluate(() => (window as unknown as { __faults: FaultsHandle }).__faults.exportRun()),
  };
  const untilPaused = () => page.waitForFunction(() => document.querySelector('[data-testid="run-state"]')?.textContent?.startsWith('Paused'), null, { timeout: 240_000 });
  const errors = () => page.getByTestId('error').allTextContents();
  const dismissErrors = async () => {
    while ((await page.getByTestId('error').count()) > 0) await page.getByTestId('error').first().getByRole('button', { name: 'Dismiss' }).click();
  };
  const stepOnce = async (to: number) => {
    await page.getByTestId('step').click();
    await page.waitForFunction((n) => Number(document.querySelector('[data-testid="iteration"]')?.textContent) >= n, to, { timeout: 240_000 });
    await untilPaused();
  };
  /** The saved run from the start screen: it resumes at the saved iteration with no error shown. */
  const resumeSaved = async () => {
    await page.getByTestId('saved-run').waitFor({ timeout: 60_000 });
    expect(await text('saved-iteration')).toBe('1');
    await page.getByTestId('resume-saved').click();
    await page.getByTestId('controls').waitFor({ timeout: 120_000 });
    await untilPaused();
    expect(await errors()).toEqual([]);
    expect(await iteration()).toBe(1);
  };
  /** The checkpoint in storage is the one saved after iteration 1, every file's bytes; the resumed adapter is that one. */
  const expectSavedRun = async () => {
    const now = await faults.checkpoint();
    expect(now.latest).toEqual(saved.latest);
    expect(Object.keys(now.files).sort()).toEqual(Object.keys(saved.files).sort());
    for (const [name, bytes] of Object.entries(saved.files)) expect(now.files[name] === bytes, `${name} changed`).toBe(true);
    return now;
  };
  /** One message: the loss, the saved iteration and how to continue (no second, vaguer one from the step it broke). */
  const expectDeviceLost = (shown: string[]) =>
    expect(shown, shown.join('\n')).toEqual([
      expect.stringMatching(
        /^GPU: The GPU device was lost \(destroyed: .*\)\. .* Your run is saved at iteration 1 \(the iteration in flight is lost\): "Resume saved run" on the start screen continues it from there\.Your saved run is untouched\./,
      ),
    ]);
  const expectResumedAdapter = async () => {
    const live = await faults.exportRun();
    expect(live[ADAPTER]!.length).toBe(saved.files[ADAPTER]!.length);
    expect(live[ADAPTER] === saved.files[ADAPTER], 'the resumed adapter differs from the saved one').toBe(true);
  };

  it('plays one iteration and checkpoints it: the saved adapter is the live one', async () => {
    await page.goto(url);
    await page.getByTestId('adapter-name').waitFor({ timeout: 60_000 });
    // The radio is enabled once the served folders' list (/models/index.json) has arrived.
    await page.locator('[data-testid="pick-local"]:enabled').waitFor({ timeout: 60_000 });
    await page.getByTestId('pick-local').check();
    await page.getByTestId('local-folder').selectOption('tiny-llama');
    await page.getByTestId('model-summary').filter({ hasText: 'models/tiny-llama' }).waitFor({ timeout: 30_000 });
    await page.getByTestId('format').selectOption('f32');
    await page.getByTestId('load-model').click();
    await page.getByTestId('controls').waitFor({ timeout: 120_000 });
    await page.getByTestId('preset-toy').click();
    await stepOnce(1);
    expect(await iteration()).toBe(1);
    expect(await errors()).toEqual([]);
    saved = await faults.checkpoint();
    expect(saved.entries).toEqual(['ckpt-0', 'latest.json']);
    expect(saved.latest?.folder).toBe('ckpt-0');
    expect(Object.keys(saved.files).sort()).toEqual(['adapter_config.json', ADAPTER, 'games.json', 'optimizer.safetensors', 'trainer_state.json']);
    expect(JSON.parse(Buffer.from(saved.files['trainer_state.json']!, 'hex').toString('utf8'))).toMatchObject({ iteration: 1 });
    expect((await faults.exportRun())[ADAPTER] === saved.files[ADAPTER]).toBe(true);
    lap('first iteration checkpointed');
  }, 300_000);

  it.each([
    ['(a)', 'while the Challenger samples', 'device-lost-generation', 'device lost in generation'],
    ['(b)', 'during the optimizer step', 'device-lost-optimizer', 'device lost in the optimizer step'],
  ] as const)('%s the device lost %s: named, and the run resumes from its checkpoint', async (tag, _when, fault, label) => {
    await faults.arm(fault);
    await page.getByTestId('step').click();
    await faults.until(fault);
    await page.getByTestId('error').first().waitFor({ timeout: 60_000 });
    expectDeviceLost(await errors());
    await expectSavedRun();
    expectDeviceLost(await errors());
    await dismissErrors();
    await resumeSaved();
    await expectResumedAdapter();
    lap(`${tag} ${label}`);
  }, 300_000);

  it('(c) a reload while a checkpoint file is half written: the previous checkpoint resumes', async () => {
    await faults.arm('checkpoint-hang');
    await page.getByTestId('step').click();
    await faults.until('checkpoint-hang');
    expect((await faults.struck()).filter((s) => s.fault === 'checkpoint-hang').map((s) => s.detail)).toEqual(['/current/ckpt-1/adapter_model.safetensors']);
    await page.reload();
    const now = await expectSavedRun();
    // The new checkpoint's folder was begun and never finished.
    expect(now.entries).toEqual(['ckpt-0', 'ckpt-1', 'latest.json']);
    await resumeSaved();
    await expectResumedAdapter();
    lap('(c) reload during a checkpoint write');
  }, 300_000);

  it('(d) storage full during a save: named with what to do, the previous checkpoint kept, the run resumes from it and saves again', async () => {
    await faults.arm('storage-full');
    await page.getByTestId('step').click();
    await faults.until('storage-full');
    expect((await faults.struck()).filter((s) => s.fault === 'storage-full').map((s) => s.detail)).toEqual(['/current/ckpt-2/optimizer.safetensors']);
    await page.getByTestId('error').first().waitFor({ timeout: 60_000 });
    const shown = await errors();
    expect(shown, shown.join('\n')).toEqual([
      expect.stringMatching(
        /^Storage: storage is full: the checkpoint of run "current" could not be saved\. The previous checkpoint \(ckpt-0\) is intact\. Free space .* The run stays here at iteration 2: once there is space, the next iteration's checkpoint \(Step or Resume\) saves it, and Export keeps its adapter now\./,
      ),
    ]);
    await untilPaused();
    // The iteration played is kept in the tab (it can be exported); storage still holds the previous checkpoint, and the failed one left nothing behind.
    expect(await iteration()).toBe(2);
    const kept = await faults.exportRun();
    expect(JSON.parse(Buffer.from(kept['run_config.json']!, 'hex').toString('utf8'))).toMatchObject({ iteration: 2 });
    const now = await expectSavedRun();
    expect(now.entries).toEqual(['ckpt-0', 'ckpt-1', 'latest.json']);
    await page.reload();
    await resumeSaved();
    await expectResumedAdapter();
    // With space again, the next iteration saves, and the older and unfinished folders go.
    await stepOnce(2);
    expect(await errors()).toEqual([]);
    const next = await faults.checkpoint();
    expect(next.entries).toEqual(['ckpt-2', 'latest.json']);
    expect(JSON.parse(Buffer.from(next.files['trainer_state.json']!, 'hex').toString('utf8'))).toMatchObject({ iteration: 2 });
    expect((await faults.exportRun())[ADAPTER] === next.files[ADAPTER]).toBe(true);
    lap('(d) storage full during a save');
  }, 300_000);
});
