/**
 * Peer benchmark: `npm run bench:peer [-- --shape tiny|medium] [--reps 3] [--new-tokens 8] [--G 8]`.
 *
 * The lab's engine and transformers.js (onnxruntime-web's WebGPU backend) in one
 * headless Chromium tab, on the same weights: one 4-bit ONNX file in the
 * transformers.js layout (MatMulNBits + GatherBlockQuantized, block 32), which the
 * engine loads through its ONNX importer without requantizing. Prints, per row, the
 * median time of each and the ratio ours/theirs in tokens per second.
 *
 *   tiny    models/tiny-llama (2 layers, hidden 64, real 128256 vocabulary)
 *   medium  8 layers, hidden 1024, MLP 2816, 16/4 heads of 64, real vocabulary,
 *           random weights made here (not committed)
 * Model folders are written to models/generated/peer/ (git-ignored) and reused;
 * --rebuild writes them again. onnxruntime-web's wasm is served from node_modules.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createServer } from 'vite';
import { parseLlamaConfig } from '../src/formats/llama-config';
import { launchChromium } from '../test/helpers/browser';
import { readCheckpoint, writeOnnxFolder, type CheckpointValues } from '../test/peer/onnx-model';
import type { PeerReport } from './peer-page';
import { parseFlags, printTable } from './harness';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const OUT = join(ROOT, 'models', 'generated', 'peer');

const MEDIUM = { hidden_size: 1024, intermediate_size: 2816, num_hidden_layers: 8, num_attention_heads: 16, num_key_value_heads: 4, head_dim: 64 };

/** The tiny checkpoint's files with a medium config and seeded random weights (uniform, std about 0.02; norms 1). */
function mediumCheckpoint(tiny: CheckpointValues): CheckpointValues {
  const configJson = { ...tiny.configJson, ...MEDIUM };
  const config = parseLlamaConfig(configJson, 'config.json');
  let s = 0x2545f491;
  const values = (name: string): Float32Array => {
    const shape = name.endsWith('norm.weight') ? [config.hiddenSize] : null;
    if (shape) return new Float32Array(config.hiddenSize).fill(1);
    const dims: Record<string, [number, number]> = {
      q_proj: [config.numHeads * config.headDim, config.hiddenSize],
      k_proj: [config.numKvHeads * config.headDim, config.hiddenSize],
      v_proj: [config.numKvHeads * config.headDim, config.hiddenSize],
      o_proj: [config.hiddenSize, config.numHeads * config.headDim],
      gate_proj: [config.intermediateSize, config.hiddenSize],
      up_proj: [config.intermediateSize, config.hiddenSize],
      down_proj: [config.hiddenSize, config.intermediateSize],
      embed_tokens: [config.vocabSize, config.hiddenSize],
    };
    const key = Object.keys(dims).find((k) => name.includes(k));
    if (!key) throw new Error(`medium model: no shape for ${name}`);
    const [M, K] = dims[key]!;
    const out = new Float32Array(M * K);
    for (let i = 0; i < out.length; i++) {
      s ^= s << 13;
      s ^= s >>> 17;
      s ^= s << 5;
      out[i] = ((s >>> 0) / 4294967296 - 0.5) * 0.07;
    }
    return out;
  };
  return { configJson, config, textFiles: tiny.textFiles, values };
}

async function ensureModel(shape: string, rebuild: boolean): Promise<string> {
  const name = `${shape}-q4`;
  const dir = join(OUT, name);
  if (!rebuild && existsSync(join(dir, 'onnx', 'model_q4.onnx_data'))) return name;
  const tiny = await readCheckpoint(join(ROOT, 'models', 'tiny-llama'));
  const ckpt = shape === 'medium' ? mediumCheckpoint(tiny) : tiny;
  const t0 = performance.now();
  await writeOnnxFolder(ckpt, dir, { weights: 'q4', embedding: 'q4' });
  console.log(`wrote ${dir} in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  return name;
}

function ortDistUrl(): string {
  const nested = 'node_modules/@huggingface/transformers/node_modules/onnxruntime-web/dist/';
  return existsSync(join(ROOT, nested)) ? `/${nested}` : '/node_modules/onnxruntime-web/dist/';
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

async function main(): Promise<void> {
  const flags = parseFlags(process.argv.slice(2));
  const shape = flags.get('shape') ?? 'tiny';
  if (shape !== 'tiny' && shape !== 'medium') throw new Error(`--shape must be tiny or medium, got ${shape}`);
  const reps = Number(flags.get('reps') ?? 3);
  const newTokens = Number(flags.get('new-tokens') ?? 8);
  const G = Number(flags.get('G') ?? 8);
  const model = await ensureModel(shape, flags.has('rebuild'));

  // Dependencies are optimized up front and nothing is watched, so the page is never reloaded mid-run.
  const server = await createServer({
    configFile: false,
    root: ROOT,
    logLevel: 'error',
    server: { host: '127.0.0.1', port: 0, hmr: false, watch: { ignored: ['**/*'] } },
    optimizeDeps: { entries: ['bench/peer-page.html'], include: ['@huggingface/transformers'] },
  });
  await server.listen();
  const browser = await launchChromium();
  try {
    const page = await browser.newPage();
    page.on('console', (m) => console.log(`  [page] ${m.text()}`));
    const url = new URL('bench/peer-page.html', server.resolvedUrls!.local[0]!);
    for (const [k, v] of Object.entries({ model, reps, 'new-tokens': newTokens, G, 'ort-dist': ortDistUrl() })) url.searchParams.set(k, String(v));
    await page.goto(url.href);
    await page.waitForFunction(() => (window as unknown as { __report?: unknown }).__report !== undefined, null, { timeout: 0, polling: 1000 });
    const report = (await page.evaluate(() => (window as unknown as { __report: unknown }).__report)) as PeerReport;
    if (report.error) throw new Error(`the benchmark page failed: ${report.error}`);
    const same = JSON.stringify(report.oursTokens) === JSON.stringify(report.theirsTokens);
    console.log(`\nmodel ${model} (${shape}), adapter ${report.adapter}, prompt ${report.promptTokens} tokens, median of ${reps} after a warm-up`);
    console.log(`greedy tokens ${same ? 'identical' : 'DIFFER'}: ours ${JSON.stringify(report.oursTokens)}, transformers.js ${JSON.stringify(report.theirsTokens)}`);
    const rows = report.timings.map((t) => {
      const o = median(t.ours);
      const th = median(t.theirs);
      return [t.name, o, th, (t.tokens / o) * 1000, (t.tokens / th) * 1000, `${(th / o).toFixed(2)}x`];
    });
    printTable(['row', 'ours ms', 'transformers.js ms', 'ours tok/s', 'transformers.js tok/s', 'ours/theirs'], rows);
  } finally {
    await browser.close();
    await server.close();
  }
}

main().then(
  () => process.exit(0),
  (e: unknown) => {
    console.error(e);
    process.exit(1);
  },
);
