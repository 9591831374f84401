/**
 * The batched forward's plumbing on the tiny model (the log-prob and gradient values
 * themselves are checked in oracle.test.ts): the sequence-classification head read at
 * each sequence's last real token against the oracle's final hidden states, padding,
 * default targets, memory, and argument checks.
 */
import { readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Tape } from '../../src/autodiff/tape';
import { batchTargets, finalHidden, sequenceLogprobs, sequenceScore, type TokenBatch } from '../../src/model/llama';
import { loadLlama } from '../../src/model/load';
import { LoraAdapter } from '../../src/model/lora';
import { openModelDir } from '../../src/model/node-source';
import type { LlamaWeights } from '../../src/model/weights';
import { useGpu } from '../helpers/gpu';
import { Rng, expectClose } from '../helpers/numeric';

const ROOT = join(__dirname, '..', '..');
const fx = JSON.parse(readFileSync(join(ROOT, 'test', 'fixtures', 'tiny-llama.json'), 'utf8')) as {
  sequences: { name: string; ids: number[]; base: { last_hidden: number[] }; lora: { last_hidden: number[] } }[];
};

/** All fixture sequences right-padded into one batch (padding id 0, a real token). */
function paddedBatch(): TokenBatch {
  const B = fx.sequences.length;
  const T = Math.max(...fx.sequences.map((s) => s.ids.length));
  const ids = new Uint32Array(B * T);
  fx.sequences.forEach((s, b) => ids.set(s.ids, b * T));
  return { ids, B, T, lengths: fx.sequences.map((s) => s.ids.length) };
}

