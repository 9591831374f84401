/**
 * Headless Chromium (Debian's /usr/bin/chromium) with WebGPU on whatever adapter the
 * machine has (SwiftShader without a GPU), driven by playwright-core.
 */
import { existsSync } from 'node:fs';
import { chromium, type Browser } from 'playwright-core';

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
