import { useState } from 'react';
import { LLAMA_PROJECTIONS, type LlamaProjection } from '../../formats/peft';
import { CONFIG_HELP, DEFAULT_CONFIG, makeConfig, microDemoConfig, type TrainerConfig } from '../../selfplay/config';
import { useActions } from '../context';
import { useLab } from '../store';

/** 'list': a list of words (e.g. operators), typed separated by spaces. */
type FieldKind = 'int' | 'number' | 'text' | 'list' | 'bool' | { options: [string, string][] };

interface Field {
  path: string;
  label: string;
  kind: FieldKind;
}

const HELP: Record<string, string> = {
  ...CONFIG_HELP,
  'rewards.judge.weight': 'Weight of the judge\'s 0..7 score (the paper adds it unscaled: weight 1).',
  'rewards.judge.maxTokens': 'Longest judgement the reference model may write.',
  'rewards.judge.temperature': 'Sampling temperature of the judge (0: greedy).',
  'rewards.judge.fallback': 'Score given when the judge\'s verdict cannot be parsed.',
  'rewards.rewardModel.enabled': 'Score answers with a reward model on the same engine (the paper: Skywork-Reward-V2-Llama-3.2-3B); load it in the Reward model panel.',
  'rewards.rewardModel.weight': 'Weight of the reward model\'s score.',
  'rewards.verifiable.enabled': 'Exact-match arithmetic checked by code (always on in the arithmetic world).',
  'rewards.verifiable.weight': 'Weight of the verifiable reward.',
  'lora.useRslora': 'Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r.',
};

const GROUPS: { title: string; fields: Field[] }[] = [
  {
    title: 'Game',
    fields: [
      { path: 'mode', label: 'method', kind: { options: [['lsp', 'LSP (game + quality self-reward)'], ['lsp-zero', 'LSP-Zero (pure game)']] } },
      {
        path: 'world',
        label: 'world',
        kind: { options: [['open', 'open (any query)'], ['freeform-arithmetic', 'free-form arithmetic (problems written as text)'], ['arithmetic', 'arithmetic (toy)']] },
      },
      { path: 'task', label: 'task', kind: 'text' },
      { path: 'template', label: 'template', kind: 'text' },
      { path: 'queriesPerIteration', label: 'queries per iteration N', kind: 'int' },
      { path: 'groupSize', label: 'answers per query G', kind: 'int' },
      { path: 'maxQueryTokens', label: 'max query tokens', kind: 'int' },
      { path: 'maxAnswerTokens', label: 'max answer tokens', kind: 'int' },
      { path: 'temperature', label: 'temperature', kind: 'number' },
      { path: 'topP', label: 'top-p', kind: 'number' },
      { path: 'arithmeticMaxOperand', label: 'largest operand (arithmetic)', kind: 'int' },
      { path: 'arithmeticOperators', label: 'operators (free-form arithmetic)', kind: 'list' },
      { path: 'examEvery', label: 'held-out exam every (iterations)', kind: 'int' },
    ],
  },
  {
    title: 'Rewards',
    fields: [
      { path: 'rewards.judge.weight', label: 'judge weight', kind: 'number' },
      { path: 'rewards.judge.maxTokens', label: 'judge max tokens', kind: 'int' },
      { path: 'rewards.judge.temperature', label: 'judge temperature', kind: 'number' },
      { path: 'rewards.judge.fallback', label: 'unparsed judgement scores', kind: { options: [['zero', '0'], ['midpoint', '3.5 (midpoint)']] } },
      { path: 'rewards.rewardModel.enabled', label: 'reward model (load one below)', kind: 'bool' },
      { path: 'rewards.rewardModel.weight', label: 'reward model weight', kind: 'number' },
      { path: 'rewards.verifiable.enabled', label: 'verifiable arithmetic reward', kind: 'bool' },
      { path: 'rewards.verifiable.weight', label: 'verifiable weight', kind: 'number' },
      { path: 'challengerQualityWeight', label: 'challenger quality weight', kind: 'number' },
    ],
  },
  {
    title: 'Loss',
    fields: [
      { path: 'beta', label: 'KL coefficient beta', kind: 'number' },
      { path: 'klEstimator', label: 'KL estimator', kind: { options: [['k1', 'k1 (paper)'], ['k3', 'k3 (TRL)']] } },
      { path: 'klPlacement', label: 'KL placement', kind: { options: [['loss', 'in the loss'], ['reward', 'as a reward penalty']] } },
      { path: 'alphaCh', label: 'challenger loss weight', kind: 'number' },
      {
        path: 'aggregation',
        label: 'token aggregation',
        kind: { options: [['grpo', 'grpo'], ['bnpo', 'bnpo'], ['dr_grpo', 'dr_grpo'], ['dapo', 'dapo'], ['seq_sum', 'seq_sum']] },
      },
      { path: 'advantageScale', label: 'advantage scaling', kind: { options: [['none', 'mean-centred (paper)'], ['group', 'divided by group std (TRL)']] } },
    ],
  },
  {
    title: 'Optimizer',
    fields: [
      { path: 'lr', label: 'learning rate', kind: 'number' },
      { path: 'weightDecay', label: 'weight decay', kind: 'number' },
      { path: 'maxGradNorm', label: 'max grad norm', kind: 'number' },
      { path: 'microBatch', label: 'micro-batch', kind: 'int' },
    ],
  },
  {
    title: 'LoRA',
    fields: [
      { path: 'lora.r', label: 'rank r', kind: 'int' },
      { path: 'lora.alpha', label: 'alpha', kind: 'number' },
      { path: 'lora.useRslora', label: 'rsLoRA scaling', kind: 'bool' },
    ],
  },
  {
    title: 'Run',
    fields: [
      { path: 'seed', label: 'seed', kind: 'int' },
      { path: 'checkpointEvery', label: 'checkpoint every (iterations)', kind: 'int' },
    ],
  },
];

