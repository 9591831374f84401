/**
 * The one place worker events become page state: store updates for everything that
 * changes at most once per game, the live buffer for streaming tokens.
 */
import { MEMORY_GAMES } from '../selfplay/games-log';
import type { LabEvent } from '../worker/protocol';
import { live, type LiveBuffer } from './live';
import { addError, useLab } from './store';

export function applyEvent(e: LabEvent, buffer: LiveBuffer = live): void {
  const set = useLab.setState;
  switch (e.type) {
    case 'capabilities':
      set({ capabilities: e.report, checking: false });
      break;
    case 'load-progress':
      set({ progress: e, loading: e.phase !== 'done' });
      break;
    case 'memory-plan':
      set({ memoryPlan: { plan: e.plan, lines: e.lines } });
      break;
    case 'model-loaded':
      set({ model: e.info, loading: false });
      break;
    case 'reward-model':
      set({ rewardModel: e.info });
      break;
    case 'model-unloaded':
      // Not `loading`: a load that unloads the previous model is still under way (each load resets it when it ends).
      set({ model: null, runState: 'idle' });
      break;
    case 'run-state':
      set({ runState: e.state, iteration: e.iteration });
      break;
    case 'run-reset':
      buffer.reset();
      set({ runConfig: e.config, history: [], games: [], gamesTotal: 0, iteration: 0, phase: null, skipped: [], lastCheckpoint: null, evaluation: null });
      break;
    case 'saved-run':
      set({ savedRun: e.info });
      break;
    case 'error':
      addError(e.context, e.error, e.runPreserved);
      break;
    case 'phase':
      buffer.phase(e.iteration, e.phase);
      set({ phase: e.phase });
      break;
    case 'token':
      buffer.token(e.iteration, e.role, e.query, e.answer, e.delta);
      break;
    case 'game':
      // The newest games only: a run of hours would otherwise hold every game; the worker searches the rest.
      set((s) => ({ games: [...(s.games.length >= MEMORY_GAMES ? s.games.slice(s.games.length - MEMORY_GAMES + 1) : s.games), e.game], gamesTotal: s.gamesTotal + 1 }));
      break;
    case 'iteration':
      set((s) => ({ history: [...s.history, e.metrics], iteration: e.metrics.iteration + 1 }));
      break;
    case 'skipped':
      set((s) => ({ skipped: [...s.skipped, { iteration: e.iteration, reason: e.reason }] }));
      break;
    case 'checkpoint':
      set({ lastCheckpoint: { iteration: e.iteration, bytes: e.bytes }, phase: null });
      break;
    case 'evaluation':
      set({ evaluation: e.result });
      break;
    case 'iteration-discarded':
      buffer.reset();
      set((s) => ({ phase: null, notices: [...s.notices, `Stopped: iteration ${e.iteration + 1} was discarded before its update; the run is as it was after the last finished iteration (and its checkpoint).`] }));
      break;
    case 'chat-token':
      set((s) => {
        const chat = s.chat && s.chat.id === e.id ? s.chat : { id: e.id, on: null, off: null };
        const key = e.adapter ? 'on' : 'off';
        const prev = chat[key];
        return { chat: { ...chat, [key]: { text: (prev?.text ?? '') + e.delta, tokens: e.tokens, tokensPerSecond: e.tokensPerSecond, done: false } } };
      });
      break;
    case 'custom-reward':
      set((s) => ({ customRewardNotes: [...s.customRewardNotes.slice(-19), { iteration: e.iteration, message: e.message, fallbacks: e.fallbacks }] }));
      break;
    default: {
      const never: never = e;
      void never;
    }
  }
}
