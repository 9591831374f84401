/**
 * Float64 CPU reference for sample.ts: the exact truncated, renormalised sampling
 * distribution (temperature, then top-k, then top-p on the top-k set, as transformers'
 * warpers apply them), and a Gumbel-max sampler driven by the same counter-based hash.
 */
export interface SampleRefOptions {
  temperature: number;
  topK?: number;
  topP?: number;
}

function mix32(x: number): number {
  let h = x >>> 0;
  h ^= h >>> 16;
  h = Math.imul(h, 0x7feb352d) >>> 0;
  h ^= h >>> 15;
  h = Math.imul(h, 0x846ca68b) >>> 0;
  h ^= h >>> 16;
  return h >>> 0;
}

/** The WGSL sampleHash of sample.ts, in JavaScript integers. */
export function sampleHashRef(seed: number, step: number, row: number, token: number): number {
  const a = mix32((seed ^ 0x9e3779b9) >>> 0);
  const b = mix32((step + a) >>> 0);
  const c = mix32((row ^ b) >>> 0);
  return mix32((token + mix32((c + 0x632be5ab) >>> 0)) >>> 0);
}

export interface SampleDistribution {
  /** 1 where the token survives top-k and top-p */
  keep: Uint8Array;
  /** renormalised probabilities over kept tokens (0 elsewhere) */
  probs: Float64Array;
  /** log-sum-exp of logits / temperature over the whole vocabulary */
  lse: number;
  /**
   * Smallest distance between a token's strictly-greater top-p mass and topP (Infinity
   * without top-p): a decision this close to the boundary may round either way in f32.
   */
  topPMargin: number;
}

/** One row's sampling distribution (temperature > 0). */
export function sampleDistributionRef(logits: ArrayLike<number>, V: number, opts: SampleRefOptions): SampleDistribution {
  const { temperature, topK = 0, topP = 1 } = opts;
  const z = Float64Array.from({ length: V }, (_, i) => logits[i]! / temperature);
  const max = z.reduce((m, v) => Math.max(m, v), -Infinity);
  let total = 0;
  for (const v of z) total += Math.exp(v - max);
  const lse = max + Math.log(total);
  const sorted = Float64Array.from(z).sort().reverse();
  const kthValue = topK > 0 && topK < V ? sorted[topK - 1]! : -Infinity;
  const keep = new Uint8Array(V).map((_, i) => (z[i]! >= kthValue ? 1 : 0));
  let topPMargin = Infinity;
  if (topP < 1) {
    let keptMass = 0;
    for (let i = 0; i < V; i++) if (keep[i]) keptMass += Math.exp(z[i]! - max);
    // Mass strictly greater than each distinct value, walking values downwards.
    const above = new Map<number, number>();
    let acc = 0;
    for (let j = 0; j < V; ) {
      const v = sorted[j]!;
      above.set(v, acc / keptMass);
      let k = j;
      while (k < V && sorted[k] === v) {
        if (v >= kthValue) acc += Math.exp(v - max);
        k++;
      }
      j = k;
    }
    for (let i = 0; i < V; i++) {
      if (!keep[i]) continue;
      const g = above.get(z[i]!)!;
      topPMargin = Math.min(topPMargin, Math.abs(g - topP));
      if (!(g < topP)) keep[i] = 0;
    }
  }
  const probs = new Float64Array(V);
  let s = 0;
  for (let i = 0; i < V; i++) if (keep[i]) s += probs[i] = Math.exp(z[i]! - max);
  for (let i = 0; i < V; i++) probs[i]! /= s;
  return { keep, probs, lse, topPMargin };
}

/** Lowest index of the largest value. */
export function argmaxRef(a: ArrayLike<number>, offset = 0, n = a.length - offset): number {
  let best = 0;
  for (let i = 1; i < n; i++) if (a[offset + i]! > a[offset + best]!) best = i;
  return best;
}

/**
 * Samples every row of logits [B, V] by Gumbel-max over the kept set with the shared
 * hash; returns ids and their untruncated log-probs (greedy when temperature is 0).
 */
export function sampleRef(
  logits: ArrayLike<number>,
  B: number,
  V: number,
  opts: SampleRefOptions & { seed: number; step: number },
): { ids: Uint32Array; logp: Float64Array } {
  const ids = new Uint32Array(B);
  const logp = new Float64Array(B);
  for (let b = 0; b < B; b++) {
    const row = Array.from({ length: V }, (_, i) => logits[b * V + i]!);
    if (opts.temperature === 0) {
      ids[b] = argmaxRef(row);
      logp[b] = row[ids[b]!]! - sampleDistributionRef(row, V, { temperature: 1 }).lse;
      continue;
    }
    const d = sampleDistributionRef(row, V, opts);
    let best = -Infinity;
    let tok = 0;
    for (let i = 0; i < V; i++) {
      if (!d.keep[i]) continue;
      const u = ((sampleHashRef(opts.seed, opts.step, b, i) >>> 8) + 0.5) / 16777216;
      const score = row[i]! / opts.temperature - Math.log(-Math.log(u));
      if (score > best) {
        best = score;
        tok = i;
      }
    }
    ids[b] = tok;
    logp[b] = row[tok]! / opts.temperature - d.lse;
  }
  return { ids, logp };
}
