#!/bin/bash
# The two guests of hw-tests/pair: nvmirror against DRBD over the same virtual link. Run
# by the initramfs's /init inside the chroot (the overlay above the host root); $1 is this
# guest's results share, whose hwt.env says its role (HWT_ROLE=a or b) and the run's
# parameters. A second 9p share, tag `pair`, is common to both guests: they meet through
# flag files there, and guest a writes every measurement into it.
#
# Each guest has one virtio-net link to the other (10.88.0.1 is a, 10.88.0.2 is b) and two
# virtio disks of the same kind: /dev/vda backs DRBD, /dev/vdb nvmirror.
#
# Guest b: DRBD resource r0 up as Secondary on /dev/vda; an `nvmirror node` whose data
#   dir (the mirror's RAID-4 files, io_uring engine) is ext4 on /dev/vdb and whose NVRAM
#   (its log files) is a file on tmpfs; says b-ready, waits for a-done, takes both down.
# Guest a: waits for b-ready; DRBD r0 up, connected, the initial sync skipped (both sides
#   are blank: `new-current-uuid --clear-bitmap`), Primary: /dev/drbd0. An `nvmirror node`
#   with a volume on /dev/vdb alone (io_uring engine, no RAID), its NVLog a file on tmpfs,
#   mirrored to b over TCP; the kernel's NBD client attaches its export as /dev/nbd0.
#   Then rounds of hw-blk-lat (4 KiB random O_DIRECT writes) on /dev/drbd0 and
#   /dev/nbd0, queue depth 1 then 32, the two systems taking turns (which goes first
#   alternates round by round); a warm-up round first, thrown away. Each measurement is
#   pair/r{ROUND}-{SYSTEM}-qd{DEPTH}.json. Writes a-done, takes everything down.
#
# Progress goes to the console as `hwt-pair: ...` lines, which the host shows. Exits
# non-zero, with the reason in $1/pair-failed, when a step fails.
set -u
set -o pipefail
RESULTS=$1
# shellcheck source=/dev/null
. "$RESULTS/hwt.env"
ROLE=${HWT_ROLE:?hwt.env sets no HWT_ROLE}
PAIR=/run/pair
A_ADDR=10.88.0.1
B_ADDR=10.88.0.2
DRBD_PORT=7789
NVM_LISTEN_PORT=7100
NVM_CONTROL_PORT=7200
NVM_NBD_PORT=10809
VOL=bench
work=/run/nvm
node_pid=

say() { echo "hwt-pair: $ROLE: $*"; }
fail() {
    say "FAILED: $*"
    echo "$*" >"$RESULTS/pair-failed"
    [ -d "$PAIR" ] && echo "$ROLE: $*" >"$PAIR/$ROLE-failed"
    for log in "$work"/node.log; do
        [ -e "$log" ] && tail -n 20 "$log" | sed "s/^/hwt-pair: $ROLE:   node | /"
    done
    cleanup
    exit 1
}
cleanup() {
    if [ "$ROLE" = a ] && [ "$(cat /sys/block/nbd0/size 2>/dev/null || echo 0)" != 0 ]; then
        timeout 30 nbd-client -d /dev/nbd0 >/dev/null 2>&1
    fi
    timeout 30 drbdadm -c "$DRBD_CONF" down r0 >/dev/null 2>&1
    [ -n "$node_pid" ] && kill "$node_pid" 2>/dev/null && sleep 1 && kill -9 "$node_pid" 2>/dev/null
    node_pid=
}
# Waits up to $2 seconds for file $1 in the pair share; fails early when the other guest
# reported a failure.
wait_flag() {
    local flag=$1 left=$(($2 * 5)) other=a
    [ "$ROLE" = a ] && other=b
    while [ ! -e "$PAIR/$flag" ]; do
        [ -e "$PAIR/$other-failed" ] && fail "guest $other failed: $(cat "$PAIR/$other-failed")"
        [ "$left" -gt 0 ] || return 1
        sleep 0.2
        left=$((left - 1))
    done
}
# Runs a step with its output in the results share; fails the guest with its last lines.
step() {
    local what=$1
    shift
    if ! "$@" >>"$RESULTS/steps.log" 2>&1; then
        tail -n 15 "$RESULTS/steps.log" | sed "s/^/hwt-pair: $ROLE:   | /"
        fail "$what"
    fi
}
# Waits up to $2 seconds for `drbdadm $1 r0` to print $3.
drbd_wait() {
    local what=$1 left=$(($2 * 5)) want=$3 got=
    while [ "$left" -gt 0 ]; do
        got=$(drbdadm -c "$DRBD_CONF" "$what" r0 2>&1)
        [ "$got" = "$want" ] && return 0
        sleep 0.2
        left=$((left - 1))
    done
    say "drbdadm $what r0: $got (waited for $want)"
    return 1
}

