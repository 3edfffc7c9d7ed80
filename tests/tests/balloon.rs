//! virtio-balloon end to end with the Debian guest: what a user checks from both sides,
//! the guest's /proc/meminfo and the VMM's RSS on the host.
//!
//! Each test boots one 1 GiB, 1-vCPU guest and runs several checks on it. The measured figures
//! are printed with an `e2e-mem:` prefix (run with `--nocapture`) for the README.
//!
//! ```console
//! $ flock /tmp/e2e-qemu.lock cargo test --release -p e2e --test balloon -- --nocapture --test-threads=1
//! ```

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const GUEST_MIB: u64 = 1024;
const BALLOON_MIB: u64 = 256;
/// Inflating or deflating 256 MiB takes seconds in the nested host; allow for a loaded machine.
const RESIZE: Duration = Duration::from_secs(300);

fn boot_with_balloon(host: &e2e::TestHost, balloon: &str) -> e2e::Vm {
    boot_with_balloon_and_cmdline(host, balloon, "")
}

fn boot_with_balloon_and_cmdline(
    host: &e2e::TestHost,
    balloon: &str,
    kernel_args: &str,
) -> e2e::Vm {
    let socket = host.socket_path("balloon");
    let vm = boot_with_cmdline(
        host,
        GUEST_MIB,
        kernel_args,
        &["--balloon", balloon, "--api-socket", &socket],
    );
    assert_driver_bound(&vm, "virtio_balloon");
    vm
}

/// Has the guest touch (almost) all the memory it can use, then free it again, so that the host
/// backs it: afterwards whatever the balloon takes is memory the host really holds.
fn touch_then_free(vm: &e2e::Vm) -> u64 {
    let m = stable_meminfo(vm);
    let mib = m.available / MIB_KIB - 64;
    vm.run(&format!("alloc {mib}"), RESIZE)
        .expect("the guest allocates and touches its free memory");
    vm.run("alloc-free", CMD).unwrap();
    mib
}

