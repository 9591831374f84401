/**
 * On-GPU sampling of one token per row of logits [B, V], one workgroup per row.
 *
 * With z = logits / temperature (temperature > 0):
 *   1. top-k keeps tokens with z >= the k-th largest z (ties at the boundary kept);
 *   2. top-p, on the renormalised top-k set, keeps tokens whose strictly-greater mass
 *      is < topP (the smallest prefix of the sorted distribution reaching topP, ties
 *      kept together), as transformers' TopK then TopP warpers do;
 *   3. the token is argmax over kept tokens of z + Gumbel noise, which draws from the
 *      renormalised softmax over the kept set.
 * temperature 0 is greedy argmax (lowest index among equal maxima).
 *
 * Thresholds come from a radix select over the order-preserving u32 key of z: four
 * passes of 8 bits each, every pass building a 256-bin histogram (counts for top-k,
 * masses for top-p) of the tokens still matching the key prefix chosen so far. Masses
 * are summed as 64-bit fixed point (exp(z - max) in units of 2^-40) with integer
 * atomics, so the result does not depend on the order threads add in. A row costs
 * at most 11 reads of its logits; V = 128256 needs no sort.
 *
 * Noise is a counter-based hash of (seed, step, row, token): the same seed and step
 * give the same tokens whatever the dispatch order. Optionally writes the chosen
 * token's log-prob under the untruncated softmax of z (TRL's convention; plain
 * logits for greedy).
 */
import type { Gpu } from '../gpu/gpu';
import { Params } from '../gpu/params';
import type { Tensor } from '../gpu/tensor';
import { MIN_SUBGROUP_SIZE, subgroupReduceWgsl, useSubgroups } from './subgroup';
import { WG_LINEAR, enables, grid, kernelCache } from './wgsl';

export interface SampleOptions {
  /** 0 = greedy argmax */
  temperature: number;
  /** keep the k most likely tokens; 0 or >= V disables */
  topK?: number;
  /** nucleus mass in [0, 1]; 1 disables, 0 keeps only the most likely token(s) */
  topP?: number;
  seed: number;
  step: number;
  /** [B] f32: log-prob of each chosen token under the untruncated softmax(logits / temperature) */
  logp?: Tensor | null;
  /** Reduce the argmaxes and the log-prob's sum with subgroup operations (default: where the device has `subgroups`); false forces workgroup-memory trees. */
  subgroups?: boolean;
}

/** Threads per row: 256 for real vocabularies, 64 for small ones (fewer idle lanes per barrier). */
function workgroupSize(V: number): number {
  return V <= 4096 ? 32 : 256;
}

const FLAG_GREEDY = 1;
const FLAG_TOPK = 2;
const FLAG_TOPP = 4;
const FLAG_LOGP = 8;

/** WGSL for the counter-based hash; sample.ref.ts mirrors it bit for bit. */
export const SAMPLE_HASH_WGSL = /* wgsl */ `
fn mix32(x: u32) -> u32 {
  var h = x;
  h ^= h >> 16u; h *= 0x7feb352du;
  h ^= h >> 15u; h *= 0x846ca68bu;
  h ^= h >> 16u;
  return h;
}
fn sampleHash(seed: u32, step: u32, row: u32, token: u32) -> u32 {
  let a = mix32(seed ^ 0x9e3779b9u);
  let b = mix32(step + a);
  let c = mix32(row ^ b);
  return mix32(token + mix32(c + 0x632be5abu));
}`;

/** (value, index) argmax and a sum across the workgroup, through trees in workgroup memory. */
function treeReduceWgsl(WG: number): string {
  return /* wgsl */ `
var<workgroup> redF: array<f32, ${WG}>;
var<workgroup> redI: array<u32, ${WG}>;

/** Ties go to the lower index, NONE never wins. */
fn argmaxReduce(v: f32, i: u32, lid: u32) -> u32 {
  redF[lid] = v;
  redI[lid] = i;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s >>= 1u) {
    if (lid < s) {
      let ov = redF[lid + s];
      let oi = redI[lid + s];
      let mine = redI[lid];
      if (oi != NONE && (mine == NONE || ov > redF[lid] || (ov == redF[lid] && oi < mine))) { redF[lid] = ov; redI[lid] = oi; }
    }
    workgroupBarrier();
  }
  return workgroupUniformLoad(&redI[0]);
}

fn workgroupSum(v: f32, lid: u32) -> f32 {
  redF[lid] = v;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s >>= 1u) {
    if (lid < s) { redF[lid] += redF[lid + s]; }
    workgroupBarrier();
  }
  return workgroupUniformLoad(&redF[0]);
}`;
}

