# perftest ib_read_lat over rxe0 (server and client on the one device): the latency floor
# of a one-sided RDMA READ, for 2-byte and 4 KiB messages. One READ round trip is the
# floor of the RDMA engine's read-after-write durable append.
. "$HWT_REPO/hw-tests/guest/lib.sh"
hwt_need rxe
hwt_perftest_lat_sizes ib_read_lat 18611
