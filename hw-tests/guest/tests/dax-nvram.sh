# The dax: NVRAM mode on the emulated NVDIMM's DAX mount (MAP_SYNC, cache-line write-back),
# refused off DAX, and an NVLog round trip over it: hw-tests/src/bin/hw-dax-nvram.rs.
. "$HWT_REPO/hw-tests/guest/lib.sh"
hwt_need pmem
grep " $HWT_PMEM_MNT " /proc/mounts
# Which cache-line write-back the dax mode can use here (QEMU's -cpu max offers clwb).
echo "cache flush instructions offered: $(grep -m1 -ow -e clwb -e clflushopt -e clflush /proc/cpuinfo | sort -u | tr '\n' ' ')"
dir="$HWT_PMEM_MNT/hw-dax-nvram"
mkdir -p "$dir" /var/tmp/hw-dax-nvram
# Off DAX: the overlay root (tmpfs above the 9p host root) and a plain tmpfs.
"$HWT_BIN/hw-dax-nvram" --dax-dir "$dir" --plain-dir /var/tmp/hw-dax-nvram --plain-dir /dev/shm