/**
 * The same through subgroup operations (subgroup.ts): each subgroup takes the largest
 * order-preserving key with subgroupMax and the lowest index holding it with
 * subgroupMin, its first lane stores the pair, and every invocation combines the
 * subgroups' pairs in order with the tree's rule. The key maps -0 to +0 so the two
 * compare equal, as floats do. The winner is the same as the tree's.
 */
function subgroupArgmaxWgsl(WG: number): string {
  const slots = Math.ceil(WG / MIN_SUBGROUP_SIZE);
  return /* wgsl */ `
var<workgroup> sgKey: array<u32, ${slots}>;
var<workgroup> sgIdx: array<u32, ${slots}>;
${subgroupReduceWgsl(WG, ['sum'])}

/** Ties go to the lower index, NONE never wins. */
fn argmaxReduce(v: f32, i: u32, lid: u32, sgSize: u32) -> u32 {
  // 0 is below the key of every number: lanes without a candidate never win a subgroup.
  let key = select(sortKey(select(v, 0.0, (bitcast<u32>(v) & 0x7fffffffu) == 0u)), 0u, i == NONE);
  let top = subgroupMax(key);
  let idx = subgroupMin(select(NONE, i, i != NONE && key == top));
  if (lid % sgSize == 0u) { sgKey[lid / sgSize] = top; sgIdx[lid / sgSize] = idx; }
  workgroupBarrier();
  let n = (${WG}u + sgSize - 1u) / sgSize;
  var bk = sgKey[0];
  var bi = sgIdx[0];
  for (var j = 1u; j < n; j++) {
    let k = sgKey[j];
    let x = sgIdx[j];
    if (x != NONE && (bi == NONE || k > bk || (k == bk && x < bi))) { bk = k; bi = x; }
  }
  workgroupBarrier();
  return bi;
}`;
}

