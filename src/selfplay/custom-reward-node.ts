/**
 * The user's reward function in Node (the CLI and tests): a worker thread with small
 * heap limits, and inside it a fresh node:vm context (no require, no process, no
 * network) that enforces the per-call time limit itself, so an endless loop is stopped
 * without losing the thread. Anything that still hangs the thread is caught by the
 * host's timer, which terminates the thread; the next call gets a new one.
 */
import { Worker } from 'node:worker_threads';
import { BLOCKED_GLOBALS, SANDBOX_HARNESS, WorkerSandbox, type SandboxFactory, type SandboxRequest, type SandboxResponse } from './custom-reward';

const WORKER_SOURCE = String.raw`
const { parentPort, workerData } = require('node:worker_threads');
const vm = require('node:vm');
const ctx = vm.createContext(Object.create(null), { name: 'reward', codeGeneration: { strings: true, wasm: false } });
vm.runInContext('Object.defineProperty(globalThis, "__h", { value: (' + workerData.harness + ')(' + JSON.stringify(workerData.blocked) + ') })', ctx);
const compileScript = new vm.Script('__h.compile(__src)', { filename: 'reward-harness.js' });
const callScript = new vm.Script('__h.call(__q, __a)', { filename: 'reward-harness.js' });
parentPort.on('message', (m) => {
  let json;
  try {
    if (m.kind === 'compile') {
      ctx.__src = m.source;
      json = compileScript.runInContext(ctx, { timeout: m.timeoutMs });
    } else {
      ctx.__q = m.query;
      ctx.__a = m.answer;
      json = callScript.runInContext(ctx, { timeout: m.timeoutMs });
    }
    if (typeof json !== 'string') throw new Error('the sandbox harness was overwritten');
  } catch (e) {
    const timedOut = e && e.code === 'ERR_SCRIPT_EXECUTION_TIMEOUT';
    json = JSON.stringify(timedOut
      ? { ok: false, reason: 'timeout', message: 'ran longer than ' + m.timeoutMs + ' ms (an endless loop?) and was stopped' }
      : { ok: false, reason: 'crashed', message: 'the sandbox failed: ' + (e && e.message ? e.message : String(e)) });
  }
  parentPort.postMessage({ id: m.id, json });
});
`;

/** Node's sandbox factory: one worker thread per live sandbox. */
export const nodeSandbox: SandboxFactory = async (source, timeoutMs) => {
  const worker = new Worker(WORKER_SOURCE, {
    eval: true,
    workerData: { harness: SANDBOX_HARNESS, blocked: BLOCKED_GLOBALS },
    resourceLimits: { maxOldGenerationSizeMb: 128, maxYoungGenerationSizeMb: 16, stackSizeMb: 4 },
    env: {},
    stdout: true,
    stderr: true,
  });
  worker.unref();
  const sandbox = new WorkerSandbox(
    {
      post: (m: SandboxRequest) => worker.postMessage(m),
      onMessage: (l: (m: SandboxResponse) => void) => worker.on('message', l),
      onExit: (l) => {
        worker.on('error', (e: Error) => l(e.message));
        worker.on('exit', (code) => l(`exit code ${code}`));
      },
      terminate: () => void worker.terminate(),
    },
    1000,
  );
  try {
    await sandbox.compile(source, timeoutMs);
  } catch (e) {
    sandbox.terminate();
    throw e;
  }
  return sandbox;
};
