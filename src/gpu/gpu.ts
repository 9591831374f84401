/**
 * The GPU runtime every kernel runs on: device acquisition, buffer pool, pipeline
 * cache, command batching and readback. The same code runs on Dawn in Node and on
 * Chrome's WebGPU; nothing here touches the DOM.
 *
 * Batching: dispatches, clears and copies are recorded into one open command encoder
 * (consecutive dispatches share one compute pass); nothing is submitted until
 * flush(), sync() or a read. Each dispatch's uniforms live in a 256-byte slot of one
 * arena buffer that is written once per submit; the arena holds a whole decode step
 * of a 3B model with LoRA (about 1100 dispatches), so a token costs one submit.
 *
 * Host cost per dispatch: the pipeline is found by its KernelSource object (no WGSL
 * string work), and bind groups are cached by (pipeline, arena slot, buffers): a
 * decode step records the same dispatches on the same pooled buffers every token, so
 * after the first token its bind groups are reused rather than created.
 *
 * Record and replay: record(fn) runs fn without encoding anything, keeping what it
 * dispatched, copied and cleared as a CommandList (replay.ts) with its own uniforms
 * and bind groups; replay(list) encodes those commands again, none of fn's host work
 * repeated. A decode step is recorded once and replayed every token (infer.ts).
 */
import { BufferUsage, MapMode } from './flags';
import { BufferPool, type PoolStats } from './pool';
import { PipelineCache, type CachedPipeline, type KernelSource } from './pipelines';
import { Params } from './params';
import { CommandList, type ReplayCommand } from './replay';
import { DTYPE_BYTES, Tensor, numel, type DType } from './tensor';

export interface GpuCapabilities {
  adapterName: string;
  f16: boolean;
  subgroups: boolean;
  timestampQuery: boolean;
  maxBufferSize: number;
  maxStorageBufferBindingSize: number;
  maxComputeWorkgroupStorageSize: number;
  maxComputeInvocationsPerWorkgroup: number;
  maxStorageBuffersPerShaderStage: number;
  /** Plain-words notes about optional features this device lacks. */
  missing: string[];
}

export interface AcquireOptions {
  /** The WebGPU entry point: navigator.gpu in a browser, Dawn's GPU object in Node. */
  gpu?: GPU;
  powerPreference?: GPUPowerPreference;
  /** Ask for shader-f16 (default true when offered). */
  f16?: boolean;
  /** Ask for subgroups (default true when offered); false gives a device that runs the workgroup-memory fallbacks. */
  subgroups?: boolean;
}

export class GpuError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'GpuError';
  }
}

export class GpuDeviceLostError extends GpuError {
  constructor(readonly reason: string, detail: string) {
    super(
      `The GPU device was lost (${reason}${detail ? `: ${detail}` : ''}). ` +
        'Work in progress on the GPU is gone; saved runs and adapters are untouched. ' +
        'Reload the model to continue (close other GPU-heavy tabs if this repeats).',
    );
    this.name = 'GpuDeviceLostError';
  }
}

export type Binding = Tensor | { buffer: GPUBuffer; offset?: number; size?: number };

const UNIFORM_SLOT = 256;
const UNIFORM_ARENA_SLOTS = 4096;
/** Bind groups kept for reuse; the cache is dropped whole when it grows past this. */
const BIND_GROUP_CACHE_MAX = 16384;
/** A dispatch seen by record(): its bind group is made once the list's uniform buffer exists. */
interface RecordedDispatch {
  kind: 'pending-dispatch';
  cached: CachedPipeline;
  /** uniform slot, or -1 */
  slot: number;
  uniformSize: number;
  resources: GPUBufferBinding[];
  x: number;
  y: number;
  z: number;
}

/** What record() collects while its function runs. */
interface Recording {
  label: string;
  commands: (RecordedDispatch | Exclude<ReplayCommand, { kind: 'dispatch' }>)[];
  uniforms: Uint8Array<ArrayBuffer>;
  slots: number;
  /** buffers handed out by empty() while recording */
  acquired: Set<GPUBuffer>;
  /** tensors bound that were not made while recording */
  inputs: Set<Tensor>;
}

