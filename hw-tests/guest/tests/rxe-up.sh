# The soft-RoCE device is up: rdma and libibverbs both see rxe0, its port is active and it
# has a RoCE GID for the address of its netdev.
. "$HWT_REPO/hw-tests/guest/lib.sh"
hwt_need rxe
set -x
rdma link show "$HWT_RXE_DEV/1" | tee link.txt || hwt_fail "rdma link show $HWT_RXE_DEV/1 failed"
grep -q "state ACTIVE" link.txt || hwt_fail "$HWT_RXE_DEV port 1 is not ACTIVE: $(cat link.txt)"
grep -q "netdev $HWT_RXE_NETDEV" link.txt || hwt_fail "$HWT_RXE_DEV is not on $HWT_RXE_NETDEV"
ibv_devices | tee devices.txt || hwt_fail "ibv_devices failed"
grep -qw "$HWT_RXE_DEV" devices.txt || hwt_fail "ibv_devices does not list $HWT_RXE_DEV"
ibv_devinfo -v -d "$HWT_RXE_DEV" | tee devinfo.txt || hwt_fail "ibv_devinfo -d $HWT_RXE_DEV failed"
grep -q "PORT_ACTIVE" devinfo.txt || hwt_fail "libibverbs sees $HWT_RXE_DEV's port as not active"
# The IPv4-mapped GID of veth0's address (::ffff:10.77.0.1) must be in the GID table.
grep -qi "ffff:$HWT_RXE_ADDR\|ffff:0a4d:0001" devinfo.txt || hwt_fail "no GID for $HWT_RXE_ADDR on $HWT_RXE_DEV"
hwt_detail "$HWT_RXE_DEV ACTIVE on $HWT_RXE_NETDEV ($HWT_RXE_ADDR), seen by rdma and libibverbs"
