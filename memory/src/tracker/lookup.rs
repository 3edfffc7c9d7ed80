//! Point lookups: `get`, `contains`, the lookup cursor, `next` and `prev`.

use super::cursor::Chunks;
use super::leaf::{self, LEAF_SHIFT, WORDS};
use super::node::{ChildRef, Node};
use super::{
    slot_range_mask, slot_shift, span_shift, Mark, Marks, Tracker, SLOT_EMPTY, SLOT_FULL,
    SLOT_SHIFT, SLOT_SPARSE,
};

impl Tracker {
    /// Marks of a present page, `None` if the page is absent.
    pub fn get(&self, index: u64) -> Option<Marks> {
        let mut node = self.root.as_deref()?;
        if index >> span_shift(self.height) != 0 {
            return None;
        }
        let mut level = self.height;
        loop {
            let sshift = slot_shift(level);
            let i = ((index >> sshift) & 63) as u32;
            let bit = 1u64 << i;
            if node.present & bit == 0 {
                return None;
            }
            if node.full & bit != 0 {
                return Some(node.slot_marks(i));
            }
            if let Some(s) = node.sparse_of_byte(node.slot_byte(i as usize)) {
                return s
                    .contains(index & (leaf::LEAF_PAGES - 1))
                    .then(|| s.marks());
            }
            match node.child(node.child_idx(i as usize)) {
                ChildRef::Node(n) => {
                    node = n;
                    level -= 1;
                }
                ChildRef::Leaf(l) => {
                    let off = index & (leaf::LEAF_PAGES - 1);
                    return l.contains(off).then(|| l.marks_at(off));
                }
            }
        }
    }

    #[inline]
    pub fn contains(&self, index: u64) -> bool {
        let Some(mut node) = self.root.as_deref() else {
            return false;
        };
        debug_assert_eq!(self.root_shift, slot_shift(self.height));
        if index >= self.index_limit {
            return false;
        }
        let mut shift = self.root_shift;
        // An empty or full slot's byte is past the end of the child vector.
        while shift != LEAF_SHIFT {
            let r = node.slot_byte((index >> shift) as usize & 63);
            match node.nodes.get(usize::from(r)) {
                Some(n) => node = n,
                None => return r == SLOT_FULL,
            }
            shift -= SLOT_SHIFT;
        }
        let r = node.slot_byte((index >> LEAF_SHIFT) as usize & 63);
        match node.leaves.get(usize::from(r)) {
            Some(l) => l.contains(index & (leaf::LEAF_PAGES - 1)),
            None => r == SLOT_FULL || (r != SLOT_EMPTY && sparse_contains(node, r, index)),
        }
    }

    /// A read cursor for many lookups near each other: it keeps the leaf-sized window of the
    /// last lookup (a leaf's bits, or a window of a full or empty slot), so lookups inside it
    /// cost one bit test.
    pub fn lookup_cursor(&self) -> LookupCursor<'_> {
        LookupCursor {
            tracker: self,
            lo: 0,
            len: 0,
            bits: &NO_PAGES,
        }
    }

    /// First present page at or after `from` (carrying `filter` if given).
    pub fn next(&self, from: u64, filter: Option<Mark>) -> Option<u64> {
        Chunks::new(self, filter, false, from, u64::MAX)
            .next()
            .map(|c| c.start)
    }

    /// Last present page at or before `from` (carrying `filter` if given).
    pub fn prev(&self, from: u64, filter: Option<Mark>) -> Option<u64> {
        let root = self.root.as_deref()?;
        let last = from.min((1u64 << span_shift(self.height)) - 1);
        prev_in(root, self.height, 0, last, filter.map(|m| m as usize))
    }
}

/// The bits of a window inside an empty or a full slot, for the lookup cursor.
static NO_PAGES: [u64; WORDS] = [0; WORDS];

static ALL_PAGES: [u64; WORDS] = [u64::MAX; WORDS];

/// Whether the slot whose byte is `r` holds a sparse leaf with page `index`. Off the bitmap
/// leaves' path.
#[cold]
#[inline(never)]
fn sparse_contains(node: &Node, r: u8, index: u64) -> bool {
    node.sparse_of_byte(r)
        .is_some_and(|s| s.contains(index & (leaf::LEAF_PAGES - 1)))
}

/// See [`Tracker::lookup_cursor`].
pub struct LookupCursor<'a> {
    tracker: &'a Tracker,
    /// The cached leaf-sized window `lo..lo + len` (`len` 0: nothing yet) and its bits: the
    /// leaf's, or all ones or all zeros inside a full or an empty slot. One bit test per
    /// lookup inside it, whatever the window holds.
    lo: u64,
    len: u64,
    bits: &'a [u64; WORDS],
}