/** How long a failed read waits for the device's loss to be reported (only after a failure). */
const LOST_GRACE_MS = 2000;

export async function acquireGpu(options: AcquireOptions = {}): Promise<Gpu> {
  const entry = options.gpu ?? (typeof navigator !== 'undefined' ? navigator.gpu : undefined);
  if (!entry) {
    throw new GpuError(
      'WebGPU is not available here. Use a recent desktop Chrome or Edge (113+) with hardware ' +
        'acceleration on; on Linux, start Chrome with --enable-unsafe-webgpu --enable-features=Vulkan.',
    );
  }
  const adapter = await entry.requestAdapter({ powerPreference: options.powerPreference ?? 'high-performance' });
  if (!adapter) {
    throw new GpuError(
      'WebGPU is present but no GPU adapter was offered (blocklisted driver or GPU disabled). ' +
        'Update the graphics driver or enable hardware acceleration in the browser settings.',
    );
  }
  const offered = adapter.features;
  const wantF16 = (options.f16 ?? true) && offered.has('shader-f16');
  const requiredFeatures: GPUFeatureName[] = [];
  if (wantF16) requiredFeatures.push('shader-f16');
  if ((options.subgroups ?? true) && offered.has('subgroups')) requiredFeatures.push('subgroups' as GPUFeatureName);
  if (offered.has('timestamp-query')) requiredFeatures.push('timestamp-query');
  const al = adapter.limits;
  const requiredLimits: Record<string, number> = {
    maxBufferSize: al.maxBufferSize,
    maxStorageBufferBindingSize: al.maxStorageBufferBindingSize,
    maxComputeWorkgroupStorageSize: al.maxComputeWorkgroupStorageSize,
    maxComputeInvocationsPerWorkgroup: al.maxComputeInvocationsPerWorkgroup,
    maxComputeWorkgroupSizeX: al.maxComputeWorkgroupSizeX,
    maxStorageBuffersPerShaderStage: al.maxStorageBuffersPerShaderStage,
  };
  const device = await adapter.requestDevice({ requiredFeatures, requiredLimits });
  const info = adapter.info;
  const adapterName = [info?.vendor, info?.architecture, info?.device, info?.description]
    .filter((s) => s && s.length > 0)
    .join(' / ') || 'unknown adapter';
  const missing: string[] = [];
  if (!device.features.has('shader-f16')) missing.push('shader-f16 (half-precision kernels): f32 kernels are used, using twice the activation memory');
  if (!device.features.has('subgroups')) missing.push('subgroups: reductions fall back to workgroup memory');
  if (!device.features.has('timestamp-query')) missing.push('timestamp-query: kernel timings use wall clock');
  const caps: GpuCapabilities = {
    adapterName,
    f16: device.features.has('shader-f16'),
    subgroups: device.features.has('subgroups'),
    timestampQuery: device.features.has('timestamp-query'),
    maxBufferSize: device.limits.maxBufferSize,
    maxStorageBufferBindingSize: device.limits.maxStorageBufferBindingSize,
    maxComputeWorkgroupStorageSize: device.limits.maxComputeWorkgroupStorageSize,
    maxComputeInvocationsPerWorkgroup: device.limits.maxComputeInvocationsPerWorkgroup,
    maxStorageBuffersPerShaderStage: device.limits.maxStorageBuffersPerShaderStage,
    missing,
  };
  return new Gpu(device, caps);
}

