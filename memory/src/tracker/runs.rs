//! Ordered runs of present pages: the `runs`/`marked_runs` iterators and `for_each_run`.

use super::cursor::{Chunk, Chunks};
use super::leaf;
use super::node::{ChildRef, Node};
use super::sparse::SPARSE_MAX;
use super::{slot_range_mask, slot_shift, span_shift, Mark, Tracker};

/// A maximal run of pages `[start, start+len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub start: u64,
    pub len: u64,
}

/// Maximal runs of present pages (with a mark, if filtered), coalesced across chunks.
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

/// Maximal runs of pages carrying exactly the same marks.
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
    /// Whether every page of the range is present.
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

    /// Coalesced runs of present pages (carrying `filter` if given), optionally within the
    /// half-open range `within = (lo, hi)`, in increasing order.
    pub fn runs(&self, filter: Option<Mark>, within: Option<(u64, u64)>) -> Runs<'_> {
        let (lo, hi) = within.unwrap_or((0, u64::MAX));
        Runs::new(Chunks::new(self, filter, false, lo, hi))
    }

    /// Coalesced runs of pages carrying exactly the same marks, within `within` if given.
    pub fn marked_runs(&self, within: Option<(u64, u64)>) -> MarkedRuns<'_> {
        let (lo, hi) = within.unwrap_or((0, u64::MAX));
        MarkedRuns::new(Chunks::new(self, None, true, lo, hi))
    }

    /// Calls `f(start, len)` for each coalesced run of present pages (carrying `filter` if
    /// given) within `within = (lo, hi)`, in increasing order. The fastest way to walk runs
    /// (internal iteration, as xarray's `xa_for_each`); [`Tracker::runs`] is the cursor form.
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
        let mut acc = RunCoalescer {
            start: 0,
            end: 0,
            f: &mut f,
        };
        walk_runs(
            root,
            self.height,
            0,
            lo,
            hi,
            filter.map(|m| m as usize),
            &mut acc,
        );
        if acc.end > acc.start {
            (acc.f)(acc.start, acc.end - acc.start);
        }
    }
}

/// Coalesces adjacent pieces into runs before handing them out.
struct RunCoalescer<'f, F: FnMut(u64, u64)> {
    start: u64,
    end: u64,
    f: &'f mut F,
}

impl<F: FnMut(u64, u64)> RunCoalescer<'_, F> {
    #[inline]
    fn add(&mut self, a: u64, b: u64) {
        if a == self.end {
            self.end = b;
        } else {
            if self.end > self.start {
                (self.f)(self.start, self.end - self.start);
            }
            self.start = a;
            self.end = b;
        }
    }
}

#[inline]
fn walk_runs<F: FnMut(u64, u64)>(
    node: &Node,
    level: u32,
    base: u64,
    lo: u64,
    hi: u64,
    filter: Option<usize>,
    acc: &mut RunCoalescer<'_, F>,
) {
    let sshift = slot_shift(level);
    let first = (lo.max(base) - base) >> sshift;
    let last = (hi.min(base + (1u64 << span_shift(level))) - 1 - base) >> sshift;
    let mut cand = match filter {
        Some(k) => node.marks[k],
        None => node.present,
    } & slot_range_mask(first as u32, last as u32);
    while cand != 0 {
        let i = cand.trailing_zeros();
        cand &= cand - 1;
        let sbase = base + (u64::from(i) << sshift);
        if node.full & (1 << i) != 0 {
            acc.add(sbase.max(lo), (sbase + (1u64 << sshift)).min(hi));
            continue;
        }
        if let Some(s) = node.sparse_of_byte(node.slot_byte(i as usize)) {
            let a = lo.max(sbase) - sbase;
            let b = hi.min(sbase + leaf::LEAF_PAGES) - sbase;
            let mut buf = [0; SPARSE_MAX];
            for &e in s.sorted(&mut buf) {
                let e = u64::from(e);
                if (a..b).contains(&e) {
                    acc.add(sbase + e, sbase + e + 1);
                }
            }
            continue;
        }
        match node.child(node.child_idx(i as usize)) {
            ChildRef::Node(n) => walk_runs(n, level - 1, sbase, lo, hi, filter, acc),
            ChildRef::Leaf(l) => {
                let a = lo.max(sbase) - sbase;
                let b = hi.min(sbase + leaf::LEAF_PAGES) - sbase;
                match filter {
                    None => leaf_runs(|w| l.bits[w], sbase, a, b, acc),
                    Some(k) => leaf_runs(|w| l.mark_word(k, w), sbase, a, b, acc),
                }
            }
        }
    }
}

/// Hands `acc` the runs of set bits of a leaf's words (`word(w)`) within offsets `a..b`. A run
/// is found with one trailing-zeros count at each end; the whole words in between are only
/// compared with all-ones (a born-offline region onlined in 2 MiB blocks is mostly such words).
#[inline(never)]
fn leaf_runs<F: FnMut(u64, u64)>(
    word: impl Fn(usize) -> u64,
    sbase: u64,
    a: u64,
    b: u64,
    acc: &mut RunCoalescer<'_, F>,
) {
    let (fw, lw) = ((a >> 6) as usize, ((b - 1) >> 6) as usize);
    let last_mask = if b & 63 == 0 {
        u64::MAX
    } else {
        (1u64 << (b & 63)) - 1
    };
    let get = |w: usize| {
        let e = word(w & 63);
        if w == lw {
            e & last_mask
        } else {
            e
        }
    };
    let mut w = fw;
    let mut e = get(w) & (!0u64 << (a & 63));
    loop {
        let wbase = sbase + ((w as u64) << 6);
        while e != 0 {
            let tz = e.trailing_zeros();
            let end = tz + (!(e >> tz)).trailing_zeros();
            if end == 64 {
                // The run reaches the top of the word: on through the full words after it
                // (the rest of it, in the next word, joins it in `acc`).
                let mut v = w + 1;
                while v <= lw && get(v) == u64::MAX {
                    v += 1;
                }
                acc.add(wbase + u64::from(tz), sbase + b.min((v as u64) << 6));
                w = v - 1;
                break;
            }
            acc.add(wbase + u64::from(tz), wbase + u64::from(end));
            e &= !0u64 << end;
        }
        w += 1;
        if w > lw {
            return;
        }
        e = get(w);
    }
}
