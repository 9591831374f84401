// The lab's page over test/ui/faults-worker.ts (the worker with fault hooks), for
// test/ui/faults.test.ts. window.__faults arms a fault, lists those that struck, and
// reads the run's checkpoint from the origin private file system as the lab saved it.
import { StrictMode } from 'react';
import { createRoot } from 'react-dom/client';
import { DirectoryRunStore } from '../../src/selfplay/store';
import { LabActions } from '../../src/ui/actions';
import { App } from '../../src/ui/App';
import { applyEvent } from '../../src/ui/bridge';
import '../../src/ui/lab.css';
import { runsDirectory, RUN_NAME } from '../../src/worker/browser-env';
import { LabClient } from '../../src/worker/client';
import type { ExportedFile } from '../../src/worker/protocol';
import type { FaultName, FaultStruck } from './faults-worker';

export interface SavedCheckpoint {
  /** The run folder's checkpoint entries: ckpt-<n> folders and latest.json (its games log is left out). */
  entries: string[];
  /** latest.json as saved. */
  latest: { folder: string; files: Record<string, number> } | null;
  /** The checkpoint's files (hex of their bytes), as DirectoryRunStore.load() reads them. */
  files: Record<string, string>;
}

export interface FaultsHandle {
  arm(fault: FaultName): void;
  struck: FaultStruck[];
  checkpoint(): Promise<SavedCheckpoint>;
  /** The live run's export (adapter, run config, metrics), hex of each file's bytes. */
  exportRun(): Promise<Record<string, string>>;
}

const hex = (b: ArrayBuffer | Uint8Array) => Array.from(b instanceof Uint8Array ? b : new Uint8Array(b), (x) => x.toString(16).padStart(2, '0')).join('');

const worker = new Worker(new URL('./faults-worker.ts', import.meta.url), { type: 'module', name: 'selfplay-lab-faults' });
const client = new LabClient(worker);
const handle: FaultsHandle = {
  arm: (fault) => worker.postMessage({ fault }),
  struck: [],
  checkpoint: async () => {
    const root = await runsDirectory();
    if (!root) throw new Error('no origin private file system');
    const entries: string[] = [];
    let latest: SavedCheckpoint['latest'] = null;
    try {
      const dir = await root.getDirectoryHandle(RUN_NAME);
      for await (const k of dir.keys()) if (/^ckpt-\d+$/.test(k) || k === 'latest.json') entries.push(k);
      latest = JSON.parse(await (await (await dir.getFileHandle('latest.json')).getFile()).text()) as SavedCheckpoint['latest'];
    } catch (e) {
      if ((e as Error).name !== 'NotFoundError') throw e;
    }
    const files = await new DirectoryRunStore(root, RUN_NAME).load();
    return { entries: entries.sort(), latest, files: Object.fromEntries([...(files ?? [])].map(([k, v]) => [k, hex(v)])) };
  },
  exportRun: async () => {
    const { files } = await client.call('exportRun', {});
    return Object.fromEntries(files.map((f: ExportedFile) => [f.name, hex(f.bytes)]));
  },
};
worker.addEventListener('message', (ev: MessageEvent) => {
  if ((ev.data as { type?: string }).type === 'fault-struck') handle.struck.push(ev.data as FaultStruck);
});
(window as unknown as { __faults: FaultsHandle }).__faults = handle;

client.onEvent((e) => applyEvent(e));
const actions = new LabActions(client);
createRoot(document.getElementById('root')!).render(
  <StrictMode>
    <App actions={actions} />
  </StrictMode>,
);
