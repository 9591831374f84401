/// <reference lib="webworker" />
// The worker's side of the protocol: a Lab over `env`, answering each request and posting its events.
import { SelfPlayTrainer } from '../selfplay/trainer';
import { Lab, type LabEnvironment, type TrainerFactory } from './lab';
import { errorInfo, type LabEvent, type Request, type WorkerMessage } from './protocol';

/** The trainer the lab runs (src/selfplay/trainer.ts). */
export const selfPlayTrainers: TrainerFactory = {
  start: async (models, config, opts) => SelfPlayTrainer.start(models, config, opts),
  resume: (models, store, opts) => SelfPlayTrainer.resume(models, store, opts),
};

export function serveLab(scope: DedicatedWorkerGlobalScope, env: LabEnvironment): Lab {
  const post = (m: WorkerMessage, transfer: Transferable[] = []) => scope.postMessage(m, transfer);
  const lab = new Lab(env, (event: LabEvent) => post({ type: 'event', event }));
  scope.onmessage = async (ev: MessageEvent<Request>) => {
    const { id, kind, args } = ev.data;
    try {
      const result = await lab.handle(kind, args);
      post({ type: 'return', id, result }, transferables(result));
    } catch (e) {
      post({ type: 'throw', id, error: errorInfo(e) });
    }
  };
  return lab;
}

/** Exported files' bytes move to the page instead of being copied. */
function transferables(result: unknown): Transferable[] {
  const files = (result as { files?: { bytes?: unknown }[] } | null)?.files;
  return Array.isArray(files) ? files.map((f) => f.bytes).filter((b): b is ArrayBuffer => b instanceof ArrayBuffer) : [];
}
