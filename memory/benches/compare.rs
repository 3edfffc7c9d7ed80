//! Side-by-side comparison of the tracker with BTreeSet<u64>, HashSet<u64>, RoaringTreemap and a
//! flat bitmap on balloon-shaped workloads: ns/op (min and median of N runs), peak heap bytes and
//! bytes per offline page, printed as Markdown tables.
//!
//!   cargo bench -p memory --bench compare -- [--sizes 4,256] [--reps 5] [--only WORKLOAD[:STRUCT]]
//!
//! Defaults: 4 GiB, 5 runs (BENCH_QUICK=1: 1 run).
//!
//! Workloads: single, runs, hotadd, lookup, iterate, density. Under callgrind, the instructions of
//! one workload are those of `measured_workload` (see benches/run.sh).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeSet, HashSet};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use common::*;
use memory::tracker::Tracker;
use roaring::RoaringTreemap;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator and only updates two atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: our caller upholds `GlobalAlloc::alloc`'s contract for `l` (non-zero size),
        // which is exactly what `System.alloc` requires.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Relaxed) + l.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Relaxed);
        // SAFETY: `p` came from `System.alloc` with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: our caller passes a `p` this allocator returned for `l` (every block comes from
        // `System`) and a valid `new` size, which is what `System.realloc` requires.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            if new >= l.size() {
                let now = LIVE.fetch_add(new - l.size(), Relaxed) + new - l.size();
                PEAK.fetch_max(now, Relaxed);
            } else {
                LIVE.fetch_sub(l.size() - new, Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const GIB_PAGES: u64 = 1 << 18;

/// The timed part of a workload. Not inlined, so callgrind can count just this.
#[inline(never)]
fn measured_workload<T>(f: impl FnOnce() -> T) -> T {
    f()
}

struct Sample {
    ns: f64,
    peak: usize,
    per_page: f64,
}

struct Row {
    workload: String,
    structure: &'static str,
    unit: &'static str,
    ops: u64,
    samples: Vec<Sample>,
}

fn fmt_bytes(b: f64) -> String {
    if b >= (1 << 20) as f64 {
        format!("{:.1} MiB", b / (1 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

/// Nanoseconds per operation, or milliseconds for a whole workload (`ms`), so that rows of one
/// workload are in one unit.
fn fmt_ns(ns: f64, ms: bool) -> String {
    if ms || ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{ns:.1}")
    }
}

impl Row {
    fn print(&self) {
        let mut ns: Vec<f64> = self.samples.iter().map(|s| s.ns).collect();
        ns.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let min = ns[0];
        let med = ns[ns.len() / 2];
        let peak = self.samples.iter().map(|s| s.peak).max().unwrap_or(0);
        let pp = self.samples[0].per_page;
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            self.workload,
            self.structure,
            self.unit,
            self.ops,
            fmt_ns(min, self.unit.starts_with("whole")),
            fmt_ns(med, self.unit.starts_with("whole")),
            fmt_bytes(peak as f64),
            if pp.is_nan() {
                "-".into()
            } else {
                format!("{pp:.3}")
            }
        );
    }
}

struct Opts {
    sizes: Vec<u64>,
    reps: usize,
    only: Option<(String, Option<String>)>,
}

impl Opts {
    fn wants(&self, workload: &str, structure: &str) -> bool {
        match &self.only {
            None => true,
            Some((w, s)) => {
                w == workload
                    && s.as_ref()
                        .is_none_or(|s| structure.to_lowercase().contains(s))
            }
        }
    }
}

/// Runs `one` `reps` times and prints a row. `one` returns (ns per op, peak, bytes per page).
fn run<S: PageSet>(
    o: &Opts,
    workload: &str,
    label: &str,
    (unit, ops): (&'static str, u64),
    mut one: impl FnMut() -> Sample,
) {
    if !o.wants(workload, S::NAME) {
        return;
    }
    let samples = (0..o.reps).map(|_| one()).collect();
    Row {
        workload: label.to_string(),
        structure: S::NAME,
        unit,
        ops,
        samples,
    }
    .print();
}

fn begin() -> usize {
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    base
}

/// 25% of the pages as single pages in random order, then removed in another order.
fn single<S: PageSet>(o: &Opts, gib: u64, pages: &[u64], order: &[u64]) {
    let universe = gib * GIB_PAGES;
    run::<S>(
        o,
        "single",
        &format!("single {gib} GiB"),
        ("insert or remove", 2 * pages.len() as u64),
        || {
            let base = begin();
            let t0 = Instant::now();
            let per_page = measured_workload(|| {
                let mut s = S::new(universe);
                for &p in pages {
                    black_box(s.insert(p));
                }
                let heap = LIVE.load(Relaxed) - base;
                for &p in order {
                    black_box(s.remove(p));
                }
                heap as f64 / pages.len() as f64
            });
            let ns = t0.elapsed().as_nanos() as f64 / (2 * pages.len()) as f64;
            Sample {
                ns,
                peak: PEAK.load(Relaxed) - base,
                per_page,
            }
        },
    );
}

/// Random runs of 1..512 pages to 25%, then removed in another order.
fn runs<S: PageSet>(o: &Opts, gib: u64, runs: &[(u64, u64)], order: &[(u64, u64)]) {
    let universe = gib * GIB_PAGES;
    let total: u64 = runs.iter().map(|r| r.1).sum();
    run::<S>(
        o,
        "runs",
        &format!("runs {gib} GiB"),
        ("run insert or remove", 2 * runs.len() as u64),
        || {
            let base = begin();
            let t0 = Instant::now();
            let per_page = measured_workload(|| {
                let mut s = S::new(universe);
                for &(a, n) in runs {
                    black_box(s.insert_range(a, n));
                }
                let heap = LIVE.load(Relaxed) - base;
                for &(a, n) in order {
                    black_box(s.remove_range(a, n));
                }
                heap as f64 / total as f64
            });
            let ns = t0.elapsed().as_nanos() as f64 / (2 * runs.len()) as f64;
            Sample {
                ns,
                peak: PEAK.load(Relaxed) - base,
                per_page,
            }
        },
    );
}

/// A 64 GiB hot-add region above `gib` GiB of boot RAM, born offline in one call; onlined in
/// random 2 MiB blocks to 50%, looking up every 10th page of each block; then a run iteration.
fn hotadd<S: PageSet>(o: &Opts, gib: u64, blocks: &[u64]) {
    let start = gib * GIB_PAGES;
    let len = 64 * GIB_PAGES;
    run::<S>(
        o,
        "hotadd",
        &format!("hot-add 64 GiB over {gib} GiB"),
        ("whole workload", 1),
        || {
            let base = begin();
            let t0 = Instant::now();
            let born = measured_workload(|| {
                let mut s = S::new(start + len);
                black_box(s.insert_range(start, len));
                let born = LIVE.load(Relaxed) - base;
                for &b in blocks {
                    let a = start + b * 512;
                    black_box(s.remove_range(a, 512));
                    black_box(s.count_present((a..a + 512).step_by(10)));
                }
                black_box(s.runs());
                born
            });
            Sample {
                ns: t0.elapsed().as_nanos() as f64,
                peak: PEAK.load(Relaxed) - base,
                // Bytes for the born-offline region, per page of it.
                per_page: born as f64 / len as f64,
            }
        },
    );
}

fn filled<S: PageSet>(universe: u64, pages: &[u64]) -> S {
    let mut s = S::new(universe);
    for &p in pages {
        s.insert(p);
    }
    s
}

/// 10 million random lookups after a 25% random inflate.
fn lookup<S: PageSet>(o: &Opts, gib: u64, pages: &[u64], probes: &[u64]) {
    let universe = gib * GIB_PAGES;
    if !o.wants("lookup", S::NAME) {
        return;
    }
    let s: S = filled(universe, pages);
    run::<S>(
        o,
        "lookup",
        &format!("lookup {gib} GiB"),
        ("lookup", probes.len() as u64),
        || {
            let t0 = Instant::now();
            let hits = measured_workload(|| probes.iter().filter(|&&p| s.contains(p)).count());
            black_box(hits);
            Sample {
                ns: t0.elapsed().as_nanos() as f64 / probes.len() as f64,
                peak: 0,
                per_page: f64::NAN,
            }
        },
    );
}

/// Run iteration after a 25% random inflate.
fn iterate<S: PageSet>(o: &Opts, gib: u64, pages: &[u64]) {
    let universe = gib * GIB_PAGES;
    if !o.wants("iterate", S::NAME) {
        return;
    }
    let s: S = filled(universe, pages);
    run::<S>(
        o,
        "iterate",
        &format!("iterate {gib} GiB"),
        ("whole iteration", 1),
        || {
            let base = begin();
            let t0 = Instant::now();
            let r = measured_workload(|| s.runs());
            black_box(r);
            Sample {
                ns: t0.elapsed().as_nanos() as f64,
                peak: PEAK.load(Relaxed) - base,
                per_page: f64::NAN,
            }
        },
    );
}

/// Heap per offline page at several densities of random single pages, and for a fully offline
/// aligned 1 GiB range.
fn density<S: PageSet>(o: &Opts, gib: u64) {
    if !o.wants("density", S::NAME) {
        return;
    }
    let universe = gib * GIB_PAGES;
    let (mut cells, mut settled) = (Vec::new(), Vec::new());
    for pct in [1u64, 5, 25, 50, 90] {
        let pages = random_pages(universe, pct as f64 / 100.0, 7 + pct);
        let base = LIVE.load(Relaxed);
        let mut s: S = filled(universe, &pages);
        let heap = LIVE.load(Relaxed) - base;
        cells.push(format!("{:.3}", heap as f64 / pages.len() as f64));
        if s.settle() {
            let heap = LIVE.load(Relaxed) - base;
            settled.push(format!("{:.3}", heap as f64 / pages.len() as f64));
        }
        drop(s);
    }
    let base = LIVE.load(Relaxed);
    let mut s = S::new(universe);
    s.insert_range(GIB_PAGES, GIB_PAGES);
    let gib_cost = LIVE.load(Relaxed) - base;
    drop(s);
    println!(
        "| {} GiB | {} | {} | {} |",
        gib,
        S::NAME,
        cells.join(" | "),
        fmt_bytes(gib_cost as f64)
    );
    if !settled.is_empty() {
        println!(
            "| {} GiB | {}, after compact | {} | {} |",
            gib,
            S::NAME,
            settled.join(" | "),
            fmt_bytes(gib_cost as f64)
        );
    }
}

macro_rules! each {
    ($f:ident ( $($arg:expr),* )) => {{
        $f::<Tracker>($($arg),*);
        $f::<BTreeSet<u64>>($($arg),*);
        $f::<HashSet<u64>>($($arg),*);
        $f::<RoaringTreemap>($($arg),*);
        $f::<FlatBitmap>($($arg),*);
    }};
}

fn main() {
    // `cargo bench -p memory` runs this with no arguments: the 4 GiB cases only, so it takes a
    // minute or two; benches/run.sh asks for 4 and 256 GiB. BENCH_QUICK=1: one run each.
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    let mut o = Opts {
        sizes: vec![4],
        reps: if quick { 1 } else { 5 },
        only: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--sizes" => {
                o.sizes = args[i + 1].split(',').map(|s| s.parse().unwrap()).collect();
                i += 1;
            }
            "--reps" => {
                o.reps = args[i + 1].parse().unwrap();
                i += 1;
            }
            "--only" => {
                let mut it = args[i + 1].splitn(2, ':');
                let w = it.next().unwrap().to_string();
                o.only = Some((w, it.next().map(|s| s.to_lowercase())));
                i += 1;
            }
            _ => {} // cargo bench passes --bench
        }
        i += 1;
    }

    println!(
        "| workload | structure | op | ops per run | min ns/op | median ns/op | peak heap | bytes/offline page |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for &gib in &o.sizes {
        let universe = gib * GIB_PAGES;
        let wants = |w: &str| o.only.as_ref().is_none_or(|(x, _)| x == w);
        let need_pages = wants("single") || wants("lookup") || wants("iterate");
        let pages = if need_pages {
            random_pages(universe, 0.25, 1)
        } else {
            Vec::new()
        };
        if wants("single") {
            let mut order = pages.clone();
            Rng(2).shuffle(&mut order);
            each!(single(&o, gib, &pages, &order));
        }
        if wants("runs") {
            let rs = random_runs(universe, 0.25, 3);
            let mut order = rs.clone();
            Rng(4).shuffle(&mut order);
            each!(runs(&o, gib, &rs, &order));
        }
        if wants("hotadd") {
            let mut blocks: Vec<u64> = (0..64 * GIB_PAGES / 512).collect();
            Rng(5).shuffle(&mut blocks);
            blocks.truncate(blocks.len() / 2);
            each!(hotadd(&o, gib, &blocks));
        }
        if wants("lookup") {
            let mut rng = Rng(6);
            let probes: Vec<u64> = (0..10_000_000).map(|_| rng.below(universe)).collect();
            each!(lookup(&o, gib, &pages, &probes));
        }
        if wants("iterate") {
            each!(iterate(&o, gib, &pages));
        }
    }
    if o.only.as_ref().is_none_or(|(w, _)| w == "density") {
        println!();
        println!("Heap bytes per offline page, random single pages at each density; and the cost of a fully offline aligned 1 GiB range:");
        println!();
        println!("| guest | structure | 1% | 5% | 25% | 50% | 90% | 1 GiB range |");
        println!("|---|---|---|---|---|---|---|---|");
        for &gib in o.sizes.iter().filter(|&&g| g <= 4) {
            each!(density(&o, gib));
        }
    }
}
