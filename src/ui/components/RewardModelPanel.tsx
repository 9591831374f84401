import { useState } from 'react';
import { useShallow } from 'zustand/react/shallow';
import type { WeightFormat } from '../../worker/protocol';
import { useActions } from '../context';
import { formatBytes } from '../format';
import { useLab } from '../store';
import { LoadProgress } from './StartScreen';

const DEFAULT_REWARD_MODEL = 'Skywork/Skywork-Reward-V2-Llama-3.2-1B';

/** A second model that scores answers (LlamaForSequenceClassification), for rewards.rewardModel. */
export function RewardModelPanel() {
  const actions = useActions();
  const { rewardModel, loading, runState, format } = useLab(
    useShallow((s) => ({ rewardModel: s.rewardModel, loading: s.loading, runState: s.runState, format: s.model?.format ?? 'q4' })),
  );
  const [id, setId] = useState(DEFAULT_REWARD_MODEL);
  const [token, setToken] = useState('');
  const busy = runState === 'running' || runState === 'pausing';
  const choice = id.startsWith('models/') ? { kind: 'served' as const, folder: id.slice('models/'.length) } : { kind: 'hub' as const, id: id.trim() };
  return (
    <section className="panel" aria-label="Reward model" data-testid="reward-model">
      <h2>Reward model</h2>
      {rewardModel ? (
        <p>
          Loaded: <strong>{rewardModel.label}</strong> ({formatBytes(rewardModel.gpuBytes)} on the GPU{rewardModel.fromCache ? ', from the cache' : ''}). Turn on
          "reward model" in the settings' Rewards to score with it.{' '}
          <button className="secondary" disabled={busy} onClick={() => void actions.unloadRewardModel()}>
            Unload
          </button>
        </p>
      ) : (
        <>
          <p className="hint">
            Optional: a LlamaForSequenceClassification checkpoint (Hugging Face id, or models/&lt;folder&gt; on the dev server) whose score becomes a reward
            source. It loads in the same weight format as the policy ({format === 'q4' ? '4-bit' : 'f32'}).
          </p>
          <input type="text" value={id} onChange={(e) => setId(e.target.value)} aria-label="Reward model id" spellCheck={false} style={{ width: '100%' }} />
          <input type="password" value={token} onChange={(e) => setToken(e.target.value)} placeholder="access token (gated models only)" aria-label="Reward model access token" autoComplete="off" />{' '}
          <button disabled={loading || busy || !id.trim()} onClick={() => void actions.loadRewardModel(choice, token || undefined, format as WeightFormat)}>
            Load reward model
          </button>
          <LoadProgress />
        </>
      )}
    </section>
  );
}
