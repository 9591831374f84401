/**
 * Headless engine runner: `npm run engine -- --model models/tiny-llama [options]`.
 *
 * Loads a Llama checkpoint (a local folder in the hub layout, or a hub repo id) onto
 * WebGPU through Dawn, prints the memory plan, answers a chat prompt G times, scores
 * the answers under the policy (base + LoRA) and the reference (LoRA off), takes LoRA
 * training steps that raise the answers' log-probs, and optionally exports the adapter
 * in PEFT format. The same engine code runs in the browser's worker.
 *
 * Options: --format q4|f32  --prompt TEXT  --G N  --max-new N  --temperature T
 *          --top-p P  --seed N  --rank R  --alpha A  --targets q_proj,v_proj,...
 *          --steps N  --lr LR  --export DIR  --token HF_TOKEN
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { LLAMA_PROJECTIONS, type LlamaProjection } from '../formats/peft';
import { acquireNodeGpu } from '../gpu/node';
import { fill } from '../kernels/elementwise';
import { generate } from '../model/generate';
import { parseFlags } from './flags';
import { sequenceLogprobs, type TokenBatch } from '../model/llama';
import { loadLlama } from '../model/load';
import { LoraAdapter } from '../model/lora';
import { formatMemoryPlan, planMemory } from '../model/memory';
import { openModelDir } from '../model/node-source';
import { hubModelSource, isHubRepoId, type ModelSource } from '../model/source';
import { loadTokenizer } from '../model/tokenizer';

function num(f: Map<string, string>, name: string, fallback: number): number {
  const v = f.get(name);
  if (v === undefined) return fallback;
  const n = Number(v);
  if (!Number.isFinite(n)) throw new Error(`--${name} must be a number, got ${v}`);
  return n;
}

async function openSource(model: string, token: string | undefined): Promise<ModelSource> {
  if (isHubRepoId(model) && !model.startsWith('.') && !model.startsWith('/') && !model.startsWith('models/')) {
    return hubModelSource(model, { token });
  }
  return openModelDir(model);
}

/** A batch of prompt + answer rows whose targets are the answer tokens only. */
function answerBatch(prompt: number[], answers: number[][], V: number): { batch: TokenBatch; answerTokens: number } {
  const T = prompt.length + Math.max(...answers.map((a) => a.length));
  const B = answers.length;
  const ids = new Uint32Array(B * T);
  const targets = new Uint32Array(B * T).fill(V); // >= V: ignored row
  let answerTokens = 0;
  answers.forEach((a, b) => {
    const seq = [...prompt, ...a];
    ids.set(seq, b * T);
    // Row t predicts token t+1: the answer's tokens are predicted from rows P-1 .. P+len-2.
    for (let j = 0; j < a.length; j++) targets[b * T + prompt.length - 1 + j] = a[j]!;
    answerTokens += a.length;
  });
  return { batch: { ids, B, T, lengths: answers.map((a) => prompt.length + a.length), targets }, answerTokens };
}

