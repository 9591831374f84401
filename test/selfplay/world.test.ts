/**
 * The free-form arithmetic world (prompts.ts) and the exam's grading and file format
 * (exam.ts): plain code, no GPU.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { QUICK_DEMO } from '../../src/worker/catalog';
import { microDemoConfig } from '../../src/selfplay/config';
import { gradeExam, parseExam } from '../../src/selfplay/exam';
import { arithmeticChallengerText, arithmeticWorldReward, checkArithmeticProblem, type ArithmeticWorldSettings } from '../../src/selfplay/prompts';
import { ROOT } from '../helpers/model-files';

const ADD: ArithmeticWorldSettings = { maxOperand: 99, operators: ['+'] };
const MICRO = join(ROOT, 'models', 'micro-arith');

describe('free-form arithmetic world', () => {
  it('writes a plain-English challenger prompt from the settings', () => {
    expect(arithmeticChallengerText(ADD)).toBe('Write one addition problem with two whole numbers from 0 to 99.');
    expect(arithmeticChallengerText({ maxOperand: 1000, operators: ['+', '-'] })).toBe('Write one arithmetic problem using + or - with two whole numbers from 0 to 1000.');
  });

  it('matches the prompt micro-arith was pretrained on', () => {
    const micro = JSON.parse(readFileSync(join(MICRO, 'micro.json'), 'utf8')) as { challengerPrompt: string };
    expect(arithmeticChallengerText(ADD)).toBe(micro.challengerPrompt);
  });

  it('reads a problem, and refuses unreadable ones, other operators and out-of-range operands', () => {
    expect(checkArithmeticProblem('12 + 34', ADD)).toEqual({ ok: true, problem: { a: 12, op: '+', b: 34, result: 46 } });
    expect(checkArithmeticProblem('What is 7 plus 5?', ADD)).toEqual({ ok: true, problem: { a: 7, op: '+', b: 5, result: 12 } });
    const bad = (text: string) => {
      const c = checkArithmeticProblem(text, ADD);
      return c.ok ? null : c.reason;
    };
    expect(bad('12 +')).toMatch(/no problem/);
    expect(bad('hello')).toMatch(/no problem/);
    expect(bad('12 - 3')).toMatch(/operator - is not allowed/);
    expect(bad('120 + 3')).toMatch(/operand 120 is outside 0\.\.99/);
    expect(bad('-4 + 3')).toMatch(/operand -4 is outside/);
  });

  it('the quick demo preset runs the micro model in the free-form world with a valid config', () => {
    const c = microDemoConfig();
    expect([c.mode, c.world, c.arithmeticMaxOperand, c.examEvery > 0]).toEqual(['lsp-zero', 'freeform-arithmetic', 99, true]);
    expect(QUICK_DEMO.model).toEqual({ kind: 'served', folder: 'micro-arith' });
  });

  it('rewards the right final number, and gives invalid problems the highest value (the Challenger penalty)', () => {
    expect(arithmeticWorldReward('12 + 34', '46', ADD)).toEqual({ valid: true, reward: 1 });
    expect(arithmeticWorldReward('12 + 34', 'It is 45', ADD)).toEqual({ valid: true, reward: 0 });
    expect(arithmeticWorldReward('12 + 34', '', ADD)).toEqual({ valid: true, reward: 0 });
    expect(arithmeticWorldReward('500 + 1', '501', ADD)).toEqual({ valid: false, reward: 1 });
    expect(arithmeticWorldReward('1 +', 'x', ADD)).toEqual({ valid: false, reward: 1 });
  });
});

describe('exam', () => {
  it('grades by the last number of each answer', () => {
    const problems = [
      { question: '1 + 2', answer: 3 },
      { question: '10 + 5', answer: 15 },
      { question: '9 + 9', answer: 18 },
    ];
    expect(gradeExam(problems, ['3', 'maybe 14', ''])).toEqual([true, false, false]);
    expect(() => gradeExam(problems, ['3'])).toThrow(/1 answers for 3 problems/);
  });

  it('refuses files that are not exams, naming the file', () => {
    expect(() => parseExam({ problems: [] }, 'x.json')).toThrow(/x\.json is not a version-1 exam/);
    expect(() => parseExam({ format: 'selfplay-lab.exam', version: 1, problems: [{ question: 1 }] }, 'x.json')).toThrow(/x\.json: problem 0/);
  });

  it('micro-arith ships a seeded exam of at least 200 distinct, correct problems in its world', () => {
    const exam = parseExam(JSON.parse(readFileSync(join(MICRO, 'exam.json'), 'utf8')), 'exam.json');
    expect(exam.problems.length).toBeGreaterThanOrEqual(200);
    expect(new Set(exam.problems.map((p) => p.question)).size).toBe(exam.problems.length);
    for (const p of exam.problems) {
      const c = checkArithmeticProblem(p.question, ADD);
      expect(c.ok && c.problem.result === p.answer, p.question).toBe(true);
    }
  });
});
