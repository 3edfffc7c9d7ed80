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

mod compact;
mod cursor;
mod fbox;
mod general;
mod leaf;
mod lookup;
mod node;
mod pool;
mod runs;
mod short_range;
mod sparse;
mod update;

#[cfg(any(test, feature = "testing"))]
mod check;

pub use cursor::Chunk;
pub use lookup::LookupCursor;
pub use pool::Need;
pub use runs::{MarkedRuns, Run, Runs};

use fbox::{AllocError, FBox};
use leaf::LEAF_SHIFT;
use node::Node;
use pool::Pool;

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
}

#[cfg(test)]
mod tests;
