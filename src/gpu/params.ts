/**
 * Builder for a kernel's uniform block. Fields are 4 bytes each, written in the
 * order the WGSL `struct Params` declares them (all u32/i32/f32 scalars, so WGSL's
 * uniform layout is simply consecutive 4-byte slots).
 */
export class Params {
  private readonly view: DataView;
  private offset = 0;

  constructor(private readonly capacity = 64) {
    this.view = new DataView(new ArrayBuffer(capacity * 4));
  }

  u32(v: number): this {
    if (!Number.isInteger(v) || v < 0 || v > 0xffffffff) throw new Error(`Params.u32: ${v} is not a u32`);
    this.view.setUint32(this.slot(), v, true);
    return this;
  }

  i32(v: number): this {
    if (!Number.isInteger(v) || v < -0x80000000 || v > 0x7fffffff) throw new Error(`Params.i32: ${v} is not an i32`);
    this.view.setInt32(this.slot(), v, true);
    return this;
  }

  f32(v: number): this {
    this.view.setFloat32(this.slot(), v, true);
    return this;
  }

  /** Bytes written so far, padded to 16 (WGSL uniform structs are 16-byte aligned). */
  bytes(): Uint8Array {
    const n = Math.max(16, Math.ceil(this.offset / 16) * 16);
    return new Uint8Array(this.view.buffer, 0, n);
  }

  private slot(): number {
    if (this.offset >= this.capacity * 4) throw new Error('Params: too many fields');
    const o = this.offset;
    this.offset += 4;
    return o;
  }
}
