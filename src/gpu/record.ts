/**
 * A recording-only WebGPU device: a GPUDevice stand-in that accepts every call the
 * runtime makes, counts them, and does no GPU work (buffers hold no data, shaders are
 * not compiled, dispatches do nothing). It measures what the host pays to record a
 * pass (dispatches, bind groups, pipeline look-ups, submits, uniform bytes) on any
 * machine, in seconds, for shapes far larger than the machine could hold.
 *
 * Reads return zeros. Nothing here validates the WGSL or the bindings; correctness
 * is the real-device tests' job.
 */
import { Gpu, type GpuCapabilities } from './gpu';

export interface RecordCounts {
  dispatches: number;
  submits: number;
  bindGroups: number;
  shaderModules: number;
  pipelines: number;
  buffers: number;
  writeBuffers: number;
  writeBytes: number;
  copies: number;
  clears: number;
  passes: number;
}

const zeroCounts = (): RecordCounts => ({
  dispatches: 0,
  submits: 0,
  bindGroups: 0,
  shaderModules: 0,
  pipelines: 0,
  buffers: 0,
  writeBuffers: 0,
  writeBytes: 0,
  copies: 0,
  clears: 0,
  passes: 0,
});

export interface RecordingDevice {
  device: GPUDevice;
  /** running totals since creation or the last reset() */
  counts: RecordCounts;
  reset(): void;
}

export interface RecordingLimits {
  maxBufferSize?: number;
  maxStorageBufferBindingSize?: number;
  f16?: boolean;
  subgroups?: boolean;
}

/** A GPUDevice stand-in that records calls (see the module comment). */
export function recordingDevice(opts: RecordingLimits = {}): RecordingDevice {
  const state: RecordingDevice = { device: null as unknown as GPUDevice, counts: zeroCounts(), reset: () => (state.counts = zeroCounts()) };
  const c = () => state.counts;
  const gib = 2 ** 30;
  const limits = {
    maxBufferSize: opts.maxBufferSize ?? 4 * gib,
    maxStorageBufferBindingSize: opts.maxStorageBufferBindingSize ?? 2 * gib - 4,
    maxComputeWorkgroupStorageSize: 32768,
    maxComputeInvocationsPerWorkgroup: 1024,
    maxComputeWorkgroupSizeX: 1024,
    maxComputeWorkgroupsPerDimension: 65535,
    maxStorageBuffersPerShaderStage: 10,
    minUniformBufferOffsetAlignment: 256,
    minStorageBufferOffsetAlignment: 256,
  };
  const featureNames = [...(opts.f16 ? ['shader-f16'] : []), ...(opts.subgroups ? ['subgroups'] : [])];
  const features = new Set(featureNames);
  const layout = {} as GPUBindGroupLayout;
  const pipeline = () => {
    c().pipelines++;
    return { label: '', getBindGroupLayout: () => layout } as unknown as GPUComputePipeline;
  };
  const pass = {
    setPipeline() {},
    setBindGroup() {},
    dispatchWorkgroups() {
      c().dispatches++;
    },
    end() {},
  } as unknown as GPUComputePassEncoder;
  const encoder = () =>
    ({
      beginComputePass() {
        c().passes++;
        return pass;
      },
      clearBuffer() {
        c().clears++;
      },
      copyBufferToBuffer() {
        c().copies++;
      },
      finish() {
        return {} as GPUCommandBuffer;
      },
    }) as unknown as GPUCommandEncoder;
  const device = {
    features,
    limits,
    lost: new Promise<GPUDeviceLostInfo>(() => undefined),
    onuncapturederror: null,
    queue: {
      writeBuffer(_b: GPUBuffer, _o: number, data: ArrayBufferView | ArrayBuffer, _do?: number, size?: number) {
        c().writeBuffers++;
        c().writeBytes += size ?? data.byteLength;
      },
      submit() {
        c().submits++;
      },
      onSubmittedWorkDone: () => Promise.resolve(),
    },
    createBuffer(d: GPUBufferDescriptor) {
      c().buffers++;
      return {
        size: d.size,
        usage: d.usage,
        label: d.label ?? '',
        destroy() {},
        mapAsync: () => Promise.resolve(),
        getMappedRange: (offset = 0, size?: number) => new ArrayBuffer(size ?? d.size - offset),
        unmap() {},
      } as unknown as GPUBuffer;
    },
    createShaderModule() {
      c().shaderModules++;
      return { getCompilationInfo: () => Promise.resolve({ messages: [] }) } as unknown as GPUShaderModule;
    },
    createComputePipeline: pipeline,
    createComputePipelineAsync: () => Promise.resolve(pipeline()),
    createBindGroup() {
      c().bindGroups++;
      return {} as GPUBindGroup;
    },
    createCommandEncoder: encoder,
    pushErrorScope() {},
    popErrorScope: () => Promise.resolve(null),
    destroy() {},
  };
  state.device = device as unknown as GPUDevice;
  return state;
}

/** A Gpu runtime over a recording-only device, with the capabilities it reports. */
export function recordingGpu(opts: RecordingLimits = {}): { gpu: Gpu; rec: RecordingDevice } {
  const rec = recordingDevice(opts);
  const l = rec.device.limits;
  const caps: GpuCapabilities = {
    adapterName: 'recording-only device (no GPU work)',
    f16: !!opts.f16,
    subgroups: !!opts.subgroups,
    timestampQuery: false,
    maxBufferSize: l.maxBufferSize,
    maxStorageBufferBindingSize: l.maxStorageBufferBindingSize,
    maxComputeWorkgroupStorageSize: l.maxComputeWorkgroupStorageSize,
    maxComputeInvocationsPerWorkgroup: l.maxComputeInvocationsPerWorkgroup,
    maxStorageBuffersPerShaderStage: l.maxStorageBuffersPerShaderStage,
    missing: [],
  };
  return { gpu: new Gpu(rec.device, caps), rec };
}
