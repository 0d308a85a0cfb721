#!/usr/bin/env bash
# Runs every test of the workspace. Each test that needs NATS starts its own
# nats-server on a free loopback port; nothing touches a NATS on 4222.
set -euo pipefail
cd "$(dirname "$0")/.."
NATS_SERVER_BIN=$(bash deploy/setup.sh)
export NATS_SERVER_BIN
export PATH="$HOME/.cargo/bin:$PATH"

# The system tests run the service binaries as child processes. Built with
# --all-targets so the feature set (and RocksDB's C++ build) is the one the
# tests use: a bins-only build unifies features differently and rebuilds it.
cargo build --workspace --all-targets
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
