# Log files on the emulated NVDIMM: both nodes' NVRAM (the source's NVLog, the
# destination's per-source log files) on the DAX mount, `dax:` mode (MAP_SYNC mappings,
# cache-line write-back + fence), through the whole quickstart over TCP: mirror, checked
# writes, SIGKILL of the source, failover, every acknowledged write verified. Over RDMA
# the destination does not offer placement into file-DAX log files (the kernel refuses to
# pin fsdax pages for a device: ibv_reg_mr fails with EOPNOTSUPP), and says so.
. "$HWT_REPO/hw-tests/guest/lib.sh"
hwt_need pmem
hwt_need rxe
bin="$HWT_BIN/../rdma/release/nvmirror"
[ -x "$bin" ] || hwt_fail "no RDMA build at $bin"
run() { # transport
    keep=/var/tmp/dax-mirror-$1
    nv="$HWT_PMEM_MNT/dax-mirror-$1"
    rm -rf "$keep" "$nv" && mkdir -p "$keep" "$nv"
    set +e
    out=$(TMPDIR=$keep timeout 300 "$bin" quickstart --transport "$1" --host "$HWT_RXE_ADDR" --size 16M \
        --writes 2000 --nvram "dax:$nv" --keep 2>&1)
    rc=$?
    set -e
    echo "$out"
}
run tcp
if [ "$rc" -ne 0 ]; then
    hwt_quickstart_logs "$keep"
    hwt_fail "quickstart over tcp with dax: log files failed (exit $rc)"
fi
grep -q "site-b: .*nvram dax:$nv/site-b" <<<"$out" || hwt_fail "site-b's NVRAM is not the dax: mount"
logs=$(find "$nv/site-b/mirrors" -name 'log.*' | wc -l)
[ "$logs" -ge 2 ] || hwt_fail "no log files of the mirror under $nv/site-b/mirrors"
grep -q "^OK: no acknowledged write was lost" <<<"$out" || hwt_fail "no verification line"
p50=$(grep "ack latency" <<<"$out" | sed -n 's/.*p50 \([0-9.]*\) us.*/\1/p')
hwt_figure dax_mirror_tcp_ack_p50_us "$p50"
rm -rf "$nv"
run rdma
[ "$rc" -ne 0 ] || hwt_fail "quickstart over rdma into file-DAX log files passed: the refusal is stale, update this test"
grep -q "offers no RDMA engine" <<<"$out" || hwt_fail "the pairing over rdma did not say the peer offers no RDMA"
grep -q "RDMA not offered: dax: log files are filesystem-DAX mappings" "$keep"/*/site-b.log ||
    hwt_fail "site-b did not say why it offers no RDMA"
rm -rf "$nv"
hwt_detail "tcp: $logs mirror log files on DAX, failover verified, ack p50 $p50 us; rdma into fsdax log files refused with the reason"