/// Inflate by 256 MiB after the guest touched its memory: the guest loses 256 MiB, the host gets
/// at least 90% of it back; deflating to 0 gives the guest everything back. Then 5 inflate and
/// deflate cycles leave a checksummed pattern the guest wrote intact.
#[test]
fn inflate_returns_memory_to_the_host_and_deflate_restores_the_guest() {
    let Some(host) = e2e::host() else { return };
    // No free page reporting and no deflate-on-OOM: the RSS drop is the balloon's alone, and
    // without DEFLATE_ON_OOM Linux takes ballooned pages out of MemTotal.
    let vm = boot_with_balloon(
        host,
        "amount_mib=0,deflate_on_oom=false,stats_interval_s=0,free_page_reporting=false",
    );
    let touched = touch_then_free(&vm);
    let guest0 = stable_meminfo(&vm);
    let rss0 = stable_rss(&vm);
    eprintln!("e2e-mem: balloon 0 MiB after the guest touched {touched} MiB: VMM RSS {rss0} KiB; guest {guest0}");

    // Inflate.
    let t0 = Instant::now();
    let took = balloon_to(&vm, BALLOON_MIB, RESIZE);
    eprintln!(
        "e2e-mem: PATCH /balloon {BALLOON_MIB} MiB -> actual == target in {:.2} s",
        took.as_secs_f64()
    );
    let guest1 = stable_meminfo(&vm);
    let rss1 = stable_rss(&vm);
    let settled = t0.elapsed();
    let map = api(&vm, "GET", "/vm/memory?limit=1", None);
    eprintln!(
        "e2e-mem: balloon {BALLOON_MIB} MiB: VMM RSS {rss1} KiB (fell {} KiB, {:.1}% of {BALLOON_MIB} MiB; RSS settled {:.1} s after the PATCH); guest {guest1}; GET /vm/memory totals {}",
        delta(rss0, rss1),
        delta(rss0, rss1) as f64 * 100.0 / (BALLOON_MIB * MIB_KIB) as f64,
        settled.as_secs_f64(),
        map["totals"]
    );
    let want = BALLOON_MIB * MIB_KIB;
    let total_drop = guest0.total - guest1.total;
    assert!(
        total_drop.abs_diff(want) <= want / 50,
        "guest MemTotal should drop by {want} KiB, dropped {total_drop} KiB: {guest0} -> {guest1}"
    );
    assert!(
        delta(guest0.available, guest1.available) >= (want * 9 / 10) as i64,
        "guest MemAvailable should drop by about {want} KiB: {guest0} -> {guest1}"
    );
    assert!(
        delta(rss0, rss1) >= (want * 9 / 10) as i64,
        "the VMM's RSS should fall by at least 90% of {want} KiB: {rss0} -> {rss1} KiB"
    );
    assert_eq!(
        u(&map, "/totals/ballooned_bytes"),
        BALLOON_MIB << 20,
        "GET /vm/memory: {map}"
    );

    // Deflate to 0: the guest has all its memory again.
    let took = balloon_to(&vm, 0, RESIZE);
    let guest2 = stable_meminfo(&vm);
    let rss2 = stable_rss(&vm);
    eprintln!(
        "e2e-mem: balloon back to 0 in {:.2} s: VMM RSS {rss2} KiB; guest {guest2}",
        took.as_secs_f64()
    );
    assert_eq!(
        guest2.total, guest0.total,
        "MemTotal restored: {guest0} -> {guest2}"
    );
    assert!(
        guest2.available + 64 * MIB_KIB >= guest0.available,
        "MemAvailable restored: {guest0} -> {guest2}"
    );
    // What a user means by "restored": the guest can use as much memory as before.
    vm.run(&format!("alloc {touched}"), RESIZE)
        .expect("after deflating, the guest allocates as much as before the balloon");
    vm.run("alloc-free", CMD).unwrap();

    // Data survives 5 cycles.
    let written = vm.run("pattern write 128", RESIZE).expect("pattern write");
    let sum = pattern_sum(&written, "GUEST-PATTERN-WRITTEN");
    let mut times = Vec::new();
    for cycle in 1..=5 {
        let up = balloon_to(&vm, BALLOON_MIB, RESIZE);
        if cycle == 3 {
            let out = vm
                .run("pattern verify", RESIZE)
                .expect("pattern intact while inflated");
            assert_eq!(pattern_sum(&out, "GUEST-PATTERN-OK"), sum, "{out}");
        }
        let down = balloon_to(&vm, 0, RESIZE);
        times.push(format!("{:.1}/{:.1}", up.as_secs_f64(), down.as_secs_f64()));
    }
    let out = vm
        .run("pattern verify", RESIZE)
        .expect("pattern intact after 5 cycles");
    assert_eq!(pattern_sum(&out, "GUEST-PATTERN-OK"), sum, "{out}");
    eprintln!(
        "e2e-mem: 5 inflate/deflate cycles of {BALLOON_MIB} MiB (s up/down: {}): 128 MiB pattern intact, sum={sum}; guest {}",
        times.join(", "),
        stable_meminfo(&vm)
    );
    assert_guest_healthy(&vm);
}

/// With the balloon inflated and DEFLATE_ON_OOM, the guest allocates more than it has left: it
/// stays alive (the allocation succeeds, or the OOM killer acts without a panic) and the balloon
/// shrinks without any change of the target.
#[test]
fn deflate_on_oom_keeps_the_guest_alive() {
    let Some(host) = e2e::host() else { return };
    let vm = boot_with_balloon(
        host,
        "amount_mib=0,deflate_on_oom=true,stats_interval_s=0,free_page_reporting=false",
    );
    let inflated = 768;
    let took = balloon_to(&vm, inflated, RESIZE);
    let before = stable_meminfo(&vm);
    let b0 = api(&vm, "GET", "/balloon", None);
    eprintln!(
        "e2e-mem: deflate-on-OOM: balloon at {inflated} MiB after {:.1} s; guest {before}",
        took.as_secs_f64()
    );
    let ask = before.available / MIB_KIB + 128;
    let t0 = Instant::now();
    let (status, out) = vm
        .run_status(&format!("alloc {ask}"), Duration::from_secs(600))
        .expect("the guest shell answers while under memory pressure");
    let after = stable_meminfo(&vm);
    let b1 = api(&vm, "GET", "/balloon", None);
    let ooms = vm.console().matches("Out of memory").count();
    eprintln!(
        "e2e-mem: deflate-on-OOM: guest asked for {ask} MiB with {} KiB available: status {status} in {:.1} s ({}), {ooms} OOM-killer messages; balloon actual {} -> {} MiB (target {} MiB); guest {after}",
        before.available,
        t0.elapsed().as_secs_f64(),
        out.lines().last().unwrap_or_default(),
        u(&b0, "actual_mib"),
        u(&b1, "actual_mib"),
        u(&b1, "amount_mib"),
    );
    assert_guest_healthy(&vm);
    assert_eq!(
        u(&b1, "target_pages"),
        inflated * 256,
        "the target is unchanged: {b1}"
    );
    assert!(
        u(&b1, "actual_pages") < u(&b0, "actual_pages"),
        "the guest took pages back from the balloon: {b0} -> {b1}"
    );
    vm.run("alloc-free", CMD).unwrap();
}

