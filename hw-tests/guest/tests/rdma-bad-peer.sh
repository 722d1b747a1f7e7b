# A destination presenting wrong memory keys, addresses outside its registration, a
# region shorter than it claims, a wrong size, or a source with a stale epoch: the RDMA
# link set-up is refused with a clear error naming the log file and the device's status,
# and nothing is placed (hw-tests/src/bin/hw-rdma-bad-peer.rs). An honest destination in
# the same program connects, so the refusals are not the rig failing.
. "$HWT_REPO/hw-tests/guest/lib.sh"
hwt_need rxe
bin="$HWT_BIN/../rdma/release/hw-rdma-bad-peer"
[ -x "$bin" ] || hwt_fail "no RDMA build at $bin"
dir=/var/tmp/rdma-bad-peer
rm -rf "$dir"
out=$("$bin" --addr "$HWT_RXE_ADDR" --port 18900 --dir "$dir" 2>&1) || { echo "$out"; hwt_fail "hw-rdma-bad-peer failed"; }
echo "$out"
[ "$(grep -c '^hwt-check: .*refused' <<<"$out")" -eq 5 ] || hwt_fail "not every bad peer was refused"
grep -q '^hwt-check: honest: connected' <<<"$out" || hwt_fail "the honest destination did not connect"
rm -rf "$dir"
hwt_detail "wrong key, address, size, region beyond registration and stale epoch refused at set-up; honest peer connected"
