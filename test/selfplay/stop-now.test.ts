/**
 * Stop now on the real trainer (tiny model, Dawn): aborting the step's signal from the
 * first Solver token ends generation before another token is decoded, the step rejects
 * with the abort's reason, and the trainer is exactly as before the iteration (no
 * iteration, games, metrics or update; adapter bytes unchanged; no GPU memory kept);
 * the next step then runs normally. Also a step aborted during training.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadLlama, type LoadedModel } from '../../src/model/load';
import { openModelDir } from '../../src/model/node-source';
import { loadTokenizer } from '../../src/model/tokenizer';
import { makeConfig } from '../../src/selfplay/config';
import { SelfPlayTrainer, type TrainerModels } from '../../src/selfplay/trainer';
import type { TrainerEvent } from '../../src/selfplay/types';
import { useGpu } from '../helpers/gpu';
import { TINY_DIR } from '../helpers/model-files';

describe('Stop now', () => {
  const gpu = useGpu();
  let model: LoadedModel;
  let models: TrainerModels;

  beforeAll(async () => {
    model = await loadLlama(gpu(), await openModelDir(TINY_DIR), { format: 'f32' });
    models = { gpu: gpu(), model, tokenizer: await loadTokenizer(model.files) };
  });
  afterAll(() => model?.weights.release());

  it('aborts within one decode step, discards the iteration and leaves the trainer as it was', { timeout: 600_000 }, async () => {
    // The open world decodes many steps per generation, so "within one step" is visible.
    const config = makeConfig({ mode: 'lsp-zero', world: 'open', queriesPerIteration: 2, groupSize: 2, maxQueryTokens: 6, maxAnswerTokens: 6, rewards: { verifiable: { enabled: true } }, lr: 0.01, microBatch: 4, lora: { r: 2, alpha: 4, targets: ['q_proj'] }, seed: 3 });
    const trainer = SelfPlayTrainer.start(models, config);
    const before = (await trainer.exportFiles()).get('adapter_model.safetensors')!;
    const inUse = gpu().stats().inUseBytes;
    const abort = new AbortController();
    let afterAbort = 0;
    const phases: string[] = [];
    trainer.onEvent = (e: TrainerEvent) => {
      if (e.type === 'phase') phases.push(e.phase);
      if (e.type !== 'token') return;
      if (abort.signal.aborted) afterAbort++;
      else if (e.role === 'solver') abort.abort(new Error('stopped by the test'));
    };
    await expect(trainer.step({ signal: abort.signal })).rejects.toThrow('stopped by the test');
    expect(afterAbort).toBe(0);
    expect(phases).toEqual(['challenger', 'solver']);
    expect(trainer.iteration).toBe(0);
    expect(trainer.games).toEqual([]);
    expect(trainer.history).toEqual([]);
    expect(trainer.lora.stepCount).toBe(0);
    expect(trainer.lora.enabled).toBe(true);
    expect(gpu().stats().inUseBytes).toBe(inUse);
    expect((await trainer.exportFiles()).get('adapter_model.safetensors')).toEqual(before);

    // Aborted at the training phase (between micro-batches): still no update.
    const late = new AbortController();
    trainer.onEvent = (e) => {
      if (e.type === 'phase' && e.phase === 'training') late.abort(new Error('stopped while training'));
    };
    await expect(trainer.step({ signal: late.signal })).rejects.toThrow('stopped while training');
    expect(trainer.iteration).toBe(0);
    expect(trainer.lora.stepCount).toBe(0);
    expect((await trainer.exportFiles()).get('adapter_model.safetensors')).toEqual(before);

    // The run goes on as if nothing happened.
    trainer.onEvent = () => undefined;
    const m = await trainer.step();
    expect(m.iteration).toBe(0);
    expect(trainer.iteration).toBe(1);
    expect(trainer.games).toHaveLength(2);
    trainer.release();
  });
});
