/**
 * The engine against transformers.js (onnxruntime-node, CPU) on the same weights: the
 * tiny Llama of models/tiny-llama written as the ONNX decoder transformers.js loads
 * (src/formats/onnx-llama.ts, f32 weights), loaded from a local folder with remote
 * models off. From the same Llama-3 chat prompt, greedy generation must give the same
 * tokens, and the log-probs and last-position logits must agree.
 *
 * Tolerance: both run the same f32 weights; they differ only in summation order and
 * in the transcendental functions (exp, cos/sin of RoPE angles), so the bound is 1e-3
 * on every logit and log-prob (measured: 6e-6 on log-probs, 1.1e-5 on logits of magnitude up to 10; printed by the test).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { generate } from '../../src/model/generate';
import { KvCache, prefillShared } from '../../src/model/infer';
import { sequenceLogprobs } from '../../src/model/llama';
import { loadLlama, type LoadedModel } from '../../src/model/load';
import { openModelDir } from '../../src/model/node-source';
import { loadTokenizer } from '../../src/model/tokenizer';
import { useGpu } from '../helpers/gpu';
import { TINY_DIR } from '../helpers/model-files';
import { logSoftmaxAt } from '../helpers/numeric';
import { readCheckpoint, writeOnnxFolder } from './onnx-model';

const TOLERANCE = 1e-3;
const NEW_TOKENS = 12;
const MESSAGES = [{ role: 'user', content: 'Name three prime numbers and explain why they are prime.' }];

type Transformers = typeof import('@huggingface/transformers');
interface TjsTensor {
  dims: number[];
  data: ArrayLike<number | bigint>;
  tolist(): unknown;
}

describe('peer: transformers.js (onnxruntime-node) on the same weights', () => {
  const gpu = useGpu();
  let dir = '';
  let tjs: Transformers;
  let ours: LoadedModel;
  let prompt: number[] = [];

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'peer-onnx-'));
    const files = await writeOnnxFolder(await readCheckpoint(TINY_DIR), join(dir, 'tiny-llama'), { weights: 'f32' });
    expect(files).toContain('onnx/model.onnx');
    tjs = await import('@huggingface/transformers');
    tjs.env.allowRemoteModels = false;
    tjs.env.allowLocalModels = true;
    tjs.env.localModelPath = dir;
    const source = await openModelDir(TINY_DIR);
    prompt = (await loadTokenizer(source)).applyChatTemplate(MESSAGES, { dateString: '22 Nov 2026' });
    ours = await loadLlama(gpu(), source, { format: 'f32' });
  });
  afterAll(async () => {
    ours?.weights.release();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('greedy generation gives the same tokens, and log-probs and logits agree', async () => {
    const g = gpu();
    const w = ours.weights;
    const model = await tjs.AutoModelForCausalLM.from_pretrained('tiny-llama', { dtype: 'fp32', device: 'cpu', local_files_only: true });
    try {
      const ids = (values: readonly number[]) => new tjs.Tensor('int64', BigInt64Array.from(values.map(BigInt)), [1, values.length]);
      const mask = (n: number) => new tjs.Tensor('int64', new BigInt64Array(n).fill(1n), [1, n]);
      const theirsOut = (await model.generate({
        input_ids: ids(prompt),
        attention_mask: mask(prompt.length),
        max_new_tokens: NEW_TOKENS,
        do_sample: false,
      } as never)) as unknown as TjsTensor;
      const theirs = (theirsOut.tolist() as bigint[][])[0]!.map(Number).slice(prompt.length);

      const gen = await generate(g, w, null, { prompt, maxNewTokens: NEW_TOKENS, temperature: 0 });
      const mine = gen.answers[0]!.tokens;
      console.log(`prompt ${prompt.length} tokens; ours ${JSON.stringify(mine)}; transformers.js ${JSON.stringify(theirs)}`);
      expect(mine.length).toBe(NEW_TOKENS);
      expect(mine).toEqual(theirs);

      // Log-probs of the whole sequence (prompt + answer) under both, from one forward each.
      const seq = [...prompt, ...mine];
      const fwd = (await model({ input_ids: ids(seq), attention_mask: mask(seq.length) } as never)) as unknown as { logits: TjsTensor };
      const [, T, V] = fwd.logits.dims as [number, number, number];
      expect(T).toBe(seq.length);
      expect(V).toBe(w.config.vocabSize);
      const logits = fwd.logits.data as Float32Array;
      const theirLogp = Array.from({ length: T - 1 }, (_, t) => logSoftmaxAt(logits.subarray(t * V, (t + 1) * V), seq[t + 1]!));
      const pass = sequenceLogprobs(g, w, null, { ids: Uint32Array.from(seq), B: 1, T });
      const myLogp = (await g.readF32(pass.logp)).slice(0, T - 1);
      pass.release();
      let logpErr = 0;
      for (let t = 0; t < T - 1; t++) logpErr = Math.max(logpErr, Math.abs(myLogp[t]! - theirLogp[t]!));
      // The greedy answer's own log-probs, as generate reports them.
      let genErr = 0;
      gen.answers[0]!.logprobs.forEach((lp, i) => (genErr = Math.max(genErr, Math.abs(lp - theirLogp[prompt.length - 1 + i]!))));

      // Every logit of the prompt's last position.
      const cache = new KvCache(g, w.config, 1, 1);
      const last = prefillShared(g, w, null, prompt, cache);
      const myLast = await g.readF32(last);
      last.release();
      cache.release();
      const theirLast = logits.subarray((prompt.length - 1) * V, prompt.length * V);
      let logitErr = 0;
      let logitMax = 0;
      for (let v = 0; v < V; v++) {
        logitErr = Math.max(logitErr, Math.abs(myLast[v]! - theirLast[v]!));
        logitMax = Math.max(logitMax, Math.abs(theirLast[v]!));
      }
      console.log(
        `max |diff|: log-probs over ${T - 1} positions ${logpErr.toExponential(2)}, generated log-probs ${genErr.toExponential(2)}, ` +
          `last-position logits ${logitErr.toExponential(2)} (largest |logit| ${logitMax.toFixed(2)}); bound ${TOLERANCE}`,
      );
      expect(logpErr).toBeLessThan(TOLERANCE);
      expect(genErr).toBeLessThan(TOLERANCE);
      expect(logitErr).toBeLessThan(TOLERANCE);
    } finally {
      await model.dispose();
    }
  });
});
