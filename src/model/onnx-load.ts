/**
 * Loads a Llama exported to ONNX (the onnx-community / transformers.js layout:
 * config.json and tokenizer files beside onnx/model*.onnx, large data in external
 * files) as the same LoadedModel loadLlama gives. The graph is not run: its
 * initializers are mapped to LlamaWeights by the names exporters give them, and the
 * architecture comes from config.json.
 *
 * 4-bit weights are copied, not requantized: a MatMulNBits (bits 4, block_size 32)
 * initializer is byte-for-byte the engine's q4 layout (q4-layout.ts), so qweight, the
 * scales and the zero points go to the GPU as they are. Scales stored as f32 are
 * rounded to f16 (the engine's scale type; exact when they came from f16). A 4-bit
 * embedding (GatherBlockQuantized, uint8 data [V, C/2]) is the same layout row by row.
 *
 * Unquantized initializers (f32 / f16 / bf16) load as loadLlama loads safetensors:
 * f32 with format 'f32', quantized on the GPU with format 'q4' (the dense embedding of a
 * 4-bit model, e.g. q4f16's f16 table, stays f32 when it is small, at most
 * DENSE_EMBEDDING_MAX_BYTES as f32, so the model computes what onnxruntime computes; a
 * larger one, such as Llama-3.2-3B's 1.6 GB, is quantized like a safetensors embedding,
 * as the memory plan assumes). With format 'f32', 4-bit weights are dequantized on the CPU.
 * A NaN or infinity in a scale or a dense initializer is refused naming the initializer
 * (checked on the CPU, where the importer decodes them anyway).
 *
 * Recognised names (optimum / onnx-community and onnxruntime-genai exports):
 *   .../layers.{i}/.../{q,k,v,o,gate,up,down}_proj/...     MatMulNBits or MatMul
 *   .../layers.{i}/.../{qkv,gate_up}_proj/...              fused, split by rows
 *   .../lm_head/...                                        the LM head (else the tied embedding)
 *   Gather / GatherBlockQuantized of input_ids             the embedding
 *   model.layers.{i}.{input,post_attention}_layernorm.weight, model.norm.weight
 *   (or model.layers.{L}.final_norm_layernorm.weight)     the RMSNorm weights
 * With a model cache, loadLlama stores the export's files as downloaded (the decoder,
 * its external data and the text files) and loads them from there (load.ts).
 */
import { FormatError, show } from '../formats/errors';
import { nonFiniteF16Count, nonFiniteProblem, refuseNonFinite } from '../formats/finite';
import type { LlamaConfig } from '../formats/llama-config';
import { ONNX_DATA_TYPE, decodeOnnxModel, type OnnxNode, type OnnxTensor } from '../formats/onnx-proto';
import { bf16BytesToF32 } from '../formats/safetensors';
import { f16ToF32, f32ToF16, type Gpu } from '../gpu/gpu';
import type { Tensor } from '../gpu/tensor';
import { f32Linear, q4Linear, type FrozenLinear } from '../kernels/linear';
import { dequantizeQ4Ref, type Q4Packed } from '../kernels/q4.ref';
import { Q4_BLOCK, Q4_BLOCK_BYTES, q4Blocks, releaseQ4, uploadQ4, type Q4Weight } from '../kernels/q4-layout';
import { quantizeQ4 } from '../kernels/quantize';
import { ropeInvFreq } from '../kernels/rope';
import { readModelConfigs, type LoadOptions, type LoadedModel } from './load';
import { closeFile, type ModelFile, type ModelSource } from './source';
import type { EmbeddingTable, LayerWeights, LlamaWeights } from './weights';

/**
 * Where a folder's ONNX decoder is looked for, in order: 4-bit first (the engine keeps
 * those bytes), q4f16 before q4 (the smaller download: f16 scales and embedding, which
 * the engine would round q4's f32 scales to anyway).
 */
export const ONNX_MODEL_FILES = [
  'onnx/model_q4f16.onnx',
  'onnx/model_q4.onnx',
  'onnx/model_int4.onnx',
  'onnx/model.onnx',
  'onnx/model_fp16.onnx',
  'model.onnx',
];

