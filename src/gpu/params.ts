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

/** WGSL scalar types a uniform field can have. */
export type UniformType = 'u32' | 'i32' | 'f32';

/**
 * A kernel's uniform block declared once: `wgsl` is the WGSL struct, `params(values)`
 * writes a Params in the declared order from named values. A field missing from
 * `values`, an unknown name, or a swapped pair of fields of different types cannot
 * reach the GPU silently (missing and unknown names throw; the order comes from the
 * declaration, not from the call site).
 *
 *   const U = uniforms('Params', { N: 'u32', K: 'u32', scale: 'f32' });
 *   code: `${U.wgsl} @group(0) @binding(0) var<uniform> p: Params; ...`
 *   gpu.dispatch(kernel, bindings, grid, U.params({ N, K, scale }));
 */
export interface UniformBlock<F extends Record<string, UniformType>> {
  readonly wgsl: string;
  readonly fields: F;
  params(values: { readonly [K in keyof F]: number }): Params;
}

export function uniforms<F extends Record<string, UniformType>>(name: string, fields: F): UniformBlock<F> {
  const names = Object.keys(fields);
  if (names.length === 0) throw new Error(`uniforms ${name}: no fields`);
  if (names.length > 64) throw new Error(`uniforms ${name}: ${names.length} fields exceed the 64 a Params holds`);
  const wgsl = `struct ${name} { ${names.map((n) => `${n}: ${fields[n]}`).join(', ')} }`;
  return {
    wgsl,
    fields,
    params(values) {
      const p = new Params(Math.ceil(names.length / 4) * 4); // bytes() pads to 16
      for (const n of names) {
        const v = (values as Record<string, number>)[n];
        if (v === undefined) throw new Error(`uniforms ${name}: field ${n} has no value`);
        p[fields[n]!](v);
      }
      if (Object.keys(values).length !== names.length) {
        const extra = Object.keys(values).filter((k) => !(k in fields));
        throw new Error(`uniforms ${name}: unknown field(s) ${extra.join(', ')}`);
      }
      return p;
    },
  };
}
