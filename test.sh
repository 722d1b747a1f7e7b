#!/usr/bin/env bash
# Runs every test of the workspace. The end-to-end tests drive real NBD clients from
# Debian (qemu-io and qemu-img from qemu-utils, nbdinfo and nbdcopy from libnbd-bin) and
# a real etcd (etcd-server, for the fleet test), promtool (prometheus, for the metrics
# test), and fio and nbdkit for the benchmark harness's quick run: this script installs
# them first when they are missing (as root, or through sudo).
set -euo pipefail
cd "$(dirname "$0")"

need=()
command -v qemu-io >/dev/null 2>&1 || need+=(qemu-utils)
command -v nbdinfo >/dev/null 2>&1 || need+=(libnbd-bin)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
# The metrics test's checker (promtool, from Prometheus's own package).
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
# The benchmark harness's quick run (benches/tests/quick.rs): fio's nbd engine against nbdkit.
command -v fio >/dev/null 2>&1 || need+=(fio)
command -v nbdkit >/dev/null 2>&1 || need+=(nbdkit)
# The package test (control/tests/package.rs) builds the .deb with cargo-deb.
command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked --version 3.8.0
if ((${#need[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    echo "test.sh: installing ${need[*]}" >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace "$@" 2>&1 | tee "$log" || status=$?
# One closing line for the whole workspace (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "test.sh: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