/** Largest dense embedding (as f32) a 4-bit ONNX model keeps unquantized. */
export const DENSE_EMBEDDING_MAX_BYTES = 256 << 20;

const HINT_EXPORT =
  'The lab imports Llama decoders exported by optimum / transformers.js or onnxruntime-genai (4-bit MatMulNBits or f32/f16 MatMul weights); load the safetensors checkpoint instead if this export differs.';

const HINT_DAMAGED_EXPORT = 'The export is damaged (or was made from a model whose training diverged): download it again, or re-export it from a model whose weights are finite.';

const importedQ4 = new WeakMap<FrozenLinear, Q4Weight>();

/** The 4-bit weight behind a linear weight this importer made (to check that its bytes are the file's), or null. */
export function importedQ4Weight(linear: FrozenLinear): Q4Weight | null {
  return importedQ4.get(linear) ?? null;
}

function q4LinearOf(w: Q4Weight): FrozenLinear {
  const lin = q4Linear(w);
  importedQ4.set(lin, w);
  return lin;
}

/** The ONNX file of a folder: the first of ONNX_MODEL_FILES it holds, or null. */
export async function findOnnxModel(source: ModelSource): Promise<string | null> {
  for (const f of ONNX_MODEL_FILES) if (await source.has(f)) return f;
  return null;
}

/**
 * The external data files an ONNX decoder's initializers point at, as paths in the
 * model folder (relative to the decoder file's folder, as onnxruntime resolves them).
 */
export function onnxExternalFiles(bytes: Uint8Array, fileName: string): string[] {
  const model = decodeOnnxModel(bytes);
  const dir = fileName.includes('/') ? fileName.slice(0, fileName.lastIndexOf('/') + 1) : '';
  const out = new Set<string>();
  for (const t of model.graph.initializers) {
    if (t.dataLocation !== 1) continue;
    const location = (t.externalData ?? []).find((e) => e.key === 'location')?.value;
    if (!location) throw new FormatError(fileName, `initializer ${JSON.stringify(t.name)}`, 'is stored externally but names no location', HINT_EXPORT);
    out.add(dir + location);
  }
  return [...out];
}

/** A linear weight [M, K] as found in the file: packed 4-bit, or dense f32 values. */
type LinearSource = { kind: 'q4'; packed: Q4Packed } | { kind: 'dense'; values: Float32Array; M: number; K: number };

const PROJ = ['q', 'k', 'v', 'o', 'gate', 'up', 'down'] as const;
type Proj = (typeof PROJ)[number];
const LAYER_ROLE = /layers[._/](\d+)[./].*?\b(qkv|gate_up|q|k|v|o|gate|up|down)_proj\b/;

class OnnxFile {
  private external = new Map<string, Promise<ModelFile>>();
  readonly used = new Set<string>();
  readonly byName: Map<string, OnnxTensor>;

  constructor(
    readonly source: ModelSource,
    readonly fileName: string,
    readonly initializers: OnnxTensor[],
  ) {
    this.byName = new Map(initializers.map((t) => [t.name, t]));
  }

  fail(item: string | null, problem: string, hint = HINT_EXPORT): never {
    throw new FormatError(this.fileName, item, problem, hint);
  }

  get(name: string, what: string): OnnxTensor {
    const t = this.byName.get(name);
    if (!t) this.fail(`initializer ${JSON.stringify(name)}`, `is not an initializer (${what} must be a constant weight)`);
    this.used.add(name);
    return t;
  }

