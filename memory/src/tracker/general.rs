//! The general update path, for any range and any operation: plan every allocation, allocate
//! (or fail with the tree untouched), then change the tree.

use super::fbox::AllocError;
use super::leaf::Leaf;
use super::node::{Child, ChildMut, Node};
use super::pool::{Need, Pool};
use super::sparse::SparseLeaf;
use super::{
    height_for, slot_shift, span_shift, Mark, Marks, Tracker, TrackerError, MARK_COUNT, MAX_INDEX,
};

/// An update, as the update paths pass it down the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    /// Add pages with these marks (present pages keep theirs).
    Insert(Marks),
    Remove,
    /// Set mark `k` on present pages.
    SetMark(usize),
    /// Clear mark `k`.
    ClearMark(usize),
}

impl Op {
    /// Whether the op changes the pages of a full slot whose pages carry `marks`.
    fn changes_full(self, marks: Marks) -> bool {
        match self {
            Op::Insert(_) => false,
            Op::Remove => true,
            Op::SetMark(k) => !marks.has(k),
            Op::ClearMark(k) => marks.has(k),
        }
    }
}

/// The part of an update's range inside one slot of a node: pages `lo..hi` relative to the
/// slot's first page, of the `span` pages the slot covers.
#[derive(Debug, Clone, Copy)]
struct SlotPart {
    slot: u32,
    lo: u64,
    hi: u64,
    span: u64,
}

impl SlotPart {
    /// Whether the part covers the whole slot.
    #[inline]
    fn whole(self) -> bool {
        self.lo == 0 && self.hi == self.span
    }
}

/// Change in the number of present pages and of pages carrying each mark.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Delta {
    pub(super) present: i64,
    pub(super) marks: [i64; MARK_COUNT],
}

impl Delta {
    /// Adds `other`'s changes to these.
    pub(super) fn add(&mut self, other: Delta) {
        self.present += other.present;
        for k in 0..MARK_COUNT {
            self.marks[k] += other.marks[k];
        }
    }

    /// `pages` pages carrying `marks` added (`sign` 1) or removed (`sign` -1).
    pub(super) fn whole(sign: i64, pages: u64, marks: Marks) -> Delta {
        let mut delta = Delta {
            present: sign * pages as i64,
            ..Delta::default()
        };
        for k in 0..MARK_COUNT {
            if marks.has(k) {
                delta.marks[k] = sign * pages as i64;
            }
        }
        delta
    }
}

impl Tracker {
    /// Sets `mark` on the present pages of `start..start+count`; returns how many did not
    /// have it.
    ///
    /// Errors: [`TrackerError::OutOfRange`] if the range passes [`MAX_INDEX`];
    /// [`TrackerError::NoMemory`] if a full slot or a leaf whose pages would get different
    /// marks must be split and the allocation fails. Either way nothing changed. Cost: a walk
    /// of the range, each whole full slot changed in O(1), each leaf a word at a time.
    pub fn set_mark(&mut self, start: u64, count: u64, mark: Mark) -> Result<u64, TrackerError> {
        let k = mark as usize;
        Ok(self.general_update(start, count, Op::SetMark(k))?.marks[k] as u64)
    }

    /// Clears `mark` on the pages of `start..start+count`; returns how many had it. Errors and
    /// cost as [`Tracker::set_mark`].
    pub fn clear_mark(&mut self, start: u64, count: u64, mark: Mark) -> Result<u64, TrackerError> {
        let k = mark as usize;
        Ok((-self.general_update(start, count, Op::ClearMark(k))?.marks[k]) as u64)
    }

    /// The end of `start..start+count`, if the range stays within [`MAX_INDEX`].
    pub(super) fn checked_end(start: u64, count: u64) -> Result<u64, TrackerError> {
        match start.checked_add(count) {
            Some(end) if end - 1 <= MAX_INDEX => Ok(end),
            _ => Err(TrackerError::OutOfRange {
                start,
                count,
                max: MAX_INDEX,
            }),
        }
    }

