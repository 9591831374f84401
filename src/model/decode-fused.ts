/**
 * One decoder layer of a decode step on the fused kernels (4-bit weights, B <= 32 rows):
 *
 *   h    = rmsnorm(x), u = scale (h A^T) for q, k, v     loraNormDownProducts 1 (LoRA off: rmsnorm 1)
 *   qkv  = h [Wq | Wk | Wv]^T + u B^T                    q4FusedGemv rows     1
 *   q, cache k, v = rope / store from qkv                ropeKvWrite          1
 *   att  = attention(q, cache)                           attentionDecode      2 (prefix + cache chunks, combine)
 *   x   += att Wo^T + u_o Bo^T                           (A products 1) + GEMV 1
 *   h2   = rmsnorm(x), u for gate, up                    loraNormDownProducts 1 (LoRA off: rmsnorm 1)
 *   act  = silu(h2 Wg^T + ..) * (h2 Wu^T + ..)           q4FusedGemv swiglu   1
 *   x   += act Wd^T + u_d Bd^T                           (A products 1) + GEMV 1
 *
 * With every projection adapted and a FusedDecodeCarry from the caller, o's and down's
 * A products come from extra workgroups of their own GEMV dispatch, and their B
 * products are deferred to the next dispatches that read the residual stream:
 *
 *   u_o = scale att Ao^T                      beside x += att Wo^T + u_d' Bd'^T   (d': the layer before)
 *   h2  = rmsnorm(x + u_o Bo^T)               the norm adds it on the fly (x not written)
 *   u_d = scale act Ad^T                      beside x += act Wd^T + u_o Bo^T
 *   next layer: h = rmsnorm(x + u_d Bd^T), and its o GEMV adds u_d Bd^T to x
 *
 * so a layer with LoRA costs the dispatches of one without; the last layer adds its
 * u_d Bd^T with one small dispatch (smallk rowsForward) before the final norm.
 *
 * The same arithmetic as infer.ts's decoderLayer (same GEMV lane split and reduction,
 * LoRA B terms added to each output before it is stored, the same RoPE and cache
 * rounding; deferred B terms are summed in another order, equal within rounding), with no q, k, v, gate or up tensors and no separate LoRA B, RoPE or
 * SwiGLU dispatches. A group whose weights need more storage bindings than the device
 * allows is split into as few dispatches as fit (q4FusedUnsupported); packed weights
 * (pack.ts) keep q/k/v and gate/up within 10 bindings with LoRA and zero points.
 */
import type { Gpu } from '../gpu/gpu';
import type { Tensor } from '../gpu/tensor';
import { swigluForward } from '../kernels/elementwise';
import { q4RowsOf, type FrozenLinear, type Q4Rows } from '../kernels/linear';
import { LORA_BATCHED_MAX_N, loraDownProducts, loraNormDownBindings, loraNormDownProducts, type PendingLora } from '../kernels/lora-decode';
import { Q4_FUSED_MAX_N, q4FusedGemv, q4FusedUnsupported, type Q4FusedDown, type Q4FusedSegment } from '../kernels/q4-fused';
import type { Q4Weight } from '../kernels/q4-layout';
import { rmsnormForward } from '../kernels/rmsnorm';
import { ropeKvWrite } from '../kernels/rope-kv';
import { rowsForward } from '../kernels/smallk';
import type { LoraFactors, ProjectionName } from './infer';
import { LAYER_PROJECTIONS, type LlamaWeights } from './weights';

type LayerLora = Partial<Record<ProjectionName, LoraFactors>>;


function singleShardQ4(lin: FrozenLinear): Q4Rows | null {
  const r = q4RowsOf(lin);
  return r && r.W.shards.length === 1 ? r : null;
}

/**
 * Whether decode steps of B rows can run on the fused kernels: every projection a
 * single-shard 4-bit weight, B <= 32, and all adapted projections of one rank.
 */