  /** The tensor's bytes: inline raw_data, typed fields, or its range of the external data file. */
  async bytes(t: OnnxTensor): Promise<Uint8Array> {
    if (t.dataLocation === 1) {
      const kv = new Map((t.externalData ?? []).map((e) => [e.key, e.value]));
      const location = kv.get('location');
      if (!location) this.fail(`initializer ${JSON.stringify(t.name)}`, 'is stored externally but names no location');
      const dir = this.fileName.includes('/') ? this.fileName.slice(0, this.fileName.lastIndexOf('/') + 1) : '';
      const path = dir + location;
      let file = this.external.get(path);
      if (!file) {
        file = this.source.open(path);
        this.external.set(path, file);
      }
      const f = await file;
      const offset = Number(kv.get('offset') ?? 0);
      const length = kv.has('length') ? Number(kv.get('length')) : f.size - offset;
      if (!(offset >= 0 && length >= 0 && offset + length <= f.size)) {
        this.fail(`initializer ${JSON.stringify(t.name)}`, `points at bytes ${offset}..${offset + length} of ${path}, which holds ${f.size}`, 'Download the external data file completely.');
      }
      return f.read(offset, length);
    }
    if (t.rawData) return t.rawData;
    if (t.floatData && t.dataType === ONNX_DATA_TYPE.FLOAT) return new Uint8Array(Float32Array.from(t.floatData).buffer);
    if (t.int32Data && (t.dataType === ONNX_DATA_TYPE.FLOAT16 || t.dataType === ONNX_DATA_TYPE.BFLOAT16)) return new Uint8Array(Uint16Array.from(t.int32Data).buffer);
    if (t.int32Data && t.dataType === ONNX_DATA_TYPE.UINT8) return Uint8Array.from(t.int32Data);
    return new Uint8Array(0);
  }

  /** Float values (f32 / f16 / bf16) of `count` elements; NaN or infinity is refused naming the initializer. */
  async floats(t: OnnxTensor, count: number): Promise<Float32Array> {
    const b = await this.bytes(t);
    const item = `initializer ${JSON.stringify(t.name)}`;
    const size = t.dataType === ONNX_DATA_TYPE.FLOAT ? 4 : 2;
    if (b.byteLength !== count * size) this.fail(item, `holds ${b.byteLength} bytes, expected ${count * size} for ${count} values`);
    const aligned = b.byteOffset % 4 === 0 ? b : b.slice();
    let values: Float32Array;
    if (t.dataType === ONNX_DATA_TYPE.FLOAT) values = new Float32Array(aligned.buffer, aligned.byteOffset, count).slice();
    else if (t.dataType === ONNX_DATA_TYPE.FLOAT16) values = f16ToF32(new Uint16Array(aligned.buffer, aligned.byteOffset, count));
    else if (t.dataType === ONNX_DATA_TYPE.BFLOAT16) values = bf16BytesToF32(aligned);
    else return this.fail(item, `has data type ${t.dataType}; weights must be float, float16 or bfloat16`);
    // Checked here on the CPU: the values were just decoded (and, for MatMul, are transposed) on the CPU anyway.
    refuseNonFinite(this.fileName, item, values, HINT_DAMAGED_EXPORT);
    return values;
  }

  async close(): Promise<void> {
    for (const f of this.external.values()) await f.then(closeFile, () => undefined);
  }
}

const attr = (n: OnnxNode, name: string): number | undefined => {
  const a = n.attributes.find((x) => x.name === name);
  return a && a.type === 'int' ? a.i : undefined;
};
const numel = (dims: readonly number[]) => dims.reduce((a, b) => a * b, 1);