    /// Applies `op` to `start..start+count` by the general two-phase path: plan and allocate
    /// everything (the tree untouched if that fails), then change the tree. Returns the change
    /// in pages and marks.
    pub(super) fn general_update(
        &mut self,
        start: u64,
        count: u64,
        op: Op,
    ) -> Result<Delta, TrackerError> {
        if count == 0 {
            return Ok(Delta::default());
        }
        let end = Self::checked_end(start, count)?;
        // The end of the range within the tree, and the height the tree must have.
        let (hi, height) = if let Op::Insert(_) = op {
            (end, height_for(end - 1).max(self.height))
        } else {
            if self.root.is_none() {
                return Ok(Delta::default());
            }
            let span_end = 1u64 << span_shift(self.height);
            if start >= span_end {
                return Ok(Delta::default());
            }
            (end.min(span_end), self.height)
        };
        // Phase 1: everything that can fail.
        let need = self.plan(start, hi, height, op)?;
        let prior = self.pool.spares();
        self.pool.reserve(need)?;

        // Phase 2: the changes, which cannot fail.
        self.grow(height);
        let root = self.root.as_mut().expect("root present");
        let delta = root.apply(self.height, start, hi, op, &mut self.pool);
        root.release_children();
        self.pages = self.pages.wrapping_add(delta.present as u64);
        for k in 0..MARK_COUNT {
            self.marked[k] = (self.marked[k] as i64 + delta.marks[k]) as u64;
        }
        self.shrink();
        self.pool.release_empty();
        debug_assert_eq!(
            self.pool.spares(),
            prior.max_each(need).minus(need),
            "reservation miscounted for {op:?} on 0x{start:x}..0x{hi:x}"
        );
        Ok(delta)
    }

    /// Phase 1 of `general_update`: reserves room in the child vectors that will grow and
    /// counts what the update of `start..hi`, on a tree grown to `height`, takes from the pool.
    fn plan(&mut self, start: u64, hi: u64, height: u32, op: Op) -> Result<Need, TrackerError> {
        let mut need = Need::default();
        match &mut self.root {
            // A fresh root at `height` and the chains below it.
            None => need.new_subtree(height, start, hi, false),
            Some(root) => {
                let old_end = 1u64 << span_shift(self.height);
                if start < old_end {
                    root.prepare(self.height, start, old_end.min(hi), op, &mut need)?;
                }
                // Growth: one new node per level, the old root hanging at slot 0 of the chain;
                // the part of the range in slots 1.. of each new node lands in fresh subtrees.
                for level in self.height + 1..=height {
                    need.nodes += 1;
                    let first = start.max(1u64 << slot_shift(level));
                    let last = hi.min(1u64 << span_shift(level));
                    if first < last {
                        need.edge_subtrees(level, first, last, false);
                    }
                }
            }
        }
        Ok(need)
    }

    /// Grows the tree to `height` (a root first if there is none), the old root becoming slot
    /// 0 of the new one, from the pool.
    fn grow(&mut self, height: u32) {
        if self.root.is_none() {
            self.root = Some(self.pool.take_node(height));
            self.height = height;
        }
        while self.height < height {
            let old = self.root.take().expect("root present");
            let mut top = self.pool.take_node(self.height + 1);
            if old.present != 0 {
                top.present = 1;
                if let Some(m) = old.is_full_uniform() {
                    top.full = 1;
                    top.set_slot_marks(0, m);
                } else {
                    top.set_slot_marks(0, old.any_marks());
                    top.insert_child(0, Child::Node(old));
                }
            }
            top.rebuild_slot_bytes();
            self.root = Some(top);
            self.height += 1;
        }
    }

    /// Drops the root while it is empty, or while only its slot 0 holds a child node, then
    /// stores the height and what the fast paths derive from it.
    fn shrink(&mut self) {
        let Some(root) = &self.root else {
            return;
        };
        if root.present == 0 {
            self.root = None;
            self.set_height(0);
            return;
        }
        while self.height > 1 {
            let root = self.root.as_mut().expect("root present");
            if root.present != 1 || root.full & 1 != 0 {
                break;
            }
            let Some(child) = root.nodes.pop() else {
                unreachable!("slot 0 of a node above level 1 holds a node")
            };
            self.root = Some(child);
            self.height -= 1;
        }
        self.set_height(self.height);
    }

    /// Stores `height` and what the fast paths derive from it.
    fn set_height(&mut self, height: u32) {
        self.height = height;
        self.index_limit = if height > 0 {
            1u64 << span_shift(height)
        } else {
            0
        };
        self.root_shift = if height > 0 { slot_shift(height) } else { 0 };
    }
}

