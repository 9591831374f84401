/**
 * The trainable LoRA adapter: for every layer and every targeted projection W [M, K],
 *   A [R, K]  lora_A (PEFT), leaf with a persistent grad buffer [R, K]
 *   B [M, R]  lora_B (PEFT), leaf with a persistent grad buffer [M, R]
 * and AdamW moments m, v of the same shapes, all f32 on the GPU. The layer computes
 * y = x W^T + scale * (x A^T) B^T with scale = alpha / r (alpha / sqrt(r) with rsLoRA).
 *
 * `enabled = false` turns the adapter off in every pass, which makes the model the
 * reference policy without a second copy of anything.
 *
 * The optimizer step (global grad norm, clip, AdamW) runs entirely on the GPU; a step
 * whose gradients hold NaN/Inf is skipped by the kernels themselves (A, B, m, v untouched).
 * Nothing is read back unless the caller asks for the step's report.
 */
import { leaf, type Var } from '../autodiff/tape';
import type { Lora } from '../autodiff/nn';
import type { LlamaConfig } from '../formats/llama-config';
import {
  loraKey,
  loraModelShape,
  loraScale,
  makeAdapterConfig,
  projectionDims,
  readAdapter,
  writeAdapter,
  type AdapterFiles,
  type LlamaProjection,
  type LoraAdapterConfig,
  type LoraModelShape,
  type LoraTensor,
} from '../formats/peft';
import type { Gpu } from '../gpu/gpu';
import type { Tensor } from '../gpu/tensor';
import { adamwStep, gradClipState, zeroGrads, type GradRef } from '../kernels/optim';
import { PROJECTION_FIELDS } from './weights';

/** A LayerWeights field that LoRA can adapt ('q', 'k', ..., 'down'). */
export type ProjectionField = (typeof PROJECTION_FIELDS)[LlamaProjection];

/** One adapted projection of one layer. */
export interface LoraModule {
  layer: number;
  module: LlamaProjection;
  /** out features of the base weight */
  M: number;
  /** in features of the base weight */
  K: number;
  /** [R, K] value, grad [R, K] */
  A: Var;
  /** [M, R] value, grad [M, R] */
  B: Var;
  /** AdamW first and second moments of A [R, K] and B [M, R] */
  mA: Tensor;
  vA: Tensor;
  mB: Tensor;
  vB: Tensor;
}

export interface LoraInit {
  r: number;
  alpha: number;
  /** PEFT module names, e.g. ['q_proj', 'v_proj'] (any order; kept in PEFT's order) */
  targets: readonly LlamaProjection[];
  useRslora?: boolean;
  /** Seed of the uniform init of A (B starts at zero) */
  seed?: number;
  /** base_model_name_or_path written on export unless exportPeft names another */
  baseModel?: string;
}

export interface StepOptions {
  lr: number;
  beta1?: number;
  beta2?: number;
  eps?: number;
  weightDecay?: number;
  /** Clip the global grad norm to this (null: no clipping, NaN/Inf guard only). Default 1. */
  maxGradNorm?: number | null;
}

export interface StepReport {
  /** The 1-based optimizer step this report belongs to */
  step: number;
  /**
   * Reads the step's global grad norm (before clipping; NaN when a gradient was not
   * finite), the clip coefficient applied, and whether the update was skipped. One
   * small readback; valid until the next step().
   */
  read(): Promise<{ gradNorm: number; clipCoef: number; skipped: boolean }>;
}

/** Optimizer state for checkpoints: PyTorch's names (exp_avg, exp_avg_sq) under each PEFT key. */
export interface LoraOptimizerState {
  step: number;
  /** `${peftKey}.exp_avg` and `${peftKey}.exp_avg_sq` -> moments, shaped like the weight */
  tensors: Map<string, LoraTensor>;
}

/** Bytes per staging readback when exporting many small tensors. */
const READ_BATCH_BYTES = 32 << 20;

export class LoraAdapter {
  /** Off: every pass runs the frozen base model (the reference policy). */
  enabled = true;
  readonly modules: LoraModule[];
  readonly model: LoraModelShape;
  /** Optimizer steps taken (AdamW's bias-correction count). */
  stepCount = 0;
  private byLayer: Map<ProjectionField, LoraModule>[];
  private cfg: LoraAdapterConfig;
  /** [1] global grad norm, [2] clip state (coef, skip), [3] both gathered for one readback */
  private normT: Tensor;
  private clipT: Tensor;
  private statsT: Tensor;
  private released = false;

