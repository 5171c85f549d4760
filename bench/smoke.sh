#!/usr/bin/env bash
# Smoke run of the benchmark harness: every wrs-bench scenario for about two
# seconds against a freshly started WRS on a free loopback port, then
# `wrs-bench summarize` over the JSON reports.
#
# It fails only when the harness itself is broken (a scenario exits non-zero
# or writes a report that does not parse) — never on the numbers, which on a
# shared CI machine mean nothing. Benchmarks proper: bench/run.sh.
#
#   bench/smoke.sh            debug build (what CI has built already)
#   SMOKE_PROFILE=release bench/smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."

profile=${SMOKE_PROFILE:-debug}
case "$profile" in
  debug) cargo build --quiet -p wrs -p wrs-bench ;;
  release) cargo build --quiet --release -p wrs -p wrs-bench ;;
  *) echo "SMOKE_PROFILE must be debug or release" >&2; exit 2 ;;
esac
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
bin="$target_dir/$profile"

work=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
WRS_API_PORT=0 WRS_DRAIN_DELAY_MS=0 WRS_BIND_ADDRESS=127.0.0.1 WRS_LOG=info WRS_LOG_FORMAT=human \
  "$bin/wrs" >"$work/wrs.log" 2>&1 &
server_pid=$!
port=
for _ in $(seq 100); do
  port=$(sed -n 's/.*listening address=127\.0\.0\.1:\([0-9]*\).*/\1/p' "$work/wrs.log" | head -1)
  [ -n "$port" ] && break
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$port" ]; then
  echo "smoke: WRS did not start:" >&2
  cat "$work/wrs.log" >&2
  exit 1
fi

common=(--server "http://127.0.0.1:$port" --server-pid "$server_pid"
  --duration 2 --drain 2 --warmup-timeout 10 --json --quiet)
scenarios=(
  "fanout --subscribers 20"
  "fanout --publishers 2 --subscribers 20 --channels 2 --rate 200"
  "pushpull --workers 4"
  "pushpull --pattern fan-in-out --workers 4"
  "echo --clients 10 --inflight 4"
  "reqrep --clients 5"
  "reqrep --clients 5 --pattern req-repl"
  "idle --connections 200"
  "churn --workers 4"
)
mkdir -p "$work/reports"
n=0
for scenario in "${scenarios[@]}"; do
  n=$((n + 1))
  # shellcheck disable=SC2086 # the scenario string is split on purpose
  if ! timeout 60 "$bin/wrs-bench" $scenario "${common[@]}" --case "smoke-$n" \
    >"$work/reports/$n.json"; then
    echo "smoke: 'wrs-bench $scenario' failed" >&2
    exit 1
  fi
  echo "smoke: wrs-bench $scenario: ok"
done
"$bin/wrs-bench" summarize "$work/reports" >"$work/summary.md"
cat "$work/summary.md"
echo "smoke: summarize: ok"