export function fusedDecodeSupported(w: LlamaWeights, lora: ReadonlyArray<LayerLora> | null, B: number): boolean {
  if (B < 1 || B > Q4_FUSED_MAX_N || B > LORA_BATCHED_MAX_N) return false;
  let rank = -1;
  for (let l = 0; l < w.layers.length; l++) {
    const layer = w.layers[l]!;
    for (const p of LAYER_PROJECTIONS) {
      if (!singleShardQ4(layer[p])) return false;
      const f = lora?.[l]?.[p];
      if (f) {
        const r = f.A.shape[0]!;
        if (rank >= 0 && r !== rank) return false;
        rank = r;
      }
    }
  }
  return true;
}

interface Item {
  W: Q4Weight;
  rowStart: number;
  rows: number;
  yOffset: number;
  f: LoraFactors | null;
}

/**
 * y [N, yStride] (accumulate ? += : =) at each item's columns: x W^T (+ LoRA), in as
 * few fused dispatches as the device's binding limit allows (one where it fits).
 */
function projectRows(gpu: Gpu, y: Tensor, x: Tensor, N: number, items: readonly Item[], yStride: number, accumulate: boolean, given: Tensor | null = null): void {
  const adapted = items.filter((it) => it.f !== null);
  const R = adapted[0]?.f!.A.shape[0] ?? 0;
  const u = given ?? (adapted.length > 0 ? loraDownProducts(gpu, x, N, items[0]!.W.K, adapted.map(loraTerm)) : null);
  let start = 0;
  let uNext = 0;
  while (start < items.length) {
    let end = start + 1;
    while (end < items.length && q4FusedUnsupported(gpu, segments(items, start, end + 1), N) === null) end++;
    const segs = segments(items, start, end);
    const lora = segs[0]!.B != null;
    q4FusedGemv(gpu, y, x, N, segs, { yStride, accumulate, u: lora ? u : null, R, uBase: lora ? uNext : 0 });
    if (lora) uNext += segs.length;
    start = end;
  }
  if (!given) u?.release();
}

const loraTerm = (it: Item) => ({ A: it.f!.A, scale: it.f!.scale });

/**
 * h [N, C] = rmsnorm(x) and, when every item is adapted, the items' LoRA A products
 * from the same dispatch (returned; the caller releases them), else null.
 */
function normAndDown(gpu: Gpu, h: Tensor, rstd: Tensor, x: Tensor, normW: Tensor, eps: number, N: number, C: number, items: readonly Item[], pending: PendingLora | null = null): Tensor | null {
  if (items.every((it) => it.f !== null)) return loraNormDownProducts(gpu, h, x, normW, eps, N, C, items.map(loraTerm), pending);
  if (pending) throw new Error('fused decode: a deferred LoRA B product needs an adapted norm group');
  rmsnormForward(gpu, h, rstd, x, normW, N, C, eps);
  return null;
}

function segments(items: readonly Item[], start: number, end: number): Q4FusedSegment[] {
  const out: Q4FusedSegment[] = [];
  for (let i = start; i < end; i++) {
    const it = items[i]!;
    out.push({ W: it.W, rowStart: it.rowStart, rows: it.rows, yOffset: it.yOffset, B: it.f?.B ?? null });
  }
  return out;
}

