//! The offline-page tracker: the set of guest pages that are offline, each with its marks (why
//! it is offline, whether its host backing was released), in a radix tree after Linux's xarray,
//! adapted to a set of page numbers.
//!
//! # Conventions in this module
//! - `index`, `start`, `count`: a page frame number (4 KiB pages) and a number of pages, plain
//!   `u64` as in xarray (the memory manager wraps them in `Pfn`/`PageRange`); `end` is
//!   `start + count`.
//! - `level`: 0 is a leaf (4096 pages); a node at `level >= 1` has 64 slots of
//!   `1 << slot_shift(level)` pages each. The root's level is the tree's `height`.
//! - `base`: the first page of the node, slot or leaf being worked on; `lo..hi`: a half-open
//!   range of pages relative to it (`a..b`: absolute pages, in short helpers).
//! - `i`: a slot index (0..64) and `bit` its bit (`1 << i`) in a node's bitmaps; `sshift`,
//!   `sspan`, `sbase`: log2 of the pages one slot covers, that many pages, and the slot's first
//!   page; `s_lo..s_hi`: the part of `lo..hi` inside the slot, relative to `sbase`.
//! - slot byte (`byte`): what a slot holds, in one byte: `SLOT_EMPTY`, `SLOT_FULL`, the index
//!   (`idx`) of its child in the node's child vector, or `SLOT_SPARSE` plus the index of its
//!   sparse leaf.
//! - `k`: a mark index (`Mark as usize`); `m`, `marks`: a set of marks ([`Marks`]).
//! - `op`: the update being applied (`Op`); `delta`: the change it made in pages and in pages
//!   carrying each mark (`Delta`); `need`: what it will allocate (`Need`); `pool`: the
//!   spares allocated ahead that it draws from.
//!
//! # Shape
//! Every node slot is *empty*, *full* (a multi-index entry: every page of the slot's aligned
//! range is present with the same marks, at no cost beyond the slot's bits), or holds a child:
//! a node, or at level 1 a bitmap leaf (`leaf.rs`) or a sparse leaf (`sparse.rs`, made only by
//! [`Tracker::compact`]). A node keeps `present`, `full` and one summary bitmap per mark: for a
//! full slot the mark bit says whether its pages carry the mark, for a child whether any page
//! below does, so a search for a mark never enters a subtree without it. Children are stored
//! densely in slot order, and a slot byte per slot says where: a lookup reads one byte per
//! level. A node is 160 bytes, so a fully offline aligned 1 GiB range costs 160 bytes.
//!
//! # Where things are
//! `node.rs`: nodes and their slot bytes; `leaf.rs`, `sparse.rs`: the two kinds of leaf;
//! `pool.rs`: what an update will allocate, and spares allocated ahead; `update.rs`: page and
//! range updates with their single-leaf fast paths; `short_range.rs`: ranges within one
//! level-1 node; `general.rs`: the two-phase path for everything else; `compact.rs`: sparse
//! leaves made from bitmap leaves; `lookup.rs`: point lookups and the lookup cursor;
//! `cursor.rs`, `runs.rs`: in-order walks and runs; `check.rs`: `check_invariants`, for tests;
//! `fbox.rs`: boxes whose allocation can fail.
//!
//! # Errors and allocation
//! Every update first works out exactly which nodes, leaves and mark bitmaps it will need,
//! allocates them fallibly (and reserves room in the child vectors it will grow), and only
//! then changes the tree. A failed allocation returns [`TrackerError::NoMemory`] with the tree
//! untouched, so the caller may retry (the spares allocated before the failure stay in the pool
//! and serve the retry). An index past [`MAX_INDEX`] is refused by updates
//! ([`TrackerError::OutOfRange`], nothing changed) and absent for reads.
//!
//! # Locking
//! The tracker is not internally locked and has no interior mutability: updates take
//! `&mut self` and reads `&self`, so a caller that shares it between threads holds its own
//! lock around every call (the VMM keeps it inside the memory manager, behind the manager's
//! mutex). No function blocks or sleeps; updates may call the allocator.

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
pub use runs::{MarkedRuns, Run, Runs};

use fbox::{AllocError, FBox};
use leaf::LEAF_SHIFT;
use node::Node;
use pool::Pool;

/// Number of marks a page can carry.
pub const MARK_COUNT: usize = 3;

/// Largest page frame number the tracker accepts: 52 bits of PFN cover the whole 64-bit guest
/// physical address space at 4 KiB pages.
pub const MAX_INDEX: u64 = (1 << 52) - 1;

/// Log2 of the slots of a node.
const SLOT_SHIFT: u32 = 6;

/// The slot byte of an empty slot.
const SLOT_EMPTY: u8 = 0xff;

/// The slot byte of a full slot (a multi-index entry). Child indexes are below 64.
const SLOT_FULL: u8 = 0xfe;

/// The slot byte of a sparse leaf: this plus its index in the node's sparse leaves.
const SLOT_SPARSE: u8 = 64;

/// Height of a tree that holds [`MAX_INDEX`]: 12 + 6 * 7 = 54 bits of index, at least 52.
const MAX_HEIGHT: u32 = 7;

/// `slot_shift` of a root at level 2 and at level 3 (guests up to 64 GiB and up to 4 TiB): the
/// walks of the fast paths are unrolled for these.
const LEVEL2_SLOT_SHIFT: u32 = slot_shift(2);
const LEVEL3_SLOT_SHIFT: u32 = slot_shift(3);

