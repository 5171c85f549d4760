# shellcheck shell=bash
# Shell helpers shared by the benchmark scripts (sourced, not run):
# logging, installing what is missing, and stopping what they started.
# The scripts run from the repository root with `set -euo pipefail`.

log() { printf '== %s\n' "$*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# apt_install PACKAGE...: Debian packages, the index updated once per run.
apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then
    as_root apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

# stop_pid PID [SECONDS]: SIGTERM, then SIGKILL after SECONDS (default 10);
# reaps it. Nothing happens for an empty or finished PID.
stop_pid() {
  local pid=$1 grace=${2:-10}
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq $((grace * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
}

# await_port PORT PID [TENTHS]: until PORT on 127.0.0.1 accepts, while PID
# lives, for at most TENTHS tenths of a second (default 100).
await_port() {
  local port=$1 pid=$2 tries=${3:-100}
  for _ in $(seq "$tries"); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "server on port $port did not start" >&2
  return 1
}
