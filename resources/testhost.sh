#!/bin/bash
# Starts the nested test host: QEMU in TCG mode with an SVM-capable EPYC CPU (so kvm_amd works
# inside), booting build/testhost/ (resources/build-testhost.sh) plus an overlay archive made here
# with the VMM binary, the test agent, their shared libraries and, with --run, the VMM arguments.
#
# The agent (tests/src/bin/testhost-agent.rs) listens on port 7000 inside; QEMU's user-mode
# network forwards 127.0.0.1:PORT on this machine to it. A NIC rather than a serial channel: each
# test request is its own TCP connection, so console streams, stdin writes, signals and HTTP
# proxying need no multiplexing protocol, and the console of the test host stays free for people.
#
# Usage: resources/testhost.sh [--port PORT] [--log FILE] [--monitor SOCKET] [--vmm PATH|none]
#                              [--agent PATH|none] [--vmm-baseline PATH] [--mem SIZE]
#                              [--smp N] [--quiet] [--run -- VMM-ARGS...]
#   --log FILE   console to FILE, no terminal (the harness uses this); default: the terminal
#   --monitor SOCKET   QEMU's monitor on this Unix socket (with --log; the harness uses this)
#   --vmm-baseline PATH  a second VMM, as /bin/vmm-baseline (to compare two builds side by side)
#   --console-log FILE   on the terminal, and a copy in FILE (resources/run.sh uses this)
#   --quiet      only progress on the terminal before the VMM's console: the test host's kernel
#                prints warnings and worse, its init no module and symbol lines, and building
#                and QEMU's own messages go to logs in $RUN_LOGS (see lib.sh, `quietly`)
#   --run ...    run "vmm VMM-ARGS..." on the test host console once /dev/kvm is up, then power
#                off when it exits. Guest files are in /guest/ (bzImage, vmlinux, initramfs.cpio.gz).
# Environment: TESTHOST_MEM (default 6G), TESTHOST_SMP (default 1).
#
# One CPU by default: with two, the test host's kernel panics now and then (QEMU 7.2 and 10.0
# alike): a reschedule IPI from the other CPU is taken right after VMRUN in kvm_amd's
# __svm_vcpu_run, while the guest's GS base is still loaded, and recursive page faults run into
# the stack guard page. L2 guests also wedged or reset in early boot on two CPUs. One CPU sends
# no IPIs and never moves a guest's vCPU between CPUs. On an unloaded machine it costs nothing
# measurable: the balloon e2e binary took 127 s with one CPU and 131 s with two, back to back.
. "$(dirname "$0")/lib.sh"

port=7000 logfile="" monitor="" vmm="$ROOT/target/release/vmm" agent="" mem="${TESTHOST_MEM:-6G}"
smp="${TESTHOST_SMP:-1}" run=0 quiet=0 console_log="" baseline=""
while [ $# -gt 0 ]; do
    case "$1" in
        --port) port=$2; shift 2 ;;
        --log) logfile=$2; shift 2 ;;
        --monitor) monitor=$2; shift 2 ;;
        --quiet) quiet=1; shift ;;
        --console-log) console_log=$2; shift 2 ;;
        --vmm) vmm=$2; shift 2 ;;
        --vmm-baseline) baseline=$2; shift 2 ;;
        --agent) agent=$2; shift 2 ;;
        --mem) mem=$2; shift 2 ;;
        --smp) smp=$2; shift 2 ;;
        --run) run=1; shift; [ "${1:-}" = "--" ] && shift; break ;;
        -h|--help) sed -n '2,/^\. /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

need_cmd qemu-system-x86_64 qemu-system-x86
[ $quiet = 1 ] && export RUN_QUIET=1
quietly build-testhost "$RES/build-testhost.sh" >&2
T="$BUILD/testhost"

if [ "$vmm" != none ] && [ ! -x "$vmm" ]; then
    [ "$vmm" = "$ROOT/target/release/vmm" ] || die "no VMM binary at $vmm"
    log "building the VMM: cargo build --release -p vmm"
    (cd "$ROOT" && quietly cargo cargo build --release -p vmm >&2)
fi
if [ -z "$agent" ]; then
    for a in "$ROOT/target/release/testhost-agent" "$ROOT/target/debug/testhost-agent"; do
        [ -x "$a" ] && { [ -z "$agent" ] || [ "$a" -nt "$agent" ]; } && agent=$a
    done
    if [ -z "$agent" ]; then
        log "building the agent: cargo build --release -p e2e --bin testhost-agent"
        (cd "$ROOT" && quietly cargo cargo build --release -p e2e --bin testhost-agent >&2)
        agent="$ROOT/target/release/testhost-agent"
    fi
fi

