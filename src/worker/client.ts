/**
 * The page's side of the worker protocol: typed calls that resolve with the worker's
 * return value (or reject with its error, name kept), and a stream of events.
 */
import { LabError, type Args, type CommandKind, type LabEvent, type Result, type WorkerMessage } from './protocol';

export interface WorkerLike {
  postMessage(message: unknown, transfer?: Transferable[]): void;
  addEventListener(type: 'message', listener: (ev: MessageEvent<WorkerMessage>) => void): void;
  addEventListener(type: 'error', listener: (ev: ErrorEvent) => void): void;
  terminate(): void;
}

export class LabClient {
  private nextId = 1;
  private readonly pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private readonly listeners = new Set<(e: LabEvent) => void>();

  constructor(private readonly worker: WorkerLike) {
    worker.addEventListener('message', (ev: MessageEvent<WorkerMessage>) => this.receive(ev.data));
    worker.addEventListener('error', (ev: ErrorEvent) => {
      const error = new LabError({ name: 'WorkerError', message: `The lab's worker failed to start or crashed (${ev.message || 'no details'}). Reload the page.` });
      for (const p of this.pending.values()) p.reject(error);
      this.pending.clear();
      this.dispatch({ type: 'error', context: 'gpu', error: { name: error.name, message: error.message }, runPreserved: true });
    });
  }

  /** The lab's worker, bundled by Vite as a module worker. */
  static create(): LabClient {
    return new LabClient(new Worker(new URL('./worker.ts', import.meta.url), { type: 'module', name: 'selfplay-lab' }));
  }

  call<K extends CommandKind>(kind: K, args: Args<K>, transfer: Transferable[] = []): Promise<Result<K>> {
    const id = this.nextId++;
    return new Promise<Result<K>>((resolve, reject) => {
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.worker.postMessage({ id, kind, args }, transfer);
    });
  }

  onEvent(listener: (e: LabEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  terminate(): void {
    this.worker.terminate();
  }

  private receive(m: WorkerMessage): void {
    if (m.type === 'event') {
      this.dispatch(m.event);
      return;
    }
    const p = this.pending.get(m.id);
    if (!p) return;
    this.pending.delete(m.id);
    if (m.type === 'return') p.resolve(m.result);
    else p.reject(new LabError(m.error));
  }

  private dispatch(e: LabEvent): void {
    for (const l of this.listeners) l(e);
  }
}
