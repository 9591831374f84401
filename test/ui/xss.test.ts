/**
 * Model text is untrusted: the game view, the history (a game opened in full) and the
 * error messages render it as text. HTML and script payloads go through the real
 * bridge, store and components in Chromium; nothing may run and no markup may appear.
 */
import type { Browser } from 'playwright-core';
import { createServer, type ViteDevServer } from 'vite';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { launchChromium } from '../helpers/browser';

describe('model text is rendered as text (Chromium)', () => {
  let server: ViteDevServer;
  let browser: Browser;

  beforeAll(async () => {
    server = await createServer({ root: process.cwd(), logLevel: 'error', server: { host: '127.0.0.1', port: 0 } });
    await server.listen();
    browser = await launchChromium();
  });
  afterAll(async () => {
    await browser?.close();
    await server?.close();
  });

  it('runs no script and creates no element from HTML in queries, answers, judge notes and errors', async () => {
    const page = await browser.newPage();
    const dialogs: string[] = [];
    page.on('dialog', (d) => (dialogs.push(d.message()), void d.dismiss()));
    await page.goto(`${server.resolvedUrls!.local[0]!}test/ui/xss-page.html`);
    await page.waitForFunction(() => (window as unknown as { __ready?: boolean }).__ready === true, null, { timeout: 60_000 });
    const payloads = (await page.evaluate(() => (window as unknown as { __payloads: string[] }).__payloads)) as string[];

    // Every payload is on the page as literal text: scored games, streaming rows, errors.
    const body = (await page.textContent('body')) ?? '';
    for (const p of payloads) expect(body, p).toContain(p);
    expect(await page.getByTestId('streaming-game').count()).toBe(payloads.length);
    expect(await page.getByTestId('history-item').count()).toBe(4);
    expect(await page.getByTestId('error').textContent()).toContain(payloads[0]);

    // Open every game in full (judge notes expanded), then click the would-be link text.
    for (let k = 0; k < 4; k++) {
      await page.getByTestId('history-item').nth(k).click();
      const detail = page.getByTestId('game-detail');
      await detail.waitFor();
      // Newest first: item k is query 3 - k of iteration 0.
      expect(await detail.getByTestId('query-text').textContent()).toBe(payloads[2 * (3 - k)]);
      expect(await detail.getByTestId('answer-text').allTextContents()).toEqual([payloads[2 * (3 - k) + 1], payloads[(2 * (3 - k) + 2) % payloads.length]]);
    }
    await page.getByText('click', { exact: false }).first().click();
    await page.waitForTimeout(300);

    const found = await page.evaluate(() => ({
      xss: (window as unknown as { __xss: number }).__xss,
      injected: document.querySelectorAll('#root img, #root script, #root svg, #root iframe, #root style, #root b, #xss-link, #root a[href^="javascript"]').length,
      // Only the components' own <details> (judge notes); none from the payload's "ontoggle".
      ontoggle: document.querySelectorAll('[ontoggle], [onerror], [onload]').length,
      visible: getComputedStyle(document.body).display,
    }));
    expect(found).toEqual({ xss: 0, injected: 0, ontoggle: 0, visible: 'block' });
    expect(dialogs).toEqual([]);
  });
});
