/**
 * The worker's Lab in Node: the real GPU runtime (Dawn), loader and model cache, the
 * models/ folder served by the lab's own Vite config, and a scripted trainer whose
 * steps the test releases one at a time. Checks the run state machine (start, pause
 * after the iteration in flight, step, resume, reset), errors that keep the run, the
 * saved run picked up by a fresh Lab (a page reload), and device loss.
 */
import { readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { createServer, type ViteDevServer } from 'vite';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import type { Gpu } from '../../src/gpu/gpu';
import { acquireNodeGpu } from '../../src/gpu/node';
import { MemoryModelCache } from '../../src/model/cache';
import type { TrainerConfig } from '../../src/selfplay/config';
import { MemoryRunStore } from '../../src/selfplay/store';
import { LoraAdapter, type PeftInput } from '../../src/model/lora';
import type { EvaluationResult, IterationMetrics, RunFiles, TrainerEvent } from '../../src/selfplay/types';
import { Lab, type LabEnvironment, type Trainer, type TrainerFactory, type TrainerModels } from '../../src/worker/lab';
import type { LabEvent, PlanSettings, SavedRunInfo } from '../../src/worker/protocol';
import { DEFAULT_CUSTOM_REWARD, type RewardHook } from '../../src/selfplay/custom-reward';
import { nodeSandbox } from '../../src/selfplay/custom-reward-node';
import { syntheticModel, TINY_DIR } from '../helpers/model-files';

/** A trainer whose every step waits until the test calls release(); a step can be told to fail. */
class ScriptedTrainer implements Trainer {
  iteration = 0;
  exam?: { question: string; answer: number }[] | null;
  history: IterationMetrics[] = [];
  games = [];
  onEvent: (e: TrainerEvent) => void;
  failNext: Error | null = null;
  customReward: RewardHook | null = null;
  lora?: LoraAdapter;
  private gates: (() => void)[] = [];
  private waiting: ((n: number) => void) | null = null;

  constructor(
    readonly config: TrainerConfig,
    onEvent?: (e: TrainerEvent) => void,
  ) {
    this.onEvent = onEvent ?? (() => undefined);
  }

  /** Waits until a step is under way, then lets it finish. */
  async finishStep(): Promise<void> {
    while (this.gates.length === 0) await new Promise<number>((r) => (this.waiting = r));
    this.gates.shift()!();
    await new Promise((r) => setTimeout(r, 5));
  }

  /** Waits until a step is under way (without finishing it). */
  async inFlight(): Promise<void> {
    while (this.gates.length === 0) await new Promise<number>((r) => (this.waiting = r));
  }

  async step(opts: { signal?: AbortSignal } = {}): Promise<IterationMetrics> {
    await new Promise<void>((r, reject) => {
      const gate = () => r();
      this.gates.push(gate);
      this.waiting?.(this.gates.length);
      // Stop now: the scripted step ends at once with the abort's reason, as the real trainer does within one decode step.
      opts.signal?.addEventListener('abort', () => {
        this.gates = this.gates.filter((g) => g !== gate);
        reject(opts.signal!.reason);
      });
    });
    if (this.failNext) {
      const e = this.failNext;
      this.failNext = null;
      throw e;
    }
    const metrics: IterationMetrics = { iteration: this.iteration, time: Date.now(), values: { reward: this.iteration } };
    if (this.customReward) metrics.values['reward/custom_fallback_count'] = (await this.customReward.score(['q'], [['ok', 'loop', 'throw']])).fallbacks;
    this.history.push(metrics);
    this.iteration++;
    this.onEvent({ type: 'iteration', metrics });
    this.onEvent({ type: 'checkpoint', iteration: this.iteration, bytes: 10 });
    return metrics;
  }
  checkpoint(): Promise<void> {
    return Promise.resolve();
  }
  exportFiles(): Promise<RunFiles> {
    return Promise.resolve(new Map([['metrics.json', new TextEncoder().encode(JSON.stringify(this.history))]]));
  }
  imported: PeftInput[] = [];
  importAdapter(files: PeftInput): void {
    this.imported.push(files);
  }
  evaluate(opts?: { instructions?: string[]; maxTokens?: number }): Promise<EvaluationResult> {
    const result: EvaluationResult = { iteration: this.iteration, judge: 'reference', winRate: 0.75, wins: 1, ties: 1, losses: 0, unparsed: 0, items: [] };
    this.onEvent({ type: 'evaluation', result: { ...result, unparsed: opts?.maxTokens ?? -1 } });
    return Promise.resolve(result);
  }
  release(): void {}
}

describe('the lab worker (Node, Dawn, tiny model served by the lab\'s Vite config)', () => {
  let server: ViteDevServer;
  let gpu: Gpu;
  const cache = new MemoryModelCache();
  const store = new MemoryRunStore('current');
  let meta: SavedRunInfo | null = null;
  const trainers: ScriptedTrainer[] = [];
  const resumed: number[] = [];
  let startedWith: TrainerModels | null = null;
  let acquired = 0;
  const factory: TrainerFactory = {
    start: async (models, config, opts) => {
      if (config.seed === 13) throw new Error('the scripted trainer refuses seed 13');
      startedWith = models;
      const t = new ScriptedTrainer(config, opts.onEvent);
      trainers.push(t);
      return t;
    },
    resume: async (_models, s, opts) => {
      const files = await s.load();
      if (!files) return null;
      const t = new ScriptedTrainer(meta!.config, opts.onEvent);
      t.iteration = meta!.iteration;
      resumed.push(t.iteration);
      trainers.push(t);
      return t;
    },
  };
  const env = (): LabEnvironment => ({
    acquireGpu: () => (acquired++, Promise.resolve(gpu)),
    modelCache: () => Promise.resolve(cache),
    runStore: () => Promise.resolve(store),
    runMeta: {
      load: () => Promise.resolve(meta),
      save: (info) => Promise.resolve(void (meta = info)),
      clear: () => Promise.resolve(void (meta = null)),
    },
    trainers: factory,
    rewardSandbox: nodeSandbox,
  });

  beforeAll(async () => {
    server = await createServer({ root: process.cwd(), configFile: resolve(process.cwd(), 'vite.config.ts'), logLevel: 'error', server: { host: '127.0.0.1', port: 0 } });
    await server.listen();
    // servedModelSource resolves /models/<folder> against the page's origin.
    (globalThis as { location?: unknown }).location = new URL(server.resolvedUrls!.local[0]!);
    gpu = await acquireNodeGpu();
  });
  afterAll(async () => {
    delete (globalThis as { location?: unknown }).location;
    await server?.close();
  });

  const make = () => {
    const events: LabEvent[] = [];
    return { lab: new Lab(env(), (e) => events.push(e)), events };
  };
  const states = (events: LabEvent[]) => events.filter((e) => e.type === 'run-state').map((e) => (e as { state: string }).state);
  const trainer = () => trainers.at(-1)!;

  it('loads a served model with progress, memory plan and the cache; runs, pauses after the iteration in flight, steps, exports', async () => {
    const { lab, events } = make();
    const [check, twice] = await Promise.all([lab.handle('check', {}), lab.handle('check', {})]);
    expect(acquired).toBe(1);
    expect(twice.capabilities).toBe(check.capabilities);
    expect(check.capabilities.error).toBeNull();
    expect(check.capabilities.caps?.adapterName).toBe(gpu.caps.adapterName);
    expect(check.savedRun).toBeNull();

    const plan = await lab.handle('planModel', {
      model: { kind: 'served', folder: 'tiny-llama' },
      settings: { format: 'f32', loraRank: 4, loraTargets: ['q_proj'], groupSize: 2, maxPromptTokens: 64, maxNewTokens: 8, trainTokensPerStep: 144 },
    });
    expect(plan).toMatchObject({ label: 'models/tiny-llama', layers: 2, hiddenSize: 64, vocabSize: 128256, architecture: 'LlamaForCausalLM' });
    expect(plan.parameters).toBe(128256 * 64 + 2 * (64 * 2 + 64 * 64 * 2 + 32 * 64 * 2 + 160 * 64 * 3) + 64);
    expect(plan.plan.trainTokensPerStep).toBe(144);
    expect(plan.plan.total).toBeGreaterThan(plan.plan.weights);

    const info = await lab.handle('loadModel', { model: { kind: 'served', folder: 'tiny-llama' }, format: 'f32', useCache: true });
    expect(info).toMatchObject({ label: 'models/tiny-llama', format: 'f32', fromCache: false, layers: 2, hasChatTemplate: true, cacheNote: null });
    const progress = events.filter((e) => e.type === 'load-progress' && e.phase === 'weights');
    expect(progress.length).toBeGreaterThan(0);
    const last = progress.at(-1) as Extract<LabEvent, { type: 'load-progress' }>;
    expect(last.bytesDone).toBe(last.bytesTotal);
    expect(last.bytesTotal).toBeGreaterThan(8e6);
    expect(events.some((e) => e.type === 'memory-plan')).toBe(true);
    expect((await lab.handle('listCached', {})).map((c) => c.source)).toEqual(['models/tiny-llama']);
    const again = await lab.handle('loadModel', { model: { kind: 'served', folder: 'tiny-llama' }, format: 'f32', useCache: true });
    expect(again.fromCache).toBe(true);
    expect(events.some((e) => e.type === 'load-progress' && e.phase === 'cache-read')).toBe(true);
    // A load first drops the model loaded before it, and says so (the page stops showing it even if the load then fails).
    expect(events.filter((e) => e.type === 'model-unloaded')).toEqual([{ type: 'model-unloaded', reason: 'models/tiny-llama was unloaded to load models/tiny-llama.' }]);

    // Start: steps keep coming until pause; pause lets the step in flight finish.
    await lab.handle('start', { config: { world: 'arithmetic', mode: 'lsp-zero', queriesPerIteration: 2, groupSize: 2 } });
    const t = trainer();
    expect(t.config.world).toBe('arithmetic');
    await t.finishStep();
    await t.finishStep();
    const paused = lab.handle('pause', {});
    expect(states(events).at(-1)).toBe('pausing');
    await t.finishStep();
    expect(await paused).toEqual({ iteration: 3 });
    expect(states(events).slice(-2)).toEqual(['pausing', 'paused']);
    const stepping = lab.handle('step', {});
    await t.finishStep();
    expect(await stepping).toEqual({ iteration: 4 });
    expect(states(events).slice(-2)).toEqual(['running', 'paused']);
    expect(meta?.iteration).toBe(4);
    expect(meta?.model).toEqual({ kind: 'served', folder: 'tiny-llama' });

    const exported = await lab.handle('exportRun', {});
    expect(exported.files.map((f) => f.name)).toEqual(['metrics.json', 'completions.jsonl', 'metrics.csv']);
    expect(JSON.parse(new TextDecoder().decode(exported.files[0]!.bytes))).toHaveLength(4);
    const csv = new TextDecoder().decode(exported.files[2]!.bytes).trimEnd().split('\n');
    expect(csv[0]).toBe('step,time,reward');
    expect(csv.slice(1).map((l) => l.split(',')[2])).toEqual(['0', '1', '2', '3']);

    expect(await lab.handle('evaluate', { maxTokens: 16 })).toMatchObject({ iteration: 4, winRate: 0.75 });
    expect(events.find((e) => e.type === 'evaluation')).toMatchObject({ result: { unparsed: 16 } });
    const enc = (s: string) => new TextEncoder().encode(s).buffer as ArrayBuffer;
    const run = await lab.handle('importAdapter', {
      files: [
        { name: 'adapter_config.json', bytes: enc('{"r": 4}') },
        { name: 'adapter_model.safetensors', bytes: enc('weights') },
      ],
    });
    expect(run.iteration).toBe(4);
    expect(t.imported.map((f) => [new TextDecoder().decode(f['adapter_config.json'] as Uint8Array), new TextDecoder().decode(f['adapter_model.safetensors'])])).toEqual([['{"r": 4}', 'weights']]);
  });

  it('plans a cached model from its cached config, with no network read; an uncached format is planned from the source', async () => {
    const { lab } = make();
    await lab.handle('check', {});
    const tiny = { kind: 'served', folder: 'tiny-llama' } as const;
    await lab.handle('loadModel', { model: tiny, format: 'f32', useCache: true });
    const settings: PlanSettings = { format: 'f32', loraRank: 4, loraTargets: ['q_proj'], groupSize: 2, maxPromptTokens: 64, maxNewTokens: 8, trainTokensPerStep: 144 };
    const reads: string[] = [];
    const realFetch = globalThis.fetch;
    const spy = vi.spyOn(globalThis, 'fetch').mockImplementation((input, init) => {
      reads.push(String(input instanceof Request ? input.url : input));
      return realFetch(input, init);
    });
    try {
      const cached = await lab.handle('planModel', { model: tiny, settings });
      expect(cached).toMatchObject({ label: 'models/tiny-llama', layers: 2, hiddenSize: 64, vocabSize: 128256 });
      expect(reads).toEqual([]);
      // No 4-bit copy of this model is cached: its config comes from the served folder.
      const q4 = await lab.handle('planModel', { model: tiny, settings: { ...settings, format: 'q4' } });
      expect(q4.layers).toBe(2);
      expect(reads.some((u) => u.endsWith('/models/tiny-llama/config.json'))).toBe(true);
    } finally {
      spy.mockRestore();
    }
  });

  it("hands the model folder's exam.json to the run (the quick demo's micro model); a folder without one gives none", async () => {
    const { lab } = make();
    await lab.handle('check', {});
    const micro = await lab.handle('loadModel', { model: { kind: 'served', folder: 'micro-arith' }, format: 'f32', useCache: false });
    const exam = JSON.parse(readFileSync(join('models', 'micro-arith', 'exam.json'), 'utf8')) as { problems: { question: string; answer: number }[] };
    expect(micro.examProblems).toBe(exam.problems.length);
    await lab.handle('start', { config: { world: 'freeform-arithmetic', mode: 'lsp-zero', arithmeticMaxOperand: 99, examEvery: 5 } });
    expect(trainer().exam).toEqual(exam.problems);
    const paused = lab.handle('pause', {});
    await trainer().finishStep();
    await paused;
    const tiny = await lab.handle('loadModel', { model: { kind: 'served', folder: 'tiny-llama' }, format: 'f32', useCache: true });
    expect(tiny.examProblems).toBe(0);
    await lab.handle('start', { config: { world: 'arithmetic', mode: 'lsp-zero' } });
    expect(trainer().exam).toBeNull();
    const pausedAgain = lab.handle('pause', {});
    await trainer().finishStep();
    await pausedAgain;
  });

  it('reports a failed step (storage full) with the run kept, and refuses a bad adapter with the file named', async () => {
    const { lab, events } = make();
    await lab.handle('check', {});
    await lab.handle('loadModel', { model: { kind: 'served', folder: 'tiny-llama' }, format: 'f32', useCache: true });
    // A reward model: a causal LM is refused by name; a sequence classifier (dropped files) loads beside the policy.
    await expect(lab.handle('loadRewardModel', { model: { kind: 'served', folder: 'tiny-llama' }, format: 'f32', useCache: false })).rejects.toThrow(
      /models\/tiny-llama is a LlamaForCausalLM, not a reward model/,
    );
    const rm = syntheticModel({ architecture: 'LlamaForSequenceClassification', vocab: 128256, hidden: 64, layers: 1 });
    const rmFiles = Object.entries({ ...rm.files, 'tokenizer.json': readFileSync(join(TINY_DIR, 'tokenizer.json')), 'tokenizer_config.json': readFileSync(join(TINY_DIR, 'tokenizer_config.json')) }).map(
      ([path, data]) => ({ path, file: new File([data as BlobPart], path) }),
    );
    const rmInfo = await lab.handle('loadRewardModel', { model: { kind: 'files', name: 'tiny-rm', files: rmFiles }, format: 'f32', useCache: true });
    expect(rmInfo).toMatchObject({ label: 'tiny-rm', layers: 1, fromCache: false });
    expect(events.filter((e) => e.type === 'reward-model').map((e) => (e as { info: { label: string } | null }).info?.label)).toEqual(['tiny-rm']);

    await lab.handle('start', { config: { world: 'arithmetic', queriesPerIteration: 2, groupSize: 2, rewards: { rewardModel: { enabled: true, weight: 0.5 } } } });
    expect(startedWith!.rewardModel?.model.weights.score).toBeTruthy();
    expect(meta?.rewardModel).toEqual({ model: { kind: 'files', name: 'tiny-rm', revision: expect.any(String) }, format: 'f32' });
    await expect(lab.handle('unloadRewardModel', {})).rejects.toThrow(/reset the run/);
    const t = trainer();
    await t.finishStep();
    t.failNext = new Error('Storage full: the checkpoint needs 5 MB; the previous checkpoint is kept');
    await t.finishStep();
    const err = events.find((e) => e.type === 'error') as Extract<LabEvent, { type: 'error' }>;
    expect(err).toMatchObject({ context: 'storage', runPreserved: true, error: { message: expect.stringContaining('Storage full') } });
    expect(states(events).at(-1)).toBe('paused');
    expect((await lab.handle('exportRun', {})).files).toHaveLength(3);
    // A new run that cannot start leaves the current one (and its checkpoint) in place.
    const before = trainers.length;
    await expect(lab.handle('start', { config: { seed: 13 } })).rejects.toThrow(/refuses seed 13/);
    expect(trainers.length).toBe(before);
    expect(JSON.parse(new TextDecoder().decode((await lab.handle('exportRun', {})).files[0]!.bytes))).toHaveLength(1);
    expect(events.filter((e) => e.type === 'run-reset')).toHaveLength(1);

    await expect(lab.handle('importAdapter', { files: [{ name: 'adapter_config.json', bytes: new TextEncoder().encode('{}').buffer as ArrayBuffer }] })).rejects.toThrow(
      /adapter_model\.safetensors: was not among the picked files/,
    );
    await expect(lab.handle('updateSettings', { config: { groupSize: 0 } })).rejects.toMatchObject({ name: 'ConfigError', field: 'groupSize' });
  });

  it('a fresh lab (a page reload) finds the saved run and resumes it with the model from the cache', async () => {
    expect(meta?.iteration).toBe(1);
    const { lab, events } = make();
    const check = await lab.handle('check', {});
    expect(check.savedRun).toMatchObject({ modelLabel: 'models/tiny-llama', format: 'f32', iteration: 1 });
    // No checkpoint files yet in the scripted store: the trainer has nothing to resume from.
    await expect(lab.handle('resumeSaved', {})).rejects.toThrow(/no checkpoint/);
    await store.save(new Map([['trainer_state.json', new Uint8Array([1])]]));
    const run = await lab.handle('resumeSaved', {});
    expect(run.iteration).toBe(1);
    expect(resumed).toEqual([1]);
    expect(events.some((e) => e.type === 'model-loaded' && e.info.fromCache)).toBe(true);
    // The reward model came from dropped files: it is found again in the cache without them.
    expect(events.some((e) => e.type === 'reward-model' && e.info?.label === 'tiny-rm' && e.info.fromCache)).toBe(true);
    await lab.handle('resetRun', {});
    expect(meta).toBeNull();
    expect(await store.load()).toBeNull();
    expect(events.at(-1)).toEqual({ type: 'saved-run', info: null });
  });

  it("the user's reward: a bad source is refused with the reason, a loop or a throw is a named and counted fallback, the reward is saved with the run", async () => {
    const { lab, events } = make();
    await lab.handle('check', {});
    await expect(lab.handle('setCustomReward', { spec: { ...DEFAULT_CUSTOM_REWARD, source: 'function reward(q, a) {' } })).rejects.toThrow(/does not load: SyntaxError/);
    const looped = await lab.handle('tryCustomReward', { spec: { ...DEFAULT_CUSTOM_REWARD, source: '(q, a) => { for (;;) {} }', timeoutMs: 50 }, query: 'q', answer: 'a' });
    expect(looped).toMatchObject({ ok: false, reason: 'timeout' });
    expect(await lab.handle('tryCustomReward', { spec: { ...DEFAULT_CUSTOM_REWARD, source: '(q, a) => a.length' }, query: 'q', answer: 'abc' })).toEqual({ ok: true, value: 3 });
    await lab.handle('loadModel', { model: { kind: 'served', folder: 'tiny-llama' }, format: 'f32', useCache: true });
    const source = "(q, a) => { if (a === 'loop') for (;;) {} if (a === 'throw') throw new RangeError('no'); return 1; }";
    expect(await lab.handle('setCustomReward', { spec: { ...DEFAULT_CUSTOM_REWARD, source, timeoutMs: 50 } })).toEqual({ name: 'custom' });
    const before = trainers.length;
    const stepping = lab.handle('step', { config: { world: 'arithmetic', mode: 'lsp-zero', queriesPerIteration: 1, groupSize: 3 } });
    while (trainers.length === before) await new Promise((r) => setTimeout(r, 5));
    await trainer().finishStep();
    await stepping;
    expect(trainer().history.at(-1)!.values['reward/custom_fallback_count']).toBe(2);
    const note = events.find((e) => e.type === 'custom-reward') as Extract<LabEvent, { type: 'custom-reward' }>;
    expect(note.fallbacks).toBe(2);
    expect(note.message).toContain('1 timed out, 1 threw');
    expect(meta?.customReward?.source).toBe(source);
    expect(await lab.handle('setCustomReward', { spec: null })).toEqual({ name: null });
    expect(trainer().customReward).toBeNull();
    await lab.handle('resetRun', {});
  });

  it('Stop now discards the iteration in flight and leaves the run paused after its last finished iteration; Pause keeps its meaning', async () => {
    const { lab, events } = make();
    await lab.handle('check', {});
    await lab.handle('loadModel', { model: { kind: 'served', folder: 'tiny-llama' }, format: 'f32', useCache: true });
    await lab.handle('start', { config: { world: 'arithmetic', mode: 'lsp-zero', queriesPerIteration: 1, groupSize: 2 } });
    const t = trainer();
    await t.finishStep();
    await t.inFlight();
    expect(await lab.handle('stopNow', {})).toEqual({ iteration: 1, discarded: true });
    expect(t.history).toHaveLength(1);
    expect(events.filter((e) => e.type === 'iteration-discarded')).toEqual([{ type: 'iteration-discarded', iteration: 1 }]);
    expect(states(events).slice(-2)).toEqual(['pausing', 'paused']);
    expect(events.some((e) => e.type === 'error')).toBe(false);
    expect(meta?.iteration).toBe(1);
    // Nothing in flight: nothing to discard.
    expect(await lab.handle('stopNow', {})).toEqual({ iteration: 1, discarded: false });
    // The run goes on from there; Pause still lets the iteration in flight finish.
    await lab.handle('resume', {});
    await t.inFlight();
    const paused = lab.handle('pause', {});
    await t.finishStep();
    expect(await paused).toEqual({ iteration: 2 });
    expect(events.filter((e) => e.type === 'iteration-discarded')).toHaveLength(1);
    await lab.handle('resetRun', {});
  });

  it('chat: the base model without a run, adapter on and off side by side with a run, streamed with a rate; refused with the reason while an iteration runs', async () => {
    const { lab, events } = make();
    await lab.handle('check', {});
    await lab.handle('loadModel', { model: { kind: 'served', folder: 'tiny-llama' }, format: 'f32', useCache: true });
    const messages = [{ role: 'user' as const, content: 'Say <b>hi</b>' }];
    await expect(lab.handle('chat', { messages, adapter: 'both', maxTokens: 4 })).rejects.toThrow(/no adapter yet/);
    const base = await lab.handle('chat', { messages, adapter: 'off', maxTokens: 4 });
    expect(base.answers.map((a) => a.adapter)).toEqual([false]);
    const a0 = base.answers[0]!;
    expect(a0.tokens).toBeGreaterThan(0);
    expect(a0.tokens).toBeLessThanOrEqual(4);
    expect(a0.tokensPerSecond).toBeGreaterThan(0);
    const streamed = events.filter((e): e is Extract<LabEvent, { type: 'chat-token' }> => e.type === 'chat-token' && e.id === base.id);
    expect(streamed.map((e) => e.delta).join('')).toBe(a0.text);
    expect(streamed.every((e) => e.tokensPerSecond > 0 && !e.adapter)).toBe(true);

    await lab.handle('start', { config: { world: 'arithmetic', mode: 'lsp-zero', queriesPerIteration: 1, groupSize: 2 } });
    const t = trainer();
    await t.inFlight();
    await expect(lab.handle('chat', { messages, adapter: 'both', maxTokens: 4 })).rejects.toThrow(/An iteration is running on the GPU: pause the run/);
    await lab.handle('stopNow', {});
    // A fresh adapter (B = 0) answers as the base model does, greedily; the flag is restored after.
    t.lora = LoraAdapter.create(gpu, startedWith!.model.weights.config, { r: 2, alpha: 4, targets: ['q_proj'], useRslora: false, seed: 1, baseModel: 'tiny' });
    t.lora.enabled = false;
    const both = await lab.handle('chat', { messages, adapter: 'both', maxTokens: 4 });
    expect(both.answers.map((a) => a.adapter)).toEqual([true, false]);
    expect(both.answers[0]!.text).toBe(both.answers[1]!.text);
    expect(both.answers[1]!.text).toBe(a0.text);
    expect(t.lora.enabled).toBe(false);
    const sides = new Set(events.filter((e) => e.type === 'chat-token' && e.id === both.id).map((e) => (e as { adapter: boolean }).adapter));
    expect([...sides]).toEqual([true, false]);
    t.lora.release();
    await lab.handle('resetRun', {});
  }, 300_000); // two chats on the tiny model: 80-120 s on a loaded 2-core machine

  it('cancels a model download: the load ends as cancelled, nothing partial is cached, the cached models are kept', async () => {
    const { lab, events } = make();
    await lab.handle('check', {});
    const before = (await lab.handle('listCached', {})).map((c) => c.key);
    expect(await lab.handle('cancelLoad', {})).toEqual({ cancelled: false });
    const loading = lab.handle('loadModel', { model: { kind: 'served', folder: 'tiny-llama' }, format: 'q4', useCache: true });
    const outcome = loading.then(
      () => 'loaded',
      (e: Error) => e,
    );
    await vi.waitFor(() => expect(events.some((e) => e.type === 'load-progress' && e.phase === 'config')).toBe(true), { timeout: 30_000, interval: 1 });
    expect(await lab.handle('cancelLoad', {})).toEqual({ cancelled: true });
    const err = await outcome;
    expect(err).toMatchObject({ name: 'AbortError', message: expect.stringMatching(/cancelled/) });
    expect((await lab.handle('listCached', {})).map((c) => c.key)).toEqual(before);
    expect(events.some((e) => e.type === 'model-loaded' && e.info.format === 'q4')).toBe(false);
  });

  it('turns a lost device into a message and drops the model', async () => {
    const { lab, events } = make();
    await lab.handle('check', {});
    gpu.device.destroy();
    await new Promise((r) => setTimeout(r, 200));
    const err = events.find((e) => e.type === 'error') as Extract<LabEvent, { type: 'error' }>;
    expect(err).toMatchObject({ context: 'gpu', runPreserved: true, error: { name: 'GpuDeviceLostError', message: expect.stringContaining('Reload the model') } });
    expect(events.some((e) => e.type === 'model-unloaded')).toBe(true);
  });
});
