/**
 * Generation on the tiny random Llama (models/tiny-llama, loaded by the real loader)
 * against the float64 PyTorch oracle's fixtures (test/fixtures/tiny-llama.json), and
 * the KV-cache paths against this engine's own full prefill.
 *
 * On a CPU renderer the 128256-way LM head dominates every step (seconds each), so the
 * fixture tests use the full vocabulary and the cache and batching tests use the same
 * model seen through its first SMALL_V vocabulary rows (a valid model in its own right,
 * compared only with itself).
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Gpu } from '../../src/gpu/gpu';
import type { Tensor } from '../../src/gpu/tensor';
import { generate, sharedPrefixLength, type GenerateResult } from '../../src/model/generate';
import { KvCache, decodeStep, defaultKvDtype, prefill, prefillShared, type InferenceLora } from '../../src/model/infer';
import { loadLlama } from '../../src/model/load';
import { LoraAdapter } from '../../src/model/lora';
import { openModelDir } from '../../src/model/node-source';
import { loadTokenizer } from '../../src/model/tokenizer';
import type { LlamaWeights, WeightFormat } from '../../src/model/weights';
import { useGpu } from '../helpers/gpu';
import { ROOT, TINY_DIR, smallVocab } from '../helpers/model-files';
import { expectClose } from '../helpers/numeric';

const ADAPTER_DIR = join(ROOT, 'models', 'tiny-llama-lora');
const SMALL_V = 1024;
/** Tests that run the 128256-way LM head every step: seconds per step on a CPU renderer. */
const FULL_VOCAB_TIMEOUT = 600_000;

interface SequenceFixture {
  name: string;
  ids: number[];
  messages?: { role: string; content: string }[];
  date_string?: string;
  base: { logsumexp: number[]; last_top_ids: number[]; last_top_logits: number[] };
  lora: { logsumexp: number[]; last_top_ids: number[]; last_top_logits: number[] };
}
interface Fixture {
  lora_scale: number;
  sequences: SequenceFixture[];
  greedy: { prompt: string; steps: number; base: { ids: number[]; margins: number[] }; lora: { ids: number[]; margins: number[] } };
}
const fixture = JSON.parse(readFileSync(join(ROOT, 'test/fixtures/tiny-llama.json'), 'utf8')) as Fixture;
const seq = (name: string) => fixture.sequences.find((s) => s.name === name)!;
const chat = seq(fixture.greedy.prompt);
const greedyBase = fixture.greedy.base.ids;
const greedyLora = fixture.greedy.lora.ids;

// ---- loading -------------------------------------------------------------------

async function loadTiny(gpu: Gpu, format: WeightFormat): Promise<LlamaWeights> {
  return (await loadLlama(gpu, await openModelDir(TINY_DIR), { format })).weights;
}


/** A prompt for the small-vocabulary model: the chat prompt's ids folded below V. */
const smallPrompt = (V: number, ids = chat.ids) => ids.map((id) => id % V);

/** The fixture PEFT adapter (r 8, alpha 16 on all seven projections). */
function loadTinyLora(gpu: Gpu, config: LlamaWeights['config']): LoraAdapter {
  const adapter = LoraAdapter.fromPeft(gpu, config, {
    'adapter_config.json': readFileSync(join(ADAPTER_DIR, 'adapter_config.json'), 'utf8'),
    'adapter_model.safetensors': new Uint8Array(readFileSync(join(ADAPTER_DIR, 'adapter_model.safetensors'))),
  });
  expect(adapter.scale).toBe(fixture.lora_scale);
  return adapter;
}

async function readLogits(gpu: Gpu, t: Tensor): Promise<Float32Array> {
  const x = await gpu.readF32(t);
  t.release();
  return x;
}

/** Own reference: last-position logits [V] of one full prefill over `ids` (fresh cache, no prefix). */
async function fullPrefillLogits(gpu: Gpu, w: LlamaWeights, lora: InferenceLora | null, ids: number[]): Promise<Float32Array> {
  const cache = new KvCache(gpu, w.config, 1, ids.length);
  try {
    return await readLogits(gpu, prefill(gpu, w, lora, [ids], cache));
  } finally {
    cache.release();
  }
}