/** The packed 4-bit weight of a MatMulNBits node, checked against its attributes. */
async function readMatMulNBits(f: OnnxFile, n: OnnxNode): Promise<Q4Packed> {
  const item = `node ${JSON.stringify(n.name || n.outputs[0])} (MatMulNBits)`;
  const K = attr(n, 'K');
  const M = attr(n, 'N');
  const bits = attr(n, 'bits') ?? 4;
  const block = attr(n, 'block_size');
  if (K === undefined || M === undefined || block === undefined) f.fail(item, 'lacks one of the attributes K, N, block_size');
  if (bits !== 4) f.fail(item, `has bits=${bits}; the engine's layout is 4-bit`, 'Use a 4-bit (q4 / q4f16) export of the model.');
  if (block !== Q4_BLOCK) f.fail(item, `has block_size=${block}; the engine's layout uses blocks of ${Q4_BLOCK}`, `Use an export quantized with block_size ${Q4_BLOCK} (the onnx-community default).`);
  if ((n.inputs[4] ?? '') !== '') f.fail(item, `has a g_idx input (act-order GPTQ), which the engine's layout cannot express`, 'Use an export without act-order (desc_act false).');
  if ((n.inputs[5] ?? '') !== '') f.fail(item, 'has a bias input; Llama projections have none', HINT_EXPORT);
  const nb = q4Blocks(K);
  const zb = Math.ceil(nb / 2);
  const B = f.get(n.inputs[1]!, `${item} input B`);
  if (B.dataType !== ONNX_DATA_TYPE.UINT8 || numel(B.dims) !== M * nb * Q4_BLOCK_BYTES) {
    f.fail(`initializer ${JSON.stringify(B.name)}`, `is ${show(B.dims)} of type ${B.dataType}, expected uint8 [${M}, ${nb}, ${Q4_BLOCK_BYTES}]`);
  }
  const S = f.get(n.inputs[2]!, `${item} input scales`);
  if (numel(S.dims) !== M * nb) f.fail(`initializer ${JSON.stringify(S.name)}`, `has ${numel(S.dims)} scales, expected ${M * nb}`);
  const scales = await readScales(f, S, M * nb);
  const zpName = n.inputs[3] ?? '';
  let zeros: Uint8Array | null = null;
  if (zpName !== '') {
    const Z = f.get(zpName, `${item} input zero_points`);
    if (Z.dataType !== ONNX_DATA_TYPE.UINT8) f.fail(`initializer ${JSON.stringify(Z.name)}`, `holds zero points of type ${Z.dataType}; the engine reads packed 4-bit (uint8) zero points`);
    if (numel(Z.dims) !== M * zb) f.fail(`initializer ${JSON.stringify(Z.name)}`, `has ${numel(Z.dims)} bytes of zero points, expected ${M * zb}`);
    zeros = (await f.bytes(Z)).slice();
  }
  return { M, K, qweight: (await f.bytes(B)).slice(), scales, zeros };
}

/**
 * f16 scale bits from f16 (copied) or f32 (rounded) scales. A scale that is NaN or
 * infinite (or an f32 scale beyond f16's range) is refused: the packed nibbles cannot
 * be non-finite, the scales can. The check scans the bits on the CPU, where they are
 * already (one value per 32 weights).
 */
async function readScales(f: OnnxFile, S: OnnxTensor, count: number): Promise<Uint16Array> {
  const item = `initializer ${JSON.stringify(S.name)}`;
  let bits: Uint16Array;
  if (S.dataType === ONNX_DATA_TYPE.FLOAT16) {
    const b = (await f.bytes(S)).slice();
    if (b.byteLength !== count * 2) f.fail(item, `holds ${b.byteLength} bytes, expected ${count * 2}`);
    bits = new Uint16Array(b.buffer, 0, count);
  } else if (S.dataType === ONNX_DATA_TYPE.FLOAT) bits = f32ToF16(await f.floats(S, count));
  else return f.fail(item, `holds scales of type ${S.dataType}; expected float or float16`);
  const bad = nonFiniteF16Count(bits);
  if (bad > 0) f.fail(item, `${nonFiniteProblem(bad, count)} as f16 scales`, HINT_DAMAGED_EXPORT);
  return bits;
}

