/**
 * The games log (src/selfplay/games-log.ts): memory holds at most the newest games,
 * older ones go to the run store as whole JSONL chunks beside the checkpoints, and
 * search covers both, newest first. No GPU: games are made up here.
 */
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { GamesLog, GamesLogError, MEMORY_GAMES, MemoryChunkStore, gameChunkName, gameMatches } from '../../src/selfplay/games-log';
import { openRunStore } from '../../src/selfplay/node-store';
import { DirectoryRunStore, MemoryRunStore, RunStoreError } from '../../src/selfplay/store';
import type { GameChunkStore } from '../../src/selfplay/games-log';
import type { GameRecord } from '../../src/selfplay/types';
import { applyEvent } from '../../src/ui/bridge';
import { LiveBuffer } from '../../src/ui/live';
import { initialState, useLab } from '../../src/ui/store';
import { FakeDirectory, FakeQuota } from '../helpers/model-opfs';

/** Game k: iteration floor(k / 2), query "q<k> ..."; answer texts carry a word every seventh game. */
function game(k: number): GameRecord {
  return {
    iteration: Math.floor(k / 2),
    index: k % 2,
    query: `q${k}: ${k} + ${k + 1}`,
    queryTokens: 3,
    queryFinishReason: 'stop',
    queryValid: true,
    queryLogp: -1,
    queryLogpRef: -1.5,
    queryKl: 0.01,
    value: 0.5,
    qualityValue: 0,
    challengerReward: -0.5,
    challengerAdvantage: 0,
    answers: [
      { text: k % 7 === 0 ? `seven ${2 * k + 1}` : String(2 * k + 1), tokens: 2, finishReason: 'stop', rewards: { verifiable: 1 }, reward: 1, advantage: 0.5, logp: -0.2, logpRef: -0.3, kl: 0.02 },
    ],
  };
}
const games = (from: number, to: number): GameRecord[] => Array.from({ length: to - from }, (_, i) => game(from + i));

const tmp: string[] = [];
afterAll(async () => {
  for (const d of tmp) await rm(d, { recursive: true, force: true });
});

describe('games log', () => {
  it(`keeps at most the newest games in memory (default ${MEMORY_GAMES}) and pages older ones out chunk by chunk, in order`, async () => {
    const store = new MemoryChunkStore();
    const log = new GamesLog(store, { memory: 10, perChunk: 4 });
    for (let k = 0; k < 50; k += 2) {
      log.recent.push(...games(k, k + 2)); // one "iteration" of N = 2
      await log.pageOut();
      expect(log.recent.length).toBeLessThanOrEqual(10);
      expect(log.total).toBe(k + 2);
      expect(log.recent.at(-1)).toEqual(game(k + 1)); // the newest stays in memory
    }
    // 50 games: chunks of 4 until at most 10 remain: 10 chunks (40 games), 10 in memory.
    expect(log.state()).toEqual({ chunks: 10, pagedGames: 40 });
    expect(log.recent).toEqual(games(40, 50));
    expect([...store.chunks.keys()]).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    const chunk3 = new TextDecoder().decode(store.chunks.get(3)).trimEnd().split('\n').map((l) => JSON.parse(l) as GameRecord);
    expect(chunk3).toEqual(games(12, 16));
    expect(await log.all()).toEqual(games(0, 50));
  });

  it('searches memory and the paged-out chunks, newest first, by text and by iteration', async () => {
    const log = new GamesLog(new MemoryChunkStore(), { memory: 10, perChunk: 4 });
    log.recent.push(...games(0, 50));
    await log.pageOut();
    const sevens = await log.search({ text: 'SEVEN' });
    expect(sevens.games.map((g) => g.query.split(':')[0])).toEqual(['q49', 'q42', 'q35', 'q28', 'q21', 'q14', 'q7', 'q0']);
    expect(sevens.total).toBe(8);
    expect(sevens.searched).toBe(50);
    // q3 lives in chunk 0, far from memory
    expect((await log.search({ text: 'q3:' })).games).toEqual([game(3)]);
    expect((await log.search({ iteration: 6 })).games).toEqual([game(13), game(12)]);
    expect((await log.search({ text: 'iteration 6' })).games).toEqual([game(13), game(12)]);
    const limited = await log.search({ limit: 3 });
    expect(limited.games).toEqual([game(49), game(48), game(47)]);
    expect(limited.total).toBe(50);
    expect((await log.search({ text: 'no such text' })).total).toBe(0);
    expect(gameMatches(game(7), { text: ' seven ' })).toBe(true);
  });

  it('a resumed log reads only the chunks its checkpoint counts; a stale chunk past them is written over', async () => {
    const store = new MemoryChunkStore();
    const a = new GamesLog(store, { memory: 4, perChunk: 2 });
    a.recent.push(...games(0, 6));
    await a.pageOut(); // chunk 0 = games 0-1
    const saved = { state: a.state(), recent: a.recent.slice() };
    a.recent.push(...games(6, 10));
    await a.pageOut(); // chunks 1 (games 2-3) and 2 (games 4-5), from iterations that were never checkpointed
    expect(store.chunks.size).toBe(3);
    // Resume from the checkpoint taken before: chunk 0 and games 2-5 in memory; the stale chunks are not read.
    const b = new GamesLog(store, { ...saved, memory: 4, perChunk: 2 });
    expect(await b.all()).toEqual(games(0, 6));
    expect((await b.search({ text: 'q4:' })).total).toBe(1);
    b.recent.push(game(100));
    await b.pageOut(); // writes chunk 1 again: games 2-3
    expect(b.state()).toEqual({ chunks: 2, pagedGames: 4 });
    expect(await b.all()).toEqual([...games(0, 6), game(100)]);
  });

  it('a chunk write that fails keeps its games in memory, and the next page-out writes the same chunk', async () => {
    const written: number[] = [];
    let fail = true;
    const store: GameChunkStore & { inner: MemoryChunkStore } = {
      inner: new MemoryChunkStore(),
      writeGameChunk(n, bytes) {
        if (fail) return Promise.reject(new Error('disk full'));
        written.push(n);
        return this.inner.writeGameChunk(n, bytes);
      },
      readGameChunk(n) {
        return this.inner.readGameChunk(n);
      },
    };
    const log = new GamesLog(store, { memory: 4, perChunk: 2 });
    log.recent.push(...games(0, 6));
    await expect(log.pageOut()).rejects.toThrow(/disk full/);
    expect(log.recent).toEqual(games(0, 6));
    expect(log.state()).toEqual({ chunks: 0, pagedGames: 0 });
    fail = false;
    await log.pageOut();
    expect(written).toEqual([0]);
    expect(log.recent).toEqual(games(2, 6));
    expect(await log.all()).toEqual(games(0, 6));
  });

  it('names the file when a chunk is damaged or missing', async () => {
    const store = new MemoryChunkStore();
    const log = new GamesLog(store, { memory: 2, perChunk: 2 });
    log.recent.push(...games(0, 4));
    await log.pageOut();
    store.chunks.set(0, new TextEncoder().encode('{"iteration": 0\n'));
    await expect(log.search({ text: 'x' })).rejects.toThrow(GamesLogError);
    await expect(log.search({ text: 'x' })).rejects.toThrow(/games-0\.jsonl line 1 is not JSON/);
    store.chunks.delete(0);
    await expect(log.all()).rejects.toThrow(/games-0\.jsonl is missing/);
  });

  it('refuses a memory bound or chunk size below one', () => {
    expect(() => new GamesLog(new MemoryChunkStore(), { memory: 0 })).toThrow(/must be whole numbers >= 1/);
    expect(() => new GamesLog(new MemoryChunkStore(), { memory: 5, perChunk: 0.5 })).toThrow(/must be whole numbers >= 1/);
  });
});

