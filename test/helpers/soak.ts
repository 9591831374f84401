/**
 * The soak run shared by test/selfplay/soak.test.ts (short, in CI) and bench/soak.ts
 * (long): the micro model plays many tiny iterations of the free-form arithmetic world
 * with a checkpoint after each into a Node folder, and after every iteration the checks
 * below look for anything that grows: GPU pool bytes in use, checkpoint folders, the
 * games in memory (the trainer's and the page's store), and, sampled, the JS heap.
 *
 * Each check is a plain function that returns a complaint (or null), so the test can
 * show that it fires on a planted leak as well as that the run passes it.
 */
import { readdir, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import type { Gpu } from '../../src/gpu/gpu';
import type { DirectoryHandleLike, FileHandleLike } from '../../src/model/cache';
import { loadLlama, type LoadedModel } from '../../src/model/load';
import { openModelDir } from '../../src/model/node-source';
import { loadTokenizer, type ChatTokenizer } from '../../src/model/tokenizer';
import { microDemoConfig, type TrainerConfig } from '../../src/selfplay/config';
import { MEMORY_GAMES, gameChunkName } from '../../src/selfplay/games-log';
import { nodeDirectoryHandle } from '../../src/selfplay/node-store';
import { DirectoryRunStore } from '../../src/selfplay/store';
import { SelfPlayTrainer } from '../../src/selfplay/trainer';
import type { RunFiles, TrainerEvent } from '../../src/selfplay/types';
import { applyEvent } from '../../src/ui/bridge';
import { LiveBuffer } from '../../src/ui/live';
import { initialState, useLab } from '../../src/ui/store';

export const MICRO_DIR = 'models/micro-arith';
export const RUN_NAME = 'soak';

/**
 * The smallest real game: 2 queries of at most 8 tokens, 2 answers of at most 3 tokens
 * each, a rank-2 adapter on q_proj (about 0.5 s an iteration on lavapipe with 2 busy cores).
 */
export function soakConfig(seed = 0): TrainerConfig {
  return microDemoConfig({ seed, queriesPerIteration: 2, groupSize: 2, maxQueryTokens: 8, maxAnswerTokens: 3, examEvery: 0, checkpointEvery: 1, lora: { r: 2, alpha: 4, targets: ['q_proj'] } });
}

/** A garbage collection: global.gc when node runs with --expose-gc, else the flag is set at run time. */
export function collector(): () => void {
  const g = (globalThis as { gc?: () => void }).gc;
  if (g) return g;
  setFlagsFromString('--expose-gc');
  return runInNewContext('gc') as () => void;
}

export function heapAfterGc(gc: () => void): number {
  gc();
  gc();
  return process.memoryUsage().heapUsed;
}

export const MiB = 2 ** 20;
export const mib = (b: number): string => (b / MiB).toFixed(2);

/** Complaint when the pool's bytes in use differ from the warm value. */
export function poolComplaint(iteration: number, warmInUse: number, inUse: number): string | null {
  return inUse === warmInUse ? null : `iteration ${iteration}: GPU pool holds ${inUse} bytes in use, ${inUse - warmInUse} more than the ${warmInUse} after warm-up`;
}

/** Complaint when the heap grew more than `bound` bytes over the warm value. */
export function heapComplaint(warm: number, now: number, bound: number): string | null {
  return now - warm <= bound ? null : `the JS heap grew by ${mib(now - warm)} MiB (from ${mib(warm)} to ${mib(now)} MiB), more than the ${mib(bound)} MiB allowed`;
}

/**
 * Complaint when the run folder is not exactly: one complete ckpt-* folder named by
 * latest.json, latest.json, the games log's `chunks` chunk files (a stale chunk past
 * them may remain only until written over) and nothing else (no temporary files).
 */
export async function runFolderComplaint(runDir: string, chunks: number): Promise<string | null> {
  const entries = (await readdir(runDir)).sort();
  const folders = entries.filter((e) => /^ckpt-\d+$/.test(e));
  if (folders.length !== 1) return `run folder holds ${folders.length} checkpoint folders (${folders.join(', ')}), expected exactly 1`;
  if (!entries.includes('latest.json')) return 'run folder has no latest.json';
  const latest = JSON.parse(await readFile(join(runDir, 'latest.json'), 'utf8')) as { folder: string; files: Record<string, number> };
  if (latest.folder !== folders[0]) return `latest.json names ${latest.folder} but the folder is ${folders[0]}`;
  for (const [name, size] of Object.entries(latest.files)) {
    const s = await stat(join(runDir, latest.folder, name)).catch(() => null);
    if (!s || s.size !== size) return `${latest.folder}/${name} has ${s?.size ?? 'no'} bytes, latest.json says ${size}`;
  }
  const extraInCkpt = (await readdir(join(runDir, latest.folder))).filter((f) => !(f in latest.files));
  if (extraInCkpt.length) return `${latest.folder} holds files latest.json does not name: ${extraInCkpt.join(', ')}`;
  const chunkFiles = entries.filter((e) => /^games-\d+\.jsonl$/.test(e));
  const expected = Array.from({ length: chunks }, (_, n) => gameChunkName(n));
  const missing = expected.filter((c) => !chunkFiles.includes(c));
  if (missing.length) return `games log chunks missing: ${missing.join(', ')}`;
  const other = entries.filter((e) => e !== 'latest.json' && e !== folders[0] && !chunkFiles.includes(e));
  if (other.length) return `run folder holds unexpected entries: ${other.join(', ')}`;
  if (chunkFiles.length !== chunks) return `run folder holds ${chunkFiles.length} games chunks, the checkpoint counts ${chunks}`;
  return null;
}

/** Complaint when the games in memory (trainer or page store) exceed the bound. */
export function gamesComplaint(where: string, inMemory: number, bound = MEMORY_GAMES): string | null {
  return inMemory <= bound ? null : `${where} holds ${inMemory} games in memory, more than ${bound}`;
}

const equalFiles = (a: RunFiles | null, b: RunFiles | null): boolean =>
  (a === null && b === null) ||
  (!!a && !!b && a.size === b.size && [...a].every(([k, v]) => { const w = b.get(k); return !!w && w.length === v.length && w.every((x, i) => x === v[i]); }));

/**
 * A Node folder handle that, after every change a save makes (a file closed, an entry
 * removed), loads the run from the folder with a fresh store and records a complaint
 * unless it is exactly the previous checkpoint or the one being saved: replacement is
 * atomic when no such moment exists.
 */
export class AtomicityWatch {
  previous: RunFiles | null = null;
  pending: RunFiles | null = null;
  moments = 0;
  complaints: string[] = [];
  private checking = false;

  constructor(private readonly root: string) {}

  handle(path = this.root): DirectoryHandleLike {
    const inner = nodeDirectoryHandle(path);
    return {
      getDirectoryHandle: async (name, options) => (await inner.getDirectoryHandle(name, options), this.handle(join(path, name))),
      getFileHandle: async (name, options): Promise<FileHandleLike> => {
        const f = await inner.getFileHandle(name, options);
        return {
          getFile: () => f.getFile(),
          createWritable: async () => {
            const w = await f.createWritable();
            return { write: (d: Uint8Array) => w.write(d), abort: () => w.abort(), close: async () => (await w.close(), await this.check(`after closing ${join(path, name)}`)) };
          },
        };
      },
      removeEntry: async (name, options) => (await inner.removeEntry(name, options), await this.check(`after removing ${join(path, name)}`)),
      keys: () => inner.keys(),
    };
  }

  private async check(moment: string): Promise<void> {
    if (this.checking || !this.pending) return;
    this.checking = true;
    try {
      this.moments++;
      const now = await new DirectoryRunStore(nodeDirectoryHandle(this.root), RUN_NAME).load().catch((e: unknown) => e);
      if (now instanceof Error) this.complaints.push(`${moment}: the run does not load (${now.message})`);
      else if (!equalFiles(now as RunFiles | null, this.previous) && !equalFiles(now as RunFiles | null, this.pending)) this.complaints.push(`${moment}: the folder holds neither the previous checkpoint nor the new one`);
    } finally {
      this.checking = false;
    }
  }
}

export interface SoakModel {
  model: LoadedModel;
  tokenizer: ChatTokenizer;
}

export async function loadMicro(gpu: Gpu): Promise<SoakModel> {
  const model = await loadLlama(gpu, await openModelDir(MICRO_DIR), { format: 'f32' });
  return { model, tokenizer: await loadTokenizer(model.files) };
}

export interface SoakFigures {
  iterations: number;
  seconds: number;
  iterationsPerSecond: number;
  warmInUseBytes: number;
  finalInUseBytes: number;
  allocatedBytesRange: [number, number];
  liveBuffersRange: [number, number];
  heapWarmBytes: number;
  heapFinalBytes: number;
  heapSamples: { iteration: number; bytes: number }[];
  checkpointBytes: { first: number; last: number };
  runFolder: string[];
  gamesInMemory: number;
  pageGames: number;
  gamesTotal: number;
  chunks: number;
  atomicMoments: number;
  complaints: string[];
}

export interface SoakOptions {
  gpu: Gpu;
  models: SoakModel;
  /** Folder holding the run folder (RUN_NAME). */
  folder: string;
  iterations: number;
  /** Iterations before the pool and heap baselines are taken. */
  warmPool?: number;
  warmHeap?: number;
  /** Heap growth allowed past warm-up. */
  heapBound: number;
  /** Take a heap sample every this many iterations. */
  heapEvery?: number;
  /** Watch atomic replacement on every save (slower) or only for the first n saves. */
  watchSaves?: number;
  log?: (line: string) => void;
  /** Called after each iteration (a test plants leaks through this). */
  afterIteration?: (i: number, trainer: SelfPlayTrainer) => void | Promise<void>;
}

/** Runs the soak and returns its figures and every complaint (empty when nothing grew). */
export async function soak(o: SoakOptions): Promise<{ figures: SoakFigures; trainer: SelfPlayTrainer }> {
  const { gpu } = o;
  const warmPool = o.warmPool ?? 3;
  const warmHeap = o.warmHeap ?? 20;
  const heapEvery = o.heapEvery ?? 10;
  const watchSaves = o.watchSaves ?? Infinity;
  const log = o.log ?? (() => undefined);
  const gc = collector();
  const watch = new AtomicityWatch(o.folder);
  const store = new DirectoryRunStore(watch.handle(), RUN_NAME);
  await store.clear();
  // The page's side: every trainer event through the bridge into the zustand store.
  useLab.setState(initialState, true);
  const live = new LiveBuffer(() => undefined);
  let checkpointBytes: number[] = [];
  const onEvent = (e: TrainerEvent) => {
    applyEvent(e, live);
    if (e.type === 'checkpoint') checkpointBytes.push(e.bytes);
  };
  const trainer = SelfPlayTrainer.start({ gpu, model: o.models.model, tokenizer: o.models.tokenizer }, soakConfig(), { store, onEvent });
  // The watch compares each moment of a save with the files being saved.
  const save = store.save.bind(store);
  let saves = 0;
  store.save = async (files) => {
    const watched = saves++ < watchSaves;
    watch.pending = watched ? files : null;
    await save(files);
    watch.previous = watched ? files : null;
    watch.pending = null;
  };
  const complaints: string[] = [];
  const add = (c: string | null) => {
    if (c && complaints.length < 20) complaints.push(c);
  };
  const runDir = join(o.folder, RUN_NAME);
  let warmInUse = -1;
  let heapWarm = -1;
  const heapSamples: { iteration: number; bytes: number }[] = [];
  const alloc: [number, number] = [Infinity, 0];
  const live2: [number, number] = [Infinity, 0];
  const t0 = performance.now();
  let tWarm = t0;
  for (let i = 0; i < o.iterations; i++) {
    await trainer.step();
    await o.afterIteration?.(i, trainer);
    const s = gpu.stats();
    if (i + 1 === warmPool) {
      warmInUse = s.inUseBytes;
      tWarm = performance.now();
    }
    if (i + 1 > warmPool) {
      add(poolComplaint(i, warmInUse, s.inUseBytes));
      alloc[0] = Math.min(alloc[0], s.allocatedBytes);
      alloc[1] = Math.max(alloc[1], s.allocatedBytes);
      live2[0] = Math.min(live2[0], s.liveBuffers);
      live2[1] = Math.max(live2[1], s.liveBuffers);
    }
    add(await runFolderComplaint(runDir, trainer.gamesLog.state().chunks));
    add(gamesComplaint('the trainer', trainer.games.length));
    add(gamesComplaint("the page's store", useLab.getState().games.length));
    if (trainer.gamesLog.total !== 2 * (i + 1)) add(`iteration ${i}: the history holds ${trainer.gamesLog.total} games, expected ${2 * (i + 1)}`);
    if (useLab.getState().gamesTotal !== 2 * (i + 1)) add(`iteration ${i}: the page counts ${useLab.getState().gamesTotal} games, expected ${2 * (i + 1)}`);
    if (i + 1 === warmHeap || ((i + 1) % heapEvery === 0 && i + 1 > warmHeap) || i + 1 === o.iterations) {
      const h = heapAfterGc(gc);
      heapSamples.push({ iteration: i + 1, bytes: h });
      if (i + 1 === warmHeap) heapWarm = h;
    }
    if ((i + 1) % 50 === 0 || i + 1 === o.iterations) {
      const sec = (performance.now() - t0) / 1000;
      log(`soak: ${i + 1} iterations in ${sec.toFixed(1)} s (${((i + 1) / sec).toFixed(2)}/s); pool in use ${s.inUseBytes} B, allocated ${s.allocatedBytes} B, ${s.liveBuffers} buffers; heap ${mib(heapSamples.at(-1)?.bytes ?? 0)} MiB; games in memory ${trainer.games.length} (page ${useLab.getState().games.length}), total ${trainer.gamesLog.total}, chunks ${trainer.gamesLog.state().chunks}; checkpoint ${checkpointBytes.at(-1)} B`);
    }
    if (checkpointBytes.length > 2) checkpointBytes = [checkpointBytes[0]!, checkpointBytes.at(-1)!];
  }
  const seconds = (performance.now() - t0) / 1000;
  const heapFinal = heapSamples.at(-1)!.bytes;
  if (heapWarm >= 0) add(heapComplaint(heapWarm, heapFinal, o.heapBound));
  complaints.push(...watch.complaints.slice(0, 5));
  const figures: SoakFigures = {
    iterations: o.iterations,
    seconds,
    iterationsPerSecond: (o.iterations - warmPool) / ((performance.now() - tWarm) / 1000),
    warmInUseBytes: warmInUse,
    finalInUseBytes: gpu.stats().inUseBytes,
    allocatedBytesRange: alloc,
    liveBuffersRange: live2,
    heapWarmBytes: heapWarm,
    heapFinalBytes: heapFinal,
    heapSamples,
    checkpointBytes: { first: checkpointBytes[0]!, last: checkpointBytes.at(-1)! },
    runFolder: (await readdir(runDir)).sort(),
    gamesInMemory: trainer.games.length,
    pageGames: useLab.getState().games.length,
    gamesTotal: trainer.gamesLog.total,
    chunks: trainer.gamesLog.state().chunks,
    atomicMoments: watch.moments,
    complaints,
  };
  return { figures, trainer };
}
