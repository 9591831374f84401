/**
 * The memory check before a run (src/model/memory-probe.ts): a probe allocation of the
 * plan's peak inside error scopes on the real device (Dawn), released at once; a plan
 * that cannot fit is refused with the largest settings that do, and the device
 * survives. The out-of-memory path, which a software driver cannot be pushed into
 * safely on a shared machine, runs on a device stand-in with a fixed memory size.
 */
import { describe, expect, it } from 'vitest';
import { parseLlamaConfig } from '../../src/formats/llama-config';
import { LLAMA_PROJECTIONS } from '../../src/formats/peft';
import { planMemory, type RunShape } from '../../src/model/memory';
import { checkRunMemory, largestFittingSettings, probeAllocation, type ProbeDevice } from '../../src/model/memory-probe';
import { useGpu } from '../helpers/gpu';
import { CONFIG_3B, syntheticModel } from '../helpers/model-files';

const MiB = 2 ** 20;
const ALL = LLAMA_PROJECTIONS;


const RUN: RunShape = { format: 'q4', loraRank: 16, loraTargets: ALL, groupSize: 8, maxPromptTokens: 256, maxNewTokens: 512, checkpointing: true };

/** A device stand-in with `capacity` bytes: createBuffer past it raises an out-of-memory error in the open scope. */
function fixedMemoryDevice(capacity: number, maxBufferSize: number) {
  let used = 0;
  let live = 0;
  const scopes: { filter: GPUErrorFilter; error: GPUError | null }[] = [];
  const raise = (filter: GPUErrorFilter, message: string) => {
    for (let i = scopes.length - 1; i >= 0; i--) {
      if (scopes[i]!.filter === filter) {
        scopes[i]!.error ??= { message } as GPUError;
        return;
      }
    }
    throw new Error(`uncaptured ${filter} error: ${message}`);
  };
  const device: ProbeDevice & { live(): number } = {
    limits: { maxBufferSize },
    live: () => live,
    pushErrorScope: (filter) => void scopes.push({ filter, error: null }),
    popErrorScope: () => Promise.resolve(scopes.pop()!.error),
    createBuffer: ({ size }) => {
      if (size > maxBufferSize) {
        raise('validation', `Buffer size (${size}) exceeds the max buffer size limit (${maxBufferSize}).`);
        return { destroy: () => undefined };
      }
      if (used + size > capacity) {
        raise('out-of-memory', 'Allocation failed: out of device memory');
        return { destroy: () => undefined };
      }
      used += size;
      live++;
      let gone = false;
      return {
        destroy: () => {
          if (gone) return;
          gone = true;
          used -= size;
          live--;
        },
      };
    },
  };
  return device;
}

