//! What the devices ask of the host's memory manager, as two small traits.
//!
//! The devices never touch host mappings themselves: an inflate becomes one
//! [`BalloonBackend::inflate`] call per guest buffer, a virtio-mem PLUG one [`MemBackend::plug`]
//! call per request. The VMM passes the real memory manager (see [`crate::manager`]); tests pass
//! the recording fakes of [`crate::testing`]; the benchmark passes the real manager too.
//!
//! Conventions in this file: a [`Pfn`] is a 4 KiB guest page frame number whatever the guest's
//! page size; a [`PageRange`] is `count` consecutive frames starting at `start`.

use std::fmt;

use vm_memory::GuestAddress;

/// Shift from a page frame number to a guest physical address (4 KiB pages).
pub const PAGE_SHIFT: u32 = 12;
/// Bytes per page frame.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// A guest page frame number in 4 KiB units.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pfn(pub u64);

impl Pfn {
    /// The frame holding guest physical address `addr`.
    pub fn containing(addr: GuestAddress) -> Self {
        Pfn(addr.0 >> PAGE_SHIFT)
    }

    /// The guest physical address of the first byte of the frame (saturates on absurd PFNs).
    pub fn addr(self) -> GuestAddress {
        GuestAddress(self.0.checked_shl(PAGE_SHIFT).unwrap_or(u64::MAX))
    }
}

impl fmt::Display for Pfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// `count` consecutive page frames from `start`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageRange {
    pub start: Pfn,
    pub count: u64,
}

impl PageRange {
    pub fn new(start: u64, count: u64) -> Self {
        PageRange {
            start: Pfn(start),
            count,
        }
    }

    /// The frame just past the range (saturating).
    pub fn end(&self) -> u64 {
        self.start.0.saturating_add(self.count)
    }

    /// Size in bytes (saturating).
    pub fn bytes(&self) -> u64 {
        self.count.saturating_mul(PAGE_SIZE)
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether `pfn` lies in the range.
    pub fn contains(&self, pfn: u64) -> bool {
        pfn >= self.start.0 && pfn < self.end()
    }
}

impl fmt::Display for PageRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PFN {:#x}..{:#x}", self.start.0, self.end())
    }
}

/// What a batch did, in pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Pages whose state changed (went offline on inflate, online on deflate, were discarded on a
    /// free-page report).
    pub changed: u64,
    /// Pages the backend would not touch (outside guest RAM, in a region it does not manage).
    pub refused: u64,
    /// Pages already in the asked state (inflated twice, deflated without being inflated, reported
    /// free while ballooned).
    pub unchanged: u64,
}

impl Outcome {
    pub fn total(&self) -> u64 {
        self.changed + self.refused + self.unchanged
    }
}

impl std::ops::AddAssign for Outcome {
    fn add_assign(&mut self, o: Outcome) {
        self.changed += o.changed;
        self.refused += o.refused;
        self.unchanged += o.unchanged;
    }
}

/// A host-side failure (the guest's request was fine).
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("discarding {range} (host {host_addr:#x}, {len} bytes) failed: {source}")]
    Discard {
        range: PageRange,
        host_addr: u64,
        len: u64,
        source: std::io::Error,
    },
    #[error("{range} is not backed by guest memory the backend manages")]
    NotManaged { range: PageRange },
    #[error("memory manager: {0}")]
    Manager(String),
}

/// The host side of virtio-balloon.
///
/// Every range passed in lies inside guest RAM (the device has already refused the rest), is
/// sorted, non-overlapping and coalesced. Implementations count what they did in [`Outcome`].
pub trait BalloonBackend: Send + Sync {
    /// The guest gave these pages up: mark them ballooned and release their host backing.
    fn inflate(&self, ranges: &[PageRange]) -> Result<Outcome, BackendError>;
    /// The guest takes these pages back: mark them usable again.
    fn deflate(&self, ranges: &[PageRange]) -> Result<Outcome, BackendError>;
    /// Free page reporting: the guest says these pages are free right now. Release their host
    /// backing without counting them as ballooned (the guest may reuse them without asking).
    fn report_free(&self, ranges: &[PageRange]) -> Result<Outcome, BackendError>;
    /// The device was reset with pages still ballooned (driver unload, guest reboot): give every
    /// ballooned page back to the guest.
    fn deflate_all(&self) -> Result<Outcome, BackendError>;
    /// Release the host backing that `inflate` only queued. The device calls it after an ack
    /// (used ring written, guest interrupted), in batches: once 16 MiB of inflated pages gathered,
    /// when the inflate queue has been idle for a short delay, and on reset (before
    /// `deflate_all`). The guest runs on while this happens. A page deflated since it was queued
    /// must not be released. Returns the pages released.
    fn release_pending(&self) -> Result<u64, BackendError> {
        Ok(0)
    }
}

/// The host side of virtio-mem. Ranges are whole device blocks inside the device's region.
pub trait MemBackend: Send + Sync {
    /// Make these blocks usable by the guest (online in the tracker).
    fn plug(&self, range: PageRange) -> Result<(), BackendError>;
    /// The guest gave these blocks back: discard their backing and mark them offline.
    fn unplug(&self, range: PageRange) -> Result<(), BackendError>;
}
