#!/usr/bin/env bash
# Makes sure Prometheus Alertmanager (`alertmanager`) and its CLI (`amtool`) are installed from
# the Debian package `prometheus-alertmanager`, for the end-to-end alert intake tests. Idempotent:
# does nothing when both are there. The tests start their own Alertmanager on loopback ports with
# their own configuration and data directory; this script never starts or touches the system
# service.
set -euo pipefail

have_all() {
    command -v prometheus-alertmanager >/dev/null || command -v alertmanager >/dev/null \
        || [ -x /usr/bin/prometheus-alertmanager ]
}
have_amtool() { command -v amtool >/dev/null; }

have_all && have_amtool && exit 0

if [ "$(id -u)" != 0 ]; then
    echo "ensure-alertmanager: prometheus-alertmanager is missing and this is not root; install it with" >&2
    echo "  apt-get install prometheus-alertmanager" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Installing the package would start the system service; policy-rc.d forbids that for the
# duration of the install (the tests run their own instance).
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    own_policy=1
fi
cleanup() { [ "$own_policy" = 1 ] && rm -f "$policy"; return 0; }
trap cleanup EXIT

# Refresh the package lists only when the package is not installable from the current ones.
if ! apt-get install -y --no-install-recommends prometheus-alertmanager >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y --no-install-recommends prometheus-alertmanager >/dev/null
fi
have_all && have_amtool || { echo "ensure-alertmanager: alertmanager still missing after install" >&2; exit 1; }
