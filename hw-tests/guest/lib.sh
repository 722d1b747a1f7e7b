# Shared by the guest's plan and its tests (bash, inside the guest's chroot).
#
# Environment (set by plan.sh from the host's hwt.env):
#   HWT_REPO     the repository, at the same path as on the host (read-only)
#   HWT_BIN      the host's release build directory (the test programs)
#   HWT_RESULTS  the writable results share
#   HWT_STATE    guest-local state: one NAME.ok file per piece of setup that succeeded
#
# A test prints `hwt-detail: TEXT` (the last one becomes its one-line summary on the host)
# and `hwt-figure: KEY=VALUE` (measured figures, reported on the host) and exits 0 to pass.

# shellcheck disable=SC2034 # the names below are for the scripts that source this file

# The rxe device and the address its netdev carries.
HWT_RXE_DEV=rxe0
HWT_RXE_NETDEV=veth0
HWT_RXE_ADDR=10.77.0.1
HWT_RXE_PEER_ADDR=10.77.0.2
# The DAX mount of the emulated NVDIMM.
HWT_PMEM_MNT=/mnt/pm
# The emulated NVMe namespace: block device and passthrough char device.
HWT_NVME_BLK=/dev/nvme0n1
HWT_NVME_CHR=/dev/ng0n1

set -o pipefail

hwt_detail() { echo "hwt-detail: $*"; }
hwt_figure() { echo "hwt-figure: $1=$2"; }
hwt_fail() {
    echo "FAIL: $*"
    hwt_detail "$*"
    exit 1
}

# Fails the calling test, with the setup's log, unless setup step $1 succeeded.
hwt_need() {
    if [ ! -e "$HWT_STATE/$1.ok" ]; then
        echo "setup step '$1' failed; its log:"
        sed 's/^/  | /' "$HWT_RESULTS/setup-$1.log" 2>/dev/null | tail -n 30
        hwt_fail "setup step '$1' failed (see setup-$1.log)"
    fi
}

# Prints the last lines of each of the logs $2... that exists, then fails with $1.
hwt_fail_with_logs() {
    local why=$1 log
    shift
    for log in "$@"; do
        [ -e "$log" ] || continue
        echo "--- $log"
        tail -n 30 "$log"
    done
    hwt_fail "$why"
}

# Waits up to $2 seconds (default 10) for a device node or file $1.
hwt_wait_for() {
    local path=$1 left=$((${2:-10} * 10))
    while [ ! -e "$path" ] && [ "$left" -gt 0 ]; do
        sleep 0.1
        left=$((left - 1))
    done
    [ -e "$path" ]
}

# Waits up to $2 seconds for a TCP listener on port $1 opened by process $3.
hwt_wait_listen() {
    local port=$1 left=$((${2:-20} * 10)) pid=$3
    while [ "$left" -gt 0 ]; do
        ss -Hltn "sport = :$port" | grep -q . && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
        left=$((left - 1))
    done
    return 1
}

# Runs perftest latency tool $1 (as hwt_perftest_lat) for 2-byte and 4 KiB messages, on
# TCP ports from $2 on, and gives both in the test's detail line.
hwt_perftest_lat_sizes() {
    local tool=$1 port=$2 size summary=()
    for size in 2 4096; do
        hwt_perftest_lat "$tool" "$size" "${HWT_PERFTEST_ITERS:-1000}" "$port"
        summary+=("$HWT_LAST_LAT")
        port=$((port + 1))
    done
    hwt_detail "$tool ${summary[0]}; ${summary[1]}"
}

