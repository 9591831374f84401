/**
 * The held-out exam of a verifiable world: a fixed list of problems (generated once
 * with a seed and stored as a file, e.g. models/micro-arith/exam.json), answered with
 * greedy decoding and graded by code: an answer is right when its last number equals
 * the problem's result. The exam never feeds the training loss.
 */
import type { Gpu } from '../gpu/gpu';
import { generate } from '../model/generate';
import type { InferenceLora } from '../model/infer';
import type { LlamaWeights } from '../model/weights';
import type { ChatTokenizer } from '../model/tokenizer';
import { parseFinalNumber, solverMessages } from './prompts';

export interface ExamProblem {
  question: string;
  answer: number;
}

export interface Exam {
  seed: number;
  operators: string[];
  maxOperand: number;
  problems: ExamProblem[];
}

export const EXAM_FORMAT = 'selfplay-lab.exam';

/** An exam file's JSON, checked; `name` names the file in errors. */
export function parseExam(json: unknown, name = 'exam.json'): Exam {
  const o = json as Record<string, unknown> | null;
  if (!o || typeof o !== 'object' || o.format !== EXAM_FORMAT || o.version !== 1) {
    throw new Error(`${name} is not a version-1 exam of this lab (expected "format": "${EXAM_FORMAT}", "version": 1); use the exam file the model ships`);
  }
  if (!Array.isArray(o.problems) || o.problems.length === 0) throw new Error(`${name}: "problems" must be a non-empty list`);
  const problems = o.problems.map((p: unknown, k: number): ExamProblem => {
    const q = p as Record<string, unknown> | null;
    if (!q || typeof q.question !== 'string' || typeof q.answer !== 'number' || !Number.isFinite(q.answer)) {
      throw new Error(`${name}: problem ${k} must be {"question": text, "answer": number}`);
    }
    return { question: q.question, answer: q.answer };
  });
  return { seed: Number(o.seed), operators: Array.isArray(o.operators) ? o.operators.map(String) : [], maxOperand: Number(o.maxOperand), problems };
}

/** Right or wrong per answer: its last number equals the problem's answer. */
export function gradeExam(problems: readonly ExamProblem[], answers: readonly string[]): boolean[] {
  if (answers.length !== problems.length) throw new Error(`gradeExam: ${answers.length} answers for ${problems.length} problems`);
  return problems.map((p, k) => parseFinalNumber(answers[k]!) === p.answer);
}

export interface ExamResult {
  accuracy: number;
  answers: string[];
  correct: boolean[];
}

/**
 * Greedy answers to every problem (each asked as a user turn in the model's chat
 * format) and their grades. `lora` as it is (enabled or not) is what answers; pass
 * null for the base model.
 */
export async function runExam(
  gpu: Gpu,
  weights: LlamaWeights,
  lora: InferenceLora | null,
  tokenizer: ChatTokenizer,
  problems: readonly ExamProblem[],
  opts: { maxTokens?: number; batch?: number } = {},
): Promise<ExamResult> {
  const maxTokens = opts.maxTokens ?? 8;
  const batch = opts.batch ?? 256;
  const answers: string[] = [];
  for (let k = 0; k < problems.length; k += batch) {
    const prompts = problems.slice(k, k + batch).map((p) => tokenizer.applyChatTemplate(solverMessages(p.question), { addGenerationPrompt: true, dateString: '22 Nov 2026' }));
    const gen = await generate(gpu, weights, lora, { prompt: prompts, G: 1, maxNewTokens: maxTokens, temperature: 0, stopTokens: tokenizer.eosTokenIds });
    for (const a of gen.answers) answers.push(tokenizer.decode(a.tokens, { skipSpecialTokens: true }).trim());
  }
  const correct = gradeExam(problems, answers);
  return { accuracy: correct.filter(Boolean).length / problems.length, answers, correct };
}
