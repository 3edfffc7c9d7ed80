//! Memory statistics (virtio 1.2 section 5.5.6.3): the driver keeps one buffer of packed
//! `{le16 tag; le64 val}` entries on statsq; the device returns it to ask for fresh values.

use std::time::{Duration, Instant};

/// Bytes per statistics entry on the wire.
pub const ENTRY_SIZE: usize = 10;
/// Entries read from one buffer at most (16 tags are defined; a driver repeating tags gets some
/// slack, anything longer is truncated and counted).
pub const MAX_ENTRIES: usize = 64;

/// Statistics tags: 0..=9 from the spec, 10..=15 added by Linux 6.12.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum StatTag {
    /// Memory swapped in (bytes).
    SwapIn = 0,
    /// Memory swapped out (bytes).
    SwapOut = 1,
    /// Major page faults.
    MajorFaults = 2,
    /// Minor page faults.
    MinorFaults = 3,
    /// Memory the guest does not use at all (bytes).
    FreeMemory = 4,
    /// Memory the guest can use (bytes).
    TotalMemory = 5,
    /// Memory available for new work without swapping, as /proc/meminfo's MemAvailable (bytes).
    AvailableMemory = 6,
    /// Disk caches the guest could drop (bytes).
    DiskCaches = 7,
    /// Successful hugetlb page allocations.
    HugetlbAllocations = 8,
    /// Failed hugetlb page allocations.
    HugetlbFailures = 9,
    /// Processes killed by the guest's OOM killer.
    OomKills = 10,
    /// Allocations that stalled for reclaim.
    AllocStalls = 11,
    /// Pages scanned by background reclaim (kswapd).
    AsyncScans = 12,
    /// Pages scanned by direct reclaim.
    DirectScans = 13,
    /// Pages reclaimed in the background.
    AsyncReclaims = 14,
    /// Pages reclaimed directly by allocating tasks.
    DirectReclaims = 15,
}

impl StatTag {
    /// Every tag, in wire order (index = tag number).
    pub const ALL: [StatTag; 16] = [
        StatTag::SwapIn,
        StatTag::SwapOut,
        StatTag::MajorFaults,
        StatTag::MinorFaults,
        StatTag::FreeMemory,
        StatTag::TotalMemory,
        StatTag::AvailableMemory,
        StatTag::DiskCaches,
        StatTag::HugetlbAllocations,
        StatTag::HugetlbFailures,
        StatTag::OomKills,
        StatTag::AllocStalls,
        StatTag::AsyncScans,
        StatTag::DirectScans,
        StatTag::AsyncReclaims,
        StatTag::DirectReclaims,
    ];

    /// The tag for a wire value, or `None` for tags this device does not know.
    pub fn from_wire(tag: u16) -> Option<StatTag> {
        StatTag::ALL.get(usize::from(tag)).copied()
    }
}

/// The latest statistics the guest reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalloonStats {
    /// Value per tag, indexed by the tag number; `None` if the guest did not report it.
    pub values: [Option<u64>; 16],
    /// When the device received them.
    pub received_at: Instant,
    /// The driver's `actual` (pages in its balloon) when they arrived. With deflate-on-OOM Linux
    /// keeps ballooned pages in its total memory, counted as used: the working set is the total
    /// minus available minus these, all of one moment.
    pub actual_pages: u32,
    /// Entries with tags the device does not know (ignored).
    pub unknown_tags: u32,
}

impl BalloonStats {
    /// The latest value for `tag`, if the guest reported it.
    pub fn get(&self, tag: StatTag) -> Option<u64> {
        self.values[tag as usize]
    }

    /// How old the values are.
    pub fn age(&self) -> Duration {
        self.received_at.elapsed()
    }

    /// Parses packed entries; a trailing partial entry is ignored (the caller counts it). The last
    /// value of a repeated tag wins.
    /// `actual_pages` is the balloon's size at that moment.
    pub fn parse(bytes: &[u8], received_at: Instant, actual_pages: u32) -> Self {
        let mut values = [None; 16];
        let mut unknown_tags = 0;
        for entry in bytes.chunks_exact(ENTRY_SIZE) {
            let tag = u16::from_le_bytes([entry[0], entry[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&entry[2..10]);
            match StatTag::from_wire(tag) {
                Some(t) => values[t as usize] = Some(u64::from_le_bytes(v)),
                None => unknown_tags += 1,
            }
        }
        BalloonStats {
            values,
            received_at,
            actual_pages,
            unknown_tags,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_and_ignores_unknown() {
        let mut b = Vec::new();
        for (tag, val) in [(4u16, 100u64), (99, 5), (15, 7), (4, 200)] {
            b.extend_from_slice(&tag.to_le_bytes());
            b.extend_from_slice(&val.to_le_bytes());
        }
        b.extend_from_slice(&[1, 2, 3]);
        let s = BalloonStats::parse(&b, Instant::now(), 0);
        assert_eq!(s.get(StatTag::FreeMemory), Some(200));
        assert_eq!(s.get(StatTag::DirectReclaims), Some(7));
        assert_eq!(s.get(StatTag::SwapIn), None);
        assert_eq!(s.unknown_tags, 1);
    }
}
