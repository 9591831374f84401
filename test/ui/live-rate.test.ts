/** The run view's live tokens/second: tokens of all rows over the last three seconds, from a given clock. */
import { describe, expect, it } from 'vitest';
import { LiveBuffer } from '../../src/ui/live';

describe('live tokens per second', () => {
  it('counts tokens over the recent window and drops to 0 after a pause or a reset', () => {
    let now = 1000;
    const b = new LiveBuffer(() => undefined, () => now);
    expect(b.tokensPerSecond()).toBe(0);
    // 4 rows per decode step, one step every 100 ms: 40 tokens/s.
    for (let step = 0; step < 10; step++) {
      for (let row = 0; row < 4; row++) b.token(0, 'solver', 0, row, 'x');
      now += 100;
    }
    now -= 100;
    // 40 stamps over 0.9 s: 39 intervals.
    expect(b.tokensPerSecond()).toBeCloseTo(39 / 0.9, 9);
    expect(b.tokensPerSecond(now + 5000)).toBe(0);
    b.reset();
    expect(b.tokensPerSecond()).toBe(0);
  });
});
