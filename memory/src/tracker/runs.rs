//! Ordered runs of present pages: the `runs` and `marked_runs` iterators (on the cursor of
//! `cursor.rs`), `for_each_run` (a recursive walk, faster), and `contains_range`. All take
//! `&self` and never allocate.

use super::cursor::{Chunk, Chunks};
use super::leaf::LEAF_PAGES;
use super::node::{ChildRef, Node};
use super::sparse::SPARSE_MAX;
use super::{slot_range_mask, slot_shift, span_shift, Mark, Tracker};

/// A maximal run of present pages, `start..start+len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First page.
    pub start: u64,
    /// Pages in the run (at least 1).
    pub len: u64,
}

/// Maximal runs of present pages (carrying a mark, if filtered), from [`Tracker::runs`].
pub struct Runs<'a> {
    chunks: Chunks<'a>,
    pending: Option<Chunk>,
}

impl<'a> Runs<'a> {
    fn new(chunks: Chunks<'a>) -> Self {
        Runs {
            chunks,
            pending: None,
        }
    }
}

impl Iterator for Runs<'_> {
    type Item = Run;

    fn next(&mut self) -> Option<Run> {
        let mut cur = match self.pending.take() {
            Some(c) => c,
            None => self.chunks.next()?,
        };
        for c in self.chunks.by_ref() {
            if c.start == cur.start + cur.len {
                cur.len += c.len;
            } else {
                self.pending = Some(c);
                break;
            }
        }
        Some(Run {
            start: cur.start,
            len: cur.len,
        })
    }
}

/// Maximal runs of pages carrying exactly the same marks, from [`Tracker::marked_runs`].
pub struct MarkedRuns<'a> {
    chunks: Chunks<'a>,
    pending: Option<Chunk>,
}

impl<'a> MarkedRuns<'a> {
    fn new(chunks: Chunks<'a>) -> Self {
        MarkedRuns {
            chunks,
            pending: None,
        }
    }
}

impl Iterator for MarkedRuns<'_> {
    type Item = Chunk;

    fn next(&mut self) -> Option<Chunk> {
        let mut cur = match self.pending.take() {
            Some(c) => c,
            None => self.chunks.next()?,
        };
        for c in self.chunks.by_ref() {
            if c.start == cur.start + cur.len && c.marks == cur.marks {
                cur.len += c.len;
            } else {
                self.pending = Some(c);
                break;
            }
        }
        Some(cur)
    }
}

impl Tracker {
    /// Returns whether every page of `start..start+count` is present (true for `count` 0,
    /// false for a range that overflows). Cost: a walk of the range's runs, stopping at the
    /// first gap.
    pub fn contains_range(&self, start: u64, count: u64) -> bool {
        let Some(end) = start.checked_add(count) else {
            return false;
        };
        let mut pos = start;
        for r in self.runs(None, Some((start, end))) {
            if r.start != pos {
                return false;
            }
            pos = r.start + r.len;
        }
        pos == end
    }

    /// Returns an iterator over the maximal runs of present pages (carrying mark `filter`, if
    /// given), within the half-open page range `within = (lo, hi)` if given (runs clipped to
    /// it), in increasing order. Cost: a walk that skips subtrees without pages (or without
    /// the mark) whole; a full slot is one step whatever its size. It borrows the tracker, so
    /// no update can happen while it lives.
    pub fn runs(&self, filter: Option<Mark>, within: Option<(u64, u64)>) -> Runs<'_> {
        let (lo, hi) = within.unwrap_or((0, u64::MAX));
        Runs::new(Chunks::new(self, filter, false, lo, hi))
    }

    /// Returns an iterator over the maximal runs of present pages that carry exactly the same
    /// marks, each with its marks, within `within = (lo, hi)` if given, in increasing order.
    /// Cost as [`Tracker::runs`].
    pub fn marked_runs(&self, within: Option<(u64, u64)>) -> MarkedRuns<'_> {
        let (lo, hi) = within.unwrap_or((0, u64::MAX));
        MarkedRuns::new(Chunks::new(self, None, true, lo, hi))
    }

    /// Calls `f(start, len)` for each maximal run of present pages (carrying mark `filter`,
    /// if given) within `within = (lo, hi)`, in increasing order: what [`Tracker::runs`]
    /// yields, by internal iteration (as xarray's `xa_for_each`), which is the faster way
    /// to walk runs. Cost as [`Tracker::runs`].
    #[inline]
    pub fn for_each_run(
        &self,
        filter: Option<Mark>,
        within: Option<(u64, u64)>,
        mut f: impl FnMut(u64, u64),
    ) {
        let Some(root) = self.root.as_deref() else {
            return;
        };
        let (lo, hi) = within.unwrap_or((0, u64::MAX));
        let hi = hi.min(1u64 << span_shift(self.height));
        if lo >= hi {
            return;
        }
        let mut runs = RunCoalescer {
            start: 0,
            end: 0,
            emit: &mut f,
        };
        walk_runs(
            root,
            self.height,
            0,
            lo,
            hi,
            filter.map(|m| m as usize),
            &mut runs,
        );
        if runs.end > runs.start {
            (runs.emit)(runs.start, runs.end - runs.start);
        }
    }
}

