# The RDMA engine's durable append of a 4 KiB entry at queue depth 1 (WRITE + READ after
# it, through the real link and the real destination: hw-tests/src/bin/hw-rdma-hop.rs),
# interleaved five times (HWT_HOP_ROUNDS) with its floor, perftest's ib_read_lat of 4 KiB on the same rxe
# device; each round ends with a torn placement (the last entry of a batch only partly
# placed) that failover must replay up to, never past. Reports both medians and their ratio; the ratio is a figure, not a pass
# condition (benches/README.md holds the target and the latest figures).
. "$HWT_REPO/hw-tests/guest/lib.sh"
hwt_need rxe
bin="$HWT_BIN/../rdma/release/hw-rdma-hop"
[ -x "$bin" ] || hwt_fail "no RDMA build at $bin"
ours=()
floor=()
port=18700
for round in $(seq "${HWT_HOP_ROUNDS:-5}"); do
    hwt_perftest_lat ib_read_lat 4096 "${HWT_PERFTEST_ITERS:-1000}" "$port"
    floor+=("$(sed -n 's/.*typical \([0-9.]*\) us.*/\1/p' <<<"$HWT_LAST_LAT")")
    port=$((port + 1))
    dir=/var/tmp/rdma-hop-$round
    out=$("$bin" --addr "$HWT_RXE_ADDR:$port" --dir "$dir" --ops "${HWT_PERFTEST_ITERS:-1000}" 2>&1) ||
        { echo "$out"; hwt_fail "hw-rdma-hop round $round failed"; }
    echo "$out"
    grep -q "^torn placement: 9 whole entries replayed" <<<"$out" || hwt_fail "round $round: no torn-placement check"
    ours+=("$(sed -n 's/^hwt-figure: rdma_append_4096B_p50_us=//p' <<<"$out")")
    rm -rf "$dir"
    port=$((port + 1))
done
median() { printf '%s\n' "$@" | sort -g | sed -n "$((($# + 1) / 2))p"; }
o=$(median "${ours[@]}")
f=$(median "${floor[@]}")
ratio=$(awk -v o="$o" -v f="$f" 'BEGIN { printf "%.2f", o / f }')
hwt_figure rdma_append_median_of_rounds_us "$o"
hwt_figure ib_read_lat_4096B_median_of_rounds_us "$f"
hwt_figure rdma_append_vs_ib_read_lat_ratio "$ratio"
# Batching at queue depth 32: entries per second against ib_write_bw's message rate for
# 4 KiB at the same depth, five interleaved rounds, medians; each round also runs the
# engine copying every batch through its staging ring (--staging), the path it takes where
# the NVLog cannot be registered.
ours32=()
staged32=()
floor32=()
for round in $(seq "${HWT_HOP_ROUNDS:-5}"); do
    hwt_perftest_bw 4096 5000 "$port" 32
    floor32+=("$HWT_LAST_RATE")
    port=$((port + 1))
    for how in "" --staging; do
        dir=/var/tmp/rdma-hop32-$round
        out=$("$bin" --addr "$HWT_RXE_ADDR:$port" --dir "$dir" --ops 6000 --qd 32 $how 2>&1) ||
            { echo "$out"; hwt_fail "hw-rdma-hop --qd 32 $how round $round failed"; }
        echo "$out"
        if [ -z "$how" ]; then
            ours32+=("$(sed -n 's/^hwt-figure: rdma_append_4096B_qd32_entries_per_s=//p' <<<"$out")")
        else
            staged32+=("$(sed -n 's/^hwt-figure: rdma_append_4096B_qd32_staging_entries_per_s=//p' <<<"$out")")
        fi
        rm -rf "$dir"
        port=$((port + 1))
    done
done
o32=$(median "${ours32[@]}")
s32=$(median "${staged32[@]}")
f32=$(median "${floor32[@]}")
ratio32=$(awk -v o="$o32" -v f="$f32" 'BEGIN { printf "%.2f", o / f }')
ratio32s=$(awk -v o="$s32" -v f="$f32" 'BEGIN { printf "%.2f", o / f }')
hwt_figure rdma_append_qd32_median_entries_per_s "$o32"
hwt_figure rdma_append_qd32_staging_median_entries_per_s "$s32"
hwt_figure ib_write_bw_4096B_qd32_median_msg_per_s "$f32"
hwt_figure rdma_append_qd32_vs_ib_write_bw_ratio "$ratio32"
hwt_figure rdma_append_qd32_staging_vs_ib_write_bw_ratio "$ratio32s"
hwt_detail "durable append 4 KiB qd1: p50 $o us (rounds ${ours[*]}); ib_read_lat 4 KiB typical $f us (rounds ${floor[*]}); ratio $ratio (target <= 1.3); qd32: $o32 entries/s (rounds ${ours32[*]}; through the staging ring $s32) vs ib_write_bw $f32 msg/s (rounds ${floor32[*]}), ratio $ratio32 (staging $ratio32s; target >= 0.7)"
