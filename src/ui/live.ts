/**
 * Text that streams in token by token (the Challenger's queries, the Solver's answers,
 * the judge's notes) lives here, in a plain mutable object, not in React state: the
 * bridge appends to it on every token and subscribers are told at most once per
 * animation frame.
 */
import type { IterationPhase } from '../selfplay/types';

export interface LiveIteration {
  iteration: number;
  phase: IterationPhase | null;
  /** Challenger text per query index. */
  queries: string[];
  /** Solver text per [query][answer]. */
  answers: string[][];
  /** Judge text per [query][answer]. */
  judges: string[][];
}

type Role = 'challenger' | 'solver' | 'judge';

export class LiveBuffer {
  current: LiveIteration = { iteration: -1, phase: null, queries: [], answers: [], judges: [] };
  /** Bumped once per flushed frame; components read it through useSyncExternalStore. */
  version = 0;
  private listeners = new Set<() => void>();
  private scheduled = false;
  /** Arrival times of the last few seconds' tokens (all rows), for the live rate. */
  private stamps: number[] = [];

  constructor(
    private readonly schedule: (cb: () => void) => void = defaultSchedule,
    private readonly clock: () => number = () => performance.now(),
  ) {}

  /** Tokens per second over the last RATE_WINDOW_MS, all generation rows together; 0 when generation has paused that long. */
  tokensPerSecond(now = this.clock()): number {
    const recent = this.stamps.filter((t) => now - t <= RATE_WINDOW_MS);
    if (recent.length < 2) return 0;
    const span = (recent[recent.length - 1]! - recent[0]!) / 1000;
    return span > 0 ? (recent.length - 1) / span : 0;
  }

  private ensure(iteration: number): LiveIteration {
    if (this.current.iteration !== iteration) this.current = { iteration, phase: null, queries: [], answers: [], judges: [] };
    return this.current;
  }

  phase(iteration: number, phase: IterationPhase): void {
    // Checkpoints and evaluations come after an iteration (numbered as the next one): they start no new game.
    const between = phase === 'checkpoint' || phase === 'evaluation';
    (between && this.current.iteration >= 0 ? this.current : this.ensure(iteration)).phase = phase;
    this.changed();
  }

  token(iteration: number, role: Role, query: number, answer: number, delta: string): void {
    const it = this.ensure(iteration);
    const now = this.clock();
    this.stamps.push(now);
    while (this.stamps.length > 0 && now - this.stamps[0]! > RATE_WINDOW_MS) this.stamps.shift();
    if (role === 'challenger') it.queries[query] = (it.queries[query] ?? '') + delta;
    else {
      const grid = role === 'solver' ? it.answers : it.judges;
      const row = (grid[query] ??= []);
      row[answer] = (row[answer] ?? '') + delta;
    }
    this.changed();
  }

  reset(): void {
    this.stamps = [];
    this.current = { iteration: -1, phase: null, queries: [], answers: [], judges: [] };
    this.changed();
  }

  subscribe = (listener: () => void): (() => void) => {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  };

  getVersion = (): number => this.version;

  private changed(): void {
    if (this.scheduled) return;
    this.scheduled = true;
    this.schedule(() => {
      this.scheduled = false;
      this.version++;
      for (const l of this.listeners) l();
    });
  }
}

const RATE_WINDOW_MS = 3000;

function defaultSchedule(cb: () => void): void {
  if (typeof requestAnimationFrame === 'function') requestAnimationFrame(() => cb());
  else setTimeout(cb, 16);
}

export const live = new LiveBuffer();
