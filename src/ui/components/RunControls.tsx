import { useShallow } from 'zustand/react/shallow';
import { useActions } from '../context';
import { formatBytes } from '../format';
import { useLab } from '../store';

export function RunControls() {
  const actions = useActions();
  const s = useLab(
    useShallow((s) => ({
      runState: s.runState,
      iteration: s.iteration,
      runConfig: s.runConfig,
      model: s.model,
      lastCheckpoint: s.lastCheckpoint,
      skipped: s.skipped,
    })),
  );
  const busy = s.runState === 'running' || s.runState === 'pausing';
  const hasRun = s.runConfig !== null;
  return (
    <section className="panel controls" aria-label="Run controls" data-testid="controls">
      <h2>
        Run · iteration <span data-testid="iteration">{s.iteration}</span>
      </h2>
      <p>
        Model: <strong>{s.model?.label}</strong> ({s.model?.format === 'q4' ? '4-bit' : 'f32'}, {formatBytes(s.model?.gpuBytes ?? 0)} on the GPU
        {s.model?.fromCache ? ', from the cache' : ''})
      </p>
      {s.model?.cacheNote && <p className="hint">Cache: {s.model.cacheNote}</p>}
      <p data-testid="run-state">
        {s.runState === 'idle' && 'No run yet.'}
        {s.runState === 'running' && 'Running.'}
        {s.runState === 'pausing' && 'Pausing after this iteration (Stop now ends it at once, discarded)…'}
        {s.runState === 'paused' && (hasRun ? 'Paused.' : 'Ready.')}
        {s.runConfig && ` ${s.runConfig.mode === 'lsp' ? 'LSP' : 'LSP-Zero'}, ${s.runConfig.world} world, N = ${s.runConfig.queriesPerIteration}, G = ${s.runConfig.groupSize}.`}
      </p>
      <div className="buttons">
        <button onClick={() => void actions.start()} disabled={busy} data-testid="start" title="Start a new run with the settings below (replaces the saved run)">
          Start new run
        </button>
        {s.runState === 'running' ? (
          <button onClick={() => void actions.pause()} data-testid="pause">
            Pause
          </button>
        ) : (
          <button onClick={() => void actions.resume()} disabled={!hasRun || busy} data-testid="resume">
            Resume
          </button>
        )}
        <button
          className="secondary"
          onClick={() => void actions.stopNow()}
          disabled={!busy}
          data-testid="stop-now"
          title="Stop at once: the iteration in flight is discarded (no update); the run stays at its last finished iteration and checkpoint"
        >
          Stop now
        </button>
        <button onClick={() => void actions.step()} disabled={busy} data-testid="step" title="Play and train exactly one iteration">
          Step one iteration
        </button>
        <button className="secondary" onClick={() => void actions.resetRun()} disabled={busy || !hasRun} data-testid="reset">
          Reset run
        </button>
      </div>
      {s.lastCheckpoint && (
        <p className="hint" data-testid="checkpoint">
          Saved in this browser at iteration {s.lastCheckpoint.iteration} ({formatBytes(s.lastCheckpoint.bytes)}); a reload continues from there.
        </p>
      )}
      {s.skipped.length > 0 && (
        <p className="warning">
          Update skipped at iteration {s.skipped.at(-1)!.iteration}: {s.skipped.at(-1)!.reason}
        </p>
      )}
    </section>
  );
}
