/**
 * A typed subset of the ONNX protobuf schema (onnx.proto): enough to build small
 * models in code (one MatMulNBits node for the 4-bit kernel tests) and to read the
 * graph, nodes and initializers of exported models.
 *
 * The wire format is written and read by hand (varints, length-delimited fields,
 * little-endian fixed32/64). Large `raw_data` is never copied while encoding until the
 * final concatenation, and decoding returns views into the input bytes. Unknown
 * fields are skipped on decode. int64 fields are JavaScript numbers (exact up to 2^53;
 * negative values such as -1 dims are supported).
 */

export const ONNX_DATA_TYPE = {
  FLOAT: 1,
  UINT8: 2,
  INT8: 3,
  UINT16: 4,
  INT16: 5,
  INT32: 6,
  INT64: 7,
  STRING: 8,
  BOOL: 9,
  FLOAT16: 10,
  DOUBLE: 11,
  UINT32: 12,
  UINT64: 13,
  BFLOAT16: 16,
} as const;

/** AttributeProto.AttributeType values for the attribute kinds modelled here. */
const ATTRIBUTE_TYPE = { float: 1, int: 2, string: 3, tensor: 4, floats: 6, ints: 7, strings: 8 } as const;

export interface OnnxTensor {
  name: string;
  /** ONNX_DATA_TYPE value */
  dataType: number;
  dims: number[];
  /** little-endian element bytes (the usual storage) */
  rawData?: Uint8Array;
  floatData?: number[];
  int32Data?: number[];
  int64Data?: number[];
  /** key/value pairs (location, offset, length) when data_location is EXTERNAL (1) */
  externalData?: { key: string; value: string }[];
  dataLocation?: number;
}

export type OnnxAttribute =
  | { name: string; type: 'float'; f: number }
  | { name: string; type: 'int'; i: number }
  | { name: string; type: 'string'; s: Uint8Array }
  | { name: string; type: 'tensor'; t: OnnxTensor }
  | { name: string; type: 'floats'; floats: number[] }
  | { name: string; type: 'ints'; ints: number[] }
  | { name: string; type: 'strings'; strings: Uint8Array[] };

export interface OnnxNode {
  name: string;
  opType: string;
  /** operator set domain: '' (ai.onnx) or e.g. 'com.microsoft' */
  domain: string;
  inputs: string[];
  outputs: string[];
  attributes: OnnxAttribute[];
}

/** A tensor-typed graph input or output; a string dimension is symbolic (dim_param). */
export interface OnnxValueInfo {
  name: string;
  elemType: number;
  shape: (number | string)[];
}

export interface OnnxGraph {
  name: string;
  nodes: OnnxNode[];
  initializers: OnnxTensor[];
  inputs: OnnxValueInfo[];
  outputs: OnnxValueInfo[];
}

export interface OnnxOpset {
  domain: string;
  version: number;
}

export interface OnnxModel {
  irVersion: number;
  producerName: string;
  opsetImports: OnnxOpset[];
  graph: OnnxGraph;
}

// ---- wire format: writing --------------------------------------------------------

const WIRE_VARINT = 0;
const WIRE_FIXED64 = 1;
const WIRE_BYTES = 2;
const WIRE_FIXED32 = 5;

const utf8 = new TextEncoder();

/** Collects a message as byte chunks; nested messages are spliced in without copying. */
class ProtoWriter {
  private chunks: Uint8Array[] = [];
  private scratch: number[] = [];
  length = 0;

  private flushScratch(): void {
    if (this.scratch.length === 0) return;
    this.chunks.push(Uint8Array.from(this.scratch));
    this.scratch = [];
  }

  private byte(b: number): void {
    this.scratch.push(b);
    this.length++;
  }

  varint(v: number): void {
    if (!Number.isInteger(v)) throw new Error(`onnx-proto: ${v} is not an integer`);
    if (v < 0) {
      let big = BigInt.asUintN(64, BigInt(v));
      while (big >= 0x80n) {
        this.byte(Number(big & 0x7fn) | 0x80);
        big >>= 7n;
      }
      this.byte(Number(big));
      return;
    }
    while (v >= 0x80) {
      this.byte((v % 0x80) | 0x80);
      v = Math.floor(v / 0x80);
    }
    this.byte(v);
  }

