//! virtio-balloon (virtio 1.2 section 5.5), device side.
//!
//! - `mod.rs` (this file): spec constants, feature bits, the configuration the VMM gives, the
//!   guest-error type.
//! - [`device`]: the device state machine, config space and queue processing.
//! - [`event_handler`]: the glue to the VMM's event loop (`MutEventSubscriber`).
//! - [`stats`]: the statistics wire format and the latest values.
//! - [`metrics`]: counters the VMM reads.
//!
//! Conventions: "inflate" means the guest gives pages to the host, "deflate" the reverse; a PFN is
//! a 4 KiB frame number as the spec defines it for these queues, whatever the guest page size.

pub mod device;
pub mod event_handler;
pub mod metrics;
pub mod stats;

use std::time::Duration;

pub use device::Balloon;
pub use metrics::BalloonCounters;
pub use stats::{BalloonStats, StatTag};

/// Feature bits (virtio 1.2 section 5.5.3).
pub mod features {
    /// The guest tells the host before it uses deflated pages again.
    pub const MUST_TELL_HOST: u32 = 0;
    /// The statistics queue (statsq) is present.
    pub const STATS_VQ: u32 = 1;
    /// The guest may deflate on its own when it runs out of memory.
    pub const DEFLATE_ON_OOM: u32 = 2;
    /// Free page hinting (never offered: free page reporting covers it).
    pub const FREE_PAGE_HINT: u32 = 3;
    /// The guest poisons free pages with `poison_val` (never offered).
    pub const PAGE_POISON: u32 = 4;
    /// Free page reporting: the guest reports free pages on reporting_vq.
    pub const PAGE_REPORTING: u32 = 5;
    /// The modern (virtio 1.x) interface; always offered.
    pub const VERSION_1: u32 = virtio::VIRTIO_F_VERSION_1;
}

/// Largest number of PFNs accepted in one inflate or deflate buffer. Linux sends at most 256
/// (`VIRTIO_BALLOON_ARRAY_PFNS_MAX`); PFNs past this are refused and counted, which bounds the
/// work one notification can cause.
pub const MAX_PFNS_PER_BUFFER: usize = 256;

/// Queue size offered for every queue.
pub const QUEUE_SIZE: u16 = 256;

/// Config space layout (virtio 1.2 section 5.5.4): little-endian u32s.
pub mod config_offsets {
    /// num_pages: the target, written by the device.
    pub const NUM_PAGES: u64 = 0;
    /// actual: pages in the balloon, written by the driver.
    pub const ACTUAL: u64 = 4;
    /// free_page_hint_cmd_id (FREE_PAGE_HINT, not offered): read-only.
    pub const FREE_PAGE_HINT_CMD_ID: u64 = 8;
    /// poison_val (PAGE_POISON, not offered): treated as read-only.
    pub const POISON_VAL: u64 = 12;
    /// Size of the config space.
    pub const SIZE: u64 = 16;
}

/// What each queue is for. Queues are numbered by the negotiated features: inflateq, deflateq,
/// then statsq if STATS_VQ, then reporting_vq if PAGE_REPORTING (free_page_vq is never offered).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueRole {
    /// inflateq: PFNs the guest gives to the host.
    Inflate,
    /// deflateq: PFNs the guest takes back.
    Deflate,
    /// statsq: the guest's memory statistics.
    Stats,
    /// reporting_vq: free pages the guest reports.
    Reporting,
}

impl QueueRole {
    /// The queue's name in the spec, as logs and errors print it.
    pub fn name(self) -> &'static str {
        match self {
            QueueRole::Inflate => "inflateq",
            QueueRole::Deflate => "deflateq",
            QueueRole::Stats => "statsq",
            QueueRole::Reporting => "reporting_vq",
        }
    }
}

/// The queues present for a feature set, in index order.
pub fn queue_roles(features: u64) -> Vec<QueueRole> {
    let mut roles = vec![QueueRole::Inflate, QueueRole::Deflate];
    if features & (1 << features::STATS_VQ) != 0 {
        roles.push(QueueRole::Stats);
    }
    if features & (1 << features::PAGE_REPORTING) != 0 {
        roles.push(QueueRole::Reporting);
    }
    roles
}

/// How the VMM configures the balloon (`--balloon amount_mib=..,deflate_on_oom=..,
/// stats_interval_s=..,free_page_reporting=..`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Initial target, MiB of guest RAM to take away.
    pub amount_mib: u64,
    /// Offer STATS_VQ.
    pub stats: bool,
    /// How often the device asks for fresh statistics; zero keeps the guest's buffer without
    /// asking (the latest values stay those of the last report).
    pub stats_interval: Duration,
    /// Offer DEFLATE_ON_OOM: the guest may take pages back under memory pressure.
    pub deflate_on_oom: bool,
    /// Offer PAGE_REPORTING (free page reporting).
    pub free_page_reporting: bool,
    /// Size of every queue.
    pub queue_size: u16,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        Self {
            amount_mib: 0,
            stats: true,
            stats_interval: Duration::from_secs(1),
            deflate_on_oom: false,
            free_page_reporting: false,
            queue_size: QUEUE_SIZE,
        }
    }
}

impl BalloonConfig {
    /// The feature bits this configuration offers. VERSION_1 always: the virtio-mmio transport
    /// is the modern one only, and refuses a driver that does not accept it.
    pub fn features(&self) -> u64 {
        let mut f = 1u64 << features::VERSION_1;
        if self.stats {
            f |= 1 << features::STATS_VQ;
        }
        if self.deflate_on_oom {
            f |= 1 << features::DEFLATE_ON_OOM;
        }
        if self.free_page_reporting {
            f |= 1 << features::PAGE_REPORTING;
        }
        f
    }
}

