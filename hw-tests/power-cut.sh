# hw-tests/power-cut.sh: the power-cut test, driven from the host (sourced by hw-tests/run,
# which sets QEMU_BASE, BIN, TMP and TEST_TIMEOUT and defines hwt_env).
#
# For each NVRAM mode, direct: and then file:, two guest boots on the same two NVMe drive
# images (one per node, serials pc-a and pc-b; QEMU's default cache=writeback, which
# passes the guest's flushes and FUA writes on to the host file):
#
# 1. guest/tests/power-cut-write.sh: both nodes, a mirrored volume, the checked writer;
#    once it has recorded enough acknowledgements on the results share, the host kills
#    QEMU with SIGKILL, 0.2 to 1.5 s later, while writes are in flight. What the guest held
#    in memory (its page cache, the processes) is gone; what its drives completed is in
#    the image files.
# 2. guest/tests/power-cut-verify.sh: the same drives, the nodes restarted, every recorded
#    acknowledgement read back from the primary, then from the mirror after a failover.
#
# The test passes when direct: loses nothing. file: (whose log lives in the page cache)
# is run the same way and what it loses is reported beside it: that the same check finds
# losses there shows it can fail.
#
# power_cut_test RESULTS: writes RESULTS/power-cut.result (and .out) as a guest test would.
# Runs under hw-tests/run's `set -euo pipefail`: every step that may fail is tested.

PC_IMAGE_BYTES=$((256 << 20))

# One boot: power_cut_boot DIR CUT(yes|no) CONSOLE. With CUT=yes, kills QEMU once the
# guest has written DIR/power-cut.writing. Returns 0 when the boot ended as planned
# (killed, or powered off by itself), 1 past the time limit.
power_cut_boot() {
    local dir=$1 cut=$2 console=$3 pid left=$((TEST_TIMEOUT * 5))
    rm -f "$dir/booted" "$dir/guest-exit" "$dir/init-failed" "$dir/power-cut.writing"
    nice -n 10 qemu-system-x86_64 "${QEMU_BASE[@]}" \
        -virtfs "local,path=$dir,mount_tag=results,security_model=none" \
        -drive "file=$dir/pc-a.img,if=none,id=pca,format=raw" -device nvme,serial=pc-a,drive=pca \
        -drive "file=$dir/pc-b.img,if=none,id=pcb,format=raw" -device nvme,serial=pc-b,drive=pcb \
        </dev/null >"$console" 2>&1 &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$cut" = yes ] && [ -e "$dir/power-cut.writing" ]; then
            sleep "$(awk -v r="$RANDOM" 'BEGIN { printf "%.2f", 0.2 + 1.3 * r / 32767 }')"
            kill -KILL "$pid"
            wait "$pid" 2>/dev/null
            return 0
        fi
        left=$((left - 1))
        if [ "$left" -le 0 ]; then
            kill -KILL "$pid"
            wait "$pid" 2>/dev/null
            return 1
        fi
        sleep 0.2
    done
    wait "$pid" 2>/dev/null
    [ "$cut" = no ]
}

# One mode's two boots; prints what happened, and leaves DIR/power-cut-verify.result.
power_cut_mode() {
    local mode=$1 dir=$2
    mkdir -p "$dir"
    truncate -s "$PC_IMAGE_BYTES" "$dir/pc-a.img" "$dir/pc-b.img"
    {
        hwt_env
        printf 'HWT_SETUP_STEPS=\n'
        printf 'HWT_POWER_CUT_MODE=%q\n' "$mode"
    } >"$dir/hwt.env"
    echo power-cut-write >"$dir/plan"
    if ! power_cut_boot "$dir" yes "$dir/console-write.log"; then
        echo "$mode: the first boot ran past ${TEST_TIMEOUT} s before the writer was under way"
        return 1
    fi
    if [ ! -e "$dir/power-cut.writing" ]; then
        echo "$mode: the first boot ended before the writer was under way:"
        sed -n '/^--- output tail ---$/,$p' "$dir/power-cut-write.result" 2>/dev/null | tail -n 30
        tail -n 20 "$dir/console-write.log" | tr -d '\r'
        return 1
    fi
    echo "$mode: power cut with $(wc -l <"$dir/power-cut.acks") acknowledgements recorded"
    echo power-cut-verify >"$dir/plan"
    if ! power_cut_boot "$dir" no "$dir/console-verify.log"; then
        echo "$mode: the second boot ran past ${TEST_TIMEOUT} s"
    fi
    if [ ! -e "$dir/power-cut-verify.result" ]; then
        echo "$mode: the second boot left no result"
        tail -n 20 "$dir/console-verify.log" | tr -d '\r'
        return 1
    fi
    sed -n '/^--- output tail ---$/,$p' "$dir/power-cut-verify.result" | tail -n +2
    grep -q '^status=pass$' "$dir/power-cut-verify.result"
}

power_cut_test() {
    local results=$1 started=$SECONDS rc=0 out=$1/power-cut.out mode figures detail
    : >"$out"
    figures=()
    for mode in direct file; do
        local mode_rc=0
        power_cut_mode "$mode" "$TMP/power-cut-$mode" >>"$out" 2>&1 || mode_rc=$?
        local r=$TMP/power-cut-$mode/power-cut-verify.result
        if [ -e "$r" ]; then
            while IFS= read -r line; do figures+=("figure.${mode}_${line#figure.}"); done < <(grep '^figure\.' "$r")
        fi
        for f in "$TMP/power-cut-$mode"/console-*.log "$TMP/power-cut-$mode"/power-cut-*.out; do
            [ -e "$f" ] && cp "$f" "$results/power-cut-$mode-${f##*/}"
        done
        if [ "$mode" = direct ] && [ "$mode_rc" != 0 ]; then
            rc=1
        fi
    done
    fig() { printf '%s\n' "${figures[@]}" | sed -n "s/^figure\.$1=//p" | head -n 1; }
    detail=
    for mode in direct file; do
        detail+="${detail:+; }$mode: $(fig "${mode}_acked_writes") acknowledged writes, "
        if [ -n "$(fig "${mode}_failover_lost_blocks")" ]; then
            detail+="blocks without their last acknowledged write: $(fig "${mode}_primary_lost_blocks") on the restarted primary, $(fig "${mode}_failover_lost_blocks") after failover"
        else
            detail+="the nodes did not come back ($(sed -n "s/^hwt-detail: //p" "$TMP/power-cut-$mode/power-cut-verify.out" 2>/dev/null | tail -n 1))"
        fi
    done
    {
        echo "name=power-cut"
        if [ "$rc" = 0 ]; then echo "status=pass"; else echo "status=fail"; fi
        echo "exit=$rc"
        echo "seconds=$((SECONDS - started))"
        echo "detail=$detail"
        printf '%s\n' "${figures[@]}"
        echo "--- output tail ---"
        tail -n 60 "$out"
    } >"$results/power-cut.result"
}