describe('games log in the run store', () => {
  it('node folder: chunks are files beside the checkpoint folder that saves keep and clear removes', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'gameslog-'));
    tmp.push(dir);
    const store = await openRunStore(dir, 'run');
    const ckpt = (tag: number) => new Map([['trainer_state.json', new TextEncoder().encode(JSON.stringify({ tag }))]]);
    await store.save(ckpt(0));
    const log = new GamesLog(store, { memory: 3, perChunk: 3 });
    log.recent.push(...games(0, 10));
    await log.pageOut();
    await store.save(ckpt(1));
    await store.save(ckpt(2));
    expect((await readdir(join(dir, 'run'))).sort()).toEqual(['ckpt-2', gameChunkName(0), gameChunkName(1), 'games-2.jsonl', 'latest.json']);
    const lines = (await readFile(join(dir, 'run', 'games-1.jsonl'), 'utf8')).trimEnd().split('\n');
    expect(lines.map((l) => JSON.parse(l) as GameRecord)).toEqual(games(3, 6));
    // A fresh handle on the folder reads the same history.
    const again = new GamesLog(await openRunStore(dir, 'run'), { recent: log.recent, state: log.state() });
    expect(await again.all()).toEqual(games(0, 10));
    expect(await store.readGameChunk(7)).toBeNull();
    await store.clear();
    expect(await store.readGameChunk(0)).toBeNull();
  });

  it('origin-storage shape: a full quota fails the chunk with a storage message and leaves the checkpoint loadable', async () => {
    const quota = new FakeQuota(3000);
    const root = new FakeDirectory(quota);
    const store = new DirectoryRunStore(root, 'run');
    await store.save(new Map([['trainer_state.json', new Uint8Array(100)]]));
    const log = new GamesLog(store, { memory: 20, perChunk: 20 });
    log.recent.push(...games(0, 60));
    const err = await log.pageOut().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(RunStoreError);
    expect((err as Error).message).toMatch(/storage is full: older games of run "run" could not be paged out to games-0\.jsonl; they stay in memory/);
    expect(log.recent).toHaveLength(60);
    expect(await store.load()).toEqual(new Map([['trainer_state.json', new Uint8Array(100)]]));
    expect(root.dirs.get('run')!.files.get('games-0.jsonl')?.length ?? 0).toBe(0); // nothing partial counts as written
  });

  it('memory store: chunks live and die with the run', async () => {
    const s = new MemoryRunStore();
    await s.writeGameChunk(0, new Uint8Array([1, 2]));
    expect(await s.readGameChunk(0)).toEqual(new Uint8Array([1, 2]));
    expect(await s.readGameChunk(1)).toBeNull();
    await s.clear();
    expect(await s.readGameChunk(0)).toBeNull();
  });
});

describe("the page's store", () => {
  it(`keeps the newest ${MEMORY_GAMES} games of the worker's game events and counts them all`, () => {
    useLab.setState(initialState, true);
    const live = new LiveBuffer(() => undefined);
    for (let k = 0; k < MEMORY_GAMES + 50; k++) applyEvent({ type: 'game', game: game(k) }, live);
    const s = useLab.getState();
    expect(s.games).toHaveLength(MEMORY_GAMES);
    expect(s.games[0]).toEqual(game(50));
    expect(s.games.at(-1)).toEqual(game(MEMORY_GAMES + 49));
    expect(s.gamesTotal).toBe(MEMORY_GAMES + 50);
    applyEvent({ type: 'run-reset', config: null }, live);
    expect([useLab.getState().games.length, useLab.getState().gamesTotal]).toEqual([0, 0]);
  });
});
