# The whole promise over the RDMA engine: two nodes in the guest replicating over rxe0
# (one-sided RDMA WRITE into the destination's registered log files, READ-after-WRITE
# durability), checked writes through NBD, the source killed with SIGKILL, failover, every
# acknowledged write verified. The binary is the host's `--features rdma` build.
. "$HWT_REPO/hw-tests/guest/lib.sh"
hwt_need rxe
bin="$HWT_BIN/../rdma/release/nvmirror"
[ -x "$bin" ] || hwt_fail "no RDMA build at $bin"
keep=/var/tmp/rdma-quickstart
rm -rf "$keep" && mkdir -p "$keep"
set +e
out=$(TMPDIR=$keep "$bin" quickstart --transport rdma --host "$HWT_RXE_ADDR" --size 16M --writes 2000 --keep 2>&1)
rc=$?
set -e
echo "$out"
if [ "$rc" -ne 0 ]; then
    hwt_quickstart_logs "$keep"
    hwt_fail "quickstart over rdma failed (exit $rc)"
fi
grep -q "over rdma" <<<"$out" || hwt_fail "the volume was not mirrored over rdma"
# The destination's own log says its log files were registered for RDMA placement.
grep -q "log files registered; the source places entries by RDMA" "$keep"/*/site-b.log ||
    hwt_fail "site-b never registered its log files for RDMA placement"
grep -q "^OK: no acknowledged write was lost" <<<"$out" || hwt_fail "no verification line"
# The destination says which RDMA durability it uses (RDMA FLUSH is not in rdma-core 44).
flush=$(grep -h -m1 "rdma: RDMA FLUSH" "$keep"/*/site-b.log) || hwt_fail "site-b did not say whether RDMA FLUSH is available"
echo "$flush"
line=$(grep "ack latency" <<<"$out")
p50=$(sed -n 's/.*p50 \([0-9.]*\) us.*/\1/p' <<<"$line")
p99=$(sed -n 's/.*p99 \([0-9.]*\) us.*/\1/p' <<<"$line")
hwt_figure rdma_nbd_ack_p50_us "$p50"
hwt_figure rdma_nbd_ack_p99_us "$p99"
hwt_detail "mirrored over rdma, source killed, failover verified; NBD ack p50 ${p50} us, p99 ${p99} us"
