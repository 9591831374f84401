/** LoraAdapter on its own: PEFT init, the GPU optimizer step vs PyTorch's AdamW, skip on NaN/Inf, PEFT and optimizer-state round trips. */
import { describe, expect, it } from 'vitest';
import { loraKey, readAdapter, type LoraModelShape } from '../../src/formats/peft';
import type { Gpu } from '../../src/gpu/gpu';
import { adamwStepRef, clipCoefficientRef, globalGradNormRef } from '../../src/kernels/optim.ref';
import { LoraAdapter } from '../../src/model/lora';
import { useGpu } from '../helpers/gpu';
import { Rng, expectClose } from '../helpers/numeric';

const MODEL: LoraModelShape = { layers: 2, hidden: 64, intermediate: 96, heads: 4, kvHeads: 2, headDim: 16 };

async function readAll(g: Gpu, lora: LoraAdapter) {
  const out: Record<string, Float32Array> = {};
  for (const m of lora.modules) {
    const k = `${m.layer}.${m.module}`;
    out[`${k}.A`] = await g.readF32(m.A.value);
    out[`${k}.B`] = await g.readF32(m.B.value);
    out[`${k}.mA`] = await g.readF32(m.mA);
    out[`${k}.vA`] = await g.readF32(m.vA);
    out[`${k}.mB`] = await g.readF32(m.mB);
    out[`${k}.vB`] = await g.readF32(m.vB);
  }
  return out;
}