function argmax(a: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < a.length; i++) if (a[i]! > a[best]!) best = i;
  return best;
}

function logSumExp(a: ArrayLike<number>): number {
  let m = -Infinity;
  for (let i = 0; i < a.length; i++) m = Math.max(m, a[i]!);
  let s = 0;
  for (let i = 0; i < a.length; i++) s += Math.exp(a[i]! - m);
  return m + Math.log(s);
}

const greedy = { temperature: 0, stopTokens: [] as number[] };
const tokensOf = (r: GenerateResult) => r.answers.map((a) => a.tokens);

// ---- tests ---------------------------------------------------------------------

describe('generation on tiny-llama (f32 weights, full vocabulary) against the oracle', () => {
  const getGpu = useGpu();
  let w: LlamaWeights;
  let lora: LoraAdapter;
  beforeAll(async () => {
    w = await loadTiny(getGpu(), 'f32');
    lora = loadTinyLora(getGpu(), w.config);
  });
  afterAll(() => {
    lora?.release();
    w?.release();
  });

  it('greedy answers to the chat prompt (rendered by the Llama-3 tokenizer) equal the oracle, base', async () => {
    const gpu = getGpu();
    const tokenizer = await loadTokenizer(await openModelDir(TINY_DIR));
    const ids = tokenizer.applyChatTemplate(chat.messages!, { dateString: chat.date_string! });
    expect(ids).toEqual(chat.ids);

    // Two rows over the shared prompt; both must be the oracle's greedy answer.
    const base = await generate(gpu, w, null, { prompt: ids, G: 2, maxNewTokens: fixture.greedy.steps, ...greedy });
    expect(base.sharedPrefix).toBe(ids.length);
    for (const a of base.answers) {
      expect(a.tokens).toEqual(greedyBase);
      expect(a.finishReason).toBe('length');
      expect(a.logprobs.every((x) => Number.isFinite(x) && x <= 0)).toBe(true);
    }
    // Greedy log-probs are under softmax(logits); the first one is fixed by the prompt's last position.
    expect(chat.base.last_top_ids[0]).toBe(greedyBase[0]);
    expect(base.answers[0]!.logprobs[0]).toBeCloseTo(chat.base.last_top_logits[0]! - chat.base.logsumexp.at(-1)!, 3);
    expect(base.answers[1]!.logprobs).toEqual(base.answers[0]!.logprobs);

    // The answer as text, and back.
    const text = tokenizer.decode(base.answers[0]!.tokens);
    expect(typeof text).toBe('string');
    expect(text.length).toBeGreaterThan(0);
    expect(tokenizer.decode(tokenizer.encode(text, { addSpecialTokens: false }))).toBe(text);
  }, FULL_VOCAB_TIMEOUT);

  it('greedy answer with the fixture adapter equals the oracle; switched off it is the base model again', async () => {
    const gpu = getGpu();
    const ids = chat.ids;
    const adapted = await generate(gpu, w, lora, { prompt: ids, maxNewTokens: fixture.greedy.steps, ...greedy });
    expect(adapted.answers[0]!.tokens).toEqual(greedyLora);
    expect(adapted.answers[0]!.logprobs[0]).toBeCloseTo(chat.lora.last_top_logits[0]! - chat.lora.logsumexp.at(-1)!, 3);

    // Switched off, the adapter leaves the reference policy (the answers part at their second token).
    lora.enabled = false;
    try {
      const off = await generate(gpu, w, lora, { prompt: ids, maxNewTokens: 2, ...greedy });
      expect(off.answers[0]!.tokens).toEqual(greedyBase.slice(0, 2));
    } finally {
      lora.enabled = true;
    }
  }, FULL_VOCAB_TIMEOUT);

  it('a stop set holding the first greedy token ends every row at once', async () => {
    const gpu = getGpu();
    // The default stop ids are the checkpoint's eos ids.
    expect(w.config.eosTokenIds).toEqual([128001, 128008, 128009]);
    const stopped = await generate(gpu, w, null, { prompt: chat.ids, G: 3, maxNewTokens: 8, temperature: 0, stopTokens: [...w.config.eosTokenIds, greedyBase[0]!] });
    expect(stopped.steps).toBe(1);
    for (const a of stopped.answers) {
      expect(a.tokens).toEqual([greedyBase[0]]);
      expect(a.finishReason).toBe('stop');
    }
  }, FULL_VOCAB_TIMEOUT);

  it('several prompts in one batch: first tokens and log-probs equal the oracle for each', async () => {
    const gpu = getGpu();
    const seqs = [seq('short'), seq('long'), chat];
    // All start with <|begin_of_text|>: one shared-prefix token, then ragged own prompts.
    expect(sharedPrefixLength(seqs.map((s) => s.ids))).toBe(1);
    for (const [ad, which] of [[null, 'base'], [lora, 'lora']] as const) {
      const r = await generate(gpu, w, ad, { prompt: seqs.map((s) => s.ids), G: 2, maxNewTokens: 1, ...greedy });
      expect(r.sharedPrefix).toBe(1);
      expect(r.decodeSteps).toBe(0);
      seqs.forEach((s, i) => {
        for (const a of r.answers.slice(2 * i, 2 * i + 2)) {
          expect(a.prompt).toBe(i);
          expect(a.tokens).toEqual([s[which].last_top_ids[0]]);
          expect(a.logprobs[0]).toBeCloseTo(s[which].last_top_logits[0]! - s[which].logsumexp.at(-1)!, 3);
        }
      });
    }
  }, FULL_VOCAB_TIMEOUT);
});

