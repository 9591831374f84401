/**
 * What the controls do: each action calls the worker and writes its reply into the
 * store; failures become messages on the page (never thrown into React).
 */
import { makeConfig, microDemoConfig, type TrainerConfig } from '../selfplay/config';
import type { CustomRewardSpec, SandboxReply } from '../selfplay/custom-reward';
import type { EvaluationJudge } from '../selfplay/types';
import type { GameQuery, GameSearchResult } from '../selfplay/games-log';
import type { LabClient } from '../worker/client';
import type { ErrorContext, ExportedFile, ModelChoice, WeightFormat } from '../worker/protocol';
import { planSettingsFor, QUICK_DEMO } from '../worker/catalog';
import { live } from './live';
import { addError, useLab } from './store';

export interface DownloadLink {
  name: string;
  url: string;
  bytes: number;
}

export class LabActions {
  private exportUrls: string[] = [];
  private planSeq = 0;

  constructor(readonly client: LabClient) {}

  private async guard<T>(context: ErrorContext, fn: () => Promise<T>): Promise<T | undefined> {
    try {
      return await fn();
    } catch (e) {
      const err = e as Error;
      addError(context, { name: err.name, message: err.message }, true);
      return undefined;
    }
  }

  async check(): Promise<void> {
    useLab.setState({ checking: true });
    const r = await this.guard('gpu', () => this.client.call('check', {}));
    useLab.setState({ checking: false });
    if (r) useLab.setState({ capabilities: r.capabilities, savedRun: r.savedRun, cached: r.cached });
  }

  async planModel(model: ModelChoice, token: string | undefined): Promise<void> {
    const { draft, format } = useLab.getState();
    // Only the latest pick's summary is shown: an earlier one may answer after it.
    const seq = ++this.planSeq;
    useLab.setState({ summary: null, summaryError: null });
    try {
      const summary = await this.client.call('planModel', { model, token, settings: planSettingsFor(draft, format) });
      if (seq === this.planSeq) useLab.setState({ summary });
    } catch (e) {
      if (seq === this.planSeq) useLab.setState({ summaryError: (e as Error).message });
    }
  }

  async loadModel(model: ModelChoice, token: string | undefined, format: WeightFormat, useCache: boolean): Promise<boolean> {
    useLab.setState({ loading: true, progress: null, format });
    const info = await this.guard('load', () => this.client.call('loadModel', { model, token, format, useCache }));
    useLab.setState({ loading: false });
    if (info) {
      useLab.setState({ model: info });
      // The model works, but could not be cached (storage full) or its cached copy was damaged.
      if (info.cacheNote) addError('storage', { name: 'ModelCacheError', message: info.cacheNote });
      void this.refreshCached();
    }
    return !!info;
  }

  async loadRewardModel(model: ModelChoice, token: string | undefined, format: WeightFormat): Promise<boolean> {
    useLab.setState({ loading: true, progress: null });
    const info = await this.guard('load', () => this.client.call('loadRewardModel', { model, token, format, useCache: true }));
    useLab.setState({ loading: false });
    if (info) {
      useLab.setState({ rewardModel: info });
      void this.refreshCached();
    }
    return !!info;
  }

  /** Cancels the model download in flight: the load ends with a "cancelled" message and keeps nothing partial. */
  async cancelLoad(): Promise<void> {
    await this.guard('load', () => this.client.call('cancelLoad', {}));
  }

  async unloadRewardModel(): Promise<void> {
    if (await this.guard('settings', () => this.client.call('unloadRewardModel', {}))) useLab.setState({ rewardModel: null });
  }

  async refreshCached(): Promise<void> {
    const cached = await this.guard('storage', () => this.client.call('listCached', {}));
    if (cached) useLab.setState({ cached });
  }

  async deleteCached(key: string): Promise<void> {
    const cached = await this.guard('storage', () => this.client.call('deleteCached', { key }));
    if (cached) useLab.setState({ cached });
  }

  /** Validates a draft of the settings; returns the error message, or null when valid. */
  setDraft(config: TrainerConfig): string | null {
    try {
      const draft = makeConfig(config);
      useLab.setState({ draft });
      // The worker plans memory for a model load with these settings.
      void this.client.call('updateSettings', { config: draft }).catch(() => undefined);
      return null;
    } catch (e) {
      return (e as Error).message;
    }
  }

  /**
   * The quick demo in one press: loads the micro model from the served models/ folder
   * (with its exam), takes the demo's settings and starts the run.
   */
  async quickDemo(): Promise<void> {
    if (!(await this.loadModel(QUICK_DEMO.model, undefined, QUICK_DEMO.format, false))) return;
    const msg = this.setDraft(microDemoConfig());
    if (msg) return addError('settings', { name: 'ConfigError', message: msg }, true);
    await this.start();
  }

  async start(): Promise<void> {
    // The worker announces the new run (run-reset) before its first event; the old run's view goes then.
    const run = await this.guard('run', () => this.client.call('start', { config: useLab.getState().draft }));
    if (run) useLab.setState({ runConfig: run.config });
  }