/** The 4-bit embedding of a GatherBlockQuantized node (uint8 data [V, C/2] or uint4 [V, C]). */
async function readGatherBlockQuantized(f: OnnxFile, n: OnnxNode, V: number, C: number): Promise<Q4Packed> {
  const item = `node ${JSON.stringify(n.name || n.outputs[0])} (GatherBlockQuantized)`;
  const bits = attr(n, 'bits') ?? 4;
  const block = attr(n, 'block_size') ?? 128;
  const gatherAxis = attr(n, 'gather_axis') ?? 0;
  const quantizeAxis = attr(n, 'quantize_axis') ?? 1;
  if (bits !== 4 || block !== Q4_BLOCK) f.fail(item, `has bits=${bits}, block_size=${block}; the engine's layout is 4-bit in blocks of ${Q4_BLOCK}`, 'Use a 4-bit export with block_size 32.');
  if (gatherAxis !== 0 || (quantizeAxis !== 1 && quantizeAxis !== -1)) f.fail(item, `gathers along axis ${gatherAxis} and quantizes along ${quantizeAxis}; expected 0 and 1`);
  if (C % Q4_BLOCK !== 0) f.fail(item, `quantizes rows of ${C} values, not a multiple of ${Q4_BLOCK}`);
  const data = f.get(n.inputs[0]!, `${item} input data`);
  const packedDims = data.dataType === ONNX_DATA_TYPE.UINT8 ? [V, C / 2] : [V, C];
  if ((data.dataType !== ONNX_DATA_TYPE.UINT8 && data.dataType !== 21) || data.dims.join() !== packedDims.join()) {
    f.fail(`initializer ${JSON.stringify(data.name)}`, `is ${show(data.dims)} of type ${data.dataType}, expected uint8 [${V}, ${C / 2}] or uint4 [${V}, ${C}]`);
  }
  const nb = C / Q4_BLOCK;
  const S = f.get(n.inputs[2]!, `${item} input scales`);
  if (numel(S.dims) !== V * nb) f.fail(`initializer ${JSON.stringify(S.name)}`, `has ${numel(S.dims)} scales, expected ${V * nb}`);
  const scales = await readScales(f, S, V * nb);
  let zeros: Uint8Array | null = null;
  if ((n.inputs[3] ?? '') !== '') {
    const Z = f.get(n.inputs[3]!, `${item} input zero_points`);
    const zb = Math.ceil(nb / 2);
    if ((Z.dataType !== ONNX_DATA_TYPE.UINT8 && Z.dataType !== 21) || numel(Z.dims) !== (Z.dataType === 21 ? V * nb : V * zb)) {
      f.fail(`initializer ${JSON.stringify(Z.name)}`, `is ${show(Z.dims)} of type ${Z.dataType}, expected packed 4-bit zero points for [${V}, ${nb}] blocks`);
    }
    zeros = (await f.bytes(Z)).slice();
  }
  return { M: V, K: C, qweight: (await f.bytes(data)).slice(), scales, zeros };
}

/** A dense weight feeding MatMul as [K, M] (x W^T exported as x @ W_T), returned as [M, K]. */
async function readMatMul(f: OnnxFile, name: string, item: string): Promise<LinearSource> {
  const t = f.get(name, item);
  if (t.dims.length !== 2) f.fail(`initializer ${JSON.stringify(name)}`, `is ${show(t.dims)}, expected a [in, out] matrix`);
  const [K, M] = t.dims as [number, number];
  const wt = await f.floats(t, K * M);
  const values = new Float32Array(M * K);
  for (let k = 0; k < K; k++) for (let m = 0; m < M; m++) values[m * K + k] = wt[k * M + m]!;
  return { kind: 'dense', values, M, K };
}

function rowsOf(src: LinearSource, r0: number, rows: number): LinearSource {
  if (src.kind === 'dense') return { kind: 'dense', values: src.values.slice(r0 * src.K, (r0 + rows) * src.K), M: rows, K: src.K };
  const p = src.packed;
  const nb = q4Blocks(p.K);
  const zb = Math.ceil(nb / 2);
  return {
    kind: 'q4',
    packed: {
      M: rows,
      K: p.K,
      qweight: p.qweight.slice(r0 * nb * Q4_BLOCK_BYTES, (r0 + rows) * nb * Q4_BLOCK_BYTES),
      scales: p.scales.slice(r0 * nb, (r0 + rows) * nb),
      zeros: p.zeros ? p.zeros.slice(r0 * zb, (r0 + rows) * zb) : null,
    },
  };
}

const shapeOf = (s: LinearSource): [number, number] => (s.kind === 'q4' ? [s.packed.M, s.packed.K] : [s.M, s.K]);

