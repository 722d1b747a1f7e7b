# Shared by the host-side runners of the QEMU guests (hw-tests/run, hw-tests/pair): which
# kernel the guest boots, and the busybox initramfs that gets it to the host's root.
# Sourced (bash); each function prints its reason on stderr and returns non-zero on
# failure, and the caller decides how the run fails.

# The modules that get the initramfs to the host's root, in load order (insmod does not
# resolve dependencies).
HWT_INITRAMFS_MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
    9pnet 9pnet_virtio netfs fscache 9p overlay)

# Prints the guest kernel's version: $HW_TESTS_KERNEL_VERSION, else the one
# linux-image-amd64 depends on (never the host's `uname -r`), after checking that its
# image and module tree are there.
hwt_guest_kernel() {
    local kver=${HW_TESTS_KERNEL_VERSION:-}
    if [ -z "$kver" ]; then
        kver=$(dpkg-query -W -f='${Depends}' linux-image-amd64 2>/dev/null |
            grep -o 'linux-image-[0-9][^ ,]*' | head -n 1 | sed 's/^linux-image-//') || true
        if [ -z "$kver" ]; then
            echo "cannot tell the kernel of linux-image-amd64 (installed?); set HW_TESTS_KERNEL_VERSION" >&2
            return 1
        fi
    fi
    [ -r "/boot/vmlinuz-$kver" ] || { echo "no readable /boot/vmlinuz-$kver" >&2; return 1; }
    [ -f "/lib/modules/$kver/modules.dep" ] || { echo "no /lib/modules/$kver/modules.dep" >&2; return 1; }
    echo "$kver"
}

# Checks for a static busybox at $1 (the initramfs's only program).
hwt_check_busybox() {
    [ -x "$1" ] || { echo "no $1 (package busybox-static)" >&2; return 1; }
    if ldd "$1" >/dev/null 2>&1; then
        echo "$1 is dynamically linked; the initramfs needs busybox-static" >&2
        return 1
    fi
}

# Builds the initramfs for kernel $1 into file $2, staging in the empty directory $3:
# busybox ($4), hw-tests/guest/init as /init, and HWT_INITRAMFS_MODULES.
hwt_build_initramfs() {
    local kver=$1 dest=$2 root=$3 busybox=$4 repo m ko
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    mkdir -p "$root/bin" "$root/modules" || return 1
    cp "$busybox" "$root/bin/busybox" || return 1
    install -m 0755 "$repo/hw-tests/guest/init" "$root/init" || return 1
    for m in "${HWT_INITRAMFS_MODULES[@]}"; do
        ko=$(modinfo -k "$kver" -n "$m" 2>/dev/null) || { echo "module $m not found for kernel $kver" >&2; return 1; }
        case "$ko" in
            *.ko) cp "$ko" "$root/modules/$m.ko" ;;
            *.ko.xz) xz -dc "$ko" >"$root/modules/$m.ko" ;;
            *.ko.zst) zstd -qdc "$ko" >"$root/modules/$m.ko" ;;
            *.ko.gz) gzip -dc "$ko" >"$root/modules/$m.ko" ;;
            *) echo "module $m is built in or unknown ($ko)" >&2; return 1 ;;
        esac
        echo "$m" >>"$root/modules/order"
    done
    (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) >"$dest"
}
