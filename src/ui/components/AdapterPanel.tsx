import { useState } from 'react';
import { useShallow } from 'zustand/react/shallow';
import type { EvaluationJudge } from '../../selfplay/types';
import type { DownloadLink } from '../actions';
import { useActions } from '../context';
import { formatBytes, formatValue } from '../format';
import { useLab } from '../store';

export function AdapterPanel() {
  const actions = useActions();
  const { runConfig, runState, evaluation, evaluating, rewardModel } = useLab(
    useShallow((s) => ({ runConfig: s.runConfig, runState: s.runState, evaluation: s.evaluation, evaluating: s.evaluating, rewardModel: s.rewardModel })),
  );
  const [links, setLinks] = useState<DownloadLink[]>([]);
  const [judge, setJudge] = useState<EvaluationJudge>('reference');
  const judgeNow: EvaluationJudge = rewardModel ? judge : 'reference';
  const [exporting, setExporting] = useState(false);
  const busy = runState === 'running' || runState === 'pausing';
  return (
    <section className="panel" aria-label="Adapter" data-testid="adapter">
      <h2>Adapter</h2>
      <div className="buttons">
        <button
          disabled={!runConfig || exporting}
          data-testid="export"
          onClick={async () => {
            setExporting(true);
            setLinks(await actions.exportRun(true));
            setExporting(false);
          }}
        >
          {exporting ? 'Exporting…' : 'Export adapter'}
        </button>
        <label className="file-button">
          Import adapter
          <input
            type="file"
            hidden
            multiple
            accept=".json,.safetensors"
            data-testid="import"
            onChange={(e) => {
              const files = Array.from(e.target.files ?? []);
              e.target.value = '';
              if (files.length > 0) void actions.importAdapter(files);
            }}
          />
        </label>
        <button disabled={!runConfig || evaluating || busy} onClick={() => void actions.evaluate(undefined, judgeNow)} data-testid="evaluate">
          {evaluating ? 'Evaluating…' : 'Evaluate base vs adapter'}
        </button>
        <label>
          judged by{' '}
          <select value={judgeNow} onChange={(e) => setJudge(e.target.value as EvaluationJudge)} aria-label="Evaluation judge" data-testid="evaluate-judge">
            <option value="reference">the base model (pairwise, both orders)</option>
            <option value="reward-model" disabled={!rewardModel}>
              the reward model{rewardModel ? '' : ' (load one below)'}
            </option>
          </select>
        </label>
      </div>
      <p className="hint">
        Export downloads a PEFT adapter (adapter_config.json, adapter_model.safetensors: loads with PEFT, vLLM or transformers) plus the run's settings and
        metrics. Import takes the two adapter files.
      </p>
      {links.length > 0 && (
        <ul className="downloads" data-testid="downloads">
          {links.map((l) => (
            <li key={l.name}>
              <a href={l.url} download={l.name}>
                {l.name}
              </a>{' '}
              ({formatBytes(l.bytes)})
            </li>
          ))}
        </ul>
      )}
      {evaluation && (
        <div data-testid="evaluation">
          <p>
            Adapter vs base at iteration {evaluation.iteration}: win rate <strong data-testid="win-rate">{formatValue(evaluation.winRate * 100)}%</strong> ({evaluation.wins} wins,{' '}
            {evaluation.ties} ties, {evaluation.losses} losses{evaluation.unparsed ? `, ${evaluation.unparsed} judgements unparsed` : ''}),{' '}
            {evaluation.judge === 'reward-model' ? 'the higher reward-model score winning' : 'judged by the base model in both orders'}.
          </p>
          {evaluation.exam && (
            <p data-testid="evaluation-exam">
              Held-out exam ({evaluation.exam.problems} problems, graded by code): base {formatValue(evaluation.exam.base * 100)}%, adapter{' '}
              {formatValue(evaluation.exam.adapter * 100)}%.
            </p>
          )}
          <details>
            <summary>Answers</summary>
            {evaluation.items.map((it, k) => (
              <div key={k} className="eval-item">
                <p className="model-text">
                  <strong>Instruction:</strong> {it.instruction}
                </p>
                <div className="answers" style={{ gridTemplateColumns: 'repeat(2, minmax(0, 1fr))' }}>
                  <p className="model-text">
                    <strong>Base:</strong> {it.base}
                  </p>
                  <p className="model-text">
                    <strong>Adapter:</strong> {it.adapter}
                  </p>
                </div>
                <p className="hint">
                  {it.rewardScores
                    ? `reward model: base ${formatValue(it.rewardScores.base)}, adapter ${formatValue(it.rewardScores.adapter)}`
                    : `verdicts ${String(it.verdicts[0])} / ${String(it.verdicts[1])}`}
                  , score {it.score}
                </p>
              </div>
            ))}
          </details>
        </div>
      )}
    </section>
  );
}
