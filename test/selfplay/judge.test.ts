import { describe, expect, it } from 'vitest';
import {
  judgeFallbackScore,
  judgeMessages,
  parseJudgeScore,
  resolveJudgeScore,
  type JudgeParse,
} from '../../src/selfplay/judge';

describe('judgeMessages', () => {
  it('asks for the rubric, a justification, a total and a tagged score around the pair', () => {
    const msgs = judgeMessages('What is 2 + 2?', 'It is 4.');
    expect(msgs.map((m) => m.role)).toEqual(['system', 'user']);
    const user = msgs[1].content;
    expect(user).toContain('What is 2 + 2?');
    expect(user).toContain('It is 4.');
    expect(user).toContain('<score>N</score>');
    expect(user).toMatch(/justification/i);
    expect(user).toMatch(/total/i);
    // seven numbered rubric points
    for (let k = 1; k <= 7; k++) expect(user).toContain(`\n${k}. `);
    expect(user.indexOf('What is 2 + 2?')).toBeLessThan(user.indexOf('It is 4.'));
  });
});

describe('parseJudgeScore', () => {
  const cases: [string, JudgeParse][] = [
    // well formed
    ['Clear and useful. Total: 1+1+1+1+1+0+1 = 6\n<score>6</score>', { score: 6, reason: 'ok' }],
    ['<score>0</score>', { score: 0, reason: 'ok' }],
    ['<score>7</score>', { score: 7, reason: 'ok' }],
    ['<SCORE> 5 </Score>', { score: 5, reason: 'ok' }],
    ['< score >\n3\n</ score >', { score: 3, reason: 'ok' }],
    ['<score>4/7</score>', { score: 4, reason: 'ok' }],
    ['<score>4 / 7</score>', { score: 4, reason: 'ok' }],
    ['<score>4 out of 7</score>', { score: 4, reason: 'ok' }],
    ['<score>5.0</score>', { score: 5, reason: 'ok' }],
    ['<score>5.</score>', { score: 5, reason: 'ok' }],
    ['<score>+2</score>', { score: 2, reason: 'ok' }],
    // the last tag wins
    ['Format: <score>N</score>. Points... <score>3</score>', { score: 3, reason: 'ok' }],
    ['<score>2</score> on reflection <score>5</score>', { score: 5, reason: 'ok' }],
    ['I will end with <score> and a number.\nTotal 3 <score>3</score>', { score: 3, reason: 'ok' }],
    ['<score>2</score> on reflection <score>five</score>', { score: null, reason: 'malformed' }],
    // a generation cut at the stop token before the closing tag
    ['Total 4. <score>4', { score: 4, reason: 'ok' }],
    ['Total 4. <score> 4 \n', { score: 4, reason: 'ok' }],
    // missing
    ['', { score: null, reason: 'missing' }],
    ['The reply deserves 5 points. Score: 5', { score: null, reason: 'missing' }],
    ['score>5</score>', { score: null, reason: 'missing' }],
    ['[score]5[/score]', { score: null, reason: 'missing' }],
    // malformed
    ['<score></score>', { score: null, reason: 'malformed' }],
    ['<score>   </score>', { score: null, reason: 'malformed' }],
    ['<score>N</score>', { score: null, reason: 'malformed' }],
    ['<score>five</score>', { score: null, reason: 'malformed' }],
    ['<score>4.5</score>', { score: null, reason: 'malformed' }],
    ['<score>3.99</score>', { score: null, reason: 'malformed' }],
    ['<score>4/10</score>', { score: null, reason: 'malformed' }],
    ['<score>4 points</score>', { score: null, reason: 'malformed' }],
    ['<score>1+1+1 = 3</score>', { score: null, reason: 'malformed' }],
    ['<score>5 and then more text', { score: null, reason: 'malformed' }],
    ['<score><b>5</b></score>', { score: null, reason: 'malformed' }],
    ['<score>NaN</score>', { score: null, reason: 'malformed' }],
    ['<score>Infinity</score>', { score: null, reason: 'malformed' }],
    ['<score>0x5</score>', { score: null, reason: 'malformed' }],
    ['<score>1e0</score>', { score: null, reason: 'malformed' }],
    // out of range
    ['<score>8</score>', { score: null, reason: 'out_of_range' }],
    ['<score>10/7</score>', { score: null, reason: 'out_of_range' }],
    ['<score>-1</score>', { score: null, reason: 'out_of_range' }],
    ['<score>100</score>', { score: null, reason: 'out_of_range' }],
    ['<score>5</score> ... <score>9</score>', { score: null, reason: 'out_of_range' }],
  ];
  for (const [text, want] of cases) {
    it(JSON.stringify(text), () => {
      expect(parseJudgeScore(text)).toEqual(want);
    });
  }

  it('returns +0 for "-0"', () => {
    expect(Object.is(parseJudgeScore('<score>-0</score>').score, 0)).toBe(true);
  });
});

describe('fallback policy', () => {
  it('maps each setting to its value', () => {
    expect(judgeFallbackScore()).toBe(0);
    expect(judgeFallbackScore('zero')).toBe(0);
    expect(judgeFallbackScore('midpoint')).toBe(3.5);
    expect(judgeFallbackScore({ value: 2 })).toBe(2);
  });

  it('resolveJudgeScore uses the parse when it succeeds and flags the fallback otherwise', () => {
    expect(resolveJudgeScore('<score>6</score>', 'midpoint')).toEqual({ score: 6, reason: 'ok', value: 6, fallback: false });
    expect(resolveJudgeScore('no tag', 'midpoint')).toEqual({ score: null, reason: 'missing', value: 3.5, fallback: true });
    expect(resolveJudgeScore('<score>9</score>')).toEqual({ score: null, reason: 'out_of_range', value: 0, fallback: true });
  });
});
