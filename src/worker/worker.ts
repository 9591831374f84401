/// <reference lib="webworker" />
// The lab's dedicated worker: it owns the GPU device, the model and the trainer; the
// page talks to it only through ./protocol.ts.
import { SelfPlayTrainer } from '../selfplay/trainer';
import { browserEnvironment } from './browser-env';
import { Lab } from './lab';
import { errorInfo, type LabEvent, type Request, type WorkerMessage } from './protocol';

const scope = self as unknown as DedicatedWorkerGlobalScope;
const post = (m: WorkerMessage, transfer: Transferable[] = []) => scope.postMessage(m, transfer);

const lab = new Lab(
  browserEnvironment({
    start: async (models, config, opts) => SelfPlayTrainer.start(models, config, opts),
    resume: (models, store, opts) => SelfPlayTrainer.resume(models, store, opts),
  }),
  (event: LabEvent) => post({ type: 'event', event }),
);

scope.onmessage = async (ev: MessageEvent<Request>) => {
  const { id, kind, args } = ev.data;
  try {
    const result = await lab.handle(kind, args);
    post({ type: 'return', id, result }, transferables(result));
  } catch (e) {
    post({ type: 'throw', id, error: errorInfo(e) });
  }
};

/** Exported files' bytes move to the page instead of being copied. */
function transferables(result: unknown): Transferable[] {
  const files = (result as { files?: { bytes?: unknown }[] } | null)?.files;
  return Array.isArray(files) ? files.map((f) => f.bytes).filter((b): b is ArrayBuffer => b instanceof ArrayBuffer) : [];
}
