#!/usr/bin/env bash
# VRA benchmarks (release build), each side by side with its yardstick in one run, ratios
# printed (`tandem-lab bench-vra`, crates/lab/src/bench_vra.rs):
#  1. write path: fio --ioengine=nbd, 4 KiB randwrite QD32 and 1 MiB sequential write QD8,
#     against a protected volume replicating to a recovery VRA on this machine (journal
#     fsynced) vs nbdkit's file plugin on a raw file; replication lag p50/p99
#     (floor: 0.9x nbdkit on both, lag p99 <= 1 s);
#  2. checkpoint barrier: write stall of QD32 fio clients on 2 protected VRAs of one VPG
#     with a checkpoint (freeze both, thaw both) every second (floor: p99 <= 2 ms);
#  2b. (ONLY=managed) the same barrier run by the managers: 4 protected VRAs of one VPG
#     protected through the managers' API, fio capped at MANAGED_IOPS per VRA (the VRAs
#     must keep up: no checkpoints while syncing), no checkpoint due vs the VPG edited to
#     one per interval; stall and checkpoints listed per interval (floor: p99 <= 2 ms,
#     one per interval);
#  3. initial sync of a 4 GiB volume vs nbdcopy between two nbdkit exports (floor: 1.0x);
#  4. delta sync of 1 GiB with 1% of its 4 KiB blocks changed vs
#     rsync --inplace --no-whole-file, with bytes on the wire (floor: 4x rsync's speed,
#     at most 0.2x its bytes);
#  5. (ONLY=rto) failover RTO: 10 VMs x 2 volumes with RTO_JOURNAL_MIB (1024) of unpromoted
#     journal, StartRecovery to every volume answering an NBD read, vs restore by nbdcopy
#     of every volume and vs promote-then-serve (the commit, timed) (floor: <= 2 s);
#  6. (ONLY=move) a whole move of 10 VMs x 2 volumes of 64 MiB (all written) through the
#     managers (2 sites x 3 managers, 2 hosts each), DELTA_PERCENT of the 4 KiB blocks
#     written at the new site before commit, with reverse protection: time to the VMs up,
#     to the commit, to the old site's disks delta-synced, and the delta syncs' time and
#     bytes vs rsync --inplace --no-whole-file of the same files.
#  7. (ONLY=tls) the cost of mutual TLS: the same VRA pair plaintext and with TLS (a CA
#     made for the run; the first mode alternates between rounds), 4 KiB randwrite QD32
#     over WRITE_SECS twice per mode (A B B A) and the initial sync of SYNC_MIB three
#     times per mode (A B B A A B), the better run of each mode compared (floor: TLS at
#     least 0.9x of plaintext on the write path, 0.85x on the sync), with each side's CPU
#     seconds per GiB beside AES-128-GCM's own cost (`openssl speed`, 16 KiB records,
#     one core, measured in the same run);
#  8. (ONLY=nbd-tls) NBD over TLS vs plain TCP NBD: fio's nbd engine, 4 KiB randwrite QD32
#     over WRITE_SECS, on nbds:// with the site's client certificate (a VRA pair with
#     mutual TLS) vs nbd:// (an --insecure pair), and the TLS pair through its Unix socket;
#     each mode twice a round, mirrored (floor: 0.85x plain TCP NBD).
# It reports and does not assert: it exits 0 when a floor is missed. Before each measured
# run it waits for a quiet machine (no rustc running, CPUs MIN_IDLE % idle; at most
# QUIET_WAIT_SECS, then it measures anyway and marks the result NOT quiet).
#
# Usage: scripts/bench-vra.sh                 (the issue's durations, ~10 minutes)
#        QUICK=1 scripts/bench-vra.sh         (smoke run: 5 s fio runs, small syncs)
#        ONLY=write,checkpoint WRITE_SECS=20 scripts/bench-vra.sh
# Env: QUICK, ONLY (write,checkpoint,managed,initial,delta,rto,move,tls,nbd-tls), RTO_JOURNAL_MIB (1024), WRITE_SECS (60), CP_SECS (60),
#      CP_INTERVAL_MS (1000), MANAGED_IOPS (2500), SYNC_MIB (4096), DELTA_MIB (1024), DELTA_PERCENT (1),
#      VOLUME_MIB (1024), RAM_MB (256), JOURNAL_LIMIT_MIB (4096), QUIET_WAIT_SECS (900),
#      MIN_IDLE (85), ROUNDS (1: with more, medians over the rounds are printed at the end),
#      BENCH_DIR (target/bench-vra: on the disk under test), KEEP=1 keeps it,
#      VRA_LOG (RUST_LOG of the VRAs, warn). Extra arguments go to `tandem-lab bench-vra`.
# Needs fio (nbd engine), nbdkit, nbdcopy (libnbd-bin) and rsync:
# scripts/install-test-deps.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in fio nbdkit nbdcopy rsync; do
  command -v "$tool" >/dev/null || { echo "missing $tool: run scripts/install-test-deps.sh" >&2; exit 1; }
done

echo "building (cargo build --release --bins)"
cargo build --release --bins

args=(--dir "${BENCH_DIR:-target/bench-vra}")
[ "${QUICK:-0}" = 1 ] && args+=(--quick)
[ "${KEEP:-0}" = 1 ] && args+=(--keep)
opt() { # opt ENV_NAME --flag
  local v=${!1:-}
  if [ -n "$v" ]; then args+=("$2" "$v"); fi
}
opt ONLY --only
opt WRITE_SECS --write-secs
opt CP_SECS --cp-secs
opt CP_INTERVAL_MS --cp-interval-ms
opt MANAGED_IOPS --managed-iops
opt SYNC_MIB --sync-mib
opt DELTA_MIB --delta-mib
opt DELTA_PERCENT --delta-percent
opt VOLUME_MIB --volume-mib
opt RAM_MB --ram-mb
opt JOURNAL_LIMIT_MIB --journal-limit-mib
opt QUIET_WAIT_SECS --quiet-wait-secs
opt MIN_IDLE --min-idle
opt ROUNDS --rounds
opt RTO_JOURNAL_MIB --rto-journal-mib

echo "machine: $(nproc) cpus, load $(cut -d' ' -f1-3 /proc/loadavg), $(uname -r)"
echo "+ target/release/tandem-lab bench-vra ${args[*]} $*"
exec target/release/tandem-lab bench-vra "${args[@]}" "$@"