describe(`KV cache, groups, stops and readbacks (f32 weights, first ${SMALL_V} vocabulary rows)`, () => {
  const getGpu = useGpu();
  let full: LlamaWeights;
  let w: LlamaWeights;
  let lora: LoraAdapter;
  const prompt = smallPrompt(SMALL_V);
  beforeAll(async () => {
    full = await loadTiny(getGpu(), 'f32');
    w = smallVocab(full, SMALL_V);
    lora = loadTinyLora(getGpu(), w.config);
  });
  afterAll(() => {
    lora?.release();
    full?.release();
  });

  it('decoding with the KV cache gives the logits of a full prefill (row cache, shared prefix, ragged prompts)', async () => {
    const gpu = getGpu();
    const V = SMALL_V;
    const n0 = prompt.length;
    const steps = 4;
    const answer = (await generate(gpu, w, lora, { prompt, maxNewTokens: steps, ...greedy })).answers[0]!.tokens;
    const tokens = [...prompt, ...answer];
    const refs: Float32Array[] = [];
    for (let t = n0; t < n0 + steps; t++) refs.push(await fullPrefillLogits(gpu, w, lora, tokens.slice(0, t + 1)));
    const tol = { atol: 1e-4, rtol: 1e-4 };

    // (a) one row, prompt in the row cache
    {
      const cache = new KvCache(gpu, w.config, 1, n0 + steps);
      const first = await readLogits(gpu, prefill(gpu, w, lora, [prompt], cache));
      expect(argmax(first)).toBe(answer[0]);
      for (let s = 0; s < steps; s++) {
        const ids = gpu.upload(Uint32Array.of(tokens[n0 + s]!), [1], 'u32');
        const logits = await readLogits(gpu, decodeStep(gpu, w, lora, ids, cache));
        ids.release();
        expectClose(logits, refs[s]!, { ...tol, label: `row cache, step ${s}` });
      }
      expect(cache.lengths).toEqual([n0 + steps]);
      cache.release();
    }

    // (b) the prompt as the shared prefix, three rows fed the same tokens
    {
      const cache = new KvCache(gpu, w.config, 3, steps);
      await readLogits(gpu, prefillShared(gpu, w, lora, prompt, cache));
      expect(cache.P).toBe(n0);
      for (let s = 0; s < steps; s++) {
        const ids = gpu.upload(Uint32Array.from([0, 1, 2].map(() => tokens[n0 + s]!)), [3], 'u32');
        const logits = await readLogits(gpu, decodeStep(gpu, w, lora, ids, cache));
        ids.release();
        for (let b = 0; b < 3; b++) expectClose(logits.subarray(b * V, (b + 1) * V), refs[s]!, { ...tol, label: `prefix row ${b}, step ${s}` });
      }
      expect(cache.lengths).toEqual([steps, steps, steps]);
      cache.release();
    }

    // (c) a shared prefix, then prompts of different lengths after it, one row each;
    // then all rows decode together, each at its own position, one row held back.
    {
      const P = 20;
      const ends = [n0 - 5, n0 + 2, n0];
      const cache = new KvCache(gpu, w.config, 3, n0 + steps);
      prefillShared(gpu, w, lora, tokens.slice(0, P), cache, { logits: false });
      const logits = await readLogits(gpu, prefill(gpu, w, lora, ends.map((e) => tokens.slice(P, e)), cache));
      for (let i = 0; i < ends.length; i++) {
        const ref = await fullPrefillLogits(gpu, w, lora, tokens.slice(0, ends[i]));
        expectClose(logits.subarray(i * V, (i + 1) * V), ref, { ...tol, label: `ragged prompt ${i}` });
      }
      expect(cache.lengths).toEqual(ends.map((e) => e - P));
      const active = [true, false, true];
      for (let s = 0; s < 2; s++) {
        const ids = gpu.upload(Uint32Array.from(ends.map((e, i) => (active[i] ? tokens[e + s]! : 7))), [3], 'u32');
        const stepped = await readLogits(gpu, decodeStep(gpu, w, lora, ids, cache, active));
        ids.release();
        for (const i of [0, 2]) {
          const ref = await fullPrefillLogits(gpu, w, lora, tokens.slice(0, ends[i]! + s + 1));
          expectClose(stepped.subarray(i * V, (i + 1) * V), ref, { ...tol, label: `ragged row ${i} after decode step ${s}` });
        }
      }
      expect(cache.lengths).toEqual([ends[0]! - P + 2, ends[1]! - P, ends[2]! - P + 2]);
      // The held-back row's cache is as it was: it resumes where it stopped.
      const ids = gpu.upload(Uint32Array.from([0, tokens[ends[1]!]!, 0]), [3], 'u32');
      const resumed = await readLogits(gpu, decodeStep(gpu, w, lora, ids, cache, [false, true, false]));
      ids.release();
      expectClose(resumed.subarray(V, 2 * V), await fullPrefillLogits(gpu, w, lora, tokens.slice(0, ends[1]! + 1)), { ...tol, label: 'resumed row' });
      cache.release();
    }
  });

  it('G answers share the prompt: greedy rows equal a lone run; sampling is seeded and per row', async () => {
    const gpu = getGpu();
    const lone = await generate(gpu, w, lora, { prompt, maxNewTokens: 8, ...greedy });
    const group = await generate(gpu, w, lora, { prompt, G: 4, maxNewTokens: 8, ...greedy });
    expect(group.sharedPrefix).toBe(prompt.length);
    for (const a of group.answers) {
      expect(a.tokens).toEqual(lone.answers[0]!.tokens);
      expectClose(a.logprobs, lone.answers[0]!.logprobs, { atol: 1e-5, rtol: 1e-5, label: 'greedy logprobs' });
    }

    const sampled = { prompt, G: 4, maxNewTokens: 6, temperature: 1, stopTokens: [] as number[] };
    const a = await generate(gpu, w, lora, { ...sampled, seed: 1234 });
    const again = await generate(gpu, w, lora, { ...sampled, seed: 1234 });
    const other = await generate(gpu, w, lora, { ...sampled, seed: 4321 });
    expect(tokensOf(again)).toEqual(tokensOf(a));
    expect(again.answers.map((x) => x.logprobs)).toEqual(a.answers.map((x) => x.logprobs));
    expect(new Set(a.answers.map((x) => x.tokens.join(','))).size).toBeGreaterThan(1);
    expect(tokensOf(other)).not.toEqual(tokensOf(a));
    // Row 0 of the group draws the same noise as a lone row 0.
    const loneSampled = await generate(gpu, w, lora, { ...sampled, G: 1, seed: 1234 });
    expect(loneSampled.answers[0]!.tokens).toEqual(a.answers[0]!.tokens);

    // Each sampled token's log-prob is log softmax(logits)[token] of the full prefill (temperature 1).
    // Decode reads an f16 KV cache where the device has shader-f16: within the oracle's f16 bound (5e-3).
    const digits = defaultKvDtype(gpu) === 'f16' ? 2 : 4;
    for (const row of [a.answers[1]!, a.answers[3]!]) {
      for (let s = 0; s < 3; s++) {
        const logits = await fullPrefillLogits(gpu, w, lora, [...prompt, ...row.tokens.slice(0, s)]);
        expect(row.logprobs[s]).toBeCloseTo(logits[row.tokens[s]!]! - logSumExp(logits), digits);
      }
    }

    // Several prompts with a long common prefix: each group equals that prompt's lone run.
    const variant = [...prompt];
    variant[prompt.length - 8] = (variant[prompt.length - 8]! + 1) % SMALL_V;
    const shorter = prompt.slice(0, -3);
    const prompts = [prompt, variant, shorter];
    expect(sharedPrefixLength(prompts)).toBe(prompt.length - 8);
    const batch = await generate(gpu, w, lora, { prompt: prompts, G: 2, maxNewTokens: 5, ...greedy });
    expect(batch.sharedPrefix).toBe(prompt.length - 8);
    for (let i = 0; i < prompts.length; i++) {
      const ref = i === 0 ? lone.answers[0]!.tokens.slice(0, 5) : (await generate(gpu, w, lora, { prompt: prompts[i]!, maxNewTokens: 5, ...greedy })).answers[0]!.tokens;
      expect(tokensOf(batch).slice(2 * i, 2 * i + 2)).toEqual([ref, ref]);
    }
  });

  it('allowedTokens restricts sampling; log-probs are those of the restricted softmax', async () => {
    const gpu = getGpu();
    const allowed = [3, 17, 250, 999];
    const r = await generate(gpu, w, lora, { prompt, G: 6, maxNewTokens: 3, temperature: 1, seed: 7, stopTokens: [], allowedTokens: allowed });
    const seen = new Set<number>();
    for (const a of r.answers) for (const t of a.tokens) {
      expect(allowed).toContain(t);
      seen.add(t);
    }
    expect(seen.size).toBeGreaterThan(1);
    const row = r.answers[2]!;
    for (let s = 0; s < 2; s++) {
      const logits = await fullPrefillLogits(gpu, w, lora, [...prompt, ...row.tokens.slice(0, s)]);
      const sub = allowed.map((id) => logits[id]!);
      expect(row.logprobs[s]).toBeCloseTo(logits[row.tokens[s]!]! - logSumExp(Float32Array.from(sub)), 4);
    }
    await expect(generate(gpu, w, lora, { prompt, maxNewTokens: 1, allowedTokens: [SMALL_V + 5] })).rejects.toThrow(/outside the vocabulary/);
  });

  it('stop tokens end rows, finish reasons are right, and finished rows leave the others untouched', async () => {
    const gpu = getGpu();
    const other = smallPrompt(SMALL_V, seq('long').ids);
    const aloneA = (await generate(gpu, w, null, { prompt, maxNewTokens: 8, ...greedy })).answers[0]!.tokens;
    // Stop the first prompt's rows at the first token of its answer that is not its first token;
    // the other prompt's rows must match their own run with the same stop set.
    const stopAt = aloneA.findIndex((id, i) => i > 0 && !aloneA.slice(0, i).includes(id));
    expect(stopAt).toBeGreaterThan(0);
    const stopId = aloneA[stopAt]!;
    const aloneB = await generate(gpu, w, null, { prompt: other, maxNewTokens: 8, temperature: 0, stopTokens: [stopId] });
    const streamed: [number, number, number][] = [];
    const mixed = await generate(gpu, w, null, {
      prompt: [prompt, other],
      G: 2,
      maxNewTokens: 8,
      temperature: 0,
      stopTokens: [stopId],
      onToken: (row, id, step) => streamed.push([row, id, step]),
    });
    for (const a of mixed.answers.slice(0, 2)) {
      expect(a.tokens).toEqual(aloneA.slice(0, stopAt + 1));
      expect(a.finishReason).toBe('stop');
    }
    for (const a of mixed.answers.slice(2)) {
      expect(a.tokens).toEqual(aloneB.answers[0]!.tokens);
      expect(a.finishReason).toBe(aloneB.answers[0]!.finishReason);
    }
    // Streaming: every token of every row, in step order, nothing after a row's stop.
    const expected = mixed.answers.flatMap((a, row) => a.tokens.map((id, step) => [row, id, step] as [number, number, number]));
    expected.sort((x, y) => x[2] - y[2] || x[0] - y[0]);
    expect(streamed).toEqual(expected);
    const lengths = mixed.answers.map((a) => a.tokens.length);
    expect(mixed.steps).toBe(Math.max(...lengths));
    if (mixed.answers.slice(2).every((a) => a.finishReason === 'length')) expect(lengths.slice(2)).toEqual([8, 8]);
  });

  it('reads back once per step, only the sampled ids and their log-probs', async () => {
    const gpu = getGpu();
    const original = gpu.readBytes.bind(gpu);
    const sizes: number[] = [];
    gpu.readBytes = (buffer, offset, bytes) => {
      sizes.push(bytes);
      return original(buffer, offset, bytes);
    };
    try {
      const G = 4;
      const run = await generate(gpu, w, lora, { prompt, G, maxNewTokens: 8, ...greedy });
      expect(run.steps).toBe(8);
      expect(run.decodeSteps).toBe(7);
      expect(sizes).toEqual(new Array(8).fill(2 * G * 4));

      // All rows stop early: the next step was already under way, and its read is the only extra one.
      const answer = run.answers[0]!.tokens;
      const stopAt = answer.findIndex((id, i) => i > 1 && !answer.slice(0, i).includes(id));
      expect(stopAt).toBeGreaterThan(1);
      sizes.length = 0;
      const early = await generate(gpu, w, lora, { prompt, G, maxNewTokens: 8, temperature: 0, stopTokens: [answer[stopAt]!] });
      expect(early.answers.every((a) => a.finishReason === 'stop' && a.tokens.length === stopAt + 1)).toBe(true);
      expect(early.steps).toBe(stopAt + 1);
      expect(early.decodeSteps).toBe(stopAt + 1);
      expect(sizes).toEqual(new Array(stopAt + 2).fill(2 * G * 4));
    } finally {
      gpu.readBytes = original;
    }
  });
});

