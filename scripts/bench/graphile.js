// Peer benchmark: graphile-worker 0.17.3 on the same PostgreSQL as `cargo bench --bench queue`.
// Burn-down of BENCH_JOBS no-op jobs (jobs/s) and idle pickup latency (add_job commit -> task
// start, p50/p99), unbatched (defaults) or batched (BATCHED=1: local queue of 500, batched
// completions). Usage: GW_DATABASE_URL=postgres://... node graphile.js
const { run, makeWorkerUtils, Logger } = require("graphile-worker");
const { Pool } = require("pg");

const connectionString = process.env.GW_DATABASE_URL;
const jobs = Number(process.env.BENCH_JOBS || 100000);
const samples = Number(process.env.BENCH_LATENCY_SAMPLES || 500);
const concurrency = Number(process.env.BENCH_CONCURRENCY || 24);
const batched = process.env.BATCHED === "1";
// Per-job INFO lines would dominate the measurement.
const logger = new Logger(() => () => {});

function pct(sorted, p) {
  return sorted[Math.round((sorted.length - 1) * p)];
}

async function main() {
  const pool = new Pool({ connectionString, max: concurrency + 4 });
  pool.on("error", (e) => console.error(e));
  const utils = await makeWorkerUtils({ pgPool: pool, logger });
  await utils.migrate();
  await pool.query("delete from graphile_worker._private_jobs");
  // add_jobs in batches of 10,000, like the other queues' bulk enqueue. One add_job call per row
  // in a single statement gets slower with every job already added (about 150 jobs/s by
  // 100,000 jobs, over ten minutes).
  const t0 = process.hrtime.bigint();
  for (let first = 1; first <= jobs; first += 10000) {
    await pool.query(
      `select count(*) from graphile_worker.add_jobs(array(
         select row('noop', json_build_object('i', i), null, null, null, null, null, null)::graphile_worker.job_spec
         from generate_series($1::int, $2::int) i))`,
      [first, Math.min(first + 9999, jobs)],
    );
  }
  const enqueueSecs = Number(process.hrtime.bigint() - t0) / 1e9;

  const preset = batched
    ? { worker: { localQueue: { size: 500 }, completeJobBatchDelay: 0, failJobBatchDelay: 0 } }
    : {};
  let done = 0;
  let finish;
  const allDone = new Promise((r) => (finish = r));
  let pingStart = null;
  const taskList = {
    noop: async () => {
      done += 1;
      if (done === jobs) finish();
    },
    ping: async () => {
      if (pingStart) pingStart(process.hrtime.bigint());
    },
  };
  const start = process.hrtime.bigint();
  const runner = await run({ pgPool: pool, logger, concurrency, taskList, noHandleSignals: true, pollInterval: 2000, preset });
  await allDone;
  // Completions may still be in flight (batched); wait until the table is empty.
  for (;;) {
    const { rows } = await pool.query("select count(*)::int as n from graphile_worker._private_jobs");
    if (rows[0].n === 0) break;
    await new Promise((r) => setTimeout(r, 5));
  }
  const burnSecs = Number(process.hrtime.bigint() - start) / 1e9;

  await new Promise((r) => setTimeout(r, 500));
  const lat = [];
  for (let i = 0; i < samples; i++) {
    const started = new Promise((r) => (pingStart = r));
    await utils.addJob("ping", {});
    const committed = process.hrtime.bigint();
    const began = await started;
    lat.push(Number(began - committed) / 1e6);
    await new Promise((r) => setTimeout(r, 25));
  }
  lat.sort((a, b) => a - b);
  await runner.stop();
  await utils.release();
  await pool.end();
  const label = batched ? `batched, local queue ${preset.worker.localQueue.size}` : "unbatched";
  console.log(`graphile-worker 0.17.3 (${label}, concurrency ${concurrency})`);
  console.log(`  enqueue   ${jobs} jobs via add_jobs batches of 10,000: ${(jobs / enqueueSecs).toFixed(0)} jobs/s`);
  console.log(`  burn-down ${jobs} no-op jobs: ${burnSecs.toFixed(2)} s = ${(jobs / burnSecs).toFixed(0)} jobs/s`);
  console.log(`  pickup latency (idle, ${samples} samples): p50 ${pct(lat, 0.5).toFixed(2)} ms, p99 ${pct(lat, 0.99).toFixed(2)} ms`);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