const sampleKernel = kernelCache((withLogp: boolean, WG: number, sg: boolean) => {
  const sgArg = sg ? ', sgSize' : '';
  return {
    label: `sample${withLogp ? ' logp' : ''} wg=${WG}${sg ? ' subgroups' : ''}`,
    code: /* wgsl */ `${enables({ subgroups: sg })}
struct Params { B: u32, V: u32, temperature: f32, topK: u32, topP: f32, seed: u32, step: u32, flags: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> ids: array<u32>;   // [B]
@group(0) @binding(2) var<storage, read> logits: array<f32>;      // [B, V]
${withLogp ? '@group(0) @binding(3) var<storage, read_write> logp: array<f32>; // [B]' : ''}

const LOWEST = -3.4028234e38;
const NONE = 0xffffffffu;
var<workgroup> binCount: array<atomic<u32>, 256>;
var<workgroup> binLo: array<atomic<u32>, 256>;
var<workgroup> binHi: array<atomic<u32>, 256>;
var<workgroup> sPrefix: u32;
var<workgroup> sAboveCount: u32;
var<workgroup> sAboveMass: vec2u;
var<workgroup> sTarget: f32;
${SAMPLE_HASH_WGSL}

/** Order-preserving map of f32 to u32: a < b as floats iff key(a) < key(b). */
fn sortKey(z: f32) -> u32 {
  let b = bitcast<u32>(z);
  return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

fn add64(a: vec2u, b: vec2u) -> vec2u {
  let lo = a.x + b.x;
  return vec2u(lo, a.y + b.y + select(0u, 1u, lo < a.x));
}

fn toF32(a: vec2u) -> f32 { return f32(a.y) * 4294967296.0 + f32(a.x); }

/** w in [0, 1] as 64-bit fixed point with 40 fractional bits. */
fn fixedMass(w: f32) -> vec2u {
  let x = w * 256.0;
  let hi = floor(x);
  return vec2u(u32(min((x - hi) * 4294967296.0, 4294967040.0)), u32(hi));
}

fn flushBin(d: u32, count: u32, mass: vec2u) {
  if (d == NONE) { return; }
  atomicAdd(&binCount[d], count);
  let old = atomicAdd(&binLo[d], mass.x);
  if (old + mass.x < old) { atomicAdd(&binHi[d], 1u); }
  atomicAdd(&binHi[d], mass.y);
}
${sg ? subgroupArgmaxWgsl(WG) : treeReduceWgsl(WG)}

/**
 * Largest key k such that the weight of tokens with key >= k (and >= floorKey) reaches
 * the target: a count (byMass false, target p.topK) or a fraction p.topP of the mass.
 */
fn radixSelect(base: u32, T: f32, mx: f32, floorKey: u32, byMass: bool, lid: u32) -> u32 {
  var prefix = 0u;
  if (lid == 0u) { sAboveCount = 0u; sAboveMass = vec2u(0u); }
  for (var round = 0u; round < 4u; round++) {
    let shift = 24u - 8u * round;
    var hiMask = 0u;
    if (round > 0u) { hiMask = ~((1u << (shift + 8u)) - 1u); }
    for (var b = lid; b < 256u; b += ${WG}u) {
      atomicStore(&binCount[b], 0u);
      atomicStore(&binLo[b], 0u);
      atomicStore(&binHi[b], 0u);
    }
    workgroupBarrier();
    // Consecutive tokens of a thread often share a bin: add runs, not single tokens.
    var runBin = NONE;
    var runCount = 0u;
    var runMass = vec2u(0u);
    for (var i = lid; i < p.V; i += ${WG}u) {
      let z = logits[base + i] / T;
      let key = sortKey(z);
      if (key < floorKey || (key & hiMask) != prefix) { continue; }
      let d = (key >> shift) & 0xffu;
      if (d != runBin) {
        flushBin(runBin, runCount, runMass);
        runBin = d; runCount = 0u; runMass = vec2u(0u);
      }
      runCount += 1u;
      if (byMass) { runMass = add64(runMass, fixedMass(exp(z - mx))); }
    }
    flushBin(runBin, runCount, runMass);
    workgroupBarrier();
    if (lid == 0u) {
      if (byMass && round == 0u) {
        var total = vec2u(0u);
        for (var d = 0u; d < 256u; d++) { total = add64(total, vec2u(atomicLoad(&binLo[d]), atomicLoad(&binHi[d]))); }
        sTarget = p.topP * toF32(total);
      }
      // Walk digits from the top; stop at the first non-empty one where the weight
      // at or above it reaches the target (fallback: the lowest non-empty digit).
      var chosen = NONE;
      var cumCount = sAboveCount;
      var cumMass = sAboveMass;
      var aboveCount = cumCount;
      var aboveMass = cumMass;
      for (var di = 0; di < 256; di++) {
        let d = u32(255 - di);
        let c = atomicLoad(&binCount[d]);
        if (c == 0u) { continue; }
        aboveCount = cumCount;
        aboveMass = cumMass;
        chosen = d;
        cumCount += c;
        cumMass = add64(cumMass, vec2u(atomicLoad(&binLo[d]), atomicLoad(&binHi[d])));
        let reached = select(cumCount >= p.topK, toF32(cumMass) >= sTarget, byMass);
        if (reached) { break; }
      }
      sAboveCount = aboveCount;
      sAboveMass = aboveMass;
      sPrefix = prefix | (select(chosen, 0u, chosen == NONE) << shift);
    }
    prefix = workgroupUniformLoad(&sPrefix);
  }
  return prefix;
}

@compute @workgroup_size(${WG})
fn main(@builtin(workgroup_id) wid: vec3u, @builtin(num_workgroups) nwg: vec3u, @builtin(local_invocation_index) lid: u32${sg ? ', @builtin(subgroup_size) sgSize: u32' : ''}) {
  let row = ${WG_LINEAR};
  if (row >= p.B) { return; }
  let base = row * p.V;
  let greedy = (p.flags & ${FLAG_GREEDY}u) != 0u;
  let T = select(p.temperature, 1.0, greedy);

  var best = LOWEST;
  var bestI = NONE;
  for (var i = lid; i < p.V; i += ${WG}u) {
    let z = logits[base + i] / T;
    if (z > best || bestI == NONE) { best = z; bestI = i; }
  }
  let top = argmaxReduce(best, bestI, lid${sgArg});
  let mx = logits[base + top] / T;

  var chosen = top;
  if (!greedy) {
    var kappa = 0u;
    if ((p.flags & ${FLAG_TOPK}u) != 0u) { kappa = radixSelect(base, T, mx, 0u, false, lid); }
    if ((p.flags & ${FLAG_TOPP}u) != 0u) { kappa = max(kappa, radixSelect(base, T, mx, kappa, true, lid)); }
    var bestScore = LOWEST;
    var bestTok = NONE;
    for (var i = lid; i < p.V; i += ${WG}u) {
      let z = logits[base + i] / T;
      if (sortKey(z) < kappa) { continue; }
      let u = (f32(sampleHash(p.seed, p.step, row, i) >> 8u) + 0.5) * (1.0 / 16777216.0);
      let score = z - log(-log(u));
      if (score > bestScore || bestTok == NONE) { bestScore = score; bestTok = i; }
    }
    chosen = argmaxReduce(bestScore, bestTok, lid${sgArg});
  }
  ${
    withLogp
      ? `
  if ((p.flags & ${FLAG_LOGP}u) != 0u) {
    var s = 0.0;
    for (var i = lid; i < p.V; i += ${WG}u) { s += exp(logits[base + i] / T - mx); }
    let total = workgroupSum(s, lid${sgArg});
    if (lid == 0u) { logp[row] = logits[base + chosen] / T - mx - log(total); }
  }`
      : ''
  }
  if (lid == 0u) { ids[row] = chosen; }
}`,
  };
});