/** A quick run that finishes in seconds on any GPU (and in minutes on a software one). */
export const TOY_CONFIG: TrainerConfig = makeConfig({
  mode: 'lsp-zero',
  world: 'arithmetic',
  queriesPerIteration: 2,
  groupSize: 2,
  maxQueryTokens: 8,
  maxAnswerTokens: 4,
  microBatch: 4,
  lr: 1e-3,
  lora: { r: 4, alpha: 8 },
  // Sums up to 2 among 3 answers: even a random Solver is right often enough for the rewards to differ.
  arithmeticMaxOperand: 1,
  rewards: { verifiable: { enabled: true, weight: 1 } },
});

function get(c: TrainerConfig, path: string): unknown {
  return path.split('.').reduce<unknown>((o, k) => (o as Record<string, unknown>)[k], c);
}

function set(c: TrainerConfig, path: string, value: unknown): TrainerConfig {
  const copy = structuredClone(c) as unknown as Record<string, unknown>;
  const keys = path.split('.');
  let o = copy;
  for (const k of keys.slice(0, -1)) o = o[k] as Record<string, unknown>;
  o[keys.at(-1)!] = value;
  return copy as unknown as TrainerConfig;
}

export function SettingsPanel() {
  const actions = useActions();
  const draft = useLab((s) => s.draft);
  const runConfig = useLab((s) => s.runConfig);
  // Text as typed, so a half-typed number ("1e-") stays on screen while it is invalid.
  const [typed, setTyped] = useState<Record<string, string>>({});
  const [error, setError] = useState<{ field: string; message: string } | null>(null);

  const apply = (next: TrainerConfig) => {
    const msg = actions.setDraft(next);
    const field = msg ? (/^setting ([\w.]+):/.exec(msg)?.[1] ?? '') : '';
    setError(msg ? { field, message: msg } : null);
  };
  const onValue = (f: Field, raw: string | boolean) => {
    if (typeof raw === 'boolean') return apply(set(draft, f.path, raw));
    setTyped((t) => ({ ...t, [f.path]: raw }));
    const value = f.kind === 'int' || f.kind === 'number' ? (raw.trim() === '' ? NaN : Number(raw)) : f.kind === 'list' ? raw.split(/[\s,]+/).filter(Boolean) : raw;
    apply(set(draft, f.path, value));
  };
  const preset = (c: TrainerConfig) => {
    setTyped({});
    apply(c);
  };
  const toggleTarget = (t: LlamaProjection, on: boolean) => {
    const targets = on ? LLAMA_PROJECTIONS.filter((p) => p === t || draft.lora.targets.includes(p)) : draft.lora.targets.filter((p) => p !== t);
    apply(set(draft, 'lora.targets', targets));
  };

  return (
    <section className="panel settings" aria-label="Run settings" data-testid="settings">
      <h2>Settings</h2>
      {runConfig && <p className="hint">Changes apply to the next run you start; the run in progress keeps its settings.</p>}
      <div className="buttons">
        <button className="secondary" onClick={() => preset(DEFAULT_CONFIG)}>
          Paper defaults
        </button>
        <button className="secondary" onClick={() => preset(TOY_CONFIG)} data-testid="preset-toy">
          Quick toy run (arithmetic)
        </button>
        <button className="secondary" onClick={() => preset(microDemoConfig())} data-testid="preset-demo" title="The quick demo's settings, for models/micro-arith">
          Micro model demo (free-form arithmetic, exam)
        </button>
      </div>
      {error && (
        <p role="alert" className="error" data-testid="settings-error">
          {error.message}
        </p>
      )}
      {GROUPS.map((g) => (
        <details key={g.title} open={g.title === 'Game'}>
          <summary>{g.title}</summary>
          {g.fields.map((f) => (
            <SettingField key={f.path} field={f} value={get(draft, f.path)} typed={typed[f.path]} invalid={error?.field === f.path} onValue={(v) => onValue(f, v)} />
          ))}
          {g.title === 'LoRA' && (
            <fieldset className="targets">
              <legend title={HELP['lora.targets']}>target projections</legend>
              {LLAMA_PROJECTIONS.map((p) => (
                <label key={p}>
                  <input type="checkbox" checked={draft.lora.targets.includes(p)} onChange={(e) => toggleTarget(p, e.target.checked)} /> {p}
                </label>
              ))}
              <p className="hint">{HELP['lora.targets']}</p>
            </fieldset>
          )}
        </details>
      ))}
    </section>
  );
}

