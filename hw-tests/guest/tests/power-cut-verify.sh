# The power-cut test's second boot (hw-tests/power-cut.sh), on the drives the first left
# behind: the file systems mounted (their journals replayed), both nodes started on what
# their drives hold, site-a's volume back in sync with its mirror, every acknowledged write
# read back from it; then site-a killed, the mirror failed over on site-b, and every
# acknowledged write read back from the promoted mirror. Prints `hwt-figure:` lines
# with the counts of both checks; exits 1 if a write was lost or torn, or the volume did
# not come back.
. "$HWT_REPO/hw-tests/guest/power-cut/lib.sh"
trap '[ -n "$a_pid" ] && kill -9 "$a_pid" 2>/dev/null; [ -n "$b_pid" ] && kill -9 "$b_pid" 2>/dev/null' EXIT
pc_devices
pc_mount
echo "acknowledgements recorded before the cut: $(wc -l <"$acks")"
hwt_figure acked_writes "$(wc -l <"$acks")"
pc_start_nodes
left=1200
until ctl "$a_ctl" status "$vol" 2>/dev/null | grep -q "^$vol  *primary  *in-sync "; do
    left=$((left - 1))
    if [ "$left" -le 0 ]; then
        ctl "$a_ctl" status "$vol"
        fail_with_logs "site-a's volume did not come back in sync within 120 s"
    fi
    sleep 0.1
done
ctl "$a_ctl" status "$vol" | head -n 4
rc=0
check() { # where nbd-port
    local out
    out=$("$HWT_BIN/hw-power-cut" verify "$host:$2" "$vol" "$blocks" "$acks") || rc=1
    echo "$1: $out"
    local key
    for key in lost torn newer; do
        hwt_figure "$1_${key}_blocks" "$(echo "$out" | head -n 1 | sed -n "s/.* $key=\([0-9]*\).*/\1/p")"
    done
}
check primary "$a_nbd_port"
kill -9 "$a_pid"
wait "$a_pid" 2>/dev/null
a_pid=
ctl "$b_ctl" failover "$vol" || fail_with_logs "failover on site-b failed"
check failover "$b_nbd_port"
[ "$rc" = 0 ] || fail_with_logs "acknowledged writes lost or torn under $mode: logs"
hwt_detail "$mode: every acknowledged write there, on the restarted primary and after failover"