say "kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ { print int($2 / 1024) " MiB" }' /proc/meminfo)"
mkdir -p "$PAIR" "$work"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 pair "$PAIR" || fail "mount of the pair share (9p tag pair) failed"
echo booted >"$PAIR/$ROLE-booted"

# --- devices and the link --------------------------------------------------------------
hostname "guest-$ROLE"
for m in virtio_net virtio_blk drbd nbd ext4; do
    modprobe "$m" || fail "modprobe $m failed"
done
for d in /dev/vda /dev/vdb; do
    for _ in $(seq 100); do [ -e "$d" ] && break; sleep 0.1; done
    [ -e "$d" ] || fail "no $d (the virtio disks)"
done
ip link set lo up
nic=$(ip -o link show | awk -F': ' '$2 != "lo" { print $2; exit }')
[ -n "$nic" ] || fail "no network device besides lo (virtio-net)"
addr=$A_ADDR peer=$B_ADDR
[ "$ROLE" = b ] && addr=$B_ADDR peer=$A_ADDR
step "address on $nic" ip addr add "$addr/24" dev "$nic"
step "link $nic up" ip link set "$nic" up

# DRBD 8.4 (the kernel's module) through drbd-utils' drbdadm, which calls drbdadm-84. A
# configuration of our own, not the host's /etc/drbd.conf. Everything at its defaults but
# the protocol, named (C: a write completes once it is on both disks).
mkdir -p /run/lock /var/lib/drbd
DRBD_CONF=/run/drbd-pair.conf
cat >"$DRBD_CONF" <<EOF
global { usage-count no; }
resource r0 {
    protocol C;
    device /dev/drbd0;
    disk /dev/vda;
    meta-disk internal;
    on guest-a { address $A_ADDR:$DRBD_PORT; }
    on guest-b { address $B_ADDR:$DRBD_PORT; }
}
EOF
step "drbdadm create-md r0" drbdadm -c "$DRBD_CONF" create-md --force r0
step "drbdadm up r0" drbdadm -c "$DRBD_CONF" up r0

bin=${HWT_BIN:?}/nvmirror
lat=$HWT_BIN/hw-blk-lat
[ -x "$bin" ] || fail "no nvmirror binary at $bin (hw-tests/pair builds it)"
[ -x "$lat" ] || fail "no hw-blk-lat at $lat (hw-tests/pair builds it)"

start_node() { # extra node flags...
    "$bin" node --name "site-$ROLE" --data-dir "$work/data" --nvram "file:$work/nvram" \
        --listen "$addr:$NVM_LISTEN_PORT" --control "$addr:$NVM_CONTROL_PORT" --nbd "127.0.0.1:$NVM_NBD_PORT" "$@" \
        >"$work/node.out" 2>"$work/node.log" &
    node_pid=$!
    local left=300
    while ! ss -Hltn "sport = :$NVM_CONTROL_PORT" | grep -q .; do
        kill -0 "$node_pid" 2>/dev/null || fail "nvmirror node exited at start-up"
        [ "$left" -gt 0 ] || fail "nvmirror node did not listen on $NVM_CONTROL_PORT in 60 s"
        sleep 0.2
        left=$((left - 1))
    done
}

if [ "$ROLE" = b ]; then
    # --- guest b: the peer ---------------------------------------------------------------
    step "mkfs.ext4 /dev/vdb" mkfs.ext4 -F -q /dev/vdb
    mkdir -p "$work/data"
    step "mount /dev/vdb" mount -t ext4 /dev/vdb "$work/data"
    start_node --raid-engine uring
    say "DRBD r0 up (Secondary), nvmirror node up: ready"
    echo ready >"$PAIR/b-ready"
    wait_flag a-done "${HWT_PAIR_WAIT_S:-1500}" || fail "guest a did not finish in ${HWT_PAIR_WAIT_S:-1500} s"
    say "guest a is done; taking DRBD and the node down"
    cleanup
    umount "$work/data" 2>/dev/null
    exit 0
fi

