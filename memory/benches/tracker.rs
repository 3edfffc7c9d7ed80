//! Criterion micro-benchmarks, 4 GiB guest with 25% of its pages ballooned, side by side:
//! the tracker, BTreeSet<u64>, HashSet<u64>, RoaringTreemap and a flat bitmap.
//!
//!   cargo bench -p memory --bench tracker            (about a minute)
//!   BENCH_QUICK=1 cargo bench -p memory --bench tracker
//!
//! The workload tables of the README come from benches/compare.rs (see benches/run.sh).

// criterion_group! generates a public fn with no doc comment; a bench has no API to document.
#![allow(missing_docs)]

mod common;

use std::collections::{BTreeSet, HashSet};
use std::hint::black_box;
use std::time::Duration;

use common::*;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use memory::tracker::{Mark, Tracker};
use roaring::RoaringTreemap;

const UNIVERSE: u64 = 1 << 20; // 4 GiB of 4 KiB pages

fn config() -> Criterion {
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(if quick { 100 } else { 300 }))
        .measurement_time(Duration::from_millis(if quick { 300 } else { 1000 }))
}

fn bench_set<S: PageSet>(c: &mut Criterion, pages: &[u64], probes: &[u64], runs: &[(u64, u64)]) {
    let mut s = S::new(UNIVERSE);
    for &p in pages {
        s.insert(p);
    }
    // Pages not in the set, to insert and remove again (the set stays at 25%).
    let mut rng = Rng(9);
    let fresh: Vec<u64> = (0..4096)
        .map(|_| loop {
            let p = rng.below(UNIVERSE);
            if !s.contains(p) {
                break p;
            }
        })
        .collect();
    let mut i = 0;
    c.bench_function(&format!("insert+remove one page/{}", S::NAME), |b| {
        b.iter(|| {
            let p = fresh[i & 4095];
            i += 1;
            black_box(s.insert(p));
            black_box(s.remove(p));
        })
    });
    let mut j = 0;
    c.bench_function(&format!("lookup/{}", S::NAME), |b| {
        b.iter(|| {
            j += 1;
            black_box(s.contains(probes[j & 0xffff]))
        })
    });
    let mut k = 0;
    c.bench_function(&format!("insert+remove run of 1..512/{}", S::NAME), |b| {
        b.iter(|| {
            let (a, n) = runs[k % runs.len()];
            k += 1;
            black_box(s.remove_range(a, n));
            black_box(s.insert_range(a, n));
        })
    });
    c.bench_with_input(BenchmarkId::new("iterate runs", S::NAME), &s, |b, s| {
        b.iter(|| black_box(s.runs()))
    });
}

fn benches(c: &mut Criterion) {
    let pages = random_pages(UNIVERSE, 0.25, 1);
    let mut rng = Rng(6);
    let probes: Vec<u64> = (0..65536).map(|_| rng.below(UNIVERSE)).collect();
    // Runs of pages that are in the set: remove then re-insert keeps it unchanged.
    let runs: Vec<(u64, u64)> = {
        let mut t = Tracker::new();
        for &p in &pages {
            t.insert(p, Mark::Ballooned.into()).unwrap();
        }
        let mut v = Vec::new();
        t.for_each_run(None, None, |a, n| v.push((a, n)));
        v
    };
    bench_set::<Tracker>(c, &pages, &probes, &runs);
    bench_set::<BTreeSet<u64>>(c, &pages, &probes, &runs);
    bench_set::<HashSet<u64>>(c, &pages, &probes, &runs);
    bench_set::<RoaringTreemap>(c, &pages, &probes, &runs);
    bench_set::<FlatBitmap>(c, &pages, &probes, &runs);
}

criterion_group! {
    name = group;
    config = config();
    targets = benches
}
criterion_main!(group);
