/**
 * A config.json with absurd sizes (num_hidden_layers = 1e9 and the like) is refused in
 * well under a second, naming the field, by every entry point that reads a config: the
 * parser, the memory plan, the parameter count the model picker shows and the loader.
 * Before the caps each of these walked the layers until JavaScript's Map size limit
 * (25-36 s, then a RangeError naming nothing).
 */
import { describe, expect, it } from 'vitest';
import { FormatError } from '../../src/formats/errors';
import { parseLlamaConfig, type LlamaConfig } from '../../src/formats/llama-config';
import { loadLlama, readModelConfigs } from '../../src/model/load';
import { planMemory, type RunShape } from '../../src/model/memory';
import { parameterCount } from '../../src/worker/models';
import { useGpu } from '../helpers/gpu';
import { CONFIG_3B, memorySource, syntheticModel } from '../helpers/model-files';

const RUN: RunShape = { format: 'q4', loraRank: 16, loraTargets: ['q_proj', 'v_proj'], groupSize: 4, maxPromptTokens: 256, maxNewTokens: 256, checkpointing: true };
const LIMITS = { maxBufferSize: 256 * 2 ** 20, maxStorageBufferBindingSize: 128 * 2 ** 20 };
const BILLION_LAYERS = /config\.json, num_hidden_layers: is 1000000000, far beyond any real model/;

/** The error f throws (sync or async) and how long it took to throw it. */
async function refusal(f: () => unknown): Promise<{ error: unknown; ms: number }> {
  const t0 = performance.now();
  try {
    await f();
  } catch (error) {
    return { error, ms: performance.now() - t0 };
  }
  throw new Error('expected a refusal, but it succeeded');
}

function expectRefusedFast(r: { error: unknown; ms: number }, message: RegExp): void {
  expect(r.error).toBeInstanceOf(FormatError);
  expect((r.error as Error).message).toMatch(message);
  expect(r.ms).toBeLessThan(1000);
}

describe('a config.json with a billion layers', () => {
  const gpu = useGpu();
  const model = syntheticModel({ seed: 5 });
  const files = { ...model.files, 'config.json': JSON.stringify({ ...model.config, num_hidden_layers: 1e9 }) };
  // A LlamaConfig built by hand (not through the parser), as a caller could pass one.
  const handBuilt: LlamaConfig = { ...CONFIG_3B, numLayers: 1e9 };

  it('is refused by the parser and readModelConfigs', async () => {
    expectRefusedFast(await refusal(() => parseLlamaConfig(files['config.json'], 'config.json')), BILLION_LAYERS);
    expectRefusedFast(await refusal(() => readModelConfigs(memorySource(files))), BILLION_LAYERS);
  });

  it('is refused by the memory plan and the parameter count', async () => {
    expectRefusedFast(await refusal(() => planMemory(handBuilt, RUN, LIMITS)), BILLION_LAYERS);
    expectRefusedFast(await refusal(() => parameterCount(handBuilt)), BILLION_LAYERS);
    expectRefusedFast(await refusal(() => planMemory({ ...CONFIG_3B, hiddenSize: 1e9 }, RUN, LIMITS)), /config\.json, hidden_size: is 1000000000/);
  });

  it('is refused by loadLlama, in f32 and q4, before anything is allocated', async () => {
    const before = gpu().stats().inUseBytes;
    for (const format of ['f32', 'q4'] as const) {
      expectRefusedFast(await refusal(() => loadLlama(gpu(), memorySource(files), { format })), BILLION_LAYERS);
    }
    expect(gpu().stats().inUseBytes).toBe(before);
  });

  it('while the largest config the caps let through still plans in well under a second', () => {
    // 1024 layers, vocabulary 2^20: just under the 1e12-parameter cap.
    const big = parseLlamaConfig(
      {
        architectures: ['LlamaForCausalLM'],
        hidden_size: 8192,
        intermediate_size: 32768,
        num_hidden_layers: 1024,
        num_attention_heads: 64,
        num_key_value_heads: 8,
        vocab_size: 1 << 20,
        tie_word_embeddings: true,
      },
      'config.json',
    );
    const t0 = performance.now();
    const plan = planMemory(big, RUN, { ...LIMITS, totalBudgetBytes: 4e9 });
    const n = parameterCount(big);
    const ms = performance.now() - t0;
    expect(n).toBeGreaterThan(9e11);
    expect(plan.weights).toBeGreaterThan(n / 2);
    expect(plan.problems.map((p) => p.kind)).toContain('over-budget');
    expect(ms).toBeLessThan(1000);
  });
});
