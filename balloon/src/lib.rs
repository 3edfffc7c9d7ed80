//! Guest-cooperative memory devices: virtio-balloon (issue 3) and virtio-mem (issue 4).
//!
//! Layout:
//! - [`backend`]: the traits the devices call to change host memory, and the page types.
//! - [`balloon`](mod@balloon): the virtio-balloon device (constants, device, event-loop glue, stats, counters).
//! - [`mem`]: the virtio-mem device.
//! - [`ranges`]: pure helpers turning guest input into sorted, coalesced ranges inside RAM.
//! - [`manager`]: the real backends, memory/'s `MemoryManager` behind a `Mutex`.
//! - [`testing`]: a test driver writing real split virtqueues into guest memory, and fake
//!   backends that record calls and enforce guest-RAM bounds (used by tests, fuzz and benches).
//!
//! Both devices are `virtio::VirtioDevice`s and `event_manager::MutEventSubscriber`s. The VMM
//! holds each as `Arc<Mutex<_>>`, gives one clone to the virtio-mmio transport and one to the
//! event manager.

pub mod backend;
pub mod balloon;
pub mod manager;
pub mod mem;
pub mod ranges;
mod ratelimit;
pub mod testing;

pub use backend::{BackendError, BalloonBackend, MemBackend, Outcome, PageRange, Pfn};
pub use balloon::{
    Balloon, BalloonConfig, BalloonCounters, BalloonError, BalloonStats, StatTag,
    COMPACT_IDLE_DELAY, RELEASE_BATCH_PAGES, RELEASE_IDLE_DELAY,
};
pub use mem::{MemConfig, MemCounters, MemError, MemState, VirtioMem};
