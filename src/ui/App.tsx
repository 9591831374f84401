import { useEffect, useState } from 'react';
import { useShallow } from 'zustand/react/shallow';
import type { LabActions } from './actions';
import { AdapterPanel } from './components/AdapterPanel';
import { Charts } from './components/Charts';
import { ChatPanel } from './components/ChatPanel';
import { CustomRewardPanel } from './components/CustomRewardPanel';
import { GameHistory, LiveGames } from './components/GameView';
import { Messages } from './components/Messages';
import { RewardModelPanel } from './components/RewardModelPanel';
import { RunControls } from './components/RunControls';
import { SettingsPanel } from './components/Settings';
import { StartScreen } from './components/StartScreen';
import { ActionsContext } from './context';
import { useLab } from './store';

/** The lab: the start screen until a model is loaded, then the run. */
export function App({ actions }: { actions: LabActions }) {
  useEffect(() => {
    void actions.check();
  }, [actions]);
  const { model, runState } = useLab(useShallow((s) => ({ model: s.model, runState: s.runState })));
  const [picking, setPicking] = useState(false);
  const showStart = !model || picking;
  useEffect(() => setPicking(false), [model]);
  return (
    <ActionsContext.Provider value={actions}>
      <main className="lab">
        <header>
          <h1>selfplay-lab</h1>
          <p>
            Language Self-Play in this tab: one model plays the Challenger, who writes queries, and the Solver, who answers them; a LoRA adapter learns from
            the game on your GPU.
          </p>
          {model && !picking && runState !== 'running' && runState !== 'pausing' && (
            <button className="secondary" onClick={() => setPicking(true)}>
              Load another model
            </button>
          )}
          {picking && model && (
            <button className="secondary" onClick={() => setPicking(false)}>
              Back to the run
            </button>
          )}
        </header>
        <Messages />
        {showStart ? (
          <StartScreen />
        ) : (
          <div className="workspace">
            <aside>
              <RunControls />
              <AdapterPanel />
              <SettingsPanel />
              <RewardModelPanel />
              <CustomRewardPanel />
            </aside>
            <div className="main">
              <LiveGames />
              <ChatPanel />
              <Charts />
              <GameHistory />
            </div>
          </div>
        )}
      </main>
    </ActionsContext.Provider>
  );
}
