import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createServer, type ViteDevServer } from 'vite';
import type { Browser } from 'playwright-core';
import { launchChromium } from '../helpers/browser';

describe('kernels in a real browser (Chromium WebGPU)', () => {
  let server: ViteDevServer;
  let browser: Browser;

  beforeAll(async () => {
    server = await createServer({ configFile: false, root: process.cwd(), logLevel: 'error', server: { host: '127.0.0.1', port: 0 } });
    await server.listen();
    browser = await launchChromium();
  });
  afterAll(async () => {
    await browser?.close();
    await server?.close();
  });

  it('runs the same kernels as Node and matches the float64 references', async () => {
    const page = await browser.newPage();
    const url = server.resolvedUrls!.local[0]!;
    await page.goto(`${url}test/browser/kernel-page.html`);
    await page.waitForFunction(() => (window as unknown as { __report?: unknown }).__report !== undefined, null, { timeout: 90_000 });
    const report = (await page.evaluate(() => (window as unknown as { __report: unknown }).__report)) as {
      adapter: string;
      checks: { name: string; maxErr: number }[];
      error?: string;
    };
    expect(report.error).toBeUndefined();
    console.log(`browser adapter: ${report.adapter}`);
    expect(report.checks.length).toBeGreaterThan(0);
    for (const c of report.checks) {
      console.log(`  ${c.name}: max |err| ${c.maxErr}`);
      expect(c.maxErr, c.name).toBeLessThan(1e-4);
    }
    expect(report.checks.map((c) => c.name)).toEqual(['rmsnorm', 'quantize bytes', 'q4 matmul N=1', 'q4 matmul N=33', 'attention']);
  });
});