  tag(field: number, wire: number): void {
    this.varint(field * 8 + wire);
  }

  bytes(field: number, data: Uint8Array): void {
    this.tag(field, WIRE_BYTES);
    this.varint(data.byteLength);
    this.flushScratch();
    this.chunks.push(data);
    this.length += data.byteLength;
  }

  string(field: number, s: string): void {
    this.bytes(field, utf8.encode(s));
  }

  int(field: number, v: number): void {
    this.tag(field, WIRE_VARINT);
    this.varint(v);
  }

  float(field: number, v: number): void {
    this.tag(field, WIRE_FIXED32);
    const b = new Uint8Array(4);
    new DataView(b.buffer).setFloat32(0, v, true);
    for (const x of b) this.byte(x);
  }

  packedVarints(field: number, values: readonly number[]): void {
    if (values.length === 0) return;
    const inner = new ProtoWriter();
    for (const v of values) inner.varint(v);
    this.message(field, inner);
  }

  packedFloats(field: number, values: readonly number[]): void {
    if (values.length === 0) return;
    const b = new Uint8Array(values.length * 4);
    const dv = new DataView(b.buffer);
    values.forEach((v, i) => dv.setFloat32(i * 4, v, true));
    this.bytes(field, b);
  }

  message(field: number, sub: ProtoWriter): void {
    this.tag(field, WIRE_BYTES);
    this.varint(sub.length);
    this.flushScratch();
    sub.flushScratch();
    this.chunks.push(...sub.chunks);
    this.length += sub.length;
  }

  finish(): Uint8Array {
    this.flushScratch();
    const out = new Uint8Array(this.length);
    let o = 0;
    for (const c of this.chunks) {
      out.set(c, o);
      o += c.byteLength;
    }
    return out;
  }
}

function writeTensor(t: OnnxTensor): ProtoWriter {
  const w = new ProtoWriter();
  w.packedVarints(1, t.dims);
  w.int(2, t.dataType);
  if (t.floatData) w.packedFloats(4, t.floatData);
  if (t.int32Data) w.packedVarints(5, t.int32Data);
  if (t.int64Data) w.packedVarints(7, t.int64Data);
  w.string(8, t.name);
  if (t.rawData) w.bytes(9, t.rawData);
  for (const e of t.externalData ?? []) {
    const kv = new ProtoWriter();
    kv.string(1, e.key);
    kv.string(2, e.value);
    w.message(13, kv);
  }
  if (t.dataLocation !== undefined) w.int(14, t.dataLocation);
  return w;
}

function writeAttribute(a: OnnxAttribute): ProtoWriter {
  const w = new ProtoWriter();
  w.string(1, a.name);
  switch (a.type) {
    case 'float':
      w.float(2, a.f);
      break;
    case 'int':
      w.int(3, a.i);
      break;
    case 'string':
      w.bytes(4, a.s);
      break;
    case 'tensor':
      w.message(5, writeTensor(a.t));
      break;
    case 'floats':
      w.packedFloats(7, a.floats);
      break;
    case 'ints':
      w.packedVarints(8, a.ints);
      break;
    case 'strings':
      for (const s of a.strings) w.bytes(9, s);
      break;
  }
  w.int(20, ATTRIBUTE_TYPE[a.type]);
  return w;
}

function writeNode(n: OnnxNode): ProtoWriter {
  const w = new ProtoWriter();
  for (const s of n.inputs) w.string(1, s);
  for (const s of n.outputs) w.string(2, s);
  if (n.name) w.string(3, n.name);
  w.string(4, n.opType);
  for (const a of n.attributes) w.message(5, writeAttribute(a));
  if (n.domain) w.string(7, n.domain);
  return w;
}

