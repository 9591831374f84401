/**
 * The quality self-judge R_Q: the reference model grades a (query, answer) pair on an
 * additive 7-point rubric and ends with <score>N</score>.
 *
 * Parsing policy (parseJudgeScore):
 * - the LAST <score> tag wins (a judge may quote the format before using it);
 * - tags are case-insensitive, inner whitespace is ignored, a final unclosed tag at the
 *   very end of the text (generation cut at the stop token) is accepted;
 * - "N/7" and "N out of 7" are accepted; a whole number written with zero decimals
 *   ("5.0") is accepted; any other decimal ("4.5") is REJECTED as malformed, since the
 *   rubric is a sum of whole points and a fraction means the judge did not follow it;
 * - whole numbers outside 0..7 are rejected as out_of_range.
 * A null score is replaced by the caller with judgeFallbackScore(policy).
 */

export interface ChatMessage {
  role: 'system' | 'user' | 'assistant';
  content: string;
}

export const JUDGE_MAX_SCORE = 7;

const JUDGE_SYSTEM = `You are a strict, fair grader of an assistant's reply to a user's request.`;

const RUBRIC = `Grade the reply below with an additive rubric. Start at 0 and add one point for each statement that holds:
1. It is possible to tell what task the user is asking for.
2. The user's request is clear and well formed.
3. The user would be able to follow and understand the reply.
4. The reply deals with a substantial part of the request.
5. The reply gives a useful answer to the heart of the request.
6. The reply is clear, to the point and well organised.
7. The user would be pleased with the reply's form and style.

First write a brief justification (at most 100 words) saying which points you award and why.
Then write the running total, e.g. "Total: 1+1+0+1+1+0+1 = 5".
Finish with the final score, a whole number from 0 to 7, in this exact form: <score>N</score>`;

/** Chat messages asking the judge to grade one (query, answer) pair. */
export function judgeMessages(query: string, answer: string): ChatMessage[] {
  return [
    { role: 'system', content: JUDGE_SYSTEM },
    {
      role: 'user',
      content: `${RUBRIC}\n\n<request>\n${query}\n</request>\n\n<reply>\n${answer}\n</reply>`,
    },
  ];
}

export type JudgeParseReason = 'ok' | 'missing' | 'malformed' | 'out_of_range';

export interface JudgeParse {
  score: number | null;
  reason: JudgeParseReason;
}

const TAG = /<\s*score\s*>((?:(?!<\s*score\s*>)[\s\S])*?)(?:<\s*\/\s*score\s*>|$)/gi;
const VALUE = /^([+-]?\d+(?:\.\d+)?)(?:\s*(?:\/|out\s+of)\s*7)?\.?$/i;

export function parseJudgeScore(text: string): JudgeParse {
  let last: string | null = null;
  for (const m of text.matchAll(TAG)) last = m[1];
  if (last === null) return { score: null, reason: 'missing' };
  const m = VALUE.exec(last.trim());
  if (!m) return { score: null, reason: 'malformed' };
  const value = Number(m[1]);
  if (!Number.isFinite(value) || !Number.isInteger(value)) return { score: null, reason: 'malformed' };
  if (value < 0 || value > JUDGE_MAX_SCORE) return { score: null, reason: 'out_of_range' };
  return { score: value === 0 ? 0 : value, reason: 'ok' };
}

/**
 * What an unparseable judgement counts as.
 * 'zero' (default): a failed grade earns nothing, so the Solver cannot profit from
 *   answers that derail the judge; 'midpoint': 3.5, neutral on the scale;
 * { value }: a fixed number.
 */
export type JudgeFallbackPolicy = 'zero' | 'midpoint' | { value: number };

export function judgeFallbackScore(policy: JudgeFallbackPolicy = 'zero'): number {
  if (policy === 'zero') return 0;
  if (policy === 'midpoint') return JUDGE_MAX_SCORE / 2;
  return policy.value;
}

/** The score to use as R_Q, and whether the fallback was needed (to count and show). */
export function resolveJudgeScore(text: string, policy: JudgeFallbackPolicy = 'zero'): JudgeParse & { value: number; fallback: boolean } {
  const parsed = parseJudgeScore(text);
  if (parsed.score !== null) return { ...parsed, value: parsed.score, fallback: false };
  return { ...parsed, value: judgeFallbackScore(policy), fallback: true };
}