describe('generation on tiny-llama (4-bit weights)', () => {
  const getGpu = useGpu();
  let w: LlamaWeights;
  beforeAll(async () => {
    w = await loadTiny(getGpu(), 'q4');
  });
  afterAll(() => w?.release());

  it('runs end to end over the full vocabulary: valid ids and log-probs, reproducible', async () => {
    const gpu = getGpu();
    const V = w.config.vocabSize;
    const opts = { prompt: chat.ids, G: 2, maxNewTokens: 3, temperature: 0.8, topP: 0.95, seed: 9, stopTokens: [] as number[] };
    const sampled = await generate(gpu, w, null, opts);
    for (const a of sampled.answers) {
      expect(a.tokens).toHaveLength(3);
      expect(a.tokens.every((id) => Number.isInteger(id) && id >= 0 && id < V)).toBe(true);
      expect(a.logprobs.every((x) => Number.isFinite(x) && x <= 0)).toBe(true);
    }
    expect(tokensOf(await generate(gpu, w, null, opts))).toEqual(tokensOf(sampled));
  }, FULL_VOCAB_TIMEOUT);

  it(`greedy steps equal the argmax of the 4-bit full prefill (first ${SMALL_V} vocabulary rows)`, async () => {
    const gpu = getGpu();
    const small = smallVocab(w, SMALL_V);
    const prompt = smallPrompt(SMALL_V);
    // An f32 KV cache, as the f32 prefill it is compared with at 1e-4 (the f16 cache's bound is oracle.test.ts's).
    const g = await generate(gpu, small, null, { prompt, G: 2, maxNewTokens: 4, ...greedy, kvCache: 'f32' });
    expect(g.answers[1]!.tokens).toEqual(g.answers[0]!.tokens);
    const answer = g.answers[0]!.tokens;
    for (let s = 0; s < answer.length; s++) {
      const logits = await fullPrefillLogits(gpu, small, null, [...prompt, ...answer.slice(0, s)]);
      expect(answer[s]).toBe(argmax(logits));
      expect(g.answers[0]!.logprobs[s]).toBeCloseTo(logits[answer[s]!]! - logSumExp(logits), 4);
    }
  });
});
