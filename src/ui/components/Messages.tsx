import { useShallow } from 'zustand/react/shallow';
import { dismissError, useLab } from '../store';

const CONTEXT: Record<string, string> = {
  gpu: 'GPU',
  load: 'Loading the model',
  run: 'The run',
  export: 'Export',
  import: 'Import',
  evaluate: 'Evaluation',
  storage: 'Storage',
  settings: 'Settings',
};

/** Errors and notices, as text; errors say whether the run is still safe. */
export function Messages() {
  const { errors, notices } = useLab(useShallow((s) => ({ errors: s.errors, notices: s.notices })));
  if (errors.length === 0 && notices.length === 0) return null;
  return (
    <div className="messages" aria-live="polite">
      {errors.map((e) => (
        <div key={e.id} role="alert" className="error message" data-testid="error">
          <p>
            <strong>{CONTEXT[e.context] ?? e.context}:</strong> {e.message}
          </p>
          {e.runPreserved && e.context !== 'settings' && <p className="hint">Your saved run is untouched.</p>}
          <button className="secondary" onClick={() => dismissError(e.id)}>
            Dismiss
          </button>
        </div>
      ))}
      {notices.map((n, i) => (
        <p key={i} className="notice">
          {n}
        </p>
      ))}
    </div>
  );
}
