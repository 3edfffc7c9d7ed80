//! What the devices ask of the host's memory manager, as two small traits.
//!
//! The devices never touch host mappings themselves: an inflate becomes one
//! [`BalloonBackend::inflate`] call per guest buffer, a virtio-mem PLUG one [`MemBackend::plug`]
//! call per request. The VMM passes the real memory manager (see [`crate::manager`]); tests pass
//! the recording fakes of [`crate::testing`]; the benchmark passes the real manager too.
//!
//! Conventions: a [`Pfn`] is a 4 KiB guest page frame number whatever the guest's page size; a
//! [`PageRange`] is `count` consecutive frames starting at `start` (both memory/'s types).

/// The page vocabulary is memory/'s: the devices hand the manager its own types.
pub use memory::{Outcome, PageRange, Pfn, PAGE_SHIFT, PAGE_SIZE};

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
    /// The balloon has been quiet for a while ([`crate::balloon::COMPACT_IDLE_DELAY`] after
    /// its last inflate, deflate or release): shrink the bookkeeping of ballooned pages.
    /// Returns how many units (tracker leaves) were compacted.
    fn compact(&self) -> u64 {
        0
    }
}

/// The host side of virtio-mem. Ranges are whole device blocks inside the device's region.
pub trait MemBackend: Send + Sync {
    /// Make these blocks usable by the guest (online in the tracker).
    fn plug(&self, range: PageRange) -> Result<(), BackendError>;
    /// The guest gave these blocks back: discard their backing and mark them offline.
    fn unplug(&self, range: PageRange) -> Result<(), BackendError>;
}