impl LookupCursor<'_> {
    #[inline]
    pub fn contains(&mut self, index: u64) -> bool {
        let mut d = index.wrapping_sub(self.lo);
        if d >= self.len {
            self.seek(index);
            d = index - self.lo;
        }
        self.bits[(d >> 6) as usize & (WORDS - 1)] >> (d & 63) & 1 != 0
    }

    /// Moves the window to the leaf-sized block of `index`. Out of line (a lookup inside the
    /// window needs none of it); the walk knows the kind of child from the level, as
    /// `Tracker::leaf_mut` does, with the usual heights unrolled.
    #[inline(never)]
    fn seek(&mut self, index: u64) {
        let t = self.tracker;
        self.lo = index & !(leaf::LEAF_PAGES - 1);
        self.len = leaf::LEAF_PAGES;
        let bits = match t.root.as_deref() {
            None => Some(&NO_PAGES),
            Some(root) => match t.root_shift {
                18 => Self::window::<2>(root, index),
                24 => Self::window::<3>(root, index),
                _ if index >= t.index_limit => Some(&NO_PAGES),
                top => {
                    let mut node = root;
                    let mut shift = top;
                    loop {
                        let r = node.slot_byte((index >> shift) as usize & 63);
                        if shift == LEAF_SHIFT {
                            break Self::leaf_bits(node, r);
                        }
                        match node.nodes.get(usize::from(r)) {
                            Some(n) => node = n,
                            None => break Some(Self::slot_bits(r)),
                        }
                        shift -= SLOT_SHIFT;
                    }
                }
            },
        };
        match bits {
            Some(b) => self.bits = b,
            None => self.sparse_seek(index),
        }
    }

    /// `seek` into a sparse leaf: a window of the one page, all ones or all zeros.
    #[cold]
    #[inline(never)]
    fn sparse_seek(&mut self, index: u64) {
        self.lo = index;
        self.len = 1;
        self.bits = if self.tracker.contains(index) {
            &ALL_PAGES
        } else {
            &NO_PAGES
        };
    }

    /// The window below a root at level `H`, unrolled.
    #[inline(always)]
    fn window<const H: u32>(mut node: &Node, index: u64) -> Option<&[u64; WORDS]> {
        if index >> span_shift(H) != 0 {
            return Some(&NO_PAGES);
        }
        let mut level = H;
        while level > 1 {
            let r = node.slot_byte((index >> slot_shift(level)) as usize & 63);
            match node.nodes.get(usize::from(r)) {
                Some(n) => node = n,
                None => return Some(Self::slot_bits(r)),
            }
            level -= 1;
        }
        let r = node.slot_byte((index >> LEAF_SHIFT) as usize & 63);
        Self::leaf_bits(node, r)
    }

    /// The window of slot byte `r` of level-1 node `node`: its bitmap leaf's bits, or
    /// `slot_bits`; `None` for a sparse leaf.
    #[inline(always)]
    fn leaf_bits(node: &Node, r: u8) -> Option<&[u64; WORDS]> {
        match node.leaves.get(usize::from(r)) {
            Some(l) => Some(&l.bits),
            None if (SLOT_SPARSE..SLOT_FULL).contains(&r) => None,
            None => Some(Self::slot_bits(r)),
        }
    }

    /// The window of a slot with no child: all pages of a full one, none of an empty one.
    #[inline(always)]
    fn slot_bits(r: u8) -> &'static [u64; WORDS] {
        if r == SLOT_FULL {
            &ALL_PAGES
        } else {
            &NO_PAGES
        }
    }
}

fn prev_in(node: &Node, level: u32, base: u64, last: u64, filter: Option<usize>) -> Option<u64> {
    let sshift = slot_shift(level);
    let top = ((last - base) >> sshift) as u32;
    let cand = match filter {
        Some(k) => node.marks[k],
        None => node.present,
    } & slot_range_mask(0, top);
    let mut c = cand;
    while c != 0 {
        let i = 63 - c.leading_zeros();
        c &= !(1u64 << i);
        let sbase = base + (u64::from(i) << sshift);
        let s_last = last.min(sbase + (1 << sshift) - 1);
        if node.full & (1 << i) != 0 {
            return Some(s_last);
        }
        if let Some(s) = node.sparse_of_byte(node.slot_byte(i as usize)) {
            let off = s_last - sbase;
            if let Some(&e) = s.pages().iter().filter(|&&e| u64::from(e) <= off).max() {
                return Some(sbase + u64::from(e));
            }
            continue;
        }
        let found = match node.child(node.child_idx(i as usize)) {
            ChildRef::Node(n) => prev_in(n, level - 1, sbase, s_last, filter),
            ChildRef::Leaf(l) => {
                let off = s_last - sbase;
                let mut w = (off >> 6) as usize;
                let mut mask = leaf::word_mask(0, (off & 63) as u32 + 1);
                loop {
                    let e = match filter {
                        Some(k) => l.mark_word(k, w),
                        None => l.bits[w],
                    } & mask;
                    if e != 0 {
                        break Some(sbase + ((w as u64) << 6) + u64::from(63 - e.leading_zeros()));
                    }
                    if w == 0 {
                        break None;
                    }
                    w -= 1;
                    mask = u64::MAX;
                }
            }
        };
        if found.is_some() {
            return found;
        }
    }
    None
}
