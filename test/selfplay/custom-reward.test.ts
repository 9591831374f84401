/**
 * The user's reward function in the Node sandbox (worker thread + vm context): the
 * shipped examples score as written, and every kind of failure (throws, endless loops,
 * NaN and non-numbers, network and page access, a dead sandbox) becomes a named
 * fallback while the next call still works.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { CUSTOM_REWARD_EXAMPLES, CustomReward, CustomRewardError, DEFAULT_CUSTOM_REWARD, summarizeFailures, type CustomRewardFailure, type CustomRewardSpec } from '../../src/selfplay/custom-reward';
import { nodeSandbox } from '../../src/selfplay/custom-reward-node';

const open: CustomReward[] = [];
afterEach(() => {
  for (const r of open.splice(0)) r.release();
});

async function reward(source: string, over: Partial<CustomRewardSpec> = {}, onFailures?: (f: CustomRewardFailure[]) => void): Promise<CustomReward> {
  const r = await CustomReward.create({ ...DEFAULT_CUSTOM_REWARD, source, ...over }, nodeSandbox, onFailures);
  open.push(r);
  return r;
}

const example = (id: string) => CUSTOM_REWARD_EXAMPLES.find((e) => e.id === id)!.source;

describe('custom reward in the Node sandbox', () => {
  it('scores the three shipped examples as their definitions say', async () => {
    const len = await reward(example('length-penalty'));
    const s = await len.score(['q'], [['x'.repeat(400), 'x'.repeat(200), 'x'.repeat(2000), '']]);
    expect(s.rewards).toEqual([[0, -0.5, -1, -1]]);
    expect(s.fallbacks).toBe(0);

    const fmt = await reward(example('format-regex'));
    const f = await fmt.score(['q'], [['Work.\nAnswer: 42', 'The answer is 42', 'Answer: yes\n', 'Answer:']]);
    expect(f.rewards).toEqual([[1, 0, 1, 0]]);

    const json = await reward(example('json-validity'));
    const j = await json.score(['q'], [['{"a": 1}', 'Here:\n```json\n{"b": [1, 2]}\n```', '{a: 1}', '42', 'null']]);
    expect(j.rewards).toEqual([[1, 1, 0, 0, 0]]);
  });

  it('accepts a single function expression and passes query and answer', async () => {
    const r = await reward('(query, answer) => query.length * 10 + answer.length');
    const s = await r.score(['ab', 'abc'], [['x', 'yy'], ['']]);
    expect(s.rewards).toEqual([[21, 22], [30]]);
  });

  it('turns throws, NaN, Infinity, non-numbers and promises into named fallbacks', async () => {
    const seen: CustomRewardFailure[][] = [];
    const r = await reward(
      `function reward(q, a) {
        if (a === 'throw') throw new TypeError('bad answer');
        if (a === 'nan') return NaN;
        if (a === 'inf') return Infinity;
        if (a === 'str') return '1';
        if (a === 'bool') return true;
        if (a === 'async') return Promise.resolve(1);
        if (a === 'obj') throw { message: 'plain object' };
        return 2;
      }`,
      { fallback: -1 },
      (f) => seen.push(f),
    );
    const s = await r.score(['q'], [['throw', 'nan', 'inf', 'str', 'bool', 'async', 'obj', 'ok']]);
    expect(s.rewards).toEqual([[-1, -1, -1, -1, -1, -1, -1, 2]]);
    expect(s.fallbacks).toBe(7);
    expect(s.failures.map((f) => f.reason)).toEqual(['threw', 'not_a_number', 'not_a_number', 'not_a_number', 'not_a_number', 'not_a_number', 'threw']);
    expect(s.failures[0]!.message).toContain('TypeError: bad answer');
    expect(s.failures[1]!.message).toContain('NaN');
    expect(s.failures[3]!.message).toContain('the string "1"');
    expect(s.failures[5]!.message).toContain('Promise');
    expect(seen).toHaveLength(1);
    const line = summarizeFailures('custom', s.failures, -1);
    expect(line).toContain('7 answers got the fallback -1');
    expect(line).toContain('2 threw, 5 not a number');
  });

  it('stops an endless loop at the time limit and keeps scoring the next answers', async () => {
    const r = await reward(`function reward(q, a) { if (a === 'loop') { for (;;) {} } return a.length; }`, { timeoutMs: 150 });
    const t0 = performance.now();
    const s = await r.score(['q'], [['ab', 'loop', 'abc', 'loop', 'abcd']]);
    const ms = performance.now() - t0;
    expect(s.rewards).toEqual([[2, 0, 3, 0, 4]]);
    expect(s.failures.map((f) => f.reason)).toEqual(['timeout', 'timeout']);
    expect(s.failures[0]!.message).toContain('150 ms');
    expect(ms).toBeLessThan(5000);
  });

  it('stops a loop hidden in a thrown value by terminating the thread, then starts a fresh one', async () => {
    const r = await reward(`function reward(q, a) { if (a === 'evil') throw { get message() { for (;;) {} } }; return 1; }`, { timeoutMs: 100 });
    const s = await r.score(['q'], [['evil', 'fine']]);
    expect(s.rewards).toEqual([[0, 1]]);
    expect(s.failures[0]!.reason).toBe('timeout');
  });

  it('blocks the network, the page and the host with a named message', async () => {
    const r = await reward(
      `function reward(q, a) {
        if (a === 'fetch') return fetch('http://example.invalid/');
        if (a === 'xhr') return new XMLHttpRequest();
        if (a === 'doc') return document.title.length;
        if (a === 'req') return require('node:fs') ? 1 : 0;
        if (a === 'proc') return process.pid;
        if (a === 'escape') return this.constructor.constructor('return process')().pid;
        return typeof setTimeout === 'undefined' ? 1 : 0;
      }`,
    );
    const s = await r.score(['q'], [['fetch', 'xhr', 'doc', 'req', 'proc', 'escape', 'other']]);
    expect(s.failures.map((f) => f.reason)).toEqual(['blocked', 'blocked', 'blocked', 'blocked', 'blocked', 'blocked']);
    expect(s.failures[0]!.message).toContain('tried to use fetch');
    expect(s.failures[2]!.message).toContain('tried to use document');
    expect(s.rewards[0]![6]).toBe(1);
  });

  it('survives a sandbox that runs out of memory', async () => {
    const r = await reward(`function reward(q, a) { if (a === 'oom') { const x = []; for (;;) x.push(new Array(1e5).fill(a)); } return 1; }`, { timeoutMs: 20000 });
    const s = await r.score(['q'], [['oom', 'fine']]);
    expect(s.rewards[0]![1]).toBe(1);
    expect(['crashed', 'timeout']).toContain(s.failures[0]!.reason);
  }, 30000);

  it('refuses a source that does not load, naming why', async () => {
    await expect(reward('function reward(q, a) { return ')).rejects.toThrow(/does not load: SyntaxError/);
    await expect(reward('const x = 1;')).rejects.toThrow(/defines no reward function/);
    await expect(reward('for (;;) {}', { timeoutMs: 100 })).rejects.toThrow(/did not finish running within 100 ms/);
    await expect(reward('  ')).rejects.toThrow(CustomRewardError);
    await expect(reward('(q, a) => 1', { name: 'judge' })).rejects.toThrow(/taken by a built-in reward/);
    await expect(reward('(q, a) => 1', { timeoutMs: 0 })).rejects.toThrow(/time limit per call/);
  });
});
