# perftest ib_write_lat over rxe0 (server and client on the one device): the latency floor
# of a one-sided RDMA WRITE, for 2-byte and 4 KiB messages.
. "$HWT_REPO/hw-tests/guest/lib.sh"
hwt_need rxe
summary=()
port=18601
for size in 2 4096; do
    hwt_perftest_lat ib_write_lat "$size" "${HWT_PERFTEST_ITERS:-1000}" "$port"
    summary+=("$HWT_LAST_LAT")
    port=$((port + 1))
done
hwt_detail "ib_write_lat ${summary[0]}; ${summary[1]}"
