import { useState } from 'react';
import { useShallow } from 'zustand/react/shallow';
import type { DownloadLink } from '../actions';
import { useActions } from '../context';
import { formatBytes, formatValue } from '../format';
import { useLab } from '../store';

export function AdapterPanel() {
  const actions = useActions();
  const { runConfig, runState, evaluation, evaluating } = useLab(
    useShallow((s) => ({ runConfig: s.runConfig, runState: s.runState, evaluation: s.evaluation, evaluating: s.evaluating })),
  );
  const [links, setLinks] = useState<DownloadLink[]>([]);
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
        <button disabled={!runConfig || evaluating || busy} onClick={() => void actions.evaluate()} data-testid="evaluate">
          {evaluating ? 'Evaluating…' : 'Evaluate base vs adapter'}
        </button>
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
            {evaluation.ties} ties, {evaluation.losses} losses{evaluation.unparsed ? `, ${evaluation.unparsed} judgements unparsed` : ''}), judged by the base model in
            both orders.
          </p>
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
                  verdicts {String(it.verdicts[0])} / {String(it.verdicts[1])}, score {it.score}
                </p>
              </div>
            ))}
          </details>
        </div>
      )}
    </section>
  );
}
