#!/usr/bin/env bash
# Engine benchmark side by side with graphile-worker 0.17.3 on the same PostgreSQL:
#   1. `cargo bench --bench engine`: 1,000 executions x 5 no-op steps on 2 `aiops worker`
#      processes (executions/s, steps/s, transactions per step) and the API-to-completed latency
#      of a 3-step runbook (p50, p99);
#   2. graphile-worker: 1,000 chains of 5 no-op jobs (each job adds the next) on 2 worker
#      processes (chains/s, jobs/s, transactions per job);
#   3. the same chains with every graphile job running the command an aiops no-op step runs
#      (`sh -c true`), so that both do the same work per job.
# Both use concurrency BENCH_CONCURRENCY (default 10) per worker process. Uses DATABASE_URL when
# set; otherwise creates a throw-away cluster with initdb defaults under target/bench-engine-pg.
# graphile-worker is installed with npm under target/bench-node (never committed).
# BENCH_ROUNDS (default 1) repeats the three runs in turn, so that both sides see the same drift
# of a shared machine, and ends with each round's throughput ratios and their median, and each
# round's CPU per aiops step (with and without the process its command starts) next to the CPU
# per graphile no-op job.
#   scripts/bench-engine.sh
#   BENCH_EXECUTIONS=200 BENCH_CHAINS=200 scripts/bench-engine.sh
#   BENCH_ROUNDS=3 BENCH_LATENCY_SAMPLES=20 scripts/bench-engine.sh
set -euo pipefail
cd "$(dirname "$0")/.."

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

if [ -z "${DATABASE_URL:-}" ]; then
    pg_ctl="$(command -v pg_ctl || ls -d /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -1)"
    bin="$(dirname "$pg_ctl")"
    dir="$(pwd)/target/bench-engine-pg"
    port=5496
    rm -rf "$dir"
    mkdir -p "$dir/sock"
    [ "$(id -u)" = 0 ] && chown -R postgres "$dir"
    as_pg "$bin/initdb" -D "$dir/data" -U postgres -A trust >/dev/null
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
        -o "-p $port -k $dir/sock -c listen_addresses=''" start >/dev/null
    trap 'as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null; rm -rf "$dir"' EXIT
    export DATABASE_URL="postgres://postgres@localhost:$port/postgres?host=$dir/sock"
fi

node_dir="$(pwd)/target/bench-node"
mkdir -p "$node_dir"
cp scripts/bench/package.json scripts/bench/graphile-chain.js "$node_dir/"
[ -f scripts/bench/package-lock.json ] && cp scripts/bench/package-lock.json "$node_dir/"
(cd "$node_dir" && npm install --no-audit --no-fund --silent)
base="${DATABASE_URL%%\?*}"
query="${DATABASE_URL#"$base"}"
db=gw_chain_bench
out="$(mktemp -d)"
rounds="${BENCH_ROUNDS:-1}"

# The first "<number> <unit>" in a run's output.
rate() { grep -o "[0-9.]* $2" "$1" | head -1 | cut -d' ' -f1; }
# The first "<label> <number> ms" in a run's output (its CPU per step or job).
cpu() { grep -o "$2 [0-9.]* ms" "$1" | head -1 | awk '{ print $(NF - 1) }'; }

for round in $(seq "$rounds"); do
    [ "$rounds" -gt 1 ] && echo "== round $round of $rounds"
    echo "== aiops execution engine"
    cargo bench --bench engine 2>&1 | tee "$out/aiops"
    echo "== graphile-worker chained jobs"
    for command in "" true; do
        psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
        GW_DATABASE_URL="${base%/*}/$db$query" GW_ADMIN_URL="$DATABASE_URL" GW_COMMAND="$command" \
            node "$node_dir/graphile-chain.js" | tee "$out/graphile${command:+-$command}"
        psql "$DATABASE_URL" -qc "DROP DATABASE $db"
    done
    steps="$(rate "$out/aiops" steps/s)"
    noop="$(rate "$out/graphile" jobs/s)"
    same="$(rate "$out/graphile-true" jobs/s)"
    cpu_total="$(cpu "$out/aiops" total)"
    cpu_command="$(cpu "$out/aiops" commands)"
    cpu_noop="$(cpu "$out/graphile" total)"
    echo "$steps $noop $same $cpu_total $cpu_command $cpu_noop" >> "$out/rounds"
done

echo "== aiops steps/s against graphile jobs/s, per round"
awk '{ printf "    round %d: aiops %s steps/s; graphile no-op %s jobs/s (%.2fx), running `sh -c true` %s jobs/s (%.2fx)\n", NR, $1, $2, $1 / $2, $3, $1 / $3 }' "$out/rounds"
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
echo "    median ratio: $(awk '{ printf "%.4f\n", $1 / $2 }' "$out/rounds" | median | xargs printf '%.2f')x against no-op jobs, $(awk '{ printf "%.4f\n", $1 / $3 }' "$out/rounds" | median | xargs printf '%.2f')x against jobs running the same command"
# Where the CPU goes: a no-op step still starts its command's process; a no-op graphile job does not.
echo "== CPU per step or job (workers, their commands, database backends), per round"
awk '{ printf "    round %d: aiops %.2f ms per step, %.2f ms of it its command, %.2f ms without; graphile no-op %.2f ms per job\n", NR, $4, $5, $4 - $5, $6 }' "$out/rounds"
rm -rf "$out"
