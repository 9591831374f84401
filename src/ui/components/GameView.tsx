import { useContext, useEffect, useMemo, useState, useSyncExternalStore } from 'react';
import { useShallow } from 'zustand/react/shallow';
import { gameMatches, type GameSearchResult } from '../../selfplay/games-log';
import type { AnswerRecord, GameRecord } from '../../selfplay/types';
import { ActionsContext } from '../context';
import { formatValue } from '../format';
import { live } from '../live';
import { useLab } from '../store';

// Every string a model wrote is rendered as a React text child: never as HTML.

const PHASES: Record<string, string> = {
  challenger: 'the Challenger is writing queries',
  solver: 'the Solver is answering',
  judge: 'the reference model is judging the answers',
  reward_model: 'the reward model is scoring the answers',
  scoring: 'scoring log-probs under the policy and the reference',
  training: 'training the adapter',
  checkpoint: 'saving a checkpoint',
  evaluation: 'evaluating base vs adapter',
};

/** The iteration in progress: queries and answers as they stream, then their scores. */
export function LiveGames() {
  useSyncExternalStore(live.subscribe, live.getVersion);
  const { games, runState } = useLab(useShallow((s) => ({ games: s.games, runState: s.runState })));
  const cur = live.current;
  // The newest iteration that has any text: live while it streams, scored once its games arrive.
  const shown = cur.iteration >= 0 ? cur.iteration : (games.at(-1)?.iteration ?? -1);
  const scored = useMemo(() => games.filter((g) => g.iteration === shown), [games, shown]);
  const queryCount = Math.max(cur.iteration === shown ? cur.queries.length : 0, scored.length);
  return (
    <section className="panel" aria-label="Live game" data-testid="live-game">
      <h2>
        Game {shown >= 0 ? <span data-testid="live-iteration">iteration {shown}</span> : null}
        {runState === 'running' && cur.phase && <span className="phase"> · {PHASES[cur.phase] ?? cur.phase}</span>}
        {(runState === 'running' || runState === 'pausing') && live.tokensPerSecond() > 0 && (
          <span className="rate" data-testid="live-rate"> · {live.tokensPerSecond().toFixed(1)} tokens/s</span>
        )}
      </h2>
      {queryCount === 0 && <p className="hint">Start the run: the Challenger's queries and the Solver's answers appear here as they are written.</p>}
      {Array.from({ length: queryCount }, (_, i) => {
        const g = scored.find((x) => x.index === i);
        return g ? <GameCard key={`s${i}`} game={g} /> : <StreamingGame key={`l${i}`} index={i} />;
      })}
    </section>
  );
}

function StreamingGame({ index }: { index: number }) {
  const cur = live.current;
  const answers = cur.answers[index] ?? [];
  const judges = cur.judges[index] ?? [];
  return (
    <article className="game streaming" data-testid="streaming-game">
      <div className="challenger">
        <h3>Challenger · query {index + 1}</h3>
        <p className="model-text" data-testid="query-text">
          {cur.queries[index] ?? ''}
        </p>
      </div>
      {answers.length > 0 && (
        <div className="answers" style={{ gridTemplateColumns: `repeat(${Math.min(answers.length, 4)}, minmax(0, 1fr))` }}>
          {answers.map((a, j) => (
            <div className="answer" key={j}>
              <h4>Solver · answer {j + 1}</h4>
              <p className="model-text" data-testid="answer-text">
                {a ?? ''}
              </p>
              {judges[j] && <p className="judge model-text">{judges[j]}</p>}
            </div>
          ))}
        </div>
      )}
    </article>
  );
}

export function GameCard({ game, full = false }: { game: GameRecord; full?: boolean }) {
  const G = game.answers.length;
  return (
    <article className="game" data-testid="game-card" data-iteration={game.iteration} data-index={game.index}>
      <div className="challenger">
        <h3>
          Challenger · iteration {game.iteration}, query {game.index + 1}
        </h3>
        <p className="model-text" data-testid="query-text">
          {game.query}
        </p>
        <dl className="scores">
          <Score label="reward" value={game.challengerReward} testid="challenger-reward" />
          <Score label="advantage" value={game.challengerAdvantage} />
          <Score label="KL" value={game.queryKl} />
          <Score label="V(q)" value={game.value} />
          <Score label="V_Q(q)" value={game.qualityValue} />
          <Score label="tokens" value={game.queryTokens} />
          {game.queryValid !== null && (
            <>
              <dt>valid</dt>
              <dd>{game.queryValid ? 'yes' : 'no'}</dd>
            </>
          )}
        </dl>
      </div>
      <div className="answers" style={{ gridTemplateColumns: `repeat(${Math.min(G, full ? 2 : 4)}, minmax(0, 1fr))` }}>
        {game.answers.map((a, j) => (
          <Answer key={j} answer={a} index={j} full={full} />
        ))}
      </div>
    </article>
  );
}

