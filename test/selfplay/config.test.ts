import { describe, expect, it } from 'vitest';
import { ConfigError, DEFAULT_CONFIG, makeConfig } from '../../src/selfplay/config';

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
    ];
    for (const [o, re] of bad) {
      expect(() => makeConfig(o as never)).toThrow(ConfigError);
      expect(() => makeConfig(o as never)).toThrow(re);
    }
  });
});
