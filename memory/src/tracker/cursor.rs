//! The in-order cursor over chunks of present pages that the run iterators are built on.
//!
//! The cursor keeps an explicit stack of nodes with the slots still to visit. Slots come from the
//! node's `present` bits, or from a mark's summary bits when the walk is filtered by that mark, so a
//! filtered walk never enters a subtree without the mark. A full slot yields one chunk for its whole
//! aligned range; a leaf yields its runs of set bits, found a word at a time.

use super::leaf::{Leaf, WORDS};
use super::node::{ChildRef, Node};
use super::sparse::SPARSE_MAX;
use super::{slot_range_mask, slot_shift, span_shift, Mark, Marks, Tracker};

/// Pages `start..start+len`, all present: a piece of a run as the cursor finds it, or a
/// maximal run of pages with the same marks from [`Tracker::marked_runs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// First page.
    pub start: u64,
    /// Pages (at least 1).
    pub len: u64,
    /// The pages' marks: exactly, when the walk is by marks (`marked_runs`); otherwise those
    /// of the first page.
    pub marks: Marks,
}

/// A node on the cursor's stack.
#[derive(Clone, Copy)]
struct Frame<'a> {
    node: &'a Node,
    level: u32,
    base: u64,
    /// The slots still to visit.
    pending: u64,
}

/// A cursor over the tracker in increasing page order, bounded by `lo..hi`.
pub struct Chunks<'a> {
    /// The nodes from the root down to the current one (`depth` of them).
    stack: [Option<Frame<'a>>; 8],
    depth: usize,
    /// The current bitmap leaf and its base.
    leaf: Option<(&'a Leaf, u64)>,
    /// The current sparse leaf: its base and marks, and its pages in increasing order (a copy,
    /// `sparse_next..sparse_len` still to visit).
    sparse: Option<(u64, Marks)>,
    sparse_pages: [u16; SPARSE_MAX],
    sparse_next: usize,
    sparse_len: usize,
    /// The next page to look at.
    pos: u64,
    lo: u64,
    hi: u64,
    /// Only pages carrying this mark.
    filter: Option<usize>,
    /// Chunks end where the marks change (otherwise only where pages are missing).
    by_marks: bool,
    tracker: &'a Tracker,
}

impl<'a> Chunks<'a> {
    pub(crate) fn new(
        tracker: &'a Tracker,
        filter: Option<Mark>,
        by_marks: bool,
        lo: u64,
        hi: u64,
    ) -> Chunks<'a> {
        let mut chunks = Chunks {
            stack: [None; 8],
            depth: 0,
            leaf: None,
            sparse: None,
            sparse_pages: [0; SPARSE_MAX],
            sparse_next: 0,
            sparse_len: 0,
            pos: lo,
            lo,
            hi,
            filter: filter.map(|m| m as usize),
            by_marks,
            tracker,
        };
        chunks.seek(lo);
        chunks
    }

    /// Restarts the walk at page `from` (the upper bound stays).
    fn seek(&mut self, from: u64) {
        self.lo = from;
        self.pos = from;
        self.depth = 0;
        self.leaf = None;
        self.sparse = None;
        if let Some(root) = self.tracker.root.as_deref() {
            if self.lo < self.hi && self.lo >> span_shift(self.tracker.height) == 0 {
                self.push(root, self.tracker.height, 0);
            }
        }
    }

    /// Puts `node` (at `level`, covering pages from `base`) on the stack, with its slots inside
    /// `lo..hi` (carrying the filter's mark, if any) to visit.
    fn push(&mut self, node: &'a Node, level: u32, base: u64) {
        let sshift = slot_shift(level);
        let span_last = base + ((1u64 << span_shift(level)) - 1);
        let first = if self.lo > base {
            ((self.lo - base) >> sshift) as u32
        } else {
            0
        };
        let last_page = span_last.min(self.hi.saturating_sub(1));
        if last_page < base || first > 63 {
            return;
        }
        let last = ((last_page - base) >> sshift) as u32;
        let pending = match self.filter {
            Some(k) => node.marks[k],
            None => node.present,
        } & slot_range_mask(first, last);
        self.stack[self.depth] = Some(Frame {
            node,
            level,
            base,
            pending,
        });
        self.depth += 1;
    }

    /// Word `w` of `leaf`'s pages that the walk visits (all, or those with the mark).
    #[inline]
    fn leaf_word(&self, leaf: &Leaf, w: usize) -> u64 {
        match self.filter {
            Some(k) => leaf.mark_word(k, w),
            None => leaf.bits[w],
        }
    }

    /// The next run of pages inside the current sparse leaf, from `self.pos` (its marks are
    /// its slot's summary: a walk filtered by a mark only enters it if it carries the mark).
    fn next_in_sparse(&mut self, base: u64, marks: Marks) -> Option<Chunk> {
        let stop = (base + (WORDS as u64) * 64).min(self.hi);
        let pages = &self.sparse_pages[..self.sparse_len];
        let mut next = self.sparse_next;
        while next < pages.len() && base + u64::from(pages[next]) < self.pos {
            next += 1;
        }
        let start = base + u64::from(*pages.get(next)?);
        if start >= stop {
            return None;
        }
        let mut end = start + 1;
        next += 1;
        while next < pages.len() && base + u64::from(pages[next]) == end && end < stop {
            end += 1;
            next += 1;
        }
        self.sparse_next = next;
        self.pos = end;
        Some(Chunk {
            start,
            len: end - start,
            marks,
        })
    }

    /// The next run of matching pages inside the current leaf, from `self.pos`.
    fn next_in_leaf(&mut self, leaf: &'a Leaf, base: u64) -> Option<Chunk> {
        let stop = (base + (WORDS as u64) * 64).min(self.hi);
        let mut start = self.pos.max(base);
        // Find the first matching page.
        while start < stop {
            let offset = start - base;
            let w = (offset >> 6) as usize;
            let bits = self.leaf_word(leaf, w) >> (offset & 63);
            if bits != 0 {
                start += u64::from(bits.trailing_zeros());
                break;
            }
            start = base + ((w as u64 + 1) << 6);
        }
        if start >= stop {
            self.pos = stop;
            return None;
        }
        let offset = start - base;
        let marks = leaf.marks_at(offset);
        // Extend while pages match (and carry the same marks when walking by marks).
        let mut end = start;
        while end < stop {
            let offset = end - base;
            let w = (offset >> 6) as usize;
            let bits = if self.by_marks {
                leaf.exact_word(marks, w) & self.leaf_word(leaf, w)
            } else {
                self.leaf_word(leaf, w)
            } >> (offset & 63);
            let ones = (!bits).trailing_zeros();
            end += u64::from(ones);
            if ones as u64 != 64 - (offset & 63) {
                break;
            }
        }
        let end = end.min(stop);
        self.pos = end;
        Some(Chunk {
            start,
            len: end - start,
            marks,
        })
    }
}

