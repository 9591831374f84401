/**
 * Writes a Llama checkpoint as the ONNX decoder that transformers.js loads for
 * LlamaForCausalLM (the layout of onnx-community repositories: onnx/model.onnx for
 * f32 weights, onnx/model_q4.onnx / model_q4f16.onnx for 4-bit weights, large data in
 * `<file>_data`), built from plain ONNX ops so any onnxruntime backend runs it:
 *
 *   inputs   input_ids [B, T] i64, attention_mask [B, S] i64, position_ids [B, T] i64,
 *            past_key_values.{i}.key / .value [B, HK, P, D] f32, num_logits_to_keep [] i64
 *   outputs  logits [B, T', V] f32 (T' = the last num_logits_to_keep positions, all when 0),
 *            present.{i}.key / .value [B, HK, S, D] f32 (S = P + T)
 *
 *   x = embed(input_ids)                        Gather, or Gather + Cast (f16 table), or
 *                                               GatherBlockQuantized (4-bit table)
 *   per layer:
 *     h = rmsnorm(x) * w                        x * 1/sqrt(mean(x^2) + eps), as transformers
 *     q, k, v = h W^T                           MatMul of a [K, M] initializer, or
 *                                               MatMulNBits (com.microsoft, bits 4, block 32)
 *     q, k = rope(q, k, position_ids)           split-half rotation, cos/sin of pos * inv_freq
 *     K, V = concat(past, k / v) -> present
 *     a = softmax(q K^T / sqrt(D) + mask) V     GQA by grouping H = HK * g query heads;
 *                                               causal + padding mask from attention_mask
 *     x = x + a Wo^T
 *     x = x + (silu(h2 Wg^T) * h2 Wu^T) Wd^T    h2 = rmsnorm(x) * w2
 *   logits = rmsnorm(x) * w_f  W_lm^T            tied: the embedding (transposed in the graph)
 *
 * The 4-bit initializers are exactly the lab's packed layout (q4-layout.ts), which is
 * MatMulNBits' own: qweight [M, nb, 16] u8, scales [M * nb], zero points
 * [M * ceil(nb / 2)] u8. Weights are quantized with the lab's CPU rule (q4.ref.ts,
 * bit-exact with the GPU quantizer), so the engine and onnxruntime see the same bytes.
 */
import { f16ToF32, f32ToF16 } from '../gpu/gpu';
import { quantizeQ4Ref, type Q4Packed } from '../kernels/q4.ref';
import { Q4_BLOCK } from '../kernels/q4-layout';
import { ropeInvFreq } from '../kernels/rope';
import type { LlamaConfig } from './llama-config';
import { ONNX_DATA_TYPE, encodeOnnxModel, intAttribute, rawTensor, type OnnxAttribute, type OnnxModel, type OnnxNode, type OnnxTensor, type OnnxValueInfo } from './onnx-proto';

export interface LlamaOnnxOptions {
  /** Linear weights: plain f32 MatMul or 4-bit MatMulNBits. */
  weights: 'f32' | 'q4';
  /** q4: scale type. f16 scales need f16 activations, so each MatMulNBits is wrapped in Casts (as a q4f16 model computes). Default f32. */
  scales?: 'f32' | 'f16';
  /** q4: write 4-bit zero points (asymmetric blocks); default true. */
  zeroPoints?: boolean;
  /** Embedding table: f32 Gather, f16 Gather + Cast, or 4-bit GatherBlockQuantized. Default f32. */
  embedding?: 'f32' | 'f16' | 'q4';
  /** Declare the num_logits_to_keep input (transformers.js then computes only the last position's logits while generating). Default true. */
  numLogitsToKeep?: boolean;
}

/** Row-major f32 values of a checkpoint tensor by its transformers name (e.g. model.layers.0.mlp.up_proj.weight). */
export type TensorValues = (name: string) => Float32Array;

const F32 = ONNX_DATA_TYPE.FLOAT;
const F16 = ONNX_DATA_TYPE.FLOAT16;
const I64 = ONNX_DATA_TYPE.INT64;
const U8 = ONNX_DATA_TYPE.UINT8;
const BOOL = ONNX_DATA_TYPE.BOOL;
const MS = 'com.microsoft';

/** Collects nodes and initializers; every node output gets a unique name from its node. */
class GraphBuilder {
  readonly nodes: OnnxNode[] = [];
  readonly initializers: OnnxTensor[] = [];
  private constants = new Map<string, string>();

