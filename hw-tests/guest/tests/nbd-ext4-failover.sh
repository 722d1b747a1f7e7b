# A filesystem survives failover: two nvmirror nodes in the guest (TCP replication on
# loopback), a volume mirrored from site-a to site-b, the kernel's NBD client (Debian's
# nbd-client with the guest kernel's nbd module) attached to site-a's export, ext4 made
# and mounted on it, files of varied sizes written and fsynced, and more written in a loop
# (each fsynced, then its directory) while a file grows without fsync; site-a is killed
# with SIGKILL in the middle of that. The dead export is detached, the mirror failed over
# on site-b, and the promoted volume attached: the journal is replayed, `fsck.ext4 -fn`
# must be clean, and every file whose fsync returned must hold its checksum. The file
# written without fsync need not survive, and is only reported.
#
# The NBD attach: nbd-client 3.24 (Debian 12) configures the device over netlink by
# default (the nbd module's generic netlink family, in the 6.1 kernel): no nbd-client
# process stays behind, the kernel holds the socket, and `nbd-client -d` disconnects. The
# module's defaults are enough (nbds_max=16 devices, /dev/nbd0 and /dev/nbd1 are used).
# `-b 4096` makes the device's logical block 4 KiB, so that every request is whole
# filesystem blocks. With the server killed the kernel sees its socket closed and fails
# the outstanding and later requests with EIO at once (no `-timeout` is needed; no
# `-persist`, so it does not try to reconnect).
. "$HWT_REPO/hw-tests/guest/lib.sh"
bin="$HWT_BIN/nvmirror"
[ -x "$bin" ] || hwt_fail "no nvmirror binary at $bin (hw-tests/run builds it)"
for tool in nbd-client mkfs.ext4 fsck.ext4 e2fsck sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || hwt_fail "no $tool in the guest (the host's root): install it on the host"
done
modprobe nbd || hwt_fail "modprobe nbd failed"
modprobe ext4 || hwt_fail "modprobe ext4 failed"
hwt_wait_for /dev/nbd1 10 || hwt_fail "no /dev/nbd1 after modprobe nbd"
ip link set lo up

work=/var/tmp/nbd-ext4-failover
mnt=/mnt/nbd-ext4
rm -rf "$work" && mkdir -p "$work" "$mnt"
host=127.0.0.1
vol=fs
a_ctl=$host:7211 b_ctl=$host:7212
a_nbd_port=10821 b_nbd_port=10822
a_pid= b_pid= writer_pid= unsynced_pid=

