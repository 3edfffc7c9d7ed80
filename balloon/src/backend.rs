//! What the devices ask of the host's memory manager, as two small traits.
//!
//! The devices never touch host mappings themselves: an inflate becomes one
//! [`BalloonBackend::inflate`] call per guest buffer, a virtio-mem PLUG one [`MemBackend::plug`]
//! call per request. The VMM passes the real memory manager (see [`crate::manager`]); tests pass
//! the recording fakes of `crate::testing`; the benchmark passes the real manager too. When the
//! host memory behind inflated pages is released, and when the manager tidies its bookkeeping,
//! is the manager's business: no call here is about it.
//!
//! Conventions: a [`Pfn`] is a 4 KiB guest page frame number whatever the guest's page size; a
//! [`PageRange`] is `count` consecutive frames starting at `start`; [`PageRanges`] are sorted,
//! disjoint runs inside guest RAM, normalised once by the device (all memory/'s types).

/// The page vocabulary is memory/'s: the devices hand the manager its own types.
pub use memory::{Outcome, PageRange, PageRanges, Pfn, RamMap, PAGE_SHIFT, PAGE_SIZE};

/// A host-side failure (the guest's request was fine).
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The memory manager refused or failed the request; its message says why.
    #[error("memory manager: {0}")]
    Manager(String),
}

/// The host side of virtio-balloon.
///
/// `Outcome::refused` includes the pages the device's normalising dropped as outside guest RAM
/// ([`PageRanges::outside_ram`]), so the device counts refusals in one place.
pub trait BalloonBackend: Send + Sync {
    /// The guest gave these pages up: mark them ballooned; their host backing is released
    /// (now, or soon after the ack, as the manager schedules it).
    fn inflate(&self, ranges: &PageRanges) -> Result<Outcome, BackendError>;
    /// The guest takes these pages back: mark them usable again.
    fn deflate(&self, ranges: &PageRanges) -> Result<Outcome, BackendError>;
    /// Free page reporting: the guest says these pages are free right now. Release their host
    /// backing without counting them as ballooned (the guest may reuse them without asking).
    fn report_free(&self, ranges: &PageRanges) -> Result<Outcome, BackendError>;
    /// The device was reset with pages still ballooned (driver unload, guest reboot): give every
    /// ballooned page back to the guest.
    fn deflate_all(&self) -> Result<Outcome, BackendError>;
}

/// The host side of virtio-mem. Ranges are whole device blocks inside the device's region.
pub trait MemBackend: Send + Sync {
    /// Make these blocks usable by the guest. All or nothing: on an error no block changed.
    fn plug(&self, range: PageRange) -> Result<(), BackendError>;
    /// The guest gave these blocks back: discard their backing and mark them offline. All or
    /// nothing, as `plug`.
    fn unplug(&self, range: PageRange) -> Result<(), BackendError>;
    /// The plugged pages of `range`, as sorted runs: the one record of which blocks are
    /// plugged (the device keeps no copy).
    fn plugged_runs(&self, range: PageRange) -> Vec<PageRange>;
}
