/**
 * A Node folder behind the directory-handle shape DirectoryRunStore uses. Like OPFS, a
 * file's new contents appear only when its writer closes: bytes go to a temporary file
 * that is renamed over the target on close.
 */
import { mkdir, open, readFile, readdir, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { DirectoryHandleLike, FileHandleLike, WritableLike } from '../model/cache';
import { DirectoryRunStore } from './store';

function notFound(path: string): Error {
  return Object.assign(new Error(`${path} not found`), { name: 'NotFoundError' });
}

export function nodeDirectoryHandle(path: string): DirectoryHandleLike {
  return {
    async getDirectoryHandle(name, options = {}) {
      const p = join(path, name);
      if (options.create) await mkdir(p, { recursive: true });
      else if (!(await stat(p).catch(() => null))?.isDirectory()) throw notFound(p);
      return nodeDirectoryHandle(p);
    },
    async getFileHandle(name, options = {}): Promise<FileHandleLike> {
      const p = join(path, name);
      const s = await stat(p).catch(() => null);
      if (!s) {
        if (!options.create) throw notFound(p);
        await (await open(p, 'w')).close();
      }
      return {
        getFile: async () => new Blob([await readFile(p)]),
        createWritable: async (): Promise<WritableLike> => {
          const tmp = `${p}.tmp-${process.pid}-${Math.random().toString(36).slice(2)}`;
          const fh = await open(tmp, 'w');
          return {
            write: async (data: Uint8Array) => {
              await fh.write(data);
            },
            close: async () => {
              await fh.sync();
              await fh.close();
              await rename(tmp, p);
            },
            abort: async () => {
              await fh.close().catch(() => undefined);
              await rm(tmp, { force: true });
            },
          };
        },
      };
    },
    async removeEntry(name, options = {}) {
      const p = join(path, name);
      if (!(await stat(p).catch(() => null))) throw notFound(p);
      await rm(p, { recursive: !!options.recursive, force: false });
    },
    async *keys() {
      for (const k of await readdir(path)) if (!k.includes('.tmp-')) yield k;
    },
  };
}

/** A run store in a folder of the file system: <folder>/<run name>/... */
export async function openRunStore(folder: string, name: string): Promise<DirectoryRunStore> {
  await mkdir(folder, { recursive: true });
  return new DirectoryRunStore(nodeDirectoryHandle(folder), name);
}
