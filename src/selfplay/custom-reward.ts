/**
 * "Your own reward": a reward source written by the user as a JavaScript function of
 * (query, answer) returning a number, in the spirit of TRL's `reward_funcs`.
 *
 * The function runs in a dedicated sandbox (a Worker with no page access in the browser,
 * custom-reward-browser.ts; a worker thread with a node:vm context in Node,
 * custom-reward-node.ts), one call at a time with a time limit per call. Whatever goes
 * wrong in a call (it throws, runs past the limit, loops forever, returns NaN or
 * something that is not a number, tries to reach the network or the page, or takes the
 * sandbox down) becomes a named message and the fallback value for that answer; the
 * run goes on. A sandbox that timed out or crashed is replaced before the next call.
 *
 * The source either is a single function expression, e.g.
 *   (query, answer) => -answer.length / 100
 * or declares `function reward(query, answer) { ... }` (other helpers may sit beside it).
 */

export interface CustomRewardSpec {
  /** The reward's name in metrics and games (rewards/<name>/mean, rewards[name]). */
  name: string;
  /** The JavaScript source (see the module comment). */
  source: string;
  /** Weight of this reward in the Solver's total. */
  weight: number;
  /** Time limit of one call, in milliseconds. */
  timeoutMs: number;
  /** The reward an answer gets when its call fails. */
  fallback: number;
}

export const DEFAULT_CUSTOM_REWARD: Omit<CustomRewardSpec, 'source'> = { name: 'custom', weight: 1, timeoutMs: 500, fallback: 0 };

/** Why a call produced no usable number. */
export type FallbackReason = 'threw' | 'timeout' | 'not_a_number' | 'blocked' | 'crashed';

/** What one call in the sandbox answered. */
export type SandboxReply = { ok: true; value: number } | { ok: false; reason: FallbackReason; message: string };

/** One live sandbox holding the compiled function. */
export interface SandboxChannel {
  /**
   * Calls the function; resolves with its number or why there is none. On a time-out or
   * a crash the channel is dead afterwards (`alive` false) and must be replaced.
   */
  call(query: string, answer: string, timeoutMs: number): Promise<SandboxReply>;
  readonly alive: boolean;
  terminate(): void;
}

/** Starts a sandbox and compiles `source` in it; rejects with CustomRewardError when it does not compile. */
export type SandboxFactory = (source: string, timeoutMs: number) => Promise<SandboxChannel>;

export class CustomRewardError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'CustomRewardError';
  }
}

/** Examples that ship with the lab (each a complete source). */
export const CUSTOM_REWARD_EXAMPLES: readonly { id: string; title: string; source: string }[] = [
  {
    id: 'length-penalty',
    title: 'Length penalty',
    source: `// Prefers answers near 400 characters: 0 at the target, down to -1 far from it.
function reward(query, answer) {
  const target = 400;
  return -Math.min(1, Math.abs(answer.length - target) / target);
}
`,
  },
  {
    id: 'format-regex',
    title: 'Required format (regex)',
    source: `// 1 when the answer ends with a line "Answer: ...", else 0.
function reward(query, answer) {
  return /(^|\\n)Answer: .+\\s*$/.test(answer) ? 1 : 0;
}
`,
  },
  {
    id: 'json-validity',
    title: 'JSON validity',
    source: `// 1 when the answer (or its first fenced code block) parses as a JSON object, else 0.
function reward(query, answer) {
  const fenced = /\`\`\`(?:json)?\\s*([\\s\\S]*?)\`\`\`/.exec(answer);
  const text = (fenced ? fenced[1] : answer).trim();
  try {
    const v = JSON.parse(text);
    return v !== null && typeof v === 'object' ? 1 : 0;
  } catch {
    return 0;
  }
}
`,
  },
];

