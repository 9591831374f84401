/// <reference lib="webworker" />
// The lab's dedicated worker: it owns the GPU device, the model and the trainer; the
// page talks to it only through ./protocol.ts.
import { browserEnvironment } from './browser-env';
import { selfPlayTrainers, serveLab } from './serve';

serveLab(self as unknown as DedicatedWorkerGlobalScope, browserEnvironment(selfPlayTrainers));
