import { useEffect, useState, type DragEvent } from 'react';
import { useShallow } from 'zustand/react/shallow';
import { isSmallGpu, KNOWN_MODELS, QUICK_DEMO } from '../../worker/catalog';
import type { ModelChoice, WeightFormat } from '../../worker/protocol';
import { useActions } from '../context';
import { formatBytes, formatCount, formatEta, formatRate } from '../format';
import { useLab } from '../store';

/** Files with their path inside a dropped or picked folder. */
export type PickedFiles = { name: string; files: { path: string; file: File }[] };

export function StartScreen() {
  const caps = useLab((s) => s.capabilities?.caps);
  const local = useLocalModels();
  const demo = local.some((m) => m.folder === QUICK_DEMO.model.folder);
  // On a small GPU the demo comes first; on a big one, after the model picker.
  const small = !!caps && isSmallGpu(caps);
  return (
    <div className="start">
      <CapabilityPanel />
      <SavedRunCard />
      {small && <QuickDemoCard available={demo} small />}
      <ModelPicker local={local} />
      {!small && <QuickDemoCard available={demo} small={false} />}
      <CachedModels />
    </div>
  );
}

/** One press: the micro model learns addition by self-play, its held-out exam charted as it goes. */
function QuickDemoCard({ available, small }: { available: boolean; small: boolean }) {
  const actions = useActions();
  const { caps, loading } = useLab(useShallow((s) => ({ caps: s.capabilities?.caps, loading: s.loading })));
  return (
    <section className="panel quick-demo" aria-label="Quick demo" data-testid="quick-demo" data-first={small}>
      <h2>{QUICK_DEMO.label}</h2>
      {small && <p className="hint">This GPU looks small for the default 3B model: start here.</p>}
      <p>
        <code>models/{QUICK_DEMO.model.folder}</code> is {QUICK_DEMO.note}. It runs LSP-Zero in the free-form arithmetic world with a reward checked by code, and charts the exam accuracy every{' '}
        {QUICK_DEMO.config.examEvery} iterations.
      </p>
      {available ? (
        <button disabled={!caps || loading} onClick={() => void actions.quickDemo()} data-testid="quick-demo-start">
          Run the quick demo
        </button>
      ) : (
        <p className="hint">The demo's model (models/{QUICK_DEMO.model.folder}) is served by the lab's own server: start the lab with the README's command to use it.</p>
      )}
    </section>
  );
}

export function CapabilityPanel() {
  const { capabilities, checking } = useLab(useShallow((s) => ({ capabilities: s.capabilities, checking: s.checking })));
  const caps = capabilities?.caps;
  return (
    <section className="panel" aria-label="WebGPU capability check" data-testid="gpu-check">
      <h2>Your GPU</h2>
      {checking && !capabilities && <p>Checking WebGPU…</p>}
      {capabilities?.error && (
        <div role="alert" className="error">
          <p>
            <strong>This browser cannot run the lab.</strong> {capabilities.error}
          </p>
          <p>The lab needs WebGPU: desktop Chrome or Edge 113 or newer, with hardware acceleration on (Settings, System).</p>
        </div>
      )}
      {caps && (
        <>
          <p>
            WebGPU is ready on <strong data-testid="adapter-name">{caps.adapterName}</strong>.
          </p>
          <ul className="facts">
            <li>largest buffer: {formatBytes(caps.maxBufferSize)}</li>
            <li>largest storage binding: {formatBytes(caps.maxStorageBufferBindingSize)}</li>
            <li>half precision (shader-f16): {caps.f16 ? 'yes' : 'no'}</li>
            <li>subgroups: {caps.subgroups ? 'yes' : 'no'}</li>
          </ul>
          {capabilities.notes.length > 0 && (
            <details>
              <summary>What this GPU lacks (the lab still runs)</summary>
              <ul>
                {capabilities.notes.map((m) => (
                  <li key={m}>{m}</li>
                ))}
              </ul>
            </details>
          )}
        </>
      )}
    </section>
  );
}

