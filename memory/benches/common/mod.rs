//! The structures compared with the tracker, behind one small trait, and the workloads.

#![allow(dead_code)]

use std::collections::{BTreeSet, HashSet};
use std::hint::black_box;

use memory::tracker::{Mark, Marks, Tracker};
use roaring::RoaringTreemap;

/// A set of page numbers, as the balloon needs it.
pub trait PageSet {
    const NAME: &'static str;
    /// An empty set for page numbers below `universe`.
    fn new(universe: u64) -> Self;
    fn insert(&mut self, p: u64) -> bool;
    fn remove(&mut self, p: u64) -> bool;
    fn contains(&self, p: u64) -> bool;
    fn insert_range(&mut self, a: u64, n: u64) -> u64 {
        (a..a + n).filter(|&p| self.insert(p)).count() as u64
    }
    fn remove_range(&mut self, a: u64, n: u64) -> u64 {
        (a..a + n).filter(|&p| self.remove(p)).count() as u64
    }
    /// How many of `pages` (close to each other) are in the set.
    fn count_present(&self, pages: impl Iterator<Item = u64>) -> usize {
        let mut n = 0;
        for p in pages {
            n += usize::from(self.contains(p));
        }
        n
    }
    /// Number of maximal runs and of pages, walking the runs in order.
    fn runs(&self) -> (u64, u64);
    /// What the owner does once it has been quiet for a while (the tracker: `compact`, which
    /// the memory manager runs when the balloon has been quiet for a second). Whether there is
    /// such a step.
    fn settle(&mut self) -> bool {
        false
    }
}

fn coalesce(sorted: impl Iterator<Item = u64>) -> (u64, u64) {
    let (mut runs, mut pages, mut next) = (0, 0, u64::MAX);
    for p in sorted {
        if p != next {
            runs += 1;
        }
        pages += 1;
        next = p + 1;
    }
    (runs, pages)
}

const BALLOONED: Marks = Marks::from_bits_truncate(1 << Mark::Ballooned as u8);

impl PageSet for Tracker {
    const NAME: &'static str = "tracker";
    fn new(_: u64) -> Self {
        Tracker::new()
    }
    fn insert(&mut self, p: u64) -> bool {
        Tracker::insert(self, p, BALLOONED).unwrap()
    }
    fn remove(&mut self, p: u64) -> bool {
        Tracker::remove(self, p).unwrap()
    }
    fn contains(&self, p: u64) -> bool {
        Tracker::contains(self, p)
    }
    fn insert_range(&mut self, a: u64, n: u64) -> u64 {
        Tracker::insert_range(self, a, n, BALLOONED).unwrap()
    }
    fn count_present(&self, pages: impl Iterator<Item = u64>) -> usize {
        let mut c = self.lookup_cursor();
        let mut n = 0;
        for p in pages {
            n += usize::from(c.contains(p));
        }
        n
    }
    fn remove_range(&mut self, a: u64, n: u64) -> u64 {
        Tracker::remove_range(self, a, n).unwrap()
    }
    fn settle(&mut self) -> bool {
        self.compact(0, u64::MAX);
        true
    }
    fn runs(&self) -> (u64, u64) {
        let (mut runs, mut pages) = (0, 0);
        self.for_each_run(None, None, |_, len| {
            runs += 1;
            pages += len;
        });
        (runs, pages)
    }
}

impl PageSet for BTreeSet<u64> {
    const NAME: &'static str = "BTreeSet<u64>";
    fn new(_: u64) -> Self {
        BTreeSet::new()
    }
    fn insert(&mut self, p: u64) -> bool {
        BTreeSet::insert(self, p)
    }
    fn remove(&mut self, p: u64) -> bool {
        BTreeSet::remove(self, &p)
    }
    fn contains(&self, p: u64) -> bool {
        BTreeSet::contains(self, &p)
    }
    fn runs(&self) -> (u64, u64) {
        coalesce(self.iter().copied())
    }
}

impl PageSet for HashSet<u64> {
    const NAME: &'static str = "HashSet<u64>";
    fn new(_: u64) -> Self {
        HashSet::new()
    }
    fn insert(&mut self, p: u64) -> bool {
        HashSet::insert(self, p)
    }
    fn remove(&mut self, p: u64) -> bool {
        HashSet::remove(self, &p)
    }
    fn contains(&self, p: u64) -> bool {
        HashSet::contains(self, &p)
    }
    fn runs(&self) -> (u64, u64) {
        let mut v: Vec<u64> = self.iter().copied().collect();
        v.sort_unstable();
        coalesce(v.into_iter())
    }
}