export class Gpu {
  readonly pool: BufferPool;
  readonly pipelines: PipelineCache;
  private encoder: GPUCommandEncoder | null = null;
  private pass: GPUComputePassEncoder | null = null;
  private readonly arena: GPUBuffer;
  private readonly arenaData = new Uint8Array(UNIFORM_SLOT * UNIFORM_ARENA_SLOTS);
  private arenaUsed = 0;
  private lostError: GpuDeviceLostError | null = null;
  private asyncErrors: string[] = [];
  private destroyed = false;
  /** Number of queue submissions so far (tests use it to prove batching). */
  submits = 0;
  dispatches = 0;
  /** Bind groups created so far (the rest of the dispatches reused a cached one). */
  bindGroupsCreated = 0;
  /** Bind group cache look-ups (one per dispatch encoded outside a replay). */
  bindGroupLookups = 0;
  private readonly bindGroups = new Map<string, GPUBindGroup>();
  private readonly bufferIds = new WeakMap<GPUBuffer, number>();
  private nextBufferId = 1;
  private recording: Recording | null = null;
  /** tensors some CommandList binds (their release makes the lists check their inputs) */
  private readonly boundByLists = new WeakSet<Tensor>();
  private boundReleased = 0;

  constructor(
    readonly device: GPUDevice,
    readonly caps: GpuCapabilities,
  ) {
    this.pool = new BufferPool(device, Math.min(caps.maxBufferSize, caps.maxStorageBufferBindingSize), () => this.bindGroups.clear());
    this.pipelines = new PipelineCache(device, (msg) => this.asyncErrors.push(msg));
    this.arena = device.createBuffer({
      size: this.arenaData.byteLength,
      usage: BufferUsage.UNIFORM | BufferUsage.COPY_DST,
      label: 'uniform-arena',
    });
    device.lost.then((info) => {
      if (!this.destroyed) this.lostError = new GpuDeviceLostError(String(info.reason ?? 'unknown'), info.message);
    });
    device.onuncapturederror = (ev: GPUUncapturedErrorEvent) => {
      this.asyncErrors.push(ev.error.message);
    };
  }

  /** Registers a callback for device loss (the UI shows it; the trainer stops cleanly). */
  onLost(callback: (err: GpuDeviceLostError) => void): void {
    this.device.lost.then((info) => {
      if (!this.destroyed) callback(new GpuDeviceLostError(String(info.reason ?? 'unknown'), info.message));
    });
  }

  get isLost(): boolean {
    return this.lostError !== null;
  }

  stats(): PoolStats {
    return this.pool.stats();
  }

  // ---- tensors -------------------------------------------------------------------

  empty(shape: readonly number[], dtype: DType = 'f32', label = ''): Tensor {
    this.checkAlive();
    const bytes = Math.max(4, Math.ceil((numel(shape) * DTYPE_BYTES[dtype]) / 4) * 4);
    const buffer = this.pool.acquire(bytes, label);
    this.recording?.acquired.add(buffer);
    return new Tensor(this, buffer, [...shape], dtype);
  }

  zeros(shape: readonly number[], dtype: DType = 'f32', label = ''): Tensor {
    const t = this.empty(shape, dtype, label);
    this.clear(t);
    return t;
  }

  /** Uploads host data into a new tensor. */
  upload(data: ArrayBufferView, shape: readonly number[], dtype: DType = 'f32', label = ''): Tensor {
    const t = this.empty(shape, dtype, label);
    this.write(t, data);
    return t;
  }

  /** Overwrites a tensor's contents from host data, ordered after all recorded work. */
  write(t: Tensor, data: ArrayBufferView, byteOffset = 0): void {
    this.checkAlive();
    this.refuseWhileRecording('write');
    // writeBuffer runs on the queue timeline, before any still-unsubmitted commands:
    // submit those first so a reused buffer is not overwritten under them.
    if (this.encoder) this.flush();
    const bytes = new Uint8Array(data.buffer as ArrayBuffer, data.byteOffset, data.byteLength);
    if (byteOffset + bytes.byteLength > t.buffer.size) {
      throw new GpuError(`write of ${bytes.byteLength} bytes at ${byteOffset} overflows ${t}`);
    }
    if (bytes.byteLength % 4 === 0) {
      this.device.queue.writeBuffer(t.buffer, byteOffset, bytes);
    } else {
      const padded = new Uint8Array(Math.ceil(bytes.byteLength / 4) * 4);
      padded.set(bytes);
      this.device.queue.writeBuffer(t.buffer, byteOffset, padded);
    }
  }

