//! Counters the VMM reads (API, Prometheus). Every guest mistake lands in one of them.

/// A snapshot of the balloon's counters. Pages are 4 KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BalloonCounters {
    /// Pages that went from usable to ballooned.
    pub inflated_pages: u64,
    /// Pages that went from ballooned back to usable.
    pub deflated_pages: u64,
    /// Inflate or deflate buffers processed (returned to the guest).
    pub inflate_buffers: u64,
    pub deflate_buffers: u64,
    /// PFNs refused: outside guest RAM, past [`super::MAX_PFNS_PER_BUFFER`], or refused by the
    /// backend.
    pub refused_pfns: u64,
    /// PFNs repeated within one buffer.
    pub duplicate_pfns: u64,
    /// PFNs inflated while already ballooned.
    pub reinflated_pfns: u64,
    /// PFNs deflated that were not ballooned.
    pub deflate_not_inflated_pfns: u64,
    /// Descriptors or buffers that were malformed (direction, length, address, empty chain, stats
    /// buffer of a silly length, unaligned report).
    pub malformed_buffers: u64,
    /// Driver writes to read-only config fields.
    pub config_writes_refused: u64,
    /// Statistics buffers received.
    pub stats_updates: u64,
    /// Times the device asked the guest for fresh statistics.
    pub stats_requests: u64,
    /// Free page reports processed.
    pub reports: u64,
    /// Bytes whose backing a free page report released.
    pub reported_bytes_freed: u64,
    /// Host-side failures of the backend (the guest did nothing wrong).
    pub backend_errors: u64,
    /// Config-change interrupts raised.
    pub config_interrupts: u64,
}
