#!/usr/bin/env bash
# Journal benchmarks (release build), side by side with their yardsticks on the same disk:
#  1. group-commit append of 4 KiB and 64 KiB records from 32 concurrent writers, each
#     waiting for durability, vs `fio --rw=write --fdatasync=1` at the same block size
#     (floor: journal records/s >= fio's);
#  2. sequential read of a 1 GiB point-in-time image with 10% of it in the journal vs a
#     sequential read of the raw replica file (floor: 0.8x), warm and, with COLD=1 (root,
#     drops the page cache), cold.
# Env: BENCH_DIR (default target/bench-journal, must be on the disk under test),
#      RECORDS_4K (65536), RECORDS_64K (16384), FIO_SECS (20), PIT_MIB (1024), COLD (0).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${BENCH_DIR:-$PWD/target/bench-journal}
RECORDS_4K=${RECORDS_4K:-65536}
RECORDS_64K=${RECORDS_64K:-16384}
FIO_SECS=${FIO_SECS:-20}
PIT_MIB=${PIT_MIB:-1024}
COLD=${COLD:-0}
command -v fio >/dev/null || scripts/install-test-deps.sh
cargo build --release -p tandem-journal --example bench_journal
BIN=target/release/examples/bench_journal
mkdir -p "$DIR"
status=0

field() { # field NAME LINE
  sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$2"
}

echo "== journal append vs fio fdatasync (dir $DIR, $(nproc) cpus)"
for bs in 4096 65536; do
  if [ "$bs" = 4096 ]; then n=$RECORDS_4K; else n=$RECORDS_64K; fi
  fio_json=$(fio --name=journal-yardstick --directory="$DIR" --rw=write --fdatasync=1 \
    --bs="$bs" --size=256m --runtime="$FIO_SECS" --time_based --output-format=json)
  rm -f "$DIR"/journal-yardstick.*
  read -r fio_iops fio_bw < <(python3 -c 'import json,sys; w=json.load(sys.stdin)["jobs"][0]["write"]; print(w["iops"], w["bw_bytes"])' <<<"$fio_json")
  line=$("$BIN" append --dir "$DIR/j" --record-size "$bs" --writers 32 --records "$n")
  echo "$line"
  rps=$(field records_per_s "$line")
  python3 - "$bs" "$fio_iops" "$fio_bw" "$rps" "$(field mb_per_s "$line")" "$(field fsyncs_per_record "$line")" <<'PY' || status=1
import sys
bs, fio_iops, fio_bw, rps, mbps, fpr = sys.argv[1:]
fio_iops, fio_bw, rps = float(fio_iops), float(fio_bw), float(rps)
ratio = rps / fio_iops
print(f"fio bs={bs}: records_per_s={fio_iops:.0f} mb_per_s={fio_bw/1e6:.1f} fsyncs_per_record=1")
print(f"journal bs={bs}: records_per_s={rps:.0f} mb_per_s={mbps} fsyncs_per_record={fpr}")
verdict = "ok" if ratio >= 1.0 else "BELOW FLOOR 1.0"
print(f"ratio journal/fio bs={bs}: {ratio:.2f}x ({verdict})")
sys.exit(0 if ratio >= 1.0 else 1)
PY
done

echo "== point-in-time read vs raw read (${PIT_MIB} MiB, 10% in journal)"
modes=("")
[ "$COLD" = 1 ] && modes+=("--drop-caches")
for m in "${modes[@]}"; do
  # shellcheck disable=SC2086
  line=$("$BIN" pit-read --dir "$DIR/p" --size-mib "$PIT_MIB" --journal-percent 10 $m)
  echo "$line"
  ratio=$(field ratio "$line")
  if python3 -c "import sys; sys.exit(0 if float('$ratio') >= 0.8 else 1)"; then
    echo "ratio image/raw ($( [ -n "$m" ] && echo cold || echo warm )): ${ratio}x (ok)"
  else
    echo "ratio image/raw: ${ratio}x (BELOW FLOOR 0.8)"; status=1
  fi
done
rm -rf "$DIR"
exit $status
