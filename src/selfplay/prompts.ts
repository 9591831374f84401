/**
 * The text side of the game: the Challenger's prompt, the toy arithmetic world, the
 * verifiable arithmetic reward, the pairwise judge used by evaluation, and the lab's
 * held-out evaluation instructions. All prompt wording is the lab's own.
 */
import type { ChatMessage } from './judge';

/** The Challenger's prompt: write one input for `task`, filling `template` when given. */
export function challengerMessages(task: string, template: string): ChatMessage[] {
  const t = task.trim();
  const what = t ? `the task "${t}"` : 'a language task of your own choosing';
  const lines = [
    'A language task is a mapping from an input to an output.',
    `Write exactly ONE input for ${what}. It will be handed to another agent, who must produce the output.`,
    'The input must be a valid input for the task. It may be easy, hard, unusual or deliberately noisy: its purpose is to stress-test the other agent.',
  ];
  if (template.trim()) lines.push(`Fill in every {placeholder} of this template and write the completed template as the input:\n${template.trim()}`);
  lines.push(
    'Never write the output, a hint, or the answer. Do not ask for anything a text-only language model cannot do, such as browsing, running code or seeing images.',
    'Write the input and nothing else, then stop.',
  );
  return [{ role: 'user', content: lines.join('\n') }];
}

/** The Solver's prompt: the query as a user turn. */
export function solverMessages(query: string): ChatMessage[] {
  return [{ role: 'user', content: query }];
}

// ---------------------------------------------------------------------------------
// Verifiable arithmetic

export type ArithOp = '+' | '-' | '*' | '/';

export interface ArithmeticProblem {
  a: number;
  op: ArithOp;
  b: number;
  result: number;
}

const OPS: Record<string, ArithOp> = { '+': '+', plus: '+', '-': '-', '−': '-', minus: '-', '*': '*', '×': '*', x: '*', times: '*', '/': '/', '÷': '/', 'divided by': '/' };
const INT = String.raw`(-?\d{1,9}(?:,\d{3})*)`;
const PROBLEM = new RegExp(String.raw`${INT}\s*(\+|-|−|\*|×|x|/|÷|plus|minus|times|divided by)\s*${INT}`, 'gi');

function toInt(s: string): number {
  return Number(s.replace(/,/g, ''));
}

/**
 * The last "a op b" with whole numbers in a query (digits or the words plus, minus,
 * times, divided by), or null. Division counts only when it is exact.
 */
export function parseArithmeticQuery(text: string): ArithmeticProblem | null {
  let last: ArithmeticProblem | null = null;
  for (const m of text.matchAll(PROBLEM)) {
    const a = toInt(m[1]!);
    const b = toInt(m[3]!);
    const op = OPS[m[2]!.toLowerCase()];
    if (!op) continue;
    let result: number;
    if (op === '+') result = a + b;
    else if (op === '-') result = a - b;
    else if (op === '*') result = a * b;
    else {
      if (b === 0 || a % b !== 0) continue;
      result = a / b;
    }
    if (!Number.isSafeInteger(result)) continue;
    last = { a, op, b, result };
  }
  return last;
}

/** The last whole number written in an answer (thousands commas allowed), or null. */
export function parseFinalNumber(text: string): number | null {
  const all = [...text.matchAll(/-?\d[\d,]*(?:\.\d+)?/g)];
  if (all.length === 0) return null;
  const s = all[all.length - 1]![0].replace(/,/g, '');
  const v = Number(s);
  return Number.isFinite(v) ? v : null;
}

export interface VerifiableResult {
  /** The query poses a problem the checker understands. */
  valid: boolean;
  reward: number;
}

/**
 * Exact-match arithmetic reward: 1 when the answer's last number equals the query's
 * result, else 0. A query with no checkable problem gives every answer 1: such a query
 * then has the highest value V, the worst Challenger reward, so the Challenger cannot
 * profit from writing problems the checker cannot read.
 */