/// Why a tracked page is offline, or what has been done to it. A page carries any set of
/// marks ([`Marks`]); its value is the mark's bit index in that set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mark {
    /// The guest gave the page to the balloon.
    Ballooned = 0,
    /// The page is in a hot-add region and not plugged.
    Unplugged = 1,
    /// The host backing of the page has been released.
    Discarded = 2,
}

/// A set of [`Mark`]s: bit `k` for the mark whose value is `k`. Only those bits can be set
/// (a set comes from marks, `of` or `from`, or from bits by `from_bits_truncate`, which
/// drops the others), so every page's marks read back the same whichever path stored them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Marks(u8);

impl Marks {
    /// No mark.
    pub const NONE: Marks = Marks(0);

    /// Every mark.
    pub const ALL: Marks = Marks((1 << MARK_COUNT) - 1);

    /// The set of `marks`.
    pub fn of(marks: &[Mark]) -> Marks {
        marks.iter().fold(Marks::NONE, |m, &k| m.with(k as usize))
    }

    /// The set whose mark of index `k` is there if bit `k` of `bits` is set; the bits past
    /// [`MARK_COUNT`] are dropped.
    pub const fn from_bits_truncate(bits: u8) -> Marks {
        Marks(bits & Marks::ALL.0)
    }

    /// The set as bits, bit `k` for the mark of index `k`.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Whether the set has the mark of index `k` (false for `k` past [`MARK_COUNT`]).
    #[inline]
    pub fn has(self, k: usize) -> bool {
        k < MARK_COUNT && self.0 & (1 << k) != 0
    }

    /// Whether the set has `mark`.
    #[inline]
    pub fn contains(self, mark: Mark) -> bool {
        self.has(mark as usize)
    }

    /// The set with the mark of index `k` added (unchanged for `k` past [`MARK_COUNT`]).
    #[inline]
    pub fn with(self, k: usize) -> Marks {
        if k < MARK_COUNT {
            Marks(self.0 | (1 << k))
        } else {
            self
        }
    }

    /// The set with the mark of index `k` taken out.
    #[inline]
    pub fn without(self, k: usize) -> Marks {
        if k < MARK_COUNT {
            Marks(self.0 & !(1 << k))
        } else {
            self
        }
    }
}

impl From<Mark> for Marks {
    fn from(m: Mark) -> Marks {
        Marks(1 << m as usize)
    }
}

/// Errors of the tracker's updates. The tree is unchanged whenever one is returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TrackerError {
    /// The range `start..start+count` (pages) goes past [`MAX_INDEX`] (`max`).
    #[error("page range 0x{start:x}+0x{count:x} goes past the largest trackable PFN 0x{max:x}")]
    OutOfRange {
        /// First page of the range.
        start: u64,
        /// Pages in the range.
        count: u64,
        /// The largest page the tracker accepts.
        max: u64,
    },
    /// The allocator refused `bytes` bytes the update needed; retrying later may succeed.
    #[error("out of memory growing the offline-page tracker ({bytes} bytes requested)")]
    NoMemory {
        /// The size of the allocation that failed.
        bytes: usize,
    },
}

impl From<AllocError> for TrackerError {
    fn from(e: AllocError) -> Self {
        TrackerError::NoMemory { bytes: e.bytes }
    }
}

/// The bits below bit `i` (`i < 64`): the slots before slot `i`.
#[inline]
fn mask_below(i: u32) -> u64 {
    (1u64 << i) - 1
}

/// Log2 of the pages covered by one slot of a node at `level` (>= 1).
#[inline]
const fn slot_shift(level: u32) -> u32 {
    LEAF_SHIFT + SLOT_SHIFT * (level - 1)
}

/// Log2 of the pages covered by a node at `level` (0 = leaf).
#[inline]
const fn span_shift(level: u32) -> u32 {
    LEAF_SHIFT + SLOT_SHIFT * level
}

/// Slots `first..=last` of a node, as a mask.
#[inline]
fn slot_range_mask(first: u32, last: u32) -> u64 {
    leaf::word_mask(first, last + 1)
}

/// The set of offline pages, each with its marks. See the module documentation for its
/// shape, its errors and its locking (none inside: the owner's).
#[derive(Debug, Default)]
pub struct Tracker {
    root: Option<FBox<Node>>,
    /// The root's level (0 without a root).
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
    /// An empty tracker. Allocates nothing until the first insert.
    pub fn new() -> Tracker {
        Tracker::default()
    }

    /// Returns the number of tracked pages. Cost: O(1).
    pub fn len(&self) -> u64 {
        self.pages_by_marks
            .iter()
            .fold(self.pages, |n, &c| n.wrapping_add(c))
    }

    /// Returns whether no page is tracked. Cost: O(1).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns the number of tracked pages carrying `mark`. Cost: O(1).
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

    /// Returns the exact bytes of heap the tracker holds: its nodes, leaves, mark bitmaps,
    /// child vectors and reserved spares (the allocator's own bookkeeping not included).
    /// Cost: a walk of every node, O(heap); for statistics, not for every request.
    pub fn heap_bytes(&self) -> usize {
        self.root
            .as_ref()
            .map_or(0, |r| std::mem::size_of::<Node>() + r.heap_bytes())
            + self.pool.heap_bytes()
    }
}

#[cfg(test)]
mod tests;
