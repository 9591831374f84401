/**
 * The peer benchmark's page (driven by bench/peer.ts): the lab's engine and
 * transformers.js (onnxruntime-web, WebGPU) in one tab on the browser's own WebGPU,
 * both loading the same ONNX file from /models/generated/peer/<model>/ (the engine
 * through its ONNX importer, so the 4-bit bytes are the same) and answering the same
 * chat prompt greedily. Timings are wall-clock around each call (both return only
 * after their GPU work is read back); each figure is the median of `reps` runs after
 * one warm-up run.
 */
import { acquireGpu } from '../src/gpu/gpu';
import { generate } from '../src/model/generate';
import { loadLlama } from '../src/model/load';
import { HttpModelSource } from '../src/model/source';
import { loadTokenizer } from '../src/model/tokenizer';

export interface PeerTiming {
  /** what was measured */
  name: string;
  tokens: number;
  ours: number[];
  theirs: number[];
}

export interface PeerReport {
  adapter: string;
  promptTokens: number;
  oursTokens: number[];
  theirsTokens: number[];
  timings: PeerTiming[];
  error?: string;
}

const params = new URLSearchParams(location.search);
const modelName = params.get('model') ?? 'tiny-q4';
const reps = Number(params.get('reps') ?? 3);
const newTokens = Number(params.get('new-tokens') ?? 8);
const G = Number(params.get('G') ?? 8);
const ortDist = params.get('ort-dist') ?? '';
const MESSAGES = [{ role: 'user', content: 'Name three prime numbers and explain why they are prime.' }];

const logEl = document.getElementById('log')!;
function log(s: string): void {
  logEl.textContent += `${s}\n`;
  console.log(s);
}

async function ms(fn: () => Promise<unknown>): Promise<number> {
  const t0 = performance.now();
  await fn();
  return performance.now() - t0;
}

interface Tensorish {
  tolist(): unknown;
}

async function run(): Promise<PeerReport> {
  const base = `${location.origin}/models/generated/peer/${modelName}`;
  const source = new HttpModelSource(base, { name: modelName });
  const tok = await loadTokenizer(source);
  const prompt = tok.applyChatTemplate(MESSAGES, { dateString: '22 Nov 2026' });
  const T = prompt.length;

  // ---- the lab's engine: the same ONNX file through its importer, 4-bit bytes as stored
  const gpu = await acquireGpu();
  const adapter = gpu.caps.adapterName;
  log(`adapter: ${adapter}; loading ${modelName} into the engine`);
  const model = await loadLlama(gpu, source, { format: 'q4' });
  const w = model.weights;
  const ours = (g: number, n: number) => generate(gpu, w, null, { prompt, G: g, maxNewTokens: n, temperature: 0, stopTokens: [] });

  // ---- transformers.js on onnxruntime-web's WebGPU backend, wasm served locally
  const tjs = await import('@huggingface/transformers');
  tjs.env.allowRemoteModels = false;
  tjs.env.allowLocalModels = true;
  tjs.env.localModelPath = `${location.origin}/models/generated/peer/`;
  tjs.env.useBrowserCache = false;
  const wasm = tjs.env.backends.onnx.wasm!;
  wasm.wasmPaths = { mjs: `${ortDist}ort-wasm-simd-threaded.asyncify.mjs`, wasm: `${ortDist}ort-wasm-simd-threaded.asyncify.wasm` };
  wasm.numThreads = 1;
  log('loading the same file into transformers.js (device webgpu, dtype q4)');
  const peer = await tjs.AutoModelForCausalLM.from_pretrained(modelName, { device: 'webgpu', dtype: 'q4' });
  const ids = (batch: number) => new tjs.Tensor('int64', BigInt64Array.from(Array.from({ length: batch }, () => prompt.map(BigInt)).flat()), [batch, T]);
  const mask = (batch: number) => new tjs.Tensor('int64', new BigInt64Array(batch * T).fill(1n), [batch, T]);
  const theirs = async (batch: number, n: number) =>
    (await peer.generate({ input_ids: ids(batch), attention_mask: mask(batch), max_new_tokens: n, min_new_tokens: n, do_sample: false } as never)) as unknown as Tensorish;

  // Same greedy tokens first (a benchmark of two engines computing different things would mean nothing).
  const oursTokens = (await ours(1, newTokens)).answers[0]!.tokens;
  const theirsTokens = ((await theirs(1, newTokens)).tolist() as bigint[][])[0]!.map(Number).slice(T);
  log(`greedy tokens: ours ${JSON.stringify(oursTokens)}; transformers.js ${JSON.stringify(theirsTokens)}`);

  const timings: PeerTiming[] = [
    { name: `prefill ${T} tokens (+1 sampled)`, tokens: T, ours: [], theirs: [] },
    { name: `decode batch 1 (${newTokens} tokens)`, tokens: newTokens, ours: [], theirs: [] },
    { name: `${G} answers x ${newTokens} tokens: ours G=${G} vs ${G} generations`, tokens: G * newTokens, ours: [], theirs: [] },
    { name: `${G} answers x ${newTokens} tokens: ours G=${G} vs batch ${G}`, tokens: G * newTokens, ours: [], theirs: [] },
  ];
  const [prefillRow, decodeRow, groupRow, batchRow] = timings as [PeerTiming, PeerTiming, PeerTiming, PeerTiming];
  for (let rep = 0; rep <= reps; rep++) {
    const keep = rep > 0; // rep 0 warms up pipelines and kernels
    const o1 = await ms(() => ours(1, 1));
    const oN = await ms(() => ours(1, 1 + newTokens));
    const oG = await ms(() => ours(G, newTokens));
    const t1 = await ms(() => theirs(1, 1));
    const tN = await ms(() => theirs(1, 1 + newTokens));
    const tSeq = await ms(async () => {
      for (let i = 0; i < G; i++) await theirs(1, newTokens);
    });
    const tB = await ms(() => theirs(G, newTokens));
    log(`rep ${rep}${keep ? '' : ' (warm-up)'}: ours ${o1.toFixed(0)}/${oN.toFixed(0)}/${oG.toFixed(0)} ms, transformers.js ${t1.toFixed(0)}/${tN.toFixed(0)}/${tSeq.toFixed(0)}/${tB.toFixed(0)} ms`);
    if (!keep) continue;
    prefillRow.ours.push(o1);
    prefillRow.theirs.push(t1);
    decodeRow.ours.push(oN - o1);
    decodeRow.theirs.push(tN - t1);
    groupRow.ours.push(oG);
    groupRow.theirs.push(tSeq);
    batchRow.ours.push(oG);
    batchRow.theirs.push(tB);
  }
  await peer.dispose();
  w.release();
  gpu.destroy();
  return { adapter, promptTokens: T, oursTokens, theirsTokens, timings };
}

const win = window as unknown as { __report?: PeerReport };
run()
  .then((r) => (win.__report = r))
  .catch((e: unknown) => {
    const error = e instanceof Error ? `${e.message}\n${e.stack}` : String(e);
    log(`error: ${error}`);
    win.__report = { adapter: '', promptTokens: 0, oursTokens: [], theirsTokens: [], timings: [], error };
  });
