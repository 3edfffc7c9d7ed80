#!/bin/bash
# Boots the guest image under plain QEMU (TCG, microvm with ACPI and a virtio-mmio balloon) and
# checks that it reaches VMM-GUEST-READY with virtio_balloon bound and powers off. This proves the
# image (modules, init, ACPI discovery of virtio-mmio) independently of our VMM.
#
# Usage: resources/check-guest.sh [extra kernel args...]     (log in build/guest/check.log)
. "$(dirname "$0")/lib.sh"
need_cmd qemu-system-x86_64 qemu-system-x86
"$RES/build-guest.sh"
G="$BUILD/guest"
# TCG's TSC runs at the host's rate. Under load the kernel's PIT calibration fails on microvm
# (no HPET or PM timer to fall back on) and the boot stalls, so tell it the rate.
khz=$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)
start=$(date +%s.%N)
timeout 180 qemu-system-x86_64 -M microvm,acpi=on,rtc=on -accel tcg -cpu max -smp 2 -m 512 \
    -nographic -no-reboot -kernel "$G/bzImage" -initrd "$G/initramfs.cpio.gz" \
    -append "$(cat "$G/cmdline") tsc_early_khz=$khz scenario=poweroff $*" \
    -device virtio-balloon-device </dev/null > "$G/check.log" 2>&1 || true
end=$(date +%s.%N)
grep -E '^(GUEST-|VMM-GUEST-READY)' "$G/check.log" | tr -d '\r'
ok=1
grep -q '^VMM-GUEST-READY' "$G/check.log" || { log "FAIL: no VMM-GUEST-READY"; ok=0; }
grep -q '^GUEST-VIRTIO-DRIVER virtio_balloon virtio' "$G/check.log" || { log "FAIL: virtio_balloon not bound"; ok=0; }
grep -q 'reboot: Power down' "$G/check.log" || { log "FAIL: no power off"; ok=0; }
log "QEMU TCG run took $(awk "BEGIN { printf \"%.1f\", $end - $start }") s (log: $G/check.log)"
[ $ok = 1 ] && log "PASS" || exit 1