function writeValueInfo(v: OnnxValueInfo): ProtoWriter {
  const shape = new ProtoWriter();
  for (const d of v.shape) {
    const dim = new ProtoWriter();
    if (typeof d === 'number') dim.int(1, d);
    else dim.string(2, d);
    shape.message(1, dim);
  }
  const tensorType = new ProtoWriter();
  tensorType.int(1, v.elemType);
  tensorType.message(2, shape);
  const type = new ProtoWriter();
  type.message(1, tensorType);
  const w = new ProtoWriter();
  w.string(1, v.name);
  w.message(2, type);
  return w;
}

function writeGraph(g: OnnxGraph): ProtoWriter {
  const w = new ProtoWriter();
  for (const n of g.nodes) w.message(1, writeNode(n));
  w.string(2, g.name);
  for (const t of g.initializers) w.message(5, writeTensor(t));
  for (const v of g.inputs) w.message(11, writeValueInfo(v));
  for (const v of g.outputs) w.message(12, writeValueInfo(v));
  return w;
}

export function encodeOnnxModel(m: OnnxModel): Uint8Array {
  const w = new ProtoWriter();
  w.int(1, m.irVersion);
  if (m.producerName) w.string(2, m.producerName);
  w.message(7, writeGraph(m.graph));
  for (const o of m.opsetImports) {
    const op = new ProtoWriter();
    if (o.domain) op.string(1, o.domain);
    op.int(2, o.version);
    w.message(8, op);
  }
  return w.finish();
}

// ---- wire format: reading --------------------------------------------------------

export class OnnxDecodeError extends Error {
  constructor(message: string) {
    super(`ONNX protobuf: ${message}`);
    this.name = 'OnnxDecodeError';
  }
}

const utf8Decoder = new TextDecoder();

class ProtoReader {
  pos: number;
  readonly end: number;

  constructor(
    readonly buf: Uint8Array,
    start = 0,
    end = buf.byteLength,
  ) {
    this.pos = start;
    this.end = end;
  }

  get done(): boolean {
    return this.pos >= this.end;
  }

  varint(): number {
    let result = 0;
    let scale = 1;
    const start = this.pos;
    for (let i = 0; i < 10; i++) {
      if (this.pos >= this.end) throw new OnnxDecodeError(`varint runs past the end at byte ${start}`);
      const b = this.buf[this.pos++]!;
      if (i === 9 || (i >= 7 && b & 0x80)) return this.bigVarint(start);
      result += (b & 0x7f) * scale;
      if (!(b & 0x80)) return result;
      scale *= 128;
    }
    throw new OnnxDecodeError(`varint longer than 10 bytes at byte ${start}`);
  }

  /** Slow path for varints of 8+ bytes (negative int64 values). */
  private bigVarint(start: number): number {
    let v = 0n;
    let shift = 0n;
    this.pos = start;
    for (let i = 0; i < 10; i++) {
      const b = this.buf[this.pos++]!;
      v |= BigInt(b & 0x7f) << shift;
      if (!(b & 0x80)) return Number(BigInt.asIntN(64, v));
      shift += 7n;
    }
    throw new OnnxDecodeError(`varint longer than 10 bytes at byte ${start}`);
  }

  bytes(): Uint8Array {
    const n = this.varint();
    if (this.pos + n > this.end) throw new OnnxDecodeError(`a ${n}-byte field at byte ${this.pos} runs past the end`);
    const out = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }

  string(): string {
    return utf8Decoder.decode(this.bytes());
  }

  float(): number {
    if (this.pos + 4 > this.end) throw new OnnxDecodeError(`float at byte ${this.pos} runs past the end`);
    const v = new DataView(this.buf.buffer, this.buf.byteOffset + this.pos, 4).getFloat32(0, true);
    this.pos += 4;
    return v;
  }

  sub(): ProtoReader {
    const b = this.bytes();
    return new ProtoReader(this.buf, b.byteOffset - this.buf.byteOffset, b.byteOffset - this.buf.byteOffset + b.byteLength);
  }

