# Shared by the two halves of the power-cut test (hw-tests/power-cut.sh boots the guest
# for each): the two NVMe drives that outlive the cut (serials pc-a and pc-b), one ext4
# file system each, and one nvmirror node on each, its data dir and its NVRAM
# ($HWT_POWER_CUT_MODE:DIR) on that drive. Nothing of a node lives on the guest's root,
# which is memory and gone at the cut.
. "$HWT_REPO/hw-tests/guest/lib.sh"
bin="$HWT_BIN/nvmirror"
mode=${HWT_POWER_CUT_MODE:?HWT_POWER_CUT_MODE is not set}
host=127.0.0.1
vol=pc
# 4 KiB blocks the writer uses (16 MiB of the volume), fewer than the log holds between
# two CPs, so that the run has CPs and overwrites.
blocks=4096
acks=$HWT_RESULTS/power-cut.acks
a_ctl=$host:7231 b_ctl=$host:7232
a_nbd_port=10831 b_nbd_port=10832
a_pid= b_pid=

ctl() { timeout 300 "$bin" ctl --node "$@"; }

# The block device of the drive with serial $1.
pc_drive() {
    local d
    for d in /sys/class/nvme/nvme*; do
        [ "$(cat "$d/serial" 2>/dev/null | tr -d ' ')" = "$1" ] || continue
        echo "/dev/$(basename "$d")n1"
        return 0
    done
    return 1
}

pc_devices() {
    modprobe nvme || hwt_fail "modprobe nvme failed"
    modprobe ext4 || hwt_fail "modprobe ext4 failed"
    ip link set lo up
    local left=200
    until dev_a=$(pc_drive pc-a) && dev_b=$(pc_drive pc-b) && [ -b "$dev_a" ] && [ -b "$dev_b" ]; do
        left=$((left - 1))
        [ "$left" -gt 0 ] || hwt_fail "the NVMe drives pc-a and pc-b did not appear"
        sleep 0.1
    done
    echo "drives: pc-a $dev_a, pc-b $dev_b"
}

pc_mount() {
    mkdir -p /mnt/pc-a /mnt/pc-b
    mount -t ext4 "$dev_a" /mnt/pc-a || hwt_fail "mount $dev_a failed"
    mount -t ext4 "$dev_b" /mnt/pc-b || hwt_fail "mount $dev_b failed"
}

fail_with_logs() { hwt_fail_with_logs "$1" /mnt/pc-a/site-a.log /mnt/pc-b/site-b.log; }

start_node() { # name mount listen-port control nbd-port
    local dir=$2/node
    mkdir -p "$dir"
    "$bin" node --name "$1" --data-dir "$dir" --nvram "$mode:$dir/nvram" --listen "$host:$3" --control "$4" \
        --nbd "$host:$5" >>"$2/$1.ready" 2>>"$2/$1.log" &
}

pc_start_nodes() {
    start_node site-a /mnt/pc-a 7221 "$a_ctl" "$a_nbd_port"
    a_pid=$!
    start_node site-b /mnt/pc-b 7222 "$b_ctl" "$b_nbd_port"
    b_pid=$!
    hwt_wait_listen "${a_ctl##*:}" 120 "$a_pid" || fail_with_logs "site-a did not start"
    hwt_wait_listen "${b_ctl##*:}" 120 "$b_pid" || fail_with_logs "site-b did not start"
    hwt_wait_listen "$a_nbd_port" 60 "$a_pid" || fail_with_logs "site-a serves no NBD"
    hwt_wait_listen "$b_nbd_port" 60 "$b_pid" || fail_with_logs "site-b serves no NBD"
}
