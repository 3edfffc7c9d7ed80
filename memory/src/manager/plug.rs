//! Plugging and unplugging hot-add blocks, a whole request at a time, all or nothing.
//!
//! A request (virtio-mem PLUG or UNPLUG; Linux sends one 128 MiB memory block, 64 blocks of
//! 2 MiB, at a time) goes in three steps, each over the whole request rather than block by
//! block:
//! 1. which blocks change: one walk of the tracker over the request's blocks (a block is plugged
//!    iff none of its pages is Unplugged), as runs of adjacent blocks ([`BlockRun`]);
//! 2. the KVM slots, one call per block (each plugged block is its own slot);
//! 3. the tracker, one update per run; for an unplug, then the backing, one release per run.
//!
//! A failure in step 2 or 3 puts back what the request changed, so the device answers BUSY and
//! the guest retries the same request. A failed release does not fail an unplug: the blocks are
//! unplugged (no slot, Unplugged in the tracker) and their pages are queued for the manager's
//! retry like a deferred discard.

use crate::error::Error;
use crate::ranges::PageRanges;
use crate::tracker::Marks;
use crate::types::*;

use super::{MemoryManager, B, U};

/// Blocks `first..end` of hot-add region `r`, adjacent, all changing in one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BlockRun {
    r: usize,
    first: u64,
    end: u64,
}

impl MemoryManager {
    /// Plugs (or unplugs) the whole blocks of `range`. All or nothing: if a slot or the tracker
    /// fails, the blocks this call changed are put back as they were.
    pub(super) fn plug_range(&mut self, range: PageRange, plug: bool) -> Result<Outcome, Error> {
        let ranges = PageRanges::from_ranges(&[range], &self.ram);
        let mut out = Outcome {
            refused: ranges.outside_ram(),
            ..Outcome::default()
        };
        self.note_changed(range.start.0, range.end());
        let mut runs: Vec<BlockRun> = Vec::new();
        self.each_part(&ranges, &mut out, |m, r, a, b| {
            Ok(m.blocks_to_change(r, a, b, plug, &mut runs))
        })?;
        self.change_slots(&runs, plug)?;
        if let Err(e) = self.change_tracker(&runs, plug) {
            self.undo_slots(&runs, plug, &e);
            return Err(e);
        }
        if !plug {
            self.release_unplugged(&runs);
        }
        out.changed = runs.iter().map(|k| self.run_pages(k).1).sum();
        self.counters.refused_plug += out.refused;
        Ok(out)
    }

    /// The whole blocks of `a..b` (inside region `r`) not yet in the asked state, appended to
    /// `runs`; returns the pages refused (outside hot-add regions, partial blocks) and
    /// unchanged (blocks already in the state).
    fn blocks_to_change(
        &self,
        r: usize,
        a: u64,
        b: u64,
        plug: bool,
        runs: &mut Vec<BlockRun>,
    ) -> Outcome {
        let mut out = Outcome::default();
        let g = &self.regions[r];
        if !g.is_hotplug() {
            out.refused = b - a;
            return out;
        }
        let bp = g.block_pages;
        let first = (a - g.start).div_ceil(bp);
        let last = (b - g.start) / bp; // exclusive
        if first >= last {
            out.refused = b - a;
            return out;
        }
        out.refused += (g.start + first * bp - a) + (b - (g.start + last * bp));
        let mut plugged = Vec::new();
        self.plugged_in(g.start + first * bp, g.start + last * bp, &mut plugged);
        // Alternating spans of blocks: unplugged from `pos`, then a plugged run.
        let mut pos = first;
        let mut span = |from: u64, to: u64, is_plugged: bool, runs: &mut Vec<BlockRun>| {
            if from >= to {
                return;
            }
            if is_plugged == plug {
                out.unchanged += (to - from) * bp;
                return;
            }
            match runs.last_mut() {
                Some(k) if k.r == r && k.end == from => k.end = to,
                _ => runs.push(BlockRun {
                    r,
                    first: from,
                    end: to,
                }),
            }
        };
        for p in &plugged {
            // Only whole blocks are plugged or not; a block partly Unplugged counts as unplugged.
            let pa = (p.start.0 - g.start).div_ceil(bp);
            let pb = (p.end() - g.start) / bp;
            if pa >= pb {
                continue;
            }
            span(pos, pa, false, runs);
            span(pa, pb, true, runs);
            pos = pb;
        }
        span(pos, last, false, runs);
        out
    }