/** act [N, F] = silu(x Wg^T + ..) * (x Wu^T + ..): one dispatch where the bindings fit, else two GEMVs and a SwiGLU. */
function gateUp(gpu: Gpu, act: Tensor, x: Tensor, N: number, gate: Item, up: Item, F: number, given: Tensor | null): void {
  const segs = [
    { W: gate.W, rowStart: gate.rowStart, rows: gate.rows, yOffset: 0, B: gate.f?.B ?? null },
    { W: up.W, rowStart: up.rowStart, rows: up.rows, yOffset: 0, B: up.f?.B ?? null },
  ];
  if (q4FusedUnsupported(gpu, segs, N) === null) {
    const both = gate.f && up.f;
    const u = given ?? (both ? loraDownProducts(gpu, x, N, gate.W.K, [gate.f!, up.f!]) : null);
    q4FusedGemv(gpu, act, x, N, segs, { mode: 'swiglu', yStride: F, u, R: both ? gate.f!.A.shape[0]! : 0 });
    if (!given) u?.release();
    return;
  }
  const g = gpu.empty([N, F], 'f32', 'gate');
  const v = gpu.empty([N, F], 'f32', 'up');
  // Both adapted: one set of A products [2, N, R] serves the two GEMVs.
  const u = given ?? (gate.f && up.f ? loraDownProducts(gpu, x, N, gate.W.K, [gate.f, up.f]) : null);
  projectRows(gpu, g, x, N, [gate], F, false, u);
  if (u) {
    const R = gate.f!.A.shape[0]!;
    q4FusedGemv(gpu, v, x, N, segments([up], 0, 1), { yStride: F, u, R, uBase: 1 });
  } else {
    projectRows(gpu, v, x, N, [up], F, false);
  }
  if (!given) u?.release();
  swigluForward(gpu, act, g, v, N * F);
  v.release();
  g.release();
}

/**
 * y [N, C] += x W^T + pending.u pending.B^T (the previous deferred LoRA B product, if
 * any), and down.u = scale x A^T from the same dispatch.
 */
function residualWithDown(gpu: Gpu, y: Tensor, x: Tensor, N: number, it: Item, C: number, pending: PendingLora | null, down: Q4FusedDown): void {
  const seg: Q4FusedSegment = { W: it.W, rowStart: it.rowStart, rows: it.rows, yOffset: 0, B: pending?.B ?? null };
  q4FusedGemv(gpu, y, x, N, [seg], { yStride: C, accumulate: true, u: pending?.u ?? null, R: pending ? down.A.shape[0]! : 0, down });
}

/**
 * Carried from one layer of a decode step to the next (fusedDecodeCarry makes one per
 * step): whether LoRA B products are deferred, and the one still to be added.
 */
export interface FusedDecodeCarry {
  readonly defer: boolean;
  /** the layer the next fusedDecodeLayer call must run */
  next: number;
  pending: PendingLora | null;
}

/**
 * A step's carry: deferral needs every projection of every layer adapted (one rank,
 * as fusedDecodeSupported checks) and the binding counts within the device's limit.
 */
export function fusedDecodeCarry(gpu: Gpu, w: LlamaWeights, lora: ReadonlyArray<LayerLora> | null, B: number): FusedDecodeCarry {
  return { defer: lora !== null && canDefer(gpu, w, lora, B), next: 0, pending: null };
}

function canDefer(gpu: Gpu, w: LlamaWeights, lora: ReadonlyArray<LayerLora>, B: number): boolean {
  if (loraNormDownBindings(3, true) > gpu.caps.maxStorageBuffersPerShaderStage) return false;
  for (let l = 0; l < w.layers.length; l++) {
    const layer = w.layers[l]!;
    const ad = lora[l];
    if (!ad || LAYER_PROJECTIONS.some((p) => !ad[p])) return false;
    for (const p of ['o', 'down'] as const) {
      const r = q4RowsOf(layer[p])!;
      if (q4FusedUnsupported(gpu, [{ W: r.W, rowStart: r.rowStart, rows: r.rows, yOffset: 0, B: ad[p]!.B }], B, true) !== null) return false;
    }
  }
  return true;
}

/** The cache of one layer and the step's per-row vectors. */
export interface FusedDecodeCache {
  k: Tensor;
  v: Tensor;
  Smax: number;
  /** [B] u32 rope positions */
  positions: Tensor;
  /** [B] u32 cache rows written this step */
  offsets: Tensor;
}

/**
 * x [B, C] += decoder layer l (module comment). `attend` writes att [B, H, D] from the
 * roped q [B, H, D]; the step's k and v are already in the cache when it runs. With a
 * carry, the layers run in order 0 .. L-1 on one x (LoRA B products may be deferred
 * from one layer to the next; the last layer adds what is left).
 */