  op(opType: string, name: string, inputs: string[], attributes: OnnxAttribute[] = [], domain = '', outputs = [`${name}/output_0`]): string {
    this.nodes.push({ name, opType, domain, inputs, outputs, attributes });
    return outputs[0]!;
  }

  init(t: OnnxTensor): string {
    this.initializers.push(t);
    return t.name;
  }

  /** A shared i64 [n] constant (reshape targets, slice bounds, axes). */
  i64(values: number[]): string {
    const key = `i64:${values.join(',')}`;
    let name = this.constants.get(key);
    if (!name) {
      name = `const_i64_${this.constants.size}`;
      this.init(rawTensor(name, I64, [values.length], BigInt64Array.from(values.map(BigInt))));
      this.constants.set(key, name);
    }
    return name;
  }

  /** A shared f32 scalar constant. */
  f32(value: number): string {
    const key = `f32:${value}`;
    let name = this.constants.get(key);
    if (!name) {
      name = `const_f32_${this.constants.size}`;
      this.init(rawTensor(name, F32, [], Float32Array.of(value)));
      this.constants.set(key, name);
    }
    return name;
  }

  /** A shared i64 scalar constant. */
  i64Scalar(value: number): string {
    const key = `i64s:${value}`;
    let name = this.constants.get(key);
    if (!name) {
      name = `const_i64s_${this.constants.size}`;
      this.init(rawTensor(name, I64, [], BigInt64Array.of(BigInt(value))));
      this.constants.set(key, name);
    }
    return name;
  }
}

/** [M, K] -> [K, M] */
function transpose(w: Float32Array, M: number, K: number): Float32Array {
  const out = new Float32Array(M * K);
  for (let m = 0; m < M; m++) for (let k = 0; k < K; k++) out[k * M + m] = w[m * K + k]!;
  return out;
}

function checkValues(name: string, v: Float32Array, n: number): Float32Array {
  if (v.length !== n) throw new Error(`onnx-llama: tensor ${name} has ${v.length} values, expected ${n} (check the config against the weights)`);
  return v;
}

/**
 * Builds the decoder graph. Linear weights come from `values` (torch layout [M, K]) and
 * are transposed (f32) or quantized (q4) here; `quantized` may supply already packed
 * 4-bit weights by name instead (then `values` is not asked for them).
 */
