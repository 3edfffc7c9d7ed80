//! The offline-page tracker: an xarray-like radix tree over guest page frame numbers.
//!
//! # Conventions in this module
//! - `index`/`start`/`count`: page frame numbers (4 KiB pages) and page counts, plain `u64` as in
//!   xarray; the manager wraps them in `Pfn`/`PageRange`.
//! - `level`: 0 is a leaf (a 4096-page bitmap); a node at level `L >= 1` has 64 slots, each covering
//!   `1 << slot_shift(L)` pages. The root's level is the tree's `height`.
//! - `lo..hi`: a half-open page range relative to the base of the node or leaf being worked on.
//! - `k`: a mark index (see [`Mark`]); `Marks` is a set of marks.
//!
//! # Shape
//! Every node slot is *empty*, *full* (a multi-index entry: every page of the slot's aligned range
//! is present with the same marks, at no cost beyond the slot's bits), or points at a child. A node
//! keeps `present`, `full` and one summary bitmap per mark: for a full slot the mark bit says whether
//! its pages carry the mark, for a child whether any page below does. Searches for a mark follow the
//! summary bits only, so empty subtrees are never visited. Children are stored densely in slot order
//! (`present & !full` says which slots have one), so a node of only full slots costs 64 bytes.
//!
//! # Allocation
//! Every operation first works out exactly which nodes, leaves and mark bitmaps it will need,
//! allocates them fallibly into a pool (and reserves room in the child vectors it will grow), and
//! only then changes the tree. A failed allocation returns [`TrackerError::NoMemory`] with the tree
//! untouched; [`Tracker::reserve`] lets a caller allocate ahead of time, like xarray's reserve.

mod cursor;
mod fbox;
mod leaf;
mod sparse;

use cursor::Chunks;
pub use cursor::{Chunk, MarkedRuns, Run, Runs};
use fbox::{AllocError, FBox};
use leaf::{Leaf, MarkMaps, LEAF_SHIFT, WORDS};
use sparse::{SparseLeaf, SPARSE_MAX};

/// Number of marks per entry.
pub const MARK_COUNT: usize = 3;

/// Largest page frame number the tracker accepts: 52 bits of PFN cover the whole 64-bit guest
/// physical address space at 4 KiB pages.
pub const MAX_INDEX: u64 = (1 << 52) - 1;

const SLOT_SHIFT: u32 = 6;
/// `Node::slot_bytes` of an empty slot.
const SLOT_EMPTY: u8 = 0xff;
/// `Node::slot_bytes` of a full slot (multi-index entry). Child indexes are below 64.
const SLOT_FULL: u8 = 0xfe;
/// `Node::slot_bytes` of a sparse leaf: this plus its index among the node's sparse leaves.
const SLOT_SPARSE: u8 = 64;
const MAX_HEIGHT: u32 = 7; // 12 + 6 * 7 = 54 bits >= 52

/// Why a tracked page is offline, or what has been done to it. Used as a mark index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mark {
    Ballooned = 0,
    Unplugged = 1,
    /// The host backing of the page has been released.
    Discarded = 2,
}

/// A set of [`Mark`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Marks(pub u8);

impl Marks {
    pub const NONE: Marks = Marks(0);

    pub fn of(marks: &[Mark]) -> Marks {
        marks.iter().fold(Marks::NONE, |m, &k| m.with(k as usize))
    }
    #[inline]
    pub fn has(self, k: usize) -> bool {
        self.0 & (1 << k) != 0
    }
    #[inline]
    pub fn contains(self, mark: Mark) -> bool {
        self.has(mark as usize)
    }
    #[inline]
    pub fn with(self, k: usize) -> Marks {
        Marks(self.0 | (1 << k))
    }
    #[inline]
    pub fn without(self, k: usize) -> Marks {
        Marks(self.0 & !(1 << k))
    }
}

impl From<Mark> for Marks {
    fn from(m: Mark) -> Marks {
        Marks(1 << m as usize)
    }
}

/// Errors of the tracker. The tree is unchanged whenever one is returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TrackerError {
    #[error("page range 0x{start:x}+0x{count:x} goes past the largest trackable PFN 0x{max:x}")]
    OutOfRange { start: u64, count: u64, max: u64 },
    #[error("out of memory growing the offline-page tracker ({bytes} bytes requested)")]
    NoMemory { bytes: usize },
}

impl From<AllocError> for TrackerError {
    fn from(e: AllocError) -> Self {
        TrackerError::NoMemory { bytes: e.bytes }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Insert(Marks),
    Remove,
    SetMark(usize),
    ClearMark(usize),
}

/// Change in the number of present pages and of pages carrying each mark.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Delta {
    present: i64,
    marks: [i64; MARK_COUNT],
}

