/**
 * A local file as a ByteSource, for Node entry points only (tests, benchmarks,
 * the headless runner); the browser uses BlobSource.
 */
import { open, type FileHandle } from 'node:fs/promises';
import { basename } from 'node:path';
import { FormatError, HINT_REDOWNLOAD } from './errors';
import type { ByteSource } from './safetensors';

export class NodeFileSource implements ByteSource {
  private constructor(
    private readonly handle: FileHandle,
    readonly name: string,
    readonly size: number,
  ) {}

  static async open(path: string, name = basename(path)): Promise<NodeFileSource> {
    const handle = await open(path, 'r');
    const { size } = await handle.stat();
    return new NodeFileSource(handle, name, size);
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new RangeError(`${this.name}: read of ${length} bytes at ${offset} is outside the file (${this.size} bytes)`);
    }
    const out = new Uint8Array(length);
    let done = 0;
    while (done < length) {
      const { bytesRead } = await this.handle.read(out, done, length - done, offset + done);
      if (bytesRead === 0) {
        throw new FormatError(this.name, null, `ended after ${offset + done} bytes while reading ${length} at ${offset}`, HINT_REDOWNLOAD);
      }
      done += bytesRead;
    }
    return out;
  }

  close(): Promise<void> {
    return this.handle.close();
  }
}
