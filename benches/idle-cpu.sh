#!/usr/bin/env bash
# benches/idle-cpu.sh [BIN] [N]: the CPU an idle node uses with N volumes (default 64),
# each unmirrored, 16 MiB on a file of its own, over 10 s once they are up. Prints the
# node's threads and its CPU as a share of one core (/proc/PID/stat, user + system).
# BIN defaults to target/release/nvmirror (cargo build --release -p nvmirror-control).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/nvmirror}
n=${2:-64}
dir=$(mktemp -d)
port=$((18500 + RANDOM % 300))
"$bin" node --name idle --data-dir "$dir/node" --listen 127.0.0.1:$((port + 1)) \
    --control 127.0.0.1:$((port + 2)) --nbd 127.0.0.1:$((port + 3)) >/dev/null 2>"$dir/node.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 50); do
    "$bin" ctl --node 127.0.0.1:$((port + 2)) status >/dev/null 2>&1 && break
    sleep 0.1
done
for i in $(seq "$n"); do
    "$bin" ctl --node 127.0.0.1:$((port + 2)) volume create "v$i" --size 16M --log-size 4M --disk "$dir/v$i.img" >/dev/null
done
sleep 2
ticks() { awk '{ print $14 + $15 }' "/proc/$pid/stat"; }
hz=$(getconf CLK_TCK)
t0=$(ticks)
sleep 10
t1=$(ticks)
threads=$(ls "/proc/$pid/task" | wc -l)
awk -v d=$((t1 - t0)) -v hz="$hz" -v n="$n" -v t="$threads" \
    'BEGIN { printf "idle node with %d volumes (%d threads): %.2f%% of one core over 10 s\n", n, t, 100 * d / hz / 10 }'
