//! Adding and removing pages and ranges: the public entry points, with their fast path for a
//! change inside one leaf whose marks stay uniform (nothing above the leaf changes); the rest
//! goes to `short_range.rs`, then `general.rs`.

use super::fbox::FBox;
use super::general::Op;
use super::leaf::{Leaf, LEAF_PAGES, LEAF_SHIFT};
use super::node::Node;
use super::{
    slot_shift, span_shift, Marks, Tracker, TrackerError, LEVEL2_SLOT_SHIFT, LEVEL3_SLOT_SHIFT,
    SLOT_SHIFT,
};

impl Tracker {
    /// Adds page `index` with `marks`; returns whether it was absent (a present page keeps
    /// its marks).
    ///
    /// Errors: [`TrackerError::OutOfRange`] past [`MAX_INDEX`](super::MAX_INDEX);
    /// [`TrackerError::NoMemory`] if a new leaf, a node or mark bitmaps are needed and cannot
    /// be allocated (nor taken from [`Tracker::reserve`]'s spares). Either way nothing changed.
    /// Cost: a walk of `height` slot bytes and one bit set when the page's leaf exists and
    /// keeps uniform marks; more when a leaf is created or filled, or marks mix.
    #[inline]
    pub fn insert(&mut self, index: u64, marks: Marks) -> Result<bool, TrackerError> {
        // Fast path: the page's leaf exists, carries exactly `marks` and does not fill up, so
        // nothing above the leaf changes.
        debug_assert!(self.root.is_none() || self.root_shift == slot_shift(self.height));
        if let Some(leaf) = Self::leaf_mut(&mut self.root, self.root_shift, self.index_limit, index)
        {
            let off = index & (LEAF_PAGES - 1);
            let (w, b) = ((off >> 6) as usize, 1u64 << (off & 63));
            if leaf.bits[w] & b != 0 {
                return Ok(false);
            }
            if leaf.fast_insert_ok(marks, 1) {
                leaf.bits[w] |= b;
                leaf.add_count(1);
                let counter = &mut self.pages_by_marks[usize::from(marks.0 & 7)];
                *counter = counter.wrapping_add(1);
                return Ok(true);
            }
        }
        self.insert_slow(index, marks)
    }

    /// `insert` off the fast path (out of line, so the fast path needs no stack frame).
    #[cold]
    #[inline(never)]
    pub(super) fn insert_slow(&mut self, index: u64, marks: Marks) -> Result<bool, TrackerError> {
        Ok(self.insert_range(index, 1, marks)? == 1)
    }

    /// Adds pages `start..start+count` with `marks` (pages already present keep theirs);
    /// returns how many pages were added. `count` 0 does nothing.
    ///
    /// Errors as [`Tracker::insert`], nothing changed. Cost: inside one leaf whose marks stay
    /// uniform, one walk and the leaf's words; most other ranges shorter than a leaf, one walk
    /// to their level-1 node; longer ranges, a walk of the range, empty aligned stretches
    /// becoming full slots in O(1) each (a 64 GiB region born offline costs a few nodes, not
    /// 16 M bits) and leaves changed a word at a time.
    pub fn insert_range(
        &mut self,
        start: u64,
        count: u64,
        marks: Marks,
    ) -> Result<u64, TrackerError> {
        // Fast path: the range lies in one leaf, which keeps uniform marks and does not fill
        // up, so nothing above the leaf changes.
        let lo = start & (LEAF_PAGES - 1);
        if count.wrapping_sub(1) < LEAF_PAGES - lo {
            if let Some(leaf) =
                Self::leaf_mut(&mut self.root, self.root_shift, self.index_limit, start)
            {
                if leaf.fast_insert_ok(marks, count as u32) {
                    let n = leaf.set_bits(lo, lo + count);
                    let counter = &mut self.pages_by_marks[usize::from(marks.0 & 7)];
                    *counter = counter.wrapping_add(u64::from(n));
                    return Ok(u64::from(n));
                }
            }
        }
        self.insert_range_slow(start, count, marks)
    }

    /// `insert_range` off the fast path (out of line).
    #[inline(never)]
    pub(super) fn insert_range_slow(
        &mut self,
        start: u64,
        count: u64,
        marks: Marks,
    ) -> Result<u64, TrackerError> {
        if let Some(n) = self.short_range_update(start, count, Op::Insert(marks)) {
            return Ok(n);
        }
        Ok(self
            .general_update(start, count, Op::Insert(marks))?
            .present as u64)
    }

