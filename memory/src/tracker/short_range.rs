//! Ranges shorter than a leaf inside one level-1 node: one walk, no planning.

use super::fbox::FBox;
use super::general::Op;
use super::leaf::{Leaf, LEAF_PAGES, LEAF_SHIFT};
use super::node::{Child, Node};
use super::sparse::{self, SPARSE_MAX};
use super::{
    slot_shift, span_shift, Marks, Tracker, MARK_COUNT, MAX_INDEX, SLOT_EMPTY, SLOT_FULL,
    SLOT_SPARSE,
};

impl Tracker {
    /// Inserts or removes `start..start+count` (shorter than a leaf, so it touches at most two
    /// slots of one level-1 node) when nothing above that node changes. This is the shape of
    /// almost every balloon request, and of the single-page updates the single-page fast paths
    /// leave (a leaf to create, split or drop), so it gets one walk and no planning (the bits
    /// of one existing leaf, the commonest case, were tried before, by `insert_range` and
    /// `remove_range`). In one slot (`short_range_in_slot`):
    /// - an empty slot on insert gets a new leaf;
    /// - a full slot on remove (a multi-index entry of one leaf, e.g. onlining a 2 MiB block of
    ///   a born-offline region) becomes a new leaf with every page but the range;
    /// - a leaf that a removal empties is dropped, if the node keeps other pages with each of
    ///   its marks (so the summaries above stay right);
    /// - a full slot on insert, an empty one on remove: nothing to do;
    /// - a sparse leaf is changed in place, or turned into a bitmap leaf first
    ///   (`short_range_in_sparse`).
    ///
    /// Over two slots (`short_range_over_two_slots`): each slot's case, or a leaf whose bits
    /// change, all planned before either changes.
    ///
    /// New leaves (and room for them) are allocated before anything changes. Returns `None`,
    /// with nothing changed, if that fails or the shape is another one: the general path (which
    /// draws on the reserved spares) then does the work.
    #[inline]
    pub(super) fn short_range_update(&mut self, start: u64, count: u64, op: Op) -> Option<u64> {
        if count.wrapping_sub(1) >= LEAF_PAGES - 1 || start > MAX_INDEX {
            return None;
        }
        let end = start + count;
        if end - 1 > MAX_INDEX || start >> span_shift(1) != (end - 1) >> span_shift(1) {
            return None;
        }
        let node = Self::level1_mut(&mut self.root, self.root_shift, self.index_limit, start)?;
        // (The bits of one existing leaf were tried by `insert_range`/`remove_range`.)
        let lo = start & (LEAF_PAGES - 1);
        let (changed, mark_path) = if lo + count <= LEAF_PAGES {
            let i = (start >> LEAF_SHIFT) as u32 & 63;
            Self::short_range_in_slot(node, &mut self.pages_by_marks, i, lo, lo + count, op)?
        } else {
            Self::short_range_over_two_slots(node, &mut self.pages_by_marks, start, end, op)?
        };
        if let (true, Op::Insert(m)) = (mark_path, op) {
            let mut node: &mut Node = self.root.as_deref_mut().expect("root");
            let mut level = self.height;
            while level > 1 {
                let i = ((start >> slot_shift(level)) & 63) as u32;
                for k in 0..MARK_COUNT {
                    if m.has(k) {
                        node.marks[k] |= 1 << i;
                    }
                }
                let idx = node.child_idx(i as usize);
                node = &mut node.nodes[idx];
                level -= 1;
            }
        }
        Some(changed)
    }

