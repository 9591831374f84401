/**
 * The run's game history with a bounded memory: the newest MEMORY_GAMES games stay in
 * memory (the trainer's and the page's), older ones are paged out to the run store as
 * an append-only log of JSONL chunks (games-<n>.jsonl beside the checkpoint folders, so
 * checkpoints stay small), and search covers both.
 *
 * Consistency with checkpoints: a chunk is one file written whole (its contents appear
 * when its writer closes), and the count of chunks is saved in the checkpoint. A chunk
 * at or past the loaded checkpoint's count was written after it (by an iteration that
 * was not checkpointed, or a save that failed); it is ignored and written over, so a
 * resumed run's history is exactly the checkpoint's: its chunks, then its games.json.
 */
import type { GameRecord } from './types';

/** Games kept in memory; older ones are paged out to the run store. */
export const MEMORY_GAMES = 200;
/** Games per paged-out chunk (games-<n>.jsonl); a page-out writes one chunk. */
export const GAMES_PER_CHUNK = 100;
/** Matches a search returns at most (newest first). */
export const SEARCH_LIMIT = 200;

export const gameChunkName = (n: number): string => `games-${n}.jsonl`;

/** Where paged-out chunks live (RunStore's optional games-log methods, or memory). */
export interface GameChunkStore {
  /** Writes chunk n whole, replacing a stale chunk n; a failure leaves no partial chunk n readable as complete. */
  writeGameChunk(n: number, bytes: Uint8Array): Promise<void>;
  /** Chunk n's bytes, or null when there is none. */
  readGameChunk(n: number): Promise<Uint8Array | null>;
}

/** Chunks in memory: for runs without a store (the log is then as big as the run). */
export class MemoryChunkStore implements GameChunkStore {
  readonly chunks = new Map<number, Uint8Array>();
  writeGameChunk(n: number, bytes: Uint8Array): Promise<void> {
    this.chunks.set(n, bytes.slice());
    return Promise.resolve();
  }
  readGameChunk(n: number): Promise<Uint8Array | null> {
    return Promise.resolve(this.chunks.get(n)?.slice() ?? null);
  }
}

/** What a checkpoint records of the log: the chunks that belong to it and the games in them. */
export interface GamesLogState {
  chunks: number;
  pagedGames: number;
}

export interface GameQuery {
  /** Case-insensitive text in the query or any answer; "iteration 12" also matches that iteration. Empty: every game. */
  text?: string;
  /** Only this iteration's games. */
  iteration?: number;
  /** At most this many matches (default SEARCH_LIMIT). */
  limit?: number;
}

export interface GameSearchResult {
  /** Matches, newest first (at most the limit). */
  games: GameRecord[];
  /** Matches in the whole history. */
  total: number;
  /** Games searched: the whole history (paged out plus in memory). */
  searched: number;
}

/** Whether a game matches a query (the one rule the page's filter and the log's search share). */
export function gameMatches(g: GameRecord, q: GameQuery): boolean {
  if (q.iteration !== undefined && g.iteration !== q.iteration) return false;
  const t = (q.text ?? '').trim().toLowerCase();
  if (!t) return true;
  return g.query.toLowerCase().includes(t) || g.answers.some((a) => a.text.toLowerCase().includes(t)) || `iteration ${g.iteration}` === t;
}

export class GamesLogError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'GamesLogError';
  }
}

function parseChunk(bytes: Uint8Array, n: number): GameRecord[] {
  const text = new TextDecoder().decode(bytes);
  const games: GameRecord[] = [];
  for (const [k, line] of text.split('\n').entries()) {
    if (!line) continue;
    try {
      games.push(JSON.parse(line) as GameRecord);
    } catch {
      throw new GamesLogError(`${gameChunkName(n)} line ${k + 1} is not JSON; the games log is damaged (the checkpoint itself is fine)`);
    }
  }
  return games;
}

export class GamesLog {
  /** The newest games, oldest first: at most `memory` after each pageOut(). */
  recent: GameRecord[];
  /** Games kept in memory, and games per chunk (at most `memory`). */
  readonly memory: number;
  readonly perChunk: number;
  private chunks: number;
  private pagedGames: number;

  constructor(
    private readonly store: GameChunkStore,
    opts: { recent?: GameRecord[]; state?: GamesLogState; memory?: number; perChunk?: number } = {},
  ) {
    this.memory = opts.memory ?? MEMORY_GAMES;
    this.perChunk = Math.min(opts.perChunk ?? GAMES_PER_CHUNK, this.memory);
    if (!(Number.isInteger(this.memory) && this.memory >= 1 && Number.isInteger(this.perChunk) && this.perChunk >= 1)) {
      throw new GamesLogError(`games log: memory (${this.memory}) and games per chunk (${this.perChunk}) must be whole numbers >= 1`);
    }
    this.recent = opts.recent ?? [];
    this.chunks = opts.state?.chunks ?? 0;
    this.pagedGames = opts.state?.pagedGames ?? 0;
  }

  state(): GamesLogState {
    return { chunks: this.chunks, pagedGames: this.pagedGames };
  }

  /** Games in the whole history. */
  get total(): number {
    return this.pagedGames + this.recent.length;
  }

  /**
   * Writes the oldest games out, one chunk at a time, until at most `memory` stay in
   * memory. A failed write (storage full) keeps the games in memory and rethrows; the
   * next page-out writes the same chunk again.
   */
  async pageOut(): Promise<void> {
    while (this.recent.length > this.memory) {
      const out = this.recent.slice(0, this.perChunk);
      const text = out.map((g) => JSON.stringify(g)).join('\n') + '\n';
      await this.store.writeGameChunk(this.chunks, new TextEncoder().encode(text));
      this.recent.splice(0, out.length);
      this.chunks++;
      this.pagedGames += out.length;
    }
  }

  /** Chunk n's games (n below the chunk count). */
  async readChunk(n: number): Promise<GameRecord[]> {
    const bytes = await this.store.readGameChunk(n);
    if (!bytes) throw new GamesLogError(`${gameChunkName(n)} is missing from the run's games log; older games cannot be shown (the checkpoint itself is fine)`);
    return parseChunk(bytes, n);
  }

  /** Matching games, newest first: memory first, then the chunks from the newest. */
  async search(q: GameQuery = {}): Promise<GameSearchResult> {
    const limit = q.limit ?? SEARCH_LIMIT;
    const games: GameRecord[] = [];
    let total = 0;
    const take = (list: readonly GameRecord[]) => {
      for (let k = list.length - 1; k >= 0; k--) {
        if (!gameMatches(list[k]!, q)) continue;
        total++;
        if (games.length < limit) games.push(list[k]!);
      }
    };
    const chunks = this.chunks;
    const searched = this.total;
    take(this.recent);
    for (let n = chunks - 1; n >= 0; n--) {
      take(await this.readChunk(n));
    }
    return { games, total, searched };
  }

  /** Every game, oldest first (for an export; reads the whole log). */
  async all(): Promise<GameRecord[]> {
    const out: GameRecord[] = [];
    for (let n = 0; n < this.chunks; n++) out.push(...(await this.readChunk(n)));
    out.push(...this.recent);
    return out;
  }
}