impl<'a> Iterator for Chunks<'a> {
    type Item = Chunk;

    fn next(&mut self) -> Option<Chunk> {
        loop {
            if let Some((leaf, base)) = self.leaf {
                if let Some(chunk) = self.next_in_leaf(leaf, base) {
                    return Some(chunk);
                }
                self.leaf = None;
            }
            if let Some((base, marks)) = self.sparse {
                if let Some(chunk) = self.next_in_sparse(base, marks) {
                    return Some(chunk);
                }
                self.sparse = None;
            }
            if self.depth == 0 {
                return None;
            }
            let frame = self.stack[self.depth - 1].as_mut().expect("frame");
            if frame.pending == 0 {
                self.depth -= 1;
                continue;
            }
            let i = frame.pending.trailing_zeros();
            frame.pending &= frame.pending - 1;
            let Frame {
                node, level, base, ..
            } = *frame;
            let sshift = slot_shift(level);
            let sbase = base + (u64::from(i) << sshift);
            if node.full & (1 << i) != 0 {
                let start = sbase.max(self.lo);
                let end = (sbase + (1u64 << sshift)).min(self.hi);
                self.pos = end;
                return Some(Chunk {
                    start,
                    len: end - start,
                    marks: node.slot_marks(i),
                });
            }
            if let Some(sparse) = node.sparse_of_byte(node.slot_byte(i as usize)) {
                self.sparse_len = sparse.sorted(&mut self.sparse_pages).len();
                self.sparse_next = 0;
                self.sparse = Some((sbase, sparse.marks()));
                continue;
            }
            match node.child(node.child_idx(i as usize)) {
                ChildRef::Leaf(leaf) => {
                    self.leaf = Some((leaf, sbase));
                }
                ChildRef::Node(child) => self.push(child, level - 1, sbase),
            }
        }
    }
}
