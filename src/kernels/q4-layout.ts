/**
 * The lab's 4-bit weight layout: byte-for-byte onnxruntime's MatMulNBits (bits=4,
 * block_size=32), so onnx-community 4-bit checkpoints import as plain copies.
 *
 * A linear weight W is [M, K] (nn.Linear: M out features, K in features), y = x W^T.
 * Quantization runs along K in blocks of 32; nb = ceil(K / 32) blocks per row (the
 * tail of the last block is padding, quantized as zeros and never read).
 *
 *   qweight  bytes [M, nb, 16]  byte j of a block: element 2j in the low nibble,
 *                               element 2j+1 in the high nibble. Read as u32 words:
 *                               word (m*nb + b)*4 + w, nibble i (bits 4i..4i+3) is
 *                               element k = b*32 + w*8 + i.
 *   scales   f16   [M, nb]      packed two per u32 (unpack2x16float: low half first)
 *   zeros    u8    [M, ceil(nb/2)] optional 4-bit zero points, low nibble = even
 *                               block. Absent: every zero point is 8.
 *   value(m, k) = (q - zero) * scale
 *
 * Large matrices (the tied 128256 x 3072 embedding / LM head) are split into row
 * shards so that no single buffer exceeds the device's storage binding limit.
 */
import type { Gpu } from '../gpu/gpu';
import type { Tensor } from '../gpu/tensor';

export const Q4_BLOCK = 32;
export const Q4_BLOCK_BYTES = 16;

export interface Q4Shard {
  /** first row of W held by this shard */
  rowStart: number;
  rows: number;
  /** u32 [rows * nb * 4] */
  qweight: Tensor;
  /** u32 [ceil(rows * nb / 2)] holding f16 pairs */
  scales: Tensor;
  /** u32 [ceil(rows * ceil(nb/2) / 4)] holding u8 zero-point pairs, or null (zero point 8) */
  zeros: Tensor | null;
}

export interface Q4Weight {
  M: number;
  K: number;
  /** blocks per row: ceil(K / 32) */
  nb: number;
  shards: Q4Shard[];
}

export function q4Blocks(K: number): number {
  return Math.ceil(K / Q4_BLOCK);
}

/** Bytes the weight occupies on the GPU (qweight + scales + zero points). */
export function q4Bytes(M: number, K: number, withZeros: boolean): number {
  const nb = q4Blocks(K);
  return M * nb * Q4_BLOCK_BYTES + M * nb * 2 + (withZeros ? M * Math.ceil(nb / 2) : 0);
}

export function releaseQ4(w: Q4Weight): void {
  for (const s of w.shards) {
    s.qweight.release();
    s.scales.release();
    s.zeros?.release();
  }
}

/**
 * Rows per shard so that the largest of a shard's buffers stays within `maxBindingBytes`.
 * Shards start on even rows so each shard's zero-point bytes begin on a u32 boundary
 * when rows * ceil(nb/2) is a multiple of 4 (rows rounded to a multiple of 8).
 */
export function q4ShardRows(M: number, K: number, maxBindingBytes: number): number {
  const perRow = q4Blocks(K) * Q4_BLOCK_BYTES;
  const rows = Math.floor(maxBindingBytes / perRow);
  if (rows >= M) return M;
  const aligned = rows - (rows % 8);
  if (aligned < 8) throw new Error(`q4: one row of ${K} features does not fit a ${maxBindingBytes}-byte binding`);
  return aligned;
}

/**
 * Uploads packed 4-bit data (already in the layout above: our quantizer's output or an
 * ONNX MatMulNBits initializer) as a sharded Q4Weight, copying bytes as they are.
 */
export function uploadQ4(
  gpu: Gpu,
  packed: { qweight: Uint8Array; scales: Uint16Array; zeros: Uint8Array | null },
  M: number,
  K: number,
  maxShardBytes = gpu.caps.maxStorageBufferBindingSize,
): Q4Weight {
  const nb = q4Blocks(K);
  const zb = Math.ceil(nb / 2);
  if (packed.qweight.byteLength !== M * nb * Q4_BLOCK_BYTES) {
    throw new Error(`q4: qweight has ${packed.qweight.byteLength} bytes, expected ${M * nb * Q4_BLOCK_BYTES} for [${M}, ${K}]`);
  }
  if (packed.scales.length !== M * nb) throw new Error(`q4: scales has ${packed.scales.length} entries, expected ${M * nb}`);
  if (packed.zeros && packed.zeros.byteLength !== M * zb) {
    throw new Error(`q4: zero points have ${packed.zeros.byteLength} bytes, expected ${M * zb}`);
  }
  const rowsPer = q4ShardRows(M, K, maxShardBytes);
  const shards: Q4Shard[] = [];
  for (let r0 = 0; r0 < M; r0 += rowsPer) {
    const rows = Math.min(rowsPer, M - r0);
    const q = packed.qweight.subarray(r0 * nb * Q4_BLOCK_BYTES, (r0 + rows) * nb * Q4_BLOCK_BYTES);
    const s = packed.scales.subarray(r0 * nb, (r0 + rows) * nb);
    shards.push({
      rowStart: r0,
      rows,
      qweight: gpu.upload(q, [(rows * nb * Q4_BLOCK_BYTES) / 4], 'u32', 'q4.qweight'),
      scales: gpu.upload(s, [Math.ceil((rows * nb) / 2)], 'u32', 'q4.scales'),
      zeros: packed.zeros
        ? gpu.upload(packed.zeros.subarray(r0 * zb, (r0 + rows) * zb), [Math.ceil((rows * zb) / 4)], 'u32', 'q4.zeros')
        : null,
    });
  }
  return { M, K, nb, shards };
}

/**
 * Reads a Q4Weight back to host bytes in the packed layout (the inverse of uploadQ4):
 * for tests, and for caching a GPU-quantized model.
 */
export async function downloadQ4(
  gpu: Gpu,
  w: Q4Weight,
): Promise<{ M: number; K: number; qweight: Uint8Array; scales: Uint16Array; zeros: Uint8Array | null }> {
  const { M, K, nb } = w;
  const zb = Math.ceil(nb / 2);
  const withZeros = w.shards[0]?.zeros != null;
  const qweight = new Uint8Array(M * nb * Q4_BLOCK_BYTES);
  const scales = new Uint16Array(M * nb);
  const zeros = withZeros ? new Uint8Array(M * zb) : null;
  for (const s of w.shards) {
    const q = await gpu.readBytes(s.qweight.buffer, 0, s.rows * nb * Q4_BLOCK_BYTES);
    qweight.set(new Uint8Array(q), s.rowStart * nb * Q4_BLOCK_BYTES);
    const sc = await gpu.readBytes(s.scales.buffer, 0, s.rows * nb * 2);
    scales.set(new Uint16Array(sc), s.rowStart * nb);
    if (zeros && s.zeros) {
      const z = await gpu.readBytes(s.zeros.buffer, 0, s.rows * zb);
      zeros.set(new Uint8Array(z), s.rowStart * zb);
    }
  }
  return { M, K, qweight, scales, zeros };
}
