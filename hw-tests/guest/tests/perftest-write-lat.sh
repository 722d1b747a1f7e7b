# perftest ib_write_lat over rxe0 (server and client on the one device): the latency floor
# of a one-sided RDMA WRITE, for 2-byte and 4 KiB messages.
. "$HWT_REPO/hw-tests/guest/lib.sh"
hwt_need rxe
hwt_perftest_lat_sizes ib_write_lat 18601
