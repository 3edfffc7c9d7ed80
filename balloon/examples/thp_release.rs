//! What a balloon release does to host memory on 4 KiB pages and on transparent huge pages:
//! 1 GiB of guest RAM behind memory/'s manager, all of it faulted in, then a quarter of it
//! ballooned and released as the product does (deferred discard, one flush), either scattered
//! (64 pages in every MiB, no two adjacent) or contiguous (256 MiB). Prints the process's VmRSS,
//! its AnonHugePages, the system's free memory (MemFree plus the pages on the per-CPU free lists
//! of /proc/zoneinfo, where freed 4 KiB pages wait and MemFree does not count them; noisy on a
//! shared host: other processes allocate too) and the kernel's THP split counters, before and
//! after.
//!
//! `cargo run --release -p balloon --example thp_release -- [4k|thp] [scattered|contiguous] [--shrink]`
//!
//! `--shrink` (root) then writes 2 to /proc/sys/vm/drop_caches, which runs the kernel's shrinkers,
//! the deferred-split one included (it also drops the host's reclaimable slab caches).

use std::time::Duration;

use memory::{Backing, PageRange};
use vm_memory::{Bytes, GuestAddress};

const SIZE: u64 = 1 << 30;

fn field(path: &str, name: &str) -> i64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix(name)?;
            let rest = rest.strip_prefix(':').unwrap_or(rest);
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(-1)
}

#[derive(Clone, Copy)]
struct Snapshot {
    rss_kb: i64,
    anon_huge_kb: i64,
    free_kb: i64,
    split_page: i64,
    deferred_split: i64,
}

fn snapshot() -> Snapshot {
    Snapshot {
        rss_kb: field("/proc/self/status", "VmRSS"),
        anon_huge_kb: field("/proc/self/smaps_rollup", "AnonHugePages"),
        free_kb: field("/proc/meminfo", "MemFree") + per_cpu_free_pages() * 4,
        split_page: field("/proc/vmstat", "thp_split_page "),
        deferred_split: field("/proc/vmstat", "thp_deferred_split_page "),
    }
}

/// Pages on the per-CPU free lists (`count:` of every pageset in /proc/zoneinfo).
fn per_cpu_free_pages() -> i64 {
    std::fs::read_to_string("/proc/zoneinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("count:"))
        .filter_map(|v| v.trim().parse::<i64>().ok())
        .sum()
}

fn report(what: &str, a: Snapshot, b: Snapshot) {
    println!(
        "{what}: VmRSS {} -> {} MiB; AnonHugePages {} -> {} MiB; system free (incl. per-CPU lists) {:+} MiB; \
         thp_split_page {:+}; thp_deferred_split_page {:+}",
        a.rss_kb >> 10,
        b.rss_kb >> 10,
        a.anon_huge_kb >> 10,
        b.anon_huge_kb >> 10,
        (b.free_kb - a.free_kb) >> 10,
        b.split_page - a.split_page,
        b.deferred_split - a.deferred_split,
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let huge = args.iter().any(|a| a == "thp");
    let contiguous = args.iter().any(|a| a == "contiguous");
    let shrink = args.iter().any(|a| a == "--shrink");
    let backing = if huge {
        Backing::PrivateAnonymousHuge
    } else {
        Backing::PrivateAnonymous
    };
    let mut mm = balloon::testing::boot_ram_manager(SIZE, backing);
    for p in 0..SIZE >> 12 {
        mm.guest_memory()
            .write_obj(0xa5u8, GuestAddress(p << 12))
            .unwrap();
    }
    let pages: Vec<PageRange> = if contiguous {
        vec![PageRange::new(0x10000, 0x10000)] // 256 MiB from 256 MiB
    } else {
        (0..SIZE >> 20)
            .flat_map(|mib| (0..64).map(move |i| PageRange::page((mib << 8) + 2 * i)))
            .collect()
    };
    std::thread::sleep(Duration::from_secs(1));
    let before = snapshot();
    let t = std::time::Instant::now();
    mm.offline(&mm.page_ranges(&pages)).unwrap();
    let released = mm.flush_discards().unwrap();
    let took = t.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let after = snapshot();
    println!(
        "{} {}: {} MiB ballooned and released in {:.1} ms ({} discard calls)",
        if huge { "thp" } else { "4k" },
        if contiguous {
            "contiguous"
        } else {
            "scattered"
        },
        released >> 8,
        took.as_secs_f64() * 1e3,
        mm.stats().discard_calls
    );
    report("  2 s after the release", before, after);
    if shrink {
        std::fs::write("/proc/sys/vm/drop_caches", "2").expect("drop_caches (root only)");
        std::thread::sleep(Duration::from_secs(1));
        report("  after drop_caches=2 ", before, snapshot());
    }
}
