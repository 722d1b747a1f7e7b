# The guest's devices, brought up once before the tests (sourced by plan.sh). Each step
# runs with its output in $HWT_RESULTS/setup-STEP.log and, when it succeeds, leaves
# $HWT_STATE/STEP.ok; tests name the steps they need with `hwt_need STEP`, so a failed
# step fails its tests with its log instead of being skipped.

# Soft-RoCE: one rxe device on one end of a veth pair. The perftest client and server
# both use it and meet at the address of veth0 (two rxe devices in one network namespace
# hung in this guest).
hwt_setup_rxe() {
    # rdma_rxe asks the crypto API for "crc32" (ICRC); the on-demand load covers it too,
    # but named here it shows in the log when it is missing.
    modprobe crc32_generic
    modprobe rdma_rxe
    modprobe veth
    modprobe ib_uverbs # /dev/infiniband/uverbs*, which libibverbs opens
    ip link set lo up
    ip link add "$HWT_RXE_NETDEV" type veth peer name veth1
    ip addr add "$HWT_RXE_ADDR/24" dev "$HWT_RXE_NETDEV"
    ip addr add "$HWT_RXE_PEER_ADDR/24" dev veth1
    # The netdev MTU sets rxe's: 1500 (the default) gives a RoCE MTU of 1024; 9000, as
    # RoCE fabrics run with jumbo frames, gives 4096 (a 4 KiB transfer in one packet).
    ip link set "$HWT_RXE_NETDEV" mtu "${HWT_RXE_NETDEV_MTU:-1500}"
    ip link set veth1 mtu "${HWT_RXE_NETDEV_MTU:-1500}"
    ip link set "$HWT_RXE_NETDEV" up
    ip link set veth1 up
    rdma link add "$HWT_RXE_DEV" type rxe netdev "$HWT_RXE_NETDEV"
    hwt_wait_for /dev/infiniband/uverbs0 10
    rdma link show
}

# Emulated NVMe: the block device and the passthrough char device of namespace 1.
hwt_setup_nvme() {
    modprobe nvme
    hwt_wait_for "$HWT_NVME_BLK" 20
    hwt_wait_for "$HWT_NVME_CHR" 20
    # The three smaller drives for the RAID-4 test; which controller gets which name is
    # the kernel's choice, so they are found by size in that test.
    for i in 1 2 3; do hwt_wait_for "/dev/ng${i}n1" 20; done
    ls -l /dev/nvme* /dev/ng*
}

# Emulated NVDIMM: a labelled fsdax namespace, ext4 with 4 KiB blocks (DAX needs the
# page size; mke2fs would pick 1 KiB for a filesystem this small), mounted -o dax.
hwt_setup_pmem() {
    modprobe nfit
    modprobe nd_pmem
    modprobe dax_pmem
    modprobe ext4
    mkdir -p /run/ndctl
    ndctl list -RN
    ndctl create-namespace -f -e namespace0.0 -m fsdax
    hwt_wait_for /dev/pmem0 10
    mkfs.ext4 -F -q -b 4096 /dev/pmem0
    mkdir -p "$HWT_PMEM_MNT"
    mount -o dax /dev/pmem0 "$HWT_PMEM_MNT"
    grep " $HWT_PMEM_MNT " /proc/mounts
    grep " $HWT_PMEM_MNT " /proc/mounts | grep -q 'dax=always'
}

# Runs setup step $1 (function hwt_setup_$1) in a subshell, logging to its file.
hwt_setup_step() {
    local step=$1 started rc=0
    started=$(date +%s.%N)
    # A fresh bash, so that `set -e` holds inside the step (in a subshell on the left of
    # `||` it would be ignored).
    bash -c '. "$HWT_REPO/hw-tests/guest/lib.sh" && . "$HWT_REPO/hw-tests/guest/setup.sh" && set -ex && hwt_setup_'"$step" \
        >"$HWT_RESULTS/setup-$step.log" 2>&1 </dev/null || rc=$?
    if [ "$rc" -eq 0 ]; then
        touch "$HWT_STATE/$step.ok"
        echo "hwt-plan: setup $step ok ($(hwt_since "$started") s)"
    else
        echo "hwt-plan: setup $step FAILED (exit $rc); last lines of setup-$step.log:"
        tail -n 15 "$HWT_RESULTS/setup-$step.log" | sed 's/^/  | /'
    fi
}