  private constructor(
    readonly gpu: Gpu,
    model: LoraModelShape,
    config: LoraAdapterConfig,
  ) {
    this.model = model;
    this.cfg = config;
    const R = config.r;
    this.modules = [];
    this.byLayer = [];
    for (let layer = 0; layer < model.layers; layer++) {
      const map = new Map<ProjectionField, LoraModule>();
      for (const module of config.target_modules) {
        const { inFeatures: K, outFeatures: M } = projectionDims(model, module);
        const label = `lora.${layer}.${module}`;
        const m: LoraModule = {
          layer,
          module,
          M,
          K,
          A: leaf(gpu.zeros([R, K], 'f32', `${label}.A`), true, gpu.zeros([R, K], 'f32', `${label}.gA`)),
          B: leaf(gpu.zeros([M, R], 'f32', `${label}.B`), true, gpu.zeros([M, R], 'f32', `${label}.gB`)),
          mA: gpu.zeros([R, K], 'f32', `${label}.mA`),
          vA: gpu.zeros([R, K], 'f32', `${label}.vA`),
          mB: gpu.zeros([M, R], 'f32', `${label}.mB`),
          vB: gpu.zeros([M, R], 'f32', `${label}.vB`),
        };
        this.modules.push(m);
        map.set(PROJECTION_FIELDS[module], m);
      }
      this.byLayer.push(map);
    }
    this.normT = gpu.zeros([1], 'f32', 'lora.grad-norm');
    this.clipT = gpu.zeros([2], 'f32', 'lora.clip');
    this.statsT = gpu.zeros([3], 'f32', 'lora.step-stats');
  }

  /** A fresh adapter with PEFT's default init: A ~ U(-1/sqrt(K), 1/sqrt(K)), B = 0. */
  static create(gpu: Gpu, config: LlamaConfig | LoraModelShape, init: LoraInit): LoraAdapter {
    const model = 'numLayers' in config ? loraModelShape(config) : config;
    const cfg = makeAdapterConfig({
      baseModel: init.baseModel ?? '',
      r: init.r,
      alpha: init.alpha,
      targetModules: init.targets,
      useRslora: init.useRslora ?? false,
    });
    const adapter = new LoraAdapter(gpu, model, cfg);
    const rng = seededUniform(init.seed ?? 0);
    for (const m of adapter.modules) {
      const bound = 1 / Math.sqrt(m.K);
      const a = new Float32Array(cfg.r * m.K);
      for (let i = 0; i < a.length; i++) a[i] = (rng() * 2 - 1) * bound;
      gpu.write(m.A.value, a);
    }
    return adapter;
  }

  /** An adapter holding a PEFT adapter's weights (its own r, alpha, targets, rsLoRA). */
  static fromPeft(gpu: Gpu, config: LlamaConfig | LoraModelShape, files: PeftInput): LoraAdapter {
    const model = 'numLayers' in config ? loraModelShape(config) : config;
    const read = readAdapter(files, model);
    const adapter = new LoraAdapter(gpu, model, read.config);
    adapter.writeTensors(read.tensors);
    return adapter;
  }

  get config(): LoraAdapterConfig {
    return this.cfg;
  }

  get r(): number {
    return this.cfg.r;
  }

  /** alpha / r, or alpha / sqrt(r) with rsLoRA */
  get scale(): number {
    return loraScale(this.cfg);
  }

  /** Trainable values in A and B over all layers. */
  get parameterCount(): number {
    return this.modules.reduce((s, m) => s + this.cfg.r * (m.K + m.M), 0);
  }

  /** GPU bytes held by A and B, their grads and both moments (4 f32 copies of every parameter). */
  get bytes(): number {
    return this.parameterCount * 4 * 4;
  }

  /**
   * The adapter of one projection for a forward pass, or null when the adapter is
   * disabled or does not target it. Read once per pass, so a checkpointed layer's
   * recomputation sees the same choice.
   */
  get(layer: number, field: ProjectionField): Lora | null {
    if (!this.enabled) return null;
    const m = this.byLayer[layer]?.get(field);
    return m ? { A: m.A, B: m.B, scale: this.scale } : null;
  }

  /** Every projection's adapter for one layer (empty when disabled). */
  layer(layer: number): Partial<Record<ProjectionField, Lora>> {
    const out: Partial<Record<ProjectionField, Lora>> = {};
    if (!this.enabled) return out;
    for (const [field, m] of this.byLayer[layer] ?? []) out[field] = { A: m.A, B: m.B, scale: this.scale };
    return out;
  }

  /**
   * Per layer, the adapted projections' plain tensors (A [R, K], B [M, R], scale): the
   * shape the inference forward (src/model/infer.ts) takes, together with `enabled`.
   */
  get layers(): Partial<Record<ProjectionField, { A: Tensor; B: Tensor; scale: number }>>[] {
    const scale = this.scale;
    return this.byLayer.map((map) => {
      const out: Partial<Record<ProjectionField, { A: Tensor; B: Tensor; scale: number }>> = {};
      for (const [field, m] of map) out[field] = { A: m.A.value, B: m.B.value, scale };
      return out;
    });
  }