  clear(t: Tensor, byteOffset = 0, byteLength?: number): void {
    const size = byteLength ?? t.buffer.size - byteOffset;
    if (this.recording) {
      this.noteInput(t);
      this.recording.commands.push({ kind: 'clear', buffer: t.buffer, offset: byteOffset, size });
      return;
    }
    this.blitEncoder().clearBuffer(t.buffer, byteOffset, size);
  }

  copy(src: Tensor, dst: Tensor, bytes = Math.min(src.byteLength, dst.byteLength), srcOffset = 0, dstOffset = 0): void {
    if (this.recording) {
      this.noteInput(src);
      this.noteInput(dst);
      this.recording.commands.push({ kind: 'copy', src: src.buffer, srcOffset, dst: dst.buffer, dstOffset, bytes });
      return;
    }
    this.blitEncoder().copyBufferToBuffer(src.buffer, srcOffset, dst.buffer, dstOffset, bytes);
  }

  // ---- dispatch ------------------------------------------------------------------

  /**
   * Records one compute dispatch. With `params`, the uniform block is @binding(0) and
   * the buffers follow from @binding(1); without, buffers start at @binding(0).
   */
  dispatch(
    kernel: KernelSource,
    bindings: readonly Binding[],
    workgroups: readonly [number, number?, number?],
    params?: Params,
  ): void {
    this.checkAlive();
    const [x, y = 1, z = 1] = workgroups;
    if (x === 0 || y === 0 || z === 0) return;
    const max = this.device.limits.maxComputeWorkgroupsPerDimension;
    if (x > max || y > max || z > max) {
      throw new GpuError(`${kernel.label}: dispatch [${x}, ${y}, ${z}] exceeds ${max} workgroups per dimension`);
    }
    const cached = this.pipelines.lookup(kernel);
    if (this.recording) {
      this.recordDispatch(kernel, cached, bindings, x, y, z, params);
      return;
    }
    let key = `${cached.id}`;
    let uniformOffset = -1;
    let uniformSize = 0;
    if (params) {
      if (this.arenaUsed === UNIFORM_ARENA_SLOTS) this.flush();
      const bytes = params.bytes();
      uniformOffset = this.arenaUsed * UNIFORM_SLOT;
      uniformSize = bytes.byteLength;
      this.arenaData.set(bytes, uniformOffset);
      this.arenaUsed++;
      key += `u${this.arenaUsed - 1}.${uniformSize}`;
    }
    for (let i = 0; i < bindings.length; i++) {
      const b = bindings[i]!;
      if (b instanceof Tensor) {
        if (b.isReleased) throw new GpuError(`${kernel.label}: binding ${i + (params ? 1 : 0)} is a released ${b}`);
        key += `|${this.bufferId(b.buffer)}`;
      } else {
        key += `|${this.bufferId(b.buffer)}@${b.offset ?? 0}+${b.size ?? ''}`;
      }
    }
    this.bindGroupLookups++;
    let bindGroup = this.bindGroups.get(key);
    if (!bindGroup) {
      const entries: GPUBindGroupEntry[] = [];
      let binding = 0;
      if (params) entries.push({ binding: binding++, resource: { buffer: this.arena, offset: uniformOffset, size: uniformSize } });
      for (const b of bindings) {
        if (b instanceof Tensor) entries.push({ binding: binding++, resource: { buffer: b.buffer } });
        else entries.push({ binding: binding++, resource: { buffer: b.buffer, offset: b.offset ?? 0, size: b.size } });
      }
      bindGroup = this.device.createBindGroup({ layout: cached.layout, entries });
      this.bindGroupsCreated++;
      if (this.bindGroups.size >= BIND_GROUP_CACHE_MAX) this.bindGroups.clear();
      this.bindGroups.set(key, bindGroup);
    }
    const pipeline = cached.pipeline;
    const pass = this.computePass();
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, bindGroup);
    pass.dispatchWorkgroups(x, y, z);
    this.dispatches++;
  }

  /**
   * Runs `fn` with nothing encoded and returns what it dispatched, copied and cleared
   * as a CommandList (replay.ts); `fn`'s returned tensors are the list's outputs, lent
   * out by each replay. Nothing has run yet: call replay(list) for the first time too.
   * While `fn` runs, writes, reads and submits are refused (their host work is not
   * part of a replay). Reuse the list only while everything its commands depend on
   * (uniform values, buffers, shapes) is unchanged; the caller keys it.
   */
  record(label: string, fn: () => readonly Tensor[]): CommandList {
    this.checkAlive();
    if (this.recording) throw new GpuError(`record ${label}: already recording ${this.recording.label}`);
    const r: Recording = { label, commands: [], uniforms: new Uint8Array(64 * UNIFORM_SLOT), slots: 0, acquired: new Set(), inputs: new Set() };
    this.recording = r;
    let outputs: readonly Tensor[];
    try {
      outputs = fn();
    } finally {
      this.recording = null;
    }
    for (const t of outputs) {
      if (!r.acquired.has(t.buffer)) throw new GpuError(`record ${label}: output ${t} was not made while recording`);
      r.inputs.delete(t);
    }
    // Scratch given back to the pool while recording stays with the list.
    const held: GPUBuffer[] = [];
    for (const b of r.acquired) if (this.pool.take(b)) held.push(b);
    for (const t of r.inputs) if (r.acquired.has(t.buffer)) r.inputs.delete(t);
    let uniforms: GPUBuffer | null = null;
    if (r.slots > 0) {
      uniforms = this.device.createBuffer({ size: r.slots * UNIFORM_SLOT, usage: BufferUsage.UNIFORM | BufferUsage.COPY_DST, label: `${label}.uniforms` });
      // A new buffer: no recorded work can be reading it, so the write need not wait for a submit.
      this.device.queue.writeBuffer(uniforms, 0, r.uniforms, 0, r.slots * UNIFORM_SLOT);
    }
    const commands: ReplayCommand[] = [];
    let last: GPUComputePipeline | null = null;
    for (const c of r.commands) {
      if (c.kind !== 'pending-dispatch') {
        commands.push(c);
        last = null; // a copy or clear ends the compute pass
        continue;
      }
      const entries: GPUBindGroupEntry[] = [];
      let binding = 0;
      if (c.slot >= 0) entries.push({ binding: binding++, resource: { buffer: uniforms!, offset: c.slot * UNIFORM_SLOT, size: c.uniformSize } });
      for (const resource of c.resources) entries.push({ binding: binding++, resource });
      const bindGroup = this.device.createBindGroup({ layout: c.cached.layout, entries, label });
      this.bindGroupsCreated++;
      const pipeline = c.cached.pipeline;
      commands.push({ kind: 'dispatch', pipeline: pipeline === last ? null : pipeline, bindGroup, x: c.x, y: c.y, z: c.z });
      last = pipeline;
    }
    for (const t of r.inputs) this.boundByLists.add(t);
    return new CommandList(label, commands, this.pool, uniforms, held, outputs, [...r.inputs], () => this.flush(), () => this.boundReleased);
  }

  /** Encodes a recorded list's commands (see record) and returns new loans of its outputs. */
  replay(list: CommandList): Tensor[] {
    this.checkAlive();
    this.refuseWhileRecording(`replay ${list.label}`);
    if (!list.replayable) throw new GpuError(`replay ${list.label}: not replayable, ${list.unreplayableReason}`);
    const cmds = list.commands;
    let pass = this.pass;
    for (let i = 0; i < cmds.length; i++) {
      const c = cmds[i]!;
      if (c.kind === 'dispatch') {
        if (!pass) pass = this.computePass();
        if (c.pipeline) pass.setPipeline(c.pipeline);
        pass.setBindGroup(0, c.bindGroup);
        pass.dispatchWorkgroups(c.x, c.y, c.z);
      } else {
        pass = null;
        if (c.kind === 'copy') this.blitEncoder().copyBufferToBuffer(c.src, c.srcOffset, c.dst, c.dstOffset, c.bytes);
        else this.blitEncoder().clearBuffer(c.buffer, c.offset, c.size);
      }
    }
    this.dispatches += list.dispatches;
    return list.lend();
  }

  /** Submits everything recorded so far; does not wait. */
  flush(): void {
    this.checkAlive();
    this.refuseWhileRecording('flush');
    if (!this.encoder) return;
    this.endPass();
    if (this.arenaUsed > 0) {
      this.device.queue.writeBuffer(this.arena, 0, this.arenaData, 0, this.arenaUsed * UNIFORM_SLOT);
      this.arenaUsed = 0;
    }
    this.device.queue.submit([this.encoder.finish()]);
    this.encoder = null;
    this.submits++;
  }

  /** Submits and waits for the queue to drain; surfaces async errors. */
  async sync(): Promise<void> {
    this.flush();
    await this.device.queue.onSubmittedWorkDone();
    this.throwPending();
  }

  /** Reads a tensor back to the host. f16 tensors are widened to Float32Array. */
  async read(t: Tensor): Promise<Float32Array | Uint32Array | Int32Array> {
    const raw = await this.readBytes(t.buffer, 0, t.byteLength);
    switch (t.dtype) {
      case 'f32':
        return new Float32Array(raw, 0, t.size);
      case 'u32':
        return new Uint32Array(raw, 0, t.size);
      case 'i32':
        return new Int32Array(raw, 0, t.size);
      case 'f16':
        return f16ToF32(new Uint16Array(raw, 0, t.size));
    }
  }

  async readF32(t: Tensor): Promise<Float32Array> {
    if (t.dtype !== 'f32' && t.dtype !== 'f16') throw new GpuError(`readF32 of ${t}`);
    return (await this.read(t)) as Float32Array;
  }

  async readBytes(buffer: GPUBuffer, offset: number, bytes: number): Promise<ArrayBuffer> {
    this.checkAlive();
    this.refuseWhileRecording('read');
    const size = Math.ceil(bytes / 4) * 4;
    const staging = this.device.createBuffer({ size, usage: BufferUsage.MAP_READ | BufferUsage.COPY_DST });
    this.blitEncoder().copyBufferToBuffer(buffer, offset, staging, 0, size);
    this.flush();
    try {
      await staging.mapAsync(MapMode.READ);
    } catch (e) {
      staging.destroy();
      // A lost device aborts the reads in flight before its loss is reported ("unmapped before
      // mapping was resolved"): wait for the loss a moment, so the error names it.
      await Promise.race([this.device.lost, new Promise((r) => setTimeout(r, LOST_GRACE_MS))]);
      this.checkAlive();
      throw e;
    }
    const out = staging.getMappedRange().slice(0, bytes);
    staging.unmap();
    staging.destroy();
    this.throwPending();
    return out;
  }

  /** Tensor.release() reports here (a CommandList whose input was released is not replayable). */
  noteReleased(t: Tensor): void {
    if (this.boundByLists.has(t)) this.boundReleased++;
  }

  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    this.pool.trim();
    this.arena.destroy();
    this.device.destroy();
  }

  // ---- internals -----------------------------------------------------------------

  private bufferId(b: GPUBuffer): number {
    let id = this.bufferIds.get(b);
    if (id === undefined) this.bufferIds.set(b, (id = this.nextBufferId++));
    return id;
  }

  private recordDispatch(kernel: KernelSource, cached: CachedPipeline, bindings: readonly Binding[], x: number, y: number, z: number, params?: Params): void {
    const r = this.recording!;
    let slot = -1;
    let uniformSize = 0;
    if (params) {
      const bytes = params.bytes();
      if ((r.slots + 1) * UNIFORM_SLOT > r.uniforms.byteLength) {
        const grown = new Uint8Array(r.uniforms.byteLength * 2);
        grown.set(r.uniforms);
        r.uniforms = grown;
      }
      slot = r.slots++;
      uniformSize = bytes.byteLength;
      r.uniforms.set(bytes, slot * UNIFORM_SLOT);
    }
    const resources: GPUBufferBinding[] = [];
    for (let i = 0; i < bindings.length; i++) {
      const b = bindings[i]!;
      if (b instanceof Tensor) {
        if (b.isReleased) throw new GpuError(`${kernel.label}: binding ${i + (params ? 1 : 0)} is a released ${b}`);
        this.noteInput(b);
        resources.push({ buffer: b.buffer });
      } else {
        resources.push({ buffer: b.buffer, offset: b.offset ?? 0, size: b.size });
      }
    }
    r.commands.push({ kind: 'pending-dispatch', cached, slot, uniformSize, resources, x, y, z });
  }

  /** Remembers a tensor a recorded command names (record() keeps those not made while recording). */
  private noteInput(t: Tensor): void {
    this.recording?.inputs.add(t);
  }

  private refuseWhileRecording(what: string): void {
    if (this.recording) {
      throw new GpuError(`${what} while recording ${this.recording.label}: a recorded step may only dispatch, copy and clear (write its inputs before recording or replaying it)`);
    }
  }

  private checkAlive(): void {
    if (this.lostError) throw this.lostError;
    if (this.destroyed) throw new GpuError('This GPU runtime was destroyed');
  }

  private throwPending(): void {
    this.checkAlive();
    if (this.asyncErrors.length) {
      const msgs = this.asyncErrors.splice(0);
      throw new GpuError(`WebGPU reported ${msgs.length} error(s):\n${msgs.join('\n')}`);
    }
  }

  private ensureEncoder(): GPUCommandEncoder {
    if (!this.encoder) this.encoder = this.device.createCommandEncoder();
    return this.encoder;
  }

  private computePass(): GPUComputePassEncoder {
    if (!this.pass) this.pass = this.ensureEncoder().beginComputePass();
    return this.pass;
  }

  private endPass(): void {
    if (this.pass) {
      this.pass.end();
      this.pass = null;
    }
  }

  private blitEncoder(): GPUCommandEncoder {
    this.checkAlive();
    this.endPass();
    return this.ensureEncoder();
  }
}

