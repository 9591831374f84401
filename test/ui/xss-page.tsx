// The lab's game components fed, through the real bridge and store, with model text
// that is HTML and script: the test driving this page checks that none of it runs or
// becomes markup. window.__xss counts executions; window.__ready says the page is set.
import { StrictMode } from 'react';
import { createRoot } from 'react-dom/client';
import { makeConfig } from '../../src/selfplay/config';
import type { GameRecord } from '../../src/selfplay/types';
import { applyEvent } from '../../src/ui/bridge';
import { GameHistory, LiveGames } from '../../src/ui/components/GameView';
import { Messages } from '../../src/ui/components/Messages';
import { useLab } from '../../src/ui/store';

const w = window as unknown as { __xss: number; __ready: boolean; __payloads: string[] };
w.__xss = 0;

export const PAYLOADS = [
  '<img src=x onerror="window.__xss++">',
  '<script>window.__xss++</script>',
  '<svg onload="window.__xss++"><circle r=5 /></svg>',
  '"><iframe src="javascript:window.parent.__xss++"></iframe>',
  '<a href="javascript:window.__xss++" id="xss-link">click</a>',
  '<details open ontoggle="window.__xss++">x</details>',
  '{{constructor.constructor("window.__xss++")()}}',
  '<style>body{display:none}</style><b>bold?</b>',
];
w.__payloads = PAYLOADS;

function game(iteration: number, index: number, query: string, answers: string[]): GameRecord {
  return {
    iteration,
    index,
    query,
    queryTokens: 9,
    queryFinishReason: 'stop',
    queryValid: null,
    queryLogp: -3,
    queryLogpRef: -3.1,
    queryKl: 0.01,
    value: 2,
    qualityValue: 3,
    challengerReward: -2,
    challengerAdvantage: 0.5,
    answers: answers.map((text, j) => ({
      text,
      tokens: 12,
      finishReason: 'stop',
      rewards: { judge: j },
      reward: j,
      advantage: j - 0.5,
      logp: -5,
      logpRef: -5.2,
      kl: 0.02,
      judge: { text: `${PAYLOADS[(j + 3) % PAYLOADS.length]} <score>${j}</score>`, reason: 'ok', score: j },
    })),
  };
}

useLab.setState({ runConfig: makeConfig({ groupSize: 2, queriesPerIteration: 2 }), runState: 'running' });
createRoot(document.getElementById('root')!).render(
  <StrictMode>
    <Messages />
    <LiveGames />
    <GameHistory />
  </StrictMode>,
);

// Iteration 0 scored; iteration 1 streaming token by token (payloads split mid-tag).
for (let i = 0; i < PAYLOADS.length; i += 2) applyEvent({ type: 'game', game: game(0, i / 2, PAYLOADS[i]!, [PAYLOADS[i + 1]!, PAYLOADS[(i + 2) % PAYLOADS.length]!]) });
applyEvent({ type: 'phase', iteration: 1, phase: 'solver' });
for (const [q, text] of PAYLOADS.entries()) {
  for (let k = 0; k < text.length; k += 3) {
    applyEvent({ type: 'token', iteration: 1, role: 'challenger', query: q, answer: 0, delta: text.slice(k, k + 3) });
    applyEvent({ type: 'token', iteration: 1, role: 'solver', query: q, answer: 0, delta: text.slice(k, k + 3) });
    applyEvent({ type: 'token', iteration: 1, role: 'judge', query: q, answer: 0, delta: text.slice(k, k + 3) });
  }
}
// Error messages can quote file contents: also text only.
applyEvent({ type: 'error', context: 'import', error: { name: 'FormatError', message: PAYLOADS[0]! }, runPreserved: true });
requestAnimationFrame(() => requestAnimationFrame(() => (w.__ready = true)));