  /** The grad buffers, A then B of every module (what the norm and the step read). */
  gradRefs(): GradRef[] {
    return this.modules.flatMap((m) => [
      { tensor: m.A.grad!, n: m.A.value.size },
      { tensor: m.B.grad!, n: m.B.value.size },
    ]);
  }

  /** Clears every grad buffer (parameter grads accumulate with += across backward passes). */
  zeroGrad(): void {
    this.checkAlive();
    zeroGrads(this.gpu, this.gradRefs());
  }

  /**
   * One optimizer step on the accumulated grads: global L2 norm, clip to maxGradNorm,
   * AdamW (PyTorch's, decoupled weight decay on A and B). All on the GPU; the NaN/Inf
   * skip flag leaves A, B, m and v untouched. A skipped step still advances the
   * bias-correction count (the host cannot know without a readback); with the usual
   * betas that shifts later updates by well under a percent.
   */
  step(opts: StepOptions): StepReport {
    this.checkAlive();
    const { lr, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weightDecay = 0, maxGradNorm = 1 } = opts;
    const gpu = this.gpu;
    const step = ++this.stepCount;
    gradClipState(gpu, this.clipT, this.normT, this.gradRefs(), maxGradNorm);
    const hp = { lr, beta1, beta2, eps, weightDecay, step };
    for (const m of this.modules) {
      adamwStep(gpu, m.A.value, m.A.grad!, m.mA, m.vA, m.A.value.size, hp, this.clipT);
      adamwStep(gpu, m.B.value, m.B.grad!, m.mB, m.vB, m.B.value.size, hp, this.clipT);
    }
    gpu.copy(this.normT, this.statsT, 4, 0, 0);
    gpu.copy(this.clipT, this.statsT, 8, 0, 4);
    return {
      step,
      read: async () => {
        if (step !== this.stepCount) throw new Error(`LoraAdapter: the report of step ${step} was read after step ${this.stepCount} replaced it`);
        const s = await gpu.readF32(this.statsT);
        return { gradNorm: s[0]!, clipCoef: s[1]!, skipped: s[2] !== 0 };
      },
    };
  }

  /** The adapter as PEFT saves it: adapter_config.json + adapter_model.safetensors (F32). */
  async exportPeft(baseModelName?: string): Promise<AdapterFiles> {
    this.checkAlive();
    const values = await this.readAll(this.modules.flatMap((m) => [m.A.value, m.B.value]));
    const tensors = new Map<string, LoraTensor>();
    this.modules.forEach((m, i) => {
      tensors.set(loraKey(m.layer, m.module, 'A'), { shape: [...m.A.value.shape], data: values[2 * i]! });
      tensors.set(loraKey(m.layer, m.module, 'B'), { shape: [...m.B.value.shape], data: values[2 * i + 1]! });
    });
    const base = baseModelName ?? this.cfg.base_model_name_or_path;
    return writeAdapter({ config: { ...this.cfg, base_model_name_or_path: base || null }, tensors, model: this.model });
  }

  /**
   * Loads a PEFT adapter's weights into this adapter. Rank and target modules must
   * match; alpha and rsLoRA are taken from the file. Optimizer state is reset.
   */
  importPeft(files: PeftInput): { warnings: string[] } {
    this.checkAlive();
    const read = readAdapter(files, this.model);
    const c = read.config;
    if (c.r !== this.cfg.r || c.target_modules.join(',') !== this.cfg.target_modules.join(',')) {
      throw new Error(
        `importPeft: the adapter has r=${c.r} on ${c.target_modules.join(', ')} but this one has r=${this.cfg.r} on ` +
          `${this.cfg.target_modules.join(', ')}; create a new adapter with LoraAdapter.fromPeft instead`,
      );
    }
    this.cfg = { ...this.cfg, lora_alpha: c.lora_alpha, use_rslora: c.use_rslora, base_model_name_or_path: c.base_model_name_or_path };
    this.writeTensors(read.tensors);
    this.resetOptimizer();
    return { warnings: read.warnings };
  }

  /** Zeroes AdamW's moments and step count. */
  resetOptimizer(): void {
    this.checkAlive();
    for (const m of this.modules) for (const t of [m.mA, m.vA, m.mB, m.vB]) this.gpu.clear(t);
    this.stepCount = 0;
  }

