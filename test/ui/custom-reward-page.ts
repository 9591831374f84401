// The browser sandbox of the user's reward, driven from a page: test/ui/custom-reward-browser.test.ts reads window.__result.
import { CUSTOM_REWARD_EXAMPLES, CustomReward, DEFAULT_CUSTOM_REWARD } from '../../src/selfplay/custom-reward';
import { browserSandbox } from '../../src/selfplay/custom-reward-browser';

const w = window as unknown as { __result?: unknown; __error?: string; __pageTouched?: number };
w.__pageTouched = 0;

async function main(): Promise<unknown> {
  const source = `function reward(q, a) {
    if (a === 'loop') for (;;) {}
    if (a === 'throw') throw new TypeError('bad');
    if (a === 'nan') return NaN;
    if (a === 'str') return 'x';
    if (a === 'fetch') return fetch('/'), 1;
    if (a === 'xhr') return new XMLHttpRequest(), 1;
    if (a === 'idb') return indexedDB.open('x'), 1;
    if (a === 'import') return importScripts('/x.js'), 1;
    if (a === 'post') return postMessage({ id: 1, json: '{"ok":true,"value":99}' }), 1;
    if (a === 'self-post') return self.postMessage({ id: 1, json: '{"ok":true,"value":99}' }), 1;
    if (a === 'doc') return document.title.length;
    if (a === 'window') return window.__pageTouched = 1;
    return a.length;
  }`;
  const r = await CustomReward.create({ ...DEFAULT_CUSTOM_REWARD, source, timeoutMs: 200, fallback: -1 }, browserSandbox);
  const answers = ['ab', 'loop', 'abc', 'throw', 'nan', 'str', 'fetch', 'xhr', 'idb', 'import', 'post', 'self-post', 'doc', 'window', 'abcd'];
  const t0 = performance.now();
  const s = await r.score(['q'], [answers]);
  const ms = performance.now() - t0;
  r.release();
  const examples: number[] = [];
  for (const ex of CUSTOM_REWARD_EXAMPLES) {
    const e = await CustomReward.create({ ...DEFAULT_CUSTOM_REWARD, source: ex.source }, browserSandbox);
    examples.push((await e.score(['q'], [['{"a": 1}\nAnswer: 1']])).rewards[0]![0]!);
    e.release();
  }
  let compileError = '';
  try {
    await CustomReward.create({ ...DEFAULT_CUSTOM_REWARD, source: 'function reward(' }, browserSandbox);
  } catch (e) {
    compileError = (e as Error).message;
  }
  return { rewards: s.rewards[0], reasons: s.failures.map((f) => f.reason), messages: s.failures.map((f) => f.message), ms, examples, compileError, pageTouched: w.__pageTouched };
}

main().then(
  (r) => (w.__result = r),
  (e: unknown) => (w.__error = String(e)),
);