export function fusedDecodeLayer(
  gpu: Gpu,
  w: LlamaWeights,
  l: number,
  lora: ReadonlyArray<LayerLora> | null,
  x: Tensor,
  B: number,
  cache: FusedDecodeCache,
  attend: (att: Tensor, q: Tensor) => void,
  carry: FusedDecodeCarry | null = null,
): void {
  const { hiddenSize: C, intermediateSize: F, numHeads: H, numKvHeads: HK, headDim: D, rmsNormEps: eps } = w.config;
  const layer = w.layers[l]!;
  const ad = lora?.[l] ?? null;
  if (carry && carry.next !== l) throw new Error(`fusedDecodeLayer: layer ${l} called where the step's carry expects layer ${carry.next}`);
  if (carry) carry.next = l + 1;
  const defer = carry?.defer === true;
  const pendingIn = carry?.pending ?? null;
  if (carry) carry.pending = null;
  const item = (p: ProjectionName, yOffset: number): Item => ({ ...q4RowsOf(layer[p])!, yOffset, f: ad?.[p] ?? null });

  const rstd = gpu.empty([B], 'f32', 'rstd');
  const h = gpu.empty([B, C], 'f32', 'h');
  const qkvItems = [item('q', 0), item('k', H * D), item('v', (H + HK) * D)];
  const uQkv = normAndDown(gpu, h, rstd, x, layer.inputNorm, eps, B, C, qkvItems, pendingIn);
  const qkvCols = (H + 2 * HK) * D;
  const qkv = gpu.empty([B, qkvCols], 'f32', 'qkv');
  projectRows(gpu, qkv, h, B, qkvItems, qkvCols, false, uQkv);
  uQkv?.release();
  h.release();
  const q = gpu.empty([B, H, D], 'f32', 'q');
  ropeKvWrite(gpu, q, cache.k, cache.v, qkv, w.invFreq, cache.positions, cache.offsets, { B, H, HK, D, Smax: cache.Smax });
  qkv.release();
  const att = gpu.empty([B, H, D], 'f32', 'att');
  attend(att, q);
  q.release();
  let pendingO: PendingLora | null = null;
  if (defer) {
    const o = ad!.o!;
    pendingO = { u: gpu.empty([B, o.A.shape[0]!], 'f32', 'lora-u'), B: o.B };
    residualWithDown(gpu, x, att, B, item('o', 0), C, pendingIn, { A: o.A, scale: o.scale, u: pendingO.u });
  } else {
    projectRows(gpu, x, att, B, [item('o', 0)], C, true);
  }
  pendingIn?.u.release();
  att.release();

  const h2 = gpu.empty([B, C], 'f32', 'h2');
  const gateItem = item('gate', 0);
  const upItem = item('up', 0);
  const uGateUp = normAndDown(gpu, h2, rstd, x, layer.postNorm, eps, B, C, [gateItem, upItem], pendingO);
  rstd.release();
  const act = gpu.empty([B, F], 'f32', 'act');
  gateUp(gpu, act, h2, B, gateItem, upItem, F, uGateUp);
  uGateUp?.release();
  h2.release();
  if (defer) {
    const d = ad!.down!;
    const R = d.A.shape[0]!;
    const uD = gpu.empty([B, R], 'f32', 'lora-u');
    residualWithDown(gpu, x, act, B, item('down', 0), C, pendingO, { A: d.A, scale: d.scale, u: uD });
    pendingO!.u.release();
    if (l + 1 < w.layers.length) {
      carry!.pending = { u: uD, B: d.B };
    } else {
      rowsForward(gpu, x, uD, d.B, B, R, 0, C, true);
      uD.release();
    }
  } else {
    projectRows(gpu, x, act, B, [item('down', 0)], C, true);
  }
  act.release();
}
