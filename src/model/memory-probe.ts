/**
 * The memory check before a run: the plan (memory.ts) says how many bytes the run's
 * peak takes; the device says whether it can give them. The probe allocates that peak
 * (the plan's largest buffer first, then pieces of at most the device's buffer size)
 * inside an out-of-memory and a validation error scope, one buffer at a time, and
 * destroys everything at once, so a run that does not fit is refused with a message
 * instead of losing the device part-way through its first iteration.
 *
 * When the device refuses, the lab names the largest value of each setting that fits
 * what the probe could allocate (group size G, answer length, LoRA rank, micro-batch),
 * searching over the same plan; the plan's totalBudgetBytes is filled from the probe.
 */
import type { LlamaConfig } from '../formats/llama-config';
import { planMemory, type DeviceLimits, type MemoryPlan, type RunShape } from './memory';

const MiB = 1 << 20;
const mb = (n: number): string => `${Math.round(n / MiB)} MiB`;

/** The parts of a GPUDevice the probe uses. */
export interface ProbeDevice {
  createBuffer(desc: GPUBufferDescriptor): Pick<GPUBuffer, 'destroy'>;
  pushErrorScope(filter: GPUErrorFilter): void;
  popErrorScope(): Promise<GPUError | null>;
  readonly limits: { readonly maxBufferSize: number };
}

export interface ProbeResult {
  /** The device gave every byte asked for. */
  fits: boolean;
  /** Bytes asked for. */
  bytes: number;
  /** Bytes the device gave before it refused (all of them when it fits). */
  allocatedBytes: number;
  /** The refusal: 'out-of-memory' (too little memory left) or 'validation' (a buffer over the device's limits). */
  error: { kind: 'out-of-memory' | 'validation'; message: string } | null;
}

/** Largest single probe buffer: big enough for few round trips, small enough to stop near the limit. */
export const PROBE_PIECE_BYTES = 256 * MiB;

/**
 * Allocates `bytes` (one buffer of `largestBuffer` bytes first, the rest in pieces) and
 * releases all of it before returning. Stops at the first refusal.
 */
export async function probeAllocation(device: ProbeDevice, bytes: number, largestBuffer = 0, maxPieceBytes = PROBE_PIECE_BYTES): Promise<ProbeResult> {
  if (!(Number.isFinite(bytes) && bytes >= 0)) throw new RangeError(`probeAllocation: bytes must be a non-negative number, got ${bytes}`);
  const piece = Math.max(4, Math.min(maxPieceBytes, device.limits.maxBufferSize));
  const sizes: number[] = [];
  let left = Math.ceil(bytes / 4) * 4;
  const first = Math.min(left, Math.ceil(largestBuffer / 4) * 4);
  if (first > 0) {
    sizes.push(first);
    left -= first;
  }
  while (left > 0) {
    const n = Math.min(piece, left);
    sizes.push(n);
    left -= n;
  }
  const held: Pick<GPUBuffer, 'destroy'>[] = [];
  let allocated = 0;
  let error: ProbeResult['error'] = null;
  try {
    for (const size of sizes) {
      device.pushErrorScope('out-of-memory');
      device.pushErrorScope('validation');
      let buffer: Pick<GPUBuffer, 'destroy'> | null = null;
      try {
        buffer = device.createBuffer({ size, usage: GPUBufferUsage.STORAGE, label: 'memory-probe' });
      } finally {
        const validation = await device.popErrorScope();
        const oom = await device.popErrorScope();
        if (oom) error = { kind: 'out-of-memory', message: oom.message };
        else if (validation) error = { kind: 'validation', message: validation.message };
      }
      if (buffer) held.push(buffer);
      if (error) break;
      allocated += size;
    }
  } finally {
    for (const b of held) b.destroy();
  }
  return { fits: error === null, bytes, allocatedBytes: allocated, error };
}

/** The settings a run shape comes from, as the user sets them. */
export interface FitSettings {
  run: RunShape;
  /** Sequences per training forward/backward; trainTokensPerStep scales with it. */
  microBatch?: number;
}

export interface FitSuggestion {
  setting: 'groupSize' | 'maxNewTokens' | 'loraRank' | 'microBatch';
  /** Shown to the user, e.g. "answers per prompt (G)". */
  label: string;
  now: number;
  /** The largest value that fits with everything else unchanged; null when even the smallest does not. */
  fits: number | null;
}

function fitsPlan(config: LlamaConfig, run: RunShape, limits: DeviceLimits): boolean {
  const p = planMemory(config, run, limits);
  return !p.problems.some((x) => x.kind === 'buffer-too-large' || x.kind === 'over-budget');
}