/**
 * Samples ids [B] (u32) from logits [B, V] (f32). Records one dispatch; callers read
 * back only ids (and opts.logp).
 */
export function sample(gpu: Gpu, ids: Tensor, logits: Tensor, opts: SampleOptions, B: number, V: number): void {
  const { temperature, topK = 0, topP = 1, seed, step } = opts;
  if (!(temperature >= 0)) throw new Error(`sample: temperature must be >= 0, got ${temperature}`);
  if (!(topP >= 0 && topP <= 1)) throw new Error(`sample: topP must be in [0, 1], got ${topP}`);
  if (!Number.isInteger(topK) || topK < 0) throw new Error(`sample: topK must be a non-negative integer, got ${topK}`);
  if (ids.dtype !== 'u32' || ids.size < B) throw new Error(`sample: ids must be u32 [${B}], got ${ids}`);
  if (logits.dtype !== 'f32' || logits.size < B * V) throw new Error(`sample: logits must be f32 [${B}, ${V}], got ${logits}`);
  if (opts.logp && (opts.logp.dtype !== 'f32' || opts.logp.size < B)) throw new Error(`sample: logp must be f32 [${B}], got ${opts.logp}`);
  if (B === 0) return;
  if (V === 0) throw new Error('sample: empty vocabulary');
  const sg = useSubgroups(gpu, opts.subgroups, 'sample');
  let flags = 0;
  if (temperature === 0) flags |= FLAG_GREEDY;
  if (topK > 0 && topK < V) flags |= FLAG_TOPK;
  if (topP < 1) flags |= FLAG_TOPP;
  if (opts.logp) flags |= FLAG_LOGP;
  const params = new Params()
    .u32(B)
    .u32(V)
    .f32(temperature)
    .u32(Math.min(topK, V))
    .f32(topP)
    .u32(seed >>> 0)
    .u32(step >>> 0)
    .u32(flags);
  const bindings = opts.logp ? [ids, logits, opts.logp] : [ids, logits];
  gpu.dispatch(sampleKernel(!!opts.logp, workgroupSize(V), sg), bindings, grid(B), params);
}
