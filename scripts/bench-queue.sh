#!/usr/bin/env bash
# Queue benchmark: our queue and graphile-worker 0.17.3 (unbatched and batched) burn down the same
# number of no-op jobs on the same PostgreSQL with the same (default) settings, one after the other,
# and print jobs/s and idle pickup latency. Uses DATABASE_URL when set; otherwise creates a
# throw-away cluster with initdb defaults under target/bench-peers.
#   scripts/bench-queue.sh            # 100,000 jobs
#   BENCH_JOBS=20000 scripts/bench-queue.sh
set -euo pipefail
cd "$(dirname "$0")/.."

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

if [ -z "${DATABASE_URL:-}" ]; then
    pg_ctl="$(command -v pg_ctl || ls -d /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -1)"
    bin="$(dirname "$pg_ctl")"
    dir="$(pwd)/target/bench-peers"
    port=5497
    rm -rf "$dir"
    mkdir -p "$dir/sock"
    [ "$(id -u)" = 0 ] && chown -R postgres "$dir"
    as_pg "$bin/initdb" -D "$dir/data" -U postgres -A trust >/dev/null
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
        -o "-p $port -k $dir/sock -c listen_addresses=''" start >/dev/null
    trap 'as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null' EXIT
    export DATABASE_URL="postgres://postgres@localhost:$port/postgres?host=$dir/sock"
fi

echo "== aiops queue"
cargo bench --bench queue

echo "== graphile-worker"
(cd scripts/bench && npm install --no-audit --no-fund --silent)
base="${DATABASE_URL%%\?*}"
query="${DATABASE_URL#"$base"}"
for batched in 0 1; do
    db="gw_bench_$batched"
    psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
    GW_DATABASE_URL="${base%/*}/$db$query" BATCHED=$batched node scripts/bench/graphile.js
done
