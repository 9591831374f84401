/**
 * Run stores: where checkpoints live. DirectoryRunStore works on any directory handle
 * with the File System Access API's shape: the origin private file system in the
 * browser (navigator.storage.getDirectory()) and a Node folder (node-store.ts).
 *
 * Layout under <root>/<run name>/:
 *   ckpt-<n>/<files>   one complete checkpoint per folder, n counting up
 *   latest.json        {"folder": "ckpt-<n>", "files": {name: bytes}}, written last
 *   games-<n>.jsonl    the games log (games-log.ts): games paged out of memory, one
 *                      chunk per file, written whole, outside the checkpoint folders
 * A save writes a new folder, then replaces latest.json (a file's contents change only
 * when its writer closes, in OPFS and in the Node handle alike), then deletes older
 * folders. A save that fails part-way (storage full) removes its own folder and leaves
 * latest.json pointing at the previous checkpoint, which stays loadable.
 */
import type { DirectoryHandleLike } from '../model/cache';
import { gameChunkName } from './games-log';
import type { RunFiles, RunStore } from './types';

export class RunStoreError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'RunStoreError';
  }
}

function isQuotaError(e: unknown): boolean {
  const err = e as { name?: string; code?: number } | null;
  return err?.name === 'QuotaExceededError' || err?.code === 22 || (e as { code?: string } | null)?.code === 'ENOSPC';
}

function isNotFound(e: unknown): boolean {
  const err = e as { name?: string; code?: string } | null;
  return err?.name === 'NotFoundError' || err?.name === 'TypeMismatchError' || err?.code === 'ENOENT';
}

export class MemoryRunStore implements RunStore {
  private files: RunFiles | null = null;
  private gameChunks = new Map<number, Uint8Array>();
  constructor(readonly name = 'memory') {}
  writeGameChunk(n: number, bytes: Uint8Array): Promise<void> {
    this.gameChunks.set(n, bytes.slice());
    return Promise.resolve();
  }
  readGameChunk(n: number): Promise<Uint8Array | null> {
    return Promise.resolve(this.gameChunks.get(n)?.slice() ?? null);
  }
  save(files: RunFiles): Promise<void> {
    this.files = new Map([...files].map(([k, v]) => [k, v.slice()]));
    return Promise.resolve();
  }
  load(): Promise<RunFiles | null> {
    return Promise.resolve(this.files ? new Map([...this.files].map(([k, v]) => [k, v.slice()])) : null);
  }
  clear(): Promise<void> {
    this.files = null;
    this.gameChunks.clear();
    return Promise.resolve();
  }
}

interface Latest {
  folder: string;
  files: Record<string, number>;
}

const LATEST = 'latest.json';
const FOLDER = /^ckpt-(\d+)$/;

/** Writes a file whose new contents appear only when its writer closes; a failed write is aborted, leaving the old contents. */
async function writeWhole(dir: DirectoryHandleLike, name: string, bytes: Uint8Array): Promise<void> {
  const w = await (await dir.getFileHandle(name, { create: true })).createWritable();
  try {
    await w.write(bytes);
    await w.close();
  } catch (e) {
    await w.abort().catch(() => undefined);
    throw e;
  }
}

/**
 * Removes a checkpoint folder, trying again a few times: in OPFS a writer just closed or
 * aborted can hold its file for a moment, and the removal then fails. False when it is
 * still there (the next save's sweep removes it).
 */
async function removeFolder(dir: DirectoryHandleLike, name: string): Promise<boolean> {
  for (let attempt = 0; ; attempt++) {
    try {
      await dir.removeEntry(name, { recursive: true });
      return true;
    } catch (e) {
      if (isNotFound(e)) return true;
      if (attempt >= 4) return false;
      await new Promise((r) => setTimeout(r, 25 * 2 ** attempt));
    }
  }
}

export class DirectoryRunStore implements RunStore {
  constructor(
    private readonly root: DirectoryHandleLike,
    readonly name: string,
  ) {
    if (!/^[\w.-]{1,100}$/.test(name) || name === '.' || name === '..') throw new RunStoreError(`run name "${name}" must be 1-100 letters, digits, '.', '_' or '-'`);
  }

