#!/bin/bash
# The main command: boot the default Debian guest under our VMM and show its console.
#
# Builds what is missing (guest image, `cargo build --release -p vmm`, the nested test host when
# needed), then chooses where the VMM runs and says why:
#   direct  this machine's KVM runs stock kernels (vmx or svm in /proc/cpuinfo, and /dev/kvm)
#   nested  otherwise: QEMU (TCG) with an SVM CPU boots Debian's kernel with kvm_amd, and the VMM
#           runs inside it (resources/testhost.sh); slower, same VMM, same guest
#
# Usage: resources/run.sh [--mode direct|nested] [--verbose] [-- VMM-ARGS...]
#   VMM-ARGS override the defaults (--vcpus 2 --memory-mib 512 --balloon "" and the guest image),
#   e.g. resources/run.sh -- --memory-mib 1024 --cmdline "console=ttyS0 reboot=k panic=-1 scenario=meminfo:5"
#   --verbose  show everything: package installs, builds, QEMU's warnings, the test host's and
#              the guest's kernel messages. By default the terminal shows one line per step,
#              then the guest's console (its kernel booted with `quiet`; `dmesg` in the guest
#              shows the rest), and the output of each step goes to build/run/ (apt.log,
#              build-guest.log, cargo.log, build-testhost.log, qemu.log, console.log: the
#              nested mode's console), which keeps the last run's only.
# In the guest: a shell on the console; `poweroff -f` ends the VM (and the test host).
# In nested mode Ctrl-A X also quits QEMU.
. "$(dirname "$0")/lib.sh"

mode="${RUN_MODE:-}" verbose=0
while [ $# -gt 0 ]; do
    case "$1" in
        --mode) mode=$2; shift 2 ;;
        -v|--verbose) verbose=1; shift ;;
        --) shift; break ;;
        -h|--help) sed -n '2,/^\. /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) break ;;
    esac
done

export RUN_LOGS="$BUILD/run"
rm -rf "$RUN_LOGS"
mkdir -p "$RUN_LOGS"
[ $verbose = 1 ] || export RUN_QUIET=1
if [ $verbose = 0 ]; then
    log "quiet: each step's output goes to $RUN_LOGS/ (--verbose shows it all)"
fi

# The toolchain the workspace asks for (Cargo.toml's rust-version), said once, here.
rust_min=$(sed -n 's/^rust-version *= *"\(.*\)"/\1/p' "$ROOT/Cargo.toml")
command -v cargo >/dev/null ||
    die "no cargo: install Rust >= $rust_min with rustup (https://rustup.rs); Debian 12's cargo is too old"
rust_now=$(rustc --version 2>/dev/null | sed -n 's/^rustc \([0-9.]*\).*/\1/p')
[ "$(printf '%s\n' "$rust_min" "$rust_now" | sort -V | head -n1)" = "$rust_min" ] ||
    die "Rust ${rust_now:-?} is older than $rust_min (Cargo.toml's rust-version): rustup update"

log "guest image: Debian's kernel and busybox, into build/guest/ (first time: under a minute, 71 MB to download)"
quietly build-guest "$RES/build-guest.sh"
log "building the VMM: cargo build --release -p vmm (first time: about 9 minutes on 2 busy shared cores)"
(cd "$ROOT" && quietly cargo cargo build --release -p vmm)
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
if ! has --cmdline; then
    cmdline=$(cat "$BUILD/guest/cmdline")
    [ $verbose = 1 ] || cmdline+=" quiet"
    args+=(--cmdline "$cmdline")
fi
has --vcpus || args+=(--vcpus 2)
has --memory-mib || args+=(--memory-mib 512)
if ! has --balloon && "$VMM" --help 2>/dev/null | grep -q -- '--balloon'; then args+=(--balloon ""); fi
args+=("$@")

echo "=== mode: $mode ($why) ===" >&2
if [ "$mode" = direct ]; then
    echo "=== vmm ${args[*]} ===" >&2
    exec "$VMM" "${args[@]}"
fi

# A free loopback port for testhost.sh to forward (the test agent is not needed here: none).
port=$((20000 + RANDOM % 20000))
while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$((port + 1)); done
echo "=== booting the nested test host (QEMU TCG + kvm_amd, ~10-30 s), then: vmm ${args[*]} ===" >&2
quiet=()
[ $verbose = 1 ] || quiet=(--quiet)
exec "$RES/testhost.sh" --port "$port" --vmm "$VMM" --agent none "${quiet[@]}" \
    --console-log "$RUN_LOGS/console.log" --run -- "${args[@]}"