    /// `short_range_update` for a range inside slot `i` (pages `lo..hi` of it) that is not on the
    /// leaf's own fast path: a new leaf, a split full slot, a leaf emptied and dropped. One
    /// slot, so no planning: the one allocation comes first, then the changes.
    #[inline(never)]
    pub(super) fn short_range_in_slot(
        node: &mut Node,
        by_marks: &mut [u64; 8],
        i: u32,
        lo: u64,
        hi: u64,
        op: Op,
    ) -> Option<(u64, bool)> {
        let bit = 1u64 << i;
        let byte = node.slot_byte(i as usize);
        let (n, marks, mark_path) = match (op, byte) {
            (Op::Insert(_), SLOT_FULL) | (Op::Remove, SLOT_EMPTY) => return Some((0, false)),
            (op, byte) if (SLOT_SPARSE..SLOT_FULL).contains(&byte) => {
                let (n, m) = Self::short_range_in_sparse(node, i, lo, hi, op)?;
                (n, m, false)
            }
            (Op::Insert(m), SLOT_EMPTY) => {
                let mark_path = node.lacks_some_mark_of(m);
                node.leaves.try_reserve(1).ok()?;
                let mut leaf = FBox::try_new_with(Leaf::empty).ok()?;
                let n = leaf.set_bits(lo, hi);
                leaf.set_uniform(m);
                let idx = node.children_below(i);
                node.leaves.insert(idx, leaf);
                node.present |= bit;
                node.set_slot_marks(i, m);
                node.note_linked_at(i, idx);
                (i64::from(n), m, mark_path)
            }
            (Op::Remove, SLOT_FULL) => {
                node.leaves.try_reserve(1).ok()?;
                let mut leaf = FBox::try_new_with(Leaf::empty).ok()?;
                let m = node.slot_marks(i);
                leaf.set_full(m);
                let n = leaf.clear_bits(lo, hi);
                let idx = node.children_below(i);
                node.leaves.insert(idx, leaf);
                node.full &= !bit;
                node.note_linked_at(i, idx);
                (-i64::from(n), m, false)
            }
            (Op::Remove, byte) => {
                let idx = usize::from(byte);
                let leaf = &node.leaves[idx];
                if leaf.mixed.is_some() {
                    return None;
                }
                let m = leaf.uniform();
                // A leaf the node may not drop (`can_drop_in_place`) must not empty.
                if !node.can_drop_in_place(bit, m) && leaf.count_in(lo, hi) == leaf.count() {
                    return None;
                }
                let leaf = &mut node.leaves[idx];
                let n = leaf.clear_bits(lo, hi);
                if leaf.count() == 0 {
                    node.leaves.remove(idx);
                    node.present &= !bit;
                    node.set_slot_marks(i, Marks::NONE);
                    node.note_unlinked(i, SLOT_EMPTY);
                    node.release_children();
                }
                (-i64::from(n), m, false)
            }
            _ => return None,
        };
        let counter = &mut by_marks[usize::from(marks.0 & 7)];
        *counter = counter.wrapping_add(n as u64);
        Some((n.unsigned_abs(), mark_path))
    }

    /// `short_range_in_slot` for the sparse leaf of slot `i`: pages added in place (the leaf
    /// grown if needed) while it keeps one set of marks and at most `SPARSE_MAX` pages, or
    /// turned into a bitmap leaf first when it would not; pages removed in place, the leaf
    /// dropped when emptied if the node keeps other pages with its marks. Returns the change in
    /// pages and their marks, or `None`, with nothing changed, for the general path.
    #[inline(never)]
    pub(super) fn short_range_in_sparse(
        node: &mut Node,
        i: u32,
        lo: u64,
        hi: u64,
        op: Op,
    ) -> Option<(i64, Marks)> {
        let bit = 1u64 << i;
        let sparse_idx = node.sparse_below(i);
        let droppable = node.can_drop_in_place(bit, node.sparse_leaves()[sparse_idx].marks());
        let sparse = &mut node.sparse_mut().leaves[sparse_idx];
        let sparse_marks = sparse.marks();
        let have = sparse.count_in(lo, hi);
        match op {
            Op::Insert(_) if have as u64 == hi - lo => Some((0, sparse_marks)),
            Op::Insert(m) if m != sparse_marks => None,
            Op::Insert(m) => {
                let want = sparse.len() + (hi - lo) as usize - have;
                if want > SPARSE_MAX {
                    if want >= LEAF_PAGES as usize {
                        return None;
                    }
                    node.leaves.try_reserve(1).ok()?;
                    let leaf = FBox::try_new_with(Leaf::empty).ok()?;
                    let idx = node.sparse_to_leaf(i, leaf);
                    let n = node.leaves[idx].set_bits(lo, hi);
                    return Some((i64::from(n), m));
                }
                if want > sparse.cap() {
                    sparse.try_grow(sparse::chunks_for(want)).ok()?;
                }
                Some((sparse.insert_range(lo, hi) as i64, m))
            }
            Op::Remove if have == 0 => Some((0, sparse_marks)),
            Op::Remove if have < sparse.len() => {
                Some((-(sparse.remove_range(lo, hi) as i64), sparse_marks))
            }
            Op::Remove => {
                if !droppable {
                    return None;
                }
                let n = sparse.len() as i64;
                node.sparse_mut().take(sparse_idx, i);
                node.present &= !bit;
                node.set_slot_marks(i, Marks::NONE);
                node.note_sparse_unlinked(i, SLOT_EMPTY);
                node.release_children();
                Some((-n, sparse_marks))
            }
            _ => None,
        }
    }