  async exportOptimizerState(): Promise<LoraOptimizerState> {
    this.checkAlive();
    const values = await this.readAll(this.modules.flatMap((m) => [m.mA, m.vA, m.mB, m.vB]));
    const tensors = new Map<string, LoraTensor>();
    this.modules.forEach((m, i) => {
      const a = loraKey(m.layer, m.module, 'A');
      const b = loraKey(m.layer, m.module, 'B');
      tensors.set(`${a}.exp_avg`, { shape: [...m.mA.shape], data: values[4 * i]! });
      tensors.set(`${a}.exp_avg_sq`, { shape: [...m.vA.shape], data: values[4 * i + 1]! });
      tensors.set(`${b}.exp_avg`, { shape: [...m.mB.shape], data: values[4 * i + 2]! });
      tensors.set(`${b}.exp_avg_sq`, { shape: [...m.vB.shape], data: values[4 * i + 3]! });
    });
    return { step: this.stepCount, tensors };
  }

  importOptimizerState(state: LoraOptimizerState): void {
    this.checkAlive();
    if (!(Number.isInteger(state.step) && state.step >= 0)) throw new Error(`importOptimizerState: bad step count ${state.step}`);
    const expected = new Set<string>();
    for (const m of this.modules) {
      for (const which of ['A', 'B'] as const) {
        const key = loraKey(m.layer, m.module, which);
        const [mt, vt] = which === 'A' ? [m.mA, m.vA] : [m.mB, m.vB];
        for (const [suffix, t] of [['exp_avg', mt], ['exp_avg_sq', vt]] as const) {
          const name = `${key}.${suffix}`;
          expected.add(name);
          const s = state.tensors.get(name);
          if (!s) throw new Error(`importOptimizerState: ${name} is missing`);
          if (s.data.length !== t.size || s.shape.join(',') !== t.shape.join(',')) {
            throw new Error(`importOptimizerState: ${name} has shape [${s.shape}], expected [${t.shape}]`);
          }
        }
      }
    }
    for (const name of state.tensors.keys()) if (!expected.has(name)) throw new Error(`importOptimizerState: unexpected tensor ${name}`);
    for (const m of this.modules) {
      for (const which of ['A', 'B'] as const) {
        const key = loraKey(m.layer, m.module, which);
        const [mt, vt] = which === 'A' ? [m.mA, m.vA] : [m.mB, m.vB];
        this.gpu.write(mt, state.tensors.get(`${key}.exp_avg`)!.data);
        this.gpu.write(vt, state.tensors.get(`${key}.exp_avg_sq`)!.data);
      }
    }
    this.stepCount = state.step;
  }

  /** Returns every buffer to the pool. */
  release(): void {
    if (this.released) return;
    this.released = true;
    for (const m of this.modules) {
      for (const t of [m.A.value, m.A.grad!, m.B.value, m.B.grad!, m.mA, m.vA, m.mB, m.vB]) t.release();
    }
    this.normT.release();
    this.clipT.release();
    this.statsT.release();
  }

  private writeTensors(tensors: ReadonlyMap<string, LoraTensor>): void {
    for (const m of this.modules) {
      this.gpu.write(m.A.value, tensors.get(loraKey(m.layer, m.module, 'A'))!.data);
      this.gpu.write(m.B.value, tensors.get(loraKey(m.layer, m.module, 'B'))!.data);
    }
  }

  /** Reads many small f32 tensors with a few readbacks (gathered into staging tensors). */
  private async readAll(list: readonly Tensor[]): Promise<Float32Array[]> {
    const gpu = this.gpu;
    const out: Float32Array[] = [];
    let i = 0;
    while (i < list.length) {
      let bytes = 0;
      let j = i;
      while (j < list.length && (j === i || bytes + list[j]!.byteLength <= READ_BATCH_BYTES)) bytes += list[j++]!.byteLength;
      const staging = gpu.empty([bytes / 4], 'f32', 'lora.readback');
      let at = 0;
      for (let k = i; k < j; k++) {
        gpu.copy(list[k]!, staging, list[k]!.byteLength, 0, at);
        at += list[k]!.byteLength;
      }
      const data = await gpu.readF32(staging);
      staging.release();
      at = 0;
      for (let k = i; k < j; k++) {
        out.push(data.slice(at, at + list[k]!.size));
        at += list[k]!.size;
      }
      i = j;
    }
    return out;
  }

  private checkAlive(): void {
    if (this.released) throw new Error('LoraAdapter: used after release()');
  }
}

/** What readAdapter accepts: adapter_config.json (text, bytes or parsed) and the safetensors bytes. */
export type PeftInput = { 'adapter_config.json': unknown; 'adapter_model.safetensors': Uint8Array };

/** Uniform [0, 1) from a 32-bit seed (splitmix32 state, xorshift-multiply output). */
function seededUniform(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x9e3779b9) >>> 0;
    let z = s;
    z = Math.imul(z ^ (z >>> 16), 0x21f0aaad);
    z = Math.imul(z ^ (z >>> 15), 0x735a2d97);
    z ^= z >>> 15;
    return (z >>> 0) / 4294967296;
  };
}
