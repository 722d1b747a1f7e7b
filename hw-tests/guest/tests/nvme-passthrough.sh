# The NVMe passthrough engine (io_uring uring_cmd on /dev/ngXnY): batches written through
# it read back equal through it and through the block device (O_DIRECT, io_uring), and the
# other way round; flushes succeed; bad requests are refused clearly; 4 KiB write and read
# figures (qd1, batches of 32) against io_uring on the block device; a RAID-4 volume over
# four namespaces through the engine, scrubbed and read degraded
# (hw-tests/src/bin/hw-nvme-engine.rs).
. "$HWT_REPO/hw-tests/guest/lib.sh"
hwt_need nvme
raid=/dev/ng0n1,/dev/ng1n1,/dev/ng2n1,/dev/ng3n1
out=$("$HWT_BIN/hw-nvme-engine" --chr "$HWT_NVME_CHR" --blk "$HWT_NVME_BLK" --raid "$raid" 2>&1) ||
    { echo "$out"; hwt_fail "hw-nvme-engine failed"; }
echo "$out"
[ "$(grep -c '^hwt-check:' <<<"$out")" -eq 4 ] || hwt_fail "not every check ran"
fig() { sed -n "s/^hwt-figure: $1=//p" <<<"$out"; }
hwt_detail "passthrough and io_uring round trips equal, flushes succeed, bad requests refused; RAID-4 over 4 namespaces clean and degraded-readable; 4 KiB write qd1 p50 passthrough $(fig nvme_passthrough_write_4k_qd1_p50_us) us, io_uring $(fig uring_blockdev_write_4k_qd1_p50_us) us; batch32 $(fig nvme_passthrough_write_4k_batch32_iops) vs $(fig uring_blockdev_write_4k_batch32_iops) IOPS"