  skip(wire: number): void {
    switch (wire) {
      case WIRE_VARINT:
        this.varint();
        return;
      case WIRE_FIXED64:
        this.pos += 8;
        return;
      case WIRE_BYTES:
        this.bytes();
        return;
      case WIRE_FIXED32:
        this.pos += 4;
        return;
      default:
        throw new OnnxDecodeError(`unsupported wire type ${wire} at byte ${this.pos}`);
    }
  }

  /** Repeated varints, packed (wire 2) or one per tag (wire 0). */
  varints(wire: number, into: number[]): void {
    if (wire === WIRE_BYTES) {
      const r = this.sub();
      while (!r.done) into.push(r.varint());
    } else into.push(this.varint());
  }

  /** Repeated floats, packed (wire 2) or one per tag (wire 5). */
  floats(wire: number, into: number[]): void {
    if (wire === WIRE_BYTES) {
      const r = this.sub();
      while (!r.done) into.push(r.float());
    } else into.push(this.float());
  }

  /** Calls `field` for each field until the end; unknown fields are skipped by returning false. */
  fields(field: (no: number, wire: number) => boolean): void {
    while (!this.done) {
      const tag = this.varint();
      const no = Math.floor(tag / 8);
      const wire = tag & 7;
      if (!field(no, wire)) this.skip(wire);
    }
  }
}

function readTensor(r: ProtoReader): OnnxTensor {
  const t: OnnxTensor = { name: '', dataType: 0, dims: [] };
  r.fields((no, wire) => {
    switch (no) {
      case 1:
        r.varints(wire, t.dims);
        return true;
      case 2:
        t.dataType = r.varint();
        return true;
      case 4:
        r.floats(wire, (t.floatData ??= []));
        return true;
      case 5:
        r.varints(wire, (t.int32Data ??= []));
        return true;
      case 7:
        r.varints(wire, (t.int64Data ??= []));
        return true;
      case 8:
        t.name = r.string();
        return true;
      case 9:
        t.rawData = r.bytes();
        return true;
      case 13: {
        const kv = r.sub();
        const e = { key: '', value: '' };
        kv.fields((n) => {
          if (n === 1) e.key = kv.string();
          else if (n === 2) e.value = kv.string();
          else return false;
          return true;
        });
        (t.externalData ??= []).push(e);
        return true;
      }
      case 14:
        t.dataLocation = r.varint();
        return true;
      default:
        return false;
    }
  });
  return t;
}

function readAttribute(r: ProtoReader): OnnxAttribute {
  let name = '';
  let type = 0;
  let f = 0;
  let i = 0;
  let s: Uint8Array = new Uint8Array(0);
  let t: OnnxTensor | null = null;
  const floats: number[] = [];
  const ints: number[] = [];
  const strings: Uint8Array[] = [];
  r.fields((no, wire) => {
    switch (no) {
      case 1:
        name = r.string();
        return true;
      case 2:
        f = r.float();
        return true;
      case 3:
        i = r.varint();
        return true;
      case 4:
        s = r.bytes();
        return true;
      case 5:
        t = readTensor(r.sub());
        return true;
      case 7:
        r.floats(wire, floats);
        return true;
      case 8:
        r.varints(wire, ints);
        return true;
      case 9:
        strings.push(r.bytes());
        return true;
      case 20:
        type = r.varint();
        return true;
      default:
        return false;
    }
  });
  switch (type) {
    case ATTRIBUTE_TYPE.float:
      return { name, type: 'float', f };
    case ATTRIBUTE_TYPE.int:
      return { name, type: 'int', i };
    case ATTRIBUTE_TYPE.string:
      return { name, type: 'string', s };
    case ATTRIBUTE_TYPE.tensor:
      if (!t) throw new OnnxDecodeError(`tensor attribute "${name}" has no tensor`);
      return { name, type: 'tensor', t };
    case ATTRIBUTE_TYPE.floats:
      return { name, type: 'floats', floats };
    case ATTRIBUTE_TYPE.ints:
      return { name, type: 'ints', ints };
    case ATTRIBUTE_TYPE.strings:
      return { name, type: 'strings', strings };
    default:
      throw new OnnxDecodeError(`attribute "${name}" has type ${type}, which this reader does not handle`);
  }
}

