import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { openRunStore } from '../../src/selfplay/node-store';
import { DirectoryRunStore, MemoryRunStore, RunStoreError } from '../../src/selfplay/store';
import type { RunFiles } from '../../src/selfplay/types';
import { FakeDirectory, FakeQuota } from '../helpers/model-opfs';

const files = (tag: number, size = 100): RunFiles =>
  new Map([
    ['trainer_state.json', new TextEncoder().encode(JSON.stringify({ tag }))],
    ['adapter_model.safetensors', new Uint8Array(size).map((_, i) => (i * 7 + tag) & 255)],
  ]);

const tmp: string[] = [];
afterAll(async () => {
  for (const d of tmp) await rm(d, { recursive: true, force: true });
});

describe('run stores', () => {
  it('memory store keeps copies', async () => {
    const s = new MemoryRunStore();
    expect(await s.load()).toBeNull();
    const f = files(1);
    await s.save(f);
    f.get('adapter_model.safetensors')![0] = 255;
    expect((await s.load())!.get('adapter_model.safetensors')![0]).toBe(1);
    await s.clear();
    expect(await s.load()).toBeNull();
  });

  it('directory store: latest checkpoint wins, older folders are removed', async () => {
    const root = new FakeDirectory();
    const s = new DirectoryRunStore(root, 'run-a');
    expect(await s.load()).toBeNull();
    await s.save(files(1));
    await s.save(files(2));
    expect(await s.load()).toEqual(files(2));
    const dir = root.dirs.get('run-a')!;
    expect([...dir.dirs.keys()]).toEqual(['ckpt-1']);
    // another run in the same root is independent
    const other = new DirectoryRunStore(root, 'run-b');
    expect(await other.load()).toBeNull();
    await s.clear();
    expect(await s.load()).toBeNull();
  });

  it('a save that runs out of storage keeps the previous checkpoint loadable', async () => {
    const quota = new FakeQuota(2000);
    const root = new FakeDirectory(quota);
    const s = new DirectoryRunStore(root, 'run');
    await s.save(files(1, 500));
    const err = await s.save(files(2, 5000)).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(RunStoreError);
    expect((err as Error).message).toMatch(/storage is full.*previous checkpoint \(ckpt-0\) is intact/);
    expect(await s.load()).toEqual(files(1, 500));
    expect([...root.dirs.get('run')!.dirs.keys()]).toEqual(['ckpt-0']); // the partial folder is gone
  });

  it('rejects run names that are not plain file names', () => {
    expect(() => new DirectoryRunStore(new FakeDirectory(), '../x')).toThrow(/run name/);
    expect(() => new DirectoryRunStore(new FakeDirectory(), '')).toThrow(/run name/);
  });

  it('node folder store: round trip, resume from a new handle, no temporary files left', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'runstore-'));
    tmp.push(dir);
    const s = await openRunStore(dir, 'run');
    await s.save(files(3));
    await s.save(files(4));
    const again = await openRunStore(dir, 'run');
    expect(await again.load()).toEqual(files(4));
    const entries = await readdir(join(dir, 'run'));
    expect(entries.sort()).toEqual(['ckpt-1', 'latest.json']);
    expect(await readdir(join(dir, 'run', 'ckpt-1'))).toHaveLength(2);
  });

  it('a damaged checkpoint is reported, not loaded', async () => {
    const root = new FakeDirectory();
    const s = new DirectoryRunStore(root, 'run');
    await s.save(files(5));
    root.dirs.get('run')!.dirs.get('ckpt-0')!.files.set('adapter_model.safetensors', new Uint8Array(10));
    await expect(s.load()).rejects.toThrow(/has 10 bytes, expected 100; the checkpoint is damaged/);
  });
});
