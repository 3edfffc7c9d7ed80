//! What each balloon request does to the pages of one region: offline (inflate), online
//! (deflate) and free page reports. Plugging and unplugging hot-add blocks is in `plug.rs`.
//!
//! Requests arrive as [`PageRanges`] (sorted, disjoint, inside guest RAM) and are cut at region
//! boundaries by [`MemoryManager::each_part`]; every `*_part` function sees `a..b` inside one
//! region `r` and returns what it did to those pages.

use crate::error::Error;
use crate::ranges::PageRanges;
use crate::tracker::{Chunk, Marks, Tracker};
use crate::types::*;

use super::discard::HUGE_PAGES;
use super::regions::split;
use super::{MemoryManager, B, D, U};

/// The offline segments of `a..b` and the online gaps between them.
fn segments(t: &Tracker, a: u64, b: u64) -> (Vec<Chunk>, Vec<(u64, u64)>) {
    if b - a == 1 && t.get(a).is_none() {
        // One online page (a scattered inflate): no walk.
        return (Vec::new(), vec![(a, b)]);
    }
    let segs: Vec<Chunk> = t.marked_runs(Some((a, b))).collect();
    let mut gaps = Vec::new();
    let mut pos = a;
    for c in &segs {
        if c.start > pos {
            gaps.push((pos, c.start));
        }
        pos = c.start + c.len;
    }
    if pos < b {
        gaps.push((pos, b));
    }
    (segs, gaps)
}

impl MemoryManager {
    /// Calls `f(self, r, a, b)` for each part of `ranges` inside region `r`, adding up what it
    /// did. Pages outside every region (only from a [`PageRanges`] checked against another
    /// guest's RAM) are refused.
    pub(super) fn each_part(
        &mut self,
        ranges: &PageRanges,
        out: &mut Outcome,
        mut f: impl FnMut(&mut Self, usize, u64, u64) -> Result<Outcome, Error>,
    ) -> Result<(), Error> {
        for p in ranges.as_slice() {
            let (a, b) = (p.start.0, p.end());
            // Most runs lie inside one region: no need to split them.
            let r = self.regions.partition_point(|g| g.end <= a);
            if self
                .regions
                .get(r)
                .is_some_and(|g| g.start <= a && b <= g.end)
            {
                *out += f(self, r, a, b)?;
                continue;
            }
            for (r, pa, pb) in split(&self.regions, a, b) {
                match r {
                    None => out.refused += pb - pa,
                    Some(r) => *out += f(self, r, pa, pb)?,
                }
            }
        }
        Ok(())
    }

    /// Balloon inflate of `a..b`: online pages become B and are queued for release; B pages are
    /// unchanged; U pages are refused.
    pub(super) fn offline_part(&mut self, r: usize, a: u64, b: u64) -> Result<Outcome, Error> {
        let mut out = Outcome::default();
        let (segs, gaps) = segments(&self.tracker, a, b);
        for c in &segs {
            if c.marks.contains(B) {
                out.unchanged += c.len;
            } else {
                out.refused += c.len;
            }
        }
        // Recorded, then queued: released later (`tick`, `flush_discards`), only while still
        // offline.
        self.queue
            .try_reserve(gaps.len())
            .map_err(|_| Error::NoMemory {
                what: "deferred discards",
                bytes: gaps.len() * 24,
            })?;
        for &(x, y) in &gaps {
            out.changed += self.tracker.insert_range(x, y - x, Marks::from(B))?;
            self.queue.push((r, x, y));
        }
        Ok(out)
    }

    /// Balloon deflate of `a..b`: B pages come back online; online pages are unchanged; U pages
    /// are refused.
    pub(super) fn online_part(&mut self, r: usize, a: u64, b: u64) -> Result<Outcome, Error> {
        let mut out = Outcome::default();
        let hugetlb = self.regions[r].is_hugetlb();
        let (segs, gaps) = segments(&self.tracker, a, b);
        out.unchanged += gaps.iter().map(|(x, y)| y - x).sum::<u64>();
        for c in &segs {
            if !c.marks.contains(B) {
                out.refused += c.len;
                continue;
            }
            let (x, y) = (c.start, c.start + c.len);
            out.changed += self.tracker.remove_range(x, y - x)?;
            if hugetlb {
                // The huge pages these pages sit in are backed again as soon as they are touched.
                let (hx, hy) = self.huge_bounds(r, x, y);
                self.tracker.clear_mark(hx, hy - hx, D)?;
            }
        }
        Ok(out)
    }

    /// Free page report of `a..b`: online pages are released at once and stay online.
    pub(super) fn free_part(&mut self, r: usize, a: u64, b: u64) -> Result<Outcome, Error> {
        let mut out = Outcome::default();
        let (segs, gaps) = segments(&self.tracker, a, b);
        for c in &segs {
            if c.marks.contains(U) {
                out.refused += c.len;
            } else {
                out.unchanged += c.len;
            }
        }
        let hugetlb = self.regions[r].is_hugetlb();
        for &(x, y) in &gaps {
            if hugetlb {
                let base = self.regions[r].start;
                let hx = base + (x - base).div_ceil(HUGE_PAGES) * HUGE_PAGES;
                let hy = base + (y - base) / HUGE_PAGES * HUGE_PAGES;
                if hx < hy {
                    self.discard(r, hx, hy)?;
                    out.changed += hy - hx;
                    out.unchanged += (y - x) - (hy - hx);
                } else {
                    out.unchanged += y - x;
                }
            } else {
                self.discard(r, x, y)?;
                out.changed += y - x;
            }
        }
        Ok(out)
    }
}