describe('LoraAdapter', () => {
  const gpu = useGpu();

  it("PEFT's default init: A ~ U(-1/sqrt(in), 1/sqrt(in)) from the seed, B = 0, PEFT shapes and scale", async () => {
    const g = gpu();
    const lora = LoraAdapter.create(g, MODEL, { r: 8, alpha: 16, targets: ['down_proj', 'q_proj', 'k_proj'], seed: 3 });
    expect(lora.config.target_modules).toEqual(['q_proj', 'k_proj', 'down_proj']); // PEFT's order
    expect(lora.scale).toBe(2);
    expect(lora.modules.map((m) => [m.layer, m.module, m.A.shape, m.B.shape])).toEqual([
      [0, 'q_proj', [8, 64], [64, 8]],
      [0, 'k_proj', [8, 64], [32, 8]],
      [0, 'down_proj', [8, 96], [64, 8]],
      [1, 'q_proj', [8, 64], [64, 8]],
      [1, 'k_proj', [8, 64], [32, 8]],
      [1, 'down_proj', [8, 96], [64, 8]],
    ]);
    expect(lora.parameterCount).toBe(2 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8 + 8 * 96 + 64 * 8));
    const same = LoraAdapter.create(g, MODEL, { r: 8, alpha: 16, targets: ['q_proj', 'k_proj', 'down_proj'], seed: 3 });
    const other = LoraAdapter.create(g, MODEL, { r: 8, alpha: 16, targets: ['q_proj', 'k_proj', 'down_proj'], seed: 4 });
    for (const [i, m] of lora.modules.entries()) {
      const a = await g.readF32(m.A.value);
      const bound = 1 / Math.sqrt(m.K);
      expect(Math.max(...a.map(Math.abs))).toBeLessThan(bound);
      // Uniform on (-b, b): mean 0, variance b^2 / 3.
      const mean = a.reduce((s, v) => s + v, 0) / a.length;
      const variance = a.reduce((s, v) => s + (v - mean) ** 2, 0) / a.length;
      expect(Math.abs(mean)).toBeLessThan(0.1 * bound);
      expect(variance / (bound * bound / 3)).toBeGreaterThan(0.85);
      expect(variance / (bound * bound / 3)).toBeLessThan(1.15);
      expect((await g.readF32(m.B.value)).every((v) => v === 0)).toBe(true);
      expect(Buffer.from((await g.readF32(same.modules[i]!.A.value)).buffer).equals(Buffer.from(a.buffer))).toBe(true);
      expect(Buffer.from((await g.readF32(other.modules[i]!.A.value)).buffer).equals(Buffer.from(a.buffer))).toBe(false);
    }
    // Different modules draw different values.
    const a0 = await g.readF32(lora.modules[0]!.A.value);
    const a3 = await g.readF32(lora.modules[3]!.A.value);
    expect(Buffer.from(a0.buffer).equals(Buffer.from(a3.buffer))).toBe(false);
    const rs = LoraAdapter.create(g, MODEL, { r: 16, alpha: 8, targets: ['v_proj'], useRslora: true });
    expect(rs.scale).toBe(8 / 4);
    for (const x of [lora, same, other, rs]) x.release();
  });

  it('enabled switch: off gives no adapter anywhere (the reference policy)', () => {
    const g = gpu();
    const lora = LoraAdapter.create(g, MODEL, { r: 4, alpha: 4, targets: ['o_proj', 'up_proj'] });
    expect(lora.get(1, 'o')!.scale).toBe(1);
    expect(lora.get(1, 'o')!.A).toBe(lora.modules[2]!.A);
    expect(lora.get(0, 'q')).toBeNull();
    expect(Object.keys(lora.layer(0)).sort()).toEqual(['o', 'up']);
    expect(lora.layers[1]!.up!.B).toBe(lora.modules[3]!.B.value);
    lora.enabled = false;
    expect(lora.get(1, 'o')).toBeNull();
    expect(lora.layer(0)).toEqual({});
    lora.release();
  });

  it("step(): global grad-norm clipping and AdamW match PyTorch's (float64 reference) over several steps", async () => {
    const g = gpu();
    const lora = LoraAdapter.create(g, MODEL, { r: 4, alpha: 8, targets: ['q_proj', 'v_proj', 'gate_proj', 'down_proj'], seed: 11 });
    const rng = new Rng(5);
    // Random B too, so every tensor starts nonzero and weight decay shows.
    for (const m of lora.modules) g.write(m.B.value, rng.f32(m.B.value.size, 0.05));
    const host = new Map<string, { p: Float64Array; m: Float64Array; v: Float64Array }>();
    const params = lora.modules.flatMap((m) => [
      { key: `${m.layer}.${m.module}.A`, value: m.A.value, grad: m.A.grad! },
      { key: `${m.layer}.${m.module}.B`, value: m.B.value, grad: m.B.grad! },
    ]);
    for (const p of params) {
      const v = Float64Array.from(await g.readF32(p.value));
      host.set(p.key, { p: v, m: new Float64Array(v.length), v: new Float64Array(v.length) });
    }
    const hp = { lr: 3e-3, beta1: 0.9, beta2: 0.99, eps: 1e-8, weightDecay: 0.1 };
    for (const [step, gradScale, maxGradNorm] of [[1, 1, 1], [2, 0.001, 1], [3, 1, null]] as const) {
      lora.zeroGrad();
      const grads = params.map((p) => rng.f32(p.value.size, gradScale));
      params.forEach((p, i) => g.write(p.grad, grads[i]!));
      const report = await lora.step({ ...hp, maxGradNorm }).read();
      const norm = globalGradNormRef(grads);
      const { coef } = clipCoefficientRef(norm, maxGradNorm);
      params.forEach((p, i) => {
        const h = host.get(p.key)!;
        adamwStepRef(h.p, grads[i]!, h.m, h.v, { ...hp, step }, coef);
      });
      expect(report.skipped).toBe(false);
      expectClose([report.gradNorm], [norm], { atol: 0, rtol: 1e-5, label: `step ${step} grad norm` });
      expectClose([report.clipCoef], [coef], { atol: 0, rtol: 1e-5, label: `step ${step} clip coefficient` });
      if (step === 1) expect(coef).toBeLessThan(0.2); // clipping active
      if (step === 2) expect(coef).toBe(1); // under the threshold
    }
    const got = await readAll(g, lora);
    for (const m of lora.modules) {
      for (const which of ['A', 'B'] as const) {
        const key = `${m.layer}.${m.module}.${which}`;
        const h = host.get(key)!;
        expectClose(got[key]!, h.p, { atol: 1e-6, rtol: 1e-5, label: `${key} after 3 steps` });
        expectClose(got[`${m.layer}.${m.module}.m${which}`]!, h.m, { atol: 1e-8, rtol: 1e-5, label: `${key} exp_avg` });
        expectClose(got[`${m.layer}.${m.module}.v${which}`]!, h.v, { atol: 1e-10, rtol: 1e-5, label: `${key} exp_avg_sq` });
      }
    }
    expect(lora.stepCount).toBe(3);
    lora.release();
  });

  it('a NaN or Inf gradient skips the step: A, B, m and v stay bit-identical; the report says so', async () => {
    const g = gpu();
    const lora = LoraAdapter.create(g, MODEL, { r: 4, alpha: 8, targets: ['k_proj', 'up_proj'], seed: 2 });
    const rng = new Rng(8);
    // One good step first so the moments are nonzero.
    for (const m of lora.modules) for (const v of [m.A, m.B]) g.write(v.grad!, rng.f32(v.value.size, 0.1));
    expect((await lora.step({ lr: 1e-2 }).read()).skipped).toBe(false);
    for (const bad of [Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY]) {
      const before = await readAll(g, lora);
      lora.zeroGrad();
      for (const m of lora.modules) for (const v of [m.A, m.B]) g.write(v.grad!, rng.f32(v.value.size, 0.1));
      g.write(lora.modules[3]!.A.grad!, Float32Array.of(bad), 4 * 17);
      const report = await lora.step({ lr: 1e-2 }).read();
      expect(report.skipped).toBe(true);
      expect(report.gradNorm).toBeNaN();
      const after = await readAll(g, lora);
      for (const key of Object.keys(before)) expect(Buffer.from(after[key]!.buffer).equals(Buffer.from(before[key]!.buffer)), `${key} with ${bad}`).toBe(true);
    }
    // A report is valid until the next step replaces it.
    const r1 = lora.step({ lr: 1e-2 });
    lora.step({ lr: 1e-2 });
    await expect(r1.read()).rejects.toThrow(/after step/);
    lora.release();
  });

  it('PEFT export/import and optimizer state round trip; mismatched adapters are refused', async () => {
    const g = gpu();
    const lora = LoraAdapter.create(g, MODEL, { r: 8, alpha: 32, targets: ['q_proj', 'o_proj', 'up_proj'], seed: 9, baseModel: 'org/base' });
    const rng = new Rng(12);
    for (const m of lora.modules) {
      g.write(m.B.value, rng.f32(m.B.value.size, 0.02));
      for (const v of [m.A, m.B]) g.write(v.grad!, rng.f32(v.value.size, 0.1));
    }
    await lora.step({ lr: 1e-3 }).read();
    const files = await lora.exportPeft();
    const cfg = JSON.parse(files['adapter_config.json']) as Record<string, unknown>;
    expect(cfg).toMatchObject({
      peft_type: 'LORA',
      task_type: 'CAUSAL_LM',
      base_model_name_or_path: 'org/base',
      r: 8,
      lora_alpha: 32,
      lora_dropout: 0,
      target_modules: ['q_proj', 'o_proj', 'up_proj'],
      bias: 'none',
      fan_in_fan_out: false,
      use_rslora: false,
      use_dora: false,
      modules_to_save: null,
      init_lora_weights: true,
      inference_mode: true,
    });
    const read = readAdapter(files, MODEL);
    expect([...read.tensors.keys()].sort()).toEqual(
      [0, 1].flatMap((l) => ['q_proj', 'o_proj', 'up_proj'].flatMap((m) => (['A', 'B'] as const).map((w) => loraKey(l, m as 'q_proj', w)))).sort(),
    );
    expect(read.tensors.get('base_model.model.model.layers.1.mlp.up_proj.lora_A.weight')!.shape).toEqual([8, 64]);
    expect(read.tensors.get('base_model.model.model.layers.1.mlp.up_proj.lora_B.weight')!.shape).toEqual([96, 8]);
    expect(read.tensors.get('base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight')!.shape).toEqual([8, 64]);
    for (const m of lora.modules) {
      expect(Buffer.from(read.tensors.get(loraKey(m.layer, m.module, 'A'))!.data.buffer).equals(Buffer.from((await g.readF32(m.A.value)).buffer))).toBe(true);
      expect(Buffer.from(read.tensors.get(loraKey(m.layer, m.module, 'B'))!.data.buffer).equals(Buffer.from((await g.readF32(m.B.value)).buffer))).toBe(true);
    }
    expect(JSON.parse((await lora.exportPeft('other/name'))['adapter_config.json']).base_model_name_or_path).toBe('other/name');

    // fromPeft and importPeft bring back the same bytes.
    const copy = LoraAdapter.fromPeft(g, MODEL, files);
    expect(Buffer.from((await copy.exportPeft())['adapter_model.safetensors']).equals(Buffer.from(files['adapter_model.safetensors']))).toBe(true);
    const into = LoraAdapter.create(g, MODEL, { r: 8, alpha: 1, targets: ['q_proj', 'o_proj', 'up_proj'], seed: 1 });
    into.importPeft(files);
    expect(into.scale).toBe(4);
    expect(Buffer.from((await into.exportPeft())['adapter_model.safetensors']).equals(Buffer.from(files['adapter_model.safetensors']))).toBe(true);
    const wrongRank = LoraAdapter.create(g, MODEL, { r: 4, alpha: 8, targets: ['q_proj', 'o_proj', 'up_proj'] });
    expect(() => wrongRank.importPeft(files)).toThrow(/r=8.*r=4/);
    const wrongTargets = LoraAdapter.create(g, MODEL, { r: 8, alpha: 8, targets: ['q_proj'] });
    expect(() => wrongTargets.importPeft(files)).toThrow(/create a new adapter/);

    // Optimizer state: PyTorch's names under each PEFT key, plus the step count.
    const state = await lora.exportOptimizerState();
    expect(state.step).toBe(1);
    expect(state.tensors.size).toBe(lora.modules.length * 4);
    const m0 = lora.modules[0]!;
    const expAvg = state.tensors.get(`${loraKey(0, 'q_proj', 'B')}.exp_avg`)!;
    expect(expAvg.shape).toEqual([64, 8]);
    expect(Buffer.from(expAvg.data.buffer).equals(Buffer.from((await g.readF32(m0.mB)).buffer))).toBe(true);
    expect(expAvg.data.some((v) => v !== 0)).toBe(true);
    copy.importOptimizerState(state);
    expect(copy.stepCount).toBe(1);
    const again = await copy.exportOptimizerState();
    for (const [k, t] of state.tensors) expect(Buffer.from(again.tensors.get(k)!.data.buffer).equals(Buffer.from(t.data.buffer)), k).toBe(true);
    const missing = { step: 1, tensors: new Map([...state.tensors].slice(1)) };
    expect(() => copy.importOptimizerState(missing)).toThrow(/is missing/);
    copy.resetOptimizer();
    expect(copy.stepCount).toBe(0);
    expect((await g.readF32(copy.modules[0]!.vA)).every((v) => v === 0)).toBe(true);

    for (const x of [lora, copy, into, wrongRank, wrongTargets]) x.release();
  });

  it('release() returns every buffer; use after release throws', async () => {
    const g = gpu();
    await g.sync();
    const before = g.stats().inUseBytes;
    const lora = LoraAdapter.create(g, MODEL, { r: 8, alpha: 16, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] });
    // A, B, their grads and moments, plus the three small step-state tensors (pool buckets round up by at most 1/8).
    const held = g.stats().inUseBytes - before;
    expect(held).toBeGreaterThanOrEqual(lora.bytes);
    expect(held).toBeLessThanOrEqual(lora.bytes * 1.125 + 3 * 256);
    lora.zeroGrad();
    await lora.step({ lr: 1e-3 }).read();
    await lora.exportPeft();
    await lora.exportOptimizerState();
    lora.release();
    expect(g.stats().inUseBytes).toBe(before);
    expect(() => lora.zeroGrad()).toThrow(/after release/);
  });
});