# Prints the last 30 lines of each node's log that a quickstart run with --keep left
# under $1.
hwt_quickstart_logs() {
    local log
    for log in "$1"/*/*.log; do
        [ -e "$log" ] || continue
        echo "--- $log"
        tail -n 30 "$log"
    done
}

# Runs perftest tool $1 as a server, then as its client, on the one rxe device and TCP
# port $2, with the tool's arguments after $3; the client's output goes to file $3 and is
# printed. Fails the test if either side fails.
hwt_perftest_pair() {
    local tool=$1 port=$2 client_log=$3
    shift 3
    local server_log
    server_log=$(mktemp)
    echo "== $tool $*: server"
    timeout --foreground 120 "$tool" "$@" -p "$port" >"$server_log" 2>&1 &
    local server=$!
    if ! hwt_wait_listen "$port" 20 "$server"; then
        kill "$server" 2>/dev/null
        cat "$server_log"
        hwt_fail "$tool server did not listen on port $port: $(grep -v '^ *$' "$server_log" | head -n 1)"
    fi
    echo "== $tool $*: client to $HWT_RXE_ADDR"
    local rc=0 src=0
    timeout --foreground 120 "$tool" "$@" -p "$port" "$HWT_RXE_ADDR" >"$client_log" 2>&1 || rc=$?
    wait "$server" || src=$?
    cat "$client_log"
    if [ "$rc" -ne 0 ] || [ "$src" -ne 0 ]; then
        echo "== server output"
        cat "$server_log"
        hwt_fail "$tool $*: client exit $rc, server exit $src"
    fi
    rm -f "$server_log"
}

# Runs a perftest latency tool ($1: ib_write_lat, ib_read_lat) between a server and a
# client on the one rxe device (two rxe devices in one namespace hang), message size $2
# bytes, $3 iterations, TCP port $4 for perftest's own exchange. Prints the client's
# output and the figures NAME_SIZEB_{typical,avg,p99,p999}_us.
hwt_perftest_lat() {
    local tool=$1 size=$2 iters=$3 port=$4
    local client_log
    client_log=$(mktemp)
    hwt_perftest_pair "$tool" "$port" "$client_log" -d "$HWT_RXE_DEV" -s "$size" -n "$iters" -F
    # The result line follows the header naming t_typical: bytes, iterations, t_min, t_max,
    # t_typical, t_avg, t_stdev, 99%, 99.9% (microseconds).
    local line
    line=$(awk -v size="$size" '/t_typical/ { hdr = 1; next } hdr && $1 == size { print; exit }' "$client_log")
    [ -n "$line" ] || hwt_fail "$tool -s $size: no result line in the client's output"
    local f
    read -r -a f <<<"$line"
    [ "${#f[@]}" -ge 9 ] || hwt_fail "$tool -s $size: result line has ${#f[@]} fields: $line"
    local key="${tool}_${size}B"
    hwt_figure "${key}_typical_us" "${f[4]}"
    hwt_figure "${key}_avg_us" "${f[5]}"
    hwt_figure "${key}_p99_us" "${f[7]}"
    hwt_figure "${key}_p999_us" "${f[8]}"
    # For the caller's one-line summary.
    HWT_LAST_LAT="${size} B: typical ${f[4]} us, p99 ${f[7]} us"
    rm -f "$client_log"
}

# Writes file $4 (under the mount point $1) of $5 bytes of random data, fsyncs it and its
# directory, then appends `SHA256  PATH-UNDER-$1` to $2: every line names a file whose
# fsync returned, which must survive. $3 is a scratch directory off that filesystem.
hwt_write_synced() {
    local mnt=$1 acked=$2 scratch=$3 path=$4 bytes=$5 tmp
    tmp=$scratch/src.$BASHPID.${path##*/}
    head -c "$bytes" /dev/urandom >"$tmp" || return 1
    dd if="$tmp" of="$path" bs=64K conv=fsync status=none 2>/dev/null || { rm -f "$tmp"; return 1; }
    sync "$(dirname "$path")" 2>/dev/null || { rm -f "$tmp"; return 1; }
    echo "$(sha256sum "$tmp" | cut -d' ' -f1)  ${path#"$mnt"/}" >>"$acked"
    rm -f "$tmp"
}

# Seconds since $1 (a `date +%s.%N` stamp), one decimal.
hwt_since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# Runs perftest's ib_write_bw between a server and a client on the one rxe device: message
# size $1 bytes, $2 iterations, TCP port $3, tx depth $4. Prints the client's output, the
# figure ib_write_bw_SIZEB_qdDEPTH_msg_per_s, and sets HWT_LAST_RATE (messages per second).
hwt_perftest_bw() {
    local size=$1 iters=$2 port=$3 depth=$4
    local client_log
    client_log=$(mktemp)
    hwt_perftest_pair ib_write_bw "$port" "$client_log" -d "$HWT_RXE_DEV" -s "$size" -n "$iters" -t "$depth" -F
    # The result line: bytes, iterations, BW peak, BW average (MB/s), MsgRate (Mpps).
    local line
    line=$(awk -v size="$size" '/MsgRate/ { hdr = 1; next } hdr && $1 == size { print; exit }' "$client_log")
    [ -n "$line" ] || hwt_fail "ib_write_bw -s $size: no result line"
    local f
    read -r -a f <<<"$line"
    HWT_LAST_RATE=$(awk -v m="${f[4]}" 'BEGIN { printf "%.0f", m * 1000000 }')
    hwt_figure "ib_write_bw_${size}B_qd${depth}_msg_per_s" "$HWT_LAST_RATE"
    rm -f "$client_log"
}