impl PageSet for RoaringTreemap {
    const NAME: &'static str = "RoaringTreemap";
    fn new(_: u64) -> Self {
        RoaringTreemap::new()
    }
    fn insert(&mut self, p: u64) -> bool {
        RoaringTreemap::insert(self, p)
    }
    fn remove(&mut self, p: u64) -> bool {
        RoaringTreemap::remove(self, p)
    }
    fn contains(&self, p: u64) -> bool {
        RoaringTreemap::contains(self, p)
    }
    fn insert_range(&mut self, a: u64, n: u64) -> u64 {
        RoaringTreemap::insert_range(self, a..a + n)
    }
    fn remove_range(&mut self, a: u64, n: u64) -> u64 {
        RoaringTreemap::remove_range(self, a..a + n)
    }
    fn runs(&self) -> (u64, u64) {
        coalesce(self.iter())
    }
}

/// One bit per page of the universe, plus a count.
pub struct FlatBitmap {
    words: Vec<u64>,
    count: u64,
}

impl PageSet for FlatBitmap {
    const NAME: &'static str = "flat bitmap";
    fn new(universe: u64) -> Self {
        FlatBitmap {
            words: vec![0; universe.div_ceil(64) as usize],
            count: 0,
        }
    }
    #[inline]
    fn insert(&mut self, p: u64) -> bool {
        let (w, b) = ((p >> 6) as usize, 1u64 << (p & 63));
        let new = self.words[w] & b == 0;
        self.words[w] |= b;
        self.count += new as u64;
        new
    }
    #[inline]
    fn remove(&mut self, p: u64) -> bool {
        let (w, b) = ((p >> 6) as usize, 1u64 << (p & 63));
        let had = self.words[w] & b != 0;
        self.words[w] &= !b;
        self.count -= had as u64;
        had
    }
    #[inline]
    fn contains(&self, p: u64) -> bool {
        self.words[(p >> 6) as usize] & (1 << (p & 63)) != 0
    }
    fn insert_range(&mut self, a: u64, n: u64) -> u64 {
        let mut added = 0;
        let (mut p, end) = (a, a + n);
        while p < end {
            let w = (p >> 6) as usize;
            let lo = p & 63;
            let hi = (end - (p - lo)).min(64);
            let mask = if hi == 64 { u64::MAX } else { (1 << hi) - 1 } & !((1u64 << lo) - 1);
            added += u64::from((mask & !self.words[w]).count_ones());
            self.words[w] |= mask;
            p = (p - lo) + hi;
        }
        self.count += added;
        added
    }
    fn remove_range(&mut self, a: u64, n: u64) -> u64 {
        let mut gone = 0;
        let (mut p, end) = (a, a + n);
        while p < end {
            let w = (p >> 6) as usize;
            let lo = p & 63;
            let hi = (end - (p - lo)).min(64);
            let mask = if hi == 64 { u64::MAX } else { (1 << hi) - 1 } & !((1u64 << lo) - 1);
            gone += u64::from((mask & self.words[w]).count_ones());
            self.words[w] &= !mask;
            p = (p - lo) + hi;
        }
        self.count -= gone;
        gone
    }
    fn runs(&self) -> (u64, u64) {
        // Walk each run (start, length) the way a consumer of runs would.
        let (mut runs, mut pages) = (0u64, 0u64);
        let nbits = self.words.len() as u64 * 64;
        let mut p = 0u64;
        while p < nbits {
            let w = (p >> 6) as usize;
            let e = self.words[w] >> (p & 63);
            if e == 0 {
                p = (p | 63) + 1;
                continue;
            }
            p += u64::from(e.trailing_zeros());
            let start = p;
            loop {
                let w = (p >> 6) as usize;
                let left = 64 - (p & 63);
                let ones = u64::from((!(self.words[w] >> (p & 63))).trailing_zeros()).min(left);
                p += ones;
                if ones < left || p >= nbits {
                    break;
                }
            }
            runs += 1;
            pages += black_box(p - start);
        }
        (runs, pages)
    }
}

/// splitmix64: a small, fast, deterministic generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// `fraction` of the pages below `pages`, distinct, in random order.
pub fn random_pages(pages: u64, fraction: f64, seed: u64) -> Vec<u64> {
    let mut rng = Rng(seed);
    let want = (pages as f64 * fraction) as usize;
    let mut bits = FlatBitmap::new(pages);
    let mut out = Vec::with_capacity(want);
    while out.len() < want {
        let p = rng.below(pages);
        if bits.insert(p) {
            out.push(p);
        }
    }
    out
}

/// Non-overlapping random runs of 1..=512 pages covering `fraction` of `pages`, in random order.
pub fn random_runs(pages: u64, fraction: f64, seed: u64) -> Vec<(u64, u64)> {
    let mut rng = Rng(seed);
    let want = (pages as f64 * fraction) as u64;
    let mut bits = FlatBitmap::new(pages);
    let mut out = Vec::new();
    let mut covered = 0;
    while covered < want {
        let n = 1 + rng.below(512);
        let a = rng.below(pages - n);
        // Keep a gap so runs stay distinct.
        let lo = a.saturating_sub(1);
        let hi = (a + n + 1).min(pages);
        if (lo..hi).any(|p| bits.contains(p)) {
            continue;
        }
        bits.insert_range(a, n);
        out.push((a, n));
        covered += n;
    }
    out
}