/// Free page reporting gives freed guest memory back to the host with no target change, and the
/// statistics follow the guest's memory use.
// Long: one guest allocates and frees memory; each check reads the state the last step left.
#[test]
fn free_page_reporting_and_statistics_follow_the_guest() {
    let Some(host) = e2e::host() else { return };
    let vm = boot_with_balloon(
        host,
        "amount_mib=0,deflate_on_oom=false,stats_interval_s=1,free_page_reporting=true",
    );
    let guest0 = stable_meminfo(&vm);
    let (stats0, _) = wait_until(
        &vm,
        "the first statistics report",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || {
            let s = api(&vm, "GET", "/balloon/statistics", None);
            if s.get("free_memory").is_some() && s.get("age_ms").is_some() {
                Ok(s)
            } else {
                Err(s.to_string())
            }
        },
    );
    eprintln!("e2e-mem: statistics: {stats0}");
    for tag in [
        "free_memory",
        "total_memory",
        "available_memory",
        "major_faults",
        "minor_faults",
    ] {
        assert!(stats0.get(tag).is_some(), "no {tag} in {stats0}");
    }
    assert!(
        (u(&stats0, "total_memory") / 1024).abs_diff(guest0.total) <= 4 * MIB_KIB,
        "stats total_memory agrees with MemTotal {} KiB: {stats0}",
        guest0.total
    );
    assert!(u(&stats0, "age_ms") < 30_000, "fresh statistics: {stats0}");

    let rss0 = stable_rss(&vm);
    // The baseline is a report made after the guest settled (the first one can come while the
    // init is still busy, with less free memory than at rest).
    let t_settled = Instant::now();
    let (settled, _) = wait_until(
        &vm,
        "a statistics report made after the guest settled",
        Duration::from_secs(60),
        Duration::from_millis(250),
        || {
            let s = api(&vm, "GET", "/balloon/statistics", None);
            // A report younger than the wait was made after the guest settled.
            if u(&s, "age_ms") < t_settled.elapsed().as_millis() as u64 {
                Ok(s)
            } else {
                Err(s.to_string())
            }
        },
    );
    let free0 = u(&settled, "free_memory");
    let alloc_mib = 600;
    vm.run(&format!("alloc {alloc_mib}"), RESIZE)
        .expect("alloc in the guest");
    let rss1 = stable_rss(&vm);
    let (stats1, took) = wait_until(
        &vm,
        "statistics showing the allocation",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            let s = api(&vm, "GET", "/balloon/statistics", None);
            if u(&s, "free_memory") + (alloc_mib << 20) * 8 / 10 <= free0 {
                Ok(s)
            } else {
                Err(s.to_string())
            }
        },
    );
    eprintln!(
        "e2e-mem: free page reporting: after the guest touched {alloc_mib} MiB: VMM RSS {rss0} -> {rss1} KiB; stats free_memory {} -> {} MiB ({:.1} s to show it)",
        free0 >> 20,
        u(&stats1, "free_memory") >> 20,
        took.as_secs_f64()
    );
    assert!(
        delta(rss1, rss0) >= (alloc_mib * MIB_KIB * 9 / 10) as i64,
        "the guest's allocation shows in the VMM's RSS: {rss0} -> {rss1} KiB"
    );

    // Free it: the guest reports the free pages and the host lets them go.
    let t0 = Instant::now();
    vm.run("alloc-free", CMD).unwrap();
    let want_fall = (alloc_mib * MIB_KIB * 3 / 4) as i64;
    let (rss2, took) = wait_until(
        &vm,
        "the VMM's RSS to fall after the guest freed its allocation",
        Duration::from_secs(180),
        Duration::from_secs(1),
        || {
            let r = vm.rss_kib().expect("rss");
            if delta(rss1, r) >= want_fall {
                Ok(r)
            } else {
                Err(format!("RSS {r} KiB (was {rss1} KiB)"))
            }
        },
    );
    let rss3 = stable_rss(&vm);
    let b = api(&vm, "GET", "/balloon", None);
    let map = api(&vm, "GET", "/vm/memory?limit=1", None);
    eprintln!(
        "e2e-mem: free page reporting: guest freed {alloc_mib} MiB: VMM RSS {rss1} -> {rss2} KiB in {:.1} s, settled at {rss3} KiB (fell {} KiB, {:.0}% of {alloc_mib} MiB; {:.1} s after the free); balloon {b}; counters {}",
        took.as_secs_f64(),
        delta(rss1, rss3),
        delta(rss1, rss3) as f64 * 100.0 / (alloc_mib * MIB_KIB) as f64,
        t0.elapsed().as_secs_f64(),
        map["counters"]
    );
    assert_eq!(
        (u(&b, "target_pages"), u(&b, "actual_pages")),
        (0, 0),
        "no balloon target change: {b}"
    );
    assert_eq!(
        u(&map, "/totals/ballooned_bytes"),
        0,
        "reported pages are not ballooned: {map}"
    );

    // The statistics see the memory come back.
    let free1 = u(&stats1, "free_memory");
    let (stats2, _) = wait_until(
        &vm,
        "statistics showing the memory freed",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            let s = api(&vm, "GET", "/balloon/statistics", None);
            if u(&s, "free_memory") >= free1 + (alloc_mib << 20) * 8 / 10 {
                Ok(s)
            } else {
                Err(s.to_string())
            }
        },
    );
    eprintln!(
        "e2e-mem: statistics after the free: free_memory {} MiB, age {} ms",
        u(&stats2, "free_memory") >> 20,
        u(&stats2, "age_ms")
    );
    // The interval can be changed at run time.
    api(
        &vm,
        "PATCH",
        "/balloon/statistics",
        Some(json!({ "stats_polling_interval_s": 2 })),
    );
    let b = api(&vm, "GET", "/balloon", None);
    assert_eq!(u(&b, "stats_polling_interval_s"), 2, "{b}");
    assert_guest_healthy(&vm);
}

