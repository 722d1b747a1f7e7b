# A filesystem on NVMe/TCP rides through switchover and failover without unmounting: two
# nvmirror nodes in the guest serve one mirrored volume over NVMe/TCP (--nvmf), the guest
# kernel's nvme-tcp initiator connects to both (`nvme connect`, one subsystem, two paths)
# and its native multipath joins them into one namespace, /dev/nvmeXnY. ANA says which path
# takes I/O: optimized on the primary, inaccessible on the mirror.
#
# ext4 is made and mounted on the multipath device; a writer writes files (each fsynced,
# then its directory) in a loop and stops at its first failed write. Then a planned
# switchover (site-a -> site-b): the kernel hears of the ANA change and moves its I/O to
# site-b by itself. Then site-b is killed with SIGKILL and site-a fails over: the kernel
# queues I/O while no path is optimized, and sends it to site-a once it is. The writer must
# not see an error at any point, and must make progress after each change. At the end:
# umount, `fsck.ext4 -f -n` clean, and every fsynced file holds its checksum.
. "$HWT_REPO/hw-tests/guest/lib.sh"
bin="$HWT_BIN/nvmirror"
[ -x "$bin" ] || hwt_fail "no nvmirror binary at $bin (hw-tests/run builds it)"
for tool in nvme mkfs.ext4 fsck.ext4 sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || hwt_fail "no $tool in the guest (the host's root): install it on the host (nvme-cli, e2fsprogs)"
done
modprobe nvme-tcp || hwt_fail "modprobe nvme-tcp failed"
modprobe ext4 || hwt_fail "modprobe ext4 failed"
[ "$(cat /sys/module/nvme_core/parameters/multipath 2>/dev/null)" = Y ] ||
    hwt_fail "the guest kernel's native NVMe multipath is off (nvme_core multipath=$(cat /sys/module/nvme_core/parameters/multipath 2>/dev/null))"
ip link set lo up

work=/var/tmp/nvmeof-multipath
mnt=/mnt/nvmeof
rm -rf "$work" && mkdir -p "$work" "$mnt"
host=127.0.0.1
vol=fabric
nqn=nqn.2026-01.io.nvmirror:$vol
hostnqn=nqn.2014-08.org.nvmexpress:uuid:6c2a3e57-8f1d-4d0e-9b7a-0d1e2f3a4b5c
hostid=6c2a3e57-8f1d-4d0e-9b7a-0d1e2f3a4b5c
a_ctl=$host:7311 b_ctl=$host:7312
a_port=4421 b_port=4422
a_pid= b_pid= writer_pid=

cleanup() {
    touch "$work/stop"
    [ -n "$writer_pid" ] && kill "$writer_pid" 2>/dev/null
    if grep -q " $mnt " /proc/mounts; then
        timeout 60 umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null
    fi
    timeout 30 nvme disconnect -n "$nqn" >/dev/null 2>&1
    [ -n "$a_pid" ] && kill -9 "$a_pid" 2>/dev/null
    [ -n "$b_pid" ] && kill -9 "$b_pid" 2>/dev/null
    wait 2>/dev/null
    # The guest's /var/tmp is memory: the volumes go, for the tests after this one.
    rm -rf "$work"
}
trap cleanup EXIT

fail_with_logs() { hwt_fail_with_logs "$1" "$work"/site-a.log "$work"/site-b.log; }

start_node() { # name listen-port control nvmf-port
    "$bin" node --name "$1" --data-dir "$work/$1" --listen "$host:$2" --control "$3" --nbd "$host:0" \
        --nvmf "$host:$4" >"$work/$1.ready" 2>"$work/$1.log" &
}
start_node site-a 7301 "$a_ctl" "$a_port"
a_pid=$!
start_node site-b 7302 "$b_ctl" "$b_port"
b_pid=$!
hwt_wait_listen "${a_ctl##*:}" 60 "$a_pid" || fail_with_logs "site-a did not start"
hwt_wait_listen "${b_ctl##*:}" 60 "$b_pid" || fail_with_logs "site-b did not start"
hwt_wait_listen "$a_port" 30 "$a_pid" || fail_with_logs "site-a serves no NVMe/TCP"
hwt_wait_listen "$b_port" 30 "$b_pid" || fail_with_logs "site-b serves no NVMe/TCP"