export function buildLlamaOnnx(
  config: LlamaConfig,
  values: TensorValues,
  options: LlamaOnnxOptions,
  quantized?: (name: string) => Q4Packed | null,
): OnnxModel {
  if (config.architecture !== 'LlamaForCausalLM') throw new Error(`onnx-llama: only LlamaForCausalLM is written, not ${config.architecture}`);
  const { hiddenSize: C, intermediateSize: F, numHeads: H, numKvHeads: HK, headDim: D, vocabSize: V, numLayers: L } = config;
  const g = H / HK;
  if (!Number.isInteger(g)) throw new Error(`onnx-llama: ${H} query heads are not a multiple of ${HK} key-value heads`);
  const scales = options.scales ?? 'f32';
  const zeroPoints = options.zeroPoints ?? true;
  const embedding = options.embedding ?? 'f32';
  const keepInput = options.numLogitsToKeep ?? true;
  const b = new GraphBuilder();
  const packedCache = new Map<string, Q4Packed>();
  const packed = (name: string, M: number, K: number): Q4Packed => {
    let p = packedCache.get(name) ?? quantized?.(name) ?? null;
    if (!p) p = quantizeQ4Ref(checkValues(name, values(name), M * K), M, K, zeroPoints);
    if (p.M !== M || p.K !== K) throw new Error(`onnx-llama: packed ${name} is [${p.M}, ${p.K}], expected [${M}, ${K}]`);
    packedCache.set(name, p);
    return p;
  };

  /** y = x W^T for the checkpoint's W [M, K] named `weight`; `prefix` names the nodes and initializers as optimum does. */
  const linear = (x: string, weight: string, M: number, K: number, prefix: string, nodePath: string): string => {
    if (options.weights === 'f32') {
      const w = b.init(rawTensor(`${prefix}.MatMul.weight`, F32, [K, M], transpose(checkValues(weight, values(weight), M * K), M, K)));
      return b.op('MatMul', `${nodePath}/MatMul`, [x, w]);
    }
    const p = packed(weight, M, K);
    const nb = Math.ceil(K / Q4_BLOCK);
    const qw = b.init(rawTensor(`${prefix}.MatMul.weight_Q4`, U8, [M, nb, 16], p.qweight));
    const sc =
      scales === 'f16'
        ? b.init(rawTensor(`${prefix}.MatMul.weight_scales`, F16, [M * nb], p.scales))
        : b.init(rawTensor(`${prefix}.MatMul.weight_scales`, F32, [M * nb], f16ToF32(p.scales)));
    const inputs = [x, qw, sc];
    if (p.zeros) inputs.push(b.init(rawTensor(`${prefix}.MatMul.weight_zp`, U8, [M * Math.ceil(nb / 2)], p.zeros)));
    const attrs = [intAttribute('K', K), intAttribute('N', M), intAttribute('bits', 4), intAttribute('block_size', Q4_BLOCK)];
    if (scales === 'f32') return b.op('MatMulNBits', `${nodePath}/MatMul_Q4`, inputs, attrs, MS);
    inputs[0] = b.op('Cast', `${nodePath}/Cast_in`, [x], [intAttribute('to', F16)]);
    const y = b.op('MatMulNBits', `${nodePath}/MatMul_Q4`, inputs, attrs, MS);
    return b.op('Cast', `${nodePath}/Cast_out`, [y], [intAttribute('to', F32)]);
  };

  const rmsnorm = (x: string, weight: string, nodePath: string): string => {
    const w = b.init(rawTensor(weight, F32, [C], checkValues(weight, values(weight), C)));
    const sq = b.op('Mul', `${nodePath}/Mul_sq`, [x, x]);
    const mean = b.op('ReduceMean', `${nodePath}/ReduceMean`, [sq], [{ name: 'axes', type: 'ints', ints: [-1] }, intAttribute('keepdims', 1)]);
    const rstd = b.op('Reciprocal', `${nodePath}/Reciprocal`, [b.op('Sqrt', `${nodePath}/Sqrt`, [b.op('Add', `${nodePath}/Add_eps`, [mean, b.f32(config.rmsNormEps)])])]);
    return b.op('Mul', `${nodePath}/Mul_w`, [w, b.op('Mul', `${nodePath}/Mul_rstd`, [x, rstd])]);
  };

  // ---- embedding
  const embedName = 'model.embed_tokens.weight';
  let x: string;
  if (embedding === 'q4') {
    if (C % Q4_BLOCK !== 0) throw new Error(`onnx-llama: a 4-bit embedding needs hidden_size to be a multiple of ${Q4_BLOCK}, got ${C}`);
    const p = packed(embedName, V, C);
    const nb = C / Q4_BLOCK;
    const inputs = [
      b.init(rawTensor(`${embedName}_Q4`, U8, [V, C / 2], p.qweight)),
      'input_ids',
      b.init(rawTensor(`${embedName}_scales`, F32, [V, nb], f16ToF32(p.scales))),
    ];
    if (p.zeros) inputs.push(b.init(rawTensor(`${embedName}_zp`, U8, [V, Math.ceil(nb / 2)], p.zeros)));
    x = b.op('GatherBlockQuantized', '/model/embed_tokens/GatherBlockQuantized', inputs, [
      intAttribute('bits', 4),
      intAttribute('block_size', Q4_BLOCK),
      intAttribute('gather_axis', 0),
      intAttribute('quantize_axis', 1),
    ], MS);
  } else {
    const e = checkValues(embedName, values(embedName), V * C);
    if (embedding === 'f16') {
      const table = b.init(rawTensor(embedName, F16, [V, C], f32ToF16(e)));
      x = b.op('Cast', '/model/embed_tokens/Cast', [b.op('Gather', '/model/embed_tokens/Gather', [table, 'input_ids'])], [intAttribute('to', F32)]);
    } else {
      x = b.op('Gather', '/model/embed_tokens/Gather', [b.init(rawTensor(embedName, F32, [V, C], e)), 'input_ids']);
    }
  }

  // ---- RoPE tables [B, 1, T, D] from position_ids
  const invFreq = b.init(rawTensor('model.rotary_emb.inv_freq', F32, [D / 2], ropeInvFreq(D, config.ropeTheta, config.ropeScaling)));
  const pos = b.op('Unsqueeze', '/model/rotary_emb/Unsqueeze', [b.op('Cast', '/model/rotary_emb/Cast', ['position_ids'], [intAttribute('to', F32)]), b.i64([2])]);
  const freqs = b.op('Mul', '/model/rotary_emb/Mul', [pos, invFreq]);
  const emb = b.op('Concat', '/model/rotary_emb/Concat', [freqs, freqs], [intAttribute('axis', -1)]);
  const cos = b.op('Unsqueeze', '/model/rotary_emb/Unsqueeze_cos', [b.op('Cos', '/model/rotary_emb/Cos', [emb]), b.i64([1])]);
  const sin = b.op('Unsqueeze', '/model/rotary_emb/Unsqueeze_sin', [b.op('Sin', '/model/rotary_emb/Sin', [emb]), b.i64([1])]);
  const rope = (t: string, nodePath: string): string => {
    const x1 = b.op('Slice', `${nodePath}/Slice_1`, [t, b.i64([0]), b.i64([D / 2]), b.i64([3])]);
    const x2 = b.op('Slice', `${nodePath}/Slice_2`, [t, b.i64([D / 2]), b.i64([D]), b.i64([3])]);
    const rot = b.op('Concat', `${nodePath}/Concat`, [b.op('Neg', `${nodePath}/Neg`, [x2]), x1], [intAttribute('axis', 3)]);
    return b.op('Add', `${nodePath}/Add`, [b.op('Mul', `${nodePath}/Mul_cos`, [t, cos]), b.op('Mul', `${nodePath}/Mul_sin`, [rot, sin])]);
  };

  // ---- attention bias [B, 1, 1, T, S]: 0 where key s is visible to query t, else the f32 minimum
  const maskPath = '/model/attn_mask';
  const S = b.op('Gather', `${maskPath}/Gather_S`, [b.op('Shape', `${maskPath}/Shape_mask`, ['attention_mask']), b.i64Scalar(1)], [intAttribute('axis', 0)]);
  const T = b.op('Gather', `${maskPath}/Gather_T`, [b.op('Shape', `${maskPath}/Shape_ids`, ['input_ids']), b.i64Scalar(1)], [intAttribute('axis', 0)]);
  const P = b.op('Sub', `${maskPath}/Sub_P`, [S, T]);
  const keyPos = b.op('Unsqueeze', `${maskPath}/Unsqueeze_keys`, [b.op('Range', `${maskPath}/Range_keys`, [b.i64Scalar(0), S, b.i64Scalar(1)]), b.i64([0])]);
  const queryPos = b.op('Unsqueeze', `${maskPath}/Unsqueeze_queries`, [b.op('Range', `${maskPath}/Range_queries`, [P, S, b.i64Scalar(1)]), b.i64([1])]);
  const causal = b.op('LessOrEqual', `${maskPath}/LessOrEqual`, [keyPos, queryPos]);
  const padding = b.op('Cast', `${maskPath}/Cast_pad`, [b.op('Unsqueeze', `${maskPath}/Unsqueeze_pad`, ['attention_mask', b.i64([1, 2, 3])])], [intAttribute('to', BOOL)]);
  const allowed = b.op('And', `${maskPath}/And`, [causal, padding]);
  const bias = b.op('Where', `${maskPath}/Where`, [allowed, b.f32(0), b.f32(-3.4028234663852886e38)]);

  // ---- layers
  const presents: string[] = [];
  for (let l = 0; l < L; l++) {
    const p = `model.layers.${l}`;
    const n = `/model/layers.${l}`;
    const h = rmsnorm(x, `${p}.input_layernorm.weight`, `${n}/input_layernorm`);
    const heads = (t: string, count: number, name: string): string =>
      b.op('Transpose', `${n}/self_attn/${name}/Transpose`, [b.op('Reshape', `${n}/self_attn/${name}/Reshape`, [t, b.i64([0, 0, count, D])])], [{ name: 'perm', type: 'ints', ints: [0, 2, 1, 3] }]);
    const q = rope(heads(linear(h, `${p}.self_attn.q_proj.weight`, H * D, C, `${p}.self_attn.q_proj`, `${n}/self_attn/q_proj`), H, 'q'), `${n}/self_attn/rope_q`);
    const k = rope(heads(linear(h, `${p}.self_attn.k_proj.weight`, HK * D, C, `${p}.self_attn.k_proj`, `${n}/self_attn/k_proj`), HK, 'k'), `${n}/self_attn/rope_k`);
    const v = heads(linear(h, `${p}.self_attn.v_proj.weight`, HK * D, C, `${p}.self_attn.v_proj`, `${n}/self_attn/v_proj`), HK, 'v');
    const keyName = `present.${l}.key`;
    const valueName = `present.${l}.value`;
    b.op('Concat', `${n}/self_attn/Concat_k`, [`past_key_values.${l}.key`, k], [intAttribute('axis', 2)], '', [keyName]);
    b.op('Concat', `${n}/self_attn/Concat_v`, [`past_key_values.${l}.value`, v], [intAttribute('axis', 2)], '', [valueName]);
    presents.push(keyName, valueName);
    // Query heads h = kv * g + j share key-value head kv: group them as [B, HK, g, T, D].
    const qg = b.op('Reshape', `${n}/self_attn/Reshape_qg`, [q, b.i64([0, HK, g, -1, D])]);
    const kT = b.op('Unsqueeze', `${n}/self_attn/Unsqueeze_k`, [b.op('Transpose', `${n}/self_attn/Transpose_k`, [keyName], [{ name: 'perm', type: 'ints', ints: [0, 1, 3, 2] }]), b.i64([2])]);
    const scores = b.op('Mul', `${n}/self_attn/Mul_scale`, [b.op('MatMul', `${n}/self_attn/MatMul_qk`, [qg, kT]), b.f32(1 / Math.sqrt(D))]);
    const probs = b.op('Softmax', `${n}/self_attn/Softmax`, [b.op('Add', `${n}/self_attn/Add_mask`, [scores, bias])], [intAttribute('axis', -1)]);
    const vg = b.op('Unsqueeze', `${n}/self_attn/Unsqueeze_v`, [valueName, b.i64([2])]);
    const ctx = b.op('MatMul', `${n}/self_attn/MatMul_pv`, [probs, vg]);
    const merged = b.op('Reshape', `${n}/self_attn/Reshape_out`, [
      b.op('Transpose', `${n}/self_attn/Transpose_out`, [b.op('Reshape', `${n}/self_attn/Reshape_heads`, [ctx, b.i64([0, H, -1, D])])], [{ name: 'perm', type: 'ints', ints: [0, 2, 1, 3] }]),
      b.i64([0, 0, H * D]),
    ]);
    x = b.op('Add', `${n}/Add_attn`, [x, linear(merged, `${p}.self_attn.o_proj.weight`, C, H * D, `${p}.self_attn.o_proj`, `${n}/self_attn/o_proj`)]);
    const h2 = rmsnorm(x, `${p}.post_attention_layernorm.weight`, `${n}/post_attention_layernorm`);
    const gate = linear(h2, `${p}.mlp.gate_proj.weight`, F, C, `${p}.mlp.gate_proj`, `${n}/mlp/gate_proj`);
    const silu = b.op('Mul', `${n}/mlp/act_fn/Mul`, [gate, b.op('Sigmoid', `${n}/mlp/act_fn/Sigmoid`, [gate])]);
    const up = linear(h2, `${p}.mlp.up_proj.weight`, F, C, `${p}.mlp.up_proj`, `${n}/mlp/up_proj`);
    const down = linear(b.op('Mul', `${n}/mlp/Mul`, [silu, up]), `${p}.mlp.down_proj.weight`, C, F, `${p}.mlp.down_proj`, `${n}/mlp/down_proj`);
    x = b.op('Add', `${n}/Add_mlp`, [x, down]);
  }

  // ---- final norm, the last num_logits_to_keep positions, LM head
  let hN = rmsnorm(x, 'model.norm.weight', '/model/norm');
  if (keepInput) {
    const start = b.op('Neg', '/model/logits_to_keep/Neg', [b.op('Reshape', '/model/logits_to_keep/Reshape', ['num_logits_to_keep', b.i64([1])])]);
    hN = b.op('Slice', '/model/logits_to_keep/Slice', [hN, start, b.i64([Number.MAX_SAFE_INTEGER]), b.i64([1])]);
  }
  let logits: string;
  if (!config.tieWordEmbeddings) {
    logits = linear(hN, 'lm_head.weight', V, C, 'lm_head', '/lm_head');
  } else if (options.weights === 'q4') {
    logits = linear(hN, embedName, V, C, 'lm_head', '/lm_head');
  } else {
    // Tied f32: the embedding table itself, transposed in the graph (onnxruntime folds it once at load).
    const table = embedding === 'f32' ? embedName : b.init(rawTensor('lm_head.weight', F32, [V, C], checkValues(embedName, values(embedName), V * C)));
    const wT = b.op('Transpose', '/lm_head/Transpose', [table], [{ name: 'perm', type: 'ints', ints: [1, 0] }]);
    logits = b.op('MatMul', '/lm_head/MatMul', [hN, wT]);
  }
  b.op('Identity', '/lm_head/Identity', [logits], [], '', ['logits']);

  const inputs: OnnxValueInfo[] = [
    { name: 'input_ids', elemType: I64, shape: ['batch_size', 'sequence_length'] },
    { name: 'attention_mask', elemType: I64, shape: ['batch_size', 'total_sequence_length'] },
    { name: 'position_ids', elemType: I64, shape: ['batch_size', 'sequence_length'] },
  ];
  for (let l = 0; l < L; l++) {
    for (const kind of ['key', 'value']) inputs.push({ name: `past_key_values.${l}.${kind}`, elemType: F32, shape: ['batch_size', HK, 'past_sequence_length', D] });
  }
  if (keepInput) inputs.push({ name: 'num_logits_to_keep', elemType: I64, shape: [] });
  const outputs: OnnxValueInfo[] = [
    { name: 'logits', elemType: F32, shape: ['batch_size', 'logits_length', V] },
    ...presents.map((name) => ({ name, elemType: F32, shape: ['batch_size', HK, 'total_sequence_length', D] })),
  ];
  return {
    irVersion: 8,
    producerName: 'selfplay-lab onnx-llama',
    opsetImports: [
      { domain: '', version: 17 },
      { domain: MS, version: 1 },
    ],
    graph: { name: 'llama', nodes: b.nodes, initializers: b.initializers, inputs, outputs },
  };
}

