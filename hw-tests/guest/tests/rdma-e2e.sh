# The real-process failover and fault tests of control/tests (source killed at many points,
# destination killed during CPs, fencing, hostile input, corrupted logs), run with the RDMA
# transport over rxe0: NVMIRROR_E2E_TRANSPORT=rdma, nodes replicating on the rxe address.
. "$HWT_REPO/hw-tests/guest/lib.sh"
hwt_need rxe
list="$HWT_BIN/../rdma/e2e-tests.txt"
[ -s "$list" ] || hwt_fail "no list of RDMA end-to-end test binaries at $list"
export NVMIRROR_E2E_TRANSPORT=rdma NVMIRROR_E2E_HOST="$HWT_RXE_ADDR" TMPDIR=/var/tmp
passed=0
summary=()
while read -r t; do
    [ -x "$t" ] || hwt_fail "missing test binary $t"
    name=$(basename "$t" | sed 's/-[0-9a-f]*$//')
    # The direct: NVRAM test pairs its nodes over TCP only: a node with direct: log files
    # offers no RDMA placement (and /var/tmp here is tmpfs, without O_DIRECT). It runs in
    # ./test.sh.
    out=$("$t" --test-threads 1 --skip direct_logs_keep_every_acknowledged_write 2>&1)
    rc=$?
    echo "$out" | tail -n 40
    [ "$rc" -eq 0 ] || hwt_fail "$name failed over rdma (exit $rc)"
    line=$(grep '^test result:' <<<"$out" | tail -n 1)
    n=$(sed -n 's/.* \([0-9]*\) passed.*/\1/p' <<<"$line")
    passed=$((passed + n))
    summary+=("$name: $n passed")
done <"$list"
[ "$passed" -gt 0 ] || hwt_fail "no test ran"
hwt_figure rdma_e2e_tests_passed "$passed"
hwt_detail "over rdma: ${summary[*]}"