    /// `short_range_update` for a range over two slots (the end of one leaf and the start of
    /// the next): both slots' cases planned before either changes. Returns the pages changed,
    /// and whether the slots above the node must be told of a new leaf's marks.
    #[inline(never)]
    pub(super) fn short_range_over_two_slots(
        node: &mut Node,
        by_marks: &mut [u64; 8],
        start: u64,
        end: u64,
        op: Op,
    ) -> Option<(u64, bool)> {
        let first = (start >> LEAF_SHIFT) as u32 & 63;
        let mid = (start | (LEAF_PAGES - 1)) + 1;
        debug_assert!(mid < end && (end - 1) >> LEAF_SHIFT == mid >> LEAF_SHIFT);
        let pieces = [(first, start, mid), (first + 1, mid, end)];

        // Which case each piece is, before any change.
        let mut plan = [Piece::Skip; 2];
        let (mut fresh, mut dropped, mut dropped_marks) = (0usize, 0u64, Marks::NONE);
        for (p, &(i, a, b)) in pieces.iter().enumerate() {
            plan[p] = Piece::of(node, op, i, a, b)?;
            match plan[p] {
                Piece::New | Piece::Split(_) => fresh += 1,
                Piece::Drop(m) => {
                    dropped |= 1 << i;
                    dropped_marks.0 |= m.0;
                }
                Piece::Skip | Piece::Bits => {}
            }
        }
        if dropped != 0 && !node.can_drop_in_place(dropped, dropped_marks) {
            return None;
        }
        // New leaves on insert: the slots above must already say that pages with these marks
        // are below, or be walked afterwards.
        let mut mark_path = false;
        let mut leaves: [Option<FBox<Leaf>>; 2] = [None, None];
        if fresh > 0 {
            if let Op::Insert(m) = op {
                mark_path = node.lacks_some_mark_of(m);
            }
            node.reserve_children(1, fresh).ok()?;
            for l in &mut leaves[..fresh] {
                *l = Some(FBox::try_new_with(Leaf::empty).ok()?);
            }
        }

        // The changes, which cannot fail; the higher slot first, so the lower one's child index
        // does not move.
        let mut changed = 0u64;
        let mut counts = [0i64; 8];
        for p in (0..2).rev() {
            let (i, a, b) = pieces[p];
            let lo = a & (LEAF_PAGES - 1);
            let hi = lo + (b - a);
            let bit = 1u64 << i;
            let (n, marks) = match plan[p] {
                Piece::Skip => continue,
                Piece::Bits => {
                    let idx = node.child_idx(i as usize);
                    let leaf = &mut node.leaves[idx];
                    let n = if op == Op::Remove {
                        -i64::from(leaf.clear_bits(lo, hi))
                    } else {
                        i64::from(leaf.set_bits(lo, hi))
                    };
                    (n, leaf.uniform())
                }
                Piece::New => {
                    let Op::Insert(m) = op else { unreachable!() };
                    let leaf = leaves[fresh - 1].take().expect("allocated");
                    fresh -= 1;
                    (i64::from(node.link_new_leaf(i, leaf, lo, hi, m)), m)
                }
                Piece::Split(m) => {
                    let leaf = leaves[fresh - 1].take().expect("allocated");
                    fresh -= 1;
                    (-i64::from(node.split_full_slot(i, leaf, lo, hi, m)), m)
                }
                Piece::Drop(_) => {
                    let leaf = node.leaves.remove(node.child_idx(i as usize));
                    node.present &= !bit;
                    node.set_slot_marks(i, Marks::NONE);
                    node.note_unlinked(i, SLOT_EMPTY);
                    (-i64::from(leaf.count()), leaf.uniform())
                }
            };
            changed += n.unsigned_abs();
            counts[usize::from(marks.0 & 7)] += n;
        }
        if dropped != 0 {
            node.release_children();
        }
        for (c, n) in by_marks.iter_mut().zip(counts) {
            *c = c.wrapping_add(n as u64);
        }
        Some((changed, mark_path))
    }
}

