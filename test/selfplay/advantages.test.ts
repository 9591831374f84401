import { describe, expect, it } from 'vitest';
import { computeAdvantages, mean, stdUnbiased, type RewardSource } from '../../src/selfplay/advantages';

const close = (a: number, b: number, digits = 10) => expect(a).toBeCloseTo(b, digits);
const closeAll = (a: number[], b: number[], digits = 10) => {
  expect(a.length).toBe(b.length);
  a.forEach((x, i) => close(x, b[i], digits));
};

describe('mean and std', () => {
  it('uses the unbiased std like torch.std', () => {
    // [1, 0]: mean 0.5, squared deviations 0.25 + 0.25 = 0.5, / (2 - 1) -> std sqrt(0.5)
    close(mean([1, 0]), 0.5);
    close(stdUnbiased([1, 0]), Math.SQRT1_2);
    expect(stdUnbiased([3])).toBe(0);
    expect(mean([])).toBe(0);
  });
});

describe('computeAdvantages, one game source (LSP-Zero)', () => {
  // rewards [[1, 0], [0.5, 0.5]]
  //   V = [0.5, 0.5]
  //   A_sol (none)  = [[0.5, -0.5], [0, 0]]
  //   std_j         = [sqrt(0.5), 0]
  //   A_sol (group) = [[0.5 / (sqrt(.5) + 1e-4), -0.5 / (sqrt(.5) + 1e-4)], [0 / 1e-4, 0 / 1e-4]]
  //   challenger reward -V = [-0.5, -0.5], A_ch = mean V - V = [0, 0]
  //   frac_reward_zero_std = 1 / 2
  //   reward over [1, 0, .5, .5]: mean 0.5, std sqrt((.25 + .25) / 3) = sqrt(1/6)
  const sources: RewardSource[] = [{ name: 'rm', kind: 'game', weight: 1, rewards: [[1, 0], [0.5, 0.5]] }];

  it('mean-centres without scaling', () => {
    const a = computeAdvantages(sources, { scale: 'none' });
    closeAll(a.value, [0.5, 0.5]);
    closeAll(a.solverAdvantage[0], [0.5, -0.5]);
    closeAll(a.solverAdvantage[1], [0, 0]);
    closeAll(a.challengerReward, [-0.5, -0.5]);
    closeAll(a.challengerAdvantage, [0, 0]);
    close(a.fracRewardZeroStd, 0.5);
    close(a.rewardMean, 0.5);
    close(a.rewardStd, Math.sqrt(1 / 6));
    expect(a.perSource[0].name).toBe('rm');
    close(a.perSource[0].mean, 0.5);
    close(a.perSource[0].std, Math.sqrt(1 / 6));
  });

  it('divides by the group std + 1e-4 with scale group', () => {
    const a = computeAdvantages(sources, { scale: 'group' });
    const d = Math.SQRT1_2 + 1e-4;
    closeAll(a.solverAdvantage[0], [0.5 / d, -0.5 / d]);
    closeAll(a.solverAdvantage[1], [0, 0]);
    closeAll(a.solverGroupStd, [Math.SQRT1_2, 0]);
  });
});

describe('computeAdvantages, game + quality sources (LSP)', () => {
  // game    [[1, 0], [0, 0], [1, 1]]        -> V   = [0.5, 0, 1]
  // quality [[4, 6], [2, 2], [7, 5]], w 0.5 -> [[2, 3], [1, 1], [3.5, 2.5]], V_Q = [2.5, 1, 3]
  // Solver total R = [[3, 3], [1, 1], [4.5, 3.5]], group mean [3, 1, 4]
  //   A_sol = [[0, 0], [0, 0], [0.5, -0.5]], frac_reward_zero_std = 2/3
  // Challenger reward -V + V_Q = [2, 1, 2], mean 5/3, A_ch = [1/3, -2/3, 1/3]
  // With challengerQualityWeight 0: C = -V = [-0.5, 0, -1], A_ch = mean V - V = [0, 0.5, -0.5]
  const sources: RewardSource[] = [
    { name: 'rm', kind: 'game', weight: 1, rewards: [[1, 0], [0, 0], [1, 1]] },
    { name: 'judge', kind: 'quality', weight: 0.5, rewards: [[4, 6], [2, 2], [7, 5]] },
  ];

  it('adds the quality value to the Challenger reward', () => {
    const a = computeAdvantages(sources, { scale: 'none' });
    closeAll(a.value, [0.5, 0, 1]);
    closeAll(a.qualityValue, [2.5, 1, 3]);
    closeAll(a.solverReward.flat(), [3, 3, 1, 1, 4.5, 3.5]);
    closeAll(a.solverAdvantage.flat(), [0, 0, 0, 0, 0.5, -0.5]);
    close(a.fracRewardZeroStd, 2 / 3);
    closeAll(a.challengerReward, [2, 1, 2]);
    closeAll(a.challengerAdvantage, [1 / 3, -2 / 3, 1 / 3]);
    close(a.perSource[1].mean, 26 / 6);
  });

  it('reduces to mean V - V when the quality weight is 0', () => {
    const a = computeAdvantages(sources, { scale: 'none', challengerQualityWeight: 0 });
    closeAll(a.challengerReward, [-0.5, 0, -1]);
    closeAll(a.challengerAdvantage, [0, 0.5, -0.5]);
  });

  it('scales Challenger advantages by their std with scale group', () => {
    // C = [2, 1, 2]: unbiased std = sqrt((1/9 + 4/9 + 1/9) / 2) = sqrt(1/3)
    const a = computeAdvantages(sources, { scale: 'group' });
    const d = Math.sqrt(1 / 3) + 1e-4;
    closeAll(a.challengerAdvantage, [1 / 3 / d, -2 / 3 / d, 1 / 3 / d]);
  });
});

describe('frac_reward_zero_std', () => {
  it('counts groups whose std is within 1e-8 of zero (rounding noise included)', () => {
    // [0.1 + 0.2, 0.3] differ by 5.6e-17: std ~4e-17 -> zero; [0, 1e-3] -> not zero
    const a = computeAdvantages(
      [{ name: 'r', kind: 'game', weight: 1, rewards: [[0.1 + 0.2, 0.3], [0, 1e-3], [2, 2]] }],
      { scale: 'none' },
    );
    close(a.fracRewardZeroStd, 2 / 3);
  });
});

describe('computeAdvantages, shape errors', () => {
  it('rejects ragged or mismatched reward tables', () => {
    expect(() => computeAdvantages([], { scale: 'none' })).toThrow();
    expect(() =>
      computeAdvantages([{ name: 'a', kind: 'game', weight: 1, rewards: [[1, 2], [3]] }], { scale: 'none' }),
    ).toThrow();
    expect(() =>
      computeAdvantages(
        [
          { name: 'a', kind: 'game', weight: 1, rewards: [[1, 2]] },
          { name: 'b', kind: 'quality', weight: 1, rewards: [[1, 2], [3, 4]] },
        ],
        { scale: 'none' },
      ),
    ).toThrow();
  });
});