function Answer({ answer: a, index, full }: { answer: AnswerRecord; index: number; full: boolean }) {
  // The arithmetic world's answers are one number token by design: not cut short.
  const oneToken = useLab((s) => s.runConfig?.world === 'arithmetic');
  return (
    <div className="answer" data-testid="answer">
      <h4>
        Solver · answer {index + 1}
        {a.finishReason === 'length' && !oneToken && <span className="hint"> (cut at the length limit)</span>}
      </h4>
      <p className="model-text" data-testid="answer-text">
        {a.text}
      </p>
      <dl className="scores">
        {Object.entries(a.rewards).map(([name, v]) => (
          <Score key={name} label={`reward: ${name}`} value={v} />
        ))}
        <Score label="reward" value={a.reward} testid="answer-reward" />
        <Score label="advantage" value={a.advantage} testid="answer-advantage" />
        <Score label="KL" value={a.kl} testid="answer-kl" />
        <Score label="tokens" value={a.tokens} />
      </dl>
      {a.judge && (
        <details open={full}>
          <summary>
            Judge: {a.judge.score} / 7 ({a.judge.reason})
          </summary>
          <p className="model-text judge">{a.judge.text}</p>
        </details>
      )}
    </div>
  );
}

function Score({ label, value, testid }: { label: string; value: number; testid?: string }) {
  return (
    <>
      <dt>{label}</dt>
      <dd data-testid={testid}>{formatValue(value)}</dd>
    </>
  );
}

const SHOWN = 200;

/**
 * Every game of the run, newest first, searchable; one opens in full. The page holds the
 * newest games only; when the run has more, a search also runs in the worker over the
 * games it paged out to the run store, and its answer replaces the page's own matches.
 */
export function GameHistory() {
  const { games, gamesTotal } = useLab(useShallow((s) => ({ games: s.games, gamesTotal: Math.max(s.gamesTotal, s.games.length) })));
  const actions = useContext(ActionsContext);
  const [query, setQuery] = useState('');
  const [open, setOpen] = useState<GameRecord | null>(null);
  const local = useMemo(() => games.filter((g) => gameMatches(g, { text: query })).reverse(), [games, query]);
  const older = gamesTotal > games.length;
  const [remote, setRemote] = useState<{ query: string; result: GameSearchResult } | null>(null);
  useEffect(() => {
    if (!older || !actions || !query.trim()) return;
    let current = true;
    const timer = setTimeout(() => {
      void actions.searchGames({ text: query, limit: SHOWN }).then((result) => {
        if (current && result) setRemote({ query, result });
      });
    }, 250);
    return () => {
      current = false;
      clearTimeout(timer);
    };
  }, [actions, older, query]);
  const fromWorker = older && remote && remote.query === query ? remote.result : null;
  const matches = fromWorker ? fromWorker.games : local;
  const total = fromWorker ? fromWorker.total : local.length;
  const shown = matches.slice(0, SHOWN);
  return (
    <section className="panel" aria-label="Game history" data-testid="history">
      <h2>
        History ({gamesTotal} games{older ? `, the newest ${games.length} on the page` : ''})
      </h2>
      <input type="search" placeholder="Search queries and answers" value={query} onChange={(e) => setQuery(e.target.value)} aria-label="Search games" />
      {older && query.trim() && !fromWorker && <p className="hint">Searching older games too…</p>}
      {total > shown.length && <p className="hint">Showing the newest {shown.length} of {total} matches.</p>}
      <ul className="history">
        {shown.map((g) => (
          <li key={`${g.iteration}-${g.index}`}>
            <button className="link" onClick={() => setOpen(g)} data-testid="history-item">
              <span className="tag">
                it {g.iteration} · q {g.index + 1}
              </span>{' '}
              <span className="excerpt">{g.query.length > 120 ? `${g.query.slice(0, 120)}…` : g.query}</span>{' '}
              <span className="tag">V {formatValue(g.value)}</span>
            </button>
          </li>
        ))}
      </ul>
      {open && (
        <div className="game-detail" role="dialog" aria-label="Game in full" data-testid="game-detail">
          <button className="secondary" onClick={() => setOpen(null)}>
            Close
          </button>
          <GameCard game={open} full />
        </div>
      )}
    </section>
  );
}
