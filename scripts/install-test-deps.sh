#!/usr/bin/env bash
# Installs the system packages the test suite and benchmarks use: the real NBD clients and
# yardsticks (qemu-utils, nbdkit, libnbd-bin, fio), etcd, rsync, docker-compose for
# validating the compose file, and the stock TLS and gRPC clients the interoperability
# tests drive (openssl, Debian's python3 with grpcio), and cargo-fuzz for the fuzz targets.
# Idempotent: does nothing when everything is present.
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-img || need+=(qemu-utils)
have nbdkit || need+=(nbdkit)
have nbdinfo || need+=(libnbd-bin)
have fio || need+=(fio)
have etcd || need+=(etcd-server)
have etcdctl || need+=(etcd-client)
have rsync || need+=(rsync)
have docker-compose || need+=(docker-compose)
have ip || need+=(iproute2)
have openssl || need+=(openssl)
/usr/bin/python3 -c 'import grpc' >/dev/null 2>&1 || need+=(python3-grpcio)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The fuzz targets' runner (scripts/fuzz.sh), built from crates.io like the workspace.
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi
