//! Guest-cooperative memory devices: virtio-balloon and virtio-mem.
//!
//! Layout:
//! - [`backend`]: the traits the devices call to change host memory, and the page types.
//! - [`balloon`](mod@balloon): the virtio-balloon device (constants, device, event-loop glue, stats, counters).
//! - [`mem`]: the virtio-mem device.
//! - [`manager`]: the real backends, memory/'s `MemoryManager` behind a `Mutex`.
//! - `testing` (feature `testing`): a test driver writing real split virtqueues into guest
//!   memory, and fake backends that record calls and enforce guest-RAM bounds (used by tests,
//!   fuzz targets, the benchmark and the examples).
//!
//! Both devices are `virtio::VirtioDevice`s and `event_manager::MutEventSubscriber`s. The VMM
//! holds each as `Arc<Mutex<_>>`, gives one clone to the virtio-mmio transport and one to the
//! event manager. docs/architecture.md follows a request through them.

pub mod backend;
pub mod balloon;
pub mod manager;
pub mod mem;
mod ratelimit;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use backend::{BackendError, BalloonBackend, MemBackend, Outcome, PageRange, PageRanges, Pfn};
pub use balloon::{Balloon, BalloonConfig, BalloonCounters, BalloonError, BalloonStats, StatTag};
pub use mem::{MemConfig, MemCounters, MemError, MemState, VirtioMem};
