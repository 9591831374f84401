/**
 * Compute pipelines cached by shader source. Compilation errors are caught in an
 * error scope and reported with the kernel's label and the offending WGSL lines.
 */

export interface KernelSource {
  /** Shown in errors and profiles, e.g. "rmsnorm_forward f32 wg=256". */
  label: string;
  /** Complete WGSL module. */
  code: string;
  entry?: string;
}

export class PipelineCache {
  private readonly cache = new Map<string, GPUComputePipeline>();

  constructor(
    private readonly device: GPUDevice,
    private readonly reportError: (message: string) => void,
  ) {}

  get size(): number {
    return this.cache.size;
  }

  get(kernel: KernelSource): GPUComputePipeline {
    const entry = kernel.entry ?? 'main';
    const key = `${entry}\n${kernel.code}`;
    let p = this.cache.get(key);
    if (p) return p;
    this.device.pushErrorScope('validation');
    const module = this.device.createShaderModule({ code: kernel.code, label: kernel.label });
    p = this.device.createComputePipeline({
      layout: 'auto',
      compute: { module, entryPoint: entry },
      label: kernel.label,
    });
    this.device.popErrorScope().then(async (err) => {
      if (!err) return;
      let detail = '';
      try {
        const info = await module.getCompilationInfo();
        const lines = kernel.code.split('\n');
        detail = info.messages
          .map((m) => `  line ${m.lineNum}: ${m.message}\n    ${lines[m.lineNum - 1] ?? ''}`)
          .join('\n');
      } catch {
        /* compilation info is optional */
      }
      this.reportError(`kernel "${kernel.label}" failed to compile: ${err.message}${detail ? `\n${detail}` : ''}`);
    });
    this.cache.set(key, p);
    return p;
  }
}
