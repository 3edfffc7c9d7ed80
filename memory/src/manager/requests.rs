//! What each request does to the pages of one region: balloon offline/online, free page
//! reports, and plugging or unplugging hot-add blocks (with their KVM slots).
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

    /// Plugs (or unplugs) the whole blocks of `range`. All or nothing: if one block fails, the
    /// blocks this call changed are put back as they were, so the device can answer BUSY and
    /// the guest retry the same request.
    pub(super) fn plug_range(&mut self, range: PageRange, plug: bool) -> Result<Outcome, Error> {
        let ranges = PageRanges::from_ranges(&[range], &self.ram);
        let mut out = Outcome {
            refused: ranges.outside_ram(),
            ..Outcome::default()
        };
        self.note_changed(range.start.0, range.end());
        let mut done: Vec<(usize, u64)> = Vec::new();
        let res = self.each_part(&ranges, &mut out, |m, r, a, b| {
            m.plug_part(r, a, b, plug, &mut done)
        });
        if let Err(e) = res {
            for &(r, blk) in done.iter().rev() {
                let undo = if plug {
                    self.unplug_block(r, blk)
                } else {
                    self.plug_block(r, blk)
                };
                if let Err(u) = undo {
                    log::error!("memory: undoing block {blk} of region {r} after \"{e}\": {u}");
                }
            }
            return Err(e);
        }
        self.counters.refused_plug += out.refused;
        Ok(out)
    }

    fn plug_part(
        &mut self,
        r: usize,
        a: u64,
        b: u64,
        plug: bool,
        done: &mut Vec<(usize, u64)>,
    ) -> Result<Outcome, Error> {
        let mut out = Outcome::default();
        let g = &self.regions[r];
        if !g.is_hotplug() {
            out.refused = b - a;
            return Ok(out);
        }
        let bp = g.block_pages;
        let first = (a - g.start).div_ceil(bp);
        let last = (b - g.start) / bp; // exclusive
        if first >= last {
            out.refused = b - a;
            return Ok(out);
        }
        out.refused += (g.start + first * bp - a) + (b - (g.start + last * bp));
        for blk in first..last {
            if self.block_plugged(r, blk) == plug {
                out.unchanged += bp;
                continue;
            }
            if plug {
                self.plug_block(r, blk)?;
            } else {
                self.unplug_block(r, blk)?;
            }
            done.push((r, blk));
            out.changed += bp;
        }
        Ok(out)
    }

    /// Whether block `blk` of hot-add region `r` is plugged: none of its pages is unplugged.
    pub(super) fn block_plugged(&self, r: usize, blk: u64) -> bool {
        let k = self.regions[r].block(blk);
        self.tracker.next(k.x, Some(U)).is_none_or(|p| p >= k.y)
    }

    /// Maps the block's slot and brings its pages online.
    fn plug_block(&mut self, r: usize, blk: u64) -> Result<(), Error> {
        let g = &self.regions[r];
        let k = g.block(blk);
        let host = g.host_addr(k.x);
        // SAFETY: `host..host + k.size` is block `blk` of region `r`'s mapping (the block lies
        // inside the region, checked when the region was made). The manager holds that mapping
        // until its `Drop`, which unmaps every plugged block's slot first.
        unsafe { self.slots.map(k.slot, k.guest_addr, k.size, host) }.map_err(k.slot_error())?;
        if let Err(e) = self.tracker.remove_range(k.x, k.y - k.x) {
            let _ = self.slots.unmap(k.slot, k.guest_addr, k.size);
            return Err(e.into());
        }
        Ok(())
    }

    /// Unmaps the block's slot, takes all its pages offline as U (ballooned ones included) and
    /// releases their backing.
    fn unplug_block(&mut self, r: usize, blk: u64) -> Result<(), Error> {
        let k = self.regions[r].block(blk);
        self.slots
            .unmap(k.slot, k.guest_addr, k.size)
            .map_err(k.slot_error())?;
        let n = k.y - k.x;
        self.tracker.insert_range(k.x, n, Marks::from(U))?;
        self.tracker.set_mark(k.x, n, U)?;
        self.tracker.clear_mark(k.x, n, B)?;
        self.release(r, k.x, k.y)?;
        Ok(())
    }

    /// The plugged pages (pages not unplugged) of `a..b` within one hot-add region, appended to
    /// `out` as runs.
    pub(super) fn plugged_in(&self, a: u64, b: u64, out: &mut Vec<PageRange>) {
        let mut pos = a;
        self.tracker.for_each_run(Some(U), Some((a, b)), |s, len| {
            if s > pos {
                out.push(PageRange::new(pos, s - pos));
            }
            pos = pos.max(s + len);
        });
        if pos < b {
            out.push(PageRange::new(pos, b - pos));
        }
    }
}