describe('llama forward', () => {
  const gpu = useGpu();
  let weights: LlamaWeights;

  beforeAll(async () => {
    ({ weights } = await loadLlama(gpu(), await openModelDir(join(ROOT, 'models', 'tiny-llama')), { format: 'f32' }));
  });
  afterAll(() => weights?.release());

  it('default targets: the next token of the same sequence, V after its last real token and on padding', () => {
    const V = 1000;
    const batch: TokenBatch = { ids: Uint32Array.from([5, 6, 7, 8, 9, 10, 11, 0]), B: 2, T: 4, lengths: [4, 3] };
    expect([...batchTargets(batch, V)]).toEqual([6, 7, 8, V, 10, 11, V, V]);
    expect([...batchTargets({ ids: Uint32Array.from([1, 2, 3]), B: 1, T: 3 }, V)]).toEqual([2, 3, V]);
    const given = Uint32Array.from([9, 9, 9]);
    expect(batchTargets({ ids: Uint32Array.from([1, 2, 3]), B: 1, T: 3, targets: given }, V)).toBe(given);
  });

  it('sequenceScore reads a score head at each sequence\'s last real token (vs the oracle\'s final hidden states), base and LoRA', async () => {
    const g = gpu();
    const C = weights.config.hiddenSize;
    const labels = 3;
    const rng = new Rng(21);
    const S = rng.f32(labels * C, 0.2);
    const score = g.upload(S, [labels, C]);
    const withHead: LlamaWeights = { ...weights, score };
    const files = {
      'adapter_config.json': await readFile(join(ROOT, 'models', 'tiny-llama-lora', 'adapter_config.json'), 'utf8'),
      'adapter_model.safetensors': new Uint8Array(await readFile(join(ROOT, 'models', 'tiny-llama-lora', 'adapter_model.safetensors'))),
    };
    const lora = LoraAdapter.fromPeft(g, weights.config, files);
    const batch = paddedBatch();
    await g.sync();
    const inUse = g.stats().inUseBytes;
    for (const variant of ['base', 'lora'] as const) {
      lora.enabled = variant === 'lora';
      const out = sequenceScore(g, withHead, lora, batch);
      expect(out.shape).toEqual([batch.B, labels]);
      const got = await g.readF32(out);
      out.release();
      const want = fx.sequences.flatMap((s) => Array.from({ length: labels }, (_, j) => s[variant].last_hidden.reduce((acc, h, c) => acc + h * S[j * C + c]!, 0)));
      expectClose(got, want, { atol: 1e-4, rtol: 1e-4, label: `${variant} scores` });
    }
    expect(g.stats().inUseBytes, 'scoring leaves nothing behind').toBe(inUse);
    expect(() => sequenceScore(g, weights, null, batch)).toThrow(/no score head/);
    lora.release();
    score.release();
  });

  it('final hidden states: padding does not reach real tokens, and scoring holds one layer input at a time', async () => {
    const g = gpu();
    const batch = paddedBatch();
    const C = weights.config.hiddenSize;
    // Padding with a different id must not change any real row.
    const other = { ...batch, ids: batch.ids.map((id, i) => (i % batch.T >= batch.lengths![Math.floor(i / batch.T)]! ? 77 : id)) };
    const rows: Float32Array[] = [];
    await g.sync();
    const inUse = g.stats().inUseBytes;
    for (const b of [batch, other]) {
      const tape = new Tape(g, false);
      g.pool.resetPeaks();
      const h = finalHidden(tape, weights, null, b);
      rows.push(await g.readF32(h.value));
      // One layer's intermediates [N, *]: nine C wide (norm, q and rotated q, attention,
      // o, residual, norm, down, residual), three HK*D wide (k, rotated k, v), three F wide
      // (gate, up, swiglu). Keeping a second layer's would double the peak.
      const { numKvHeads: HK, headDim: D, intermediateSize: F } = weights.config;
      const layerBytes = b.B * b.T * 4 * (9 * C + 3 * HK * D + 3 * F);
      const peak = g.stats().peakInUseBytes - inUse;
      console.log(`[llama] scoring peak ${peak} bytes = ${(peak / layerBytes).toFixed(2)} x one layer's activations`);
      expect(peak).toBeLessThan(1.5 * layerBytes);
      tape.dispose();
    }
    expect(g.stats().inUseBytes).toBe(inUse);
    fx.sequences.forEach((s, b) => {
      const last = (b * batch.T + s.ids.length - 1) * C;
      expectClose(rows[0]!.subarray(last, last + C), s.base.last_hidden, { atol: 1e-4, rtol: 1e-4, label: `${s.name} last hidden` });
      const real = rows[0]!.subarray(b * batch.T * C, last + C);
      expect(Buffer.from(rows[1]!.subarray(b * batch.T * C, last + C).slice().buffer).equals(Buffer.from(real.slice().buffer))).toBe(true);
    });
  });

  it('rows: scoring a subset gives the same log-probs, entropies and LoRA gradients as the full pass', async () => {
    const g = gpu();
    const seqs = fx.sequences.slice(0, 2).map((x, i) => x.ids.slice(0, 9 - 3 * i));
    const T = 9;
    const ids = new Uint32Array(2 * T);
    seqs.forEach((x, b) => ids.set(x, b * T));
    const batch: TokenBatch = { ids, B: 2, T, lengths: seqs.map((x) => x.length) };
    const N = batch.B * batch.T;
    const full = batchTargets(batch, weights.config.vocabSize);
    const rng = new Rng(77);
    const rows = [...Array(N).keys()].filter((r) => full[r]! < weights.config.vocabSize && rng.uniform() < 0.5).reverse();
    expect(rows.length).toBeGreaterThan(3);
    const lora = LoraAdapter.create(g, weights.config, { r: 4, alpha: 8, targets: ['q_proj', 'down_proj'], seed: 3 });
    for (const m of lora.modules) g.write(m.B.value, rng.f32(m.B.value.size, 0.05));
    const weightsOf = rows.map(() => rng.uniform() - 0.5);
    const grads = async (subset: boolean) => {
      lora.zeroGrad();
      const pass = sequenceLogprobs(g, weights, lora, batch, { train: true, entropy: true, temperature: 0.8, rows: subset ? rows : undefined });
      const lp = await g.readF32(pass.logp);
      const ent = await g.readF32(pass.entropy!);
      const dl = new Float32Array(subset ? rows.length : N);
      rows.forEach((r, m) => (dl[subset ? m : r] = weightsOf[m]!));
      const t = g.upload(dl, [dl.length]);
      pass.backward(t);
      pass.release();
      t.release();
      const gr: Float32Array[] = [];
      for (const m of lora.modules) gr.push(await g.readF32(m.A.grad!), await g.readF32(m.B.grad!));
      return { lp: subset ? lp : Float32Array.from(rows, (r) => lp[r]!), ent: subset ? ent : Float32Array.from(rows, (r) => ent[r]!), gr };
    };
    const a = await grads(false);
    const b = await grads(true);
    expectClose(b.lp, a.lp, { atol: 1e-5, rtol: 1e-5, label: 'logp' });
    expectClose(b.ent, a.ent, { atol: 1e-5, rtol: 1e-5, label: 'entropy' });
    a.gr.forEach((x, i) => expectClose(b.gr[i]!, x, { atol: 1e-6, rtol: 1e-4, label: `grad ${i}` }));
    expect(() => sequenceLogprobs(g, weights, null, batch, { rows: [0, 0] })).toThrow(/repeated/);
    lora.release();
  });

  it('rejects malformed batches and misuse before touching the GPU', () => {
    const g = gpu();
    const ids = Uint32Array.from([1, 2, 3, 4]);
    expect(() => sequenceLogprobs(g, weights, null, { ids, B: 2, T: 3 })).toThrow(/expected B\*T = 6/);
    expect(() => sequenceLogprobs(g, weights, null, { ids, B: 2, T: 2, lengths: [2, 3] })).toThrow(/length 3, expected 1..2/);
    expect(() => sequenceLogprobs(g, weights, null, { ids, B: 2, T: 2, lengths: [2] })).toThrow(/lengths has 1/);
    expect(() => sequenceLogprobs(g, weights, null, { ids, B: 2, T: 2, targets: Uint32Array.of(1) })).toThrow(/targets has 1/);
    expect(() => sequenceLogprobs(g, weights, null, { ids, B: 0, T: 4 })).toThrow(/bad batch shape/);
  });
});
