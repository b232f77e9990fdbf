#!/usr/bin/env bash
# Runs every test: installs the system tools the tests use (idempotent), builds the
# binaries the end-to-end tests start, then runs the whole suite with nextest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-test-deps.sh
cargo build --workspace --bins
cargo nextest run --workspace --no-fail-fast "$@"