/** Settings checked before a sandbox is started; names the bad field. */
export function validateCustomRewardSpec(spec: CustomRewardSpec): void {
  if (typeof spec.source !== 'string' || spec.source.trim() === '') throw new CustomRewardError('The reward function is empty: write a function of (query, answer) that returns a number, or pick an example.');
  if (!/^[A-Za-z][A-Za-z0-9_-]{0,31}$/.test(spec.name)) throw new CustomRewardError(`The reward's name "${spec.name}" must be 1-32 letters, digits, "_" or "-", starting with a letter (it names the metric rewards/<name>/mean).`);
  if (['judge', 'reward_model', 'verifiable'].includes(spec.name)) throw new CustomRewardError(`The reward's name "${spec.name}" is taken by a built-in reward; pick another (e.g. custom).`);
  if (!Number.isFinite(spec.weight)) throw new CustomRewardError(`The reward's weight must be a finite number, got ${spec.weight}.`);
  if (!(Number.isFinite(spec.timeoutMs) && spec.timeoutMs >= 1 && spec.timeoutMs <= 60_000)) throw new CustomRewardError(`The time limit per call must be 1 to 60000 ms, got ${spec.timeoutMs}.`);
  if (!Number.isFinite(spec.fallback)) throw new CustomRewardError(`The fallback reward must be a finite number, got ${spec.fallback}.`);
}

/** One failed call: which answer, why, and the sandbox's words. */
export interface CustomRewardFailure {
  query: number;
  answer: number;
  reason: FallbackReason;
  message: string;
}

export interface CustomRewardScores {
  /** [query][answer] rewards, fallbacks included. */
  rewards: number[][];
  fallbacks: number;
  failures: CustomRewardFailure[];
}

/** The trainer's view of a user reward source (SelfPlayTrainer.customReward). */
export interface RewardHook {
  readonly name: string;
  readonly weight: number;
  score(queries: readonly string[], answers: readonly (readonly string[])[], signal?: AbortSignal): Promise<CustomRewardScores>;
}

/** The user's function behind a sandbox, scored call by call with fallbacks. */
export class CustomReward implements RewardHook {
  private channel: SandboxChannel | null = null;
  private released = false;

  private constructor(
    readonly spec: CustomRewardSpec,
    private readonly factory: SandboxFactory,
    /** Called once per scoring with the failures (already counted as fallbacks). */
    public onFailures: (f: CustomRewardFailure[]) => void = () => undefined,
  ) {}

  get name(): string {
    return this.spec.name;
  }
  get weight(): number {
    return this.spec.weight;
  }

  /** Validates the settings and compiles the source in a fresh sandbox (a syntax error or a missing function throws here). */
  static async create(spec: CustomRewardSpec, factory: SandboxFactory, onFailures?: (f: CustomRewardFailure[]) => void): Promise<CustomReward> {
    validateCustomRewardSpec(spec);
    const r = new CustomReward(spec, factory, onFailures);
    r.channel = await factory(spec.source, spec.timeoutMs);
    return r;
  }

  /** Calls the function on one pair (for a "try it" button); never throws for the function's own failures. */
  async call(query: string, answer: string): Promise<SandboxReply> {
    if (this.released) throw new CustomRewardError('the reward function was released');
    if (!this.channel?.alive) {
      this.channel?.terminate();
      this.channel = await this.factory(this.spec.source, this.spec.timeoutMs);
    }
    try {
      return await this.channel.call(query, answer, this.spec.timeoutMs);
    } catch (e) {
      this.channel.terminate();
      return { ok: false, reason: 'crashed', message: `the sandbox stopped (${e instanceof Error ? e.message : String(e)})` };
    }
  }

  async score(queries: readonly string[], answers: readonly (readonly string[])[], signal?: AbortSignal): Promise<CustomRewardScores> {
    const failures: CustomRewardFailure[] = [];
    const rewards: number[][] = [];
    for (const [i, q] of queries.entries()) {
      const row: number[] = [];
      for (const [j, a] of (answers[i] ?? []).entries()) {
        signal?.throwIfAborted();
        const r = await this.call(q, a);
        if (r.ok) row.push(r.value);
        else {
          row.push(this.spec.fallback);
          failures.push({ query: i, answer: j, reason: r.reason, message: r.message });
        }
      }
      rewards.push(row);
    }
    if (failures.length > 0) this.onFailures(failures);
    return { rewards, fallbacks: failures.length, failures };
  }

  release(): void {
    this.released = true;
    this.channel?.terminate();
    this.channel = null;
  }
}

/** One line for a batch of failures: the count, the first message, and how the rest split by reason. */
export function summarizeFailures(name: string, failures: readonly CustomRewardFailure[], fallback: number): string {
  if (failures.length === 0) return '';
  const first = failures[0]!;
  const byReason = new Map<FallbackReason, number>();
  for (const f of failures) byReason.set(f.reason, (byReason.get(f.reason) ?? 0) + 1);
  const counts = [...byReason].map(([r, n]) => `${n} ${REASON_WORDS[r]}`).join(', ');
  return `Reward "${name}": ${failures.length} answer${failures.length === 1 ? '' : 's'} got the fallback ${fallback} (${counts}). First: query ${first.query + 1}, answer ${first.answer + 1}: ${first.message}`;
}

