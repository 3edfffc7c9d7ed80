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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Insert(Marks),
    Remove,
    SetMark(usize),
    ClearMark(usize),
}

/// Change in the number of present pages and of pages carrying each mark.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Delta {
    pub(super) present: i64,
    pub(super) marks: [i64; MARK_COUNT],
}

impl Delta {
    pub(super) fn add(&mut self, o: Delta) {
        self.present += o.present;
        for k in 0..MARK_COUNT {
            self.marks[k] += o.marks[k];
        }
    }
    pub(super) fn whole(sign: i64, pages: u64, marks: Marks) -> Delta {
        let mut d = Delta {
            present: sign * pages as i64,
            ..Delta::default()
        };
        for k in 0..MARK_COUNT {
            if marks.has(k) {
                d.marks[k] = sign * pages as i64;
            }
        }
        d
    }
}

impl Tracker {
    /// Sets `mark` on the present pages of the range; returns how many did not have it.
    pub fn set_mark(&mut self, start: u64, count: u64, mark: Mark) -> Result<u64, TrackerError> {
        let k = mark as usize;
        Ok(self.general_update(start, count, Op::SetMark(k))?.marks[k] as u64)
    }

    /// Clears `mark` on the pages of the range; returns how many had it.
    pub fn clear_mark(&mut self, start: u64, count: u64, mark: Mark) -> Result<u64, TrackerError> {
        let k = mark as usize;
        Ok((-self.general_update(start, count, Op::ClearMark(k))?.marks[k]) as u64)
    }

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
        let insert = matches!(op, Op::Insert(_));
        let (hi, need_h) = if insert {
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
        let mut need = Need::default();
        match &mut self.root {
            // A fresh root at `need_h` and the chains below it.
            None => need.new_subtree(need_h, start, hi, false),
            Some(root) => {
                let old_end = 1u64 << span_shift(self.height);
                if start < old_end {
                    root.prepare(self.height, start, old_end.min(hi), op, &mut need)?;
                }
                // Growth: one new node per level, the old root hanging at slot 0 of the chain;
                // the part of the range in slots 1.. of each new node lands in fresh subtrees.
                for lvl in self.height + 1..=need_h {
                    need.nodes += 1;
                    let sshift = slot_shift(lvl);
                    let a = start.max(1u64 << sshift);
                    let b = hi.min(1u64 << span_shift(lvl));
                    if a < b {
                        need.edge_subtrees(lvl, a, b, false);
                    }
                }
            }
        }
        let prior = self.reserved();
        self.pool.reserve(Need {
            nodes: prior.nodes.max(need.nodes),
            leaves: prior.leaves.max(need.leaves),
            maps: prior.maps.max(need.maps),
        })?;

        // Phase 2: the changes, which cannot fail.
        if self.root.is_none() {
            self.root = Some(self.pool.take_node(need_h));
            self.height = need_h;
        }
        while self.height < need_h {
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
        let root = self.root.as_mut().expect("root present");
        let d = root.apply(self.height, start, hi, op, &mut self.pool);
        root.release_children();
        self.pages = self.pages.wrapping_add(d.present as u64);
        for k in 0..MARK_COUNT {
            self.marked[k] = (self.marked[k] as i64 + d.marks[k]) as u64;
        }
        self.shrink();
        self.index_limit = if self.height > 0 {
            1u64 << span_shift(self.height)
        } else {
            0
        };
        self.root_shift = if self.height > 0 {
            slot_shift(self.height)
        } else {
            0
        };
        self.pool.release_empty();
        debug_assert_eq!(
            self.reserved(),
            Need {
                nodes: prior.nodes.max(need.nodes) - need.nodes,
                leaves: prior.leaves.max(need.leaves) - need.leaves,
                maps: prior.maps.max(need.maps) - need.maps,
            },
            "reservation miscounted for {op:?} on 0x{start:x}..0x{hi:x}"
        );
        Ok(d)
    }

    pub(super) fn shrink(&mut self) {
        let Some(root) = &self.root else { return };
        if root.present == 0 {
            self.root = None;
            self.height = 0;
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
    }
}

impl Node {
    /// Applies `op` to pages `lo..hi` relative to this node (at `level` >= 1).
    pub(super) fn apply(&mut self, level: u32, lo: u64, hi: u64, op: Op, pool: &mut Pool) -> Delta {
        let before = (self.present, self.full, self.sparse_slots());
        let sshift = slot_shift(level);
        let sspan = 1u64 << sshift;
        let first = (lo >> sshift) as u32;
        let last = ((hi - 1) >> sshift) as u32;
        let mut d = Delta::default();
        for i in first..=last {
            let base = u64::from(i) << sshift;
            let s_lo = lo.max(base) - base;
            let s_hi = hi.min(base + sspan) - base;
            let whole = s_lo == 0 && s_hi == sspan;
            let bit = 1u64 << i;
            if self.present & bit == 0 {
                let Op::Insert(m) = op else { continue };
                if whole {
                    self.present |= bit;
                    self.full |= bit;
                    self.set_slot_marks(i, m);
                    d.add(Delta::whole(1, sspan, m));
                    continue;
                }
                let idx = self.children_below(i);
                let child = if level == 1 {
                    Child::Leaf(pool.take_leaf())
                } else {
                    Child::Node(pool.take_node(level - 1))
                };
                self.insert_child(idx, child);
                self.present |= bit;
            } else if self.full & bit != 0 {
                let fm = self.slot_marks(i);
                let effective = match op {
                    Op::Insert(_) => false,
                    Op::Remove => true,
                    Op::SetMark(k) => !fm.has(k),
                    Op::ClearMark(k) => fm.has(k),
                };
                if !effective {
                    continue;
                }
                if whole {
                    match op {
                        Op::Remove => {
                            self.present &= !bit;
                            self.full &= !bit;
                            self.set_slot_marks(i, Marks::NONE);
                            d.add(Delta::whole(-1, sspan, fm));
                        }
                        Op::SetMark(k) => {
                            self.marks[k] |= bit;
                            d.marks[k] += sspan as i64;
                        }
                        Op::ClearMark(k) => {
                            self.marks[k] &= !bit;
                            d.marks[k] -= sspan as i64;
                        }
                        Op::Insert(_) => unreachable!(),
                    }
                    continue;
                }
                // Split the multi-index entry: a child that is fully present with `fm`.
                self.full &= !bit;
                let idx = self.children_below(i);
                let child = if level == 1 {
                    let mut l = pool.take_leaf();
                    l.set_full(fm);
                    Child::Leaf(l)
                } else {
                    let mut n = pool.take_node(level - 1);
                    n.set_full(fm);
                    Child::Node(n)
                };
                self.insert_child(idx, child);
            } else if self.sparse_slots() & bit != 0 {
                let si = self.sparse_below(i);
                let s = &mut self.sparse_mut().leaves[si];
                let (sm, len) = (s.marks(), s.len() as u64);
                match SparsePlan::of(op, whole, s, s_lo, s_hi) {
                    SparsePlan::Skip => continue,
                    SparsePlan::Remove => {
                        let n = s.remove_range(s_lo, s_hi) as u64;
                        d.add(Delta::whole(-1, n, sm));
                        if n == len {
                            self.sparse_mut().take(si, i);
                            self.present &= !bit;
                            self.set_slot_marks(i, Marks::NONE);
                        }
                        continue;
                    }
                    SparsePlan::Marks(m) => {
                        s.set_marks(m);
                        self.set_slot_marks(i, m);
                        for k in 0..MARK_COUNT {
                            d.marks[k] += (i64::from(m.has(k)) - i64::from(sm.has(k))) * len as i64;
                        }
                        continue;
                    }
                    SparsePlan::Full => {
                        self.sparse_mut().take(si, i);
                        self.full |= bit;
                        d.add(Delta::whole(1, sspan - len, sm));
                        continue;
                    }
                    SparsePlan::Convert => {
                        self.sparse_to_leaf(i, pool.take_leaf());
                    }
                }
            }
            let idx = self.children_below(i);
            let cd = match self.child_mut(idx) {
                ChildMut::Leaf(l) => l.apply(op, s_lo, s_hi, pool),
                ChildMut::Node(n) => n.apply(level - 1, s_lo, s_hi, op, pool),
            };
            d.add(cd);
            self.settle_child(i, idx);
        }
        if (self.present, self.full, self.sparse_slots()) != before {
            self.rebuild_slot_bytes();
        }
        d
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
                let fm = self.slot_marks(i);
                let effective = match op {
                    Op::Insert(_) => false,
                    Op::Remove => true,
                    Op::SetMark(k) => !fm.has(k),
                    Op::ClearMark(k) => fm.has(k),
                };
                if effective && !whole {
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
                    let s = &self.sparse_leaves()[self.sparse_below(i)];
                    if let SparsePlan::Convert = SparsePlan::of(op, whole, s, s_lo, s_hi) {
                        grow += 1;
                        need.leaves += 1;
                        let mut l = Leaf::empty();
                        s.fill(&mut l);
                        if l.needs_maps(op, s_lo, s_hi) {
                            need.maps += 1;
                        }
                    }
                    continue;
                }
                let idx = self.child_idx(i as usize);
                match self.child_mut(idx) {
                    ChildMut::Leaf(l) => {
                        if l.needs_maps(op, s_lo, s_hi) {
                            need.maps += 1;
                        }
                    }
                    ChildMut::Node(n) => n.prepare(level - 1, s_lo, s_hi, op, need)?,
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
    pub(super) fn of(op: Op, whole: bool, s: &SparseLeaf, lo: u64, hi: u64) -> SparsePlan {
        let sm = s.marks();
        let n = s.count_in(lo, hi);
        match op {
            Op::Insert(m) if whole && m == sm => SparsePlan::Full,
            Op::Insert(_) if n as u64 == hi - lo => SparsePlan::Skip,
            Op::Insert(_) => SparsePlan::Convert,
            Op::Remove if n == 0 => SparsePlan::Skip,
            Op::Remove => SparsePlan::Remove,
            Op::SetMark(k) if sm.has(k) || n == 0 => SparsePlan::Skip,
            Op::ClearMark(k) if !sm.has(k) || n == 0 => SparsePlan::Skip,
            Op::SetMark(k) if n == s.len() => SparsePlan::Marks(sm.with(k)),
            Op::ClearMark(k) if n == s.len() => SparsePlan::Marks(sm.without(k)),
            _ => SparsePlan::Convert,
        }
    }
}
