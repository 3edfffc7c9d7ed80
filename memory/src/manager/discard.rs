//! Giving the host backing of offline pages back: the call for each backing, coalesced runs,
//! batched `process_madvise`, huge-page rounding on hugetlbfs, and the deferred-discard queue.
//!
//! A page is recorded offline in the tracker before its backing is released, and only pages
//! that are offline and not yet marked D are released, so an online page is never discarded and
//! a page brought back online before its deferred release is not released.

use crate::error::Error;
use crate::sys;
use crate::types::*;

use super::{MemoryManager, D};

pub(super) const HUGE_PAGES: u64 = HUGE_PAGE_SIZE / PAGE_SIZE;

/// Sorts `runs` (`[a, b)` pairs) and merges, in place, those that overlap or touch.
pub(super) fn coalesce(runs: &mut Vec<(u64, u64)>) {
    if !runs.is_sorted() {
        runs.sort_unstable();
    }
    let mut n = 0;
    for i in 0..runs.len() {
        let (a, b) = runs[i];
        if n > 0 && a <= runs[n - 1].1 {
            runs[n - 1].1 = runs[n - 1].1.max(b);
        } else {
            runs[n] = (a, b);
            n += 1;
        }
    }
    runs.truncate(n);
}

impl MemoryManager {
    /// Releases the backing of queued pages that are still offline and not yet discarded.
    /// Returns the number of pages discarded. What a failure leaves undone stays queued.
    pub fn flush_discards(&mut self) -> Result<u64, Error> {
        let now = self.clock.now();
        let res = self.flush_queue();
        match res {
            Ok(_) => self.schedule.released(now),
            Err(_) => self.schedule.release_failed(now),
        }
        res
    }

    fn flush_queue(&mut self) -> Result<u64, Error> {
        let mut queue = std::mem::take(&mut self.queue);
        queue.sort_unstable();
        let mut done = 0;
        let mut i = 0;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        while i < queue.len() {
            // One region's runs, merged, go to the kernel together.
            let r = queue[i].0;
            let first = i;
            runs.clear();
            while i < queue.len() && queue[i].0 == r {
                let (_, a, b) = queue[i];
                i += 1;
                match runs.last_mut() {
                    Some(last) if a <= last.1 => last.1 = last.1.max(b),
                    _ => runs.push((a, b)),
                }
            }
            match self.release_runs(r, &runs) {
                Ok(n) => done += n,
                Err(e) => {
                    // Keep what is left for the next flush (what was done is marked discarded).
                    self.queue.extend_from_slice(&queue[first..]);
                    return Err(e);
                }
            }
        }
        Ok(done)
    }

    /// Page runs queued for a deferred discard (before coalescing).
    pub fn queued_discards(&self) -> usize {
        self.queue.len()
    }

    /// `a..b` widened to whole huge pages, clipped to region `r`.
    pub(super) fn huge_bounds(&self, r: usize, a: u64, b: u64) -> (u64, u64) {
        let g = &self.regions[r];
        let x = g.start + (a - g.start) / HUGE_PAGES * HUGE_PAGES;
        let y = (g.start + (b - g.start).div_ceil(HUGE_PAGES) * HUGE_PAGES).min(g.end);
        (x, y)
    }

    /// Discards the offline, not yet discarded pages of `a..b` (on hugetlbfs: the whole huge
    /// pages around them that are wholly offline) and marks them discarded.
    pub(super) fn release(&mut self, r: usize, a: u64, b: u64) -> Result<u64, Error> {
        self.release_runs(r, &[(a, b)])
    }

