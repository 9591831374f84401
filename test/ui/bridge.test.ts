/**
 * Worker events into page state: streamed text lands in the live buffer per role,
 * query and answer (flushed once per frame), a checkpoint or evaluation after an
 * iteration starts no new game, scored games, metrics and run resets reach the store.
 */
import { beforeEach, describe, expect, it } from 'vitest';
import { makeConfig } from '../../src/selfplay/config';
import type { GameRecord } from '../../src/selfplay/types';
import { applyEvent } from '../../src/ui/bridge';
import { LiveBuffer } from '../../src/ui/live';
import { initialState, useLab } from '../../src/ui/store';

describe('bridge and live buffer', () => {
  let frames: (() => void)[];
  let live: LiveBuffer;
  beforeEach(() => {
    frames = [];
    live = new LiveBuffer((cb) => frames.push(cb));
    useLab.setState(initialState, true);
  });
  const flush = () => frames.splice(0).forEach((f) => f());

  it('streams tokens per row and tells subscribers once per frame', () => {
    let told = 0;
    live.subscribe(() => told++);
    applyEvent({ type: 'phase', iteration: 3, phase: 'challenger' }, live);
    for (const d of ['What ', 'is ', '2+2?']) applyEvent({ type: 'token', iteration: 3, role: 'challenger', query: 1, answer: 0, delta: d }, live);
    applyEvent({ type: 'token', iteration: 3, role: 'solver', query: 1, answer: 1, delta: '4' }, live);
    applyEvent({ type: 'token', iteration: 3, role: 'judge', query: 1, answer: 1, delta: 'Score: 7' }, live);
    expect(told).toBe(0);
    flush();
    expect(told).toBe(1);
    expect(live.version).toBe(1);
    expect(live.current).toMatchObject({ iteration: 3, phase: 'challenger', queries: [undefined, 'What is 2+2?'], answers: [undefined, [undefined, '4']], judges: [undefined, [undefined, 'Score: 7']] });
    expect(useLab.getState().phase).toBe('challenger');

    // The checkpoint after iteration 3 is numbered 4: the game in view stays.
    applyEvent({ type: 'phase', iteration: 4, phase: 'checkpoint' }, live);
    expect(live.current.iteration).toBe(3);
    expect(live.current.phase).toBe('checkpoint');
    // The next iteration's first token starts a fresh game.
    applyEvent({ type: 'token', iteration: 4, role: 'challenger', query: 0, answer: 0, delta: 'x' }, live);
    expect(live.current).toMatchObject({ iteration: 4, queries: ['x'], answers: [] });
  });

  it('puts games, metrics, checkpoints, errors and resets into the store', () => {
    const game = { iteration: 0, index: 0, query: 'q', answers: [] } as unknown as GameRecord;
    applyEvent({ type: 'game', game }, live);
    applyEvent({ type: 'iteration', metrics: { iteration: 0, time: 1, values: { reward: 0.5 } } }, live);
    applyEvent({ type: 'checkpoint', iteration: 1, bytes: 1234 }, live);
    applyEvent({ type: 'skipped', iteration: 0, reason: 'non-finite loss' }, live);
    applyEvent({ type: 'error', context: 'storage', error: { name: 'RunStoreError', message: 'Storage full' }, runPreserved: true }, live);
    let s = useLab.getState();
    expect(s.games).toEqual([game]);
    expect(s.history.map((m) => m.values.reward)).toEqual([0.5]);
    expect(s.iteration).toBe(1);
    expect(s.lastCheckpoint).toEqual({ iteration: 1, bytes: 1234 });
    expect(s.skipped).toEqual([{ iteration: 0, reason: 'non-finite loss' }]);
    expect(s.errors).toMatchObject([{ context: 'storage', name: 'RunStoreError', message: 'Storage full', runPreserved: true }]);

    const config = makeConfig({ world: 'arithmetic' });
    applyEvent({ type: 'run-reset', config }, live);
    s = useLab.getState();
    expect(s).toMatchObject({ runConfig: config, games: [], history: [], iteration: 0, lastCheckpoint: null });
    expect(live.current.iteration).toBe(-1);
    // Errors outlive a reset: they are dismissed by the user.
    expect(s.errors).toHaveLength(1);
  });
});
