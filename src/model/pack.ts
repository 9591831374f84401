/**
 * Packs each layer's q, k, v 4-bit weights into one Q4Weight [Mq + Mk + Mv, C] and its
 * gate, up weights into one [2F, C], so the fused decode GEMVs (q4-fused.ts) bind one
 * weight's buffers per group instead of three or two: q/k/v with LoRA and zero points
 * then needs 9 storage bindings instead of 15, within the 10 many browsers grant.
 *
 * The bytes are copied on the GPU (the layout is per row, so stacking rows stacks the
 * buffers), the projections become row views of the packed weight (q4RowsLinear: the
 * same numbers for training and prefill), and the originals are released and the
 * pool's free list trimmed layer by layer, so the peak is one layer's worth above the
 * model. Groups that cannot be packed (f32 or sharded weights, byte offsets off a
 * 4-byte boundary, a packed buffer past the binding limit) are left as they are.
 */
import type { Gpu } from '../gpu/gpu';
import type { Tensor } from '../gpu/tensor';
import { q4RowsLinear, q4RowsOf, type FrozenLinear } from '../kernels/linear';
import { Q4_BLOCK_BYTES, type Q4Weight } from '../kernels/q4-layout';
import type { LayerWeights, LlamaWeights } from './weights';

const packedModels = new WeakSet<LlamaWeights>();

type Field = 'q' | 'k' | 'v' | 'gate' | 'up';

/** Whole single-shard 4-bit weights of one K and zero-point kind whose stacked bytes stay 4-byte aligned, or null. */
function packable(gpu: Gpu, lins: readonly FrozenLinear[]): Q4Weight[] | null {
  const ws: Q4Weight[] = [];
  for (const lin of lins) {
    const r = q4RowsOf(lin);
    if (!r || r.rowStart !== 0 || r.rows !== r.W.M || r.W.shards.length !== 1) return null;
    ws.push(r.W);
  }
  const { K, nb } = ws[0]!;
  const zeros = ws[0]!.shards[0]!.zeros != null;
  const zb = Math.ceil(nb / 2);
  let rows = 0;
  for (const w of ws) {
    if (w.K !== K || (w.shards[0]!.zeros != null) !== zeros) return null;
    // every piece but the last must end on a 4-byte boundary in scales and zero points
    if (w !== ws[ws.length - 1] && ((w.M * nb * 2) % 4 !== 0 || (zeros && (w.M * zb) % 4 !== 0))) return null;
    rows += w.M;
  }
  const limit = Math.min(gpu.caps.maxStorageBufferBindingSize, gpu.caps.maxBufferSize);
  if (rows * nb * Q4_BLOCK_BYTES > limit) return null;
  return ws;
}

const pad4 = (n: number) => Math.ceil(n / 4) * 4;

/** One Q4Weight holding the rows of `ws` in order (GPU copies, recorded now). */
function stack(gpu: Gpu, ws: readonly Q4Weight[]): Q4Weight {
  const { K, nb } = ws[0]!;
  const zeros = ws[0]!.shards[0]!.zeros != null;
  const zb = Math.ceil(nb / 2);
  const M = ws.reduce((a, w) => a + w.M, 0);
  const qweight = gpu.empty([(M * nb * Q4_BLOCK_BYTES) / 4], 'u32', 'q4.qweight');
  const scales = gpu.empty([Math.ceil((M * nb) / 2)], 'u32', 'q4.scales');
  const zp = zeros ? gpu.empty([Math.ceil((M * zb) / 4)], 'u32', 'q4.zeros') : null;
  let row = 0;
  for (const w of ws) {
    const s = w.shards[0]!;
    gpu.copy(s.qweight, qweight, w.M * nb * Q4_BLOCK_BYTES, 0, row * nb * Q4_BLOCK_BYTES);
    gpu.copy(s.scales, scales, pad4(w.M * nb * 2), 0, row * nb * 2);
    if (zp && s.zeros) gpu.copy(s.zeros, zp, pad4(w.M * zb), 0, row * zb);
    row += w.M;
  }
  return { M, K, nb, shards: [{ rowStart: 0, rows: M, qweight, scales, zeros: zp }] };
}

function packGroup(gpu: Gpu, layer: LayerWeights, fields: readonly Field[], owned: Tensor[]): boolean {
  const ws = packable(gpu, fields.map((f) => layer[f]));
  if (!ws) return false;
  const packed = stack(gpu, ws);
  const s = packed.shards[0]!;
  owned.push(s.qweight, s.scales, ...(s.zeros ? [s.zeros] : []));
  let row = 0;
  fields.forEach((f, i) => {
    layer[f] = q4RowsLinear(packed, row, ws[i]!.M);
    row += ws[i]!.M;
  });
  for (const w of ws) for (const t of [w.shards[0]!.qweight, w.shards[0]!.scales, w.shards[0]!.zeros]) if (t && !t.isReleased) t.release();
  return true;
}

/**
 * Packs q/k/v and gate/up of every layer of a 4-bit model in place (module comment);
 * returns the number of groups packed. Calling it again is a no-op. The model's
 * release() then also releases the packed weights.
 */
export function packDecodeProjections(gpu: Gpu, w: LlamaWeights): number {
  if (packedModels.has(w)) return 0;
  packedModels.add(w);
  const owned: Tensor[] = [];
  let groups = 0;
  for (const layer of w.layers) {
    const n = Number(packGroup(gpu, layer, ['q', 'k', 'v'], owned)) + Number(packGroup(gpu, layer, ['gate', 'up'], owned));
    if (n > 0) {
      groups += n;
      // The copies must run before the released originals' memory is destroyed.
      gpu.flush();
      gpu.pool.trim();
    }
  }
  if (groups > 0) {
    const release = w.release.bind(w);
    w.release = () => {
      release();
      for (const t of owned) if (!t.isReleased) t.release();
    };
  }
  return groups;
}