export function verifiableReward(query: string, answer: string): VerifiableResult {
  const p = parseArithmeticQuery(query);
  if (!p) return { valid: false, reward: 1 };
  return { valid: true, reward: parseFinalNumber(answer) === p.result ? 1 : 0 };
}

// ---------------------------------------------------------------------------------
// The toy world

/** Token ids of "0".."max" as single tokens; throws when the tokenizer splits one. */
export function numberTokenIds(encode: (text: string) => number[], max: number): number[] {
  const out: number[] = [];
  for (let k = 0; k <= max; k++) {
    const ids = encode(String(k));
    if (ids.length !== 1) throw new Error(`the arithmetic world needs "${k}" to be one token, but this tokenizer splits it into ${ids.length}; lower the largest operand`);
    out.push(ids[0]!);
  }
  return out;
}

/**
 * The toy world's prompts are bare text (no chat template). The Challenger continues
 * this prompt with two number tokens, a and b; the Solver continues the query with one.
 */
export function arithmeticChallengerPrompt(maxOperand: number): string {
  return `Hard addition problems for a student, two whole numbers from 0 to ${maxOperand}:`;
}

export function arithmeticQuery(a: number, b: number): string {
  return `${a} + ${b} =`;
}

// ---------------------------------------------------------------------------------
// Pairwise judge (evaluation)

export type PairVerdict = 'A' | 'B' | 'tie';

const PAIR_SYSTEM = 'You are a careful, impartial judge of two assistant replies to the same request.';

export function pairwiseMessages(instruction: string, replyA: string, replyB: string): ChatMessage[] {
  return [
    { role: 'system', content: PAIR_SYSTEM },
    {
      role: 'user',
      content:
        `Compare the two replies to the request below. Prefer the reply that is more helpful, correct, clear and well organised; ignore which one comes first and do not favour length for its own sake.\n\n` +
        `<request>\n${instruction}\n</request>\n\n<reply_a>\n${replyA}\n</reply_a>\n\n<reply_b>\n${replyB}\n</reply_b>\n\n` +
        `Explain your comparison in at most 80 words, then give your verdict in this exact form: <verdict>A</verdict>, <verdict>B</verdict> or <verdict>tie</verdict>.`,
    },
  ];
}

/** The last <verdict> tag's value, or null when missing or not A, B or tie. */
export function parsePairVerdict(text: string): PairVerdict | null {
  let last: string | null = null;
  for (const m of text.matchAll(/<\s*verdict\s*>\s*([^<]*?)\s*(?:<\s*\/\s*verdict\s*>|$)/gi)) last = m[1]!;
  if (last === null) return null;
  const v = last.trim().replace(/^reply[\s_]*/i, '').replace(/\.$/, '').toLowerCase();
  if (v === 'a') return 'A';
  if (v === 'b') return 'B';
  if (v === 'tie') return 'tie';
  return null;
}

/**
 * The adapter's score for one instruction from the two orders' verdicts (adapter as A,
 * then adapter as B): 1 if it wins both or wins one and ties the other, 0 for the mirror
 * case, 0.5 otherwise (ties, disagreement between the orders, unparsed verdicts).
 */
export function pairScore(adapterFirst: PairVerdict | null, baseFirst: PairVerdict | null): number {
  const a = adapterFirst === 'A' ? 1 : adapterFirst === 'B' ? -1 : 0;
  const b = baseFirst === 'B' ? 1 : baseFirst === 'A' ? -1 : 0;
  const s = a + b;
  return s > 0 ? 1 : s < 0 ? 0 : 0.5;
}