impl Node {
    /// Applies `op` to pages `lo..hi` relative to this node (at `level` >= 1), drawing what it
    /// allocates from `pool` (reserved by `prepare`); returns the change in pages and marks.
    pub(super) fn apply(&mut self, level: u32, lo: u64, hi: u64, op: Op, pool: &mut Pool) -> Delta {
        let before = (self.present, self.full, self.sparse_slots());
        let sshift = slot_shift(level);
        let sspan = 1u64 << sshift;
        let first = (lo >> sshift) as u32;
        let last = ((hi - 1) >> sshift) as u32;
        let mut delta = Delta::default();
        for i in first..=last {
            let base = u64::from(i) << sshift;
            let part = SlotPart {
                slot: i,
                lo: lo.max(base) - base,
                hi: hi.min(base + sspan) - base,
                span: sspan,
            };
            let bit = 1u64 << i;
            // Each kind of slot is handled in place, or made to hold a child to descend into.
            let descend = if self.present & bit == 0 {
                self.apply_to_empty(level, part, op, pool, &mut delta)
            } else if self.full & bit != 0 {
                self.apply_to_full(level, part, op, pool, &mut delta)
            } else if self.sparse_slots() & bit != 0 {
                self.apply_to_sparse(part, op, pool, &mut delta)
            } else {
                true
            };
            if !descend {
                continue;
            }
            let idx = self.children_below(i);
            let child_delta = match self.child_mut(idx) {
                ChildMut::Leaf(leaf) => leaf.apply(op, part.lo, part.hi, pool),
                ChildMut::Node(node) => node.apply(level - 1, part.lo, part.hi, op, pool),
            };
            delta.add(child_delta);
            self.settle_child(i, idx);
        }
        if (self.present, self.full, self.sparse_slots()) != before {
            self.rebuild_slot_bytes();
        }
        delta
    }

    /// `apply` to an empty slot: an insert of the whole slot makes it full; one of part of it
    /// puts an empty child there to descend into (returns true).
    #[inline]
    fn apply_to_empty(
        &mut self,
        level: u32,
        part: SlotPart,
        op: Op,
        pool: &mut Pool,
        delta: &mut Delta,
    ) -> bool {
        let Op::Insert(m) = op else {
            return false;
        };
        let (i, bit) = (part.slot, 1u64 << part.slot);
        if part.whole() {
            self.present |= bit;
            self.full |= bit;
            self.set_slot_marks(i, m);
            delta.add(Delta::whole(1, part.span, m));
            return false;
        }
        let idx = self.children_below(i);
        let child = if level == 1 {
            Child::Leaf(pool.take_leaf())
        } else {
            Child::Node(pool.take_node(level - 1))
        };
        self.insert_child(idx, child);
        self.present |= bit;
        true
    }

    /// `apply` to a full slot (a multi-index entry): a change of the whole slot is made to
    /// its bits; a change of part of it splits the entry into a fully present child with the
    /// same marks to descend into (returns true).
    #[inline]
    fn apply_to_full(
        &mut self,
        level: u32,
        part: SlotPart,
        op: Op,
        pool: &mut Pool,
        delta: &mut Delta,
    ) -> bool {
        let (i, bit) = (part.slot, 1u64 << part.slot);
        let full_marks = self.slot_marks(i);
        if !op.changes_full(full_marks) {
            return false;
        }
        if part.whole() {
            match op {
                Op::Remove => {
                    self.present &= !bit;
                    self.full &= !bit;
                    self.set_slot_marks(i, Marks::NONE);
                    delta.add(Delta::whole(-1, part.span, full_marks));
                }
                Op::SetMark(k) => {
                    self.marks[k] |= bit;
                    delta.marks[k] += part.span as i64;
                }
                Op::ClearMark(k) => {
                    self.marks[k] &= !bit;
                    delta.marks[k] -= part.span as i64;
                }
                Op::Insert(_) => unreachable!(),
            }
            return false;
        }
        self.full &= !bit;
        let idx = self.children_below(i);
        let child = if level == 1 {
            let mut leaf = pool.take_leaf();
            leaf.set_full(full_marks);
            Child::Leaf(leaf)
        } else {
            let mut node = pool.take_node(level - 1);
            node.set_full(full_marks);
            Child::Node(node)
        };
        self.insert_child(idx, child);
        true
    }

    /// `apply` to a sparse leaf (level 1), as [`SparsePlan::of`] says: in place, or turned into
    /// a bitmap leaf to descend into (returns true).
    #[inline]
    fn apply_to_sparse(
        &mut self,
        part: SlotPart,
        op: Op,
        pool: &mut Pool,
        delta: &mut Delta,
    ) -> bool {
        let (i, bit) = (part.slot, 1u64 << part.slot);
        let idx = self.sparse_below(i);
        let sparse = &mut self.sparse_mut().leaves[idx];
        let (sparse_marks, len) = (sparse.marks(), sparse.len() as u64);
        match SparsePlan::of(op, part.whole(), sparse, part.lo, part.hi) {
            SparsePlan::Skip => false,
            SparsePlan::Remove => {
                let n = sparse.remove_range(part.lo, part.hi) as u64;
                delta.add(Delta::whole(-1, n, sparse_marks));
                if n == len {
                    self.sparse_mut().take(idx, i);
                    self.present &= !bit;
                    self.set_slot_marks(i, Marks::NONE);
                }
                false
            }
            SparsePlan::Marks(m) => {
                sparse.set_marks(m);
                self.set_slot_marks(i, m);
                for k in 0..MARK_COUNT {
                    let change = i64::from(m.has(k)) - i64::from(sparse_marks.has(k));
                    delta.marks[k] += change * len as i64;
                }
                false
            }
            SparsePlan::Full => {
                self.sparse_mut().take(idx, i);
                self.full |= bit;
                delta.add(Delta::whole(1, part.span - len, sparse_marks));
                false
            }
            SparsePlan::Convert => {
                self.sparse_to_leaf(i, pool.take_leaf());
                true
            }
        }
    }