/// What `short_range_over_two_slots` does in one of its two slots.
#[derive(Clone, Copy)]
enum Piece {
    /// Nothing to do: an insert into a full slot, a removal from an empty one.
    Skip,
    /// Set or clear bits of the slot's leaf, which keeps uniform marks and some pages.
    Bits,
    /// A new leaf in an empty slot.
    New,
    /// A leaf with every page but the range, for a full slot with these marks.
    Split(Marks),
    /// The slot's leaf, whose pages carry these marks, is emptied and dropped.
    Drop(Marks),
}

impl Piece {
    /// The case of pages `a..b` (absolute), in slot `i` of `node`; `None` for one the short
    /// path does not take (a sparse leaf, mixed marks, a leaf that would fill up).
    #[inline(always)]
    fn of(node: &Node, op: Op, i: u32, a: u64, b: u64) -> Option<Piece> {
        let n = (b - a) as u32;
        let byte = node.slot_byte(i as usize);
        Some(match (op, byte) {
            (Op::Insert(_), SLOT_EMPTY) => Piece::New,
            (Op::Insert(_), SLOT_FULL) | (Op::Remove, SLOT_EMPTY) => Piece::Skip,
            (Op::Remove, SLOT_FULL) => Piece::Split(node.slot_marks(i)),
            (_, byte) if byte >= SLOT_SPARSE => return None,
            (Op::Insert(m), byte) if node.leaves[usize::from(byte)].fast_insert_ok(m, n) => {
                Piece::Bits
            }
            (Op::Remove, byte) => {
                let leaf = &node.leaves[usize::from(byte)];
                let lo = a & (LEAF_PAGES - 1);
                if leaf.fast_remove_ok(n) {
                    Piece::Bits
                } else if leaf.mixed.is_some() {
                    return None;
                } else if leaf.count_in(lo, lo + u64::from(n)) < leaf.count() {
                    Piece::Bits
                } else {
                    Piece::Drop(leaf.uniform())
                }
            }
            _ => return None,
        })
    }
}

impl Node {
    /// Puts `leaf` (empty, room for it in `leaves` reserved) into the empty slot `i`, with
    /// pages `lo..hi` present carrying `m`; returns how many pages it added.
    #[inline]
    fn link_new_leaf(&mut self, i: u32, mut leaf: FBox<Leaf>, lo: u64, hi: u64, m: Marks) -> u32 {
        let n = leaf.set_bits(lo, hi);
        leaf.set_uniform(m);
        self.insert_child(self.children_below(i), Child::Leaf(leaf));
        self.present |= 1u64 << i;
        self.set_slot_marks(i, m);
        self.note_linked(i);
        n
    }

    /// Splits the full slot `i`, whose pages carry `m`, into `leaf` (room for it in `leaves`
    /// reserved) holding every page but `lo..hi`; returns how many pages it removed.
    #[inline]
    fn split_full_slot(&mut self, i: u32, mut leaf: FBox<Leaf>, lo: u64, hi: u64, m: Marks) -> u32 {
        leaf.set_full(m);
        let n = leaf.clear_bits(lo, hi);
        self.full &= !(1u64 << i);
        self.insert_child(self.children_below(i), Child::Leaf(leaf));
        self.note_linked(i);
        n
    }
}