describe('memory check on the device (Dawn)', () => {
  const gpu = useGpu();

  it('an absurd plan is refused inside the error scope, naming the largest settings that fit; the device survives', async () => {
    const g = gpu();
    const limits = { maxBufferSize: g.caps.maxBufferSize, maxStorageBufferBindingSize: g.caps.maxStorageBufferBindingSize };
    const absurd: RunShape = { ...RUN, groupSize: 4096, maxNewTokens: 8192, loraRank: 64, trainTokensPerStep: 4 * (256 + 8192) };
    const check = await checkRunMemory(g.device, CONFIG_3B, { run: absurd, microBatch: 4 }, limits);
    console.log(`absurd plan: ${check.message}`);
    expect(check.ok).toBe(false);
    expect(check.probe.error?.kind).toBe('validation');
    expect(check.message).toMatch(
      /^This run does not fit this GPU: its peak is about \d+ MiB and the GPU refused its largest buffer \(KV cache .*; this GPU allows \d+ MiB per buffer\)\. No one setting is enough; it fits with all of: answers per prompt \(G\) \d+ \(now 4096\); answer length in tokens \d+ \(now 8192\); micro-batch \d+ \(now 4\)\./,
    );
    // The named settings fit the device's per-buffer limit (checked on the plan directly), and the run as asked does not.
    const [g1, t1, m1] = check.together!.map((x) => x.fits!) as [number, number, number];
    const tooLarge = (r: RunShape) => planMemory(CONFIG_3B, r, limits).problems.some((p) => p.kind === 'buffer-too-large');
    expect(tooLarge(absurd)).toBe(true);
    expect(tooLarge({ ...absurd, groupSize: g1, maxNewTokens: t1, trainTokensPerStep: m1 * (256 + t1) })).toBe(false);
    expect(g1).toBeLessThan(4096);
    // The device was not lost: it still runs work.
    const t = g.upload(Float32Array.of(1, 2, 3, 4), [4], 'f32', 'after-probe');
    expect(Array.from(await g.readF32(t))).toEqual([1, 2, 3, 4]);
    t.release();
    expect(g.isLost).toBe(false);
  });

  it('a plan that fits: the probe allocates its peak, releases it, and fills totalBudgetBytes', async () => {
    const g = gpu();
    const config = parseLlamaConfig(syntheticModel({ seed: 3 }).config, 'config.json');
    const limits = { maxBufferSize: g.caps.maxBufferSize, maxStorageBufferBindingSize: g.caps.maxStorageBufferBindingSize };
    const run: RunShape = { ...RUN, groupSize: 4, maxPromptTokens: 16, maxNewTokens: 16 };
    const check = await checkRunMemory(g.device, config, { run }, limits);
    expect(check.ok).toBe(true);
    expect(check.message).toBeNull();
    expect(check.probe.error).toBeNull();
    expect(check.probe.allocatedBytes).toBeGreaterThanOrEqual(check.plan.total);
    expect(check.limits.totalBudgetBytes).toBe(check.plan.total);
    expect(check.plan.problems.filter((p) => p.kind === 'over-budget')).toEqual([]);
    const direct = await probeAllocation(g.device, 64 * MiB, 16 * MiB, 16 * MiB);
    expect(direct).toEqual({ fits: true, bytes: 64 * MiB, allocatedBytes: 64 * MiB, error: null });
  });
});

describe('memory check when the device runs out of memory (device with a fixed memory size)', () => {
  it('stops at the first refusal, releases every probe buffer, and names settings that fit what it got', async () => {
    const limits = { maxBufferSize: 2 ** 31, maxStorageBufferBindingSize: 2 ** 31 };
    const run: RunShape = { ...RUN, groupSize: 64, maxNewTokens: 1024, trainTokensPerStep: 2 * (256 + 1024) };
    const weights = planMemory(CONFIG_3B, run, limits).weights;
    const free = 3000 * MiB;
    const device = fixedMemoryDevice(free, limits.maxBufferSize);
    const check = await checkRunMemory(device, CONFIG_3B, { run, microBatch: 2 }, limits, weights);
    expect(device.live()).toBe(0);
    expect(check.ok).toBe(false);
    expect(check.probe.error?.kind).toBe('out-of-memory');
    expect(check.probe.allocatedBytes).toBeLessThanOrEqual(free);
    expect(check.probe.allocatedBytes).toBeGreaterThan(free - 256 * MiB);
    expect(check.limits.totalBudgetBytes).toBe(weights + check.probe.allocatedBytes);
    expect(check.plan.problems.some((p) => p.kind === 'over-budget')).toBe(true);
    console.log(`out of memory: ${check.message}`);
    expect(check.message).toMatch(/the GPU gave \d+ MiB of the \d+ MiB it needs beyond the loaded model\. It fits with any one of: .*answers per prompt \(G\) \d+ \(now 64\)/);
    expect(check.together).toBeNull();
    const budget = check.limits;
    for (const s of check.suggestions) {
      if (s.fits === null) continue;
      const at = (v: number): RunShape =>
        s.setting === 'groupSize' ? { ...run, groupSize: v } : s.setting === 'loraRank' ? { ...run, loraRank: v } : s.setting === 'maxNewTokens' ? { ...run, maxNewTokens: v, trainTokensPerStep: run.trainTokensPerStep! - 2 * (run.maxNewTokens - v) } : { ...run, trainTokensPerStep: (run.trainTokensPerStep! * v) / 2 };
      expect(planMemory(CONFIG_3B, at(s.fits), budget).total).toBeLessThanOrEqual(budget.totalBudgetBytes!);
      if (s.fits < s.now) expect(planMemory(CONFIG_3B, at(s.fits + 1), budget).total).toBeGreaterThan(budget.totalBudgetBytes!);
    }
    // The same search straight from the limits gives the same answer.
    expect(largestFittingSettings(CONFIG_3B, { run, microBatch: 2 }, budget)).toEqual(check.suggestions);
  });
});