    /// Removes page `index`; returns whether it was present.
    ///
    /// Errors: [`TrackerError::OutOfRange`] past [`MAX_INDEX`](super::MAX_INDEX);
    /// [`TrackerError::NoMemory`] if the page lies in a full slot, which must be split into
    /// smaller pieces, and they cannot be allocated. Either way nothing changed. Cost as
    /// [`Tracker::insert`].
    #[inline]
    pub fn remove(&mut self, index: u64) -> Result<bool, TrackerError> {
        // Fast path: a leaf with uniform marks that does not become empty.
        debug_assert!(self.root.is_none() || self.root_shift == slot_shift(self.height));
        if let Some(leaf) = Self::leaf_mut(&mut self.root, self.root_shift, self.index_limit, index)
        {
            let off = index & (LEAF_PAGES - 1);
            let (w, b) = ((off >> 6) as usize, 1u64 << (off & 63));
            if leaf.bits[w] & b == 0 {
                return Ok(false);
            }
            if leaf.fast_remove_ok(1) {
                leaf.bits[w] ^= b; // the bit is set
                leaf.add_count(1u32.wrapping_neg());
                let marks = leaf.uniform();
                let counter = &mut self.pages_by_marks[usize::from(marks.0 & 7)];
                *counter = counter.wrapping_sub(1);
                return Ok(true);
            }
        }
        self.remove_slow(index)
    }

    /// `remove` off the fast path (out of line).
    #[cold]
    #[inline(never)]
    pub(super) fn remove_slow(&mut self, index: u64) -> Result<bool, TrackerError> {
        Ok(self.remove_range(index, 1)? == 1)
    }

    /// Removes pages `start..start+count`; returns how many were present. `count` 0 does
    /// nothing.
    ///
    /// Errors as [`Tracker::remove`] (a range splitting full slots at its edges), nothing
    /// changed. Cost as [`Tracker::insert_range`].
    pub fn remove_range(&mut self, start: u64, count: u64) -> Result<u64, TrackerError> {
        // Fast path: the range lies in one leaf with uniform marks that keeps some pages.
        let lo = start & (LEAF_PAGES - 1);
        if count.wrapping_sub(1) < LEAF_PAGES - lo {
            if let Some(leaf) =
                Self::leaf_mut(&mut self.root, self.root_shift, self.index_limit, start)
            {
                if leaf.fast_remove_ok(count as u32) {
                    let n = leaf.clear_bits(lo, lo + count);
                    let counter = &mut self.pages_by_marks[usize::from(leaf.uniform().0 & 7)];
                    *counter = counter.wrapping_sub(u64::from(n));
                    return Ok(u64::from(n));
                }
            }
        }
        self.remove_range_slow(start, count)
    }

    /// `remove_range` off the fast path (out of line).
    #[inline(never)]
    pub(super) fn remove_range_slow(
        &mut self,
        start: u64,
        count: u64,
    ) -> Result<u64, TrackerError> {
        if let Some(n) = self.short_range_update(start, count, Op::Remove) {
            return Ok(n);
        }
        Ok((-self.general_update(start, count, Op::Remove)?.present) as u64)
    }

    /// The leaf holding `index`, if the path to it is made of child pointers all the way down.
    #[inline(always)]
    pub(super) fn leaf_mut(
        root: &mut Option<FBox<Node>>,
        root_shift: u32,
        index_limit: u64,
        index: u64,
    ) -> Option<&mut Leaf> {
        let node = Self::level1_mut(root, root_shift, index_limit, index)?;
        let byte = node.slot_byte((index >> LEAF_SHIFT) as usize & 63);
        node.leaves.get_mut(usize::from(byte)).map(|l| &mut **l)
    }

    /// The level-1 node above `index`, if the path to it is made of child pointers.
    #[inline(always)]
    pub(super) fn level1_mut(
        root: &mut Option<FBox<Node>>,
        root_shift: u32,
        index_limit: u64,
        index: u64,
    ) -> Option<&mut Node> {
        let mut node: &mut Node = root.as_deref_mut()?;
        // The usual heights (up to 64 GiB and 4 TiB of guest) unrolled: no loop control, and
        // the index compared with the tree's span as a constant (one load less).
        match root_shift {
            LEVEL2_SLOT_SHIFT => return Self::descend::<2>(node, index),
            LEVEL3_SLOT_SHIFT => return Self::descend::<3>(node, index),
            _ => {}
        }
        if index >= index_limit {
            return None;
        }
        let mut shift = root_shift;
        // An empty or full slot's byte is past the end of the child vector: one bounds check
        // for both. Above level 1 the children are nodes, at level 1 leaves.
        while shift != LEAF_SHIFT {
            let byte = node.slot_byte((index >> shift) as usize & 63);
            node = node.nodes.get_mut(usize::from(byte))?;
            shift -= SLOT_SHIFT;
        }
        Some(node)
    }

    /// `level1_mut` below a root at level `H`, unrolled.
    #[inline(always)]
    pub(super) fn descend<const H: u32>(mut node: &mut Node, index: u64) -> Option<&mut Node> {
        if index >> span_shift(H) != 0 {
            return None;
        }
        let mut level = H;
        while level > 1 {
            let byte = node.slot_byte((index >> slot_shift(level)) as usize & 63);
            node = node.nodes.get_mut(usize::from(byte))?;
            level -= 1;
        }
        Some(node)
    }
}
