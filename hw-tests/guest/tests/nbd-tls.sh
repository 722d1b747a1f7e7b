# NBD over TLS with the kernel's NBD client: a node started with --tls-cert and
# --nbd-client-ca (certificates made here with openssl: a CA, the node's for 127.0.0.1, a
# client's) serves a volume; Debian's nbd-client attaches it over TLS with the client's
# certificate (-enable-tls -cacertfile -certfile -keyfile -tlshostname, GnuTLS), 8 MiB of random data is written through /dev/nbd0 with
# O_DIRECT, read back, detached, attached again and read again: the same checksum each
# time. nbd-client without TLS, and with a certificate of another CA, is refused, and the
# node's log says why.
. "$HWT_REPO/hw-tests/guest/lib.sh"
bin="$HWT_BIN/nvmirror"
[ -x "$bin" ] || hwt_fail "no nvmirror binary at $bin (hw-tests/run builds it)"
for tool in nbd-client openssl sha256sum dd; do
    command -v "$tool" >/dev/null 2>&1 || hwt_fail "no $tool in the guest (the host's root): install it on the host"
done
modprobe nbd || hwt_fail "modprobe nbd failed"
hwt_wait_for /dev/nbd0 10 || hwt_fail "no /dev/nbd0 after modprobe nbd"
ip link set lo up

work=/var/tmp/nbd-tls
rm -rf "$work" && mkdir -p "$work"
host=127.0.0.1
vol=tlsvol
ctl_addr=$host:7231
nbd_port=10831
pid=
cleanup() {
    [ "$(cat /sys/block/nbd0/size 2>/dev/null || echo 0)" != 0 ] && timeout 30 nbd-client -d /dev/nbd0 >/dev/null 2>&1
    [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null
    wait 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
fail_with_logs() { hwt_fail_with_logs "$1" "$work"/node.log "$work"/nbd-client.log; }

# --- certificates: a CA, the node's (for 127.0.0.1), a client's; another CA's client ---
cd "$work" || hwt_fail "no $work"
ca() { # name
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -keyout "$1.key" -out "$1.pem" -subj "/CN=$1" 2>>openssl.log
}
issue() { # ca name subject-alt-name
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$2.key" -out "$2.csr" \
        -subj "/CN=$2" 2>>openssl.log &&
        printf '%s\n' "$3" >"$2.ext" &&
        openssl x509 -req -in "$2.csr" -CA "$1.pem" -CAkey "$1.key" -CAcreateserial -days 2 \
            -out "$2.pem" -extfile "$2.ext" 2>>openssl.log
}
{ ca ca && ca rogue-ca && issue ca node "subjectAltName=IP:127.0.0.1" &&
    issue ca client "extendedKeyUsage=clientAuth" && issue rogue-ca rogue "extendedKeyUsage=clientAuth"; } ||
    hwt_fail_with_logs "openssl could not make the certificates" openssl.log

"$bin" node --name tls --data-dir "$work/node" --listen "$host:7331" --control "$ctl_addr" --nbd "$host:$nbd_port" \
    --tls-cert node.pem --tls-key node.key --tls-ca ca.pem --nbd-client-ca ca.pem >"$work/node.ready" 2>"$work/node.log" &
pid=$!
hwt_wait_listen "${ctl_addr##*:}" 60 "$pid" || fail_with_logs "the node did not start"
hwt_wait_listen "$nbd_port" 30 "$pid" || fail_with_logs "the node serves no NBD"
timeout 60 "$bin" ctl --node "$ctl_addr" --tls-ca ca.pem volume create "$vol" --size 64M ||
    fail_with_logs "volume create failed"

# --- refused: plain text, and another CA's certificate --------------------------------
if timeout 30 nbd-client -N "$vol" "$host" "$nbd_port" /dev/nbd0 -b 4096 >"$work/nbd-client.log" 2>&1; then
    fail_with_logs "nbd-client without TLS attached the volume"
fi
if timeout 30 nbd-client -N "$vol" -b 4096 -enable-tls -cacertfile ca.pem -certfile rogue.pem -keyfile rogue.key -tlshostname "$host" \
    "$host" "$nbd_port" /dev/nbd0 >>"$work/nbd-client.log" 2>&1; then
    fail_with_logs "nbd-client with another CA's certificate attached the volume"
fi
grep -q "did not start TLS" "$work/node.log" || fail_with_logs "the node did not log the plain client's refusal"
grep -q "nbd-client-ca" "$work/node.log" || fail_with_logs "the node did not log the foreign certificate's refusal"

# --- over TLS: write, read back, detach, attach, read again ---------------------------
attach() {
    timeout 60 nbd-client -N "$vol" -b 4096 -enable-tls -cacertfile ca.pem -certfile client.pem -keyfile client.key -tlshostname "$host" \
        "$host" "$nbd_port" /dev/nbd0 >>"$work/nbd-client.log" 2>&1
}
attach || fail_with_logs "nbd-client over TLS could not attach the volume"
echo "/dev/nbd0 over TLS: $(($(cat /sys/block/nbd0/size) * 512)) bytes"
head -c $((8 << 20)) /dev/urandom >"$work/data"
want=$(sha256sum <"$work/data" | cut -d' ' -f1)
dd if="$work/data" of=/dev/nbd0 bs=1M oflag=direct conv=fsync status=none || fail_with_logs "writing over TLS failed"
got=$(dd if=/dev/nbd0 bs=1M count=8 iflag=direct status=none | sha256sum | cut -d' ' -f1)
[ "$got" = "$want" ] || fail_with_logs "read back over TLS: $got, written $want"
timeout 30 nbd-client -d /dev/nbd0 >>"$work/nbd-client.log" 2>&1 || fail_with_logs "nbd-client -d failed"
attach || fail_with_logs "nbd-client over TLS could not attach the volume again"
got=$(dd if=/dev/nbd0 bs=1M count=8 iflag=direct status=none | sha256sum | cut -d' ' -f1)
[ "$got" = "$want" ] || fail_with_logs "read after attaching again: $got, written $want"
hwt_detail "the kernel's NBD client over TLS with a client certificate: 8 MiB written and read back twice; plain and foreign-CA clients refused"
