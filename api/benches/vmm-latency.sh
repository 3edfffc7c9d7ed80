#!/usr/bin/env bash
# API latency against the real VMM, side by side for one or more VMM builds (the README's
# REST API table).
#
#   api/benches/vmm-latency.sh [VMM_BINARY...]      (default: target/release/vmm)
#
# For each binary: boot the default guest (build/guest/, resources/build-guest.sh) with a balloon
# and an API socket, directly on this host's /dev/kvm (the guest is still booting or idling: the
# VM is running, a vCPU busy), then run target/release/api-bench against it:
#   1. 50 clients in a closed loop, alternating GET /balloon and PATCH /balloon, 10 s;
#   2. the same clients paced at 20 req/s each;
#   3. no load, only the probe;
# each with one more client probing the VMM thread at 100 req/s (PUT /actions FlushMetrics,
# answered by the VMM thread's event loop: how quickly it turns round a wake-up under the load).
# ROUNDS (default 2) repeats the binaries alternately, so drift on a shared host hits all alike.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-2}
SECONDS_PER_ROW=${SECONDS_PER_ROW:-10}
[ $# -gt 0 ] || set -- target/release/vmm
cargo build --release -p api --bin api-bench -q
[ -f build/guest/bzImage ] || { echo "no build/guest/bzImage: run resources/build-guest.sh" >&2; exit 1; }
dir=$(mktemp -d /tmp/vmm-latency.XXXXXX)
pid=
trap '[ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
echo "host: $(nproc) cores, $(uptime)"
for round in $(seq "$ROUNDS"); do
  for vmm in "$@"; do
    sock=$dir/api.sock
    "$vmm" --kernel build/guest/bzImage --initramfs build/guest/initramfs.cpio.gz \
      --memory-mib 1024 --balloon "" --api-socket "$sock" --serial "$dir/console.log" \
      >"$dir/vmm.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
    echo
    echo "=== round $round: $vmm ($(uptime | sed 's/.*load/load/'))"
    target/release/api-bench run --socket "$sock" --clients 50 --seconds "$SECONDS_PER_ROW" --probe-rate 100
    target/release/api-bench run --socket "$sock" --clients 50 --seconds "$SECONDS_PER_ROW" --rate 20 --probe-rate 100
    target/release/api-bench run --socket "$sock" --clients 1 --rate 1 --seconds "$SECONDS_PER_ROW" --probe-rate 100
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
    rm -f "$sock"
  done
done