const REASON_WORDS: Record<FallbackReason, string> = {
  threw: 'threw',
  timeout: 'timed out',
  not_a_number: 'not a number',
  blocked: 'blocked access',
  crashed: 'sandbox crashed',
};

/**
 * The code that runs inside the sandbox, shared by the browser worker and the Node
 * context: compiles the source, then calls the function and classifies its result.
 * Runs in the sandbox's own realm, so nothing it touches belongs to the host.
 * `blocked` names globals replaced by accessors that throw a SandboxBlocked error.
 */
export const SANDBOX_HARNESS = String.raw`(function (blockedNames) {
  'use strict';
  const G = globalThis;
  function blockedError(name) {
    const e = new Error('the reward function tried to use ' + name + ', which a reward has no access to (no network, no page, no storage); compute the reward from query and answer alone');
    e.name = 'SandboxBlocked';
    return e;
  }
  for (const name of blockedNames) {
    const thrower = function () { throw blockedError(name); };
    for (let o = G; o; o = Object.getPrototypeOf(o)) {
      try { if (Object.prototype.hasOwnProperty.call(o, name)) Object.defineProperty(o, name, { get: thrower, set: thrower, configurable: false }); } catch (_) {}
    }
    try { Object.defineProperty(G, name, { get: thrower, set: thrower, configurable: false }); } catch (_) {}
  }
  const indirectEval = eval;
  let fn = null;
  function describe(v) {
    if (v === null) return 'null';
    if (typeof v === 'string') return 'the string ' + JSON.stringify(v.length > 40 ? v.slice(0, 40) + '...' : v);
    if (typeof v === 'number') return String(v);
    if (typeof v === 'object' || typeof v === 'function') return 'a' + (Array.isArray(v) ? 'n array' : ' ' + typeof v);
    return typeof v + ' ' + String(v);
  }
  function errorText(e) {
    try {
      if (e && typeof e === 'object' && typeof e.message === 'string') return (typeof e.name === 'string' ? e.name : 'Error') + ': ' + e.message;
      return 'threw ' + describe(e);
    } catch (_) { return 'threw an unreadable value'; }
  }
  function compile(source) {
    try {
      let candidate;
      try { candidate = indirectEval('(' + source + '\n)'); } catch (e) { if (!(e instanceof SyntaxError)) throw e; candidate = undefined; }
      if (typeof candidate !== 'function') {
        indirectEval(source);
        candidate = typeof G.reward === 'function' ? G.reward : undefined;
      }
      if (typeof candidate !== 'function') return JSON.stringify({ ok: false, message: 'the source defines no reward function: write "function reward(query, answer) { ... }" or a single function expression such as "(query, answer) => answer.length"' });
      fn = candidate;
      return JSON.stringify({ ok: true });
    } catch (e) {
      return JSON.stringify({ ok: false, message: errorText(e) });
    }
  }
  function call(query, answer) {
    let v;
    try {
      v = fn(query, answer);
    } catch (e) {
      if (e && e.name === 'SandboxBlocked') return JSON.stringify({ ok: false, reason: 'blocked', message: String(e.message) });
      return JSON.stringify({ ok: false, reason: 'threw', message: 'threw ' + errorText(e) });
    }
    if (typeof v === 'number') {
      if (Number.isFinite(v)) return JSON.stringify({ ok: true, value: v });
      return JSON.stringify({ ok: false, reason: 'not_a_number', message: 'returned ' + String(v) + ', not a finite number' });
    }
    if (v && typeof v.then === 'function') return JSON.stringify({ ok: false, reason: 'not_a_number', message: 'returned a Promise: a reward function must return its number directly (no async)' });
    return JSON.stringify({ ok: false, reason: 'not_a_number', message: 'returned ' + describe(v) + ' instead of a number' });
  }
  return Object.freeze({ compile: compile, call: call });
})`;

/** Parses the harness's JSON reply to a call. */
export function parseReply(json: string): SandboxReply {
  const r = JSON.parse(json) as { ok: boolean; value?: number; reason?: FallbackReason; message?: string };
  if (r.ok && typeof r.value === 'number' && Number.isFinite(r.value)) return { ok: true, value: r.value };
  return { ok: false, reason: r.reason ?? 'not_a_number', message: r.message ?? 'no usable result' };
}