/** The linear weights, embedding and norms of the graph, by role, checked against the config. */
async function readGraphWeights(f: OnnxFile, nodes: OnnxNode[], config: LlamaConfig) {
  const { hiddenSize: C, intermediateSize: F, numHeads: H, numKvHeads: HK, headDim: D, vocabSize: V, numLayers: L } = config;
  const layers: Partial<Record<Proj, LinearSource>>[] = Array.from({ length: L }, () => ({}));
  let lmHead: LinearSource | null = null;
  let embed: LinearSource | null = null;
  const expected: Record<Proj, [number, number]> = { q: [H * D, C], k: [HK * D, C], v: [HK * D, C], o: [C, H * D], gate: [F, C], up: [F, C], down: [C, F] };
  const place = (l: number, proj: Proj, s: LinearSource, item: string) => {
    const [M, K] = shapeOf(s);
    const [eM, eK] = expected[proj];
    if (M !== eM || K !== eK) f.fail(item, `is a [${M}, ${K}] weight but config.json implies ${proj}_proj [${eM}, ${eK}]`, 'Check that config.json and the ONNX file come from the same model.');
    if (layers[l]![proj]) f.fail(item, `is a second ${proj}_proj of layer ${l}`);
    layers[l]![proj] = s;
  };
  for (const n of nodes) {
    const item = `node ${JSON.stringify(n.name || n.outputs[0])} (${n.opType})`;
    let src: LinearSource | null = null;
    if (n.opType === 'MatMulNBits' && n.domain === 'com.microsoft') src = { kind: 'q4', packed: await readMatMulNBits(f, n) };
    else if (n.opType === 'MatMul' && f.byName.has(n.inputs[1]!)) src = await readMatMul(f, n.inputs[1]!, item);
    else if ((n.opType === 'Gather' || n.opType === 'GatherBlockQuantized') && n.inputs[1] === 'input_ids') {
      if (n.opType === 'GatherBlockQuantized') embed = { kind: 'q4', packed: await readGatherBlockQuantized(f, n, V, C) };
      else {
        const t = f.get(n.inputs[0]!, `${item} input data`);
        if (t.dims.join() !== `${V},${C}`) f.fail(`initializer ${JSON.stringify(t.name)}`, `is ${show(t.dims)} but config.json implies the embedding [${V}, ${C}]`);
        embed = { kind: 'dense', values: await f.floats(t, V * C), M: V, K: C };
      }
      continue;
    } else continue;
    const key = `${n.name} ${n.inputs[1]}`;
    const m = LAYER_ROLE.exec(key);
    if (m) {
      const l = Number(m[1]);
      if (l >= L) f.fail(item, `belongs to layer ${l} but config.json has ${L} layers`);
      const role = m[2]!;
      if (role === 'qkv') {
        place(l, 'q', rowsOf(src, 0, H * D), item);
        place(l, 'k', rowsOf(src, H * D, HK * D), item);
        place(l, 'v', rowsOf(src, (H + HK) * D, HK * D), item);
      } else if (role === 'gate_up') {
        place(l, 'gate', rowsOf(src, 0, F), item);
        place(l, 'up', rowsOf(src, F, F), item);
      } else place(l, role as Proj, src, item);
    } else if (/lm_head/.test(key)) {
      const [M, K] = shapeOf(src);
      if (M !== V || K !== C) f.fail(item, `is a [${M}, ${K}] LM head but config.json implies [${V}, ${C}]`);
      lmHead = src;
    } else {
      f.fail(item, 'multiplies by a weight the importer cannot place (its name names no layer projection or lm_head)');
    }
  }
  if (!embed) f.fail(null, 'has no Gather or GatherBlockQuantized of input_ids (the token embedding)');
  for (let l = 0; l < L; l++) {
    for (const p of PROJ) if (!layers[l]![p]) f.fail(null, `has no ${p}_proj weight for layer ${l}`, HINT_EXPORT);
  }
  if (!lmHead && !config.tieWordEmbeddings) f.fail(null, 'has no lm_head weight, and config.json says the embeddings are not tied');

  const norm = async (names: string[]): Promise<Float32Array> => {
    const name = names.find((n) => f.byName.has(n));
    if (!name) f.fail(null, `has no RMSNorm weight named ${names.map((n) => JSON.stringify(n)).join(' or ')}`);
    const t = f.get(name, 'an RMSNorm weight');
    if (numel(t.dims) !== C) f.fail(`initializer ${JSON.stringify(name)}`, `has ${numel(t.dims)} values, expected ${C}`);
    return f.floats(t, C);
  };
  const norms = [];
  for (let l = 0; l < L; l++) {
    norms.push({
      input: await norm([`model.layers.${l}.input_layernorm.weight`]),
      post: await norm([`model.layers.${l}.post_attention_layernorm.weight`]),
    });
  }
  const finalNorm = await norm(['model.norm.weight', `model.layers.${L}.final_norm_layernorm.weight`]);
  return { layers: layers as Record<Proj, LinearSource>[], embed: embed as LinearSource, lmHead: lmHead as LinearSource | null, norms, finalNorm };
}