# --- guest a: the primary and the load ------------------------------------------------
say "waiting for guest b"
wait_flag b-ready 600 || fail "guest b was not ready in 600 s"
# busybox's ping (the host root need not have iputils): small, and 4000 bytes (three
# frames, as a 4 KiB write is).
ping_line=$(/bin/busybox ping -c 20 -i 0.2 -q "$B_ADDR" 2>&1 | tail -n 1)
ping_big=$(/bin/busybox ping -c 20 -i 0.2 -s 4000 -q "$B_ADDR" 2>&1 | tail -n 1)
say "ping $B_ADDR (20 x): $ping_line; 4000 bytes: $ping_big"
echo "56 bytes: $ping_line; 4000 bytes: $ping_big" >"$PAIR/ping.txt"

drbd_wait cstate 120 Connected || fail "DRBD r0 did not connect in 120 s"
# Both backing disks are blank: no initial sync (writes during one are ~100x slower).
step "drbdadm new-current-uuid --clear-bitmap r0" drbdadm -c "$DRBD_CONF" -- --clear-bitmap new-current-uuid r0
drbd_wait dstate 60 UpToDate/UpToDate || fail "DRBD r0 is not UpToDate on both sides"
step "drbdadm primary r0" drbdadm -c "$DRBD_CONF" primary r0
for _ in $(seq 50); do [ -e /dev/drbd0 ] && break; sleep 0.1; done
say "DRBD r0: $(drbdadm -c "$DRBD_CONF" role r0), $(drbdadm -c "$DRBD_CONF" cstate r0), $(drbdadm -c "$DRBD_CONF" dstate r0), $(($(blockdev --getsize64 /dev/drbd0) >> 20)) MiB"

start_node
ctl() { timeout 900 "$bin" ctl --node "$A_ADDR:$NVM_CONTROL_PORT" "$@"; }
span_mib=${HWT_PAIR_SPAN_MIB:-128}
# The writes range over the first span_mib MiB of either device. The volume is the whole
# of /dev/vdb, which the host made a little larger than the span (its baseline copy
# crosses the slow link between the guests).
vol_mib=$(($(blockdev --getsize64 /dev/vdb) >> 20))
step "volume create on /dev/vdb" ctl volume create "$VOL" --size "${vol_mib}M" --disk uring:/dev/vdb
started=$SECONDS
step "mirror $VOL to guest b" ctl mirror "$VOL" --to "$B_ADDR:$NVM_CONTROL_PORT" --timeout 600
say "nvmirror: volume $VOL ($vol_mib MiB on /dev/vdb) mirrored to guest b, in sync after $((SECONDS - started)) s"
step "nbd-client attach" nbd-client -N "$VOL" 127.0.0.1 "$NVM_NBD_PORT" /dev/nbd0 -b 4096
say "nvmirror: /dev/nbd0 attached ($(($(blockdev --getsize64 /dev/nbd0) >> 20)) MiB)"

rounds=${HWT_PAIR_ROUNDS:-3}
ops=${HWT_PAIR_OPS:-20000}
secs=${HWT_PAIR_SECONDS:-10}
declare -A devs=([drbd]=/dev/drbd0 [nvmirror]=/dev/nbd0)
# Round 0 is the warm-up: it fills DRBD's activity log and nvmirror's caches, and is not
# reported.
for round in $(seq 0 "$rounds"); do
    order=(drbd nvmirror)
    ((round % 2)) && order=(nvmirror drbd)
    for depth in 1 32; do
        for sys in "${order[@]}"; do
            out=$PAIR/r$round-$sys-qd$depth.json
            timeout $((secs + 120)) "$lat" --dev "${devs[$sys]}" --depth "$depth" --ops "$ops" --seconds "$secs" \
                --span "${span_mib}M" --seed $((round * 100 + depth)) >"$out.tmp" 2>"$RESULTS/lat.err" ||
                { cat "$RESULTS/lat.err"; fail "hw-blk-lat on ${devs[$sys]} at queue depth $depth (round $round)"; }
            mv "$out.tmp" "$out"
            say "round $round/$rounds$([ "$round" = 0 ] && echo ' (warm-up)') $sys qd$depth: $(sed -n \
                's/.*"ops":\([0-9]*\).*"ops_per_s":\([0-9.]*\).*/\1 writes, \2 writes\/s/p' "$out"), p50 $(sed -n \
                's/.*"p50":\([0-9.]*\).*/\1/p' "$out") us, p99 $(sed -n 's/.*"p99":\([0-9.]*\).*/\1/p' "$out") us"
        done
    done
done
drbdadm -c "$DRBD_CONF" status r0 >"$PAIR/drbd-status.txt" 2>&1 || cat /proc/drbd >"$PAIR/drbd-status.txt" 2>&1
ctl status --json >"$PAIR/nvmirror-status.json" 2>&1
echo done >"$PAIR/a-done"
cleanup
say "done"
exit 0