  private async dir(create: boolean): Promise<DirectoryHandleLike | null> {
    try {
      return await this.root.getDirectoryHandle(this.name, { create });
    } catch (e) {
      if (!create && isNotFound(e)) return null;
      throw e;
    }
  }

  private async readLatest(dir: DirectoryHandleLike): Promise<Latest | null> {
    let text: string;
    try {
      text = await (await (await dir.getFileHandle(LATEST)).getFile()).text();
    } catch (e) {
      if (isNotFound(e)) return null;
      throw e;
    }
    const json = JSON.parse(text) as Latest;
    if (typeof json?.folder !== 'string' || !FOLDER.test(json.folder) || typeof json.files !== 'object') {
      throw new RunStoreError(`run "${this.name}": ${LATEST} is damaged; delete the run or restore its folder`);
    }
    return json;
  }

  async save(files: RunFiles): Promise<void> {
    const dir = (await this.dir(true))!;
    const latest = await this.readLatest(dir);
    let n = latest ? Number(FOLDER.exec(latest.folder)![1]) + 1 : 0;
    for await (const k of dir.keys()) {
      const m = FOLDER.exec(k);
      if (m) n = Math.max(n, Number(m[1]) + 1);
    }
    const folder = `ckpt-${n}`;
    const sizes: Record<string, number> = {};
    try {
      const target = await dir.getDirectoryHandle(folder, { create: true });
      for (const [name, data] of files) {
        await writeWhole(target, name, data);
        sizes[name] = data.length;
      }
      await writeWhole(dir, LATEST, new TextEncoder().encode(JSON.stringify({ folder, files: sizes } satisfies Latest)));
    } catch (e) {
      await removeFolder(dir, folder);
      const kept = latest ? ` The previous checkpoint (${latest.folder}) is intact.` : '';
      if (isQuotaError(e)) throw new RunStoreError(`storage is full: the checkpoint of run "${this.name}" could not be saved.${kept} Free space (delete cached models or old runs) and save again.`);
      throw new RunStoreError(`the checkpoint of run "${this.name}" could not be saved: ${e instanceof Error ? e.message : String(e)}.${kept}`);
    }
    // Older checkpoints go only after the new one is complete.
    const stale: string[] = [];
    for await (const k of dir.keys()) if (FOLDER.test(k) && k !== folder) stale.push(k);
    for (const k of stale) await removeFolder(dir, k);
  }

  /** One chunk of the games log as one file: its contents appear whole when its writer closes. */
  async writeGameChunk(n: number, bytes: Uint8Array): Promise<void> {
    const dir = (await this.dir(true))!;
    const name = gameChunkName(n);
    try {
      await writeWhole(dir, name, bytes);
    } catch (e) {
      if (isQuotaError(e)) throw new RunStoreError(`storage is full: older games of run "${this.name}" could not be paged out to ${name}; they stay in memory. Free space (delete cached models or old runs).`);
      throw new RunStoreError(`older games of run "${this.name}" could not be paged out to ${name}: ${e instanceof Error ? e.message : String(e)}`);
    }
  }

  async readGameChunk(n: number): Promise<Uint8Array | null> {
    const dir = await this.dir(false);
    if (!dir) return null;
    try {
      return new Uint8Array(await (await (await dir.getFileHandle(gameChunkName(n))).getFile()).arrayBuffer());
    } catch (e) {
      if (isNotFound(e)) return null;
      throw e;
    }
  }

  async load(): Promise<RunFiles | null> {
    const dir = await this.dir(false);
    if (!dir) return null;
    const latest = await this.readLatest(dir);
    if (!latest) return null;
    const folder = await dir.getDirectoryHandle(latest.folder);
    const out: RunFiles = new Map();
    for (const [name, size] of Object.entries(latest.files)) {
      const bytes = new Uint8Array(await (await (await folder.getFileHandle(name)).getFile()).arrayBuffer());
      if (bytes.length !== size) throw new RunStoreError(`run "${this.name}": ${latest.folder}/${name} has ${bytes.length} bytes, expected ${size}; the checkpoint is damaged`);
      out.set(name, bytes);
    }
    return out;
  }

  async clear(): Promise<void> {
    await this.root.removeEntry(this.name, { recursive: true }).catch((e: unknown) => {
      if (!isNotFound(e)) throw e;
    });
  }
}
