#!/usr/bin/env bash
# Brings the whole platform up on a fresh machine: installs the PostgreSQL server binaries if
# needed, builds aiops and runs `aiops up` (API + webhook + worker on the embedded database under
# ./data, or on DATABASE_URL when set). Extra arguments go to `aiops`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-postgres.sh
exec cargo run --release --quiet -- "${@:-up}"
