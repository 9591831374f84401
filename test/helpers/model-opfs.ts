/**
 * An in-memory stand-in for the origin private file system (the subset OpfsModelCache
 * uses), with a byte quota that makes writes fail the way Chrome's do.
 */
import type { DirectoryHandleLike, FileHandleLike, WritableLike } from '../../src/model/cache';

const notFound = (name: string): DOMException => new DOMException(`${name} not found`, 'NotFoundError');

/** Chrome's OPFS refuses these entry names with a TypeError ("Name is not allowed."). */
function nameError(name: string): TypeError | null {
  const bad = name === '' || name === '.' || name === '..' || name.includes('/') || name.includes('\\');
  return bad ? new TypeError(`Failed to execute on 'FileSystemDirectoryHandle': Name is not allowed. (${JSON.stringify(name)})`) : null;
}

export class FakeQuota {
  used = 0;
  /** files completed so far, ever */
  filesWritten = 0;
  constructor(public limit = Infinity) {}
}

export class FakeDirectory implements DirectoryHandleLike {
  readonly dirs = new Map<string, FakeDirectory>();
  readonly files = new Map<string, Uint8Array>();
  constructor(readonly quota: FakeQuota = new FakeQuota()) {}

  getDirectoryHandle(name: string, options: { create?: boolean } = {}): Promise<DirectoryHandleLike> {
    const bad = nameError(name);
    if (bad) return Promise.reject(bad);
    let d = this.dirs.get(name);
    if (!d) {
      if (!options.create) return Promise.reject(notFound(name));
      d = new FakeDirectory(this.quota);
      this.dirs.set(name, d);
    }
    return Promise.resolve(d);
  }

  getFileHandle(name: string, options: { create?: boolean } = {}): Promise<FileHandleLike> {
    const bad = nameError(name);
    if (bad) return Promise.reject(bad);
    if (!this.files.has(name)) {
      if (!options.create) return Promise.reject(notFound(name));
      this.files.set(name, new Uint8Array(0));
    }
    const files = this.files;
    const quota = this.quota;
    return Promise.resolve({
      getFile: () => Promise.resolve(new Blob([files.get(name)!.slice()])),
      createWritable: (): Promise<WritableLike> => {
        const parts: Uint8Array[] = [];
        let size = 0;
        return Promise.resolve({
          write: (data: Uint8Array) => {
            if (quota.used + size + data.length > quota.limit) return Promise.reject(new DOMException('The quota has been exceeded.', 'QuotaExceededError'));
            parts.push(data.slice());
            size += data.length;
            return Promise.resolve();
          },
          close: () => {
            const out = new Uint8Array(size);
            let at = 0;
            for (const p of parts) {
              out.set(p, at);
              at += p.length;
            }
            quota.used += size - files.get(name)!.length;
            quota.filesWritten++;
            files.set(name, out);
            return Promise.resolve();
          },
          abort: () => Promise.resolve(),
        });
      },
    });
  }

  removeEntry(name: string, options: { recursive?: boolean } = {}): Promise<void> {
    const d = this.dirs.get(name);
    if (d) {
      if (!options.recursive && (d.dirs.size || d.files.size)) return Promise.reject(new DOMException('not empty', 'InvalidModificationError'));
      this.quota.used -= d.bytes();
      this.dirs.delete(name);
      return Promise.resolve();
    }
    const f = this.files.get(name);
    if (!f) return Promise.reject(notFound(name));
    this.quota.used -= f.length;
    this.files.delete(name);
    return Promise.resolve();
  }

  async *keys(): AsyncGenerator<string> {
    for (const k of [...this.dirs.keys(), ...this.files.keys()]) yield k;
  }

  bytes(): number {
    let n = 0;
    for (const f of this.files.values()) n += f.length;
    for (const d of this.dirs.values()) n += d.bytes();
    return n;
  }
}
