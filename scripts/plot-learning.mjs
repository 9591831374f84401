#!/usr/bin/env node
// Draws the learning curve of bench/learning.ts as an SVG (no dependencies):
//   node scripts/plot-learning.mjs [out/bench-learning.json ...] [docs/learning-curve.svg]
// Several inputs (one bench run per seed, say) are drawn together; the last argument
// is the picture when it ends in .svg.
// Left axis: greedy exam accuracy (circles, each seed one colour; iteration 0 is the
// base model). Right axis: the Solver's mean reward per iteration (thin lines).
// The README shows the SVG itself (this machine's ImageMagick has no SVG reader).
import { readFileSync, writeFileSync } from 'node:fs';

const args = process.argv.slice(2);
const output = args.length > 0 && args[args.length - 1].endsWith('.svg') ? args.pop() : 'docs/learning-curve.svg';
const inputs = args.length > 0 ? args : ['out/bench-learning.json'];
const files = inputs.map((f) => JSON.parse(readFileSync(f, 'utf8')));
for (const [n, d] of files.entries()) {
  if (d.model !== files[0].model || d.examSize !== files[0].examSize) throw new Error(`${inputs[n]}: model ${d.model} with ${d.examSize} exam problems, but ${inputs[0]} has ${files[0].model} with ${files[0].examSize}`);
}
const data = { ...files[0], runs: files.flatMap((d) => d.runs) };
const W = 640, H = 360, L = 56, R = 56, T = 40, B = 44;
const maxIt = Math.max(...data.runs.flatMap((r) => r.curve.map((p) => p.iteration)), 1);
const x = (it) => L + ((W - L - R) * it) / maxIt;
const y = (v) => T + (H - T - B) * (1 - v);
const colours = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#8c564b', '#17becf'];
const esc = (s) => String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;');
const parts = [];
parts.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`);
parts.push(`<rect width="${W}" height="${H}" fill="white"/>`);
for (let k = 0; k <= 5; k++) {
  const v = k / 5;
  parts.push(`<line x1="${L}" x2="${W - R}" y1="${y(v)}" y2="${y(v)}" stroke="#ddd"/>`);
  parts.push(`<text x="${L - 6}" y="${y(v) + 4}" text-anchor="end">${(100 * v).toFixed(0)}%</text>`);
  parts.push(`<text x="${W - R + 6}" y="${y(v) + 4}">${v.toFixed(1)}</text>`);
}
// Whole-number ticks at a round step, at most 10 intervals.
const tickStep = [1, 2, 3, 5, 10, 20, 25, 50, 100, 200, 500, 1000].find((st) => maxIt / st <= 10) ?? Math.ceil(maxIt / 10);
for (let it = 0; it <= maxIt; it += tickStep) {
  parts.push(`<text x="${x(it)}" y="${H - B + 16}" text-anchor="middle">${it}</text>`);
}
parts.push(`<line x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}" stroke="#333"/>`);
parts.push(`<text x="${W / 2}" y="${H - 8}" text-anchor="middle">iteration</text>`);
parts.push(`<text x="14" y="${H / 2}" transform="rotate(-90 14 ${H / 2})" text-anchor="middle">exam accuracy (greedy, ${data.examSize} problems)</text>`);
parts.push(`<text x="${W - 12}" y="${H / 2}" transform="rotate(90 ${W - 12} ${H / 2})" text-anchor="middle">mean reward</text>`);
parts.push(`<text x="${W / 2}" y="22" text-anchor="middle" font-size="14">${esc(`LSP-Zero, verifiable reward, ${data.model}`)}</text>`);
data.runs.forEach((run, n) => {
  const c = colours[n % colours.length];
  const rewards = run.curve.filter((p) => Number.isFinite(p.reward));
  if (rewards.length > 1) parts.push(`<polyline fill="none" stroke="${c}" stroke-opacity="0.45" stroke-width="1" points="${rewards.map((p) => `${x(p.iteration)},${y(p.reward)}`).join(' ')}"/>`);
  const exams = run.curve.filter((p) => typeof p.examAccuracy === 'number');
  parts.push(`<polyline fill="none" stroke="${c}" stroke-width="2" points="${exams.map((p) => `${x(p.iteration)},${y(p.examAccuracy)}`).join(' ')}"/>`);
  for (const p of exams) parts.push(`<circle cx="${x(p.iteration)}" cy="${y(p.examAccuracy)}" r="3.5" fill="${c}"/>`);
  const last = exams[exams.length - 1];
  parts.push(`<text x="${L + 8}" y="${T + 14 + 14 * n}" fill="${c}">seed ${run.seed}: exam ${(100 * run.base).toFixed(1)}% → ${(100 * last.examAccuracy).toFixed(1)}% at iteration ${last.iteration}</text>`);
});
parts.push('</svg>');
writeFileSync(output, parts.join('\n') + '\n');
console.log(`wrote ${output} (${data.runs.length} seeds, ${maxIt} iterations)`);
