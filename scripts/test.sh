#!/usr/bin/env bash
# Runs the whole test suite against real services. Installs and starts what the tests need:
# PostgreSQL server binaries (a private cluster under target/test-pg, started by the test harness,
# unless DATABASE_URL is set) and whatever else scripts/ensure-*.sh provides.
set -euo pipefail
cd "$(dirname "$0")/.."

for ensure in scripts/ensure-*.sh; do
    "$ensure"
done

target_dir="${CARGO_TARGET_DIR:-target}"
stop_test_cluster() {
    local pgdata="$target_dir/test-pg/postgres"
    [ -f "$pgdata/postmaster.pid" ] || return 0
    local pg_ctl
    pg_ctl="$(command -v pg_ctl || ls -d /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -1)"
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$pg_ctl" stop -D "$pgdata" -m fast -w >/dev/null 2>&1 || true
    else
        "$pg_ctl" stop -D "$pgdata" -m fast -w >/dev/null 2>&1 || true
    fi
}

# Every run starts from an empty private cluster.
stop_test_cluster
rm -rf "$target_dir/test-pg"
trap stop_test_cluster EXIT

cargo test --all-targets "$@"
