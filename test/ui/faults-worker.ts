/// <reference lib="webworker" />
/**
 * The lab's worker with fault hooks, for test/ui/faults.test.ts only (the shipped worker,
 * src/worker/worker.ts, has none). The page arms one fault with `{ fault: <name> }`; it
 * strikes once, at its phase of the next iteration, and the worker answers
 * `{ type: 'fault-struck', fault }` (which the lab's client ignores):
 *   device-lost-generation  GPUDevice.destroy() at the Challenger's first sampled token
 *   device-lost-optimizer   GPUDevice.destroy() while the AdamW step is on the GPU
 *   checkpoint-hang         a checkpoint file write stops half-way and never returns (the test reloads the page)
 *   storage-full            a checkpoint file write throws QuotaExceededError
 */
import type { Gpu } from '../../src/gpu/gpu';
import type { DirectoryHandleLike, FileHandleLike, WritableLike } from '../../src/model/cache';
import { LoraAdapter } from '../../src/model/lora';
import { DirectoryRunStore } from '../../src/selfplay/store';
import type { TrainerEvent } from '../../src/selfplay/types';
import { browserEnvironment, runsDirectory, RUN_NAME } from '../../src/worker/browser-env';
import type { LabEnvironment } from '../../src/worker/lab';
import { selfPlayTrainers, serveLab } from '../../src/worker/serve';

export type FaultName = 'device-lost-generation' | 'device-lost-optimizer' | 'checkpoint-hang' | 'storage-full';
export interface FaultStruck {
  type: 'fault-struck';
  fault: FaultName;
  detail: string;
}

const scope = self as unknown as DedicatedWorkerGlobalScope;
let armed: FaultName | null = null;
let gpu: Gpu | null = null;

/** Disarms `fault` when it is the armed one; true when it was. */
function take(fault: FaultName): boolean {
  if (armed !== fault) return false;
  armed = null;
  return true;
}

function struck(fault: FaultName, detail: string): void {
  scope.postMessage({ type: 'fault-struck', fault, detail } satisfies FaultStruck);
}

function loseDevice(fault: FaultName, detail: string): void {
  if (!gpu) throw new Error(`fault ${fault}: no GPU device to lose`);
  gpu.device.destroy();
  struck(fault, detail);
}

// The Challenger's first token: generation has begun and more tokens follow.
const watch = (onEvent?: (e: TrainerEvent) => void) => (e: TrainerEvent) => {
  onEvent?.(e);
  if (e.type === 'token' && e.role === 'challenger' && take('device-lost-generation')) loseDevice('device-lost-generation', `iteration ${e.iteration}, challenger token`);
};

// The AdamW dispatches are encoded and submitted by read(); the device goes before they are read back.
const step = LoraAdapter.prototype.step;
LoraAdapter.prototype.step = function (this: LoraAdapter, opts) {
  const report = step.call(this, opts);
  if (!take('device-lost-optimizer')) return report;
  return {
    ...report,
    read: () => {
      const read = report.read();
      loseDevice('device-lost-optimizer', `AdamW step ${report.step}`);
      return read;
    },
  };
};

/** Writes of checkpoint files (ckpt-<n>/<file>) in the run's folder, where a fault can strike. */
function faultyWritable(w: WritableLike, path: string): WritableLike {
  return {
    write: async (data) => {
      if (path.endsWith('/adapter_model.safetensors') && take('checkpoint-hang')) {
        await w.write(data.subarray(0, data.length >> 1));
        struck('checkpoint-hang', path);
        return new Promise<void>(() => undefined);
      }
      if (path.endsWith('/optimizer.safetensors') && take('storage-full')) {
        struck('storage-full', path);
        throw new DOMException('The quota has been exceeded.', 'QuotaExceededError');
      }
      return w.write(data);
    },
    close: () => w.close(),
    abort: (reason) => w.abort(reason),
  };
}

function faultyDirectory(dir: DirectoryHandleLike, path: string): DirectoryHandleLike {
  return {
    getDirectoryHandle: async (name, options) => faultyDirectory(await dir.getDirectoryHandle(name, options), `${path}/${name}`),
    getFileHandle: async (name, options) => {
      const file: FileHandleLike = await dir.getFileHandle(name, options);
      return { getFile: () => file.getFile(), createWritable: async () => faultyWritable(await file.createWritable(), `${path}/${name}`) };
    },
    // A removal that fails is reported (the store tries again): the test prints these.
    removeEntry: (name, options) =>
      dir.removeEntry(name, options).catch((e: unknown) => {
        if ((e as Error)?.name !== 'NotFoundError') console.warn(`removeEntry ${path}/${name} failed: ${(e as Error)?.name}: ${(e as Error)?.message}`);
        throw e;
      }),
    keys: () => dir.keys(),
  };
}

const base = browserEnvironment(selfPlayTrainers);
const env: LabEnvironment = {
  ...base,
  acquireGpu: async () => (gpu = await base.acquireGpu()),
  runStore: async () => {
    const dir = await runsDirectory();
    if (!dir) throw new Error('the fault tests need the origin private file system');
    return new DirectoryRunStore(faultyDirectory(dir, ''), RUN_NAME);
  },
  trainers: {
    start: (models, config, opts) => base.trainers.start(models, config, { ...opts, onEvent: watch(opts.onEvent) }),
    resume: (models, store, opts) => base.trainers.resume(models, store, { ...opts, onEvent: watch(opts.onEvent) }),
  },
};

serveLab(scope, env);
const serve = scope.onmessage!;
scope.onmessage = (ev: MessageEvent) => {
  const fault = (ev.data as { fault?: FaultName }).fault;
  if (fault) armed = fault;
  else void serve.call(scope, ev);
};