function SettingField({ field: f, value, typed, invalid, onValue }: { field: Field; value: unknown; typed: string | undefined; invalid: boolean; onValue: (v: string | boolean) => void }) {
  const id = `setting-${f.path}`;
  const help = HELP[f.path];
  let input;
  if (f.kind === 'bool') {
    input = <input id={id} type="checkbox" checked={!!value} onChange={(e) => onValue(e.target.checked)} />;
  } else if (typeof f.kind === 'object') {
    input = (
      <select id={id} value={typeof value === 'string' ? value : 'zero'} onChange={(e) => onValue(e.target.value)}>
        {f.kind.options.map(([v, label]) => (
          <option key={v} value={v}>
            {label}
          </option>
        ))}
      </select>
    );
  } else {
    const shown = typed ?? (typeof value === 'number' && Number.isNaN(value) ? '' : Array.isArray(value) ? value.join(' ') : String(value ?? ''));
    input = (
      <input
        id={id}
        type="text"
        inputMode={f.kind === 'text' ? 'text' : 'decimal'}
        value={shown}
        aria-invalid={invalid}
        onChange={(e) => onValue(e.target.value)}
        spellCheck={false}
      />
    );
  }
  return (
    <div className={`field ${invalid ? 'invalid' : ''}`} data-testid={id}>
      <label htmlFor={id}>{f.label}</label>
      {input}
      {help && <p className="hint">{help}</p>}
    </div>
  );
}
