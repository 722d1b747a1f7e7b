# The power-cut test's first boot (hw-tests/power-cut.sh): fresh file systems on the two
# drives, both nodes, a volume mirrored from site-a to site-b, and the checked writer
# (hw-power-cut write) at queue depth 8 on site-a's export, recording every
# acknowledgement on the results share. Once it has recorded WRITES_BEFORE_CUT, the file
# power-cut.writing tells the host, which kills QEMU with SIGKILL while the writes go on.
# This script never ends by itself unless something failed.
. "$HWT_REPO/hw-tests/guest/power-cut/lib.sh"
pc_devices
mkfs.ext4 -q -F "$dev_a" || hwt_fail "mkfs.ext4 $dev_a failed"
mkfs.ext4 -q -F "$dev_b" || hwt_fail "mkfs.ext4 $dev_b failed"
pc_mount
pc_start_nodes
ctl "$a_ctl" volume create "$vol" --size 64M --log-size 4M || fail_with_logs "volume create failed"
ctl "$a_ctl" mirror "$vol" --to "$b_ctl" --timeout 240 || fail_with_logs "mirror failed"
ctl "$a_ctl" status "$vol" | head -n 4
# What was set up (the nodes' state files, the volume's superblocks) goes to the drives
# now, in both modes: under file: a node saves them without a flush, and without this
# the cut would take them, and the test would find nothing to count the writes on.
sync
: >"$acks"
"$HWT_BIN/hw-power-cut" write "$host:$a_nbd_port" "$vol" "$blocks" "$acks" 8 &
writer=$!
left=1200
while [ "$(wc -l <"$acks")" -lt "${HWT_POWER_CUT_WRITES_BEFORE:-2000}" ]; do
    kill -0 "$writer" 2>/dev/null || fail_with_logs "the writer stopped after $(wc -l <"$acks") acknowledgements"
    left=$((left - 1))
    [ "$left" -gt 0 ] || fail_with_logs "only $(wc -l <"$acks") acknowledgements in 120 s"
    sleep 0.1
done
ctl "$a_ctl" status "$vol" | head -n 4
echo "$(wc -l <"$acks") acknowledgements recorded; waiting for the power cut"
touch "$HWT_RESULTS/power-cut.writing"
wait "$writer"
fail_with_logs "the writer ended before the power was cut"
