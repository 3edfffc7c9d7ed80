//! The vocabulary of the manager's API: page numbers, ranges, reasons, regions, outcomes, stats.

use std::fmt;

pub use crate::units::{HUGE_PAGE_SIZE, PAGE_SHIFT, PAGE_SIZE};

/// A 4 KiB guest page frame number.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pfn(pub u64);

impl Pfn {
    /// The frame holding guest physical address `addr`.
    pub fn from_addr(addr: u64) -> Pfn {
        Pfn(addr >> PAGE_SHIFT)
    }
    /// Guest physical address of the frame's first byte.
    pub fn addr(self) -> u64 {
        self.0 << PAGE_SHIFT
    }
}

impl fmt::Debug for Pfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pfn(0x{:x})", self.0)
    }
}

impl fmt::Display for Pfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:x}", self.0)
    }
}

/// `count` pages starting at `start`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PageRange {
    /// First page of the range.
    pub start: Pfn,
    /// Number of pages; a range of zero pages is empty.
    pub count: u64,
}

impl PageRange {
    /// `count` pages from page frame `start`.
    pub fn new(start: u64, count: u64) -> PageRange {
        PageRange {
            start: Pfn(start),
            count,
        }
    }
    /// One page.
    pub fn page(pfn: u64) -> PageRange {
        PageRange::new(pfn, 1)
    }
    /// The pages covering guest physical bytes `addr..addr+len` (both page-aligned).
    pub fn from_addr(addr: u64, len: u64) -> PageRange {
        PageRange::new(addr >> PAGE_SHIFT, len >> PAGE_SHIFT)
    }
    /// One past the last page, saturating at `u64::MAX`.
    pub fn end(self) -> u64 {
        self.start.0.saturating_add(self.count)
    }
    /// Size in bytes, saturating.
    pub fn bytes(self) -> u64 {
        self.count.saturating_mul(PAGE_SIZE)
    }
    /// Whether the range holds no pages.
    pub fn is_empty(self) -> bool {
        self.count == 0
    }
    /// Whether page `pfn` lies in the range.
    pub fn contains(self, pfn: u64) -> bool {
        pfn >= self.start.0 && pfn < self.end()
    }
}

impl fmt::Display for PageRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PFN 0x{:x}..0x{:x}", self.start.0, self.end())
    }
}

impl fmt::Debug for PageRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:x}+0x{:x}", self.start.0, self.count)
    }
}

/// Why a page is offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Given to the host by the balloon driver.
    Ballooned,
    /// Part of a hot-add region that is not plugged (never plugged, or unplugged again).
    Unplugged,
}

/// What a request did, page by page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Outcome {
    /// Pages that changed state.
    pub changed: u64,
    /// Pages refused: outside guest RAM, or not in a state or region the request applies to.
    pub refused: u64,
    /// Pages already in the asked state.
    pub unchanged: u64,
}

impl Outcome {
    /// Pages the request covered, whatever happened to them.
    pub fn total(&self) -> u64 {
        self.changed + self.refused + self.unchanged
    }
}

impl std::ops::AddAssign for Outcome {
    fn add_assign(&mut self, o: Outcome) {
        self.changed += o.changed;
        self.refused += o.refused;
        self.unchanged += o.unchanged;
    }
}

