//! Hot-added memory through virtio-mem end to end with the Debian guest: a 512 MiB
//! guest with a 2 GiB hot-add region at 4 GiB, born offline. What a user checks from both sides:
//! the guest's MemTotal, GET /hotplug/memory, and the VMM's RSS on the host.
//!
//! The measured figures are printed with an `e2e-mem:` prefix (run with `--nocapture`).
//!
//! ```console
//! $ flock /tmp/e2e-qemu.lock cargo test --release -p e2e --test hotplug -- --nocapture --test-threads=1
//! ```

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const BOOT_MIB: u64 = 512;
const REGION_MIB: u64 = 2048;
const HOTPLUG: &str = "total_mib=2048";
/// Plugging or unplugging hundreds of MiB takes a while in the nested host.
const RESIZE: Duration = Duration::from_secs(300);
/// Linux's memmap for hot-added memory: 64 bytes of `struct page` per 4 KiB page.
const MEMMAP_KIB_PER_MIB: u64 = 16;

fn boot_hotplug(host: &e2e::TestHost, hotplug: Option<&str>) -> e2e::Vm {
    let socket = host.socket_path("hotplug");
    let mut extra = vec!["--api-socket", socket.as_str()];
    if let Some(h) = hotplug {
        extra.extend(["--hotplug", h]);
    }
    let vm = boot(host, BOOT_MIB, &extra);
    if hotplug.is_some() {
        assert_driver_bound(&vm, "virtio_mem");
    }
    vm
}

/// The VMM's figures for one VM at rest: total RSS, and what GET /vm/memory splits it into.
struct Footprint {
    rss_kib: u64,
    guest_rss_kib: u64,
    process_rss_kib: u64,
    /// Host-resident KiB of the hot-add region's backing, when there is one.
    hotplug_resident_kib: Option<u64>,
    guest: MemInfo,
}

impl Footprint {
    fn take(vm: &e2e::Vm) -> Self {
        let guest = stable_meminfo(vm);
        let rss_kib = stable_rss(vm);
        let map = api(vm, "GET", "/vm/memory?limit=1", None);
        let hotplug_resident_kib = map["regions"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["kind"] == "hotplug"))
            .map(|r| u(r, "resident_bytes") / 1024);
        Footprint {
            rss_kib,
            guest_rss_kib: u(&map, "/host/guest_rss_bytes") / 1024,
            process_rss_kib: u(&map, "/host/process_rss_bytes") / 1024,
            hotplug_resident_kib,
            guest,
        }
    }

    /// What the VMM itself holds beyond guest memory.
    fn own_kib(&self) -> u64 {
        self.process_rss_kib.saturating_sub(self.guest_rss_kib)
    }
}

/// A 2 GiB hot-add region with nothing plugged costs the host (almost) nothing: none of the
/// region's backing is resident, the VMM's own memory stays within 1 MiB of a boot-only VMM's,
/// and the guest sees only its boot memory.
#[test]
fn unplugged_region_costs_the_host_nothing() {
    let Some(host) = e2e::host() else { return };
    let plain = {
        let vm = boot_hotplug(host, None);
        Footprint::take(&vm)
    };
    let vm = boot_hotplug(host, Some(HOTPLUG));
    let hot = Footprint::take(&vm);
    eprintln!(
        "e2e-mem: VMM RSS, boot-only 512 MiB guest: {} KiB (guest memory {} KiB, VMM's own {} KiB); with a 2 GiB hot-add region, 0 plugged: {} KiB (guest memory {} KiB of which the region {} KiB, VMM's own {} KiB); difference {} KiB total, {} KiB VMM's own",
        plain.rss_kib,
        plain.guest_rss_kib,
        plain.own_kib(),
        hot.rss_kib,
        hot.guest_rss_kib,
        hot.hotplug_resident_kib.unwrap_or_default(),
        hot.own_kib(),
        delta(hot.rss_kib, plain.rss_kib),
        delta(hot.own_kib(), plain.own_kib()),
    );
    eprintln!(
        "e2e-mem: guest MemTotal boot-only {} KiB, with the region {} KiB",
        plain.guest.total, hot.guest.total
    );
    // What the region costs the host is its own resident backing plus what the VMM holds for it.
    // The whole-process RSS of two boots is not compared: how much of its boot RAM a Debian guest
    // touches differs by several MiB from one boot to the next (printed above), which says
    // nothing about the region.
    assert_eq!(
        plain.hotplug_resident_kib, None,
        "the boot-only VMM has no hot-add region"
    );
    assert_eq!(
        hot.hotplug_resident_kib,
        Some(0),
        "no page of the unplugged region may be resident on the host"
    );
    assert!(
        delta(hot.own_kib(), plain.own_kib()) <= MIB_KIB as i64,
        "the VMM's own memory with 2 GiB unplugged should be within 1 MiB of the boot-only VMM's: \
         {} vs {} KiB",
        hot.own_kib(),
        plain.own_kib()
    );
    assert!(
        hot.guest.total.abs_diff(plain.guest.total) <= 2 * MIB_KIB,
        "the guest starts with its boot memory only: {} vs {} KiB",
        hot.guest.total,
        plain.guest.total
    );
    let h = api(&vm, "GET", "/hotplug/memory", None);
    assert_eq!(
        (u(&h, "total_size_mib"), u(&h, "plugged_size_mib")),
        (REGION_MIB, 0),
        "{h}"
    );
    let map = api(&vm, "GET", "/vm/memory?reason=unplugged&limit=4", None);
    eprintln!(
        "e2e-mem: GET /vm/memory with 0 plugged: regions {} totals {}",
        map["regions"], map["totals"]
    );
    assert_eq!(
        u(&map, "/totals/unplugged_bytes"),
        REGION_MIB << 20,
        "{map}"
    );
    let region = map["regions"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["kind"] == "hotplug"))
        .unwrap_or_else(|| panic!("no hotplug region in {map}"));
    assert_eq!(
        u(region, "guest_phys_addr"),
        4 << 30,
        "placed at 4 GiB: {region}"
    );
    assert_eq!(u(region, "size_bytes"), REGION_MIB << 20, "{region}");
    // Born offline: one run covering the whole region.
    let runs = &map["offline"][0]["runs"];
    assert_eq!(
        runs.as_array().map(Vec::len),
        Some(1),
        "one unplugged run: {runs}"
    );
    assert_eq!(u(&runs[0], "pages"), (REGION_MIB << 20) / 4096, "{runs}");
}

