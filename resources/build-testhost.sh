#!/bin/bash
# Builds the base image of the nested test host into build/testhost/:
#   bzImage              the same Debian kernel as the guest (resources/versions)
#   initramfs.cpio.gz    busybox, kvm + kvm_amd (and deps) and the virtio-net NIC modules, the
#                        guest image under /guest/, resources/testhost/init
# The VMM binary and the agent are not in it: resources/testhost.sh appends them (with their
# shared libraries) as an overlay archive at each start, so a rebuilt VMM needs no image rebuild.
# Idempotent and cached.
#
# Usage: resources/build-testhost.sh [--force]
. "$(dirname "$0")/lib.sh"

OUT="$BUILD/testhost"
[ "${1:-}" = "--force" ] && rm -rf "$OUT"
mkdir -p "$OUT"

"$RES/build-guest.sh"
G="$BUILD/guest"
KTREE=$(kernel_tree)
BBTREE=$(busybox_tree)

# kvm_amd for /dev/kvm; virtio_net (on QEMU's virtio-net-pci) for the agent's network.
HOST_MODULES="irqbypass kvm ccp kvm_amd virtio virtio_ring virtio_pci virtio_net"

if ! fresh "$OUT/bzImage" "$KTREE/.done"; then
    cp "$KTREE/boot/vmlinuz-$KERNEL_ABI" "$OUT/bzImage.tmp" && mv "$OUT/bzImage.tmp" "$OUT/bzImage"
fi

if ! fresh "$OUT/initramfs.cpio.gz" "$KTREE/.done" "$BBTREE/.done" "$RES/testhost" "$G/bzImage" \
        "$G/vmlinux" "$G/initramfs.cpio.gz" "$RES/lib.sh" "$0" "$RES/versions"; then
    STAGE="$OUT/rootfs"
    rm -rf "$STAGE"
    mkdir -p "$STAGE"/{bin,sbin,etc,proc,sys,dev,tmp,run,root,lib/modules,guest}
    install_busybox "$BBTREE" "$STAGE"
    cp "$RES/testhost/init" "$STAGE/init"
    cp "$RES/testhost/profile" "$STAGE/etc/profile"
    cp "$G/bzImage" "$G/vmlinux" "$G/initramfs.cpio.gz" "$G/cmdline" "$G/versions" "$STAGE/guest/"
    : > "$STAGE/etc/modules.order"
    # shellcheck disable=SC2086
    module_order "$KTREE" $HOST_MODULES | while read -r name path; do
        cp "$path" "$STAGE/lib/modules/"
        echo "$name /lib/modules/$(basename "$path")" >> "$STAGE/etc/modules.order"
    done
    log "module load order: $(cut -d' ' -f1 "$STAGE/etc/modules.order" | tr '\n' ' ')"
    pack_initramfs "$STAGE" "$OUT/initramfs.cpio.gz"
    rm -rf "$STAGE"
    log "initramfs.cpio.gz: $(stat -c %s "$OUT/initramfs.cpio.gz") bytes"
fi
log "test host base image ready in $OUT"