/** Initializers at least this large go to the external data file (as onnx's own writer does with size_threshold). */
export const EXTERNAL_DATA_THRESHOLD = 1024;
/** Offsets in the data file are multiples of this (onnx's alignment for memory-mapped loading). */
export const EXTERNAL_DATA_ALIGN = 4096;

/**
 * Encodes a model, moving the raw data of initializers of at least `threshold` bytes
 * into one external data file named `location` (relative to the .onnx file). Returns
 * the .onnx bytes and the data file's bytes.
 */
export function encodeWithExternalData(model: OnnxModel, location: string, threshold = EXTERNAL_DATA_THRESHOLD): { onnx: Uint8Array; data: Uint8Array } {
  let size = 0;
  const placed: { t: OnnxTensor; offset: number }[] = [];
  const initializers = model.graph.initializers.map((t) => {
    if (!t.rawData || t.rawData.byteLength < threshold) return t;
    size = Math.ceil(size / EXTERNAL_DATA_ALIGN) * EXTERNAL_DATA_ALIGN;
    placed.push({ t, offset: size });
    const ext: OnnxTensor = {
      name: t.name,
      dataType: t.dataType,
      dims: t.dims,
      dataLocation: 1,
      externalData: [
        { key: 'location', value: location },
        { key: 'offset', value: String(size) },
        { key: 'length', value: String(t.rawData.byteLength) },
      ],
    };
    size += t.rawData.byteLength;
    return ext;
  });
  const data = new Uint8Array(size);
  for (const { t, offset } of placed) data.set(t.rawData!, offset);
  return { onnx: encodeOnnxModel({ ...model, graph: { ...model.graph, initializers } }), data };
}