/// Plug 1 GiB: MemTotal grows by 1 GiB, the host spends memory only when the guest writes it.
/// Unplug down to 256 MiB: Linux gives back what it can, the host's RSS falls, and data the
/// guest wrote survives (Linux migrates it out of the blocks it unplugs).
// Long: one guest plugged then unplugged; the unplug checks depend on what plugging did.
#[test]
fn plug_one_gib_then_unplug_to_256_mib() {
    let Some(host) = e2e::host() else { return };
    let vm = boot_hotplug(host, Some(HOTPLUG));
    let guest0 = stable_meminfo(&vm);
    let rss0 = stable_rss(&vm);
    eprintln!("e2e-mem: hot-add: 0 plugged: VMM RSS {rss0} KiB; guest {guest0}");
    assert!(
        guest0.total <= BOOT_MIB * MIB_KIB && guest0.total >= BOOT_MIB * MIB_KIB * 8 / 10,
        "the guest starts with ~{BOOT_MIB} MiB: {guest0}"
    );

    // Plug 1 GiB.
    let want = 1024 * MIB_KIB;
    let t0 = Instant::now();
    api(
        &vm,
        "PATCH",
        "/hotplug/memory",
        Some(json!({ "requested_size_mib": 1024 })),
    );
    let mut memtotal_at = None;
    let mut plugged_at = None;
    let (guest1, _) = wait_until(
        &vm,
        "MemTotal +1 GiB and plugged_size 1024 MiB",
        RESIZE,
        Duration::from_millis(200),
        || {
            let h = api(&vm, "GET", "/hotplug/memory", None);
            if plugged_at.is_none() && u(&h, "plugged_size_mib") == 1024 {
                plugged_at = Some(t0.elapsed());
            }
            let m = meminfo(&vm);
            if memtotal_at.is_none() && m.total >= guest0.total + want - MEMMAP_KIB_PER_MIB * 1024 {
                memtotal_at = Some(t0.elapsed());
            }
            match (memtotal_at, plugged_at) {
                (Some(_), Some(_)) => Ok(m),
                _ => Err(format!("{h}; guest {m}")),
            }
        },
    );
    let guest1 = {
        let settled = stable_meminfo(&vm);
        assert!(settled.total >= guest1.total);
        settled
    };
    let rss1 = stable_rss(&vm);
    let h = api(&vm, "GET", "/hotplug/memory", None);
    eprintln!(
        "e2e-mem: hot-add: requested 1024 MiB: MemTotal +{} KiB after {:.2} s, plugged_size 1024 MiB after {:.2} s; VMM RSS {rss1} KiB (+{} KiB before the guest writes); {h}",
        guest1.total - guest0.total,
        memtotal_at.unwrap().as_secs_f64(),
        plugged_at.unwrap().as_secs_f64(),
        delta(rss1, rss0),
    );
    let grown = guest1.total - guest0.total;
    assert!(
        grown <= want && grown >= want - MEMMAP_KIB_PER_MIB * 1024,
        "MemTotal grows by 1 GiB within the memmap cost: +{grown} KiB"
    );
    assert_eq!(u(&h, "plugged_size_mib"), 1024, "{h}");
    // Plugging spends no host memory for the new pages; the guest's struct pages for them (16
    // MiB, in boot memory) and bookkeeping are all it may cost.
    assert!(
        delta(rss1, rss0) <= 2 * (MEMMAP_KIB_PER_MIB * 1024) as i64,
        "host RSS grows only as the guest writes: {rss0} -> {rss1} KiB after plugging"
    );

    // The guest writes to it: the host backs what it writes. More than boot memory has free,
    // so most of it lands in the hot-added (movable) memory.
    let alloc_mib = 768;
    let pattern_mib = 128;
    vm.run(&format!("alloc {alloc_mib}"), RESIZE)
        .expect("the guest allocates into its new memory");
    let rss2 = stable_rss(&vm);
    eprintln!(
        "e2e-mem: hot-add: guest touched {alloc_mib} MiB: VMM RSS {rss1} -> {rss2} KiB (+{} KiB)",
        delta(rss2, rss1)
    );
    assert!(
        delta(rss2, rss1) >= (alloc_mib * MIB_KIB / 2) as i64,
        "host RSS grows as the guest writes: {rss1} -> {rss2} KiB"
    );
    vm.run("alloc-free", CMD).unwrap();
    let written = vm
        .run(&format!("pattern write {pattern_mib}"), RESIZE)
        .expect("pattern write");
    let sum = pattern_sum(&written, "GUEST-PATTERN-WRITTEN");
    let rss3 = stable_rss(&vm);

    // Unplug down to 256 MiB: wait until plugged_size reaches it or stops moving.
    api(
        &vm,
        "PATCH",
        "/hotplug/memory",
        Some(json!({ "requested_size_mib": 256 })),
    );
    let mut last = (u64::MAX, Instant::now());
    let (plugged, took) = wait_until(
        &vm,
        "plugged_size to converge toward 256 MiB",
        RESIZE,
        Duration::from_millis(500),
        || {
            let p = u(
                &api(&vm, "GET", "/hotplug/memory", None),
                "plugged_size_mib",
            );
            if p != last.0 {
                last = (p, Instant::now());
            }
            if p == 256 || (p < 1024 && last.1.elapsed() > Duration::from_secs(30)) {
                Ok(p)
            } else {
                Err(format!("plugged {p} MiB"))
            }
        },
    );
    let converged = if plugged == 256 {
        took
    } else {
        took - last.1.elapsed()
    };
    let guest2 = stable_meminfo(&vm);
    let rss4 = stable_rss(&vm);
    let map = api(&vm, "GET", "/vm/memory?limit=1", None);
    let unplugged = 1024 - plugged;
    eprintln!(
        "e2e-mem: hot-add: requested 256 MiB: plugged_size converged to {plugged} MiB in {:.2} s; guest {guest2}; VMM RSS {rss3} -> {rss4} KiB (fell {} KiB for {unplugged} MiB unplugged); totals {}",
        converged.as_secs_f64(),
        delta(rss3, rss4),
        map["totals"]
    );
    assert!(plugged < 1024, "Linux unplugged something");
    assert!(
        guest2.total.abs_diff(guest0.total + plugged * MIB_KIB) <= 4 * MIB_KIB,
        "MemTotal follows plugged_size ({plugged} MiB): {guest0} -> {guest2}"
    );
    assert_eq!(
        u(&map, "/totals/unplugged_bytes"),
        (REGION_MIB - plugged) << 20,
        "{map}"
    );
    // The guest wrote alloc + pattern = 896 MiB into the 1024 plugged (movable memory comes
    // first for user pages), so at most 128 MiB of what was unplugged was never touched, and
    // Linux may have migrated up to the 128 MiB pattern out of it into pages the host had not
    // backed yet. Everything else the host must give back.
    let untouched_mib = 1024 - alloc_mib - pattern_mib;
    let must_fall = unplugged.saturating_sub(untouched_mib + pattern_mib) * MIB_KIB * 9 / 10;
    assert!(
        delta(rss3, rss4) >= must_fall as i64,
        "host RSS falls with the unplugged memory: {rss3} -> {rss4} KiB, expected at least {must_fall} KiB"
    );

    // The data the guest wrote is intact.
    let out = vm
        .run("pattern verify", RESIZE)
        .expect("pattern intact after unplug");
    assert_eq!(pattern_sum(&out, "GUEST-PATTERN-OK"), sum, "{out}");
    eprintln!(
        "e2e-mem: hot-add: 128 MiB pattern intact after unplugging {unplugged} MiB, sum={sum}"
    );
    assert_guest_healthy(&vm);
}
