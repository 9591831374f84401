import { describe, expect, it } from 'vitest';
import {
  arithmeticQuery,
  challengerMessages,
  numberTokenIds,
  pairScore,
  parseArithmeticQuery,
  parseFinalNumber,
  parsePairVerdict,
  verifiableReward,
} from '../../src/selfplay/prompts';

describe('verifiable arithmetic', () => {
  it('parses the last a op b of a query, in symbols or words', () => {
    expect(parseArithmeticQuery('What is 37 * 12?')).toEqual({ a: 37, op: '*', b: 12, result: 444 });
    expect(parseArithmeticQuery('Compute 1,200 minus 45, please.')).toEqual({ a: 1200, op: '-', b: 45, result: 1155 });
    expect(parseArithmeticQuery('First 2 + 2, then 9 × 7')).toEqual({ a: 9, op: '*', b: 7, result: 63 });
    expect(parseArithmeticQuery('What is 84 divided by 4?')).toEqual({ a: 84, op: '/', b: 4, result: 21 });
    expect(parseArithmeticQuery('What is 7 / 2?')).toBeNull(); // inexact division is not checkable
    expect(parseArithmeticQuery('What is 5 / 0?')).toBeNull();
    expect(parseArithmeticQuery('Tell me a story about a cat.')).toBeNull();
    expect(parseArithmeticQuery(arithmeticQuery(3, 4))).toEqual({ a: 3, op: '+', b: 4, result: 7 });
  });

  it('reads the final number of an answer', () => {
    expect(parseFinalNumber('The answer is 444.')).toBe(444);
    expect(parseFinalNumber('12 * 37 = 444, so **444**')).toBe(444);
    expect(parseFinalNumber('It is 1,155')).toBe(1155);
    expect(parseFinalNumber('-3')).toBe(-3);
    expect(parseFinalNumber('about 2.5')).toBe(2.5);
    expect(parseFinalNumber('no idea')).toBeNull();
  });

  it('rewards exact matches; an uncheckable query counts as solved', () => {
    expect(verifiableReward('What is 3 + 4?', '7')).toEqual({ valid: true, reward: 1 });
    expect(verifiableReward('What is 3 + 4?', 'It is 8')).toEqual({ valid: true, reward: 0 });
    expect(verifiableReward('What is 3 + 4?', '7.5')).toEqual({ valid: true, reward: 0 });
    expect(verifiableReward('Write a haiku', 'leaves fall')).toEqual({ valid: false, reward: 1 });
  });

  it('number tokens must be single tokens', () => {
    const vocab = new Map([...Array(20).keys()].map((k) => [String(k), 100 + k]));
    const encode = (t: string) => (vocab.has(t) ? [vocab.get(t)!] : [...t].map((ch) => vocab.get(ch)!));
    expect(numberTokenIds(encode, 12)).toEqual([...Array(13).keys()].map((k) => 100 + k));
    expect(() => numberTokenIds(encode, 25)).toThrow(/"20" to be one token.*split/);
  });
});

describe('challenger prompt', () => {
  it('names the task and the template, or lets the model choose', () => {
    const m = challengerMessages('Pure & Applied Mathematics', 'Solve: {equation}');
    expect(m).toHaveLength(1);
    expect(m[0]!.content).toContain('"Pure & Applied Mathematics"');
    expect(m[0]!.content).toContain('Solve: {equation}');
    const free = challengerMessages('  ', '');
    expect(free[0]!.content).toContain('of your own choosing');
    expect(free[0]!.content).not.toContain('template');
  });
});

describe('pairwise verdicts', () => {
  it('parses the last verdict tag', () => {
    expect(parsePairVerdict('Reply A is better. <verdict>A</verdict>')).toBe('A');
    expect(parsePairVerdict('format: <verdict>A</verdict> ... my verdict: <verdict> b </verdict>')).toBe('B');
    expect(parsePairVerdict('<VERDICT>Tie</VERDICT>')).toBe('tie');
    expect(parsePairVerdict('<verdict>Reply B')).toBe('B');
    expect(parsePairVerdict('<verdict>both</verdict>')).toBeNull();
    expect(parsePairVerdict('A is better')).toBeNull();
  });

  it('scores the adapter over both orders', () => {
    expect(pairScore('A', 'B')).toBe(1); // adapter first and wins, base first and adapter (B) wins
    expect(pairScore('B', 'A')).toBe(0);
    expect(pairScore('A', 'A')).toBe(0.5); // position bias: the orders disagree
    expect(pairScore('A', 'tie')).toBe(1);
    expect(pairScore('tie', 'A')).toBe(0);
    expect(pairScore(null, 'B')).toBe(1);
    expect(pairScore(null, null)).toBe(0.5);
  });
});
