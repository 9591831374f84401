/**
 * The page's actions over a real LabClient and a stand-in worker whose replies the test
 * sends in any order: the model picker's summary is the latest pick's, whichever
 * worker reply comes last.
 */
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { beforeEach, describe, expect, it } from 'vitest';
import { parseLlamaConfig } from '../../src/formats/llama-config';
import { LabActions } from '../../src/ui/actions';
import { initialState, useLab } from '../../src/ui/store';
import { LabClient, type WorkerLike } from '../../src/worker/client';
import { planFor } from '../../src/worker/models';
import type { ModelSummary, PlanSettings, WorkerMessage } from '../../src/worker/protocol';

/** A worker that keeps each posted request until the test answers it. */
class HeldWorker implements WorkerLike {
  readonly posted: { id: number; kind: string }[] = [];
  private listener: ((ev: MessageEvent<WorkerMessage>) => void) | null = null;

  postMessage(message: unknown): void {
    const m = message as { id: number; kind: string };
    this.posted.push({ id: m.id, kind: m.kind });
  }
  addEventListener(type: 'message' | 'error', listener: ((ev: MessageEvent<WorkerMessage>) => void) | ((ev: ErrorEvent) => void)): void {
    if (type === 'message') this.listener = listener as (ev: MessageEvent<WorkerMessage>) => void;
  }
  terminate(): void {}

  answer(id: number, reply: { result: unknown } | { error: string }): void {
    const data: WorkerMessage = 'result' in reply ? { type: 'return', id, result: reply.result } : { type: 'throw', id, error: { name: 'FormatError', message: reply.error } };
    this.listener!(new MessageEvent('message', { data }));
  }
}

const TINY = parseLlamaConfig(JSON.parse(readFileSync(resolve(process.cwd(), 'models/tiny-llama/config.json'), 'utf8')), 'config.json');

function summary(label: string): ModelSummary {
  const settings: PlanSettings = { format: 'f32', loraRank: 4, loraTargets: ['q_proj'], groupSize: 2, maxPromptTokens: 64, maxNewTokens: 8, trainTokensPerStep: 144 };
  const plan = planFor(TINY, settings, { maxBufferSize: 1 << 30, maxStorageBufferBindingSize: 1 << 30 });
  return { label, architecture: TINY.architecture, layers: TINY.numLayers, hiddenSize: TINY.hiddenSize, vocabSize: TINY.vocabSize, parameters: 1, downloadBytes: 1, plan, planLines: [] };
}

describe('the model picker\'s summary', () => {
  beforeEach(() => useLab.setState(initialState, true));

  it('is the latest pick\'s when an earlier pick answers after it (a reply or an error)', async () => {
    const worker = new HeldWorker();
    const actions = new LabActions(new LabClient(worker));
    const first = actions.planModel({ kind: 'served', folder: 'micro-arith' }, undefined);
    const second = actions.planModel({ kind: 'served', folder: 'tiny-llama' }, undefined);
    const [a, b] = worker.posted;
    expect([a?.kind, b?.kind]).toEqual(['planModel', 'planModel']);
    worker.answer(b!.id, { result: summary('models/tiny-llama') });
    await second;
    worker.answer(a!.id, { result: summary('models/micro-arith') });
    await first;
    expect(useLab.getState().summary?.label).toBe('models/tiny-llama');

    const third = actions.planModel({ kind: 'served', folder: 'micro-arith' }, undefined);
    const fourth = actions.planModel({ kind: 'served', folder: 'tiny-llama' }, undefined);
    const [c, d] = worker.posted.slice(2);
    worker.answer(d!.id, { result: summary('models/tiny-llama') });
    await fourth;
    worker.answer(c!.id, { error: 'config.json: not found (HTTP 404)' });
    await third;
    expect(useLab.getState()).toMatchObject({ summary: { label: 'models/tiny-llama' }, summaryError: null });
  });
});
