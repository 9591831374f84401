import { StrictMode } from 'react';
import { createRoot } from 'react-dom/client';
import { LabClient } from './worker/client';
import { LabActions } from './ui/actions';
import { App } from './ui/App';
import { applyEvent } from './ui/bridge';
import './ui/lab.css';

const client = LabClient.create();
client.onEvent((e) => applyEvent(e));
const actions = new LabActions(client);

createRoot(document.getElementById('root')!).render(
  <StrictMode>
    <App actions={actions} />
  </StrictMode>,
);
