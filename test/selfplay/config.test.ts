import { describe, expect, it } from 'vitest';
import { ConfigError, DEFAULT_CONFIG, makeConfig, scheduledLr } from '../../src/selfplay/config';

describe('trainer config', () => {
  it("defaults are the paper's where it states them", () => {
    expect(DEFAULT_CONFIG.queriesPerIteration).toBe(8);
    expect(DEFAULT_CONFIG.beta).toBe(0.05);
    expect(DEFAULT_CONFIG.mode).toBe('lsp');
  });

  it('merges nested overrides without losing defaults', () => {
    const c = makeConfig({ rewards: { verifiable: { enabled: true } }, lora: { r: 4 } });
    expect(c.rewards.verifiable).toEqual({ enabled: true, weight: 1 });
    expect(c.rewards.judge).toEqual(DEFAULT_CONFIG.rewards.judge);
    expect(c.lora.r).toBe(4);
    expect(c.lora.alpha).toBe(DEFAULT_CONFIG.lora.alpha);
    expect(c.lora.targets).not.toBe(DEFAULT_CONFIG.lora.targets);
  });

  it('rejects absurd settings, naming the field', () => {
    const bad: [object, RegExp][] = [
      [{ groupSize: 0 }, /groupSize/],
      [{ queriesPerIteration: 2.5 }, /queriesPerIteration/],
      [{ lr: -1 }, /lr/],
      [{ temperature: Number.NaN }, /temperature/],
      [{ klEstimator: 'k2' }, /klEstimator/],
      [{ aggregation: 'mean' }, /aggregation/],
      [{ lora: { targets: ['lm_head'] } }, /lora.targets.*lm_head/],
      [{ lora: { targets: [] } }, /lora.targets/],
      [{ seed: -1 }, /seed/],
      [{ maxGradNorm: 0 }, /maxGradNorm/],
      [{ lrSchedule: 'step' }, /lrSchedule/],
      [{ lrWarmup: 5, lrDecayIterations: 5 }, /lrDecayIterations/],
      [{ lrMinRatio: 2 }, /lrMinRatio/],
    ];
    for (const [o, re] of bad) {
      expect(() => makeConfig(o as never)).toThrow(ConfigError);
      expect(() => makeConfig(o as never)).toThrow(re);
    }
  });

  it('schedules the learning rate: warm-up, then constant, linear or cosine decay to the floor', () => {
    const base = { lr: 0.01, lrWarmup: 0, lrDecayIterations: 10, lrMinRatio: 0 };
    expect(scheduledLr({ ...base, lrSchedule: 'constant' }, 7)).toBe(0.01);
    const lin = (i: number) => scheduledLr({ ...base, lrSchedule: 'linear' }, i);
    expect([0, 5, 10, 30].map(lin)).toEqual([0.01, 0.005, 0, 0]);
    const cos = (i: number) => scheduledLr({ ...base, lrSchedule: 'cosine', lrMinRatio: 0.1 }, i);
    expect(cos(0)).toBeCloseTo(0.01, 12);
    expect(cos(5)).toBeCloseTo(0.001 + 0.009 * 0.5, 12);
    expect(cos(2)).toBeCloseTo(0.001 + 0.009 * 0.5 * (1 + Math.cos(Math.PI * 0.2)), 12);
    expect(cos(10)).toBeCloseTo(0.001, 12);
    expect(cos(99)).toBeCloseTo(0.001, 12);
    // Warm-up: lr (i + 1) / (warmup + 1) for the first warmup updates, then the decay starts at lr.
    const warm = (i: number) => scheduledLr({ ...base, lrSchedule: 'linear', lrWarmup: 3, lrDecayIterations: 7 }, i);
    expect([0, 1, 2, 3, 5, 7].map(warm).map((x) => +x.toFixed(12))).toEqual([0.0025, 0.005, 0.0075, 0.01, 0.005, 0]);
    expect(makeConfig().lrSchedule).toBe('constant');
  });
});
