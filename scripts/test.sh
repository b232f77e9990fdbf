#!/usr/bin/env bash
# Runs every test: installs the system tools the tests use (idempotent), checks the
# crates for import circles, builds the binaries the end-to-end tests start, runs the
# whole suite with nextest, then every fuzz target for a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-test-deps.sh
# No import circles between the files of a crate beyond the listed ones (docs/architecture.md).
./scripts/import-cycles.py --self-test && ./scripts/import-cycles.py
cargo build --workspace --bins
cargo nextest run --workspace --no-fail-fast "$@"
# A short run of every fuzz target (their seed corpora are also replayed above, by
# tests/tests/fuzz_corpus.rs); FUZZ_SECS=600 scripts/fuzz.sh is the long run.
FUZZ_SECS=${FUZZ_SECS:-10} ./scripts/fuzz.sh