/** Names a reward's sandbox replaces with accessors that throw SandboxBlocked. */
export const BLOCKED_GLOBALS = [
  'fetch', 'XMLHttpRequest', 'WebSocket', 'WebSocketStream', 'EventSource', 'WebTransport', 'RTCPeerConnection', 'importScripts',
  'Worker', 'SharedWorker', 'BroadcastChannel', 'MessageChannel', 'indexedDB', 'caches', 'localStorage', 'sessionStorage', 'navigator',
  'location', 'document', 'window', 'parent', 'top', 'opener', 'open', 'postMessage', 'require', 'process', 'module', 'Deno', 'Bun',
];

/** The host's end of a sandbox worker: messages in and out, an error hook, termination. */
export interface SandboxEndpoint {
  post(message: SandboxRequest): void;
  onMessage(listener: (m: SandboxResponse) => void): void;
  /** The worker died (uncaught error, out of memory, exit). */
  onExit(listener: (why: string) => void): void;
  terminate(): void;
}

export type SandboxRequest = { id: number; kind: 'compile'; source: string; timeoutMs: number } | { id: number; kind: 'call'; query: string; answer: string; timeoutMs: number };
export type SandboxResponse = { id: number; json: string };
type SandboxRequestBody = SandboxRequest extends infer R ? (R extends SandboxRequest ? Omit<R, 'id'> : never) : never;

/**
 * A sandbox over a worker endpoint. Every call has a host-side timer of timeoutMs plus
 * `graceMs` (0 in the browser, where the timer is the only limit; a margin in Node, whose
 * vm context enforces the limit itself); when it fires the worker is terminated.
 */
export class WorkerSandbox implements SandboxChannel {
  private nextId = 1;
  private pending = new Map<number, (json: string | null, why?: string) => void>();
  private dead: string | null = null;

  constructor(
    private readonly endpoint: SandboxEndpoint,
    private readonly graceMs: number,
  ) {
    endpoint.onMessage((m) => {
      const p = this.pending.get(m.id);
      this.pending.delete(m.id);
      p?.(m.json);
    });
    endpoint.onExit((why) => this.kill(why));
  }

  get alive(): boolean {
    return this.dead === null;
  }

  /** Compiles the source; rejects with CustomRewardError naming the problem. */
  async compile(source: string, timeoutMs: number): Promise<void> {
    const r = await this.request({ kind: 'compile', source, timeoutMs }, timeoutMs + Math.max(this.graceMs, 1000));
    const res = r.json === null ? null : (JSON.parse(r.json) as { ok: boolean; reason?: string; message?: string });
    if (r.timedOut || res?.reason === 'timeout') throw new CustomRewardError(`The reward function's source did not finish running within ${timeoutMs} ms when it was loaded (an endless loop at the top level?).`);
    if (res === null) throw new CustomRewardError(`The reward sandbox stopped while loading the source (${r.why}).`);
    if (!res.ok) throw new CustomRewardError(`The reward function does not load: ${res.message}`);
  }

  async call(query: string, answer: string, timeoutMs: number): Promise<SandboxReply> {
    const r = await this.request({ kind: 'call', query, answer, timeoutMs }, timeoutMs + this.graceMs);
    if (r.timedOut) return { ok: false, reason: 'timeout', message: `ran longer than ${timeoutMs} ms (an endless loop?) and was stopped` };
    if (r.json === null) return { ok: false, reason: 'crashed', message: `the sandbox stopped (${r.why})` };
    return parseReply(r.json);
  }

  terminate(): void {
    this.kill('terminated');
  }

  private kill(why: string): void {
    if (this.dead === null) {
      this.dead = why;
      this.endpoint.terminate();
    }
    for (const p of this.pending.values()) p(null, why);
    this.pending.clear();
  }

  private request(msg: SandboxRequestBody, limitMs: number): Promise<{ json: string | null; why?: string; timedOut: boolean }> {
    if (this.dead !== null) return Promise.resolve({ json: null, why: this.dead, timedOut: false });
    const id = this.nextId++;
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        this.kill(`ran past ${limitMs} ms`);
        resolve({ json: null, timedOut: true });
      }, limitMs);
      this.pending.set(id, (json, why) => {
        clearTimeout(timer);
        resolve({ json, why, timedOut: false });
      });
      this.endpoint.post({ id, ...msg } as SandboxRequest);
    });
  }
}