    /// First page and page count of a run.
    fn run_pages(&self, k: &BlockRun) -> (u64, u64) {
        let g = &self.regions[k.r];
        (
            g.start + k.first * g.block_pages,
            (k.end - k.first) * g.block_pages,
        )
    }

    /// Maps (or unmaps) the slot of every block of `runs`; on a failure, the slots already
    /// changed are changed back.
    fn change_slots(&mut self, runs: &[BlockRun], plug: bool) -> Result<(), Error> {
        for (i, k) in runs.iter().enumerate() {
            for blk in k.first..k.end {
                if let Err(e) = self.set_slot(k.r, blk, plug) {
                    let done = runs[..i]
                        .iter()
                        .copied()
                        .chain(std::iter::once(BlockRun { end: blk, ..*k }));
                    let done: Vec<BlockRun> = done.collect();
                    self.undo_slots(&done, plug, &e);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Changes back the slots of `runs` after `cause` stopped the request, last first.
    fn undo_slots(&mut self, runs: &[BlockRun], plug: bool, cause: &Error) {
        for k in runs.iter().rev() {
            for blk in (k.first..k.end).rev() {
                if let Err(u) = self.set_slot(k.r, blk, !plug) {
                    log::error!(
                        "memory: undoing the slot of block {blk} of region {} after \"{cause}\": {u}",
                        k.r
                    );
                }
            }
        }
    }

    /// Maps the slot of block `blk` of region `r` (`plug`), or removes it.
    fn set_slot(&mut self, r: usize, blk: u64, plug: bool) -> Result<(), Error> {
        let g = &self.regions[r];
        let k = g.block(blk);
        if plug {
            let host = g.host_addr(k.x);
            // SAFETY: `host..host + k.size` is block `blk` of region `r`'s mapping (the block lies
            // inside the region, checked when the region was made). The manager holds that
            // mapping until its `Drop`, which unmaps every plugged block's slot first.
            unsafe { self.slots.map(k.slot, k.guest_addr, k.size, host) }.map_err(k.slot_error())
        } else {
            self.slots
                .unmap(k.slot, k.guest_addr, k.size)
                .map_err(k.slot_error())
        }
    }

    /// Records the blocks of `runs` plugged (their pages online) or unplugged (all their pages
    /// Unplugged, ballooned ones included), one tracker update per run. On a failure the runs
    /// already recorded are recorded back.
    fn change_tracker(&mut self, runs: &[BlockRun], plug: bool) -> Result<(), Error> {
        for (i, k) in runs.iter().enumerate() {
            let (x, n) = self.run_pages(k);
            if let Err(e) = self.set_tracked(x, n, plug) {
                // This run may be half done: it goes back too.
                for k in runs[..=i].iter().rev() {
                    let (x, n) = self.run_pages(k);
                    if let Err(u) = self.set_tracked(x, n, !plug) {
                        log::error!(
                            "memory: undoing {n} pages from 0x{x:x} in the tracker after \"{e}\": {u}"
                        );
                    } else if plug {
                        // Unplugged again before the guest knew: queue their (cheap) release.
                        self.queue_release(k.r, x, x + n);
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Pages `x..x + n` online (`plug`), or Unplugged.
    fn set_tracked(&mut self, x: u64, n: u64, plug: bool) -> Result<(), Error> {
        if plug {
            self.tracker.remove_range(x, n)?;
        } else {
            self.tracker.insert_range(x, n, Marks::from(U))?;
            self.tracker.set_mark(x, n, U)?;
            self.tracker.clear_mark(x, n, B)?;
        }
        Ok(())
    }

    /// Releases the backing of unplugged `runs`, one release per run; a run whose release
    /// fails is queued for the schedule's retry.
    fn release_unplugged(&mut self, runs: &[BlockRun]) {
        for k in runs {
            let (x, n) = self.run_pages(k);
            if let Err(e) = self.release(k.r, x, x + n) {
                log::error!(
                    "memory: releasing {n} unplugged pages from 0x{x:x}: {e}; retried later"
                );
                self.counters.release_errors += 1;
                self.queue_release(k.r, x, x + n);
            }
        }
    }

    /// Queues pages `a..b` of region `r` for a deferred release.
    fn queue_release(&mut self, r: usize, a: u64, b: u64) {
        if self.queue.try_reserve(1).is_err() {
            log::error!("memory: no memory to queue the release of 0x{a:x}..0x{b:x}");
            return;
        }
        self.queue.push((r, a, b));
        let now = self.clock.now();
        self.schedule.queued(b - a, now);
        self.arm_timer(now);
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
