#!/bin/bash
# Builds the e2e guest image from pinned Debian packages (resources/versions) into build/guest/:
#   bzImage            Debian's stock kernel, as shipped
#   vmlinux            the ELF kernel extracted from that bzImage (for the PVH / 64-bit ELF entry)
#   initramfs.cpio.gz  busybox, the virtio modules, resources/guest/* (init, helpers), memtool
#   cmdline            the kernel command line the VMM should use by default
# Idempotent and cached: each output is rebuilt only when older than its inputs. No root needed
# beyond installing missing Debian packages.
#
# Usage: resources/build-guest.sh [--force]
. "$(dirname "$0")/lib.sh"

OUT="$BUILD/guest"
[ "${1:-}" = "--force" ] && rm -rf "$OUT"
mkdir -p "$OUT"

need_cmd xz xz-utils
need_cmd cpio cpio
need_cmd gcc gcc libc6-dev
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || apt_install libc6-dev

KTREE=$(kernel_tree)
BBTREE=$(busybox_tree)
BZ_SRC="$KTREE/boot/vmlinuz-$KERNEL_ABI"

# The modules the guest needs, dependencies first; built-in ones drop out.
GUEST_MODULES="virtio virtio_ring virtio_mmio virtio_balloon virtio_mem"
for c in VIRTIO VIRTIO_MMIO VIRTIO_BALLOON VIRTIO_MEM; do
    case "$(kernel_config "$KTREE" "$c")" in
        y) log "CONFIG_$c is built into $KERNEL_ABI" ;;
        m) ;;
        *) die "$KERNEL_ABI lacks CONFIG_$c" ;;
    esac
done

if ! fresh "$OUT/bzImage" "$BZ_SRC"; then
    cp "$BZ_SRC" "$OUT/bzImage.tmp" && mv "$OUT/bzImage.tmp" "$OUT/bzImage"
    log "bzImage: $KERNEL_PKG $KERNEL_VERSION"
fi

if ! fresh "$OUT/vmlinux" "$OUT/bzImage" "$RES/lib.sh"; then
    extract_vmlinux "$OUT/bzImage" "$OUT/vmlinux"
    log "vmlinux: $(stat -c %s "$OUT/vmlinux") bytes, ELF"
fi

if ! fresh "$OUT/memtool" "$RES/guest/memtool.c"; then
    gcc -O2 -Wall -Wextra -static -o "$OUT/memtool" "$RES/guest/memtool.c"
    strip "$OUT/memtool"
fi

if ! fresh "$OUT/initramfs.cpio.gz" "$KTREE/.done" "$BBTREE/.done" "$RES/guest" "$OUT/memtool" \
        "$RES/lib.sh" "$0" "$RES/versions"; then
    STAGE="$OUT/rootfs"
    rm -rf "$STAGE"
    mkdir -p "$STAGE"/{bin,sbin,etc,proc,sys,dev,tmp,run,root,lib/modules}
    install_busybox "$BBTREE" "$STAGE"
    cp "$RES/guest/init" "$STAGE/init"
    cp "$RES/guest/profile" "$STAGE/etc/profile"
    for f in alloc alloc-free pattern meminfo meminfo-every; do cp "$RES/guest/$f" "$STAGE/bin/$f"; done
    cp "$OUT/memtool" "$STAGE/bin/memtool"
    : > "$STAGE/etc/modules.order"
    # shellcheck disable=SC2086
    module_order "$KTREE" $GUEST_MODULES | while read -r name path; do
        cp "$path" "$STAGE/lib/modules/"
        echo "$name /lib/modules/$(basename "$path")" >> "$STAGE/etc/modules.order"
    done
    log "module load order: $(cut -d' ' -f1 "$STAGE/etc/modules.order" | tr '\n' ' ')"
    printf '%s\n' "kernel=$KERNEL_PKG $KERNEL_VERSION" "busybox=$BUSYBOX_PKG $BUSYBOX_VERSION" > "$STAGE/etc/guest-image"
    pack_initramfs "$STAGE" "$OUT/initramfs.cpio.gz"
    rm -rf "$STAGE"
    log "initramfs.cpio.gz: $(stat -c %s "$OUT/initramfs.cpio.gz") bytes"
fi

echo "console=ttyS0 reboot=k panic=-1" > "$OUT/cmdline"
cp "$RES/versions" "$OUT/versions"
log "guest image ready in $OUT"
