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

/// A piece of a run: pages `start..start+len`, all present, carrying `marks` (exactly, when the
/// walk is by marks; otherwise the marks of the first page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub start: u64,
    pub len: u64,
    pub marks: Marks,
}

#[derive(Clone, Copy)]
struct Frame<'a> {
    node: &'a Node,
    level: u32,
    base: u64,
    pending: u64,
}

/// A cursor over the tracker in increasing page order, bounded by `lo..hi`.
pub struct Chunks<'a> {
    stack: [Option<Frame<'a>>; 8],
    depth: usize,
    leaf: Option<(&'a Leaf, u64)>,
    /// The current sparse leaf: its base and marks, and its pages in increasing order (a copy,
    /// `sparse_next..sparse_len` still to visit).
    sparse: Option<(u64, Marks)>,
    sparse_pages: [u16; SPARSE_MAX],
    sparse_next: usize,
    sparse_len: usize,
    pos: u64,
    lo: u64,
    hi: u64,
    filter: Option<usize>,
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
        let mut c = Chunks {
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
        c.seek(lo);
        c
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
        let cand = match self.filter {
            Some(k) => node.marks[k],
            None => node.present,
        } & slot_range_mask(first, last);
        self.stack[self.depth] = Some(Frame {
            node,
            level,
            base,
            pending: cand,
        });
        self.depth += 1;
    }

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
        let end = (base + (WORDS as u64) * 64).min(self.hi);
        let pages = &self.sparse_pages[..self.sparse_len];
        let mut k = self.sparse_next;
        while k < pages.len() && base + u64::from(pages[k]) < self.pos {
            k += 1;
        }
        let p = base + u64::from(*pages.get(k)?);
        if p >= end {
            return None;
        }
        let mut q = p + 1;
        k += 1;
        while k < pages.len() && base + u64::from(pages[k]) == q && q < end {
            q += 1;
            k += 1;
        }
        self.sparse_next = k;
        self.pos = q;
        Some(Chunk {
            start: p,
            len: q - p,
            marks,
        })
    }

    /// The next run of matching pages inside the current leaf, from `self.pos`.
    fn next_in_leaf(&mut self, leaf: &'a Leaf, base: u64) -> Option<Chunk> {
        let end = (base + (WORDS as u64) * 64).min(self.hi);
        let mut p = self.pos.max(base);
        // Find the first matching page.
        while p < end {
            let off = p - base;
            let w = (off >> 6) as usize;
            let e = self.leaf_word(leaf, w) >> (off & 63);
            if e != 0 {
                p += u64::from(e.trailing_zeros());
                break;
            }
            p = base + ((w as u64 + 1) << 6);
        }
        if p >= end {
            self.pos = end;
            return None;
        }
        let off = p - base;
        let marks = leaf.marks_at(off);
        // Extend while pages match (and carry the same marks when walking by marks).
        let mut q = p;
        while q < end {
            let off = q - base;
            let w = (off >> 6) as usize;
            let e = if self.by_marks {
                leaf.exact_word(marks, w) & self.leaf_word(leaf, w)
            } else {
                self.leaf_word(leaf, w)
            } >> (off & 63);
            let ones = (!e).trailing_zeros();
            q += u64::from(ones);
            if ones as u64 != 64 - (off & 63) {
                break;
            }
        }
        let q = q.min(end);
        self.pos = q;
        Some(Chunk {
            start: p,
            len: q - p,
            marks,
        })
    }
}

impl<'a> Iterator for Chunks<'a> {
    type Item = Chunk;

    fn next(&mut self) -> Option<Chunk> {
        loop {
            if let Some((leaf, base)) = self.leaf {
                if let Some(c) = self.next_in_leaf(leaf, base) {
                    return Some(c);
                }
                self.leaf = None;
            }
            if let Some((base, marks)) = self.sparse {
                if let Some(c) = self.next_in_sparse(base, marks) {
                    return Some(c);
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
            if let Some(s) = node.sparse_of_byte(node.slot_byte(i as usize)) {
                self.sparse_len = s.sorted(&mut self.sparse_pages).len();
                self.sparse_next = 0;
                self.sparse = Some((sbase, s.marks()));
                continue;
            }
            match node.child(node.child_idx(i as usize)) {
                ChildRef::Leaf(l) => {
                    self.leaf = Some((l, sbase));
                }
                ChildRef::Node(n) => self.push(n, level - 1, sbase),
            }
        }
    }
}