/// Errors of the control API (the VMM's calls, not the guest's).
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// The target is more than the guest has.
    #[error("balloon target {mib} MiB is larger than guest RAM ({ram_mib} MiB)")]
    TargetTooLarge {
        /// The target asked for, MiB.
        mib: u64,
        /// Guest RAM, MiB.
        ram_mib: u64,
    },
    /// The target in 4 KiB pages does not fit the config space's u32.
    #[error("balloon target {mib} MiB does not fit the 32-bit num_pages field")]
    TargetOverflow {
        /// The target asked for, MiB.
        mib: u64,
    },
    /// A statistics interval was set but the device was created without statsq.
    #[error("statistics are not enabled (STATS_VQ was not offered)")]
    StatsDisabled,
    /// The configured queue size cannot be offered.
    #[error("queue size {0} is not a power of two in 1..=32768")]
    BadQueueSize(u16),
    /// An eventfd for the device could not be created.
    #[error("cannot set up the device: {0}")]
    Io(#[from] std::io::Error),
    /// The statistics timer could not be created or armed.
    #[error("stats timer: {0}")]
    Timer(#[from] vmm_sys_util::errno::Error),
}

/// A guest mistake: counted, logged (rate limited), skipped; the buffer is still returned.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum GuestFault {
    /// A descriptor the device must write is read-only, or the reverse.
    #[error("{queue}: descriptor {addr:#x} (len {len}) has the wrong direction")]
    WrongDirection {
        /// The queue's name.
        queue: &'static str,
        /// Guest address of the descriptor.
        addr: u64,
        /// Length of the descriptor.
        len: u32,
    },
    /// A buffer that is not a whole number of entries.
    #[error("{queue}: buffer length {len} is not a multiple of {unit}")]
    BadLength {
        /// The queue's name.
        queue: &'static str,
        /// The buffer's length in bytes.
        len: u32,
        /// Bytes per entry.
        unit: u32,
    },
    /// A buffer with more PFNs than one buffer may carry.
    #[error("{queue}: buffer carries {count} PFNs, more than {max}; {refused} refused")]
    TooManyPfns {
        /// The queue's name.
        queue: &'static str,
        /// PFNs the buffer carried.
        count: usize,
        /// PFNs accepted per buffer.
        max: usize,
        /// PFNs past `max`, refused.
        refused: usize,
    },
    /// PFNs that name no guest RAM; they are refused.
    #[error("{queue}: {count} PFNs outside guest RAM, first {first:#x}")]
    OutsideRam {
        /// The queue's name.
        queue: &'static str,
        /// How many.
        count: u64,
        /// The first of them, for the log.
        first: u64,
    },
    /// PFNs named twice in one buffer; the repeats are ignored.
    #[error("{queue}: {count} duplicate PFNs in one buffer")]
    Duplicates {
        /// The queue's name.
        queue: &'static str,
        /// How many repeats.
        count: u64,
    },
    /// Deflated PFNs that were not in the balloon.
    #[error("deflateq: {count} PFNs were not inflated")]
    NotInflated {
        /// How many.
        count: u64,
    },
    /// A descriptor whose buffer lies outside guest memory.
    #[error("{queue}: descriptor {addr:#x} (len {len}) is not in guest memory")]
    Unreadable {
        /// The queue's name.
        queue: &'static str,
        /// Guest address of the buffer.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A chain with no descriptor the device can use.
    #[error("{queue}: buffer without a usable descriptor")]
    EmptyBuffer {
        /// The queue's name.
        queue: &'static str,
    },
    /// A statistics buffer the device cannot parse.
    #[error("statsq: stats buffer of {len} bytes ({reason})")]
    BadStatsBuffer {
        /// Its length in bytes.
        len: u32,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The driver wrote a field only the device writes.
    #[error("config write of {len} bytes at offset {offset:#x} touches read-only fields")]
    ReadOnlyConfig {
        /// Offset into the config space.
        offset: u64,
        /// Bytes written.
        len: usize,
    },
    /// A reported free range that is not whole 4 KiB pages.
    #[error("reporting_vq: range {addr:#x}+{len:#x} is not 4 KiB aligned")]
    UnalignedReport {
        /// Guest address of the range.
        addr: u64,
        /// Its length in bytes.
        len: u32,
    },
    /// The avail ring cannot be read (bad index, ring outside memory); the queue is skipped.
    #[error("{queue}: avail ring is unusable ({reason})")]
    BrokenQueue {
        /// The queue's name.
        queue: &'static str,
        /// What virtio-queue reported.
        reason: String,
    },
}

impl GuestFault {
    /// Index of the kind, for rate-limited logging.
    pub fn kind(&self) -> usize {
        match self {
            GuestFault::WrongDirection { .. } => 0,
            GuestFault::BadLength { .. } => 1,
            GuestFault::TooManyPfns { .. } => 2,
            GuestFault::OutsideRam { .. } => 3,
            GuestFault::Duplicates { .. } => 4,
            GuestFault::NotInflated { .. } => 5,
            GuestFault::Unreadable { .. } => 6,
            GuestFault::EmptyBuffer { .. } => 7,
            GuestFault::BadStatsBuffer { .. } => 8,
            GuestFault::ReadOnlyConfig { .. } => 9,
            GuestFault::UnalignedReport { .. } => 10,
            GuestFault::BrokenQueue { .. } => 11,
        }
    }
}

/// Number of [`GuestFault`] kinds.
pub const FAULT_KINDS: usize = 12;
