/**
 * The user's reward in Chromium's sandbox Worker: an endless loop is stopped at the time
 * limit (the Worker is replaced), throws and non-numbers fall back with their reason, and
 * the network, storage, messaging and the page are blocked with a named message; the
 * shipped examples score in the browser as in Node.
 */
import type { Browser } from 'playwright-core';
import { createServer, type ViteDevServer } from 'vite';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { launchChromium } from '../helpers/browser';

describe('custom reward sandbox (Chromium)', () => {
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

  it('stops loops, names failures and blocks page and network access', { timeout: 120_000 }, async () => {
    const page = await browser.newPage();
    const requests: string[] = [];
    page.on('request', (r) => requests.push(r.url()));
    await page.goto(`${server.resolvedUrls!.local[0]!}test/ui/custom-reward-page.html`);
    await page.waitForFunction(() => (window as unknown as { __result?: unknown; __error?: string }).__result !== undefined || (window as unknown as { __error?: string }).__error !== undefined, null, { timeout: 90_000 });
    const err = await page.evaluate(() => (window as unknown as { __error?: string }).__error);
    expect(err).toBeUndefined();
    const r = (await page.evaluate(() => (window as unknown as { __result: unknown }).__result)) as {
      rewards: number[]; reasons: string[]; messages: string[]; ms: number; examples: number[]; compileError: string; pageTouched: number;
    };
    expect(r.rewards).toEqual([2, -1, 3, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 4]);
    expect(r.reasons).toEqual(['timeout', 'threw', 'not_a_number', 'not_a_number', 'blocked', 'blocked', 'blocked', 'blocked', 'blocked', 'blocked', 'blocked', 'blocked']);
    expect(r.messages[0]).toContain('200 ms');
    expect(r.messages[4]).toContain('tried to use fetch');
    expect(r.messages[10]).toContain('tried to use document');
    expect(r.pageTouched).toBe(0);
    // '{"a": 1}\nAnswer: 1' is 18 characters (382 from the target of 400), ends with an Answer line, and is not JSON as a whole.
    expect(r.examples[0]).toBeCloseTo(-382 / 400, 12);
    expect(r.examples.slice(1)).toEqual([1, 0]);
    expect(r.compileError).toMatch(/does not load: SyntaxError/);
    expect(requests.filter((u) => u.endsWith('/x.js'))).toEqual([]);
  });
});