export function f16ToF32(h: Uint16Array): Float32Array {
  const out = new Float32Array(h.length);
  for (let i = 0; i < h.length; i++) {
    const x = h[i]!;
    const s = x & 0x8000 ? -1 : 1;
    const e = (x >> 10) & 0x1f;
    const m = x & 0x3ff;
    if (e === 0) out[i] = s * m * 2 ** -24;
    else if (e === 31) out[i] = m ? NaN : s * Infinity;
    else out[i] = s * (1 + m / 1024) * 2 ** (e - 15);
  }
  return out;
}

/** Round-to-nearest-even f32 -> f16 bits. */
export function f32ToF16(f: ArrayLike<number>): Uint16Array {
  const out = new Uint16Array(f.length);
  const fb = new Float32Array(1);
  const ub = new Uint32Array(fb.buffer);
  for (let i = 0; i < f.length; i++) {
    fb[0] = f[i]!;
    const x = ub[0]!;
    const sign = (x >>> 16) & 0x8000;
    const exp = (x >>> 23) & 0xff;
    let mant = x & 0x7fffff;
    if (exp === 0xff) {
      out[i] = sign | 0x7c00 | (mant ? 0x200 : 0);
      continue;
    }
    const e = exp - 127 + 15;
    if (e >= 31) {
      out[i] = sign | 0x7c00;
      continue;
    }
    if (e <= 0) {
      if (e < -10) {
        out[i] = sign;
        continue;
      }
      mant |= 0x800000;
      const shift = 14 - e;
      let h = mant >>> shift;
      const rem = mant & ((1 << shift) - 1);
      const half = 1 << (shift - 1);
      if (rem > half || (rem === half && h & 1)) h++;
      out[i] = sign | h;
      continue;
    }
    let h = (e << 10) | (mant >>> 13);
    const rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem === 0x1000 && h & 1)) h++;
    out[i] = sign | h;
  }
  return out;
}
