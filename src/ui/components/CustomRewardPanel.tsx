import { useState } from 'react';
import { useShallow } from 'zustand/react/shallow';
import { CUSTOM_REWARD_EXAMPLES, DEFAULT_CUSTOM_REWARD, type CustomRewardSpec, type SandboxReply } from '../../selfplay/custom-reward';
import { useActions } from '../context';
import { useLab } from '../store';

/**
 * "Your own reward": a JavaScript function of (query, answer) returning a number, run in
 * a sandboxed worker with a time limit per call. Failures are named and counted as
 * fallbacks (reward/custom_fallback_count); the run goes on.
 */
export function CustomRewardPanel() {
  const actions = useActions();
  const { current, notes } = useLab(useShallow((s) => ({ current: s.customReward, notes: s.customRewardNotes })));
  const [source, setSource] = useState(current?.source ?? CUSTOM_REWARD_EXAMPLES[0]!.source);
  const [name, setName] = useState(current?.name ?? DEFAULT_CUSTOM_REWARD.name);
  const [weight, setWeight] = useState(String(current?.weight ?? DEFAULT_CUSTOM_REWARD.weight));
  const [timeoutMs, setTimeoutMs] = useState(String(current?.timeoutMs ?? DEFAULT_CUSTOM_REWARD.timeoutMs));
  const [fallback, setFallback] = useState(String(current?.fallback ?? DEFAULT_CUSTOM_REWARD.fallback));
  const [query, setQuery] = useState('Write a JSON object with a name field.');
  const [answer, setAnswer] = useState('{"name": "Ada"}\nAnswer: done');
  const [tried, setTried] = useState<SandboxReply | null>(null);
  const [busy, setBusy] = useState(false);
  const spec = (): CustomRewardSpec => ({ name: name.trim(), source, weight: Number(weight), timeoutMs: Number(timeoutMs), fallback: Number(fallback) });
  const run = async (f: () => Promise<unknown>) => {
    setBusy(true);
    try {
      await f();
    } finally {
      setBusy(false);
    }
  };
  return (
    <section className="panel" aria-label="Your own reward" data-testid="custom-reward">
      <h2>Your own reward</h2>
      <p className="hint">
        A JavaScript function of (query, answer) that returns a number, added to the Solver's reward. It runs in a sandboxed worker without page, network or
        storage access, with a time limit per call; a call that throws, runs too long or returns something that is not a number gets the fallback and is
        counted in reward/custom_fallback_count.
      </p>
      <p>
        {current ? (
          <>
            In use: <strong>{current.name}</strong> (weight {current.weight}).{' '}
            <button className="secondary" disabled={busy} onClick={() => void run(() => actions.setCustomReward(null))}>
              Turn off
            </button>
          </>
        ) : (
          'Not in use.'
        )}
      </p>
      <label>
        Example{' '}
        <select aria-label="Reward example" value="" onChange={(e) => {
          const ex = CUSTOM_REWARD_EXAMPLES.find((x) => x.id === e.target.value);
          if (ex) setSource(ex.source);
        }}>
          <option value="">pick one…</option>
          {CUSTOM_REWARD_EXAMPLES.map((ex) => (
            <option key={ex.id} value={ex.id}>
              {ex.title}
            </option>
          ))}
        </select>
      </label>
      <textarea aria-label="Reward function source" value={source} onChange={(e) => setSource(e.target.value)} spellCheck={false} rows={10} style={{ width: '100%', fontFamily: 'monospace' }} />
      <div className="row">
        <label>
          name <input type="text" aria-label="Reward name" value={name} onChange={(e) => setName(e.target.value)} size={10} />
        </label>{' '}
        <label>
          weight <input type="number" aria-label="Reward weight" value={weight} step="any" onChange={(e) => setWeight(e.target.value)} style={{ width: '5em' }} />
        </label>{' '}
        <label>
          ms per call <input type="number" aria-label="Reward time limit" value={timeoutMs} min={1} onChange={(e) => setTimeoutMs(e.target.value)} style={{ width: '5em' }} />
        </label>{' '}
        <label>
          fallback <input type="number" aria-label="Reward fallback" value={fallback} step="any" onChange={(e) => setFallback(e.target.value)} style={{ width: '5em' }} />
        </label>
      </div>
      <details>
        <summary>Try it on a sample</summary>
        <input type="text" aria-label="Sample query" value={query} onChange={(e) => setQuery(e.target.value)} style={{ width: '100%' }} />
        <textarea aria-label="Sample answer" value={answer} onChange={(e) => setAnswer(e.target.value)} rows={3} style={{ width: '100%' }} />
        <button className="secondary" disabled={busy} onClick={() => void run(async () => setTried((await actions.tryCustomReward(spec(), query, answer)) ?? null))}>
          Try
        </button>{' '}
        {tried && (
          <output data-testid="custom-reward-try">{tried.ok ? `reward ${tried.value}` : `fallback (${tried.reason}): ${tried.message}`}</output>
        )}
      </details>
      <button disabled={busy} onClick={() => void run(() => actions.setCustomReward(spec()))}>
        {current ? 'Update the reward' : 'Use this reward'}
      </button>
      {current && <p className="hint">A change applies from the run's next iteration.</p>}
      {notes.length > 0 && (
        <ul className="notes" aria-label="Reward fallbacks" data-testid="custom-reward-notes">
          {notes.map((n, k) => (
            <li key={k}>
              iteration {n.iteration}: {n.message}
            </li>
          ))}
        </ul>
      )}
    </section>
  );
}
