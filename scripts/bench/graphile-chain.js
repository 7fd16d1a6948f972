// Peer benchmark for `cargo bench --bench engine`: graphile-worker 0.17.3 running BENCH_CHAINS
// (default 1,000) chains of BENCH_CHAIN_LENGTH (default 5) no-op jobs, each job enqueueing the
// next (helpers.addJob), with 2 worker processes (concurrency BENCH_CONCURRENCY, default 10, each)
// on the same PostgreSQL. The chain heads are added in one statement once both workers are
// running; the clock runs from that commit until every job is done and the jobs table is empty:
// chains/s, jobs/s, and transactions per job (pg_stat_database.xact_commit delta of the
// benchmark database, read from GW_ADMIN_URL after the workers have exited, minus this script's
// own statements), and CPU time per job over the same interval from /proc/<pid>/stat (the
// database on this host): the two worker processes and the database backends serving the
// benchmark database (this script's own connection excluded), as the aiops benchmark prints it.
// With GW_COMMAND set (e.g. `true`), every job first runs that command as `/bin/sh -c <command>`
// and waits for it, as an aiops step does, so the two compare job for job on the same work; the
// commands' CPU time is then printed like the aiops benchmark's "their commands".
// Usage: GW_DATABASE_URL=postgres://.../gw_db GW_ADMIN_URL=postgres://.../postgres node graphile-chain.js
const { fork, execFile } = require("child_process");
const { run, makeWorkerUtils, Logger } = require("graphile-worker");
const { Client, Pool } = require("pg");

const connectionString = process.env.GW_DATABASE_URL;
const chains = Number(process.env.BENCH_CHAINS || 1000);
const length = Number(process.env.BENCH_CHAIN_LENGTH || 5);
const concurrency = Number(process.env.BENCH_CONCURRENCY || 10);
const workers = 2;
const command = process.env.GW_COMMAND || "";
// Per-job INFO lines would dominate the measurement.
const logger = new Logger(() => () => {});

async function worker() {
  const pool = new Pool({ connectionString, max: concurrency + 2 });
  pool.on("error", (e) => console.error(e));
  pool.on("connect", (client) => client.on("error", (e) => console.error(e)));
  let finished = 0;
  const taskList = {
    chain: async (payload, helpers) => {
      if (command) {
        await new Promise((resolve, reject) =>
          execFile("/bin/sh", ["-c", command], (error) => (error ? reject(error) : resolve())),
        );
      }
      if (payload.step < length) {
        await helpers.addJob("chain", { chain: payload.chain, step: payload.step + 1 });
      } else {
        finished += 1;
        process.send({ finished: 1 });
      }
    },
  };
  const runner = await run({ pgPool: pool, logger, concurrency, taskList, noHandleSignals: true, pollInterval: 2000 });
  process.send({ ready: true });
  process.on("message", async (m) => {
    if (m.stop) {
      await runner.stop();
      await pool.end();
      process.exit(0);
    }
  });
}

// CPU seconds (user + system) of a process, from /proc; with `children`, those of its reaped
// children instead (cutime and cstime).
function cpuOf(pid, children = false) {
  try {
    const stat = require("fs").readFileSync(`/proc/${pid}/stat`, "utf8");
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ").map(Number);
    // utime and stime are fields 14 and 15, cutime and cstime 16 and 17; f starts at field 3.
    // USER_HZ is 100.
    const [u, s] = children ? [16, 17] : [14, 15];
    return (f[u - 3] + f[s - 3]) / 100;
  } catch {
    return 0;
  }
}

async function cpuNow(admin, db, skip, pids) {
  const workers = pids.reduce((a, p) => a + cpuOf(p), 0);
  const commands = pids.reduce((a, p) => a + cpuOf(p, true), 0);
  const { rows } = await admin.query(
    "select pid from pg_stat_activity where datname = $1 and pid <> $2 and backend_type = 'client backend'",
    [db, skip],
  );
  const database = rows.reduce((a, r) => a + cpuOf(r.pid), 0);
  return { workers, commands, database };
}

async function xactCommit(admin, db) {
  const { rows } = await admin.query("select xact_commit::bigint as n from pg_stat_database where datname = $1", [db]);
  return Number(rows[0].n);
}

