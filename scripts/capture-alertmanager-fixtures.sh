#!/usr/bin/env bash
# Captures the webhook payloads a real Prometheus Alertmanager sends, as the intake tests' fixtures
# (tests/fixtures/alertmanager/<version>-firing.json and <version>-resolved.json, read by
# `captured_payloads_deduplicate_by_episode_and_resolve` in tests/alerts.rs).
#
# Usage: scripts/capture-alertmanager-fixtures.sh ALERTMANAGER_BINARY [AMTOOL_BINARY] [OUT_DIR]
#
#   ALERTMANAGER_BINARY  e.g. /usr/bin/prometheus-alertmanager, or one unpacked from another
#                        build of the Debian package `prometheus-alertmanager` with `dpkg-deb -x`
#   AMTOOL_BINARY        the same package's amtool (default: `amtool` beside the binary, else
#                        the one on PATH)
#   OUT_DIR              default tests/fixtures/alertmanager
#
# The version in the file names is the one `ALERTMANAGER_BINARY --version` reports, without a
# Debian suffix (`0.21.0+ds` -> `0.21.0`).
#
# Other versions come from other Debian suites' builds of `prometheus-alertmanager`, fetched
# without touching the system's apt sources or installing them: a private sources list naming
# the suite, `apt-get -o Dir::Etc::SourceList=LIST -o Dir::Etc::SourceParts=/dev/null
# -o Dir::State::Lists=DIR -o Dir::Cache=DIR update`, then `apt-get (same options) download
# prometheus-alertmanager=VERSION`, and `dpkg-deb -x` into a scratch directory; its
# usr/bin/prometheus-alertmanager and usr/bin/amtool run from there. ARCHITECTURE.md lists which
# package build each captured version came from.
#
# The scenario, the same for every version so that the same assertions apply:
#   - Alertmanager listens on 127.0.0.1:$AM_PORT (19093 unless set; its default external URL is
#     then http://<hostname>:19093), clustering off, a fresh data directory, one route grouped by
#     `alertname` (group_wait 1s, group_interval 1s, repeat_interval 1h) to the receiver `aiops`,
#     a webhook with `send_resolved: true` pointing at a capture server on loopback, which
#     answers 200 and saves every POST body as it came.
#   - `amtool alert add` fires two alerts, one call each, with no start time (Alertmanager stamps
#     it on receipt):
#       NodeDown instance=web-1:9100 job=node severity=critical,
#         annotation summary="web-1 is down" (quoted, which both amtool's classic and its newer
#         UTF-8 matcher parser read as the same value), generator URL http://prometheus-0:9090/graph
#       NodeDown instance=web-2:9100 job=node severity=critical (no annotation, no URL)
#   - The first notification carrying both, firing, is saved as <version>-firing.json.
#   - Two seconds later web-1 is added again, same labels, annotation and URL, with
#     `--end` = the current time in whole seconds (amtool's RFC 3339 form): Alertmanager merges
#     it into the episode it has (same start, now ended), and web-2 keeps firing.
#   - The first notification in which web-1 is resolved is saved as <version>-resolved.json.
# Each file is the body received, parsed and written back pretty-printed (4-space indent, keys
# in the order received); no value is changed.
#
# Needs python3. Touches no system service; everything it starts it stops on exit.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
am="${1:?usage: $0 ALERTMANAGER_BINARY [AMTOOL_BINARY] [OUT_DIR]}"
amtool="${2:-}"
out="${3:-$root/tests/fixtures/alertmanager}"
if [ -z "$amtool" ]; then
    if [ -x "$(dirname "$am")/amtool" ]; then amtool="$(dirname "$am")/amtool"; else amtool=amtool; fi
fi
port="${AM_PORT:-19093}"

version="$("$am" --version 2>&1 | sed -n 's/^alertmanager, version \([0-9][0-9.]*\).*/\1/p' | head -1)"
[ -n "$version" ] || { echo "capture: cannot read the version of $am" >&2; exit 1; }
echo "capture: alertmanager $version ($am), amtool $amtool, port $port"

work="$(mktemp -d /tmp/am-capture.XXXXXX)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/data" "$work/bodies"

# The capture server: saves each POST body as bodies/NNNN.json and answers 200.
cat >"$work/capture.py" <<'PY'
import http.server, os, sys

out = sys.argv[1]
count = 0

class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        global count
        length = int(self.headers["Content-Length"])
        body = self.rfile.read(length)
        count += 1
        path = os.path.join(out, "%04d.json" % count)
        with open(path + ".tmp", "wb") as f:
            f.write(body)
        os.rename(path + ".tmp", path)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
with open(os.path.join(out, "..", "port"), "w") as f:
    f.write(str(server.server_address[1]))
server.serve_forever()
PY
python3 "$work/capture.py" "$work/bodies" &
pids+=($!)
for _ in $(seq 50); do [ -s "$work/port" ] && break; sleep 0.1; done
[ -s "$work/port" ] || { echo "capture: the capture server did not start" >&2; exit 1; }
hook_port="$(cat "$work/port")"

cat >"$work/alertmanager.yml" <<YML
route:
  receiver: aiops
  group_by: ['alertname']
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: aiops
    webhook_configs:
      - url: http://127.0.0.1:$hook_port/
        send_resolved: true
YML
"$am" --config.file="$work/alertmanager.yml" --storage.path="$work/data" \
    --web.listen-address="127.0.0.1:$port" --cluster.listen-address= \
    >"$work/alertmanager.log" 2>&1 &
pids+=($!)
url="http://127.0.0.1:$port"
ready=0
for _ in $(seq 100); do
    if python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=1)" \
        "$url/-/ready" 2>/dev/null; then ready=1; break; fi
    sleep 0.2
done
if [ "$ready" != 1 ]; then
    echo "capture: alertmanager did not become ready:" >&2
    cat "$work/alertmanager.log" >&2
    exit 1
fi

web1=(NodeDown instance=web-1:9100 job=node severity=critical
    '--annotation=summary="web-1 is down"' --generator-url=http://prometheus-0:9090/graph)
web2=(NodeDown instance=web-2:9100 job=node severity=critical)
"$amtool" --alertmanager.url="$url" alert add "${web1[@]}"
"$amtool" --alertmanager.url="$url" alert add "${web2[@]}"

# Waits for the first saved body that the Python expression $2 (over `p`, the payload) accepts;
# writes it pretty-printed to $1.
await() {
    local dest="$1" test="$2"
    python3 - "$work/bodies" "$dest" "$test" <<'PY'
import json, os, sys, time

bodies, dest, test = sys.argv[1:]
deadline = time.time() + 30
while time.time() < deadline:
    for name in sorted(os.listdir(bodies)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(bodies, name), "rb") as f:
            raw = f.read()
        p = json.loads(raw)
        if eval(test, {"p": p}):
            with open(dest, "w") as f:
                json.dump(p, f, indent=4, ensure_ascii=False)
                f.write("\n")
            print("capture: %s <- notification %s" % (dest, name))
            sys.exit(0)
    time.sleep(0.1)
sys.exit("capture: no notification matched %r in 30s; received: %s" % (test, sorted(os.listdir(bodies))))
PY
}

mkdir -p "$out"
await "$out/$version-firing.json" \
    'len(p["alerts"]) == 2 and all(a["status"] == "firing" for a in p["alerts"])'
sleep 2
"$amtool" --alertmanager.url="$url" alert add "${web1[@]}" --end="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
await "$out/$version-resolved.json" \
    'any(a["status"] == "resolved" and a["labels"]["instance"] == "web-1:9100" for a in p["alerts"])'