/** Largest v in [1, now] with ok(v), assuming ok is monotone (smaller always fits better); null when ok(1) fails. */
function largestThat(now: number, ok: (v: number) => boolean): number | null {
  if (now < 1 || !ok(1)) return null;
  let lo = 1;
  let hi = now;
  while (lo < hi) {
    const mid = Math.ceil((lo + hi) / 2);
    if (ok(mid)) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

/** For each of G, answer length, LoRA rank and micro-batch: the largest value that fits `limits` with the others as they are. */
export function largestFittingSettings(config: LlamaConfig, s: FitSettings, limits: DeviceLimits): FitSuggestion[] {
  const { run } = s;
  const N = run.trainTokensPerStep ?? run.maxPromptTokens + run.maxNewTokens;
  const mbNow = s.microBatch ?? 1;
  const out: FitSuggestion[] = [];
  const check = (r: RunShape) => fitsPlan(config, r, limits);
  out.push({ setting: 'groupSize', label: 'answers per prompt (G)', now: run.groupSize, fits: largestThat(run.groupSize, (g) => check({ ...run, groupSize: g })) });
  out.push({
    setting: 'maxNewTokens',
    label: 'answer length in tokens',
    now: run.maxNewTokens,
    // Shorter answers also shorten every training sequence.
    fits: largestThat(run.maxNewTokens, (t) => check({ ...run, maxNewTokens: t, trainTokensPerStep: Math.max(1, N - mbNow * (run.maxNewTokens - t)) })),
  });
  if (run.loraRank > 0) out.push({ setting: 'loraRank', label: 'LoRA rank', now: run.loraRank, fits: largestThat(run.loraRank, (r) => check({ ...run, loraRank: r })) });
  out.push({
    setting: 'microBatch',
    label: s.microBatch !== undefined ? 'micro-batch' : 'sequences per training step',
    now: mbNow,
    fits: largestThat(mbNow, (m) => check({ ...run, trainTokensPerStep: Math.max(1, Math.round((N * m) / mbNow)) })),
  });
  return out;
}

/**
 * When no one setting is enough: G, answer length and micro-batch shrunk together by
 * the largest common factor that fits (each at least 1), or null when even all at 1 do not.
 */
export function fittingTogether(config: LlamaConfig, s: FitSettings, limits: DeviceLimits): FitSuggestion[] | null {
  const { run } = s;
  const N = run.trainTokensPerStep ?? run.maxPromptTokens + run.maxNewTokens;
  const mbNow = s.microBatch ?? 1;
  const STEPS = 1024;
  const at = (k: number) => {
    const f = k / STEPS;
    const g = Math.max(1, Math.floor(run.groupSize * f));
    const t = Math.max(1, Math.floor(run.maxNewTokens * f));
    const m = Math.max(1, Math.floor(mbNow * f));
    const perSeq = N / mbNow - (run.maxNewTokens - t);
    return { g, t, m, r: { ...run, groupSize: g, maxNewTokens: t, trainTokensPerStep: Math.max(1, Math.round(m * perSeq)) } };
  };
  const k = largestThat(STEPS, (k) => fitsPlan(config, at(k).r, limits));
  if (k === null) return null;
  const { g, t, m } = at(k);
  return [
    { setting: 'groupSize', label: 'answers per prompt (G)', now: run.groupSize, fits: g },
    { setting: 'maxNewTokens', label: 'answer length in tokens', now: run.maxNewTokens, fits: t },
    { setting: 'microBatch', label: s.microBatch !== undefined ? 'micro-batch' : 'sequences per training step', now: mbNow, fits: m },
  ];
}

export interface MemoryCheck {
  ok: boolean;
  /** The plan with totalBudgetBytes filled from the probe. */
  plan: MemoryPlan;
  limits: DeviceLimits;
  probe: ProbeResult;
  suggestions: FitSuggestion[];
  /** When no single setting is enough: the settings to shrink together, or null. */
  together: FitSuggestion[] | null;
  /** What does not fit and the largest settings that do; null when the run fits. */
  message: string | null;
}

/**
 * Confirms on the device that a run fits before it starts. `alreadyAllocated`: bytes
 * of the plan already on the device (the loaded weights), not probed again.
 */
export async function checkRunMemory(
  device: ProbeDevice,
  config: LlamaConfig,
  s: FitSettings,
  limits: { maxBufferSize: number; maxStorageBufferBindingSize: number },
  alreadyAllocated = 0,
): Promise<MemoryCheck> {
  const first = planMemory(config, s.run, limits);
  const need = Math.max(0, first.total - alreadyAllocated);
  const largest = first.largestBuffer.bytes <= need ? first.largestBuffer.bytes : 0;
  const probe = await probeAllocation(device, need, largest);
  const budget = alreadyAllocated + (probe.fits ? need : probe.allocatedBytes);
  // A refused single buffer says nothing about the total: only the per-buffer limits apply then.
  const fitLimits: DeviceLimits = probe.error?.kind === 'validation' ? { ...limits } : { ...limits, totalBudgetBytes: budget };
  const plan = planMemory(config, s.run, { ...limits, totalBudgetBytes: budget });
  if (probe.fits) return { ok: true, plan, limits: { ...limits, totalBudgetBytes: budget }, probe, suggestions: [], together: null, message: null };
  const suggestions = largestFittingSettings(config, s, fitLimits);
  const fitting = suggestions.filter((x) => x.fits !== null && x.fits < x.now);
  const together = fitting.length > 0 ? null : fittingTogether(config, s, fitLimits);
  const why =
    probe.error!.kind === 'validation'
      ? `the GPU refused its largest buffer (${first.largestBuffer.what}, ${mb(first.largestBuffer.bytes)}; this GPU allows ${mb(Math.min(limits.maxBufferSize, limits.maxStorageBufferBindingSize))} per buffer)`
      : `the GPU gave ${mb(probe.allocatedBytes)} of the ${mb(need)} it needs beyond the loaded model`;
  const message =
    `This run does not fit this GPU: its peak is about ${mb(first.total)} and ${why}. ` +
    (fitting.length > 0
      ? `It fits with any one of: ${fitting.map((x) => `${x.label} ${x.fits} (now ${x.now})`).join('; ')}. Change one of these settings and start again.`
      : together
        ? `No one setting is enough; it fits with all of: ${together.map((x) => `${x.label} ${x.fits} (now ${x.now})`).join('; ')}. Change these settings and start again.`
        : 'Not even the smallest settings fit: pick a smaller model, or close other tabs and apps that use the GPU.');
  return { ok: false, plan, limits: fitLimits, probe, suggestions, together, message };
}