# The overlay: binaries (debug info stripped: smaller, same symbols), every library ldd names and
# the dynamic loader, at the same paths as here (the test host's kernel runs this glibc fine).
OV="$T/overlay-$port"
rm -rf "$OV"; mkdir -p "$OV/bin" "$OV/etc"
add_binary() {
    local src=$1 name=$2 lib
    objcopy --strip-debug "$src" "$OV/bin/$name" 2>/dev/null || cp "$src" "$OV/bin/$name"
    chmod 755 "$OV/bin/$name"
    for lib in $(ldd "$src" 2>/dev/null | sed -n 's/.*=> \(\/[^ ]*\) .*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) (.*/\1/p'); do
        mkdir -p "$OV$(dirname "$lib")"
        [ -e "$OV$lib" ] || cp -L "$lib" "$OV$lib"
    done
}
[ "$vmm" != none ] && add_binary "$vmm" vmm
# The host daemon and the client, when they were built beside the VMM (tests/tests/hostd.rs).
for b in hostd vmmctl; do
    if [ "$vmm" != none ] && [ -x "$(dirname "$vmm")/$b" ]; then add_binary "$(dirname "$vmm")/$b" "$b"; fi
done
[ "$agent" != none ] && add_binary "$agent" testhost-agent
[ -z "$baseline" ] || add_binary "$baseline" vmm-baseline
if [ $run = 1 ]; then
    [ "$vmm" != none ] || die "--run needs a VMM"
    printf '%s\n' "$@" > "$OV/etc/vmm-args"
fi
# The kernel unpacks concatenated archives in order (later files win). An uncompressed archive
# must start 4-byte aligned; zeros between archives are skipped, so pad the gzip'd base.
(cd "$OV" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$T/overlay-$port.cpio"
base_size=$(stat -c %s "$T/initramfs.cpio.gz")
{
    cat "$T/initramfs.cpio.gz"
    head -c $(( (512 - base_size % 512) % 512 )) /dev/zero
    cat "$T/overlay-$port.cpio"
} > "$T/initrd-$port.img"
rm -rf "$OV" "$T/overlay-$port.cpio"
# QEMU reads the initrd at start: hand it an open descriptor of an already deleted file, so no
# image is left behind whatever happens to QEMU later. The harness keeps each test host's files
# in build/testhost/runs/ and removes earlier runs' (tests/src/rundir.rs); files named in the
# layout before that go after two days.
exec 3<"$T/initrd-$port.img"
rm -f "$T/initrd-$port.img"
find "$T" -maxdepth 1 \( -name 'console-*.log' -o -name 'initrd-*.img' -o -name 'monitor-*.sock' \
    -o -name 'kallsyms-*.txt' \) -mtime +2 -delete 2>/dev/null || true

# TCG's TSC runs at this machine's rate; telling the kernel avoids a failed calibration under load.
# A soft lockup prints every CPU's stack, not only the stuck one's: a CPU spinning in the kernel
# is often waiting for another CPU, and that one's stack is the one that explains the hang.
khz=$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)
append="console=ttyS0 panic=-1 reboot=k tsc_early_khz=$khz softlockup_all_cpu_backtrace=1"
# testhost.quiet: the test host's init prints only its progress lines (resources/testhost/init).
[ $quiet = 1 ] && append+=" quiet testhost.quiet"
args=(
    -machine q35 -accel tcg,thread=multi -cpu EPYC,+svm,+npt -smp "$smp" -m "$mem" -no-reboot
    -kernel "$T/bzImage" -initrd /proc/self/fd/3 -append "$append"
    -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:7000" -device virtio-net-pci,netdev=n0
)
if [ -n "$logfile" ]; then
    args+=(-display none -serial "file:$logfile")
    # The monitor on a socket, to look at a hung test host from outside, e.g.
    # echo "info registers -a" | socat - UNIX-CONNECT:build/testhost/runs/RUN/HOST/monitor.sock
    [ -z "$monitor" ] || args+=(-monitor "unix:$monitor,server=on,wait=off")
else
    # What -nographic does (console and monitor multiplexed on the terminal, Ctrl-A X quits),
    # with a copy of the console in a file when asked.
    args+=(-display none -chardev "stdio,id=con,mux=on${console_log:+,logfile=$console_log}"
        -serial chardev:con -mon chardev=con)
fi
log "starting the test host: agent on 127.0.0.1:$port, memory $mem, $smp CPUs${logfile:+, console in $logfile}"
if [ $quiet = 1 ]; then
    # QEMU's warnings (e.g. the CPU features TCG does not emulate) are not the guest's console.
    mkdir -p "$LOGS"
    exec qemu-system-x86_64 "${args[@]}" 2>>"$LOGS/qemu.log"
fi
exec qemu-system-x86_64 "${args[@]}"