function readNode(r: ProtoReader): OnnxNode {
  const n: OnnxNode = { name: '', opType: '', domain: '', inputs: [], outputs: [], attributes: [] };
  r.fields((no) => {
    switch (no) {
      case 1:
        n.inputs.push(r.string());
        return true;
      case 2:
        n.outputs.push(r.string());
        return true;
      case 3:
        n.name = r.string();
        return true;
      case 4:
        n.opType = r.string();
        return true;
      case 5:
        n.attributes.push(readAttribute(r.sub()));
        return true;
      case 7:
        n.domain = r.string();
        return true;
      default:
        return false;
    }
  });
  return n;
}

function readValueInfo(r: ProtoReader): OnnxValueInfo {
  const v: OnnxValueInfo = { name: '', elemType: 0, shape: [] };
  r.fields((no) => {
    if (no === 1) {
      v.name = r.string();
      return true;
    }
    if (no !== 2) return false;
    const type = r.sub();
    type.fields((tno) => {
      if (tno !== 1) return false; // only tensor types are modelled
      const tt = type.sub();
      tt.fields((ttno) => {
        if (ttno === 1) {
          v.elemType = tt.varint();
          return true;
        }
        if (ttno !== 2) return false;
        const shape = tt.sub();
        shape.fields((sno) => {
          if (sno !== 1) return false;
          const dim = shape.sub();
          let d: number | string = '?';
          dim.fields((dno) => {
            if (dno === 1) d = dim.varint();
            else if (dno === 2) d = dim.string();
            else return false;
            return true;
          });
          v.shape.push(d);
          return true;
        });
        return true;
      });
      return true;
    });
    return true;
  });
  return v;
}

function readGraph(r: ProtoReader): OnnxGraph {
  const g: OnnxGraph = { name: '', nodes: [], initializers: [], inputs: [], outputs: [] };
  r.fields((no) => {
    switch (no) {
      case 1:
        g.nodes.push(readNode(r.sub()));
        return true;
      case 2:
        g.name = r.string();
        return true;
      case 5:
        g.initializers.push(readTensor(r.sub()));
        return true;
      case 11:
        g.inputs.push(readValueInfo(r.sub()));
        return true;
      case 12:
        g.outputs.push(readValueInfo(r.sub()));
        return true;
      default:
        return false;
    }
  });
  return g;
}

/** Decodes a ModelProto. Tensor bytes are views into `bytes`, not copies. */
export function decodeOnnxModel(bytes: Uint8Array): OnnxModel {
  const r = new ProtoReader(bytes);
  const m: OnnxModel = { irVersion: 0, producerName: '', opsetImports: [], graph: { name: '', nodes: [], initializers: [], inputs: [], outputs: [] } };
  let sawGraph = false;
  r.fields((no) => {
    switch (no) {
      case 1:
        m.irVersion = r.varint();
        return true;
      case 2:
        m.producerName = r.string();
        return true;
      case 7:
        m.graph = readGraph(r.sub());
        sawGraph = true;
        return true;
      case 8: {
        const o = r.sub();
        const op: OnnxOpset = { domain: '', version: 0 };
        o.fields((ono) => {
          if (ono === 1) op.domain = o.string();
          else if (ono === 2) op.version = o.varint();
          else return false;
          return true;
        });
        m.opsetImports.push(op);
        return true;
      }
      default:
        return false;
    }
  });
  if (!sawGraph) throw new OnnxDecodeError('the model has no graph (is this an ONNX file?)');
  return m;
}

// ---- small builders ----------------------------------------------------------------

export function intAttribute(name: string, i: number): OnnxAttribute {
  return { name, type: 'int', i };
}

/** An initializer holding `data`'s bytes as they are (little-endian, as on every supported host). */
export function rawTensor(name: string, dataType: number, dims: number[], data: ArrayBufferView): OnnxTensor {
  return { name, dataType, dims, rawData: new Uint8Array(data.buffer, data.byteOffset, data.byteLength) };
}
