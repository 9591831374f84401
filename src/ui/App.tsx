import { useEffect, useState } from 'react';
import { acquireGpu, type GpuCapabilities } from '../gpu/gpu';

type Check = { state: 'checking' } | { state: 'ok'; caps: GpuCapabilities } | { state: 'error'; message: string };

/** The lab's shell: for now, the WebGPU capability check every later screen starts from. */
export function App() {
  const [check, setCheck] = useState<Check>({ state: 'checking' });

  useEffect(() => {
    let cancelled = false;
    acquireGpu()
      .then((gpu) => {
        if (!cancelled) setCheck({ state: 'ok', caps: gpu.caps });
        gpu.destroy();
      })
      .catch((e: unknown) => {
        if (!cancelled) setCheck({ state: 'error', message: e instanceof Error ? e.message : String(e) });
      });
    return () => {
      cancelled = true;
    };
  }, []);

  return (
    <main style={{ fontFamily: 'system-ui, sans-serif', maxWidth: 760, margin: '2rem auto', lineHeight: 1.5 }}>
      <h1>selfplay-lab</h1>
      <p>Language Self-Play training of LoRA adapters on WebGPU, inside this tab.</p>
      <section aria-label="WebGPU capability check" data-testid="gpu-check">
        {check.state === 'checking' && <p>Checking WebGPU…</p>}
        {check.state === 'error' && <p role="alert">{check.message}</p>}
        {check.state === 'ok' && (
          <>
            <p>
              GPU: <strong data-testid="adapter-name">{check.caps.adapterName}</strong>
            </p>
            <ul>
              <li>max buffer: {(check.caps.maxBufferSize / 2 ** 20).toFixed(0)} MiB</li>
              <li>max storage binding: {(check.caps.maxStorageBufferBindingSize / 2 ** 20).toFixed(0)} MiB</li>
              <li>shader-f16: {check.caps.f16 ? 'yes' : 'no'}</li>
              <li>subgroups: {check.caps.subgroups ? 'yes' : 'no'}</li>
            </ul>
            {check.caps.missing.length > 0 && (
              <ul>
                {check.caps.missing.map((m) => (
                  <li key={m}>Missing: {m}</li>
                ))}
              </ul>
            )}
          </>
        )}
      </section>
    </main>
  );
}
