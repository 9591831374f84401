/**
 * The lab's environment inside a browser worker: WebGPU from navigator.gpu, the model
 * cache and the run's checkpoints in the origin private file system (OPFS).
 */
import { acquireGpu } from '../gpu/gpu';
import { OpfsModelCache, type DirectoryHandleLike } from '../model/cache';
import { browserSandbox } from '../selfplay/custom-reward-browser';
import { DirectoryRunStore, MemoryRunStore } from '../selfplay/store';
import type { RunStore } from '../selfplay/types';
import type { LabEnvironment, RunMetaStore, TrainerFactory } from './lab';
import type { SavedRunInfo } from './protocol';

const RUNS_DIR = 'selfplay-lab-runs';
/** The run the lab checkpoints to, under runsDirectory(). */
export const RUN_NAME = 'current';
const META_FILE = 'current.meta.json';

/** The folder of saved runs in the origin private file system; null without one. */
export async function runsDirectory(): Promise<DirectoryHandleLike | null> {
  const storage = typeof navigator !== 'undefined' ? navigator.storage : undefined;
  if (!storage?.getDirectory) return null;
  const top = (await storage.getDirectory()) as unknown as DirectoryHandleLike;
  return top.getDirectoryHandle(RUNS_DIR, { create: true });
}

function isNotFound(e: unknown): boolean {
  const name = (e as { name?: string } | null)?.name;
  return name === 'NotFoundError' || name === 'TypeMismatchError';
}

/** The saved run's description, a small JSON file beside its checkpoints. */
export class OpfsRunMeta implements RunMetaStore {
  constructor(private readonly dir: () => Promise<DirectoryHandleLike | null>) {}

  async load(): Promise<SavedRunInfo | null> {
    const dir = await this.dir();
    if (!dir) return null;
    try {
      const text = await (await (await dir.getFileHandle(META_FILE)).getFile()).text();
      return JSON.parse(text) as SavedRunInfo;
    } catch (e) {
      if (isNotFound(e) || e instanceof SyntaxError) return null;
      throw e;
    }
  }

  async save(info: SavedRunInfo): Promise<void> {
    const dir = await this.dir();
    if (!dir) return;
    const w = await (await dir.getFileHandle(META_FILE, { create: true })).createWritable();
    await w.write(new TextEncoder().encode(JSON.stringify(info)));
    await w.close();
  }

  async clear(): Promise<void> {
    const dir = await this.dir();
    try {
      await dir?.removeEntry(META_FILE);
    } catch (e) {
      if (!isNotFound(e)) throw e;
    }
  }
}

export function browserEnvironment(trainers: TrainerFactory): LabEnvironment {
  let cache: Promise<OpfsModelCache> | null = null;
  let dir: Promise<DirectoryHandleLike | null> | null = null;
  const runsDir = () => (dir ??= runsDirectory().catch(() => null));
  return {
    acquireGpu: () => acquireGpu(),
    modelCache: () => (cache ??= OpfsModelCache.open()),
    runStore: async (): Promise<RunStore> => {
      const d = await runsDir();
      // Without OPFS the run lives only as long as the tab; export the adapter to keep it.
      return d ? new DirectoryRunStore(d, RUN_NAME) : new MemoryRunStore(RUN_NAME);
    },
    runMeta: new OpfsRunMeta(runsDir),
    trainers,
    rewardSandbox: browserSandbox,
  };
}
