#!/usr/bin/env bash
# Queue benchmark: our queue, graphile-worker 0.17.3 (unbatched and batched) and apalis-postgres
# 1.0 burn down the same number of no-op jobs (default 100,000) on the same PostgreSQL with the
# same (default) server settings, one after the other, each in a database of its own; each prints
# jobs/s and idle pickup latency (commit -> handler start, p50/p99), then one table compares them.
#   - aiops queue: `cargo bench --bench queue` (1 worker, concurrency 200, prefetch equal to the
#     concurrency: BENCH_PREFETCH overrides it, 0 disables it);
#   - graphile-worker 0.17.3: scripts/bench/graphile.js, concurrency 24, unbatched (defaults) and
#     batched (local queue of 500, batched completions); installed with npm under
#     target/bench-node (never committed);
#   - apalis-postgres 1.0: scripts/bench/apalis (a package of its own, Cargo.lock committed),
#     fetch batch 100, concurrency 24, NOTIFY wake-ups with a 2 s polling fallback; built in
#     release under target/bench-apalis.
# Everything is built before the first measurement. BENCH_JOBS, BENCH_LATENCY_SAMPLES (default 500)
# and BENCH_CONCURRENCY (overrides every queue's concurrency) apply to all of them. The table
# shows each queue's concurrency and how many jobs it fetches ahead of its free slots. Uses
# DATABASE_URL when set; otherwise installs the PostgreSQL binaries if missing
# (scripts/ensure-postgres.sh) and runs a throw-away cluster with initdb defaults under
# target/bench-peers, removed at exit. Needs node/npm and cargo.
#   scripts/bench-queue.sh            # 100,000 jobs per queue
#   BENCH_JOBS=20000 scripts/bench-queue.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

command -v node >/dev/null && command -v npm >/dev/null || {
    echo "bench-queue: node and npm are needed for graphile-worker" >&2
    exit 1
}

echo "== building"
cargo bench --bench queue --no-run
# Unset DATABASE_URL so sqlx's query macros use apalis-postgres' offline query data.
env -u DATABASE_URL SQLX_OFFLINE=true cargo build --release --locked \
    --manifest-path scripts/bench/apalis/Cargo.toml --target-dir "$root/target/bench-apalis"
apalis_bin="$root/target/bench-apalis/release/apalis-queue-bench"
node_dir="$root/target/bench-node"
mkdir -p "$node_dir"
cp scripts/bench/package.json scripts/bench/package-lock.json scripts/bench/graphile.js "$node_dir/"
(cd "$node_dir" && npm ci --no-audit --no-fund --silent)

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

out="$(mktemp -d)"
cluster=""
cleanup() {
    rm -rf "$out"
    if [ -n "$cluster" ]; then
        as_pg "$bin/pg_ctl" -D "$cluster/data" -m fast -w stop >/dev/null
        rm -rf "$cluster"
    fi
}
trap cleanup EXIT

psql_bin=psql
if [ -z "${DATABASE_URL:-}" ]; then
    scripts/ensure-postgres.sh
    pg_ctl="$(command -v pg_ctl || ls -d /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -1)"
    bin="$(dirname "$(readlink -f "$pg_ctl")")"
    [ -x "$bin/psql" ] && psql_bin="$bin/psql"
    dir="$root/target/bench-peers"
    port=5497
    rm -rf "$dir"
    mkdir -p "$dir/sock"
    [ "$(id -u)" = 0 ] && chown -R postgres "$dir"
    as_pg "$bin/initdb" -D "$dir/data" -U postgres -A trust >/dev/null
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
        -o "-p $port -k $dir/sock -c listen_addresses=''" start >/dev/null
    cluster="$dir"
    export DATABASE_URL="postgres://postgres@localhost:$port/postgres?host=$dir/sock"
fi
base="${DATABASE_URL%%\?*}"
query="${DATABASE_URL#"$base"}"

psql_q() { PGOPTIONS="-c client_min_messages=warning" "$psql_bin" "$DATABASE_URL" -q "$@"; }
fresh_db() { psql_q -c "DROP DATABASE IF EXISTS $1" -c "CREATE DATABASE $1"; }
drop_db() { psql_q -c "DROP DATABASE $1"; }

echo "== aiops queue"
cargo bench --bench queue | tee "$out/aiops"

echo "== graphile-worker"
for batched in 0 1; do
    db="gw_bench_$batched"
    fresh_db "$db"
    GW_DATABASE_URL="${base%/*}/$db$query" BATCHED=$batched node "$node_dir/graphile.js" |
        tee "$out/graphile-$batched"
    drop_db "$db"
done

echo "== apalis-postgres"
fresh_db apalis_bench
APALIS_DATABASE_URL="${base%/*}/apalis_bench$query" "$apalis_bin" | tee "$out/apalis"
drop_db apalis_bench

# One row per queue: concurrency, what it fetches ahead of its free slots, burn-down jobs/s,
# pickup p50 and p99 (ms), parsed from the figures each benchmark printed above.
rate_of() { sed -n 's/.*burn-down.*= \([0-9]*\) jobs\/s.*/\1/p' "$1"; }
first_match() { grep -o "$1" "$2" | head -1 || true; }
row() {
    local label="$1" file="$2" ahead="$3" conc lat
    conc="$(first_match 'concurrency [0-9]*' "$file" | cut -d' ' -f2)"
    lat="$(sed -n 's/.*p50 \([0-9.]*\) ms, p99 \([0-9.]*\) ms.*/\1 \2/p' "$file")"
    printf '%-36s %11s %-18s %10s %10s %10s\n' "$label" "$conc" "$ahead" "$(rate_of "$file")" ${lat}
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }'; }

echo
echo "== queue burn-down, $(grep -o 'burn-down [0-9]*' "$out/aiops" | cut -d' ' -f2) no-op jobs each"
printf '%-36s %11s %-18s %10s %10s %10s\n' queue concurrency 'fetched ahead' jobs/s 'p50 ms' 'p99 ms'
row "aiops queue" "$out/aiops" "$(first_match 'prefetch [0-9]*' "$out/aiops")"
row "graphile-worker 0.17.3 (unbatched)" "$out/graphile-0" "none"
row "graphile-worker 0.17.3 (batched)" "$out/graphile-1" \
    "$(first_match 'local queue [0-9]*' "$out/graphile-1")"
row "apalis-postgres 1.0" "$out/apalis" "fetch $(first_match 'batch [0-9]*' "$out/apalis")"
ours="$(rate_of "$out/aiops")"
echo "aiops / graphile-worker batched: $(ratio "$ours" "$(rate_of "$out/graphile-1")") (goal >= 1x)"
echo "aiops / apalis-postgres:         $(ratio "$ours" "$(rate_of "$out/apalis")") (goal >= 2x)"
