/**
 * Float64 CPU references for attention.ts: the full softmax for each query row (no
 * tiling, no online rescaling), its analytic backward, and single-query decode over a
 * shared prefix plus a per-row cache. Layouts as in attention.ts.
 */

type Arr = ArrayLike<number>;

/** Scaled scores of query (b, t, h) against its visible keys 0 .. S-T+t, and their softmax. */
function rowProbs(q: Arr, k: Arr, b: number, t: number, h: number, T: number, S: number, H: number, HK: number, D: number) {
  const kh = Math.floor(h / (H / HK));
  const scale = 1 / Math.sqrt(D);
  const n = S - T + t + 1;
  const qo = ((b * T + t) * H + h) * D;
  const s = new Float64Array(n);
  let mx = -Infinity;
  for (let j = 0; j < n; j++) {
    const ko = ((b * S + j) * HK + kh) * D;
    let acc = 0;
    for (let d = 0; d < D; d++) acc += q[qo + d]! * k[ko + d]!;
    s[j] = acc * scale;
    mx = Math.max(mx, s[j]!);
  }
  let l = 0;
  for (let j = 0; j < n; j++) l += Math.exp(s[j]! - mx);
  const prob = s.map((x) => Math.exp(x - mx) / l);
  return { prob, lse: mx + Math.log(l), kh, qo, scale };
}

export function attentionRef(q: Arr, k: Arr, v: Arr, B: number, T: number, S: number, H: number, HK: number, D: number) {
  const out = new Float64Array(B * T * H * D);
  const lse = new Float64Array(B * H * T);
  for (let b = 0; b < B; b++) {
    for (let t = 0; t < T; t++) {
      for (let h = 0; h < H; h++) {
        const r = rowProbs(q, k, b, t, h, T, S, H, HK, D);
        lse[(b * H + h) * T + t] = r.lse;
        for (let j = 0; j < r.prob.length; j++) {
          const vo = ((b * S + j) * HK + r.kh) * D;
          for (let d = 0; d < D; d++) out[r.qo + d] += r.prob[j]! * v[vo + d]!;
        }
      }
    }
  }
  return { out, lse };
}

/** Analytic gradients of sum(out * dout): P from the softmax, dS = P (dP - rowsum(P dP)). */
export function attentionBackwardRef(dout: Arr, q: Arr, k: Arr, v: Arr, B: number, T: number, S: number, H: number, HK: number, D: number) {
  const dq = new Float64Array(B * T * H * D);
  const dk = new Float64Array(B * S * HK * D);
  const dv = new Float64Array(B * S * HK * D);
  for (let b = 0; b < B; b++) {
    for (let t = 0; t < T; t++) {
      for (let h = 0; h < H; h++) {
        const r = rowProbs(q, k, b, t, h, T, S, H, HK, D);
        const n = r.prob.length;
        const dp = new Float64Array(n);
        let dot = 0;
        for (let j = 0; j < n; j++) {
          const vo = ((b * S + j) * HK + r.kh) * D;
          let acc = 0;
          for (let d = 0; d < D; d++) acc += dout[r.qo + d]! * v[vo + d]!;
          dp[j] = acc;
          dot += r.prob[j]! * acc;
        }
        for (let j = 0; j < n; j++) {
          const ko = ((b * S + j) * HK + r.kh) * D;
          const ds = r.prob[j]! * (dp[j]! - dot) * r.scale;
          for (let d = 0; d < D; d++) {
            dv[ko + d] += r.prob[j]! * dout[r.qo + d]!;
            dq[r.qo + d] += ds * k[ko + d]!;
            dk[ko + d] += ds * q[r.qo + d]!;
          }
        }
      }
    }
  }
  return { dq, dk, dv };
}

/**
 * One query per row, q [B, H, D], over prefix keys [P, HK, D] (if any) then the first
 * lengths[b] rows of cache [B, Smax, HK, D].
 */
export function attentionDecodeRef(
  q: Arr,
  kCache: Arr,
  vCache: Arr,
  lengths: Arr,
  prefix: { k: Arr; v: Arr; P: number } | null,
  B: number,
  Smax: number,
  H: number,
  HK: number,
  D: number,
): Float64Array {
  const out = new Float64Array(B * H * D);
  const P = prefix?.P ?? 0;
  const scale = 1 / Math.sqrt(D);
  for (let b = 0; b < B; b++) {
    const n = P + lengths[b]!;
    for (let h = 0; h < H; h++) {
      const kh = Math.floor(h / (H / HK));
      const qo = (b * H + h) * D;
      const at = (j: number): [Arr, Arr, number] =>
        j < P ? [prefix!.k, prefix!.v, (j * HK + kh) * D] : [kCache, vCache, ((b * Smax + j - P) * HK + kh) * D];
      const s = new Float64Array(n);
      for (let j = 0; j < n; j++) {
        const [kk, , o] = at(j);
        let acc = 0;
        for (let d = 0; d < D; d++) acc += q[qo + d]! * kk[o + d]!;
        s[j] = acc * scale;
      }
      const mx = Math.max(...s);
      let l = 0;
      for (let j = 0; j < n; j++) l += Math.exp(s[j]! - mx);
      for (let j = 0; j < n; j++) {
        const [, vv, o] = at(j);
        const w = Math.exp(s[j]! - mx) / l;
        for (let d = 0; d < D; d++) out[qo + d] += w * vv[o + d]!;
      }
    }
  }
  return out;
}
