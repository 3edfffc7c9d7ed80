#!/bin/bash
# Runs every test of the project on a fresh Debian machine (the README's test command; .ci/run
# calls it): installs the Debian packages the tests need, builds the guest image and the nested
# test host from Debian packages, builds the VMM and the test agent, then runs the whole cargo
# test suite. End-to-end tests need KVM: directly where /dev/kvm boots stock kernels, otherwise in
# the nested test host (QEMU TCG + kvm_amd). E2E_REQUIRE=1 makes a missing KVM a failure rather
# than a loud skip.
#
# Usage: resources/test-all.sh [extra cargo test args...]
. "$(dirname "$0")/lib.sh"

cd "$ROOT"
need_cmd qemu-system-x86_64 qemu-system-x86
need_cmd xz xz-utils
need_cmd cpio cpio

start=$(date +%s)
step() { log "$* ($(($(date +%s) - start)) s)"; }

step "guest image"
"$RES/build-guest.sh"
step "VMM and test agent (release)"
cargo build --release -p vmm -p e2e --bins
step "nested test host image"
"$RES/build-testhost.sh"

export E2E_REQUIRE="${E2E_REQUIRE:-1}"
# One run for every test binary below: each keeps its test host's files (console log, QEMU
# monitor socket, kernel symbols) in build/testhost/runs/$E2E_RUN/, and the next run removes them.
export E2E_RUN="${E2E_RUN:-$(date +%Y%m%d-%H%M%S)-$$}"
step "unit, property and KVM tests"
cargo test --workspace --release --exclude e2e "$@"
# One nested test host per test binary, one VM at a time inside it: the machine has 2 cores.
# A binary that fails is run once more and the retry is reported: QEMU's TCG emulation of SVM
# has been seen to hang the nested test host's own kernel (about 1 session in 8 under heavy
# load), which no code of ours can prevent. A binary that fails twice fails the run.
step "end-to-end tests"
cargo test --release -p e2e --lib --bins "$@"
passed=0 failed=() retried=()
for f in tests/tests/*.rs; do
    t=$(basename "$f" .rs)
    if cargo test --release -p e2e --test "$t" "$@" -- --test-threads=1; then
        passed=$((passed + 1))
        continue
    fi
    log "e2e: $t FAILED; running it once more (see above for the failure)"
    retried+=("$t")
    if cargo test --release -p e2e --test "$t" "$@" -- --test-threads=1; then
        passed=$((passed + 1))
    else
        failed+=("$t")
    fi
done
[ ${#retried[@]} -eq 0 ] || log "e2e: passed only on retry or failed twice: ${retried[*]}"
step "end-to-end test binaries done"
echo "e2e: $passed passed, ${#failed[@]} failed"
[ ${#failed[@]} -eq 0 ] || die "end-to-end tests failed: ${failed[*]}"
