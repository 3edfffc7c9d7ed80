//! Point lookups: `get`, `contains`, the lookup cursor for many lookups close together, and
//! the neighbours `next` and `prev`. All take `&self` and never allocate.

use super::cursor::Chunks;
use super::leaf::{self, LEAF_PAGES, LEAF_SHIFT, WORDS};
use super::node::{ChildRef, Node};
use super::{
    slot_range_mask, slot_shift, span_shift, Mark, Marks, Tracker, LEVEL2_SLOT_SHIFT,
    LEVEL3_SLOT_SHIFT, SLOT_EMPTY, SLOT_FULL, SLOT_SHIFT, SLOT_SPARSE,
};

impl Tracker {
    /// Returns the marks of page `index`, `None` if it is absent (any `index`, past
    /// [`MAX_INDEX`](super::MAX_INDEX) included). Cost: a walk of at most `height` levels;
    /// [`Tracker::contains`] is cheaper when the marks do not matter.
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
            if let Some(sparse) = node.sparse_of_byte(node.slot_byte(i as usize)) {
                return sparse
                    .contains(index & (LEAF_PAGES - 1))
                    .then(|| sparse.marks());
            }
            match node.child(node.child_idx(i as usize)) {
                ChildRef::Node(child) => {
                    node = child;
                    level -= 1;
                }
                ChildRef::Leaf(leaf) => {
                    let offset = index & (LEAF_PAGES - 1);
                    return leaf.contains(offset).then(|| leaf.marks_at(offset));
                }
            }
        }
    }

    /// Returns whether page `index` is present (any `index`). Cost: one slot byte per level
    /// and a bit test.
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
            let byte = node.slot_byte((index >> shift) as usize & 63);
            match node.nodes.get(usize::from(byte)) {
                Some(child) => node = child,
                None => return byte == SLOT_FULL,
            }
            shift -= SLOT_SHIFT;
        }
        let byte = node.slot_byte((index >> LEAF_SHIFT) as usize & 63);
        match node.leaves.get(usize::from(byte)) {
            Some(leaf) => leaf.contains(index & (LEAF_PAGES - 1)),
            None => byte == SLOT_FULL || (byte != SLOT_EMPTY && sparse_contains(node, byte, index)),
        }
    }

    /// Returns a read cursor for many lookups near each other: it keeps the leaf-sized window
    /// of the last lookup (a leaf's bits, or all or none inside a full or empty slot), so a
    /// lookup inside it costs one bit test and one outside it one walk. It borrows the
    /// tracker, so no update can happen while it lives.
    pub fn lookup_cursor(&self) -> LookupCursor<'_> {
        LookupCursor {
            tracker: self,
            lo: 0,
            len: 0,
            bits: &NO_PAGES,
        }
    }

    /// Returns the first present page at or after `from` (carrying mark `filter`, if given).
    /// Cost: a walk down to it; subtrees without the page (or without the mark: their summary
    /// bits say so) are skipped whole.
    pub fn next(&self, from: u64, filter: Option<Mark>) -> Option<u64> {
        Chunks::new(self, filter, false, from, u64::MAX)
            .next()
            .map(|c| c.start)
    }

    /// Returns the last present page at or before `from` (carrying mark `filter`, if given).
    /// Cost as [`Tracker::next`].
    pub fn prev(&self, from: u64, filter: Option<Mark>) -> Option<u64> {
        let root = self.root.as_deref()?;
        let last = from.min((1u64 << span_shift(self.height)) - 1);
        prev_in(root, self.height, 0, last, filter.map(|m| m as usize))
    }
}

/// The bits of a window inside an empty and inside a full slot, for the lookup cursor.
static NO_PAGES: [u64; WORDS] = [0; WORDS];
static ALL_PAGES: [u64; WORDS] = [u64::MAX; WORDS];

/// Whether the slot whose byte is `byte` holds a sparse leaf with page `index`. Out of the
/// bitmap leaves' path.
#[cold]
#[inline(never)]
fn sparse_contains(node: &Node, byte: u8, index: u64) -> bool {
    node.sparse_of_byte(byte)
        .is_some_and(|sparse| sparse.contains(index & (LEAF_PAGES - 1)))
}

