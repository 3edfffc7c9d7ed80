//! The crate's error type. Guest mistakes are not errors (they are counted in `Outcome`); these
//! are host failures and invalid configuration.

use crate::tracker::TrackerError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("region {index} at 0x{guest_addr:x} size 0x{size:x}: {what}")]
    InvalidRegion {
        index: usize,
        guest_addr: u64,
        size: u64,
        what: &'static str,
    },
    #[error("region at 0x{a_start:x}..0x{a_end:x} overlaps region at 0x{b_start:x}..0x{b_end:x}")]
    Overlap {
        a_start: u64,
        a_end: u64,
        b_start: u64,
        b_end: u64,
    },
    #[error("no guest RAM regions given")]
    NoRegions,
    #[error("creating memfd of 0x{size:x} bytes for region at 0x{guest_addr:x}: {source}")]
    Memfd {
        guest_addr: u64,
        size: u64,
        source: std::io::Error,
    },
    #[error("mapping 0x{size:x} bytes for region at 0x{guest_addr:x}: {source}")]
    Mmap {
        guest_addr: u64,
        size: u64,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("building guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestRegionCollectionError),
    #[error("KVM slot {slot} (guest 0x{guest_addr:x} size 0x{size:x}): {message}")]
    Slot {
        slot: u32,
        guest_addr: u64,
        size: u64,
        message: String,
    },
    #[error("{call} on guest 0x{guest_addr:x} size 0x{size:x}: {source}")]
    Discard {
        call: &'static str,
        guest_addr: u64,
        size: u64,
        source: std::io::Error,
    },
    #[error("creating the discard timer (timerfd): {0}")]
    Timer(std::io::Error),
    #[error(transparent)]
    Tracker(#[from] TrackerError),
    #[error("out of memory queueing {what} ({bytes} bytes)")]
    NoMemory { what: &'static str, bytes: usize },
}