/// How a region's memory is provided by the host; decides the call that gives pages back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backing {
    /// `MAP_PRIVATE | MAP_ANONYMOUS`; discarded with `madvise(MADV_DONTNEED)`.
    PrivateAnonymous,
    /// `MAP_PRIVATE | MAP_ANONYMOUS` with `madvise(MADV_HUGEPAGE)`: backed by 2 MiB transparent
    /// huge pages where the kernel has them (THP `enabled` must be `always` or `madvise`; the
    /// manager maps every region at a host address with its guest address's offset in a 2 MiB
    /// page, so guest and host huge pages coincide); discarded
    /// with `madvise(MADV_DONTNEED)` like [`Backing::PrivateAnonymous`].
    ///
    /// The trade-off (see balloon/README.md for figures): an offline run that covers whole 2 MiB
    /// pieces is freed a huge page at a time, 13-30x faster than on 4 KiB pages. A discard
    /// of part of a huge page splits its mapping: RSS drops at once, but the kernel frees the
    /// 4 KiB pieces only when it splits the huge page itself (its deferred-split shrinker, under
    /// memory pressure), and khugepaged may fill the holes again (up to `max_ptes_none` missing
    /// pieces, 511 by default) when it collapses the range back into a huge page.
    PrivateAnonymousHuge,
    /// A memfd mapped `MAP_SHARED` (what vhost-user needs); discarded with
    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)` at the file offset.
    SharedMemfd,
    /// `MAP_SHARED | MAP_ANONYMOUS`; discarded with `madvise(MADV_REMOVE)`.
    SharedAnonymous,
    /// A memfd on hugetlbfs (2 MiB pages); punch-hole, and only for whole huge pages.
    HugetlbFs,
}

/// What a region is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegionKind {
    /// RAM present at boot, registered with KVM as one slot and online.
    BootRam,
    /// Hot-add (virtio-mem) memory: address space reserved, born offline (unplugged), plugged
    /// and unplugged in blocks of `block_size` bytes, each block its own KVM slot while plugged.
    Hotplug {
        /// Bytes per virtio-mem block: the unit of plug and unplug.
        block_size: u64,
    },
}

/// One guest RAM region to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionSpec {
    /// Guest physical address of the first byte; page-aligned.
    pub guest_addr: u64,
    /// Size in bytes; a multiple of the page size (of the block size for hot-add memory).
    pub size: u64,
    /// What host memory backs the region, which decides how pages are given back.
    pub backing: Backing,
    /// Boot RAM or hot-add memory.
    pub kind: RegionKind,
}

/// A region as the manager holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfo {
    /// Guest physical address of the first byte.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// What host memory backs the region.
    pub backing: Backing,
    /// Boot RAM or hot-add memory.
    pub kind: RegionKind,
    /// Host virtual address of the mapping.
    pub host_addr: usize,
    /// KVM slot of boot RAM, or of the region's first block for hot-add memory.
    pub first_slot: u32,
    /// Bytes usable by the guest: all of boot RAM, plugged blocks of hot-add memory.
    pub plugged_bytes: u64,
}

/// Accounting, in bytes unless named otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryStats {
    /// All guest RAM regions, boot and hot-add.
    pub total_bytes: u64,
    /// Usable by the guest: total minus offline.
    pub online_bytes: u64,
    /// Offline because ballooned.
    pub ballooned_bytes: u64,
    /// Offline because unplugged (hot-add memory not plugged).
    pub unplugged_bytes: u64,
    /// Offline pages whose host backing has been released.
    pub discarded_bytes: u64,
    /// Offline pages whose backing is still held (deferred discard not flushed yet, or pieces of
    /// huge pages that are not wholly offline).
    pub pending_discard_bytes: u64,
    /// Size of all hot-add regions.
    pub hotplug_total_bytes: u64,
    /// The plugged part of the hot-add regions (their size minus the unplugged pages).
    pub hotplug_plugged_bytes: u64,
    /// Online pages the guest reported free and whose backing was released (cumulative).
    pub free_reported_bytes: u64,
    /// Inflated pages refused (cumulative; likewise the other `refused_*`): outside guest RAM,
    /// or unplugged.
    pub refused_offline_pages: u64,
    /// Deflated pages refused: outside guest RAM, or unplugged.
    pub refused_online_pages: u64,
    /// Free-page-report pages refused: outside guest RAM, or unplugged.
    pub refused_free_pages: u64,
    /// Plug and unplug pages refused: outside the hot-add regions, or in blocks only partly
    /// covered.
    pub refused_plug_pages: u64,
    /// Discard system calls made (cumulative): one per coalesced run, or one per batch of up to
    /// 512 runs of a private anonymous region (`process_madvise`).
    pub discard_calls: u64,
    /// Pages whose deferred discard `tick` released (cumulative; discards at once, for free page
    /// reports and unplug, and `flush_discards` called directly are not counted here).
    pub released_pages: u64,
    /// Releases that failed and were queued for a retry: scheduled ones, and those of unplugged
    /// blocks (cumulative).
    pub release_errors: u64,
    /// Heap bytes held by the offline-page tracker.
    pub tracker_heap_bytes: u64,
    /// Tracker leaves turned into sparse leaves by [`crate::MemoryManager::compact`] (cumulative).
    pub tracker_compacted_leaves: u64,
}