/** Held-out instructions written for this lab (not taken from any benchmark). */
export const EVAL_INSTRUCTIONS: readonly string[] = [
  'Explain to a ten-year-old why the sky looks blue during the day but red at sunset.',
  'Write a short, polite email asking a landlord to fix a leaking kitchen tap this week.',
  'Give three practical tips for keeping houseplants alive in a dark apartment.',
  'What is the difference between weather and climate? Answer in two sentences.',
  'A recipe needs 250 g of flour for 10 biscuits. How much flour is needed for 24 biscuits? Show the working.',
  'Summarise the main causes of inflation in plain language, in under 100 words.',
  'Suggest a name and a one-line slogan for a bicycle repair shop run by volunteers.',
  'Translate into French: "The library closes early on Sundays, so please return your books by noon."',
  'List the steps to safely change a flat tyre on a car.',
  'Write a four-line poem about the first snow of winter.',
  'Why do we have leap years? Explain briefly.',
  'Compare renting and buying a home: give two advantages of each.',
  'Rewrite this sentence to be clearer: "The meeting that was planned for the time after lunch has been moved to before it."',
  'What should someone pack for a one-day hike in the mountains in summer?',
  'Explain what a hash table is and why lookups in it are usually fast.',
  'A train leaves at 14:35 and arrives at 17:10. How long is the journey?',
  'Give a friendly, encouraging reply to a student who failed their first driving test.',
  'Describe the water cycle in five short steps.',
  'What are good questions to ask at the end of a job interview? Give four.',
  'Write a Python function that returns the largest even number in a list, or None if there is none.',
  'Is it safe to look directly at a solar eclipse? Explain what to do instead.',
  'Plan a simple three-day vegetarian dinner menu that uses overlapping ingredients.',
  'Explain the rule of thirds in photography in a few sentences.',
  'What is the capital of Australia, and why is it not Sydney?',
];

// ---------------------------------------------------------------------------------
// The free-form arithmetic world: the Challenger writes a problem as text, code checks it

export interface ArithmeticWorldSettings {
  /** Operands run from 0 to this. */
  maxOperand: number;
  /** Operators a problem may use. */
  operators: readonly ArithOp[];
}

const OP_NAMES: Record<ArithOp, string> = { '+': 'addition', '-': 'subtraction', '*': 'multiplication', '/': 'division' };

/**
 * The free-form world's challenger prompt, plain English so that an Instruct model can
 * follow it. scripts/train-micro.py pretrains micro-arith on this exact text for "+"
 * and 0..99.
 */
export function arithmeticChallengerText(s: ArithmeticWorldSettings): string {
  const kind = s.operators.length === 1 ? `${OP_NAMES[s.operators[0]!]} problem` : `arithmetic problem using ${s.operators.join(' or ')}`;
  return `Write one ${kind} with two whole numbers from 0 to ${s.maxOperand}.`;
}

export function arithmeticChallengerMessages(s: ArithmeticWorldSettings): ChatMessage[] {
  return [{ role: 'user', content: arithmeticChallengerText(s) }];
}

export type ProblemCheck = { ok: true; problem: ArithmeticProblem } | { ok: false; reason: string };

/**
 * Reads the problem a Challenger wrote: the last "a op b" in the text (as
 * parseArithmeticQuery), whose operator must be allowed and whose operands must be whole
 * numbers from 0 to maxOperand.
 */
export function checkArithmeticProblem(text: string, s: ArithmeticWorldSettings): ProblemCheck {
  const p = parseArithmeticQuery(text);
  if (!p) return { ok: false, reason: 'no problem of the form "a op b" with whole numbers' };
  if (!s.operators.includes(p.op)) return { ok: false, reason: `operator ${p.op} is not allowed (allowed: ${s.operators.join(' ')})` };
  for (const v of [p.a, p.b]) if (v < 0 || v > s.maxOperand) return { ok: false, reason: `operand ${v} is outside 0..${s.maxOperand}` };
  return { ok: true, problem: p };
}

/**
 * The free-form world's verifiable reward: 1 when the answer's last number equals the
 * result, else 0. An unreadable or out-of-range problem is invalid: every answer to it
 * gets 1, so its value V is the highest possible and the Challenger's reward -V the
 * lowest (the penalty), while the Solver's advantages on it are all zero.
 */
export function arithmeticWorldReward(query: string, answer: string, s: ArithmeticWorldSettings): VerifiableResult {
  const c = checkArithmeticProblem(query, s);
  if (!c.ok) return { valid: false, reward: 1 };
  return { valid: true, reward: parseFinalNumber(answer) === c.problem.result ? 1 : 0 };
}