async function noBackends(admin, db) {
  for (;;) {
    const { rows } = await admin.query(
      "select count(*)::int as n from pg_stat_activity where datname = $1 and backend_type = 'client backend'",
      [db],
    );
    if (rows[0].n === 0) break;
    await new Promise((r) => setTimeout(r, 20));
  }
  // Exiting backends flush their statistics just before they leave pg_stat_activity.
  await new Promise((r) => setTimeout(r, 200));
}

async function main() {
  const admin = new Client({ connectionString: process.env.GW_ADMIN_URL });
  await admin.connect();
  const setup = new Client({ connectionString });
  await setup.connect();
  const db = (await setup.query("select current_database() as d")).rows[0].d;
  const utils = await makeWorkerUtils({ connectionString, logger });
  await utils.migrate();
  await utils.release();
  await setup.query("delete from graphile_worker._private_jobs");
  await setup.end();
  await noBackends(admin, db);

  const before = await xactCommit(admin, db);
  const conn = new Client({ connectionString });
  await conn.connect();
  let own = 0;
  let finished = 0;
  let allFinished;
  const done = new Promise((r) => (allFinished = r));
  const children = [];
  await Promise.all(
    Array.from({ length: workers }, () => {
      const child = fork(__filename, [], { env: { ...process.env, GW_ROLE: "worker" } });
      children.push(child);
      return new Promise((ready) =>
        child.on("message", (m) => {
          if (m.ready) ready();
          if (m.finished) {
            finished += m.finished;
            if (finished === chains) allFinished();
          }
        }),
      );
    }),
  );

  const connPid = (await conn.query("select pg_backend_pid() as p")).rows[0].p;
  own += 1;
  const pids = children.map((c) => c.pid);
  const cpuBefore = await cpuNow(admin, db, connPid, pids);
  const start = process.hrtime.bigint();
  await conn.query(
    "select graphile_worker.add_job('chain', json_build_object('chain', i, 'step', 1)) from generate_series(1, $1) i",
    [chains],
  );
  own += 1;
  await done;
  // The last completions may still be in flight; wait until the table is empty.
  for (;;) {
    own += 1;
    const { rows } = await conn.query("select count(*)::int as n from graphile_worker._private_jobs");
    if (rows[0].n === 0) break;
    await new Promise((r) => setTimeout(r, 5));
  }
  const secs = Number(process.hrtime.bigint() - start) / 1e9;
  const cpuAfter = await cpuNow(admin, db, connPid, pids);
  await Promise.all(
    children.map(
      (child) =>
        new Promise((r) => {
          child.on("exit", r);
          child.send({ stop: true });
        }),
    ),
  );
  await conn.end();
  await noBackends(admin, db);
  const after = await xactCommit(admin, db);
  await admin.end();

  const jobs = chains * length;
  console.log(
    `graphile-worker 0.17.3: ${chains} chains x ${length} chained ${command ? `jobs each running \`sh -c ${command}\`` : "no-op jobs"}, ${workers} worker processes (concurrency ${concurrency} each)`,
  );
  console.log(
    `    wall ${secs.toFixed(2)} s = ${(chains / secs).toFixed(1)} chains/s, ${(jobs / secs).toFixed(1)} jobs/s`,
  );
  console.log(
    `    transactions per job: ${((after - before - own) / jobs).toFixed(2)} (${after - before} commits in the database, minus ${own} of the benchmark's own)`,
  );
  const per = (cpu) => ((cpu * 1000) / jobs).toFixed(2);
  const w = cpuAfter.workers - cpuBefore.workers;
  const c = cpuAfter.commands - cpuBefore.commands;
  const d = cpuAfter.database - cpuBefore.database;
  console.log(
    command
      ? `    CPU per job: workers ${per(w)} ms, their commands ${per(c)} ms, database backends ${per(d)} ms (total ${per(w + c + d)} ms)`
      : `    CPU per job: workers ${per(w)} ms, database backends ${per(d)} ms (total ${per(w + d)} ms)`,
  );
}

const entry = process.env.GW_ROLE === "worker" ? worker : main;
entry().catch((e) => {
  console.error(e);
  process.exit(1);
});
