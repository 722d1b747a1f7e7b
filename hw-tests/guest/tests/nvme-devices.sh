# The emulated NVMe drive: the block device and the passthrough char device exist, and
# blocks written with O_DIRECT through the block device read back the same. (This does
# not test the NVMe passthrough engine; that test comes with the engine.)
. "$HWT_REPO/hw-tests/guest/lib.sh"
hwt_need nvme
[ -b "$HWT_NVME_BLK" ] || hwt_fail "$HWT_NVME_BLK is not a block device"
[ -c "$HWT_NVME_CHR" ] || hwt_fail "$HWT_NVME_CHR is not a char device"
ls -l "$HWT_NVME_BLK" "$HWT_NVME_CHR"
lbs=$(cat /sys/block/nvme0n1/queue/logical_block_size)
size=$(($(cat /sys/block/nvme0n1/size) * 512))
echo "logical block $lbs B, namespace $size B, model $(cat /sys/block/nvme0n1/device/model 2>/dev/null)"
blocks=16
bs=4096
seek=100 # in 4 KiB blocks: away from block 0
head -c $((blocks * bs)) /dev/urandom >pattern
dd if=pattern of="$HWT_NVME_BLK" bs=$bs seek=$seek count=$blocks oflag=direct conv=fsync,notrunc status=none ||
    hwt_fail "O_DIRECT write to $HWT_NVME_BLK failed"
echo 3 >/proc/sys/vm/drop_caches
dd if="$HWT_NVME_BLK" of=readback bs=$bs skip=$seek count=$blocks iflag=direct status=none ||
    hwt_fail "O_DIRECT read from $HWT_NVME_BLK failed"
cmp pattern readback || hwt_fail "$blocks blocks read back from $HWT_NVME_BLK differ from those written"
# A second pattern over the first, so that a stale read could not pass.
head -c $((blocks * bs)) /dev/urandom >pattern2
dd if=pattern2 of="$HWT_NVME_BLK" bs=$bs seek=$seek count=$blocks oflag=direct conv=notrunc status=none ||
    hwt_fail "second O_DIRECT write failed"
dd if="$HWT_NVME_BLK" of=readback2 bs=$bs skip=$seek count=$blocks iflag=direct status=none ||
    hwt_fail "second O_DIRECT read failed"
cmp pattern2 readback2 || hwt_fail "the rewritten blocks read back wrong"
hwt_detail "$HWT_NVME_BLK ($((size >> 20)) MiB, ${lbs} B blocks) and $HWT_NVME_CHR present; $blocks x 4 KiB O_DIRECT write/read round trip twice"
