import { useState } from 'react';
import { useShallow } from 'zustand/react/shallow';
import { useActions } from '../context';
import { useLab, type ChatSide } from '../store';

/**
 * Talk to the loaded model with the run's adapter on and off, side by side, with the
 * decode rate live. The GPU runs one job at a time: during a running iteration the
 * panel says so (pause, or Stop now, then chat). Model text is rendered as text.
 */
export function ChatPanel() {
  const actions = useActions();
  const { chat, chatting, runState, hasAdapter } = useLab(useShallow((s) => ({ chat: s.chat, chatting: s.chatting, runState: s.runState, hasAdapter: s.runConfig !== null })));
  const [message, setMessage] = useState('Write one sentence about the sea.');
  const [mode, setMode] = useState<'on' | 'off' | 'both'>('both');
  const [maxTokens, setMaxTokens] = useState(128);
  const running = runState === 'running' || runState === 'pausing';
  const effective = hasAdapter ? mode : 'off';
  return (
    <section className="panel" aria-label="Chat" data-testid="chat">
      <h2>Chat</h2>
      {running && <p className="hint" data-testid="chat-busy">An iteration is running on the GPU: pause the run (or press Stop now) to chat.</p>}
      {!hasAdapter && <p className="hint">No adapter yet (start a run or import one): the base model answers.</p>}
      <textarea aria-label="Chat message" value={message} onChange={(e) => setMessage(e.target.value)} rows={3} style={{ width: '100%' }} />
      <div className="row">
        <select aria-label="Adapter" value={effective} disabled={!hasAdapter} onChange={(e) => setMode(e.target.value as 'on' | 'off' | 'both')}>
          <option value="both">adapter on and off, side by side</option>
          <option value="on">adapter on</option>
          <option value="off">adapter off (base model)</option>
        </select>{' '}
        <label>
          max tokens <input type="number" aria-label="Chat max tokens" min={1} max={4096} value={maxTokens} onChange={(e) => setMaxTokens(Math.max(1, Math.floor(Number(e.target.value) || 1)))} style={{ width: '5em' }} />
        </label>{' '}
        <button disabled={running || chatting || !message.trim()} onClick={() => void actions.chat(message, effective, maxTokens)} data-testid="chat-send">
          {chatting ? 'Answering…' : 'Send'}
        </button>
      </div>
      {chat && (
        <div className="chat-answers" style={{ display: 'grid', gridTemplateColumns: chat.on && chat.off ? '1fr 1fr' : '1fr', gap: '0.5em' }}>
          {chat.on && <Answer title="adapter on" side={chat.on} testId="chat-on" />}
          {chat.off && <Answer title="adapter off" side={chat.off} testId="chat-off" />}
        </div>
      )}
    </section>
  );
}

function Answer({ title, side, testId }: { title: string; side: ChatSide; testId: string }) {
  return (
    <div data-testid={testId}>
      <h3>
        {title} · <span data-testid={`${testId}-rate`}>{side.tokensPerSecond.toFixed(1)}</span> tokens/s · {side.tokens} tokens{side.done ? '' : ' …'}
      </h3>
      <p style={{ whiteSpace: 'pre-wrap' }} data-testid={`${testId}-text`}>
        {side.text}
      </p>
    </div>
  );
}
