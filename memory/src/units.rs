//! Units of guest memory: pages, MiB and bytes, and the conversions between them.
//!
//! Every conversion that can overflow is checked here, once, so the devices and the VMM do not
//! each re-declare `PAGES_PER_MIB` or shift by 12 or 20 by hand.

/// Size of a guest page frame (4 KiB, whatever page size the guest uses).
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;
/// Bytes in a MiB.
pub const MIB: u64 = 1 << 20;
/// log2 of [`MIB`].
pub const MIB_SHIFT: u32 = 20;
/// Pages in a MiB.
pub const PAGES_PER_MIB: u64 = MIB / PAGE_SIZE;
/// Size of a huge page on hugetlbfs-backed regions.
pub const HUGE_PAGE_SIZE: u64 = 2 * MIB;

/// `mib` MiB in bytes, `None` on overflow.
pub fn mib_to_bytes(mib: u64) -> Option<u64> {
    mib.checked_mul(MIB)
}

/// `mib` MiB in pages, `None` on overflow.
pub fn mib_to_pages(mib: u64) -> Option<u64> {
    mib.checked_mul(PAGES_PER_MIB)
}

/// `pages` pages in bytes, `None` on overflow.
pub fn pages_to_bytes(pages: u64) -> Option<u64> {
    pages.checked_mul(PAGE_SIZE)
}

/// `pages` pages in whole MiB, rounded down.
pub fn pages_to_mib(pages: u64) -> u64 {
    pages / PAGES_PER_MIB
}

/// `bytes` in whole pages, rounded down.
pub fn bytes_to_pages(bytes: u64) -> u64 {
    bytes >> PAGE_SHIFT
}

/// `bytes` in whole MiB, rounded down.
pub fn bytes_to_mib(bytes: u64) -> u64 {
    bytes >> MIB_SHIFT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_trip_and_refuse_overflow() {
        assert_eq!(mib_to_pages(3), Some(768));
        assert_eq!(mib_to_bytes(3), Some(3 << 20));
        assert_eq!(pages_to_bytes(768), Some(3 << 20));
        assert_eq!(pages_to_mib(767), 2, "rounds down");
        assert_eq!(bytes_to_pages(8191), 1);
        assert_eq!(bytes_to_mib((5 << 20) + 1), 5);
        assert_eq!(mib_to_pages(u64::MAX / 256 + 1), None);
        assert_eq!(mib_to_bytes(1 << 44), None);
        assert_eq!(pages_to_bytes(1 << 52), None);
    }
}
