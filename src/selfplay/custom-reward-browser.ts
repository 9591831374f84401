/**
 * The user's reward function in the browser: a dedicated classic Worker started from a
 * Blob, which has no DOM and no page, and whose network, storage and messaging globals
 * are replaced by accessors that throw SandboxBlocked before the user's source runs.
 * The host's timer is the time limit: a call that runs past it has its Worker
 * terminated, and the next call gets a fresh one.
 */
import { BLOCKED_GLOBALS, SANDBOX_HARNESS, WorkerSandbox, type SandboxFactory, type SandboxRequest, type SandboxResponse } from './custom-reward';

const bootstrap = () => `'use strict';
const post = self.postMessage.bind(self);
const listen = self.addEventListener.bind(self);
const harness = (${SANDBOX_HARNESS})(${JSON.stringify(BLOCKED_GLOBALS)});
listen('message', (ev) => {
  const m = ev.data;
  let json;
  try {
    json = m.kind === 'compile' ? harness.compile(m.source) : harness.call(m.query, m.answer);
  } catch (e) {
    json = JSON.stringify({ ok: false, reason: 'crashed', message: 'the sandbox failed: ' + (e && e.message ? e.message : String(e)) });
  }
  post({ id: m.id, json: json });
});
`;

let url: string | null = null;

/** The browser's sandbox factory: one Worker per live sandbox (works inside the lab's own worker too). */
export const browserSandbox: SandboxFactory = async (source, timeoutMs) => {
  url ??= URL.createObjectURL(new Blob([bootstrap()], { type: 'text/javascript' }));
  const worker = new Worker(url, { name: 'selfplay-lab-reward' });
  const sandbox = new WorkerSandbox(
    {
      post: (m: SandboxRequest) => worker.postMessage(m),
      onMessage: (l: (m: SandboxResponse) => void) => worker.addEventListener('message', (ev: MessageEvent<SandboxResponse>) => l(ev.data)),
      onExit: (l) => worker.addEventListener('error', (ev: ErrorEvent) => l(ev.message || 'the reward worker failed')),
      terminate: () => worker.terminate(),
    },
    0,
  );
  try {
    await sandbox.compile(source, timeoutMs);
  } catch (e) {
    sandbox.terminate();
    throw e;
  }
  return sandbox;
};
