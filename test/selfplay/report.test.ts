/**
 * The run report's formats, parsed back: JSONL with one line per answer and TRL's
 * completions columns (one per reward source), CSV with TRL's metric names, quoting
 * and non-finite values; and the shipped example reward files match the built-in ones.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CUSTOM_REWARD_EXAMPLES } from '../../src/selfplay/custom-reward';
import { completionsJsonl, metricColumns, metricsCsv, reportFiles } from '../../src/selfplay/report';
import type { GameRecord, IterationMetrics } from '../../src/selfplay/types';
import { ROOT } from '../helpers/model-files';

const game = (iteration: number, index: number, query: string, answers: [string, Record<string, number>, number][]): GameRecord => ({
  iteration, index, query, queryTokens: 7, queryFinishReason: 'stop', queryValid: null, queryLogp: -3, queryLogpRef: -3.5, queryKl: 0.02,
  value: 0.5, qualityValue: 0, challengerReward: 0.25, challengerAdvantage: -0.1,
  answers: answers.map(([text, rewards, adv], j) => ({ text, tokens: 3 + j, finishReason: j === 1 ? 'length' : 'stop', rewards, reward: Object.values(rewards).reduce((a, b) => a + b, 0), advantage: adv, logp: -1 - j, logpRef: -1.5, kl: j === 2 ? NaN : 0.01 * j })),
});

/** A small CSV reader (RFC 4180 quoting), enough to check what metricsCsv writes. */
function parseCsv(text: string): string[][] {
  const rows: string[][] = [];
  let row: string[] = [];
  let cell = '';
  let quoted = false;
  for (let i = 0; i < text.length; i++) {
    const ch = text[i]!;
    if (quoted) {
      if (ch === '"' && text[i + 1] === '"') (cell += '"'), i++;
      else if (ch === '"') quoted = false;
      else cell += ch;
    } else if (ch === '"') quoted = true;
    else if (ch === ',') row.push(cell), (cell = '');
    else if (ch === '\n') row.push(cell), rows.push(row), (row = []), (cell = '');
    else cell += ch;
  }
  return rows;
}

describe('run report', () => {
  const games = [
    game(0, 0, 'Say "hi",\nthen stop', [['hi', { judge: 5, custom: -0.5 }, 0.4], ['hello <b>there</b>', { judge: 3, custom: 0 }, -0.4]]),
    game(1, 0, 'q2', [['a', { verifiable: 1 }, 0], ['b', { verifiable: 0 }, 0], ['c', { verifiable: 1 }, 0]]),
  ];

  it('writes one JSON line per answer with TRL completions columns and each reward part', () => {
    const lines = completionsJsonl(games).split('\n');
    expect(lines.at(-1)).toBe('');
    const rows = lines.slice(0, -1).map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(rows).toHaveLength(5);
    expect(rows[0]).toMatchObject({ step: 0, query_index: 0, answer_index: 0, prompt: 'Say "hi",\nthen stop', completion: 'hi', judge: 5, custom: -0.5, reward: 4.5, advantage: 0.4, kl: 0, completion_length: 3, prompt_length: 7, finish_reason: 'stop', challenger_advantage: -0.1 });
    expect(rows[1]).toMatchObject({ completion: 'hello <b>there</b>', finish_reason: 'length', kl: 0.01, logp: -2, logp_ref: -1.5 });
    expect(rows[4]).toMatchObject({ step: 1, answer_index: 2, verifiable: 1, kl: null });
    expect('judge' in rows[2]!).toBe(false);
  });

  it('writes the metrics as CSV with TRL names, step first, blanks for missing metrics, nan/inf for non-finite ones', () => {
    const history: IterationMetrics[] = [
      { iteration: 0, time: Date.UTC(2026, 11, 1, 12), values: { 'rewards/custom/mean': 0.5, reward: 1.25, kl: 0.01, grad_norm: NaN, 'weird,name': 1 } },
      { iteration: 1, time: Date.UTC(2026, 11, 1, 12, 1), values: { reward: -2, kl: Infinity, grad_norm: 0.5, 'reward/custom_fallback_count': 3 } },
    ];
    expect(metricColumns(history)).toEqual(['reward', 'kl', 'grad_norm', 'reward/custom_fallback_count', 'rewards/custom/mean', 'weird,name']);
    const rows = parseCsv(metricsCsv(history));
    expect(rows[0]).toEqual(['step', 'time', 'reward', 'kl', 'grad_norm', 'reward/custom_fallback_count', 'rewards/custom/mean', 'weird,name']);
    expect(rows[1]).toEqual(['0', '2026-12-01T12:00:00.000Z', '1.25', '0.01', 'nan', '', '0.5', '1']);
    expect(rows[2]).toEqual(['1', '2026-12-01T12:01:00.000Z', '-2', 'inf', '0.5', '3', '', '']);
    const files = reportFiles(games, history);
    expect([...files.keys()]).toEqual(['completions.jsonl', 'metrics.csv']);
  });

  it('ships each example reward as a file identical to the built-in one', () => {
    for (const ex of CUSTOM_REWARD_EXAMPLES) expect(readFileSync(join(ROOT, 'examples', 'rewards', `${ex.id}.js`), 'utf8')).toBe(ex.source);
  });
});
