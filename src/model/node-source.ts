/**
 * A model folder on the local disk as a ModelSource, for Node entry points only (tests,
 * benchmarks, the headless runner); the browser uses source.ts.
 */
import { readdir, readFile, stat } from 'node:fs/promises';
import { basename, join, resolve } from 'node:path';
import { FormatError, parseJsonInput } from '../formats/errors';
import { NodeFileSource } from '../formats/node-source';
import { checkFileName, fingerprint, type ModelFile, type ModelSource } from './source';

export class NodeDirSource implements ModelSource {
  private constructor(
    readonly dir: string,
    readonly name: string,
    readonly revision: string,
  ) {}

  /**
   * Opens a folder. The revision fingerprints the names, sizes and modification times
   * of its files, so a changed checkpoint gets a new cache entry.
   */
  static async open(dir: string, name?: string): Promise<NodeDirSource> {
    const abs = resolve(dir);
    let entries: string[];
    try {
      if (!(await stat(abs)).isDirectory()) throw new Error('not a directory');
      entries = (await readdir(abs)).sort();
    } catch (e) {
      throw new FormatError(dir, null, `is not a readable folder (${(e as Error).message})`, 'Give the path of a model folder holding config.json and the safetensors weights.');
    }
    const parts: string[] = [];
    for (const f of entries) {
      const s = await stat(join(abs, f));
      if (s.isFile()) parts.push(`${f}:${s.size}:${Math.floor(s.mtimeMs)}`);
    }
    return new NodeDirSource(abs, name ?? basename(abs), fingerprint(parts));
  }

  private path(file: string): string {
    checkFileName(this.name, file);
    return join(this.dir, file);
  }

  async has(file: string): Promise<boolean> {
    try {
      return (await stat(this.path(file))).isFile();
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return false;
      throw e;
    }
  }

  async open(file: string): Promise<ModelFile> {
    try {
      return await NodeFileSource.open(this.path(file), file);
    } catch (e) {
      throw this.missing(file, e);
    }
  }

  async readText(file: string): Promise<string> {
    let bytes: Uint8Array;
    try {
      bytes = await readFile(this.path(file));
    } catch (e) {
      throw this.missing(file, e);
    }
    try {
      return new TextDecoder('utf-8', { fatal: true }).decode(bytes);
    } catch {
      throw new FormatError(file, null, 'is not valid UTF-8 text', 'The file is damaged or incomplete: re-download it.');
    }
  }

  async readJson(file: string): Promise<unknown> {
    return parseJsonInput(await this.readText(file), file);
  }

  private missing(file: string, e: unknown): unknown {
    if (e instanceof FormatError) return e;
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') {
      return new FormatError(file, null, `is missing from ${this.dir}`, 'Download every file of the model into this folder.');
    }
    return e;
  }
}

/** Shorthand for NodeDirSource.open. */
export function openModelDir(dir: string, name?: string): Promise<NodeDirSource> {
  return NodeDirSource.open(dir, name);
}
