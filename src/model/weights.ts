/**
 * The frozen base model on the GPU: one struct of named weights, every field with its
 * shape in the dimension letters of src/kernels/DIMENSIONS.md. Linear weights are
 * FrozenLinear (4-bit or f32 behind one interface); the LoRA adapter lives apart
 * (src/model/lora.ts) so the reference policy is the same weights with it switched off.
 */
import type { LlamaConfig } from '../formats/llama-config';
import type { Tensor } from '../gpu/tensor';
import type { FrozenLinear } from '../kernels/linear';
import type { Q4Weight } from '../kernels/q4-layout';

/** How linear weights are held on the GPU. */
export type WeightFormat = 'q4' | 'f32';

export interface LayerWeights {
  /** [C] */
  inputNorm: Tensor;
  /** [H*D, C] */
  q: FrozenLinear;
  /** [HK*D, C] */
  k: FrozenLinear;
  /** [HK*D, C] */
  v: FrozenLinear;
  /** [C, H*D] */
  o: FrozenLinear;
  /** [C] */
  postNorm: Tensor;
  /** [F, C] */
  gate: FrozenLinear;
  /** [F, C] */
  up: FrozenLinear;
  /** [C, F] */
  down: FrozenLinear;
}

/** The token embedding table [V, C]: 4-bit (sharded) or f32. */
export type EmbeddingTable = { format: 'q4'; table: Q4Weight } | { format: 'f32'; table: Tensor };

export interface LlamaWeights {
  config: LlamaConfig;
  format: WeightFormat;
  embed: EmbeddingTable;
  layers: LayerWeights[];
  /** [C] */
  finalNorm: Tensor;
  /** [V, C]: the embedding itself when tie_word_embeddings, else lm_head.weight */
  lmHead: FrozenLinear;
  /** LlamaForSequenceClassification: score.weight [numLabels, C] (f32), read at the last token */
  score: Tensor | null;
  /** RoPE inverse frequencies [D/2] (llama3-scaled where the config says so) */
  invFreq: Tensor;
  /** GPU bytes held by these weights */
  bytes: number;
  /** Returns every buffer to the pool. */
  release(): void;
}

/** The module names LoRA can target, in PEFT's spelling, mapped to LayerWeights fields. */
export const PROJECTION_FIELDS = {
  q_proj: 'q',
  k_proj: 'k',
  v_proj: 'v',
  o_proj: 'o',
  gate_proj: 'gate',
  up_proj: 'up',
  down_proj: 'down',
} as const satisfies Record<string, keyof LayerWeights>;

/** The LayerWeights fields LoRA can adapt, in PROJECTION_FIELDS' order ('q', 'k', ..., 'down'). */
export const LAYER_PROJECTIONS = Object.values(PROJECTION_FIELDS);
