#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints (warnings are
# errors), then every unit and integration test. Integration tests start
# real servers on ephemeral loopback ports and need nothing installed
# beyond the Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

echo "== cargo test"
cargo test --workspace