    /// Before `apply`: reserves room in the child vectors that will grow and counts the nodes,
    /// leaves and mark bitmaps the operation will take from the pool.
    pub(super) fn prepare(
        &mut self,
        level: u32,
        lo: u64,
        hi: u64,
        op: Op,
        need: &mut Need,
    ) -> Result<(), AllocError> {
        let sshift = slot_shift(level);
        let sspan = 1u64 << sshift;
        let first = (lo >> sshift) as u32;
        let last = ((hi - 1) >> sshift) as u32;
        let mut grow = 0usize;
        for i in first..=last {
            let base = u64::from(i) << sshift;
            let s_lo = lo.max(base) - base;
            let s_hi = hi.min(base + sspan) - base;
            let whole = s_lo == 0 && s_hi == sspan;
            let bit = 1u64 << i;
            if self.present & bit == 0 {
                if matches!(op, Op::Insert(_)) && !whole {
                    grow += 1;
                    need.new_subtree(level - 1, s_lo, s_hi, false);
                }
            } else if self.full & bit != 0 {
                if op.changes_full(self.slot_marks(i)) && !whole {
                    grow += 1;
                    let maps = matches!(op, Op::SetMark(_) | Op::ClearMark(_));
                    need.new_subtree(level - 1, s_lo, s_hi, maps);
                }
            } else {
                // Inside a whole child only inserts can need memory (mark bitmaps of leaves
                // whose pages get different marks); removals and mark changes only at the edges.
                if whole && !matches!(op, Op::Insert(_)) {
                    continue;
                }
                if self.sparse_slots() & bit != 0 {
                    let sparse = &self.sparse_leaves()[self.sparse_below(i)];
                    if let SparsePlan::Convert = SparsePlan::of(op, whole, sparse, s_lo, s_hi) {
                        grow += 1;
                        need.leaves += 1;
                        // Whether the bitmap leaf it becomes will need mark bitmaps.
                        let mut leaf = Leaf::empty();
                        sparse.fill(&mut leaf);
                        if leaf.needs_maps(op, s_lo, s_hi) {
                            need.maps += 1;
                        }
                    }
                    continue;
                }
                let idx = self.child_idx(i as usize);
                match self.child_mut(idx) {
                    ChildMut::Leaf(leaf) => {
                        if leaf.needs_maps(op, s_lo, s_hi) {
                            need.maps += 1;
                        }
                    }
                    ChildMut::Node(node) => node.prepare(level - 1, s_lo, s_hi, op, need)?,
                }
            }
        }
        if grow > 0 {
            self.reserve_children(level, grow)?;
        }
        Ok(())
    }
}

/// What the general path does with a sparse leaf.
pub(super) enum SparsePlan {
    /// Nothing changes.
    Skip,
    /// Pages go, in place (the leaf is dropped if emptied).
    Remove,
    /// Every page gets these marks.
    Marks(Marks),
    /// Every page of the slot is added with the leaf's marks: a full slot.
    Full,
    /// It becomes a bitmap leaf (from the pool), which the operation then works on.
    Convert,
}

impl SparsePlan {
    /// The plan for `op` on pages `lo..hi` of `sparse` (`whole`: the range covers its slot).
    pub(super) fn of(op: Op, whole: bool, sparse: &SparseLeaf, lo: u64, hi: u64) -> SparsePlan {
        let sparse_marks = sparse.marks();
        let n = sparse.count_in(lo, hi);
        match op {
            Op::Insert(m) if whole && m == sparse_marks => SparsePlan::Full,
            Op::Insert(_) if n as u64 == hi - lo => SparsePlan::Skip,
            Op::Insert(_) => SparsePlan::Convert,
            Op::Remove if n == 0 => SparsePlan::Skip,
            Op::Remove => SparsePlan::Remove,
            Op::SetMark(k) if sparse_marks.has(k) || n == 0 => SparsePlan::Skip,
            Op::ClearMark(k) if !sparse_marks.has(k) || n == 0 => SparsePlan::Skip,
            Op::SetMark(k) if n == sparse.len() => SparsePlan::Marks(sparse_marks.with(k)),
            Op::ClearMark(k) if n == sparse.len() => SparsePlan::Marks(sparse_marks.without(k)),
            _ => SparsePlan::Convert,
        }
    }
}
