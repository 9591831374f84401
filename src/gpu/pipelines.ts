/**
 * Compute pipelines cached by shader source. Compilation errors are caught in an
 * error scope and reported with the kernel's label and the offending WGSL lines.
 *
 * Look-up cost: kernels memoize their KernelSource objects (kernelCache in
 * src/kernels/wgsl.ts), so a dispatch finds its pipeline by the object itself (a
 * WeakMap hit, no string work). Only the first sight of a source object keys by its
 * WGSL text, so two objects with one code share one pipeline.
 */

export interface KernelSource {
  /** Shown in errors and profiles, e.g. "rmsnorm_forward f32 wg=256". */
  label: string;
  /** Complete WGSL module. */
  code: string;
  entry?: string;
}

/** A pipeline and its bind group layout (fetched once: getBindGroupLayout is not free on real drivers). */
export interface CachedPipeline {
  pipeline: GPUComputePipeline;
  layout: GPUBindGroupLayout;
  /** small integer naming this pipeline in bind group cache keys */
  id: number;
}

export class PipelineCache {
  private readonly cache = new Map<string, CachedPipeline>();
  private readonly bySource = new WeakMap<KernelSource, CachedPipeline>();
  /** Source objects looked up by WGSL text (first sight of each); tests use it to prove the fast path. */
  codeLookups = 0;
  /** lookup() calls so far (one per dispatch recorded; tests count them per decode step) */
  lookups = 0;

  constructor(
    private readonly device: GPUDevice,
    private readonly reportError: (message: string) => void,
  ) {}

  get size(): number {
    return this.cache.size;
  }

  get(kernel: KernelSource): GPUComputePipeline {
    return this.lookup(kernel).pipeline;
  }

  /** The pipeline of `kernel` with its layout and id, built on first use. */
  lookup(kernel: KernelSource): CachedPipeline {
    this.lookups++;
    const hit = this.bySource.get(kernel);
    if (hit) return hit;
    this.codeLookups++;
    const entry = kernel.entry ?? 'main';
    const key = `${entry}\n${kernel.code}`;
    let c = this.cache.get(key);
    if (!c) {
      const pipeline = this.build(kernel, entry);
      c = { pipeline, layout: pipeline.getBindGroupLayout(0), id: this.cache.size };
      this.cache.set(key, c);
    }
    this.bySource.set(kernel, c);
    return c;
  }

  /**
   * Compiles the given kernels' pipelines in the background (createComputePipelineAsync),
   * so their first dispatch does not stall on the driver's compiler. Kernels already
   * cached are skipped; a later dispatch of a kernel still compiling builds it itself.
   * Resolves when all are ready; compile errors are reported like those of get().
   */
  async warm(kernels: readonly KernelSource[]): Promise<void> {
    await Promise.all(
      kernels.map(async (kernel) => {
        const entry = kernel.entry ?? 'main';
        const key = `${entry}\n${kernel.code}`;
        if (this.bySource.has(kernel) || this.cache.has(key)) return;
        const module = this.device.createShaderModule({ code: kernel.code, label: kernel.label });
        let pipeline: GPUComputePipeline;
        try {
          pipeline = await this.device.createComputePipelineAsync({ layout: 'auto', compute: { module, entryPoint: entry }, label: kernel.label });
        } catch (e) {
          this.reportError(`kernel "${kernel.label}" failed to compile: ${e instanceof Error ? e.message : String(e)}`);
          return;
        }
        if (this.cache.has(key)) return; // a dispatch built it meanwhile
        const c = { pipeline, layout: pipeline.getBindGroupLayout(0), id: this.cache.size };
        this.cache.set(key, c);
        this.bySource.set(kernel, c);
      }),
    );
  }

  private build(kernel: KernelSource, entry: string): GPUComputePipeline {
    this.device.pushErrorScope('validation');
    const module = this.device.createShaderModule({ code: kernel.code, label: kernel.label });
    const p = this.device.createComputePipeline({
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
    return p;
  }
}
