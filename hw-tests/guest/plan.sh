#!/bin/bash
# The guest's test plan, run by the initramfs's /init inside the chroot (the overlay above
# the host root). $1 is the results share. Brings up the devices (setup.sh), then runs
# every test the host planned ($1/plan, one name a line) from tests/NAME.sh, each under
# a time limit, and writes $1/NAME.result for each. Exits with the number of failed tests.
set -u
export HWT_RESULTS=$1
# shellcheck source=/dev/null
. "$HWT_RESULTS/hwt.env"
export HWT_REPO HWT_BIN HWT_TEST_TIMEOUT HWT_POWER_CUT_MODE HWT_POWER_CUT_WRITES_BEFORE
export HWT_STATE=/run/hwt-state
mkdir -p "$HWT_STATE"
. "$HWT_REPO/hw-tests/guest/lib.sh"
. "$HWT_REPO/hw-tests/guest/setup.sh"

echo "hwt-plan: kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ { print int($2 / 1024) " MiB" }' /proc/meminfo), up $(cut -d" " -f1 /proc/uptime) s"
# A boot of the power-cut test brings up its own drives, and none of these.
for step in ${HWT_SETUP_STEPS-rxe nvme pmem}; do
    hwt_setup_step "$step"
done

# Writes $HWT_RESULTS/NAME.result: header lines KEY=VALUE, then the output's tail.
write_result() {
    local name=$1 rc=$2 seconds=$3 out=$4 status=fail
    [ "$rc" -eq 0 ] && status=pass
    {
        echo "name=$name"
        echo "status=$status"
        echo "exit=$rc"
        echo "seconds=$seconds"
        echo "detail=$(grep '^hwt-detail: ' "$out" | tail -n 1 | sed 's/^hwt-detail: //')"
        grep '^hwt-figure: ' "$out" | sed 's/^hwt-figure: /figure./'
        echo "--- output tail ---"
        tail -n 40 "$out"
    } >"$HWT_RESULTS/$name.result.tmp"
    mv "$HWT_RESULTS/$name.result.tmp" "$HWT_RESULTS/$name.result"
}

failed=0
while read -r name; do
    case "$name" in '' | '#'*) continue ;; esac
    script="$HWT_REPO/hw-tests/guest/tests/$name.sh"
    out="$HWT_RESULTS/$name.out"
    echo "hwt-plan: test $name"
    started=$(date +%s.%N)
    rc=0
    if [ -f "$script" ]; then
        work=$(mktemp -d "/tmp/hwt-$name.XXXXXX")
        (cd "$work" && exec timeout -k 5 "${HWT_TEST_TIMEOUT:-180}" bash "$script") >"$out" 2>&1 </dev/null || rc=$?
        [ "$rc" -eq 124 ] && echo "timed out after ${HWT_TEST_TIMEOUT:-180} s" >>"$out"
    else
        echo "no test script $script" >"$out"
        rc=127
    fi
    write_result "$name" "$rc" "$(hwt_since "$started")" "$out"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
    echo "hwt-plan: test $name exit $rc"
done <"$HWT_RESULTS/plan"
dmesg >"$HWT_RESULTS/dmesg.txt" 2>&1
echo "hwt-plan: done, $failed failed, up $(cut -d" " -f1 /proc/uptime) s"
exit "$failed"