ctl() { timeout 300 "$bin" ctl --node "$@"; }
ctl "$a_ctl" volume create "$vol" --size 128M || fail_with_logs "volume create failed"
ctl "$a_ctl" mirror "$vol" --to "$b_ctl" --timeout 240 || fail_with_logs "mirror failed"

# --- discovery, then one path to each node -------------------------------------------
disc=$(timeout 60 nvme discover -t tcp -a "$host" -s "$a_port" -q "$hostnqn" -I "$hostid" 2>&1) ||
    { echo "$disc"; fail_with_logs "nvme discover at site-a failed"; }
echo "$disc"
# One "PORT NQN" line per entry of the log.
entries=$(echo "$disc" | awk '/^trsvcid:/ { port = $2 } /^subnqn:/ { print port, $2 }')
for port in "$a_port" "$b_port"; do
    echo "$entries" | grep -qx "$port $nqn" ||
        fail_with_logs "the discovery log at site-a does not list $nqn at port $port"
done
connect() { # port [digest options]
    local port=$1
    shift
    timeout 60 nvme connect -t tcp -a "$host" -s "$port" -n "$nqn" -q "$hostnqn" -I "$hostid" \
        --ctrl-loss-tmo=-1 --reconnect-delay=2 --keep-alive-tmo=5 "$@"
}
connect "$a_port" || fail_with_logs "nvme connect to site-a failed"
# The second path with header and data digests (crc32c on every PDU).
connect "$b_port" --hdr-digest --data-digest || fail_with_logs "nvme connect to site-b failed"

