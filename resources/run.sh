#!/bin/bash
# The main command: boot the default Debian guest under our VMM and show its console.
#
# Builds what is missing (guest image, `cargo build --release -p vmm`, the nested test host when
# needed), then chooses where the VMM runs and says why:
#   direct  this machine's KVM runs stock kernels (vmx or svm in /proc/cpuinfo, and /dev/kvm)
#   nested  otherwise: QEMU (TCG) with an SVM CPU boots Debian's kernel with kvm_amd, and the VMM
#           runs inside it (resources/testhost.sh); slower, same VMM, same guest
#
# Usage: resources/run.sh [--mode direct|nested] [-- VMM-ARGS...]
#   VMM-ARGS override the defaults (--vcpus 2 --memory-mib 512 --balloon "" and the guest image),
#   e.g. resources/run.sh -- --memory-mib 1024 --cmdline "console=ttyS0 reboot=k panic=-1 scenario=meminfo:5"
# In the guest: a shell on the console; `poweroff -f` ends the VM (and the test host).
# In nested mode Ctrl-A X also quits QEMU.
. "$(dirname "$0")/lib.sh"

mode="${RUN_MODE:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --mode) mode=$2; shift 2 ;;
        --) shift; break ;;
        -h|--help) sed -n '2,/^\. /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) break ;;
    esac
done

"$RES/build-guest.sh"
command -v cargo >/dev/null || die "no cargo: install Rust >= 1.85 with rustup (https://rustup.rs); Debian 12's cargo is too old"
log "building the VMM: cargo build --release -p vmm"
(cd "$ROOT" && cargo build --release -p vmm)
VMM="$ROOT/target/release/vmm"

hw=no
grep -qwE 'vmx|svm' /proc/cpuinfo && hw=yes
if [ -z "$mode" ]; then
    if [ $hw = yes ] && [ -e /dev/kvm ]; then
        mode=direct why="the CPU has hardware virtualization (vmx/svm) and /dev/kvm exists"
    elif [ -e /dev/kvm ]; then
        mode=nested why="/dev/kvm exists but the CPU shows no vmx/svm: a software KVM that cannot boot stock kernels"
    else
        mode=nested why="there is no /dev/kvm"
    fi
else
    why="asked for with --mode/RUN_MODE"
fi
case "$mode" in
    direct) GUEST="$BUILD/guest" ;;
    nested) GUEST=/guest ;;
    *) die "unknown mode '$mode' (direct or nested)" ;;
esac

# Defaults for every flag the user did not give.
has() { local a; for a in "${user[@]}"; do [ "$a" = "$1" ] && return 0; done; return 1; }
user=("$@")
args=()
has --kernel || args+=(--kernel "$GUEST/bzImage")
has --initramfs || args+=(--initramfs "$GUEST/initramfs.cpio.gz")
has --cmdline || args+=(--cmdline "$(cat "$BUILD/guest/cmdline")")
has --vcpus || args+=(--vcpus 2)
has --memory-mib || args+=(--memory-mib 512)
if ! has --balloon && "$VMM" --help 2>/dev/null | grep -q -- '--balloon'; then args+=(--balloon ""); fi
args+=("$@")

echo "=== mode: $mode ($why) ===" >&2
if [ "$mode" = direct ]; then
    echo "=== vmm ${args[*]} ===" >&2
    exec "$VMM" "${args[@]}"
fi

# A free loopback port for the test host's agent (unused here, but testhost.sh forwards one).
port=$((20000 + RANDOM % 20000))
while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$((port + 1)); done
echo "=== booting the nested test host (QEMU TCG + kvm_amd, ~10-30 s), then: vmm ${args[*]} ===" >&2
exec "$RES/testhost.sh" --port "$port" --vmm "$VMM" --run -- "${args[@]}"
