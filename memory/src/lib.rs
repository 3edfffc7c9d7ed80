//! Host-side guest-memory manager: which guest pages are offline and why (the [`tracker`]), and
//! the [`MemoryManager`] that owns guest RAM, gives the backing of offline pages back to the host
//! and brings it back. No KVM and no virtio here: the hypervisor is reached through
//! [`SlotMapper`], so everything is tested and benchmarked anywhere. docs/architecture.md shows
//! where it sits in a request's path.

mod error;
mod manager;
mod ranges;
mod sys;
pub mod tracker;
mod types;
pub mod units;

pub use error::Error;
#[cfg(any(test, feature = "testing"))]
pub use manager::schedule::ManualClock;
pub use manager::schedule::{
    Clock, SystemClock, COMPACT_IDLE_DELAY, RELEASE_BATCH_PAGES, RELEASE_IDLE_DELAY,
    RELEASE_RETRY_DELAY,
};
pub use manager::{MemoryManager, SlotMapper, Tick};
pub use ranges::{PageRanges, RamMap};
pub use types::*;
