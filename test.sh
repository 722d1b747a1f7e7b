#!/usr/bin/env bash
# Runs every test of the workspace. The end-to-end tests drive real NBD clients from
# Debian (qemu-io and qemu-img from qemu-utils, nbdinfo and nbdcopy from libnbd-bin):
# this script installs them first when they are missing (as root, or through sudo).
set -euo pipefail
cd "$(dirname "$0")"

need=()
command -v qemu-io >/dev/null 2>&1 || need+=(qemu-utils)
command -v nbdinfo >/dev/null 2>&1 || need+=(libnbd-bin)
if ((${#need[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    echo "test.sh: installing ${need[*]}" >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi

cargo test --workspace "$@"