subsys=
for f in /sys/class/nvme-subsystem/*/subsysnqn; do
    [ "$(cat "$f")" = "$nqn" ] && subsys=$(dirname "$f")
done
[ -n "$subsys" ] || fail_with_logs "no NVMe subsystem $nqn after connecting"
# The path (controller) to a node's port, and its namespace's ANA state.
path_of() {
    local c
    for c in "$subsys"/nvme[0-9]*; do
        [[ ${c##*/} =~ ^nvme[0-9]+$ ]] || continue
        grep -q "trsvcid=$1\b" "$c/address" 2>/dev/null && { echo "$c"; return; }
    done
}
ana_of() {
    local c
    c=$(path_of "$1")
    [ -n "$c" ] && cat "$c"/nvme*c*n1/ana_state 2>/dev/null | head -n 1
}
wait_ana() { # port state seconds
    local left=$(($3 * 10))
    while [ "$(ana_of "$1")" != "$2" ]; do
        [ "$left" -gt 0 ] || return 1
        sleep 0.1
        left=$((left - 1))
    done
}
wait_ana "$a_port" optimized 30 || fail_with_logs "site-a's path is $(ana_of "$a_port"), not optimized"
wait_ana "$b_port" inaccessible 30 || fail_with_logs "site-b's path is $(ana_of "$b_port"), not inaccessible"
heads=$(ls "$subsys" | grep -E '^nvme[0-9]+n[0-9]+$')
[ "$(echo "$heads" | wc -l)" = 1 ] || fail_with_logs "expected one multipath namespace in $subsys, found: $heads"
dev=/dev/$heads
hwt_wait_for "$dev" 10 || fail_with_logs "no $dev"
echo "$dev: multipath namespace of $nqn, $(($(cat "/sys/block/$heads/size") * 512)) bytes, logical block $(cat "/sys/block/$heads/queue/logical_block_size") B; paths:"
for c in "$subsys"/nvme[0-9]*; do
    [[ ${c##*/} =~ ^nvme[0-9]+$ ]] || continue
    echo "  ${c##*/} $(cat "$c/address") state $(cat "$c/state") ana $(cat "$c"/nvme*c*n1/ana_state)"
done

# --- ext4 on the multipath device, fsynced files in a loop ---------------------------
mkfs.ext4 -F -q -b 4096 "$dev" || fail_with_logs "mkfs.ext4 on $dev failed"
mount -t ext4 "$dev" "$mnt" || fail_with_logs "mount of $dev failed"
mkdir -p "$mnt/loop"
sync "$mnt"
acked=$work/acked.sha256
: >"$acked"
# Writes file $1 of $2 bytes of random data, fsyncs it and its directory, records it.
write_synced() { hwt_write_synced "$mnt" "$acked" "$work" "$@"; }
(
    for i in $(seq 1 20000); do
        [ -e "$work/stop" ] && exit 0
        write_synced "$mnt/loop/g$i" $(((RANDOM % 8 + 1) * 65536 + RANDOM)) || {
            echo "write of loop/g$i failed" >"$work/writer-failed"
            exit 1
        }
    done
) &
writer_pid=$!
# Waits until the writer has fsynced $1 more files (within $2 seconds); fails if it stopped.
wait_progress() {
    local want=$(($(wc -l <"$acked") + $1)) left=$(($2 * 10))
    while [ "$(wc -l <"$acked")" -lt "$want" ]; do
        [ -e "$work/writer-failed" ] && fail_with_logs "the writer saw an error: $(cat "$work/writer-failed")"
        [ "$left" -gt 0 ] || return 1
        sleep 0.1
        left=$((left - 1))
    done
}
wait_progress 6 120 || fail_with_logs "the writer did not get 6 files fsynced in 120 s"
echo "writer: $(wc -l <"$acked") files fsynced through site-a"

# --- planned switchover: site-b becomes the primary ----------------------------------
started=$(date +%s.%N)
ctl "$a_ctl" switchover "$vol" || fail_with_logs "ctl switchover failed"
wait_ana "$b_port" optimized 60 || fail_with_logs "site-b's path is $(ana_of "$b_port") 60 s after the switchover"
wait_ana "$a_port" inaccessible 60 || fail_with_logs "site-a's path is $(ana_of "$a_port") after the switchover"
switch_s=$(hwt_since "$started")
wait_progress 6 120 || fail_with_logs "the writer made no progress through site-b after the switchover"
echo "switchover: paths flipped in $switch_s s; writer at $(wc -l <"$acked") files, no error"

# --- site-b lost, failover on site-a -------------------------------------------------
kill -9 "$b_pid"
killed=$(date +%s.%N)
wait "$b_pid" 2>/dev/null
b_pid=
sleep 1
report=$(ctl "$a_ctl" failover "$vol" 2>&1) || { echo "$report"; fail_with_logs "ctl failover failed"; }
echo "failover: $report"
wait_ana "$a_port" optimized 60 || fail_with_logs "site-a's path is $(ana_of "$a_port") 60 s after the failover"
resumed_s=$(hwt_since "$killed")
wait_progress 6 180 || fail_with_logs "the writer made no progress through site-a after the failover"
echo "failover: site-a optimized $resumed_s s after site-b was killed; writer at $(wc -l <"$acked") files, no error"

touch "$work/stop"
wait "$writer_pid"
writer_rc=$?
writer_pid=
[ -e "$work/writer-failed" ] && fail_with_logs "the writer saw an error: $(cat "$work/writer-failed")"
[ "$writer_rc" -eq 0 ] || fail_with_logs "the writer exited with $writer_rc"
files=$(wc -l <"$acked")
grep -q " $mnt " /proc/mounts || hwt_fail "the filesystem is no longer mounted"
umount "$mnt" || fail_with_logs "umount failed"
fsck_out=$(fsck.ext4 -f -n "$dev" 2>&1)
fsck_rc=$?
echo "$fsck_out"
[ "$fsck_rc" -eq 0 ] || hwt_fail "fsck.ext4 -f -n after switchover and failover: exit $fsck_rc (not clean)"
mount -t ext4 "$dev" "$mnt" || fail_with_logs "mount after the checks failed"
(cd "$mnt" && sha256sum --quiet -c "$acked") >"$work/check.log" 2>&1 || {
    cat "$work/check.log"
    hwt_fail "fsynced files lost or changed: $(grep -c -v ': OK$' "$work/check.log") of $files"
}
bytes=$(cd "$mnt" && awk '{ print $2 }' "$acked" | xargs stat -c %s | awk '{ s += $1 } END { print s }')
umount "$mnt" || fail_with_logs "the last umount failed"
timeout 30 nvme disconnect -n "$nqn" || hwt_fail "nvme disconnect failed"

hwt_figure nvmeof_files_verified "$files"
hwt_figure nvmeof_bytes_verified "$bytes"
hwt_figure nvmeof_switchover_ana_s "$switch_s"
hwt_figure nvmeof_kill_to_optimized_s "$resumed_s"
hwt_detail "ext4 on $dev (two NVMe/TCP paths, native multipath): switchover (paths flipped in $switch_s s) and SIGKILL + failover (optimized after $resumed_s s) with no write error; fsck -fn clean, $files fsynced files ($bytes B) verified"