function SavedRunCard() {
  const actions = useActions();
  const { savedRun, loading, caps } = useLab(useShallow((s) => ({ savedRun: s.savedRun, loading: s.loading, caps: s.capabilities?.caps })));
  const [token, setToken] = useState('');
  const [files, setFiles] = useState<PickedFiles | null>(null);
  if (!savedRun) return null;
  return (
    <section className="panel saved-run" aria-label="Saved run" data-testid="saved-run">
      <h2>Continue your run</h2>
      <p>
        A run of <strong>{savedRun.modelLabel}</strong> ({savedRun.config.mode === 'lsp' ? 'LSP' : 'LSP-Zero'}, {savedRun.config.world} world) was saved in this
        browser at iteration <strong data-testid="saved-iteration">{savedRun.iteration}</strong> ({new Date(savedRun.savedAt).toLocaleString()}).
      </p>
      {savedRun.model.kind === 'hub' && (
        <label>
          Access token (only for gated models that are not cached; kept in memory):{' '}
          <input type="password" value={token} onChange={(e) => setToken(e.target.value)} autoComplete="off" />
        </label>
      )}
      {savedRun.model.kind === 'files' && (
        <p>
          The model came from files on this computer. It loads from the model cache; if it was deleted from there, pick the same folder again:{' '}
          <FolderInput onPick={setFiles} />
          {files && <span> {files.files.length} files picked</span>}
        </p>
      )}
      <div className="buttons">
        <button disabled={!caps || loading} onClick={() => void actions.resumeSaved(token || undefined, files?.files)} data-testid="resume-saved">
          Resume saved run
        </button>
        <button className="secondary" disabled={loading} onClick={() => void actions.resetRun()}>
          Discard it
        </button>
      </div>
      <LoadProgress />
    </section>
  );
}

interface LocalModel {
  folder: string;
  bytes: number;
}

/** Folders the dev server offers under /models/ (none on a static deployment). */
function useLocalModels(): LocalModel[] {
  const [list, setList] = useState<LocalModel[]>([]);
  useEffect(() => {
    let cancelled = false;
    fetch('/models/index.json')
      .then((r) => (r.ok && (r.headers.get('Content-Type') ?? '').includes('json') ? r.json() : []))
      .then((l: unknown) => {
        if (!cancelled && Array.isArray(l)) setList(l.filter((m): m is LocalModel => typeof m?.folder === 'string'));
      })
      .catch(() => undefined);
    return () => {
      cancelled = true;
    };
  }, []);
  return list;
}

type PickKind = 'known' | 'local' | 'hub' | 'files';