  async pause(): Promise<void> {
    await this.guard('run', () => this.client.call('pause', {}));
  }

  async resume(): Promise<void> {
    await this.guard('run', () => this.client.call('resume', {}));
  }

  /** Asks the loaded model (adapter on, off, or both side by side); the answer streams into the store's chat. */
  async chat(message: string, adapter: 'on' | 'off' | 'both', maxTokens: number): Promise<void> {
    useLab.setState({ chat: null, chatting: true });
    const r = await this.guard('run', () => this.client.call('chat', { messages: [{ role: 'user', content: message }], adapter, maxTokens }));
    useLab.setState({ chatting: false });
    if (!r) return;
    const side = (on: boolean) => {
      const a = r.answers.find((x) => x.adapter === on);
      return a ? { text: a.text, tokens: a.tokens, tokensPerSecond: a.tokensPerSecond, done: true } : null;
    };
    useLab.setState({ chat: { id: r.id, on: side(true), off: side(false) } });
  }

  /** Stop now: the iteration in flight is discarded within one decode step; the run keeps its last checkpoint. */
  async stopNow(): Promise<void> {
    await this.guard('run', () => this.client.call('stopNow', {}));
  }

  async step(): Promise<void> {
    await this.guard('run', () => this.client.call('step', { config: useLab.getState().draft }));
  }

  async resetRun(): Promise<void> {
    await this.guard('run', () => this.client.call('resetRun', {}));
  }

  async resumeSaved(token?: string, files?: { path: string; file: File }[]): Promise<void> {
    const saved = useLab.getState().savedRun;
    useLab.setState({ loading: true, progress: null, format: saved?.format ?? 'q4' });
    const run = await this.guard('load', () => this.client.call('resumeSaved', { token, files }));
    useLab.setState({ loading: false });
    if (run) {
      live.reset();
      useLab.setState({ runConfig: run.config, draft: run.config, iteration: run.iteration, history: run.history, games: run.games, gamesTotal: run.gamesTotal ?? run.games.length, customReward: saved?.customReward ?? null });
    }
  }

  /** Exports the adapter and run files and offers each as a download. */
  async exportRun(autoDownload = true): Promise<DownloadLink[]> {
    const r = await this.guard('export', () => this.client.call('exportRun', {}));
    if (!r) return [];
    for (const u of this.exportUrls) URL.revokeObjectURL(u);
    const links = r.files.map((f) => {
      const type = f.name.endsWith('.json') ? 'application/json' : f.name.endsWith('.csv') ? 'text/csv' : f.name.endsWith('.jsonl') ? 'application/jsonl' : 'application/octet-stream';
      const url = URL.createObjectURL(new Blob([f.bytes], { type }));
      return { name: f.name, url, bytes: f.bytes.byteLength };
    });
    this.exportUrls = links.map((l) => l.url);
    if (autoDownload) for (const l of links) download(l);
    return links;
  }

  async importAdapter(picked: readonly File[]): Promise<boolean> {
    const files: ExportedFile[] = await Promise.all(picked.map(async (f) => ({ name: f.name, bytes: await f.arrayBuffer() })));
    const run = await this.guard('import', () =>
      this.client.call('importAdapter', { files, config: useLab.getState().draft }, files.map((f) => f.bytes)),
    );
    if (run) {
      useLab.setState({ runConfig: run.config, iteration: run.iteration, history: run.history, games: run.games, gamesTotal: run.gamesTotal ?? run.games.length });
      useLab.setState((s) => ({ notices: [...s.notices, `Adapter imported (${picked.map((f) => f.name).join(', ')}).`] }));
    }
    return !!run;
  }

  async evaluate(maxTokens?: number, judge: EvaluationJudge = 'reference'): Promise<void> {
    useLab.setState({ evaluating: true });
    const result = await this.guard('evaluate', () => this.client.call('evaluate', { maxTokens, judge }));
    useLab.setState({ evaluating: false });
    if (result) useLab.setState({ evaluation: result });
  }

  /** Compiles and uses the user's reward (null: turns it off); true when it took. */
  async setCustomReward(spec: CustomRewardSpec | null): Promise<boolean> {
    const r = await this.guard('settings', () => this.client.call('setCustomReward', { spec }));
    if (r) useLab.setState({ customReward: spec, customRewardNotes: [] });
    return !!r;
  }

  /** One call of a reward source on a sample (query, answer); the failure's words when it has no number. */
  async tryCustomReward(spec: CustomRewardSpec, query: string, answer: string): Promise<SandboxReply | undefined> {
    return this.guard('settings', () => this.client.call('tryCustomReward', { spec, query, answer }));
  }

  /** The whole game history searched in the worker (the page holds only the newest games). */
  async searchGames(q: GameQuery): Promise<GameSearchResult | undefined> {
    return this.guard('run', () => this.client.call('searchGames', q));
  }
}

function download(link: DownloadLink): void {
  const a = document.createElement('a');
  a.href = link.url;
  a.download = link.name;
  a.rel = 'noopener';
  document.body.appendChild(a);
  a.click();
  a.remove();
}
