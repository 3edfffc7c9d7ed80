//! Interior nodes: 64 slots, each empty, full (a multi-index entry) or holding a child, with a
//! summary bitmap per mark, and one byte per slot saying what it holds (the slot bytes), kept
//! in step with every change to the slots.

use super::fbox::{AllocError, FBox};
use super::leaf::{Leaf, MarkMaps};
use super::sparse::SparseLeaf;
use super::{mask_below, Marks, MARK_COUNT, SLOT_EMPTY, SLOT_FULL, SLOT_SPARSE};

/// A child being linked into a node.
#[derive(Debug)]
pub(super) enum Child {
    Leaf(FBox<Leaf>),
    Node(FBox<Node>),
}

/// A node's child, borrowed.
pub(super) enum ChildRef<'a> {
    Leaf(&'a Leaf),
    Node(&'a Node),
}

/// A node's child, borrowed mutably.
pub(super) enum ChildMut<'a> {
    Leaf(&'a mut Leaf),
    Node(&'a mut Node),
}

/// A node: 160 bytes, plus its child vectors.
#[derive(Debug)]
pub(super) struct Node {
    /// Slots that are not empty.
    pub(super) present: u64,
    /// Slots that are full (multi-index entries); a subset of `present`.
    pub(super) full: u64,
    /// One summary bitmap per mark: for a full slot, whether its pages carry the mark; for a
    /// child, whether some page below carries it.
    pub(super) marks: [u64; MARK_COUNT],
    /// The children of a node above level 1, densely in slot order (empty at level 1).
    pub(super) nodes: Vec<FBox<Node>>,
    /// The children of a level-1 node (empty above): leaves, densely in slot order. Two typed
    /// vectors instead of one of a two-kind enum: 8 bytes per child instead of 16, and the
    /// single-page paths know the kind from the level (no tag test, no 16-byte stride).
    pub(super) leaves: Vec<FBox<Leaf>>,
    /// The sparse leaves of a level-1 node, densely in slot order, and which slots hold them
    /// (a third child kind, out of `leaves`, so the bitmap fast paths' bounds check on
    /// `leaves` fails for them and nothing else changes there). Boxed, and only while there
    /// are some: 8 bytes in every node instead of 32.
    pub(super) sparse: Option<FBox<SparseLeaves>>,
    /// What each slot holds, in one byte: [`SLOT_EMPTY`], [`SLOT_FULL`], for a child its index
    /// in `nodes` or `leaves` (the number of such children in the slots below it), or
    /// [`SLOT_SPARSE`] plus its index among the sparse leaves. Rebuilt at the end of every
    /// change to the slots (`rebuild_slot_bytes`, or in place by the `note_*` methods), so a
    /// lookup reads one byte per level: no popcount (a software one on baseline x86-64, a
    /// dozen instructions on the critical path) and no separate present/full tests.
    pub(super) slot_bytes: [u8; 64],
}

/// A level-1 node's sparse leaves: which slots hold them, and the leaves in slot order.
#[derive(Debug, Default)]
pub(super) struct SparseLeaves {
    /// The slots holding a sparse leaf.
    pub(super) slots: u64,
    /// The sparse leaves, in slot order.
    pub(super) leaves: Vec<SparseLeaf>,
}

impl SparseLeaves {
    /// Takes out the sparse leaf at `idx` of `leaves`, the one in slot `slot`.
    #[inline]
    pub(super) fn take(&mut self, idx: usize, slot: u32) -> SparseLeaf {
        self.slots &= !(1u64 << slot);
        self.leaves.remove(idx)
    }
}

impl Node {
    /// A node with every slot empty and no child vectors allocated.
    pub(super) fn empty() -> Node {
        Node {
            present: 0,
            full: 0,
            marks: [0; MARK_COUNT],
            nodes: Vec::new(),
            leaves: Vec::new(),
            sparse: None,
            slot_bytes: [SLOT_EMPTY; 64],
        }
    }

    /// Recomputes `slot_bytes` after the child slots changed.
    pub(super) fn rebuild_slot_bytes(&mut self) {
        self.slot_bytes = [SLOT_EMPTY; 64];
        let mut full = self.present & self.full;
        while full != 0 {
            self.slot_bytes[full.trailing_zeros() as usize] = SLOT_FULL;
            full &= full - 1;
        }
        let sparse = self.sparse_slots();
        let mut children = self.present & !self.full & !sparse;
        let mut byte = 0u8;
        while children != 0 {
            self.slot_bytes[children.trailing_zeros() as usize] = byte;
            byte += 1;
            children &= children - 1;
        }
        let mut sparse = sparse;
        let mut byte = SLOT_SPARSE;
        while sparse != 0 {
            self.slot_bytes[sparse.trailing_zeros() as usize] = byte;
            byte += 1;
            sparse &= sparse - 1;
        }
    }

    /// Slots holding sparse leaves.
    #[inline(always)]
    pub(super) fn sparse_slots(&self) -> u64 {
        match &self.sparse {
            Some(sparse) => sparse.slots,
            None => 0,
        }
    }

    /// The sparse leaves, in slot order.
    #[inline(always)]
    pub(super) fn sparse_leaves(&self) -> &[SparseLeaf] {
        match &self.sparse {
            Some(sparse) => &sparse.leaves,
            None => &[],
        }
    }

    /// The sparse leaves and their slots, which must exist.
    #[inline]
    pub(super) fn sparse_mut(&mut self) -> &mut SparseLeaves {
        self.sparse.as_mut().expect("sparse leaves")
    }

    /// The sparse leaves and their slots, allocated if there are none yet (with room for
    /// one more leaf).
    pub(super) fn sparse_mut_with_room(&mut self) -> Result<&mut SparseLeaves, AllocError> {
        if self.sparse.is_none() {
            self.sparse = Some(FBox::try_new(SparseLeaves::default())?);
        }
        // Exactly one more: `compact` must not leave the tree bigger than it found it (a
        // doubled vector of 64 sparse leaves would be 1 KiB), and it runs rarely.
        if self.sparse_mut().leaves.try_reserve_exact(1).is_err() {
            if self.sparse_mut().leaves.is_empty() {
                self.sparse = None;
            }
            return Err(AllocError {
                bytes: std::mem::size_of::<SparseLeaf>(),
            });
        }
        Ok(self.sparse_mut())
    }

    /// The sparse leaf of a slot whose byte is `byte`, if it holds one.
    #[inline(always)]
    pub(super) fn sparse_of_byte(&self, byte: u8) -> Option<&SparseLeaf> {
        self.sparse_leaves()
            .get(usize::from(byte).wrapping_sub(usize::from(SLOT_SPARSE)))
    }

    /// The number of sparse leaves in the slots below slot `i`: the index among the sparse
    /// leaves that one in slot `i` has or would get.
    #[inline]
    pub(super) fn sparse_below(&self, i: u32) -> usize {
        (self.sparse_slots() & mask_below(i)).count_ones() as usize
    }

    /// Updates the slot bytes after the sparse leaf of slot `i` was taken out, leaving the
    /// slot `now`.
    #[inline]
    pub(super) fn note_sparse_unlinked(&mut self, i: u32, now: u8) {
        let i = i as usize & 63;
        for byte in &mut self.slot_bytes[i + 1..] {
            *byte -= u8::from((SLOT_SPARSE..SLOT_FULL).contains(byte));
        }
        self.slot_bytes[i] = now;
    }

    /// Turns the sparse leaf of slot `i` into the bitmap leaf `leaf` (an empty one; room for it
    /// in `leaves` reserved), `slot_bytes` included; returns its index in `leaves`.
    pub(super) fn sparse_to_leaf(&mut self, i: u32, mut leaf: FBox<Leaf>) -> usize {
        let sparse_idx = self.sparse_below(i);
        let sparse = self.sparse_mut();
        sparse.take(sparse_idx, i).fill(&mut leaf);
        if sparse.leaves.is_empty() {
            self.sparse = None;
        }
        let idx = self.children_below(i);
        debug_assert!(self.leaves.len() < self.leaves.capacity(), "unreserved");
        self.leaves.insert(idx, leaf);
        self.note_sparse_unlinked(i, SLOT_EMPTY);
        self.note_linked_at(i, idx);
        idx
    }

    /// Updates the slot bytes after a child was put into slot `i` (which was empty or full):
    /// its index, and one more for every child after it. For the fast paths, instead of a whole
    /// `rebuild_slot_bytes`.
    #[inline]
    pub(super) fn note_linked(&mut self, i: u32) {
        self.note_linked_at(i, self.children_below(i));
    }

    /// `note_linked` when the child's index `idx` is known.
    #[inline]
    pub(super) fn note_linked_at(&mut self, i: u32, idx: usize) {
        let i = i as usize & 63;
        for byte in &mut self.slot_bytes[i + 1..] {
            *byte += u8::from(*byte < 64);
        }
        self.slot_bytes[i] = idx as u8;
    }

    /// Updates the slot bytes after the child of slot `i` was taken out, leaving the slot
    /// `now` ([`SLOT_EMPTY`] or [`SLOT_FULL`]).
    #[inline]
    pub(super) fn note_unlinked(&mut self, i: u32, now: u8) {
        let i = i as usize & 63;
        for byte in &mut self.slot_bytes[i + 1..] {
            *byte -= u8::from(*byte < 64);
        }
        self.slot_bytes[i] = now;
    }

    /// The slot byte of slot `i` (valid between operations; checked against the slots in
    /// debug builds).
    #[inline(always)]
    pub(super) fn slot_byte(&self, i: usize) -> u8 {
        let byte = self.slot_bytes[i & 63];
        debug_assert_eq!(
            byte,
            match (self.present >> i & 1, self.full >> i & 1) {
                (0, _) => SLOT_EMPTY,
                (_, 1) => SLOT_FULL,
                _ if self.sparse_slots() >> i & 1 != 0 =>
                    SLOT_SPARSE + self.sparse_below(i as u32) as u8,
                _ => self.children_below(i as u32) as u8,
            },
            "stale slot byte"
        );
        byte
    }

    /// The index in `nodes` or `leaves` of the child in slot `i`, which must hold one (from
    /// its slot byte).
    #[inline(always)]
    pub(super) fn child_idx(&self, i: usize) -> usize {
        let byte = self.slot_byte(i);
        debug_assert!(byte < 64, "slot {i} holds no child");
        usize::from(byte)
    }

    /// The number of children in `nodes` or `leaves` in the slots below slot `i`: the index a
    /// child in slot `i` has or would get (counted, for when the slot bytes are being changed).
    #[inline]
    pub(super) fn children_below(&self, i: u32) -> usize {
        (self.present & !self.full & !self.sparse_slots() & mask_below(i)).count_ones() as usize
    }

    /// Whether emptying the slots of `slots` leaves this node pages, with each mark of `marks`
    /// still carried by another slot: then the summaries above it stay right and a fast path
    /// may drop those children without walking up.
    #[inline]
    pub(super) fn can_drop_in_place(&self, slots: u64, marks: Marks) -> bool {
        self.present & !slots != 0
            && (0..MARK_COUNT).all(|k| !marks.has(k) || self.marks[k] & !slots != 0)
    }

    /// Whether no slot has some mark of `m` (a new child with `m` must then tell the slots
    /// above it).
    #[inline]
    pub(super) fn lacks_some_mark_of(&self, m: Marks) -> bool {
        (0..MARK_COUNT).any(|k| m.has(k) && self.marks[k] == 0)
    }

    /// The marks of slot `i`'s summary bits.
    #[inline]
    pub(super) fn slot_marks(&self, i: u32) -> Marks {
        let mut m = Marks::NONE;
        for k in 0..MARK_COUNT {
            if self.marks[k] & (1 << i) != 0 {
                m = m.with(k);
            }
        }
        m
    }

    /// Sets slot `i`'s summary bits to `m`.
    #[inline]
    pub(super) fn set_slot_marks(&mut self, i: u32, m: Marks) {
        for k in 0..MARK_COUNT {
            if m.has(k) {
                self.marks[k] |= 1 << i;
            } else {
                self.marks[k] &= !(1 << i);
            }
        }
    }

    /// The marks some slot carries: what the slot above this node must say.
    #[inline]
    pub(super) fn any_marks(&self) -> Marks {
        let mut m = Marks::NONE;
        for k in 0..MARK_COUNT {
            if self.marks[k] != 0 {
                m = m.with(k);
            }
        }
        m
    }

    /// The marks of the node's pages if every slot is full with the same marks (the node can
    /// become a full slot of its parent).
    #[inline]
    pub(super) fn is_full_uniform(&self) -> Option<Marks> {
        if self.full != u64::MAX {
            return None;
        }
        let mut m = Marks::NONE;
        for k in 0..MARK_COUNT {
            match self.marks[k] {
                0 => {}
                u64::MAX => m = m.with(k),
                _ => return None,
            }
        }
        Some(m)
    }

    /// Frees the child vectors of a node left with only full or empty slots.
    #[inline]
    pub(super) fn release_children(&mut self) {
        if self.nodes.is_empty() && self.nodes.capacity() != 0 {
            self.nodes = Vec::new();
        }
        if self.leaves.is_empty() && self.leaves.capacity() != 0 {
            self.leaves = Vec::new();
        }
        if self.sparse.as_ref().is_some_and(|s| s.leaves.is_empty()) {
            self.sparse = None;
        }
    }

    /// The child at index `idx` of the dense child vectors (a node's children are all leaves
    /// or all nodes).
    #[inline]
    pub(super) fn child(&self, idx: usize) -> ChildRef<'_> {
        if self.leaves.is_empty() {
            ChildRef::Node(&self.nodes[idx])
        } else {
            ChildRef::Leaf(&self.leaves[idx])
        }
    }

    /// `child`, mutably.
    #[inline]
    pub(super) fn child_mut(&mut self, idx: usize) -> ChildMut<'_> {
        if self.leaves.is_empty() {
            ChildMut::Node(&mut self.nodes[idx])
        } else {
            ChildMut::Leaf(&mut self.leaves[idx])
        }
    }

    /// Puts `c` at index `idx` of the dense child vectors (room reserved beforehand).
    #[inline]
    pub(super) fn insert_child(&mut self, idx: usize, c: Child) {
        match c {
            Child::Leaf(l) => {
                debug_assert!(self.nodes.is_empty());
                debug_assert!(self.leaves.len() < self.leaves.capacity(), "unreserved");
                self.leaves.insert(idx, l);
            }
            Child::Node(n) => {
                debug_assert!(self.leaves.is_empty());
                debug_assert!(self.nodes.len() < self.nodes.capacity(), "unreserved");
                self.nodes.insert(idx, n);
            }
        }
    }

    /// Drops the child at index `idx` of the dense child vectors.
    #[inline]
    pub(super) fn remove_child(&mut self, idx: usize) {
        if self.leaves.is_empty() {
            self.nodes.remove(idx);
        } else {
            self.leaves.remove(idx);
        }
    }

    /// Reserves room for `n` more children of a node at `level`.
    #[inline]
    pub(super) fn reserve_children(&mut self, level: u32, n: usize) -> Result<(), AllocError> {
        let reserved = if level == 1 {
            self.leaves.try_reserve(n)
        } else {
            self.nodes.try_reserve(n)
        };
        reserved.map_err(|_| AllocError { bytes: n * 8 })
    }

    /// Re-initialises a (pooled) node as one whose every slot is full with `marks`.
    pub(super) fn set_full(&mut self, marks: Marks) {
        self.present = u64::MAX;
        self.full = u64::MAX;
        for k in 0..MARK_COUNT {
            self.marks[k] = if marks.has(k) { u64::MAX } else { 0 };
        }
        self.nodes.clear();
        self.leaves.clear();
        self.sparse = None;
        self.slot_bytes = [SLOT_FULL; 64];
    }

    /// Exact heap bytes below and including this node's child vector (not the node itself).
    pub(super) fn heap_bytes(&self) -> usize {
        let mut b = self.nodes.capacity() * std::mem::size_of::<FBox<Node>>()
            + self.leaves.capacity() * std::mem::size_of::<FBox<Leaf>>()
            + self.sparse.as_ref().map_or(0, |sparse| {
                std::mem::size_of::<SparseLeaves>()
                    + sparse.leaves.capacity() * std::mem::size_of::<SparseLeaf>()
                    + sparse.leaves.iter().map(SparseLeaf::bytes).sum::<usize>()
            });
        for l in &self.leaves {
            b += std::mem::size_of::<Leaf>()
                + l.mixed
                    .as_ref()
                    .map_or(0, |_| std::mem::size_of::<MarkMaps>());
        }
        for n in &self.nodes {
            b += std::mem::size_of::<Node>() + n.heap_bytes();
        }
        b
    }

    /// After the child at `idx` (in slot `i`) was worked on: collapses it into a full slot if
    /// it became full with uniform marks, drops it if it became empty, and sets the slot's
    /// summary bits to its marks.
    pub(super) fn settle_child(&mut self, i: u32, idx: usize) {
        let bit = 1u64 << i;
        let (empty, full, any) = match self.child_mut(idx) {
            ChildMut::Leaf(l) => (l.count() == 0, l.is_full_uniform(), l.any_marks()),
            ChildMut::Node(n) => {
                n.release_children();
                (n.present == 0, n.is_full_uniform(), n.any_marks())
            }
        };
        if empty {
            self.remove_child(idx);
            self.present &= !bit;
            self.set_slot_marks(i, Marks::NONE);
        } else if let Some(m) = full {
            self.remove_child(idx);
            self.full |= bit;
            self.set_slot_marks(i, m);
        } else {
            self.set_slot_marks(i, any);
        }
    }
}