function ModelPicker({ local }: { local: LocalModel[] }) {
  const actions = useActions();
  const { caps, loading, summary, summaryError, format } = useLab(
    useShallow((s) => ({ caps: s.capabilities?.caps, loading: s.loading, summary: s.summary, summaryError: s.summaryError, format: s.format })),
  );
  const [kind, setKind] = useState<PickKind>('known');
  const [known, setKnown] = useState(KNOWN_MODELS[0]!.id);
  const [folder, setFolder] = useState('');
  const [repo, setRepo] = useState('');
  const [files, setFiles] = useState<PickedFiles | null>(null);
  const [token, setToken] = useState('');
  const [useCache, setUseCache] = useState(true);
  const [fmt, setFmt] = useState<WeightFormat>(format);

  const choice = ((): ModelChoice | null => {
    if (kind === 'known') return { kind: 'hub', id: known };
    if (kind === 'local') return folder ? { kind: 'served', folder } : null;
    if (kind === 'hub') return repo.trim() ? { kind: 'hub', id: repo.trim() } : null;
    return files ? { kind: 'files', name: files.name, files: files.files } : null;
  })();
  const choiceKey = JSON.stringify(choice && choice.kind !== 'files' ? choice : files?.name ?? null);

  useEffect(() => {
    if (kind === 'local' && !folder && local[0]) setFolder(local[0].folder);
  }, [kind, folder, local]);

  // The size and memory estimate follow the picked model (config.json only, no weights).
  useEffect(() => {
    if (!choice || !caps) return;
    useLab.setState({ format: fmt });
    const t = setTimeout(() => void actions.planModel(choice, token || undefined), kind === 'hub' ? 600 : 0);
    return () => clearTimeout(t);
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [choiceKey, caps, fmt]);

  const tooLarge = summary?.plan.problems.filter((p) => p.kind === 'buffer-too-large') ?? [];
  return (
    <section className="panel" aria-label="Pick a model" data-testid="model-picker">
      <h2>Pick a model</h2>
      <fieldset>
        <legend>Model</legend>
        <label>
          <input type="radio" name="pick" checked={kind === 'known'} onChange={() => setKind('known')} /> From Hugging Face:{' '}
          <select value={known} onChange={(e) => (setKind('known'), setKnown(e.target.value))} aria-label="Hugging Face model">
            {KNOWN_MODELS.map((m) => (
              <option key={m.id} value={m.id}>
                {m.label} ({m.id}): {formatBytes(m.downloadBytes)} download, {formatBytes(m.gpuBytes)} GPU
              </option>
            ))}
          </select>
        </label>
        {kind === 'known' && <p className="hint">{KNOWN_MODELS.find((m) => m.id === known)?.note}</p>}
        {kind === 'known' && <KnownModelTable selected={known} onPick={setKnown} />}
        <label>
          <input type="radio" name="pick" checked={kind === 'hub'} onChange={() => setKind('hub')} /> Any Hugging Face repository:{' '}
          <input
            type="text"
            placeholder="owner/name"
            value={repo}
            onChange={(e) => (setKind('hub'), setRepo(e.target.value))}
            aria-label="Hugging Face repository id"
            spellCheck={false}
          />
        </label>
        <label>
          <input type="radio" name="pick" checked={kind === 'local'} onChange={() => setKind('local')} disabled={local.length === 0} data-testid="pick-local" /> A folder
          under models/ on the dev server:{' '}
          <select value={folder} onChange={(e) => (setKind('local'), setFolder(e.target.value))} disabled={local.length === 0} aria-label="Local model folder" data-testid="local-folder">
            {local.length === 0 && <option value="">none found</option>}
            {local.map((m) => (
              <option key={m.folder} value={m.folder}>
                models/{m.folder} ({formatBytes(m.bytes)})
              </option>
            ))}
          </select>
        </label>
        <div>
          <label>
            <input type="radio" name="pick" checked={kind === 'files'} onChange={() => setKind('files')} /> Files from this computer:
          </label>{' '}
          <FolderInput onPick={(p) => (setKind('files'), setFiles(p))} />
          <DropZone onPick={(p) => (setKind('files'), setFiles(p))} />
          {files && kind === 'files' && (
            <span className="hint">
              {' '}
              {files.name}: {files.files.length} files
            </span>
          )}
        </div>
      </fieldset>
      <fieldset>
        <legend>Options</legend>
        <label>
          Weights on the GPU:{' '}
          <select value={fmt} onChange={(e) => setFmt(e.target.value as WeightFormat)} aria-label="Weight format" data-testid="format">
            <option value="q4">4-bit (quantized while loading; the lab's default)</option>
            <option value="f32">32-bit float (small models only; exact)</option>
          </select>
        </label>
        <label>
          <input type="checkbox" checked={useCache} onChange={(e) => setUseCache(e.target.checked)} /> Keep the loaded model in this browser's storage, so the
          next load reads nothing from the network
        </label>
        <label>
          Hugging Face access token (only for gated or private models; kept in memory, sent only to the hub):{' '}
          <input type="password" value={token} onChange={(e) => setToken(e.target.value)} autoComplete="off" aria-label="Access token" />
        </label>
      </fieldset>
      <div className="summary" data-testid="model-summary">
        {summaryError && <p className="error">{summaryError}</p>}
        {summary && (
          <>
            <p>
              <strong>{summary.label}</strong>: {summary.architecture}, {summary.layers} layers, hidden size {summary.hiddenSize},{' '}
              {formatCount(summary.parameters)} parameters, about {formatBytes(summary.downloadBytes)} to download. Estimated GPU memory with the current run
              settings: <strong data-testid="memory-estimate">{formatBytes(summary.plan.total)}</strong> ({formatBytes(summary.plan.loadPeak)} while loading).
            </p>
            {tooLarge.length > 0 && (
              <div role="alert" className="error">
                {tooLarge.map((p) => (
                  <p key={p.message}>
                    This GPU's limits are too small for this model: {p.message} {p.fix}
                  </p>
                ))}
              </div>
            )}
            <details>
              <summary>Memory plan</summary>
              <pre>{summary.planLines.join('\n')}</pre>
            </details>
          </>
        )}
      </div>
      <button
        disabled={!choice || !caps || loading}
        onClick={() => choice && void actions.loadModel(choice, token || undefined, fmt, useCache)}
        data-testid="load-model"
      >
        Load model
      </button>
      <LoadProgress />
    </section>
  );
}

/** The known models with what each costs: download size (cached after the first load) and GPU memory of the 4-bit weights. */
function KnownModelTable({ selected, onPick }: { selected: string; onPick: (id: string) => void }) {
  return (
    <table className="models" data-testid="model-table">
      <thead>
        <tr>
          <th scope="col">Model</th>
          <th scope="col">Weights</th>
          <th scope="col">Download</th>
          <th scope="col">GPU memory (weights, 4-bit)</th>
        </tr>
      </thead>
      <tbody>
        {KNOWN_MODELS.map((m) => (
          <tr key={m.id} aria-selected={m.id === selected} onClick={() => onPick(m.id)}>
            <td>
              {m.label}
              {m.id === KNOWN_MODELS[0]!.id ? ' (default)' : ''}
            </td>
            <td>{m.weights}</td>
            <td>{formatBytes(m.downloadBytes)}</td>
            <td>{formatBytes(m.gpuBytes)}</td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}

export function LoadProgress() {
  const actions = useActions();
  const { progress, loading } = useLab(useShallow((s) => ({ progress: s.progress, loading: s.loading })));
  if (!loading || !progress) return null;
  const what =
    progress.phase === 'cache-read'
      ? 'Reading the model from this browser\'s cache'
      : progress.phase === 'cache-write'
        ? 'Saving the model in this browser\'s cache'
        : progress.phase === 'tokenizer'
          ? 'Loading the tokenizer'
          : progress.phase === 'config'
            ? 'Reading config.json'
            : /\.onnx(_data)?$/.test(progress.file)
              ? `Downloading ${progress.file} (4-bit, copied as is)`
              : `Downloading and quantizing ${progress.file}`;
  const frac = progress.bytesTotal > 0 ? progress.bytesDone / progress.bytesTotal : 0;
  return (
    <div className="progress" data-testid="load-progress" aria-live="polite">
      <p>{what}</p>
      {progress.bytesTotal > 0 && (
        <>
          <progress value={frac} max={1} />
          <p>
            {formatBytes(progress.bytesDone)} of {formatBytes(progress.bytesTotal)} · {formatRate(progress.rate)} · {formatEta(progress.etaSeconds)} left
          </p>
        </>
      )}
      <button type="button" onClick={() => void actions.cancelLoad()} data-testid="cancel-load">
        Cancel download
      </button>
    </div>
  );
}

function FolderInput({ onPick }: { onPick: (p: PickedFiles) => void }) {
  return (
    <>
      <label className="file-button">
        Pick a folder
        <input
          type="file"
          hidden
          // @ts-expect-error webkitdirectory is not in React's input attributes
          webkitdirectory=""
          multiple
          onChange={(e) => {
            const list = Array.from(e.target.files ?? []);
            if (list.length > 0) onPick(pickedFromList(list));
          }}
        />
      </label>{' '}
      <label className="file-button">
        or files
        <input
          type="file"
          hidden
          multiple
          onChange={(e) => {
            const list = Array.from(e.target.files ?? []);
            if (list.length > 0) onPick(pickedFromList(list));
          }}
        />
      </label>
    </>
  );
}

function pickedFromList(list: File[]): PickedFiles {
  const top = list[0]!.webkitRelativePath.split('/')[0] || 'dropped files';
  const inFolder = list.every((f) => f.webkitRelativePath.includes('/'));
  return {
    name: inFolder ? top : 'dropped files',
    files: list.map((f) => ({ path: inFolder ? f.webkitRelativePath.split('/').slice(1).join('/') : f.name, file: f })),
  };
}

function DropZone({ onPick }: { onPick: (p: PickedFiles) => void }) {
  const [over, setOver] = useState(false);
  const onDrop = async (e: DragEvent) => {
    e.preventDefault();
    setOver(false);
    const items = Array.from(e.dataTransfer.items ?? []);
    const entries = items.map((i) => i.webkitGetAsEntry?.()).filter((x): x is FileSystemEntry => !!x);
    if (entries.length === 1 && entries[0]!.isDirectory) {
      const dir = entries[0] as FileSystemDirectoryEntry;
      onPick({ name: dir.name, files: await readDirectory(dir) });
    } else {
      onPick({ name: 'dropped files', files: Array.from(e.dataTransfer.files).map((f) => ({ path: f.name, file: f })) });
    }
  };
  return (
    <span
      className={`drop ${over ? 'over' : ''}`}
      onDragOver={(e) => (e.preventDefault(), setOver(true))}
      onDragLeave={() => setOver(false)}
      onDrop={(e) => void onDrop(e)}
    >
      or drop a model folder here
    </span>
  );
}

/** The files at the top level of a dropped folder (a Hugging Face checkpoint keeps all it needs there). */
async function readDirectory(dir: FileSystemDirectoryEntry): Promise<{ path: string; file: File }[]> {
  const reader = dir.createReader();
  const entries: FileSystemEntry[] = [];
  for (;;) {
    const batch = await new Promise<FileSystemEntry[]>((res, rej) => reader.readEntries(res, rej));
    if (batch.length === 0) break;
    entries.push(...batch);
  }
  const files = entries.filter((e): e is FileSystemFileEntry => e.isFile);
  return Promise.all(files.map((f) => new Promise<{ path: string; file: File }>((res, rej) => f.file((file) => res({ path: f.name, file }), rej))));
}

function CachedModels() {
  const actions = useActions();
  const cached = useLab((s) => s.cached);
  return (
    <section className="panel" aria-label="Cached models" data-testid="cached-models">
      <h2>Models cached in this browser</h2>
      {cached.length === 0 ? (
        <p className="hint">None yet. A model loaded with the cache option on is kept here and loads without the network next time.</p>
      ) : (
        <table>
          <thead>
            <tr>
              <th>model</th>
              <th>format</th>
              <th>size</th>
              <th>cached</th>
              <th />
            </tr>
          </thead>
          <tbody>
            {cached.map((m) => (
              <tr key={m.key} data-testid="cached-model">
                <td>{m.source}</td>
                <td>{m.format}</td>
                <td>{formatBytes(m.bytes)}</td>
                <td>{new Date(m.createdAt).toLocaleString()}</td>
                <td>
                  <button className="secondary" onClick={() => void actions.deleteCached(m.key)} aria-label={`Delete ${m.source} from the cache`}>
                    Delete
                  </button>
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
    </section>
  );
}