/// Many lookups close together, from [`Tracker::lookup_cursor`].
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
    /// Returns whether page `index` is present (any `index`). Cost: a bit test inside the
    /// window of the last lookup, a walk to move the window otherwise.
    #[inline]
    pub fn contains(&mut self, index: u64) -> bool {
        let mut offset = index.wrapping_sub(self.lo);
        if offset >= self.len {
            self.seek(index);
            offset = index - self.lo;
        }
        self.bits[(offset >> 6) as usize & (WORDS - 1)] >> (offset & 63) & 1 != 0
    }

    /// Moves the window to the leaf-sized block of `index`. Out of line (a lookup inside the
    /// window needs none of it); the walk knows the kind of child from the level, as
    /// `Tracker::leaf_mut` does, with the usual heights unrolled.
    #[inline(never)]
    fn seek(&mut self, index: u64) {
        let tracker = self.tracker;
        self.lo = index & !(LEAF_PAGES - 1);
        self.len = LEAF_PAGES;
        let bits = match tracker.root.as_deref() {
            None => Some(&NO_PAGES),
            Some(root) => match tracker.root_shift {
                LEVEL2_SLOT_SHIFT => Self::window::<2>(root, index),
                LEVEL3_SLOT_SHIFT => Self::window::<3>(root, index),
                _ if index >= tracker.index_limit => Some(&NO_PAGES),
                root_shift => {
                    let mut node = root;
                    let mut shift = root_shift;
                    loop {
                        let byte = node.slot_byte((index >> shift) as usize & 63);
                        if shift == LEAF_SHIFT {
                            break Self::leaf_bits(node, byte);
                        }
                        match node.nodes.get(usize::from(byte)) {
                            Some(n) => node = n,
                            None => break Some(Self::slot_bits(byte)),
                        }
                        shift -= SLOT_SHIFT;
                    }
                }
            },
        };
        match bits {
            Some(bits) => self.bits = bits,
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
            let byte = node.slot_byte((index >> slot_shift(level)) as usize & 63);
            match node.nodes.get(usize::from(byte)) {
                Some(n) => node = n,
                None => return Some(Self::slot_bits(byte)),
            }
            level -= 1;
        }
        let byte = node.slot_byte((index >> LEAF_SHIFT) as usize & 63);
        Self::leaf_bits(node, byte)
    }

    /// The window of the slot whose byte is `byte` in level-1 node `node`: its bitmap leaf's bits, or
    /// `slot_bits`; `None` for a sparse leaf.
    #[inline(always)]
    fn leaf_bits(node: &Node, byte: u8) -> Option<&[u64; WORDS]> {
        match node.leaves.get(usize::from(byte)) {
            Some(leaf) => Some(&leaf.bits),
            None if (SLOT_SPARSE..SLOT_FULL).contains(&byte) => None,
            None => Some(Self::slot_bits(byte)),
        }
    }

    /// The window of a slot with no child: all pages of a full one, none of an empty one.
    #[inline(always)]
    fn slot_bits(byte: u8) -> &'static [u64; WORDS] {
        if byte == SLOT_FULL {
            &ALL_PAGES
        } else {
            &NO_PAGES
        }
    }
}

/// `Tracker::prev` below `node` (at `level`, covering pages from `base`): the last present
/// page at or before `last` (carrying mark `filter`, if given).
fn prev_in(node: &Node, level: u32, base: u64, last: u64, filter: Option<usize>) -> Option<u64> {
    let sshift = slot_shift(level);
    let last_slot = ((last - base) >> sshift) as u32;
    let mut candidates = match filter {
        Some(k) => node.marks[k],
        None => node.present,
    } & slot_range_mask(0, last_slot);
    while candidates != 0 {
        let i = 63 - candidates.leading_zeros();
        candidates &= !(1u64 << i);
        let sbase = base + (u64::from(i) << sshift);
        let s_last = last.min(sbase + (1 << sshift) - 1);
        if node.full & (1 << i) != 0 {
            return Some(s_last);
        }
        if let Some(sparse) = node.sparse_of_byte(node.slot_byte(i as usize)) {
            let offset = s_last - sbase;
            let pages = sparse.pages().iter();
            if let Some(&page) = pages.filter(|&&page| u64::from(page) <= offset).max() {
                return Some(sbase + u64::from(page));
            }
            continue;
        }
        let found = match node.child(node.child_idx(i as usize)) {
            ChildRef::Node(child) => prev_in(child, level - 1, sbase, s_last, filter),
            ChildRef::Leaf(leaf) => {
                let offset = s_last - sbase;
                let mut w = (offset >> 6) as usize;
                let mut mask = leaf::word_mask(0, (offset & 63) as u32 + 1);
                loop {
                    let word = match filter {
                        Some(k) => leaf.mark_word(k, w),
                        None => leaf.bits[w],
                    } & mask;
                    if word != 0 {
                        let bit = 63 - word.leading_zeros();
                        break Some(sbase + ((w as u64) << 6) + u64::from(bit));
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