function sameBytes(a: Q4Packed, b: Q4Packed): boolean {
  const eq = (x: ArrayBufferView | null, y: ArrayBufferView | null): boolean => {
    if (x === null || y === null) return x === y;
    if (x.byteLength !== y.byteLength) return false;
    const u = new Uint8Array(x.buffer, x.byteOffset, x.byteLength);
    const v = new Uint8Array(y.buffer, y.byteOffset, y.byteLength);
    for (let i = 0; i < u.length; i++) if (u[i] !== v[i]) return false;
    return true;
  };
  return a.M === b.M && a.K === b.K && eq(a.qweight, b.qweight) && eq(a.scales, b.scales) && eq(a.zeros, b.zeros);
}

/** Loads onnx/model*.onnx of a source (or options.onnxFile) as LlamaWeights. */
export async function loadLlamaOnnx(gpu: Gpu, source: ModelSource, options: LoadOptions & { onnxFile?: string }): Promise<LoadedModel> {
  const { config, generation } = await readModelConfigs(source);
  if (config.architecture !== 'LlamaForCausalLM') {
    throw new FormatError('config.json', 'architectures', `is ${config.architecture}; the ONNX importer reads LlamaForCausalLM decoders`, 'Load a sequence classifier from its safetensors checkpoint.');
  }
  const fileName = options.onnxFile ?? (await findOnnxModel(source));
  if (!fileName) throw new FormatError(source.name, null, `holds none of ${ONNX_MODEL_FILES.join(', ')}`, 'Give the ONNX file with the onnxFile option, or load the safetensors checkpoint.');
  const main = await source.open(fileName);
  let bytes: Uint8Array;
  try {
    bytes = await main.read(0, main.size);
  } finally {
    await closeFile(main);
  }
  const model = decodeOnnxModel(bytes);
  const f = new OnnxFile(source, fileName, model.graph.initializers);
  const owned: Tensor[] = [];
  const q4s: Q4Weight[] = [];
  const own = (t: Tensor) => (owned.push(t), t);
  const maxBinding = Math.min(gpu.caps.maxBufferSize, gpu.caps.maxStorageBufferBindingSize);
  const maxShard = Math.min(options.maxShardBytes ?? gpu.caps.maxStorageBufferBindingSize, maxBinding);
  let done = 0;
  const progress = (tensor: string, n: number) => {
    done += n;
    options.onProgress?.({ phase: 'weights', file: fileName, tensor, bytesDone: done, bytesTotal: bytes.byteLength });
  };
  try {
    const g = await readGraphWeights(f, model.graph.nodes, config);
    const f32Tensor = (values: Float32Array, shape: number[], label: string): Tensor => {
      const n = values.length * 4;
      if (n > maxBinding) throw new Error(`${label}: format "f32" needs ${n} bytes in one buffer but this device allows ${maxBinding}; load the model with format "q4".`);
      return own(gpu.upload(values, shape, 'f32', label));
    };
    const q4Weight = (w: Q4Weight): Q4Weight => (q4s.push(w), w);
    /** 4-bit weights as they are; dense ones quantized on the GPU (as loadLlama does). */
    const toQ4 = (s: LinearSource, label: string): Q4Weight => {
      const [M, K] = shapeOf(s);
      if (s.kind === 'q4') return q4Weight(uploadQ4(gpu, s.packed, M, K, maxShard));
      const src = gpu.upload(s.values, [M, K], 'f32', `${label}.staging`);
      try {
        return q4Weight(quantizeQ4(gpu, src, M, K, { srcType: 'f32', zeros: options.q4Zeros ?? true, maxShardBytes: maxShard }));
      } finally {
        src.release();
      }
    };
    const linear = (s: LinearSource, label: string): FrozenLinear => {
      const [M, K] = shapeOf(s);
      if (options.format === 'q4') return q4LinearOf(toQ4(s, label));
      const values = s.kind === 'dense' ? s.values : Float32Array.from(dequantizeQ4Ref(s.packed));
      return f32Linear(f32Tensor(values, [M, K], label), M, K);
    };
    const layers: LayerWeights[] = [];
    for (let l = 0; l < config.numLayers; l++) {
      const s = g.layers[l]!;
      const p = `model.layers.${l}`;
      layers.push({
        inputNorm: own(gpu.upload(g.norms[l]!.input, [config.hiddenSize], 'f32', `${p}.input_layernorm`)),
        q: linear(s.q, `${p}.q_proj`),
        k: linear(s.k, `${p}.k_proj`),
        v: linear(s.v, `${p}.v_proj`),
        o: linear(s.o, `${p}.o_proj`),
        postNorm: own(gpu.upload(g.norms[l]!.post, [config.hiddenSize], 'f32', `${p}.post_attention_layernorm`)),
        gate: linear(s.gate, `${p}.gate_proj`),
        up: linear(s.up, `${p}.up_proj`),
        down: linear(s.down, `${p}.down_proj`),
      });
      progress(p, 0);
      await gpu.sync();
    }
    const { vocabSize: V, hiddenSize: C } = config;
    let embed: EmbeddingTable;
    let tiedQ4: Q4Weight | null = null;
    if (options.format === 'q4' && (g.embed.kind === 'q4' || V * C * 4 > Math.min(maxBinding, options.denseEmbeddingMaxBytes ?? DENSE_EMBEDDING_MAX_BYTES))) {
      // 4-bit as stored; or a large dense table, quantized like a safetensors embedding.
      tiedQ4 = toQ4(g.embed, 'model.embed_tokens');
      embed = { format: 'q4', table: tiedQ4 };
    } else {
      // A dense table stays exact (as onnxruntime gathers it) when it fits.
      const values = g.embed.kind === 'dense' ? g.embed.values : Float32Array.from(dequantizeQ4Ref(g.embed.packed));
      embed = { format: 'f32', table: f32Tensor(values, [V, C], 'model.embed_tokens') };
    }
    let lmHead: FrozenLinear;
    if (g.lmHead) {
      // A tied model's 4-bit LM head that repeats the embedding's bytes shares its buffers.
      const shared = tiedQ4 && g.lmHead.kind === 'q4' && g.embed.kind === 'q4' && sameBytes(g.lmHead.packed, g.embed.packed);
      lmHead = shared ? q4LinearOf(tiedQ4!) : linear(g.lmHead, 'lm_head');
    } else {
      lmHead = embed.format === 'q4' ? q4LinearOf(embed.table) : f32Linear(embed.table, V, C);
    }
    const finalNorm = own(gpu.upload(g.finalNorm, [C], 'f32', 'model.norm'));
    const invFreq = own(gpu.upload(ropeInvFreq(config.headDim, config.ropeTheta, config.ropeScaling), [config.headDim / 2], 'f32', 'rope.invFreq'));
    await gpu.sync();
    progress('model.norm', bytes.byteLength - done);
    const buffers = [...owned, ...q4s.flatMap((w) => w.shards.flatMap((s) => [s.qweight, s.scales, ...(s.zeros ? [s.zeros] : [])]))];
    let released = false;
    const weights: LlamaWeights = {
      config,
      format: options.format,
      embed,
      layers,
      finalNorm,
      lmHead,
      score: null,
      invFreq,
      bytes: buffers.reduce((a, t) => a + t.buffer.size, 0),
      release() {
        if (released) return;
        released = true;
        for (const t of owned) if (!t.isReleased) t.release();
        q4s.forEach(releaseQ4);
      },
    };
    const unusedTensors = model.graph.initializers.filter((t) => !f.used.has(t.name) && numel(t.dims) >= 256).map((t) => t.name);
    return { weights, generation, sourceName: source.name, files: source, fromCache: false, cacheError: null, unusedTensors };
  } catch (e) {
    for (const t of owned) if (!t.isReleased) t.release();
    q4s.forEach(releaseQ4);
    throw e;
  } finally {
    await f.close();
  }
}
