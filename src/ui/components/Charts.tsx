import { useEffect, useMemo, useRef } from 'react';
import uPlot from 'uplot';
import 'uplot/dist/uPlot.min.css';
import type { IterationMetrics } from '../../selfplay/types';
import { formatTick, formatValue } from '../format';
import { useLab } from '../store';

interface ChartSpec {
  id: string;
  title: string;
  /** Metric keys drawn, given every key the history has. */
  keys: (available: Set<string>) => { key: string; label: string }[];
}

const fixed =
  (...list: [string, string][]) =>
  (available: Set<string>) =>
    list.filter(([k]) => available.has(k)).map(([key, label]) => ({ key, label }));

const CHARTS: ChartSpec[] = [
  {
    id: 'reward',
    title: 'Solver reward per source',
    keys: (available) => [
      ...fixed(['reward', 'total'])(available),
      ...[...available]
        .filter((k) => /^rewards\/[^/]+\/mean$/.test(k))
        .sort()
        .map((k) => ({ key: k, label: k.split('/')[1]! })),
    ],
  },
  { id: 'challenger', title: 'Challenger reward', keys: fixed(['challenger/reward', 'reward']) },
  // Sparse: the exam runs every examEvery iterations; the line joins its points.
  { id: 'exam', title: 'Held-out exam accuracy', keys: fixed(['eval/exam_accuracy', 'exam']) },
  { id: 'invalid', title: 'Invalid Challenger problems (share)', keys: fixed(['challenger/invalid_ratio', 'invalid']) },
  { id: 'kl', title: 'KL to the reference', keys: fixed(['kl', 'solver'], ['challenger/kl', 'challenger']) },
  { id: 'loss', title: 'Loss', keys: fixed(['loss', 'total'], ['loss/solver', 'solver'], ['loss/challenger', 'challenger']) },
  { id: 'entropy', title: 'Entropy (nats per token)', keys: fixed(['entropy', 'entropy']) },
  { id: 'lengths', title: 'Lengths (tokens)', keys: fixed(['completions/mean_length', 'answers'], ['queries/mean_length', 'queries']) },
  { id: 'speed', title: 'Tokens per second', keys: fixed(['tokens_per_second', 'tokens/s']) },
  { id: 'memory', title: 'GPU memory peak (MiB)', keys: fixed(['gpu/peak_mib', 'MiB']) },
];

const ITERATION_STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000];

const COLORS = ['#2563eb', '#dc2626', '#16a34a', '#9333ea', '#ea580c', '#0891b2'];

export function Charts() {
  const history = useLab((s) => s.history);
  const available = useMemo(() => new Set(history.flatMap((m) => Object.keys(m.values))), [history]);
  return (
    <section className="panel" aria-label="Charts" data-testid="charts">
      <h2>Metrics by iteration</h2>
      {history.length === 0 && <p className="hint">Charts fill in as iterations finish.</p>}
      <div className="charts">
        {CHARTS.map((c) => (
          <Chart key={c.id} spec={c} series={c.keys(available)} history={history} />
        ))}
      </div>
    </section>
  );
}

function Chart({ spec, series, history }: { spec: ChartSpec; series: { key: string; label: string }[]; history: IterationMetrics[] }) {
  const host = useRef<HTMLDivElement>(null);
  const plot = useRef<uPlot | null>(null);
  const signature = series.map((s) => s.key).join('|');

  // One uPlot per set of series; new points only replace its data.
  useEffect(() => {
    const el = host.current;
    if (!el || series.length === 0) return;
    const opts: uPlot.Options = {
      width: Math.max(200, el.clientWidth || 280),
      height: 150,
      legend: { show: true, live: false },
      cursor: { show: true, drag: { x: false, y: false } },
      scales: { x: { time: false } },
      axes: [
        // Iterations are whole numbers; metric values span 1e-7 (early KL) to 1e4 (tokens): short, readable ticks.
        { label: 'iteration', size: 30, labelSize: 14, incrs: ITERATION_STEPS, values: (_u, ticks) => ticks.map((t) => String(t)) },
        { size: 56, values: (_u, ticks) => ticks.map((t) => formatTick(t)) },
      ],
      series: [{ label: 'iteration' }, ...series.map((s, i) => ({ label: s.label, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true, points: { show: true, size: 4 } }))],
    };
    const u = new uPlot(opts, toData(history, series), el);
    plot.current = u;
    const ro = typeof ResizeObserver !== 'undefined' ? new ResizeObserver(() => u.setSize({ width: Math.max(200, el.clientWidth), height: 150 })) : null;
    ro?.observe(el);
    return () => {
      ro?.disconnect();
      u.destroy();
      plot.current = null;
    };
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [signature]);

  useEffect(() => {
    plot.current?.setData(toData(history, series));
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [history, signature]);

  const last = history.at(-1);
  return (
    <figure className="chart" data-testid={`chart-${spec.id}`} data-points={series.length ? history.length : 0}>
      <figcaption>
        {spec.title}
        {last && series.length > 0 && (
          <span className="latest" data-testid={`chart-${spec.id}-latest`}>
            {' '}
            {series.map((s) => `${s.label} ${formatValue(last.values[s.key])}`).join(' · ')}
          </span>
        )}
      </figcaption>
      <div ref={host} className="plot" />
    </figure>
  );
}

function toData(history: IterationMetrics[], series: { key: string }[]): uPlot.AlignedData {
  const x = history.map((m) => m.iteration);
  const ys = series.map((s) => history.map((m) => (Number.isFinite(m.values[s.key]) ? m.values[s.key]! : null)));
  return [x, ...ys] as uPlot.AlignedData;
}