async function main(): Promise<void> {
  const f = parseFlags(process.argv.slice(2));
  const model = f.get('model');
  if (!model) throw new Error('usage: npm run engine -- --model <folder or hub repo id> [--format q4|f32] [--prompt TEXT] ...');
  const format = (f.get('format') ?? 'q4') as 'q4' | 'f32';
  if (format !== 'q4' && format !== 'f32') throw new Error(`--format must be q4 or f32, got ${format}`);
  const G = num(f, 'G', 4);
  const maxNew = num(f, 'max-new', 32);
  const steps = num(f, 'steps', 1);
  const targets = (f.get('targets')?.split(',') ?? [...LLAMA_PROJECTIONS]) as LlamaProjection[];

  const gpu = await acquireNodeGpu();
  console.log(`adapter: ${gpu.caps.adapterName}`);
  const source = await openSource(model, f.get('token'));
  const t0 = performance.now();
  const loaded = await loadLlama(gpu, source, { format });
  const { weights } = loaded;
  const cfg = weights.config;
  console.log(`loaded ${loaded.sourceName} (${format}): ${cfg.numLayers} layers, hidden ${cfg.hiddenSize}, vocab ${cfg.vocabSize}, ` +
    `${(weights.bytes / 2 ** 20).toFixed(1)} MiB on the GPU in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  const tokenizer = await loadTokenizer(loaded.files, loaded.weights.config.vocabSize);

  const rank = num(f, 'rank', 16);
  const plan = planMemory(cfg, { format, loraRank: rank, loraTargets: targets, groupSize: G, maxPromptTokens: 256, maxNewTokens: maxNew, checkpointing: true }, gpu.caps);
  console.log('memory plan:');
  for (const line of formatMemoryPlan(plan)) console.log(`  ${line}`);

  const lora = LoraAdapter.create(gpu, cfg, { r: rank, alpha: num(f, 'alpha', 2 * rank), targets, seed: num(f, 'seed', 0), baseModel: loaded.sourceName });
  const prompt = tokenizer.applyChatTemplate([{ role: 'user', content: f.get('prompt') ?? 'Write one sentence about the sea.' }], { addGenerationPrompt: true });
  console.log(`prompt: ${prompt.length} tokens; generating ${G} answers of up to ${maxNew} tokens`);
  const tg = performance.now();
  const gen = await generate(gpu, weights, lora, {
    prompt,
    G,
    maxNewTokens: maxNew,
    temperature: num(f, 'temperature', loaded.generation.temperature ?? 0.7),
    topP: num(f, 'top-p', loaded.generation.topP ?? 1),
    seed: num(f, 'seed', 0),
    stopTokens: tokenizer.eosTokenIds,
    onToken: (row, id) => {
      if (row === 0) process.stdout.write(tokenizer.decode([id], { skipSpecialTokens: true }));
    },
  });
  const genMs = performance.now() - tg;
  const newTokens = gen.answers.reduce((s, a) => s + a.tokens.length, 0);
  console.log(`\n${newTokens} tokens in ${(genMs / 1000).toFixed(2)} s (${((newTokens / genMs) * 1000).toFixed(1)} tok/s aggregate)`);
  gen.answers.forEach((a, i) => console.log(`  answer ${i} (${a.finishReason}, ${a.tokens.length} tokens): ${JSON.stringify(tokenizer.decode(a.tokens, { skipSpecialTokens: true }))}`));

  const answers = gen.answers.map((a) => a.tokens);
  const { batch, answerTokens } = answerBatch(prompt, answers, cfg.vocabSize);
  const meanLogp = async (enabled: boolean) => {
    lora.enabled = enabled;
    const pass = sequenceLogprobs(gpu, weights, lora, batch);
    const lp = (await gpu.readF32(pass.logp)).reduce((s, v) => s + v, 0) / answerTokens;
    pass.release();
    lora.enabled = true;
    return lp;
  };
  console.log(`mean answer log-prob: policy ${(await meanLogp(true)).toFixed(4)}, reference ${(await meanLogp(false)).toFixed(4)}`);

  // LoRA steps on loss = -mean log p(answer tokens): a supervised step on the model's own answers.
  const lr = num(f, 'lr', 1e-3);
  const dlogp = gpu.empty([batch.B * batch.T]);
  fill(gpu, dlogp, -1 / answerTokens, batch.B * batch.T);
  for (let s = 0; s < steps; s++) {
    const ts = performance.now();
    lora.zeroGrad();
    const pass = sequenceLogprobs(gpu, weights, lora, batch, { train: true });
    pass.backward(dlogp);
    pass.release();
    const report = await lora.step({ lr }).read();
    const ms = performance.now() - ts;
    console.log(`step ${s + 1}: grad norm ${report.gradNorm.toFixed(4)}${report.skipped ? ' (skipped: non-finite)' : ''}, ` +
      `${ms.toFixed(0)} ms, ${((batch.B * batch.T) / ms * 1000).toFixed(0)} tokens/s; mean answer log-prob now ${(await meanLogp(true)).toFixed(4)}`);
  }
  dlogp.release();

  const out = f.get('export');
  if (out) {
    const files = await lora.exportPeft(loaded.sourceName);
    await mkdir(out, { recursive: true });
    for (const [name, data] of Object.entries(files)) await writeFile(join(out, name), data);
    console.log(`adapter written to ${out} (${Object.keys(files).join(', ')})`);
  }
  console.log(`peak GPU pool bytes: ${(gpu.stats().peakAllocatedBytes / 2 ** 20).toFixed(1)} MiB (weights ${(weights.bytes / 2 ** 20).toFixed(1)} MiB included)`);
  lora.release();
  weights.release();
  gpu.destroy();
}

main().then(
  () => process.exit(0),
  (e: unknown) => {
    console.error(`error: ${e instanceof Error ? e.message : String(e)}`);
    process.exit(1);
  },
);
