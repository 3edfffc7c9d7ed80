//! Counters the VMM reads (API, Prometheus). Every guest mistake lands in one of them; every
//! counter is exported under its field name ([`BalloonCounters::named`]).

/// A snapshot of the balloon's counters. Pages are 4 KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BalloonCounters {
    /// Pages that went from usable to ballooned.
    pub inflated_pages: u64,
    /// Pages that went from ballooned back to usable.
    pub deflated_pages: u64,
    /// Inflate or deflate buffers processed (returned to the guest).
    pub inflate_buffers: u64,
    /// Deflate buffers processed (returned to the guest).
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

impl BalloonCounters {
    /// Every counter with its field name, for the VMM's metrics.
    pub fn named(&self) -> [(&'static str, u64); 16] {
        [
            ("inflated_pages", self.inflated_pages),
            ("deflated_pages", self.deflated_pages),
            ("inflate_buffers", self.inflate_buffers),
            ("deflate_buffers", self.deflate_buffers),
            ("refused_pfns", self.refused_pfns),
            ("duplicate_pfns", self.duplicate_pfns),
            ("reinflated_pfns", self.reinflated_pfns),
            ("deflate_not_inflated_pfns", self.deflate_not_inflated_pfns),
            ("malformed_buffers", self.malformed_buffers),
            ("config_writes_refused", self.config_writes_refused),
            ("stats_updates", self.stats_updates),
            ("stats_requests", self.stats_requests),
            ("reports", self.reports),
            ("reported_bytes_freed", self.reported_bytes_freed),
            ("backend_errors", self.backend_errors),
            ("config_interrupts", self.config_interrupts),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field is in `named` once (a new field breaks this literal until it is added).
    #[test]
    fn every_counter_is_named() {
        let c = BalloonCounters {
            inflated_pages: 1,
            deflated_pages: 2,
            inflate_buffers: 3,
            deflate_buffers: 4,
            refused_pfns: 5,
            duplicate_pfns: 6,
            reinflated_pfns: 7,
            deflate_not_inflated_pfns: 8,
            malformed_buffers: 9,
            config_writes_refused: 10,
            stats_updates: 11,
            stats_requests: 12,
            reports: 13,
            reported_bytes_freed: 14,
            backend_errors: 15,
            config_interrupts: 16,
        };
        let mut values: Vec<u64> = c.named().iter().map(|(_, v)| *v).collect();
        values.sort_unstable();
        assert_eq!(values, (1..=16).collect::<Vec<u64>>());
    }
}
