#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ (cargo-fuzz and libFuzzer on the stable toolchain, so
# without a sanitizer) for FUZZ_SECS seconds each, one after the other, on a copy of its
# checked-in seed corpus, and fails if any target crashes, hangs or runs out of memory.
# All targets are built once, into target/fuzz. Installs cargo-fuzz if it is missing.
#
# Usage: scripts/fuzz.sh                        (15 s a target: the CI run)
#        FUZZ_SECS=600 scripts/fuzz.sh          (a long run)
#        FUZZ_SECS=600 FUZZ_WORK=target/fuzz/work scripts/fuzz.sh tokens spec_file
#                                               (chosen targets; the working corpus and
#                                               any crash inputs stay in FUZZ_WORK)
# A crashing input is left in $FUZZ_WORK/artifacts/<target>/ (a temporary directory
# unless FUZZ_WORK is set, then printed); replay it with
#   target/fuzz/<host triple>/release/<target> <file>
# and keep it as a regression test in the crate that owns the parser (see
# docs/security-design.md, "Fuzzing"). The checked-in corpus is never written to.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
FUZZ_SECS=${FUZZ_SECS:-15}
# One target root for the repository; fuzz builds take their own flags, so their own
# directory in it.
export CARGO_TARGET_DIR="$ROOT/target/fuzz"
# Errors the parsers return capture no backtrace (a panic still prints its own).
export RUST_LIB_BACKTRACE=0

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

cd "$ROOT/fuzz"
echo "building the fuzz targets (cargo fuzz build --sanitizer none)"
cargo fuzz build --sanitizer none
HOST=$(rustc -vV | sed -n 's/^host: //p')
BIN="$CARGO_TARGET_DIR/$HOST/release"

if [ $# -gt 0 ]; then
  TARGETS=("$@")
else
  mapfile -t TARGETS < <(cargo fuzz list)
fi

if [ -n "${FUZZ_WORK:-}" ]; then
  mkdir -p "$FUZZ_WORK"
  WORK=$(cd "$FUZZ_WORK" && pwd)
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/tandem-fuzz.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
fi

failed=()
for target in "${TARGETS[@]}"; do
  corpus="$WORK/corpus/$target"
  artifacts="$WORK/artifacts/$target"
  log="$WORK/$target.log"
  mkdir -p "$corpus" "$artifacts"
  # Seeds are copied, not used in place: what the run finds stays out of the repository.
  cp -n "$ROOT/fuzz/corpus/$target"/* "$corpus/"
  options=(-max_total_time="$FUZZ_SECS" -timeout=10 -rss_limit_mb=2048
    -artifact_prefix="$artifacts/" -print_final_stats=1)
  dict="$ROOT/fuzz/dict/$target.dict"
  if [ -f "$dict" ]; then
    options+=(-dict="$dict")
  fi
  status=0
  "$BIN/$target" "$corpus" "${options[@]}" >"$log" 2>&1 || status=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  inputs=$(find "$corpus" -type f | wc -l)
  if [ "$status" -eq 0 ]; then
    echo "$target: ${FUZZ_SECS} s, ${execs:-?} execs (${rate:-?}/s), corpus of $inputs inputs, no crash"
  else
    echo "$target: FAILED (exit $status); last lines of $log:" >&2
    tail -n 40 "$log" >&2
    failed+=("$target")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  if [ -z "${FUZZ_WORK:-}" ]; then
    # Keep the crash inputs of a temporary work directory.
    kept="$ROOT/target/fuzz/artifacts"
    mkdir -p "$kept"
    for target in "${failed[@]}"; do
      cp -r "$WORK/artifacts/$target" "$kept/"
    done
    echo "crash inputs copied to $kept" >&2
  fi
  echo "fuzz targets that failed: ${failed[*]}" >&2
  exit 1
fi
