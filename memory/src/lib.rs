//! Host-side guest-memory manager: which guest pages are offline and why (the [`tracker`]), and
//! the [`MemoryManager`] that owns guest RAM, gives the backing of offline pages back to the host
//! and brings it back. No KVM and no virtio here: the hypervisor is reached through
//! [`SlotMapper`], so everything is tested and benchmarked anywhere.

mod error;
mod manager;
mod sys;
pub mod tracker;
mod types;

pub use error::Error;
pub use manager::{MemoryManager, SlotMapper};
pub use types::*;