impl Delta {
    fn add(&mut self, o: Delta) {
        self.present += o.present;
        for k in 0..MARK_COUNT {
            self.marks[k] += o.marks[k];
        }
    }
    fn whole(sign: i64, pages: u64, marks: Marks) -> Delta {
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

/// A child being linked into a node.
#[derive(Debug)]
enum Child {
    Leaf(FBox<Leaf>),
    Node(FBox<Node>),
}

/// A node's child, borrowed.
enum ChildRef<'a> {
    Leaf(&'a Leaf),
    Node(&'a Node),
}

/// A node's child, borrowed mutably.
enum ChildMut<'a> {
    Leaf(&'a mut Leaf),
    Node(&'a mut Node),
}

#[derive(Debug)]
struct Node {
    present: u64,
    full: u64,
    marks: [u64; MARK_COUNT],
    /// The children of a node above level 1, densely in slot order (empty at level 1).
    nodes: Vec<FBox<Node>>,
    /// The children of a level-1 node (empty above): leaves, densely in slot order. Two typed
    /// vectors instead of one of a two-kind enum: 8 bytes per child instead of 16, and the
    /// single-page paths know the kind from the level (no tag test, no 16-byte stride).
    leaves: Vec<FBox<Leaf>>,
    /// The sparse leaves of a level-1 node, densely in slot order, and which slots hold them
    /// (a third child kind, out of `leaves`, so the bitmap fast paths' bounds check on
    /// `leaves` fails for them and nothing else changes there). Boxed, and only while there
    /// are some: 8 bytes in every node instead of 32.
    sparse: Option<FBox<SparseLeaves>>,
    /// What each slot holds, in one byte: [`SLOT_EMPTY`], [`SLOT_FULL`], or for a child its
    /// index in `nodes` or `leaves` (the number of child slots below it). Recomputed by `rebuild_slot_bytes` at the
    /// end of every change to `present`/`full`, so a lookup reads one byte per level: no
    /// popcount (a software one on baseline x86-64, a dozen instructions on the critical path)
    /// and no separate present/full tests.
    slot_bytes: [u8; 64],
}

/// A level-1 node's sparse leaves: which slots hold them, and the leaves in slot order.
#[derive(Debug, Default)]
struct SparseLeaves {
    slots: u64,
    leaves: Vec<SparseLeaf>,
}

impl SparseLeaves {
    /// Takes out the sparse leaf at `idx` of `leaves`, the one in slot `slot`.
    fn take(&mut self, idx: usize, slot: u32) -> SparseLeaf {
        self.slots &= !(1u64 << slot);
        self.leaves.remove(idx)
    }
}

#[inline]
fn mask_below(i: u32) -> u64 {
    (1u64 << i) - 1
}

/// Log2 of the pages covered by one slot of a node at `level` (>= 1).
#[inline]
fn slot_shift(level: u32) -> u32 {
    LEAF_SHIFT + SLOT_SHIFT * (level - 1)
}

/// Log2 of the pages covered by a node at `level` (0 = leaf).
#[inline]
fn span_shift(level: u32) -> u32 {
    LEAF_SHIFT + SLOT_SHIFT * level
}

/// Slots `first..=last` of a node, as a mask.
#[inline]
fn slot_range_mask(first: u32, last: u32) -> u64 {
    leaf::word_mask(first, last + 1)
}

impl Node {
    fn empty() -> Node {
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
    fn rebuild_slot_bytes(&mut self) {
        self.slot_bytes = [SLOT_EMPTY; 64];
        let mut f = self.present & self.full;
        while f != 0 {
            self.slot_bytes[f.trailing_zeros() as usize] = SLOT_FULL;
            f &= f - 1;
        }
        let sparse = self.sparse_slots();
        let mut k = self.present & !self.full & !sparse;
        let mut r = 0u8;
        while k != 0 {
            self.slot_bytes[k.trailing_zeros() as usize] = r;
            r += 1;
            k &= k - 1;
        }
        let mut k = sparse;
        let mut r = SLOT_SPARSE;
        while k != 0 {
            self.slot_bytes[k.trailing_zeros() as usize] = r;
            r += 1;
            k &= k - 1;
        }
    }

    /// Slots holding sparse leaves.
    #[inline(always)]
    fn sparse_slots(&self) -> u64 {
        match &self.sparse {
            Some(k) => k.slots,
            None => 0,
        }
    }

    /// The sparse leaves, in slot order.
    #[inline(always)]
    fn sparse_leaves(&self) -> &[SparseLeaf] {
        match &self.sparse {
            Some(k) => &k.leaves,
            None => &[],
        }
    }

    /// The sparse leaves and their slots, which must exist.
    fn sparse_mut(&mut self) -> &mut SparseLeaves {
        self.sparse.as_mut().expect("sparse leaves")
    }

    /// The sparse leaves and their slots, allocated if there are none yet (with room for
    /// one more leaf).
    fn sparse_mut_with_room(&mut self) -> Result<&mut SparseLeaves, AllocError> {
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

    /// The sparse leaf of a slot whose byte is `r`, if it holds one.
    #[inline(always)]
    fn sparse_of_byte(&self, r: u8) -> Option<&SparseLeaf> {
        self.sparse_leaves()
            .get(usize::from(r).wrapping_sub(usize::from(SLOT_SPARSE)))
    }

    /// Index among the sparse leaves of a sparse leaf in slot `i`.
    #[inline]
    fn sparse_below(&self, i: u32) -> usize {
        (self.sparse_slots() & mask_below(i)).count_ones() as usize
    }

    /// `slot_bytes` after the sparse leaf of slot `i` was taken out, leaving the slot `now`.
    fn note_sparse_unlinked(&mut self, i: u32, now: u8) {
        let i = i as usize & 63;
        for r in &mut self.slot_bytes[i + 1..] {
            *r -= u8::from((SLOT_SPARSE..SLOT_FULL).contains(r));
        }
        self.slot_bytes[i] = now;
    }

    /// `Tracker::compact` below this node (at `level`, covering pages from `base`), for pages
    /// `lo..hi`.
    fn compact(&mut self, level: u32, base: u64, lo: u64, hi: u64) -> usize {
        let sshift = slot_shift(level);
        let first = ((lo.max(base) - base) >> sshift) as u32;
        let last = ((hi.min(base + (1u64 << span_shift(level))) - 1 - base) >> sshift) as u32;
        let mut kids = self.present & !self.full & slot_range_mask(first, last);
        let mut n = 0;
        if level == 1 {
            kids &= !self.sparse_slots();
            while kids != 0 {
                let i = kids.trailing_zeros();
                kids &= kids - 1;
                n += usize::from(self.compact_leaf(i));
            }
        } else {
            while kids != 0 {
                let i = kids.trailing_zeros();
                kids &= kids - 1;
                let idx = self.child_idx(i as usize);
                let sbase = base + (u64::from(i) << sshift);
                n += self.nodes[idx].compact(level - 1, sbase, lo, hi);
            }
        }
        n
    }

    /// Turns the bitmap leaf of slot `i` (level 1) into a sparse leaf if it has at most
    /// `SPARSE_MAX` pages with uniform marks and the allocations succeed.
    fn compact_leaf(&mut self, i: u32) -> bool {
        let idx = self.child_idx(i as usize);
        let leaf = &self.leaves[idx];
        let n = usize::from(leaf.count());
        if n > SPARSE_MAX || leaf.mixed.is_some() {
            return false;
        }
        let Ok(mut sp) = SparseLeaf::try_new(sparse::chunks_for(n), leaf.uniform()) else {
            return false;
        };
        for (w, &bits) in leaf.bits.iter().enumerate() {
            let mut b = bits;
            while b != 0 {
                sp.insert(((w as u64) << 6) + u64::from(b.trailing_zeros()));
                b &= b - 1;
            }
        }
        let si = self.sparse_below(i);
        let Ok(k) = self.sparse_mut_with_room() else {
            return false;
        };
        k.leaves.insert(si, sp);
        k.slots |= 1 << i;
        self.leaves.remove(idx);
        self.rebuild_slot_bytes();
        self.release_children();
        true
    }

    /// Turns the sparse leaf of slot `i` into the bitmap leaf `leaf` (an empty one; room for it
    /// in `leaves` reserved), `slot_bytes` included; returns its index in `leaves`.
    fn sparse_to_leaf(&mut self, i: u32, mut leaf: FBox<Leaf>) -> usize {
        let si = self.sparse_below(i);
        let k = self.sparse_mut();
        let s = k.take(si, i);
        s.fill(&mut leaf);
        if k.leaves.is_empty() {
            self.sparse = None;
        }
        let idx = self.children_below(i);
        debug_assert!(self.leaves.len() < self.leaves.capacity(), "unreserved");
        self.leaves.insert(idx, leaf);
        self.note_sparse_unlinked(i, SLOT_EMPTY);
        self.note_linked_at(i, idx);
        idx
    }

    /// `slot_bytes` after a child was put into slot `i` (which was empty or full): its index, and one
    /// more for every child after it. For the fast paths, instead of a whole `rebuild_slot_bytes`.
    fn note_linked(&mut self, i: u32) {
        self.note_linked_at(i, self.children_below(i));
    }

    /// `note_linked` when the child's index `idx` is known.
    fn note_linked_at(&mut self, i: u32, idx: usize) {
        let i = i as usize & 63;
        for r in &mut self.slot_bytes[i + 1..] {
            *r += u8::from(*r < 64);
        }
        self.slot_bytes[i] = idx as u8;
    }

    /// `slot_bytes` after the child of slot `i` was taken out, leaving the slot `now`
    /// ([`SLOT_EMPTY`] or [`SLOT_FULL`]).
    fn note_unlinked(&mut self, i: u32, now: u8) {
        let i = i as usize & 63;
        for r in &mut self.slot_bytes[i + 1..] {
            *r -= u8::from(*r < 64);
        }
        self.slot_bytes[i] = now;
    }

    /// `slot_bytes[i]` (valid between operations): [`SLOT_EMPTY`], [`SLOT_FULL`] or a child index.
    #[inline(always)]
    fn slot_byte(&self, i: usize) -> u8 {
        let r = self.slot_bytes[i & 63];
        debug_assert_eq!(
            r,
            match (self.present >> i & 1, self.full >> i & 1) {
                (0, _) => SLOT_EMPTY,
                (_, 1) => SLOT_FULL,
                _ if self.sparse_slots() >> i & 1 != 0 =>
                    SLOT_SPARSE + self.sparse_below(i as u32) as u8,
                _ => self.children_below(i as u32) as u8,
            },
            "stale slot_bytes"
        );
        r
    }

    /// Index in `children` of the child in slot `i`, which must hold one.
    #[inline(always)]
    fn child_idx(&self, i: usize) -> usize {
        let r = self.slot_byte(i);
        debug_assert!(r < 64, "slot {i} holds no child");
        usize::from(r)
    }

    #[inline]
    fn children_below(&self, i: u32) -> usize {
        (self.present & !self.full & !self.sparse_slots() & mask_below(i)).count_ones() as usize
    }

    /// Whether emptying the slots of `slots` leaves this node pages, with each mark of `marks`
    /// still carried by another slot: then the summaries above it stay right and a fast path
    /// may drop those children without walking up.
    fn can_drop_in_place(&self, slots: u64, marks: Marks) -> bool {
        self.present & !slots != 0
            && (0..MARK_COUNT).all(|k| !marks.has(k) || self.marks[k] & !slots != 0)
    }

    /// Whether no slot has some mark of `m` (a new child with `m` must then tell the slots
    /// above it).
    fn lacks_some_mark_of(&self, m: Marks) -> bool {
        (0..MARK_COUNT).any(|k| m.has(k) && self.marks[k] == 0)
    }

    fn slot_marks(&self, i: u32) -> Marks {
        let mut m = Marks::NONE;
        for k in 0..MARK_COUNT {
            if self.marks[k] & (1 << i) != 0 {
                m = m.with(k);
            }
        }
        m
    }

    fn set_slot_marks(&mut self, i: u32, m: Marks) {
        for k in 0..MARK_COUNT {
            if m.has(k) {
                self.marks[k] |= 1 << i;
            } else {
                self.marks[k] &= !(1 << i);
            }
        }
    }

    fn any_marks(&self) -> Marks {
        let mut m = Marks::NONE;
        for k in 0..MARK_COUNT {
            if self.marks[k] != 0 {
                m = m.with(k);
            }
        }
        m
    }

    fn is_full_uniform(&self) -> Option<Marks> {
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
    fn release_children(&mut self) {
        if self.nodes.is_empty() && self.nodes.capacity() != 0 {
            self.nodes = Vec::new();
        }
        if self.leaves.is_empty() && self.leaves.capacity() != 0 {
            self.leaves = Vec::new();
        }
        if self.sparse.as_ref().is_some_and(|k| k.leaves.is_empty()) {
            self.sparse = None;
        }
    }

    /// Number of children.
    #[cfg(any(test, feature = "testing"))]
    fn child_count(&self) -> usize {
        self.nodes.len() + self.leaves.len() + self.sparse_leaves().len()
    }

    /// The child at index `idx` of the dense child vectors (a node's children are all leaves
    /// or all nodes).
    fn child(&self, idx: usize) -> ChildRef<'_> {
        if self.leaves.is_empty() {
            ChildRef::Node(&self.nodes[idx])
        } else {
            ChildRef::Leaf(&self.leaves[idx])
        }
    }

    fn child_mut(&mut self, idx: usize) -> ChildMut<'_> {
        if self.leaves.is_empty() {
            ChildMut::Node(&mut self.nodes[idx])
        } else {
            ChildMut::Leaf(&mut self.leaves[idx])
        }
    }

    /// Puts `c` at index `idx` of the dense child vectors (room reserved beforehand).
    fn insert_child(&mut self, idx: usize, c: Child) {
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
    fn remove_child(&mut self, idx: usize) {
        if self.leaves.is_empty() {
            self.nodes.remove(idx);
        } else {
            self.leaves.remove(idx);
        }
    }

    /// Reserves room for `n` more children of a node at `level`.
    fn reserve_children(&mut self, level: u32, n: usize) -> Result<(), AllocError> {
        let r = if level == 1 {
            self.leaves.try_reserve(n)
        } else {
            self.nodes.try_reserve(n)
        };
        r.map_err(|_| AllocError { bytes: n * 8 })
    }

    fn set_full(&mut self, marks: Marks) {
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
    fn heap_bytes(&self) -> usize {
        let mut b = self.nodes.capacity() * std::mem::size_of::<FBox<Node>>()
            + self.leaves.capacity() * std::mem::size_of::<FBox<Leaf>>()
            + self.sparse.as_ref().map_or(0, |k| {
                std::mem::size_of::<SparseLeaves>()
                    + k.leaves.capacity() * std::mem::size_of::<SparseLeaf>()
                    + k.leaves.iter().map(SparseLeaf::bytes).sum::<usize>()
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

    /// Puts `child` (just worked on) back into slot `i`, collapsing it into a full slot or dropping
    /// it when it became uniform-full or empty.
    fn settle_child(&mut self, i: u32, idx: usize) {
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

    /// Applies `op` to pages `lo..hi` relative to this node (at `level` >= 1).
    fn apply(&mut self, level: u32, lo: u64, hi: u64, op: Op, pool: &mut Pool) -> Delta {
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
    fn prepare(
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
enum SparsePlan {
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
    fn of(op: Op, whole: bool, s: &SparseLeaf, lo: u64, hi: u64) -> SparsePlan {
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

/// Allocations an operation will take from the pool.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub nodes: usize,
    pub leaves: usize,
    pub maps: usize,
}

impl Need {
    /// A new subtree at `level` (0 = leaf) materialised for the partial range `lo..hi`: one node
    /// per level along each edge of the range, and a leaf at the bottom of each.
    fn new_subtree(&mut self, level: u32, lo: u64, hi: u64, maps: bool) {
        if level == 0 {
            self.leaves += 1;
            if maps {
                self.maps += 1;
            }
            return;
        }
        self.nodes += 1;
        self.edge_subtrees(level, lo, hi, maps);
    }

    /// The new subtrees for the partially covered edge slots of `lo..hi` in a node at `level`.
    fn edge_subtrees(&mut self, level: u32, lo: u64, hi: u64, maps: bool) {
        let sshift = slot_shift(level);
        let sspan = 1u64 << sshift;
        let first = lo >> sshift;
        let last = (hi - 1) >> sshift;
        let n = if first == last { 1 } else { 2 };
        for i in [first, last].into_iter().take(n) {
            let base = i << sshift;
            let s_lo = lo.max(base) - base;
            let s_hi = hi.min(base + sspan) - base;
            if !(s_lo == 0 && s_hi == sspan) {
                self.new_subtree(level - 1, s_lo, s_hi, maps);
            }
        }
    }
}

/// Nodes, leaves and mark bitmaps allocated ahead of the changes that use them.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    nodes: Vec<FBox<Node>>,
    leaves: Vec<FBox<Leaf>>,
    maps: Vec<FBox<MarkMaps>>,
}

impl Pool {
    fn reserve(&mut self, need: Need) -> Result<(), AllocError> {
        if self.nodes.len() < need.nodes {
            self.nodes
                .try_reserve(need.nodes - self.nodes.len())
                .map_err(|_| AllocError {
                    bytes: need.nodes * 8,
                })?;
        }
        while self.nodes.len() < need.nodes {
            let mut n = FBox::try_new(Node::empty())?;
            // Room for the children a new node gets within one operation: two partial edges,
            // plus the old root when it becomes the top of a taller tree. Its level is not
            // known yet: room in both vectors, and `take_node` frees the one it will not use.
            n.nodes.try_reserve_exact(3).map_err(|_| AllocError {
                bytes: 3 * std::mem::size_of::<FBox<Node>>(),
            })?;
            n.leaves.try_reserve_exact(2).map_err(|_| AllocError {
                bytes: 2 * std::mem::size_of::<FBox<Leaf>>(),
            })?;
            self.nodes.push(n);
        }
        if self.leaves.len() < need.leaves {
            self.leaves
                .try_reserve(need.leaves - self.leaves.len())
                .map_err(|_| AllocError {
                    bytes: need.leaves * 8,
                })?;
        }
        while self.leaves.len() < need.leaves {
            self.leaves.push(FBox::try_new_with(Leaf::empty)?);
        }
        if self.maps.len() < need.maps {
            self.maps
                .try_reserve(need.maps - self.maps.len())
                .map_err(|_| AllocError {
                    bytes: need.maps * 8,
                })?;
        }
        while self.maps.len() < need.maps {
            self.maps.push(FBox::try_new(MarkMaps::EMPTY)?);
        }
        Ok(())
    }

    /// Frees the spare lists' own storage once they are empty.
    fn release_empty(&mut self) {
        if self.nodes.is_empty() && self.nodes.capacity() != 0 {
            self.nodes = Vec::new();
        }
        if self.leaves.is_empty() && self.leaves.capacity() != 0 {
            self.leaves = Vec::new();
        }
        if self.maps.is_empty() && self.maps.capacity() != 0 {
            self.maps = Vec::new();
        }
    }

    /// A spare node for `level` (its other child vector freed).
    fn take_node(&mut self, level: u32) -> FBox<Node> {
        match self.nodes.pop() {
            Some(mut n) => {
                if level == 1 {
                    n.nodes = Vec::new();
                } else {
                    n.leaves = Vec::new();
                }
                n
            }
            None => panic!("tracker pool ran out of nodes: reservation miscounted"),
        }
    }
    pub(crate) fn take_leaf(&mut self) -> FBox<Leaf> {
        match self.leaves.pop() {
            Some(mut l) => {
                l.set_empty();
                l
            }
            None => panic!("tracker pool ran out of leaves: reservation miscounted"),
        }
    }
    pub(crate) fn take_maps(&mut self) -> FBox<MarkMaps> {
        match self.maps.pop() {
            Some(m) => m,
            None => panic!("tracker pool ran out of mark bitmaps: reservation miscounted"),
        }
    }

    fn heap_bytes(&self) -> usize {
        self.nodes.capacity() * 8
            + self.leaves.capacity() * 8
            + self.maps.capacity() * 8
            + self
                .nodes
                .iter()
                .map(|n| {
                    std::mem::size_of::<Node>()
                        + n.nodes.capacity() * std::mem::size_of::<FBox<Node>>()
                        + n.leaves.capacity() * std::mem::size_of::<FBox<Leaf>>()
                })
                .sum::<usize>()
            + self.leaves.len() * std::mem::size_of::<Leaf>()
            + self.maps.len() * std::mem::size_of::<MarkMaps>()
    }
}

/// The set of offline pages, each with its marks.
#[derive(Debug, Default)]
pub struct Tracker {
    root: Option<FBox<Node>>,
    height: u32,
    /// `slot_shift(height)` while there is a root (for the lookup and single-page fast paths).
    root_shift: u32,
    /// `1 << span_shift(height)` while there is a root, 0 without: the first index past the
    /// tree (one compare for the fast paths).
    index_limit: u64,
    /// Pages added (wrapping: minus pages removed) by the general path, and of those, pages
    /// carrying each mark; the fast paths count in `pages_by_marks` instead.
    pages: u64,
    marked: [u64; MARK_COUNT],
    /// Pages added (wrapping: minus pages removed) by the fast paths, per set of marks: one
    /// add instead of one per mark and one for the total; `len` and `count_marked` fold them
    /// in.
    pages_by_marks: [u64; 8],
    pool: Pool,
}

/// Height needed for index `last` to be in the tree (>= 1).
fn height_for(last: u64) -> u32 {
    let mut h = 1;
    while h < MAX_HEIGHT && last >> span_shift(h) != 0 {
        h += 1;
    }
    h
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker::default()
    }

    /// Number of tracked pages, O(1).
    pub fn len(&self) -> u64 {
        self.pages_by_marks
            .iter()
            .fold(self.pages, |n, &c| n.wrapping_add(c))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of tracked pages carrying `mark`, O(1).
    pub fn count_marked(&self, mark: Mark) -> u64 {
        let k = mark as usize;
        let mut n = self.marked[k];
        for (m, c) in self.pages_by_marks.iter().enumerate() {
            if Marks(m as u8).has(k) {
                n = n.wrapping_add(*c);
            }
        }
        n
    }

    fn checked_end(start: u64, count: u64) -> Result<u64, TrackerError> {
        match start.checked_add(count) {
            Some(end) if end - 1 <= MAX_INDEX => Ok(end),
            _ => Err(TrackerError::OutOfRange {
                start,
                count,
                max: MAX_INDEX,
            }),
        }
    }

    fn general_update(&mut self, start: u64, count: u64, op: Op) -> Result<Delta, TrackerError> {
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

    fn shrink(&mut self) {
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

    /// Adds pages `start..start+count` with `marks`; pages already present keep their marks.
    /// Returns how many pages were added.
    pub fn insert_range(
        &mut self,
        start: u64,
        count: u64,
        marks: Marks,
    ) -> Result<u64, TrackerError> {
        // Fast path: the range lies in one leaf, which keeps uniform marks and does not fill
        // up, so nothing above the leaf changes.
        let lo = start & (leaf::LEAF_PAGES - 1);
        if count.wrapping_sub(1) < leaf::LEAF_PAGES - lo {
            if let Some(leaf) =
                Self::leaf_mut(&mut self.root, self.root_shift, self.index_limit, start)
            {
                if leaf.fast_insert_ok(marks, count as u32) {
                    let n = leaf.set_bits(lo, lo + count);
                    let c = &mut self.pages_by_marks[usize::from(marks.0 & 7)];
                    *c = c.wrapping_add(u64::from(n));
                    return Ok(u64::from(n));
                }
            }
        }
        self.insert_range_slow(start, count, marks)
    }

    /// `insert_range` off the fast path (out of line).
    #[inline(never)]
    fn insert_range_slow(
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

    /// Turns the bitmap leaves in `start..start+count` that hold at most [`SPARSE_MAX`]
    /// pages, all with the same marks, into sparse leaves (2 bytes a page instead of a
    /// 528-byte bitmap), and returns how many it turned. Updates never make sparse leaves
    /// themselves, so that the single-page paths stay bitmap flips: the memory manager calls
    /// this on what changed once its user has been quiet for a while (`MemoryManager::compact`),
    /// as roaring's `run_optimize` is called. Best effort: a leaf whose sparse copy cannot be
    /// allocated stays a bitmap. Observable contents never change.
    pub fn compact(&mut self, start: u64, count: u64) -> usize {
        let end = start.saturating_add(count).min(self.index_limit);
        match self.root.as_deref_mut() {
            Some(root) if start < end => root.compact(self.height, 0, start, end),
            _ => 0,
        }
    }

    /// Adds one page; returns whether it was absent.
    #[inline]
    pub fn insert(&mut self, index: u64, marks: Marks) -> Result<bool, TrackerError> {
        // Fast path: the page's leaf exists, carries exactly `marks` and does not fill up, so
        // nothing above the leaf changes.
        debug_assert!(self.root.is_none() || self.root_shift == slot_shift(self.height));
        if let Some(leaf) = Self::leaf_mut(&mut self.root, self.root_shift, self.index_limit, index)
        {
            let off = index & (leaf::LEAF_PAGES - 1);
            let (w, b) = ((off >> 6) as usize, 1u64 << (off & 63));
            if leaf.bits[w] & b != 0 {
                return Ok(false);
            }
            if leaf.fast_insert_ok(marks, 1) {
                leaf.bits[w] |= b;
                leaf.add_count(1);
                let c = &mut self.pages_by_marks[usize::from(marks.0 & 7)];
                *c = c.wrapping_add(1);
                return Ok(true);
            }
        }
        self.insert_slow(index, marks)
    }

    /// `insert` off the fast path (out of line, so the fast path needs no stack frame).
    #[cold]
    #[inline(never)]
    fn insert_slow(&mut self, index: u64, marks: Marks) -> Result<bool, TrackerError> {
        Ok(self.insert_range(index, 1, marks)? == 1)
    }

    /// Removes pages `start..start+count`; returns how many were present.
    pub fn remove_range(&mut self, start: u64, count: u64) -> Result<u64, TrackerError> {
        // Fast path: the range lies in one leaf with uniform marks that keeps some pages.
        let lo = start & (leaf::LEAF_PAGES - 1);
        if count.wrapping_sub(1) < leaf::LEAF_PAGES - lo {
            if let Some(leaf) =
                Self::leaf_mut(&mut self.root, self.root_shift, self.index_limit, start)
            {
                if leaf.fast_remove_ok(count as u32) {
                    let n = leaf.clear_bits(lo, lo + count);
                    let c = &mut self.pages_by_marks[usize::from(leaf.uniform().0 & 7)];
                    *c = c.wrapping_sub(u64::from(n));
                    return Ok(u64::from(n));
                }
            }
        }
        self.remove_range_slow(start, count)
    }

    /// `remove_range` off the fast path (out of line).
    #[inline(never)]
    fn remove_range_slow(&mut self, start: u64, count: u64) -> Result<u64, TrackerError> {
        if let Some(n) = self.short_range_update(start, count, Op::Remove) {
            return Ok(n);
        }
        Ok((-self.general_update(start, count, Op::Remove)?.present) as u64)
    }

    /// Removes one page; returns whether it was present.
    #[inline]
    pub fn remove(&mut self, index: u64) -> Result<bool, TrackerError> {
        // Fast path: a leaf with uniform marks that does not become empty.
        debug_assert!(self.root.is_none() || self.root_shift == slot_shift(self.height));
        if let Some(leaf) = Self::leaf_mut(&mut self.root, self.root_shift, self.index_limit, index)
        {
            let off = index & (leaf::LEAF_PAGES - 1);
            let (w, b) = ((off >> 6) as usize, 1u64 << (off & 63));
            if leaf.bits[w] & b == 0 {
                return Ok(false);
            }
            if leaf.fast_remove_ok(1) {
                leaf.bits[w] ^= b; // the bit is set
                leaf.add_count(1u32.wrapping_neg());
                let marks = leaf.uniform();
                let c = &mut self.pages_by_marks[usize::from(marks.0 & 7)];
                *c = c.wrapping_sub(1);
                return Ok(true);
            }
        }
        self.remove_slow(index)
    }

    /// `remove` off the fast path (out of line).
    #[cold]
    #[inline(never)]
    fn remove_slow(&mut self, index: u64) -> Result<bool, TrackerError> {
        Ok(self.remove_range(index, 1)? == 1)
    }

    /// The leaf holding `index`, if the path to it is made of child pointers all the way down.
    #[inline(always)]
    fn leaf_mut(
        root: &mut Option<FBox<Node>>,
        root_shift: u32,
        index_limit: u64,
        index: u64,
    ) -> Option<&mut Leaf> {
        let node = Self::level1_mut(root, root_shift, index_limit, index)?;
        let r = node.slot_byte((index >> LEAF_SHIFT) as usize & 63);
        node.leaves.get_mut(usize::from(r)).map(|l| &mut **l)
    }

    /// The level-1 node above `index`, if the path to it is made of child pointers.
    #[inline(always)]
    fn level1_mut(
        root: &mut Option<FBox<Node>>,
        root_shift: u32,
        index_limit: u64,
        index: u64,
    ) -> Option<&mut Node> {
        let mut node: &mut Node = root.as_deref_mut()?;
        // The usual heights (up to 64 GiB and 4 TiB of guest) unrolled: no loop control, and
        // the index compared with the tree's span as a constant (one load less).
        match root_shift {
            18 => return Self::descend::<2>(node, index),
            24 => return Self::descend::<3>(node, index),
            _ => {}
        }
        if index >= index_limit {
            return None;
        }
        let mut shift = root_shift;
        // An empty or full slot's byte is past the end of the child vector: one bounds check
        // for both. Above level 1 the children are nodes, at level 1 leaves.
        while shift != LEAF_SHIFT {
            let r = node.slot_byte((index >> shift) as usize & 63);
            node = node.nodes.get_mut(usize::from(r))?;
            shift -= SLOT_SHIFT;
        }
        Some(node)
    }

    /// `level1_mut` below a root at level `H`, unrolled.
    #[inline(always)]
    fn descend<const H: u32>(mut node: &mut Node, index: u64) -> Option<&mut Node> {
        if index >> span_shift(H) != 0 {
            return None;
        }
        let mut level = H;
        while level > 1 {
            let r = node.slot_byte((index >> slot_shift(level)) as usize & 63);
            node = node.nodes.get_mut(usize::from(r))?;
            level -= 1;
        }
        Some(node)
    }

    /// Inserts or removes `start..start+count` (shorter than a leaf, so it touches at most two
    /// slots of one level-1 node) when nothing above that node changes. This is the shape of
    /// almost every balloon request, and of the single-page updates the single-page fast paths
    /// leave (a leaf to create, split or drop), so it gets one walk and no planning (the bits
    /// of one existing leaf, the commonest case, are done before, in `insert_range` and
    /// `remove_range`):
    /// - in one slot (`short_range_in_slot`): an empty slot on insert gets a new leaf;
    /// - a full slot on remove (a multi-index entry of one leaf, e.g. onlining a 2 MiB block of
    ///   a born-offline region): a new leaf with every page but the range;
    /// - a leaf that a removal empties: dropped, if the node keeps other pages with each of its
    ///   marks (so the summaries above stay right);
    /// - a full slot on insert, an empty one on remove: nothing to do;
    /// - a sparse leaf: changed in place, or turned into a bitmap leaf first;
    /// - over two slots (`short_range_over_two_slots`): each slot's case, and a leaf whose bits change, all
    ///   planned before either changes.
    ///
    /// New leaves (and room for them) are allocated before anything changes; if that fails, or
    /// the shape is another one, it returns `None` and the general path (which draws on the
    /// reserved spares) does the work.
    #[inline]
    fn short_range_update(&mut self, start: u64, count: u64, op: Op) -> Option<u64> {
        if count.wrapping_sub(1) >= leaf::LEAF_PAGES - 1 || start > MAX_INDEX {
            return None;
        }
        let end = start + count;
        if end - 1 > MAX_INDEX || start >> span_shift(1) != (end - 1) >> span_shift(1) {
            return None;
        }
        let node = Self::level1_mut(&mut self.root, self.root_shift, self.index_limit, start)?;
        // (The bits of one existing leaf were tried by `insert_range`/`remove_range`.)
        let lo = start & (leaf::LEAF_PAGES - 1);
        let (changed, mark_path) = if lo + count <= leaf::LEAF_PAGES {
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
    fn short_range_in_slot(
        node: &mut Node,
        by_marks: &mut [u64; 8],
        i: u32,
        lo: u64,
        hi: u64,
        op: Op,
    ) -> Option<(u64, bool)> {
        let bit = 1u64 << i;
        let r = node.slot_byte(i as usize);
        let (n, marks, mark_path) = match (op, r) {
            (Op::Insert(_), SLOT_FULL) | (Op::Remove, SLOT_EMPTY) => return Some((0, false)),
            (op, r) if (SLOT_SPARSE..SLOT_FULL).contains(&r) => {
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
            (Op::Remove, r) => {
                let idx = usize::from(r);
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
        let c = &mut by_marks[usize::from(marks.0 & 7)];
        *c = c.wrapping_add(n as u64);
        Some((n.unsigned_abs(), mark_path))
    }

    /// `short_range_in_slot` for the sparse leaf of slot `i`: pages added in place (the leaf grown if
    /// needed) while it keeps one set of marks and at most `SPARSE_MAX` pages, or turned into
    /// a bitmap leaf first when it would not; pages removed in place, the leaf dropped when
    /// emptied if the node keeps other pages with its marks. `None` (nothing changed, or only
    /// the conversion) for the general path. Returns the change in pages and their marks.
    #[inline(never)]
    fn short_range_in_sparse(
        node: &mut Node,
        i: u32,
        lo: u64,
        hi: u64,
        op: Op,
    ) -> Option<(i64, Marks)> {
        let bit = 1u64 << i;
        let si = node.sparse_below(i);
        let keeps = node.can_drop_in_place(bit, node.sparse_leaves()[si].marks());
        let s = &mut node.sparse_mut().leaves[si];
        let sm = s.marks();
        let have = s.count_in(lo, hi);
        match op {
            Op::Insert(_) if have as u64 == hi - lo => Some((0, sm)),
            Op::Insert(m) if m != sm => None,
            Op::Insert(m) => {
                let want = s.len() + (hi - lo) as usize - have;
                if want > SPARSE_MAX {
                    if want >= leaf::LEAF_PAGES as usize {
                        return None;
                    }
                    node.leaves.try_reserve(1).ok()?;
                    let leaf = FBox::try_new_with(Leaf::empty).ok()?;
                    let idx = node.sparse_to_leaf(i, leaf);
                    let n = node.leaves[idx].set_bits(lo, hi);
                    return Some((i64::from(n), m));
                }
                if want > s.cap() {
                    s.try_grow(sparse::chunks_for(want)).ok()?;
                }
                Some((s.insert_range(lo, hi) as i64, m))
            }
            Op::Remove if have == 0 => Some((0, sm)),
            Op::Remove if have < s.len() => Some((-(s.remove_range(lo, hi) as i64), sm)),
            Op::Remove => {
                if !keeps {
                    return None;
                }
                let n = s.len() as i64;
                node.sparse_mut().take(si, i);
                node.present &= !bit;
                node.set_slot_marks(i, Marks::NONE);
                node.note_sparse_unlinked(i, SLOT_EMPTY);
                node.release_children();
                Some((-n, sm))
            }
            _ => None,
        }
    }

    /// `short_range_update` for a range over two slots (the end of one leaf and the start of the next):
    /// both slots' cases planned before either changes. Returns the pages changed, and whether
    /// the slots above the node must be told of a new leaf's marks.
    #[inline(never)]
    fn short_range_over_two_slots(
        node: &mut Node,
        by_marks: &mut [u64; 8],
        start: u64,
        end: u64,
        op: Op,
    ) -> Option<(u64, bool)> {
        #[derive(Clone, Copy)]
        enum Piece {
            Skip,
            Bits,
            New,
            Split(Marks),
            Drop,
        }
        let i0 = (start >> LEAF_SHIFT) as u32 & 63;
        let mid = (start | (leaf::LEAF_PAGES - 1)) + 1;
        debug_assert!(mid < end && (end - 1) >> LEAF_SHIFT == mid >> LEAF_SHIFT);
        let pieces = [(i0, start, mid), (i0 + 1, mid, end)];

        // Which case each piece is, before any change.
        let mut plan = [Piece::Skip; 2];
        let (mut fresh, mut dropped, mut dropped_marks) = (0usize, 0u64, Marks::NONE);
        for (p, &(i, a, b)) in pieces.iter().enumerate() {
            let n = (b - a) as u32;
            let r = node.slot_byte(i as usize);
            plan[p] = match (op, r) {
                (Op::Insert(_), SLOT_EMPTY) => {
                    fresh += 1;
                    Piece::New
                }
                (Op::Insert(_), SLOT_FULL) | (Op::Remove, SLOT_EMPTY) => Piece::Skip,
                (Op::Remove, SLOT_FULL) => {
                    fresh += 1;
                    Piece::Split(node.slot_marks(i))
                }
                (_, r) if r >= SLOT_SPARSE => return None,
                (Op::Insert(m), r) if node.leaves[usize::from(r)].fast_insert_ok(m, n) => {
                    Piece::Bits
                }
                (Op::Remove, r) => {
                    let leaf = &node.leaves[usize::from(r)];
                    if leaf.fast_remove_ok(n) {
                        Piece::Bits
                    } else if leaf.mixed.is_some() {
                        return None;
                    } else if leaf.count_in(
                        a & (leaf::LEAF_PAGES - 1),
                        (a & (leaf::LEAF_PAGES - 1)) + u64::from(n),
                    ) < leaf.count()
                    {
                        Piece::Bits
                    } else {
                        dropped |= 1 << i;
                        dropped_marks.0 |= leaf.uniform().0;
                        Piece::Drop
                    }
                }
                _ => return None,
            };
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
            let lo = a & (leaf::LEAF_PAGES - 1);
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
                    let mut leaf = leaves[fresh - 1].take().expect("allocated");
                    fresh -= 1;
                    let n = leaf.set_bits(lo, hi);
                    leaf.set_uniform(m);
                    node.insert_child(node.children_below(i), Child::Leaf(leaf));
                    node.present |= bit;
                    node.set_slot_marks(i, m);
                    node.note_linked(i);
                    (i64::from(n), m)
                }
                Piece::Split(m) => {
                    let mut leaf = leaves[fresh - 1].take().expect("allocated");
                    fresh -= 1;
                    leaf.set_full(m);
                    let n = leaf.clear_bits(lo, hi);
                    node.full &= !bit;
                    node.insert_child(node.children_below(i), Child::Leaf(leaf));
                    node.note_linked(i);
                    (-i64::from(n), m)
                }
                Piece::Drop => {
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

    /// Coalesced runs of present pages (carrying `filter` if given), optionally within the
    /// half-open range `within = (lo, hi)`, in increasing order.
    pub fn runs(&self, filter: Option<Mark>, within: Option<(u64, u64)>) -> Runs<'_> {
        let (lo, hi) = within.unwrap_or((0, u64::MAX));
        Runs::new(Chunks::new(self, filter, false, lo, hi))
    }

    /// Calls `f(start, len)` for each coalesced run of present pages (carrying `filter` if
    /// given) within `within = (lo, hi)`, in increasing order. The fastest way to walk runs
    /// (internal iteration, as xarray's `xa_for_each`); [`Tracker::runs`] is the cursor form.
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

    /// Coalesced runs of pages carrying exactly the same marks, within `within` if given.
    pub fn marked_runs(&self, within: Option<(u64, u64)>) -> MarkedRuns<'_> {
        let (lo, hi) = within.unwrap_or((0, u64::MAX));
        MarkedRuns::new(Chunks::new(self, None, true, lo, hi))
    }

    /// Exact bytes of heap the tracker holds: its nodes, leaves, mark bitmaps, child vectors
    /// and reserved spares (allocator bookkeeping not included).
    pub fn heap_bytes(&self) -> usize {
        self.root
            .as_ref()
            .map_or(0, |r| std::mem::size_of::<Node>() + r.heap_bytes())
            + self.pool.heap_bytes()
    }

    /// Allocates ahead the nodes, leaves and mark bitmaps for later operations, so that they do
    /// not allocate (as xarray's `xa_reserve`). Operations draw from these spares first.
    pub fn reserve(&mut self, need: Need) -> Result<(), TrackerError> {
        let cur = Need {
            nodes: self.pool.nodes.len(),
            leaves: self.pool.leaves.len(),
            maps: self.pool.maps.len(),
        };
        self.pool.reserve(Need {
            nodes: cur.nodes.max(need.nodes),
            leaves: cur.leaves.max(need.leaves),
            maps: cur.maps.max(need.maps),
        })?;
        Ok(())
    }

    /// Spares currently reserved.
    pub fn reserved(&self) -> Need {
        Need {
            nodes: self.pool.nodes.len(),
            leaves: self.pool.leaves.len(),
            maps: self.pool.maps.len(),
        }
    }

    /// Checks the structure's internal bookkeeping: every node's slot bytes against its
    /// `present`/`full` bits and child vector, children of the right kind for their level, the
    /// stored root shift. For tests only (`cfg(test)` or the `testing` feature; the property
    /// test calls it after every operation, so release builds check it too); `Err` names what
    /// is wrong.
    #[cfg(any(test, feature = "testing"))]
    pub fn check_invariants(&self) -> Result<(), String> {
        fn node(n: &Node, level: u32, base: u64) -> Result<(), String> {
            let kids = n.present & !n.full;
            if n.child_count() != kids.count_ones() as usize {
                return Err(format!(
                    "node 0x{base:x} (level {level}): {} children for {} child slots",
                    n.child_count(),
                    kids.count_ones()
                ));
            }
            if (level == 1 && !n.nodes.is_empty())
                || (level > 1 && (!n.leaves.is_empty() || n.sparse.is_some()))
                || n.sparse.as_ref().is_some_and(|k| k.leaves.is_empty())
            {
                return Err(format!(
                    "node 0x{base:x} (level {level}): {} node, {} leaf and {:?} sparse children",
                    n.nodes.len(),
                    n.leaves.len(),
                    n.sparse.as_ref().map(|k| k.leaves.len())
                ));
            }
            for i in 0..64u32 {
                let want = if n.present >> i & 1 == 0 {
                    SLOT_EMPTY
                } else if n.full >> i & 1 != 0 {
                    SLOT_FULL
                } else if n.sparse_slots() >> i & 1 != 0 {
                    SLOT_SPARSE + n.sparse_below(i) as u8
                } else {
                    n.children_below(i) as u8
                };
                if n.sparse_slots() >> i & 1 != 0
                    && (n.present >> i & 1 == 0 || n.full >> i & 1 != 0)
                {
                    return Err(format!(
                        "node 0x{base:x} slot {i}: sparse flag on a non-child"
                    ));
                }
                if n.slot_bytes[i as usize] != want {
                    return Err(format!(
                        "node 0x{base:x} (level {level}) slot {i}: byte {} should be {want}",
                        n.slot_bytes[i as usize]
                    ));
                }
                // A child's summary bits are exactly the marks carried below it; an empty
                // slot has none.
                let summary = n.slot_marks(i);
                let below = match want {
                    SLOT_FULL => summary,
                    SLOT_EMPTY => Marks::NONE,
                    c if c >= SLOT_SPARSE => {
                        let s = &n.sparse_leaves()[usize::from(c - SLOT_SPARSE)];
                        let sbase = base + (u64::from(i) << slot_shift(level));
                        s.check()
                            .map_err(|e| format!("sparse leaf 0x{sbase:x}: {e}"))?;
                        s.marks()
                    }
                    c => match n.child(usize::from(c)) {
                        ChildRef::Leaf(l) => l.any_marks(),
                        ChildRef::Node(c) => c.any_marks(),
                    },
                };
                if summary != below {
                    return Err(format!(
                        "node 0x{base:x} (level {level}) slot {i}: summary {summary:?}, marks below {below:?}"
                    ));
                }
                if want < 64 {
                    let sbase = base + (u64::from(i) << slot_shift(level));
                    match n.child(usize::from(want)) {
                        ChildRef::Leaf(l) => {
                            l.check().map_err(|e| format!("leaf 0x{sbase:x}: {e}"))?
                        }
                        ChildRef::Node(c) => node(c, level - 1, sbase)?,
                    }
                }
            }
            Ok(())
        }
        match &self.root {
            None if self.height != 0 => Err(format!("no root at height {}", self.height)),
            None if self.index_limit != 0 => {
                Err(format!("limit {} without a root", self.index_limit))
            }
            None => Ok(()),
            Some(_) if self.index_limit != 1 << span_shift(self.height) => Err(format!(
                "limit {} at height {}",
                self.index_limit, self.height
            )),
            Some(_) if self.root_shift != slot_shift(self.height) => Err(format!(
                "root shift {} at height {}",
                self.root_shift, self.height
            )),
            Some(r) => node(r, self.height, 0),
        }
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

#[cfg(test)]
mod tests;