    /// The runs of `a..b` to discard: offline pages without D (on hugetlbfs: the whole huge pages
    /// around them whose pieces are all offline), appended to `todo`.
    fn undiscarded(&self, r: usize, a: u64, b: u64, todo: &mut Vec<(u64, u64)>) {
        let hugetlb = self.regions[r].is_hugetlb();
        let (a, b) = if hugetlb {
            self.huge_bounds(r, a, b)
        } else {
            (a, b)
        };
        // Coalesced runs of present pages without D.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for c in self.tracker.marked_runs(Some((a, b))) {
            if c.marks.contains(D) {
                continue;
            }
            match runs.last_mut() {
                Some(last) if last.1 == c.start => last.1 += c.len,
                _ => runs.push((c.start, c.start + c.len)),
            }
        }
        if !hugetlb {
            todo.extend(runs);
            return;
        }
        // Only huge pages whose pieces are all offline.
        for (x, y) in runs {
            let (hx, hy) = self.huge_bounds(r, x, y);
            let mut h = hx;
            while h < hy {
                if self.tracker.contains_range(h, HUGE_PAGES) {
                    match todo.last_mut() {
                        Some(last) if last.1 == h => last.1 += HUGE_PAGES,
                        Some(last) if last.1 > h => {}
                        _ => todo.push((h, h + HUGE_PAGES)),
                    }
                }
                h += HUGE_PAGES;
            }
        }
    }

    /// [`Self::undiscarded`] for many sorted, disjoint runs outside hugetlbfs, in one walk of the
    /// tracker over their span instead of one walk per run.
    fn undiscarded_many(&self, runs: &[(u64, u64)], todo: &mut Vec<(u64, u64)>) {
        let (Some(&(lo, _)), Some(&(_, hi))) = (runs.first(), runs.last()) else {
            return;
        };
        let mut i = 0;
        for c in self.tracker.marked_runs(Some((lo, hi))) {
            if c.marks.contains(D) {
                continue;
            }
            let (cs, ce) = (c.start, c.start + c.len);
            while i < runs.len() && runs[i].1 <= cs {
                i += 1;
            }
            // Runs overlapping the chunk; the last one may reach into the next chunk.
            while i < runs.len() && runs[i].0 < ce {
                let (x, y) = (cs.max(runs[i].0), ce.min(runs[i].1));
                match todo.last_mut() {
                    Some(last) if last.1 == x => last.1 = y,
                    _ => todo.push((x, y)),
                }
                if runs[i].1 > ce {
                    break;
                }
                i += 1;
            }
        }
    }

    /// [`Self::release`] for many sorted, disjoint runs of region `r`: on private anonymous
    /// backings the runs go to the kernel in batches (one `process_madvise` per 512 runs).
    pub(super) fn release_runs(&mut self, r: usize, runs: &[(u64, u64)]) -> Result<u64, Error> {
        let mut todo: Vec<(u64, u64)> = Vec::new();
        if runs.len() >= 16 && !self.regions[r].is_hugetlb() {
            self.undiscarded_many(runs, &mut todo);
        } else {
            for &(a, b) in runs {
                self.undiscarded(r, a, b, &mut todo);
            }
        }
        // Runs widened to huge pages may meet or overlap their neighbours.
        coalesce(&mut todo);
        let g = &self.regions[r];
        let anonymous_private = matches!(
            g.spec.backing,
            Backing::PrivateAnonymous | Backing::PrivateAnonymousHuge
        );
        let mut done = 0;
        if anonymous_private && todo.len() >= 2 {
            let start = g.start;
            let bytes: Vec<(u64, u64)> = todo
                .iter()
                .map(|&(x, y)| ((x - start) << PAGE_SHIFT, (y - x) << PAGE_SHIFT))
                .collect();
            let res = self.batch.dontneed(g.mmap(), &bytes);
            let (ok, err) = match res {
                Ok(calls) => {
                    self.counters.discard_calls += calls;
                    (todo.len(), None)
                }
                Err((i, source)) => {
                    self.counters.discard_calls += 1;
                    (i, Some((i, source)))
                }
            };
            for &(x, y) in &todo[..ok] {
                done += self.tracker.set_mark(x, y - x, D)?;
            }
            if let Some((i, source)) = err {
                let (x, y) = todo[i];
                return Err(Error::Discard {
                    call: "process_madvise(MADV_DONTNEED)",
                    guest_addr: x << PAGE_SHIFT,
                    size: (y - x) << PAGE_SHIFT,
                    source,
                });
            }
            return Ok(done);
        }
        for (x, y) in todo {
            self.discard(r, x, y)?;
            done += self.tracker.set_mark(x, y - x, D)?;
        }
        Ok(done)
    }

    /// Releases the host backing of pages `a..b` of region `r` with the call that frees memory for
    /// its backing.
    pub(super) fn discard(&mut self, r: usize, a: u64, b: u64) -> Result<(), Error> {
        let g = &self.regions[r];
        let offset = (a - g.start) << PAGE_SHIFT;
        let len = (b - a) << PAGE_SHIFT;
        let (call, res) = match g.spec.backing {
            Backing::PrivateAnonymous | Backing::PrivateAnonymousHuge => (
                "madvise(MADV_DONTNEED)",
                sys::madvise(g.mmap(), offset, len, libc::MADV_DONTNEED),
            ),
            Backing::SharedAnonymous => (
                "madvise(MADV_REMOVE)",
                sys::madvise(g.mmap(), offset, len, libc::MADV_REMOVE),
            ),
            Backing::SharedMemfd | Backing::HugetlbFs => (
                "fallocate(PUNCH_HOLE)",
                sys::punch_hole(g.file.as_ref().expect("file-backed"), offset, len),
            ),
        };
        self.counters.discard_calls += 1;
        res.map_err(|source| Error::Discard {
            call,
            guest_addr: a << PAGE_SHIFT,
            size: len,
            source,
        })
    }
}
