/**
 * Record and replay (src/gpu/replay.ts): a recorded command list replays what its
 * function dispatched, on new input values, and keeps its scratch and outputs to
 * itself; decode steps replayed from the cache's recording give the logits of steps
 * recorded afresh, bit for bit, through LoRA switched off and on, an adapter trained
 * in place, rows that stop and the length bound growing.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Gpu } from '../../src/gpu/gpu';
import type { Tensor } from '../../src/gpu/tensor';
import { add, scale } from '../../src/kernels/elementwise';
import { KvCache, decodeStep, prefill } from '../../src/model/infer';
import { loadLlama } from '../../src/model/load';
import { LoraAdapter } from '../../src/model/lora';
import { openModelDir } from '../../src/model/node-source';
import { packDecodeProjections } from '../../src/model/pack';
import type { LlamaWeights, WeightFormat } from '../../src/model/weights';
import { useGpu } from '../helpers/gpu';
import { ROOT, TINY_DIR, smallVocab } from '../helpers/model-files';

const ADAPTER_DIR = join(ROOT, 'models', 'tiny-llama-lora');


/** Index of the first element whose bits differ, or -1. */
function firstBitDifference(a: Float32Array, b: Float32Array): number {
  const x = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const y = new Uint32Array(b.buffer, b.byteOffset, b.length);
  if (x.length !== y.length) return 0;
  for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return i;
  return -1;
}

async function take(gpu: Gpu, t: Tensor): Promise<Float32Array> {
  const out = await gpu.readF32(t);
  t.release();
  return out;
}

describe('record and replay', () => {
  const getGpu = useGpu();

  it('a recorded list replays its commands on new input values; its scratch and outputs stay its own', async () => {
    const gpu = getGpu();
    const n = 300;
    const base = gpu.stats().inUseBytes;
    const x = gpu.empty([n]);
    const y = gpu.empty([n]);
    const inUse = gpu.stats().inUseBytes;
    // out = 2 (x + y) + x, through scratch released inside the step (out reuses s's buffer)
    const list = gpu.record('test-step', () => {
      const s = gpu.empty([n], 'f32', 'scratch');
      add(gpu, s, x, y, n);
      const t = gpu.empty([n], 'f32', 'scratch');
      scale(gpu, t, s, 2, n);
      s.release();
      const out = gpu.empty([n], 'f32', 'out');
      add(gpu, out, t, x, n);
      t.release();
      return [out];
    });
    expect(list.dispatches).toBe(3);
    expect(gpu.stats().inUseBytes - inUse).toBe(inUse - base); // its scratch and its output (as big as x and y), held by the list
    for (let rep = 0; rep < 3; rep++) {
      const xs = Float32Array.from({ length: n }, (_, i) => Math.sin(i + rep));
      const ys = Float32Array.from({ length: n }, (_, i) => (i % 7) - rep);
      gpu.write(x, xs);
      gpu.write(y, ys);
      // Something else takes buffers from the pool between replays: never the list's.
      const other = gpu.zeros([n], 'f32', 'other');
      const [out] = gpu.replay(list);
      expect(() => gpu.replay(list)).toThrow(/still held/); // the loan must come back first
      const got = await take(gpu, out!);
      const want = xs.map((v, i) => Math.fround(Math.fround(2 * Math.fround(v + ys[i]!)) + v));
      expect(firstBitDifference(got, want), `replay ${rep}`).toBe(-1);
      expect(Array.from(await gpu.readF32(other)).every((v) => v === 0)).toBe(true);
      other.release();
    }
    expect(() => gpu.record('refused', () => {
      gpu.write(x, new Float32Array(n));
      return [];
    })).toThrow(/while recording refused/);
    y.release();
    expect(list.replayable).toBe(false);
    expect(() => gpu.replay(list)).toThrow(/a tensor it binds .* was released/);
    list.release();
    x.release();
    expect(gpu.stats().inUseBytes).toBe(base); // x and y gone, the list's buffers back in the pool
  });

  const formats: { name: string; format: WeightFormat; pack: boolean }[] = [
    { name: '4-bit weights, packed (fused decode kernels)', format: 'q4', pack: true },
    { name: 'f32 weights (general decode layers)', format: 'f32', pack: false },
  ];
  describe.each(formats)('decode steps on tiny-llama, $name', ({ format, pack }) => {
    let full: LlamaWeights;
    let w: LlamaWeights;
    let adapter: LoraAdapter;
    beforeAll(async () => {
      const gpu = getGpu();
      full = (await loadLlama(gpu, await openModelDir(TINY_DIR), { format })).weights;
      if (pack) expect(packDecodeProjections(gpu, full)).toBeGreaterThan(0);
      w = smallVocab(full, 512);
      adapter = LoraAdapter.fromPeft(gpu, full.config, {
        'adapter_config.json': readFileSync(join(ADAPTER_DIR, 'adapter_config.json'), 'utf8'),
        'adapter_model.safetensors': new Uint8Array(readFileSync(join(ADAPTER_DIR, 'adapter_model.safetensors'))),
      });
    }, 300_000);
    afterAll(() => {
      adapter?.release();
      full?.release();
    });

    it('replayed steps give the logits of steps recorded afresh, bit for bit', async () => {
      const gpu = getGpu();
      const B = 3;
      const Smax = 28; // the length bound grows once, from 16 to Smax
      const prompts = [[5, 17, 300, 42, 9], [80, 3, 3, 61], [7]];
      const [replayed, fresh] = [new KvCache(gpu, w.config, B, Smax), new KvCache(gpu, w.config, B, Smax)];
      const ids = gpu.empty([B], 'u32');
      try {
        for (const c of [replayed, fresh]) (await take(gpu, prefill(gpu, w, adapter, prompts, c))).fill(0);
        const active = [true, true, true];
        const steps = Smax - prompts[0]!.length;
        for (let s = 0; s < steps; s++) {
          if (s === 4) adapter.enabled = false;
          if (s === 8) adapter.enabled = true;
          if (s === 12) active[1] = false; // a row stops: the batch keeps its shape
          if (s === 16) {
            // The adapter trains in place between iterations: same tensors, new values.
            const m = adapter.modules[0]!;
            gpu.write(m.B.value, Float32Array.from({ length: m.M * adapter.r }, (_, i) => Math.cos(i) * 0.05));
          }
          gpu.write(ids, Uint32Array.from({ length: B }, (_, b) => (s * 37 + b * 101) % 512));
          const a = await take(gpu, decodeStep(gpu, w, adapter, ids, replayed, active));
          const b = await take(gpu, decodeStep(gpu, w, adapter, ids, fresh, active, { replay: false }));
          const at = firstBitDifference(a, b);
          expect(at, `step ${s}: logit ${at} ${a[at]} (replayed) vs ${b[at]} (recorded afresh)`).toBe(-1);
        }
        expect(replayed.lengths).toEqual(fresh.lengths);
        // Recorded at the first step, LoRA off, LoRA on again, and the bound passing 16 (step 11).
        expect(replayed.decodeReplay!.recordings).toBe(4);
        expect(fresh.decodeReplay).toBeNull();
      } finally {
        replayed.release();
        fresh.release();
        ids.release();
        adapter.enabled = true;
      }
    }, 600_000); // lavapipe compiles each pipeline cold with LLVM
  });
});
