//! The crate's error type. Guest mistakes are not errors (they are counted in `Outcome`); these
//! are host failures and invalid configuration.

use crate::tracker::TrackerError;

/// What can fail in the manager: the host refused something, or the configuration is invalid.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A region spec the manager cannot use (unaligned, empty, too large for its kind).
    #[error("region {index} at 0x{guest_addr:x} size 0x{size:x}: {what}")]
    InvalidRegion {
        /// Position of the region in the list given to the manager.
        index: usize,
        /// Guest physical address the region was to start at.
        guest_addr: u64,
        /// Size in bytes the region was given.
        size: u64,
        /// Which rule the region broke.
        what: &'static str,
    },
    /// Two regions share guest physical addresses.
    #[error("region at 0x{a_start:x}..0x{a_end:x} overlaps region at 0x{b_start:x}..0x{b_end:x}")]
    Overlap {
        /// Start of the first region (guest physical).
        a_start: u64,
        /// End (exclusive) of the first region.
        a_end: u64,
        /// Start of the second region.
        b_start: u64,
        /// End (exclusive) of the second region.
        b_end: u64,
    },
    /// The manager was given nothing to manage.
    #[error("no guest RAM regions given")]
    NoRegions,
    /// The kernel refused the memfd backing a shared region.
    #[error("creating memfd of 0x{size:x} bytes for region at 0x{guest_addr:x}: {source}")]
    Memfd {
        /// Guest physical address of the region.
        guest_addr: u64,
        /// Size in bytes asked for.
        size: u64,
        /// The kernel's error.
        source: std::io::Error,
    },
    /// The kernel refused to map a region's backing.
    #[error("mapping 0x{size:x} bytes for region at 0x{guest_addr:x}: {source}")]
    Mmap {
        /// Guest physical address of the region.
        guest_addr: u64,
        /// Size in bytes asked for.
        size: u64,
        /// vm-memory's error, with the kernel's underneath.
        source: vm_memory::mmap::MmapRegionError,
    },
    /// vm-memory refused the set of mapped regions.
    #[error("building guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestRegionCollectionError),
    /// KVM refused to register or remove a memory slot.
    #[error("KVM slot {slot} (guest 0x{guest_addr:x} size 0x{size:x}): {message}")]
    Slot {
        /// The KVM slot number.
        slot: u32,
        /// Guest physical address the slot maps.
        guest_addr: u64,
        /// Size of the slot in bytes.
        size: u64,
        /// What the slot mapper reported.
        message: String,
    },
    /// A system call that gives memory back to the host failed.
    #[error("{call} on guest 0x{guest_addr:x} size 0x{size:x}: {source}")]
    Discard {
        /// The call that failed (`madvise`, `fallocate`, `process_madvise`).
        call: &'static str,
        /// Guest physical address of the range.
        guest_addr: u64,
        /// Size of the range in bytes.
        size: u64,
        /// The kernel's error.
        source: std::io::Error,
    },
    /// The timerfd for deferred releases and compaction could not be created or armed.
    #[error("creating the discard timer (timerfd): {0}")]
    Timer(std::io::Error),
    /// The offline-page tracker refused an update (out of memory, or a range outside its space).
    #[error(transparent)]
    Tracker(#[from] TrackerError),
    /// An allocation for bookkeeping failed; the request is refused rather than aborting the VMM.
    #[error("out of memory queueing {what} ({bytes} bytes)")]
    NoMemory {
        /// What was being allocated.
        what: &'static str,
        /// How many bytes were asked for.
        bytes: usize,
    },
}
