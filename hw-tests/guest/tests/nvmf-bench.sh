# nvmirror's NVMe/TCP target against the Linux kernel's own (nvmet-tcp), and against
# nvmirror's NBD export through the kernel's NBD client, side by side in this guest: the
# guest kernel's initiators on loopback, every backing file on the same tmpfs (nvmet's
# through a loop device, in the page cache as nvmirror's are), fio (libaio, O_DIRECT, 4 KiB random writes over a
# 128 MiB device) at queue depth 1 and 32. HWT_NVMF_ROUNDS rounds (default 1) of
# HWT_NVMF_SECS seconds (default 5) per device and depth, the order of the three turning
# each round; the medians are reported as figures. Figures, not pass conditions: the
# targets and the latest figures are in benches/README.md (`nvmirror-benches nvmf-guest`).
# The guest's CPUs are emulated (QEMU TCG), so absolute figures are far below a real
# machine's; the ratios are what is compared.
. "$HWT_REPO/hw-tests/guest/lib.sh"
bin="$HWT_BIN/nvmirror"
[ -x "$bin" ] || hwt_fail "no nvmirror binary at $bin (hw-tests/run builds it)"
for tool in fio nvme nbd-client python3; do
    command -v "$tool" >/dev/null 2>&1 || hwt_fail "no $tool in the guest (the host's root): install it on the host"
done
for m in nvme-tcp nvmet nvmet-tcp nbd; do
    modprobe "$m" || hwt_fail "modprobe $m failed"
done
grep -q " /sys/kernel/config " /proc/mounts || mount -t configfs none /sys/kernel/config ||
    hwt_fail "cannot mount configfs"
ip link set lo up
rounds=${HWT_NVMF_ROUNDS:-1}
secs=${HWT_NVMF_SECS:-5}
work=/var/tmp/nvmf-bench
rm -rf "$work" && mkdir -p "$work"
host=127.0.0.1
vol=bench
ours_nqn=nqn.2026-01.io.nvmirror:$vol
knqn=nqn.2026-01.io.nvmirror.bench:nvmet
hostnqn=nqn.2014-08.org.nvmexpress:uuid:0b1e2c3d-4f5a-4b6c-8d7e-9f0a1b2c3d4e
cfg=/sys/kernel/config/nvmet
node_pid=

cleanup() {
    timeout 30 nvme disconnect -n "$ours_nqn" >/dev/null 2>&1
    timeout 30 nvme disconnect -n "$knqn" >/dev/null 2>&1
    [ "$(cat /sys/block/nbd0/size 2>/dev/null || echo 0)" != 0 ] && timeout 30 nbd-client -d /dev/nbd0 >/dev/null 2>&1
    rm -f "$cfg/ports/1/subsystems/$knqn" 2>/dev/null
    rmdir "$cfg/ports/1" "$cfg/subsystems/$knqn/namespaces/1" "$cfg/subsystems/$knqn" 2>/dev/null
    [ -n "${loopdev:-}" ] && losetup -d "$loopdev" 2>/dev/null
    [ -n "$node_pid" ] && kill -9 "$node_pid" 2>/dev/null
    wait 2>/dev/null
    # The guest's /var/tmp is memory: the volumes go, for the tests after this one.
    rm -rf "$work"
}
trap cleanup EXIT

# --- nvmirror: one unmirrored 128 MiB volume, over NVMe/TCP and NBD -------------------
"$bin" node --name bench --data-dir "$work/node" --listen "$host:7401" --control "$host:7402" \
    --nbd "$host:10841" --nvmf "$host:4441" >"$work/node.ready" 2>"$work/node.log" &
node_pid=$!
hwt_wait_listen 7402 60 "$node_pid" || hwt_fail_with_logs "the node did not start" "$work/node.log"
hwt_wait_listen 4441 30 "$node_pid" || hwt_fail_with_logs "the node serves no NVMe/TCP" "$work/node.log"
timeout 120 "$bin" ctl --node "$host:7402" volume create "$vol" --size 128M ||
    hwt_fail_with_logs "volume create failed" "$work/node.log"

# --- the kernel's target over a file of the same size on the same tmpfs --------------
# A loop device over the file: nvmet's block backend, through the page cache as
# nvmirror's files are. (Its file backend on tmpfs gave the host a namespace of size 0.)
truncate -s 128M "$work/nvmet.img"
modprobe loop || hwt_fail "modprobe loop failed"
loopdev=$(losetup -f --show "$work/nvmet.img") || hwt_fail "losetup of $work/nvmet.img failed"
mkdir "$cfg/subsystems/$knqn" || hwt_fail "configfs: cannot make the nvmet subsystem"
echo 1 >"$cfg/subsystems/$knqn/attr_allow_any_host"
mkdir "$cfg/subsystems/$knqn/namespaces/1"
echo "$loopdev" >"$cfg/subsystems/$knqn/namespaces/1/device_path"
echo 1 >"$cfg/subsystems/$knqn/namespaces/1/enable" || hwt_fail "configfs: cannot enable the nvmet namespace"
mkdir "$cfg/ports/1"
echo tcp >"$cfg/ports/1/addr_trtype"
echo ipv4 >"$cfg/ports/1/addr_adrfam"
echo "$host" >"$cfg/ports/1/addr_traddr"
echo 4442 >"$cfg/ports/1/addr_trsvcid"
ln -s "$cfg/subsystems/$knqn" "$cfg/ports/1/subsystems/$knqn" || hwt_fail "configfs: cannot bind the nvmet port"

# --- the three block devices -------------------------------------------------------
attach() { # nqn port
    timeout 60 nvme connect -t tcp -a "$host" -s "$2" -n "$1" -q "$hostnqn" >/dev/null ||
        hwt_fail_with_logs "nvme connect to $1 failed" "$work/node.log"
    local f
    for f in /sys/class/nvme-subsystem/*/subsysnqn; do
        if [ "$(cat "$f")" = "$1" ]; then
            ls "$(dirname "$f")" | grep -E '^nvme[0-9]+n[0-9]+$' | head -n 1
            return
        fi
    done
}
ours=/dev/$(attach "$ours_nqn" 4441)
theirs=/dev/$(attach "$knqn" 4442)
nbd-client -N "$vol" "$host" 10841 /dev/nbd0 -b 4096 >/dev/null ||
    hwt_fail_with_logs "nbd-client could not attach the volume" "$work/node.log"
# A namespace's block device appears before the host's scan has read its size.
for d in "$ours" "$theirs" /dev/nbd0; do
    hwt_wait_for "$d" 10 || hwt_fail "no $d"
    left=100
    while [ "$(cat "/sys/block/${d#/dev/}/size" 2>/dev/null || echo 0)" = 0 ]; do
        [ "$left" -gt 0 ] || hwt_fail "$d still has no size after 10 s ($(ls -l "$work/nvmet.img"))"
        sleep 0.1
        left=$((left - 1))
    done
done
echo "devices: nvmirror NVMe/TCP $ours, nvmet-tcp $theirs, nvmirror NBD /dev/nbd0"

# One fio run: prints "IOPS P50_US P99_US".
run_fio() { # device depth
    fio --name=w --filename="$1" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth="$2" \
        --size=128M --runtime="$secs" --time_based --randrepeat=0 --output-format=json \
        --output="$work/fio.json" >"$work/fio.err" 2>&1 || { cat "$work/fio.err"; return 1; }
    python3 -c '
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
w = job["write"]
if job.get("error") or "percentile" not in w.get("clat_ns", {}):
    sys.exit("fio: error %s, %d writes: %s" % (job.get("error"), w.get("total_ios", 0), open(sys.argv[2]).read()[-2000:]))
p = w["clat_ns"]["percentile"]
print("%.0f %.1f %.1f" % (w["iops"], p["50.000000"] / 1000, p["99.000000"] / 1000))' "$work/fio.json" "$work/fio.err"
}
names=(nvmf nvmet nbd)
devs=("$ours" "$theirs" /dev/nbd0)
declare -A iops p50 p99
for round in $(seq "$rounds"); do
    for k in 0 1 2; do
        i=$(((k + round - 1) % 3))
        for qd in 1 32; do
            out=$(run_fio "${devs[$i]}" "$qd" 2>&1) || {
                echo "$out"
                dmesg | tail -n 20
                hwt_fail_with_logs "fio on ${devs[$i]} at qd$qd failed" "$work/node.log"
            }
            read -r a b c <<<"$out"
            [ -n "$c" ] || hwt_fail "fio on ${devs[$i]} at qd$qd gave no figures"
            key="${names[$i]}_qd$qd"
            iops[$key]+="$a "
            p50[$key]+="$b "
            p99[$key]+="$c "
            echo "round $round: ${names[$i]} qd$qd: $a IOPS, p50 $b us, p99 $c us"
        done
    done
done
median() { printf '%s\n' $1 | sort -g | sed -n "$((($(printf '%s\n' $1 | wc -l) + 1) / 2))p"; }
for key in "${!iops[@]}"; do
    hwt_figure "nvmf_bench_${key}_iops" "$(median "${iops[$key]}")"
    hwt_figure "nvmf_bench_${key}_p50_us" "$(median "${p50[$key]}")"
    hwt_figure "nvmf_bench_${key}_p99_us" "$(median "${p99[$key]}")"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / (b > 0 ? b : 1) }'; }
r32=$(ratio "$(median "${iops[nvmf_qd32]}")" "$(median "${iops[nvmet_qd32]}")")
r1=$(ratio "$(median "${p50[nvmf_qd1]}")" "$(median "${p50[nvmet_qd1]}")")
hwt_figure nvmf_bench_qd32_iops_vs_nvmet "$r32"
hwt_figure nvmf_bench_qd1_p50_vs_nvmet "$r1"
hwt_detail "4 KiB random writes, $rounds round(s) of $secs s: nvmirror NVMe/TCP qd32 IOPS ${r32}x nvmet-tcp's, qd1 p50 ${r1}x"
