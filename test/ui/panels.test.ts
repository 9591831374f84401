/**
 * The run's side panels in headless Chromium (the built lab, the tiny model, the toy
 * world): your own reward tried on samples and used by a run (its failures named per
 * iteration), chat refused while an iteration runs, Stop now discarding the iteration in
 * flight, then chat with the adapter on and off, side by side and alone (greedy, so each
 * side answers the same alone as beside the other).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import type { Browser, Page } from 'playwright-core';
import { build, preview, type PreviewServer } from 'vite';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { launchChromium } from '../helpers/browser';

const ROOT = process.cwd();
// Toy answers are single numbers: this reward throws on every one of them.
const REWARD = "(q, a) => { if (/^\\d+$/.test(a)) throw new RangeError('digits only: ' + a); return a.length; }";

describe('the lab\'s panels in Chromium: your own reward, Stop now, chat with the adapter on and off', () => {
  let out: string;
  let server: PreviewServer;
  let browser: Browser;
  let page: Page;
  const log: string[] = [];

  beforeAll(async () => {
    out = await mkdtemp(join(tmpdir(), 'lab-panels-'));
    await build({ root: ROOT, configFile: resolve(ROOT, 'vite.config.ts'), logLevel: 'error', build: { outDir: join(out, 'dist'), emptyOutDir: true, sourcemap: false } });
    server = await preview({ root: ROOT, configFile: resolve(ROOT, 'vite.config.ts'), logLevel: 'error', build: { outDir: join(out, 'dist') }, preview: { host: '127.0.0.1', port: 0 } });
    browser = await launchChromium();
    page = await (await browser.newContext({ viewport: { width: 1360, height: 1000 } })).newPage();
    page.on('console', (m) => log.push(`[${m.type()}] ${m.text()}`));
    page.on('pageerror', (e) => log.push(`[pageerror] ${e.message}`));
  });

  afterAll(async () => {
    if (log.some((l) => l.startsWith('[pageerror]'))) console.log(log.join('\n'));
    await browser?.close();
    await new Promise<void>((r) => (server ? server.httpServer.close(() => r()) : r()));
    if (out) await rm(out, { recursive: true, force: true });
  });

  const text = async (testid: string) => (await page.getByTestId(testid).first().textContent())?.trim() ?? '';
  const errors = () => page.getByTestId('error').allTextContents();
  const runState = () => text('run-state');
  const chatDone = () => page.getByTestId('chat-send').filter({ hasText: 'Send' }).waitFor({ timeout: 120_000 });

  it('tries and uses a reward, refuses chat while running, stops an iteration in flight, then chats with the adapter on and off', async () => {
    await page.goto(server.resolvedUrls!.local[0]!);
    // The radio is enabled once the served folders' list (/models/index.json) has arrived.
    await page.locator('[data-testid="pick-local"]:enabled').waitFor({ timeout: 60_000 });
    await page.getByTestId('pick-local').check();
    await page.getByTestId('local-folder').selectOption('tiny-llama');
    await page.getByTestId('model-summary').filter({ hasText: 'models/tiny-llama' }).waitFor({ timeout: 60_000 });
    await page.getByTestId('format').selectOption('f32');
    await page.getByTestId('load-model').click();
    await page.getByTestId('controls').waitFor({ timeout: 120_000 });
    await page.getByTestId('preset-toy').click();

    // Your own reward: tried on samples in its sandbox, then used by the run.
    const panel = page.getByTestId('custom-reward');
    await panel.getByLabel('Reward function source').fill(REWARD);
    await panel.getByLabel('Reward name').fill('digits');
    await panel.getByText('Try it on a sample').click();
    await panel.getByLabel('Sample answer').fill('four');
    await panel.getByRole('button', { name: 'Try' }).click();
    await expect.poll(() => text('custom-reward-try')).toBe('reward 4');
    await panel.getByLabel('Sample answer').fill('7');
    await panel.getByRole('button', { name: 'Try' }).click();
    await expect.poll(() => text('custom-reward-try')).toMatch(/^fallback \(threw\): .*RangeError: digits only: 7/);
    await panel.getByRole('button', { name: 'Use this reward' }).click();
    await panel.getByText('In use: digits').waitFor();

    // While an iteration runs, chat is refused with the reason.
    await page.getByTestId('start').click();
    await page.getByTestId('chat-busy').waitFor({ timeout: 60_000 });
    expect(await text('chat-busy')).toContain('pause the run (or press Stop now) to chat');
    expect(await page.getByTestId('chat-send').isDisabled()).toBe(true);
    await page.waitForFunction(() => Number(document.querySelector('[data-testid="iteration"]')?.textContent) >= 1, null, { timeout: 240_000 });

    // Stop now, with the second iteration in flight (its Challenger or Solver sampling): discarded, the run paused after the first.
    await page.waitForFunction(() => /iteration 1 · the (Challenger|Solver)/.test(document.querySelector('[data-testid="live-game"] h2')?.textContent ?? ''), null, { timeout: 60_000, polling: 20 });
    await page.getByTestId('stop-now').click();
    await page.waitForFunction(() => document.querySelector('[data-testid="run-state"]')?.textContent?.startsWith('Paused'), null, { timeout: 60_000 });
    expect(await text('iteration')).toBe('1');
    await page.getByText('Stopped: iteration 2 was discarded before its update').waitFor();
    expect(await page.getByTestId('chart-reward').getAttribute('data-points')).toBe('1');
    expect(await page.getByTestId('history-item').count()).toBe(2);
    expect(await page.getByTestId('stop-now').isDisabled()).toBe(true);
    // The reward threw on each of the first iteration's 2 x 2 answers: named, counted, and the run went on.
    expect(await text('custom-reward-notes')).toMatch(/^iteration 0: .*4 .*threw/);
    expect(await runState()).toMatch(/^Paused\./);
    expect(await errors()).toEqual([]);

    // Chat: the adapter on and off side by side, then each alone.
    const chat = page.getByTestId('chat');
    await chat.getByLabel('Chat message').fill('What is 1 + 1?');
    await chat.getByLabel('Chat max tokens').fill('4');
    expect(await chat.getByLabel('Adapter').inputValue()).toBe('both');
    await page.getByTestId('chat-send').click();
    await chatDone();
    const side = async (id: 'chat-on' | 'chat-off') => ({ text: await text(`${id}-text`), rate: Number(await text(`${id}-rate`)), head: ((await page.getByTestId(id).locator('h3').textContent()) ?? '').trim() });
    const on = await side('chat-on');
    const off = await side('chat-off');
    for (const s of [on, off]) {
      expect(s.rate).toBeGreaterThan(0);
      // "<side> · <rate> tokens/s · <n> tokens", with no trailing ellipsis once the answer is done.
      const tokens = Number(/· (\d+) tokens$/.exec(s.head)?.[1]);
      expect(tokens, s.head).toBeGreaterThan(0);
      expect(tokens, s.head).toBeLessThanOrEqual(4);
    }
    await chat.getByLabel('Adapter').selectOption('off');
    await page.getByTestId('chat-send').click();
    await chatDone();
    expect(await page.getByTestId('chat-on').count()).toBe(0);
    expect(await text('chat-off-text')).toBe(off.text);
    await chat.getByLabel('Adapter').selectOption('on');
    await page.getByTestId('chat-send').click();
    await chatDone();
    expect(await page.getByTestId('chat-off').count()).toBe(0);
    expect(await text('chat-on-text')).toBe(on.text);
    expect(await errors()).toEqual([]);
    // Chat left the run where it was.
    expect(await text('iteration')).toBe('1');
  }, 420_000);
});