# Leaves nothing mounted or attached and no node running, whatever happened, so that the
# tests after this one find the guest as it was.
cleanup() {
    [ -n "$writer_pid" ] && kill "$writer_pid" 2>/dev/null
    [ -n "$unsynced_pid" ] && kill "$unsynced_pid" 2>/dev/null
    if grep -q " $mnt " /proc/mounts; then
        timeout 60 umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null
    fi
    for d in /dev/nbd0 /dev/nbd1; do
        [ "$(cat "/sys/block/${d#/dev/}/size" 2>/dev/null || echo 0)" != 0 ] && timeout 30 nbd-client -d "$d" >/dev/null 2>&1
    done
    [ -n "$a_pid" ] && kill -9 "$a_pid" 2>/dev/null
    [ -n "$b_pid" ] && kill -9 "$b_pid" 2>/dev/null
    wait 2>/dev/null
    # The guest's /var/tmp is memory: the volumes go, for the tests after this one.
    rm -rf "$work"
}
trap cleanup EXIT

# Prints the last lines of both nodes' logs and fails with $1.
fail_with_logs() { hwt_fail_with_logs "$1" "$work"/site-a.log "$work"/site-b.log; }

start_node() { # name listen-port control nbd-port
    "$bin" node --name "$1" --data-dir "$work/$1" --listen "$host:$2" --control "$3" --nbd "$host:$4" \
        >"$work/$1.ready" 2>"$work/$1.log" &
}
start_node site-a 7201 "$a_ctl" "$a_nbd_port"
a_pid=$!
start_node site-b 7202 "$b_ctl" "$b_nbd_port"
b_pid=$!
hwt_wait_listen "${a_ctl##*:}" 60 "$a_pid" || fail_with_logs "site-a did not start"
hwt_wait_listen "${b_ctl##*:}" 60 "$b_pid" || fail_with_logs "site-b did not start"
hwt_wait_listen "$a_nbd_port" 30 "$a_pid" || fail_with_logs "site-a serves no NBD"
hwt_wait_listen "$b_nbd_port" 30 "$b_pid" || fail_with_logs "site-b serves no NBD"

ctl() { timeout 300 "$bin" ctl --node "$@"; }
ctl "$a_ctl" volume create "$vol" --size 128M || fail_with_logs "volume create failed"
started=$(date +%s.%N)
ctl "$a_ctl" mirror "$vol" --to "$b_ctl" --timeout 240 || fail_with_logs "mirror failed"
echo "mirrored $vol to site-b: in sync after $(hwt_since "$started") s"

# --- site-a's export: ext4, fsynced files --------------------------------------------
nbd-client -N "$vol" "$host" "$a_nbd_port" /dev/nbd0 -b 4096 ||
    fail_with_logs "nbd-client could not attach site-a's export to /dev/nbd0"
echo "/dev/nbd0: $(($(cat /sys/block/nbd0/size) * 512)) bytes, logical block $(cat /sys/block/nbd0/queue/logical_block_size) B"
mkfs.ext4 -F -q -b 4096 -L mirrored /dev/nbd0 || fail_with_logs "mkfs.ext4 on /dev/nbd0 failed"
mount -t ext4 /dev/nbd0 "$mnt" || fail_with_logs "mount of /dev/nbd0 failed"
mkdir -p "$mnt/set" "$mnt/loop"
sync "$mnt"

# Acknowledged files: one `SHA256  PATH` line each, appended only after the file and its
# directory were fsynced (so every line names a file that must survive).
acked=$work/acked.sha256
: >"$acked"
# Writes file $1 of $2 bytes of random data, fsyncs it and its directory, records it.
write_synced() { hwt_write_synced "$mnt" "$acked" "$work" "$@"; }
sizes=(1 100 511 512 4095 4096 4097 8192 12345 65536 65537 131072 262143 1048576 1048577 3145728 5000000)
for i in "${!sizes[@]}"; do
    write_synced "$mnt/set/f$i" "${sizes[$i]}" || fail_with_logs "writing set/f$i (${sizes[$i]} B) failed while site-a was up"
done
# Overwrite some in place, so that the mirror also carries rewritten blocks.
for i in 3 9 13; do
    write_synced "$mnt/set/f$i" $((${sizes[$i]} + 4096 * i)) || fail_with_logs "rewriting set/f$i failed"
done
# A set with the same path more than once keeps its last line only.
awk '{ last[$2] = $0 } END { for (p in last) print last[p] }' "$acked" >"$acked.tmp" && mv "$acked.tmp" "$acked"
set_files=$(wc -l <"$acked")
echo "wrote and fsynced $set_files files of ${sizes[0]} to ${sizes[-1]} bytes"

# --- site-a killed while files are written ------------------------------------------
# A file growing without fsync (16 KiB at a time, at most 32 MiB: the filesystem is 128
# MiB), and a loop of fsynced files (64 KiB to 1 MiB).
(
    for _ in $(seq 1 2000); do
        head -c 16384 /dev/urandom >>"$mnt/unsynced" 2>/dev/null || exit 0
        sleep 0.02
    done
) &
unsynced_pid=$!
(
    for i in $(seq 1 10000); do
        write_synced "$mnt/loop/g$i" $(((RANDOM % 16 + 1) * 65536 + RANDOM)) || exit 0
    done
) &
writer_pid=$!
# Let the loop get some files fsynced, then kill site-a in the middle of the next ones.
left=600
while [ "$(wc -l <"$acked")" -lt $((set_files + 6)) ] && [ "$left" -gt 0 ]; do
    sleep 0.1
    left=$((left - 1))
done
[ "$left" -gt 0 ] || fail_with_logs "the fsync loop did not get 6 files written in 60 s"
sleep "0.$((RANDOM % 9 + 1))"
kill -9 "$a_pid"
killed=$(date +%s.%N)
wait "$a_pid" 2>/dev/null
a_pid=
acked_at_kill=$(wc -l <"$acked")
echo "killed site-a with SIGKILL after $acked_at_kill fsynced files"
# The writers see EIO now; stop them, then let go of the dead filesystem and device.
kill "$unsynced_pid" 2>/dev/null
wait "$unsynced_pid" 2>/dev/null
unsynced_pid=
# The loop stops at its first failed write; give it a few seconds, then stop it.
for _ in $(seq 1 50); do kill -0 "$writer_pid" 2>/dev/null || break; sleep 0.1; done
kill "$writer_pid" 2>/dev/null
wait "$writer_pid" 2>/dev/null
writer_pid=
# Lines appended after the kill name files whose fsync returned before it (an fsync that
# needed site-a after its death fails with EIO and records nothing).
final_acked=$(wc -l <"$acked")
timeout 60 umount "$mnt" 2>&1 || { echo "umount of the dead filesystem failed; lazy umount"; umount -l "$mnt"; }
timeout 30 nbd-client -d /dev/nbd0 || hwt_fail "nbd-client -d /dev/nbd0 failed"
detached=$(date +%s.%N)

# --- failover on site-b --------------------------------------------------------------
fo_started=$(date +%s.%N)
report=$(ctl "$b_ctl" failover "$vol" 2>&1) || { echo "$report"; fail_with_logs "ctl failover failed"; }
failover_s=$(hwt_since "$fo_started")
echo "failover: $report"
nbd-client -N "$vol" "$host" "$b_nbd_port" /dev/nbd1 -b 4096 ||
    fail_with_logs "nbd-client could not attach the promoted volume to /dev/nbd1"
attached_s=$(hwt_since "$killed")
echo "kill to promoted export attached: $attached_s s (detach of the dead export took $(awk -v a="$killed" -v b="$detached" 'BEGIN { printf "%.1f", b - a }') s, failover $failover_s s)"

# A forced read-only check before anything is written: the journal of a filesystem whose
# device died under it still needs replaying, which e2fsck -n skips (it says so), so what
# it finds is reported, not judged. (Without -f, e2fsck only says "clean": a journalled
# ext4 is never marked unclean while mounted.)
pre=$(fsck.ext4 -f -n /dev/nbd1 2>&1)
pre_rc=$?
echo "fsck.ext4 -f -n before journal replay: exit $pre_rc"
echo "$pre" | tail -n 12
# Replay the journal as a mount would, then the full read-only check must be clean (exit
# 0). It may still print "Free blocks count wrong" and "Free inodes count wrong": ext4
# does not keep the superblock's free counts up to date (it sums the group descriptors at
# mount), and e2fsck -n reports the difference without counting it as an error.
e2fsck -E journal_only -y /dev/nbd1 >"$work/replay.log" 2>&1
replay_rc=$?
cat "$work/replay.log"
[ "$replay_rc" -le 1 ] || hwt_fail "journal replay on the promoted volume failed (e2fsck exit $replay_rc)"
fsck_out=$(fsck.ext4 -f -n /dev/nbd1 2>&1)
fsck_rc=$?
echo "$fsck_out"
[ "$fsck_rc" -eq 0 ] || hwt_fail "fsck.ext4 -f -n on the promoted volume: exit $fsck_rc (not clean)"

mount -t ext4 /dev/nbd1 "$mnt" || fail_with_logs "mount of the promoted volume failed"
(cd "$mnt" && sha256sum --quiet -c "$acked") >"$work/check.log" 2>&1
check_rc=$?
if [ "$check_rc" -ne 0 ]; then
    cat "$work/check.log"
    hwt_fail "fsynced files lost or changed after failover: $(grep -c -v ': OK$' "$work/check.log") of $final_acked"
fi
bytes=$(cd "$mnt" && awk '{ print $2 }' "$acked" | xargs stat -c %s | awk '{ s += $1 } END { print s }')
unsynced=$(stat -c %s "$mnt/unsynced" 2>/dev/null || echo none)
loop_on_disk=$(find "$mnt/loop" -type f | wc -l)
echo "verified $final_acked fsynced files ($bytes bytes); the loop's directory holds $loop_on_disk files; the unsynced file: $unsynced bytes"
# The promoted filesystem takes writes.
write_synced "$mnt/after-failover" 100000 || hwt_fail "writing to the promoted filesystem failed"
# (A file, not a process substitution: the guest's devtmpfs has no /dev/fd.)
tail -n 1 "$acked" | sed "s|  |  $mnt/|" >"$work/after.sha256"
sha256sum --quiet -c "$work/after.sha256" || hwt_fail "a file written after failover reads back wrong"
umount "$mnt" || hwt_fail "umount of the promoted filesystem failed"
fsck.ext4 -f -n /dev/nbd1 >/dev/null 2>&1 || hwt_fail "fsck.ext4 -f -n after writing to the promoted volume is not clean"
timeout 30 nbd-client -d /dev/nbd1 || hwt_fail "nbd-client -d /dev/nbd1 failed"

hwt_figure nbd_ext4_files_verified "$final_acked"
hwt_figure nbd_ext4_bytes_verified "$bytes"
hwt_figure nbd_ext4_failover_s "$failover_s"
hwt_figure nbd_ext4_kill_to_attach_s "$attached_s"
hwt_figure nbd_ext4_precheck_fsck_exit "$pre_rc"
hwt_detail "ext4 on /dev/nbd0 (site-a), SIGKILL during fsync loop, failover in $failover_s s: fsck -fn clean, $final_acked fsynced files ($bytes B) verified; unsynced file: $unsynced B"