/// Benchmark (not run by default: two more boots): inflation time for 256 MiB with the guest
/// kernel's default `init_on_alloc=1` (Debian) and with `init_on_alloc=0`, on memory the guest
/// touched first and, the second time, on pages whose host backing the first inflation discarded
/// (the guest's zeroing faults them back in). Design section 9 asks for both figures.
///
/// ```console
/// $ flock /tmp/e2e-qemu.lock cargo test --release -p e2e --test balloon -- --ignored --nocapture --test-threads=1
/// ```
#[test]
#[ignore = "benchmark: two more guest boots; run with --ignored"]
fn bench_inflate_time_with_and_without_init_on_alloc() {
    let Some(host) = e2e::host() else { return };
    for kernel_args in ["", "init_on_alloc=0"] {
        let vm = boot_with_balloon_and_cmdline(
            host,
            "amount_mib=0,deflate_on_oom=false,stats_interval_s=0,free_page_reporting=false",
            kernel_args,
        );
        touch_then_free(&vm);
        let rss0 = stable_rss(&vm);
        let first = balloon_to(&vm, BALLOON_MIB, RESIZE);
        let rss1 = stable_rss(&vm);
        let down = balloon_to(&vm, 0, RESIZE);
        let again = balloon_to(&vm, BALLOON_MIB, RESIZE);
        let rss2 = stable_rss(&vm);
        eprintln!(
            "e2e-mem: bench: {BALLOON_MIB} MiB inflate with {:?}: {:.2} s on touched memory (VMM RSS {rss0} -> {rss1} KiB), deflate {:.2} s, re-inflate {:.2} s (VMM RSS {rss2} KiB)",
            if kernel_args.is_empty() { "init_on_alloc=1 (default)" } else { kernel_args },
            first.as_secs_f64(),
            down.as_secs_f64(),
            again.as_secs_f64(),
        );
        assert!(delta(rss0, rss1) >= (BALLOON_MIB * MIB_KIB * 9 / 10) as i64);
    }
}