/// Coalesces adjacent pieces into maximal runs before handing them to `emit`.
struct RunCoalescer<'f, F: FnMut(u64, u64)> {
    /// The run being built, `start..end` (empty before the first piece).
    start: u64,
    end: u64,
    emit: &'f mut F,
}

impl<F: FnMut(u64, u64)> RunCoalescer<'_, F> {
    /// Adds the present pages `start..end`, which come after every page added before.
    #[inline]
    fn add(&mut self, start: u64, end: u64) {
        if start == self.end {
            self.end = end;
        } else {
            if self.end > self.start {
                (self.emit)(self.start, self.end - self.start);
            }
            self.start = start;
            self.end = end;
        }
    }
}

/// `Tracker::for_each_run` below `node` (at `level`, covering pages from `base`): hands the
/// present pages of `lo..hi` (carrying mark `filter`, if given) to `runs` in order.
#[inline]
fn walk_runs<F: FnMut(u64, u64)>(
    node: &Node,
    level: u32,
    base: u64,
    lo: u64,
    hi: u64,
    filter: Option<usize>,
    runs: &mut RunCoalescer<'_, F>,
) {
    let sshift = slot_shift(level);
    let first = (lo.max(base) - base) >> sshift;
    let last = (hi.min(base + (1u64 << span_shift(level))) - 1 - base) >> sshift;
    let mut candidates = match filter {
        Some(k) => node.marks[k],
        None => node.present,
    } & slot_range_mask(first as u32, last as u32);
    while candidates != 0 {
        let i = candidates.trailing_zeros();
        candidates &= candidates - 1;
        let sbase = base + (u64::from(i) << sshift);
        if node.full & (1 << i) != 0 {
            runs.add(sbase.max(lo), (sbase + (1u64 << sshift)).min(hi));
            continue;
        }
        if let Some(sparse) = node.sparse_of_byte(node.slot_byte(i as usize)) {
            let s_lo = lo.max(sbase) - sbase;
            let s_hi = hi.min(sbase + LEAF_PAGES) - sbase;
            let mut buf = [0; SPARSE_MAX];
            for &page in sparse.sorted(&mut buf) {
                let page = u64::from(page);
                if (s_lo..s_hi).contains(&page) {
                    runs.add(sbase + page, sbase + page + 1);
                }
            }
            continue;
        }
        match node.child(node.child_idx(i as usize)) {
            ChildRef::Node(child) => walk_runs(child, level - 1, sbase, lo, hi, filter, runs),
            ChildRef::Leaf(leaf) => {
                let s_lo = lo.max(sbase) - sbase;
                let s_hi = hi.min(sbase + LEAF_PAGES) - sbase;
                match filter {
                    None => leaf_runs(|w| leaf.bits[w], sbase, s_lo, s_hi, runs),
                    Some(k) => leaf_runs(|w| leaf.mark_word(k, w), sbase, s_lo, s_hi, runs),
                }
            }
        }
    }
}

/// Hands `runs` the runs of set bits of a leaf's words (`word(w)`) within offsets `lo..hi` of
/// the leaf at `base`. A run is found with one trailing-zeros count at each end; the whole
/// words in between are only compared with all-ones (a born-offline region onlined in 2 MiB
/// blocks is mostly such words).
#[inline(never)]
fn leaf_runs<F: FnMut(u64, u64)>(
    word: impl Fn(usize) -> u64,
    base: u64,
    lo: u64,
    hi: u64,
    runs: &mut RunCoalescer<'_, F>,
) {
    let (first_word, last_word) = ((lo >> 6) as usize, ((hi - 1) >> 6) as usize);
    let last_mask = if hi & 63 == 0 {
        u64::MAX
    } else {
        (1u64 << (hi & 63)) - 1
    };
    let get = |w: usize| {
        let bits = word(w & 63);
        if w == last_word {
            bits & last_mask
        } else {
            bits
        }
    };
    let mut w = first_word;
    let mut bits = get(w) & (!0u64 << (lo & 63));
    loop {
        let word_base = base + ((w as u64) << 6);
        while bits != 0 {
            let start = bits.trailing_zeros();
            let end = start + (!(bits >> start)).trailing_zeros();
            if end == 64 {
                // The run reaches the top of the word: on through the full words after it
                // (the rest of it, in the next word, joins it in `runs`).
                let mut next = w + 1;
                while next <= last_word && get(next) == u64::MAX {
                    next += 1;
                }
                runs.add(
                    word_base + u64::from(start),
                    base + hi.min((next as u64) << 6),
                );
                w = next - 1;
                break;
            }
            runs.add(word_base + u64::from(start), word_base + u64::from(end));
            bits &= !0u64 << end;
        }
        w += 1;
        if w > last_word {
            return;
        }
        bits = get(w);
    }
}
