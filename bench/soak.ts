/**
 * Soak benchmark (not in CI): the soak test's run (test/helpers/soak.ts) for many more
 * iterations: self-play on models/micro-arith, a checkpoint after each into a Node
 * folder, and after every iteration the checks that GPU pool bytes in use, checkpoint
 * folders and games in memory stay bounded; the JS heap is sampled after a full
 * collection every --heap-every iterations.
 *
 *   npm run bench:soak -- [--iterations 1000] [--heap-bound-mib 8] [--heap-every 50]
 *        [--watch-saves 50] [--folder out/soak] [--out out/bench-soak.json]
 *   (npm run bench:soak runs it on the driver scripts/webgpu-env.mjs picks; lavapipe:
 *    WEBGPU_ADAPTER=lavapipe npm run bench:soak -- --iterations 1000)
 *
 * --watch-saves: how many saves are checked for atomic replacement at every moment
 * (each check reloads the run; the rest are checked only after they finish).
 * Prints progress every 50 iterations, then the figures; writes them to --out. Exits 1
 * when any check complained.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { dirname } from 'node:path';
import { parseFlags } from '../src/cli/flags';
import { acquireNodeGpu } from '../src/gpu/node';
import { MiB, loadMicro, mib, soak } from '../test/helpers/soak';

async function main(): Promise<void> {
  const f = parseFlags(process.argv.slice(2));
  const iterations = Number(f.get('iterations') ?? 1000);
  const heapBound = Number(f.get('heap-bound-mib') ?? 8) * MiB;
  const heapEvery = Number(f.get('heap-every') ?? 50);
  const watchSaves = Number(f.get('watch-saves') ?? 50);
  const folder = f.get('folder') ?? 'out/soak';
  const out = f.get('out') ?? 'out/bench-soak.json';
  if (!(Number.isInteger(iterations) && iterations >= 25)) throw new Error(`--iterations must be a whole number >= 25 (the heap baseline is taken at 20), got ${f.get('iterations')}`);
  const gpu = await acquireNodeGpu();
  console.log(`adapter: ${gpu.caps.adapterName}`);
  const models = await loadMicro(gpu);
  await mkdir(folder, { recursive: true });
  const { figures, trainer } = await soak({ gpu, models, folder, iterations, heapBound, heapEvery, watchSaves, log: (l) => console.log(l) });
  const search0 = performance.now();
  const found = await trainer.searchGames({ iteration: 0 });
  const searchMs = performance.now() - search0;
  trainer.release();
  console.log(
    `soak: ${figures.iterations} iterations in ${figures.seconds.toFixed(1)} s (${figures.iterationsPerSecond.toFixed(2)}/s after warm-up)\n` +
      `  GPU pool bytes in use: ${figures.warmInUseBytes} after warm-up, ${figures.finalInUseBytes} at the end; allocated ${figures.allocatedBytesRange.join('-')}; live buffers ${figures.liveBuffersRange.join('-')}\n` +
      `  JS heap after gc: ${mib(figures.heapWarmBytes)} MiB at iteration 20, ${mib(figures.heapFinalBytes)} MiB at the end (growth ${mib(figures.heapFinalBytes - figures.heapWarmBytes)} MiB, bound ${mib(heapBound)} MiB)\n` +
      `  heap samples (iteration:MiB): ${figures.heapSamples.map((s) => `${s.iteration}:${mib(s.bytes)}`).join(' ')}\n` +
      `  checkpoint bytes: ${figures.checkpointBytes.first} first, ${figures.checkpointBytes.last} last; save moments checked for atomicity: ${figures.atomicMoments}\n` +
      `  games: ${figures.gamesInMemory} in the trainer, ${figures.pageGames} in the page's store, ${figures.gamesTotal} in all, ${figures.chunks} chunks; search of iteration 0 over ${found.searched} games: ${found.total} found in ${searchMs.toFixed(0)} ms\n` +
      `  run folder: ${figures.runFolder.length} entries (${figures.runFolder.filter((e) => !e.startsWith('games-')).join(', ')} and ${figures.runFolder.filter((e) => e.startsWith('games-')).length} games-*.jsonl)\n` +
      `  complaints: ${figures.complaints.length ? figures.complaints.join('; ') : 'none'}`,
  );
  await mkdir(dirname(out), { recursive: true });
  await writeFile(out, JSON.stringify({ adapter: gpu.caps.adapterName, ...figures, searchMs }, null, 1) + '\n');
  gpu.destroy();
  process.exit(figures.complaints.length ? 1 : 0);
}

main().catch((e: unknown) => {
  console.error(e instanceof Error ? (e.stack ?? e.message) : e);
  process.exit(1);
});