/** The file transformers.js loads for a dtype: onnx/model.onnx (fp32), onnx/model_q4.onnx, onnx/model_q4f16.onnx. */
export function onnxFileName(options: Pick<LlamaOnnxOptions, 'weights' | 'scales'>): string {
  if (options.weights === 'f32') return 'model.onnx';
  return options.scales === 'f16' ? 'model_q4f16.onnx' : 'model_q4.onnx';
}

/**
 * The files of a transformers.js model folder: the checkpoint's config.json (with
 * transformers.js_config telling it to fetch the external data file), the text files
 * passed in (tokenizer, generation config), and onnx/<file> + onnx/<file>_data.
 */
export function llamaOnnxFolder(
  configJson: Record<string, unknown>,
  textFiles: Record<string, string>,
  config: LlamaConfig,
  values: TensorValues,
  options: LlamaOnnxOptions,
  quantized?: (name: string) => Q4Packed | null,
): Record<string, Uint8Array | string> {
  const file = onnxFileName(options);
  const { onnx, data } = encodeWithExternalData(buildLlamaOnnx(config, values, options, quantized), `${file}_data`);
  const tjs = { ...((configJson['transformers.js_config'] as Record<string, unknown> | undefined) ?? {}) };
  tjs.use_external_data_format = { ...((tjs.use_external_data_format as Record<string, unknown> | undefined) ?? {}), [file]: 1 };
  return {
    ...textFiles,
    'config.json': JSON.stringify({ ...configJson, 'transformers.js_config': tjs }, null, 2),
    [`onnx/${file}`]: onnx,
    [`onnx/${file}_data`]: data,
  };
}
