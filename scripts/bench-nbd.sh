#!/usr/bin/env bash
# Benchmarks Tandem's NBD server against nbdkit's file plugin on the same raw file, with
# fio's nbd engine: 4 KiB randwrite QD32, 4 KiB randread QD32, 1 MiB sequential write QD8.
# Both servers run side by side; each workload runs on ours, then on nbdkit, ROUNDS times
# (alternating, so background load hits both alike), and the medians are compared.
#
# Usage: scripts/bench-nbd.sh            (RUNTIME=25 ROUNDS=1 SIZE=1G by default)
#        RUNTIME=10 ROUNDS=3 scripts/bench-nbd.sh
# Needs fio (with the nbd engine), nbdkit and jq; scripts/install-test-deps.sh installs them.
set -euo pipefail

RUNTIME=${RUNTIME:-25}
ROUNDS=${ROUNDS:-1}
SIZE=${SIZE:-1G}
OURS_PORT=${OURS_PORT:-10811}
NBDKIT_PORT=${NBDKIT_PORT:-10812}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

for tool in fio nbdkit jq; do
  command -v "$tool" >/dev/null || { echo "missing $tool: run scripts/install-test-deps.sh" >&2; exit 1; }
done

echo "building the release server (cargo build --release -p tandem-nbd --example serve)"
(cd "$ROOT" && cargo build --release -q -p tandem-nbd --example serve)
SERVE="$ROOT/target/release/examples/serve"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/bench-nbd.XXXXXX")
IMAGE="$WORK/bench.raw"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "filling $SIZE image $IMAGE"
fio --name=fill --filename="$IMAGE" --size="$SIZE" --rw=write --bs=1M --ioengine=psync \
  --output=/dev/null >/dev/null

RUST_LOG=warn "$SERVE" --listen "127.0.0.1:$OURS_PORT" "$IMAGE" >"$WORK/ours.log" 2>&1 &
PIDS+=($!)
nbdkit -f -i 127.0.0.1 -p "$NBDKIT_PORT" file file="$IMAGE" >"$WORK/nbdkit.log" 2>&1 &
PIDS+=($!)

wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2
  exit 1
}
wait_port "$OURS_PORT"
wait_port "$NBDKIT_PORT"

# run_fio URI RW BS QD -> prints "iops mbps"
run_fio() {
  local out="$WORK/fio.json"
  fio --name=bench --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" \
    --size="$SIZE" --runtime="$RUNTIME" --time_based --output-format=json \
    --output="$out" >/dev/null 2>&1
  jq -r '.jobs[0] | [(.read.iops + .write.iops), ((.read.bw_bytes + .write.bw_bytes) / 1e6)] | @tsv' "$out"
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

printf '\nfio nbd engine, %s image, %ss per run, %s round(s), medians\n' "$SIZE" "$RUNTIME" "$ROUNDS"
printf '%-22s %12s %10s %12s %10s %8s\n' workload tandem_iops tandem_MBps nbdkit_iops nbdkit_MBps ratio
status=0
for spec in "randwrite 4k 32" "randread 4k 32" "write 1M 8"; do
  read -r rw bs qd <<<"$spec"
  : >"$WORK/ours.txt"
  : >"$WORK/kit.txt"
  for _ in $(seq "$ROUNDS"); do
    run_fio "nbd://127.0.0.1:$OURS_PORT/bench" "$rw" "$bs" "$qd" >>"$WORK/ours.txt"
    run_fio "nbd://127.0.0.1:$NBDKIT_PORT/" "$rw" "$bs" "$qd" >>"$WORK/kit.txt"
  done
  ours_iops=$(cut -f1 "$WORK/ours.txt" | median)
  ours_mbps=$(cut -f2 "$WORK/ours.txt" | median)
  kit_iops=$(cut -f1 "$WORK/kit.txt" | median)
  kit_mbps=$(cut -f2 "$WORK/kit.txt" | median)
  ratio=$(awk -v a="$ours_iops" -v b="$kit_iops" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
  printf '%-22s %12.0f %10.1f %12.0f %10.1f %8s\n' "$rw $bs QD$qd" "$ours_iops" "$ours_mbps" \
    "$kit_iops" "$kit_mbps" "${ratio}x"
  awk -v r="$ratio" 'BEGIN { exit !(r < 1.0) }' && status=1
done
if [ "$status" -ne 0 ]; then
  echo "below the 1.0x floor on at least one workload" >&2
fi
exit "$status"
