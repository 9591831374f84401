/**
 * The run report: the games as JSONL, one line per Solver answer with the columns of
 * TRL's completions table (step, prompt, completion, one column per reward function,
 * advantage) plus the lab's own (the total reward, KL, lengths, the Challenger's side),
 * and the metrics as CSV with TRL's names (one row per iteration, `step` first). Both
 * sit beside the PEFT adapter in an export.
 */
import { METRIC_NAMES, type GameRecord, type IterationMetrics } from './types';

export const COMPLETIONS_FILE = 'completions.jsonl';
export const METRICS_FILE = 'metrics.csv';

/** One row of the completions table. */
export interface CompletionRow {
  step: number;
  query_index: number;
  answer_index: number;
  prompt: string;
  completion: string;
  /** Weighted total reward of the answer. */
  reward: number;
  advantage: number;
  kl: number;
  logp: number;
  logp_ref: number;
  completion_length: number;
  finish_reason: string;
  prompt_length: number;
  query_valid: boolean | null;
  query_kl: number;
  challenger_reward: number;
  challenger_advantage: number;
  judge_score?: number;
  judge_parse?: string;
  judge_text?: string;
  /** One column per reward source, by its name (TRL: one per reward function). */
  [reward: string]: string | number | boolean | null | undefined;
}

const finite = (v: number): number | null => (Number.isFinite(v) ? v : null);

export function completionRows(games: readonly GameRecord[]): CompletionRow[] {
  const rows: CompletionRow[] = [];
  for (const g of games) {
    for (const [j, a] of g.answers.entries()) {
      const row: CompletionRow = {
        step: g.iteration,
        query_index: g.index,
        answer_index: j,
        prompt: g.query,
        completion: a.text,
        reward: a.reward,
        advantage: a.advantage,
        kl: a.kl,
        logp: a.logp,
        logp_ref: a.logpRef,
        completion_length: a.tokens,
        finish_reason: a.finishReason,
        prompt_length: g.queryTokens,
        query_valid: g.queryValid,
        query_kl: g.queryKl,
        challenger_reward: g.challengerReward,
        challenger_advantage: g.challengerAdvantage,
      };
      for (const [name, v] of Object.entries(a.rewards)) row[name] = v;
      if (a.judge) {
        row.judge_score = a.judge.score;
        row.judge_parse = a.judge.reason;
        row.judge_text = a.judge.text;
      }
      rows.push(row);
    }
  }
  return rows;
}

/** JSONL, one answer per line; non-finite numbers become null (JSON has no NaN). */
export function completionsJsonl(games: readonly GameRecord[]): string {
  return completionRows(games)
    .map((r) => JSON.stringify(r, (_k, v: unknown) => (typeof v === 'number' ? finite(v) : v)))
    .map((l) => l + '\n')
    .join('');
}

/** Metric columns: TRL-named metrics in their usual order, then per-source and other names alphabetically. */
export function metricColumns(history: readonly IterationMetrics[]): string[] {
  const seen = new Set<string>();
  for (const m of history) for (const k of Object.keys(m.values)) seen.add(k);
  const known = METRIC_NAMES.filter((n) => seen.has(n));
  const rest = [...seen].filter((n) => !(known as readonly string[]).includes(n)).sort();
  return [...known, ...rest];
}

function csvCell(v: string): string {
  return /[",\n\r]/.test(v) ? `"${v.replace(/"/g, '""')}"` : v;
}

function csvNumber(v: number | undefined): string {
  if (v === undefined) return '';
  if (Number.isNaN(v)) return 'nan';
  if (v === Infinity) return 'inf';
  if (v === -Infinity) return '-inf';
  return String(v);
}

/** CSV with a header row: step, time (ISO 8601), then the metric columns; empty cells where an iteration lacks a metric. */
export function metricsCsv(history: readonly IterationMetrics[]): string {
  const cols = metricColumns(history);
  const lines = [['step', 'time', ...cols].map(csvCell).join(',')];
  for (const m of history) lines.push([String(m.iteration), new Date(m.time).toISOString(), ...cols.map((c) => csvNumber(m.values[c]))].join(','));
  return lines.join('\n') + '\n';
}

/** The report's files, to add beside the adapter files of an export. */
export function reportFiles(games: readonly GameRecord[], history: readonly IterationMetrics[]): Map<string, Uint8Array> {
  const enc = new TextEncoder();
  return new Map([
    [COMPLETIONS_FILE, enc.encode(completionsJsonl(games))],
    [METRICS_FILE, enc.encode(metricsCsv(history))],
  ]);
}
