//! Guest RAM regions: checking a region's spec, mapping it with the backing it asks for, the KVM
//! slots it is registered under, and splitting requests at region boundaries.

use std::fs::File;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestRegionMmap, MmapRegion};

use crate::error::Error;
use crate::sys;
use crate::tracker::MAX_INDEX;
use crate::types::*;

/// Registers guest memory with the hypervisor. The VMM implements it with
/// `KVM_SET_USER_MEMORY_REGION`; tests use a fake.
pub trait SlotMapper: Send {
    /// Makes guest physical `guest_addr..guest_addr + size` the memory at `host_addr` as slot
    /// `slot`.
    ///
    /// # Safety
    /// `host_addr..host_addr + size` must be one live mapping of the caller's that stays mapped
    /// (it may be discarded, never unmapped or replaced) until [`SlotMapper::unmap`] of `slot`
    /// has returned: the guest reads and writes it from then on. The memory manager keeps this
    /// by holding each region's mapping until its own `Drop`, which unmaps every slot first.
    unsafe fn map(
        &mut self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: *mut u8,
    ) -> Result<(), String>;
    /// Removes slot `slot`: the guest no longer reaches its memory.
    fn unmap(&mut self, slot: u32, guest_addr: u64, size: u64) -> Result<(), String>;
}

pub(super) struct Region {
    pub spec: RegionSpec,
    /// First PFN and one past the last.
    pub start: u64,
    pub end: u64,
    pub mapping: Arc<GuestRegionMmap<()>>,
    /// The memfd behind shared file and hugetlbfs backings (mapped at offset 0).
    pub file: Option<File>,
    pub first_slot: u32,
    /// Hot-add regions: pages per block (0 for boot RAM).
    pub block_pages: u64,
    /// A `PROT_NONE` page right below and right above the mapping, held as long as it: nothing
    /// else is mapped against guest RAM, so no neighbour (a malloc block, a thread stack) is
    /// merged into its VMA and backed by its transparent huge pages, which cost 2 MiB of VMM
    /// memory in the nested boot benchmark once guest RAM was placed 2 MiB-aligned; and an
    /// access running off either end faults.
    pub _guards: sys::Reservation,
}

impl Region {
    pub fn mmap(&self) -> &MmapRegion<()> {
        &self.mapping
    }
    pub fn is_hotplug(&self) -> bool {
        matches!(self.spec.kind, RegionKind::Hotplug { .. })
    }
    pub fn is_hugetlb(&self) -> bool {
        self.spec.backing == Backing::HugetlbFs
    }
    /// Block `blk` of a hot-add region: its first page, slot and guest bytes.
    pub fn block(&self, blk: u64) -> Block {
        let x = self.start + blk * self.block_pages;
        Block {
            x,
            slot: self.first_slot + blk as u32,
            guest_addr: x << PAGE_SHIFT,
            size: self.block_pages << PAGE_SHIFT,
        }
    }
    /// Host address of page `pfn` of this region.
    pub fn host_addr(&self, pfn: u64) -> *mut u8 {
        self.mmap()
            .as_ptr()
            .wrapping_add(((pfn - self.start) << PAGE_SHIFT) as usize)
    }
}

/// One block of a hot-add region.
#[derive(Debug, Clone, Copy)]
pub(super) struct Block {
    /// First page.
    pub x: u64,
    pub slot: u32,
    pub guest_addr: u64,
    pub size: u64,
}

impl Block {
    pub fn slot_error(&self) -> impl FnOnce(String) -> Error + '_ {
        move |message| Error::Slot {
            slot: self.slot,
            guest_addr: self.guest_addr,
            size: self.size,
            message,
        }
    }
}

pub(super) fn validate_spec(i: usize, s: &RegionSpec) -> Result<(), Error> {
    let bad = |what| Error::InvalidRegion {
        index: i,
        guest_addr: s.guest_addr,
        size: s.size,
        what,
    };
    let align = if s.backing == Backing::HugetlbFs {
        HUGE_PAGE_SIZE
    } else {
        PAGE_SIZE
    };
    if s.size == 0 {
        return Err(bad("size is zero"));
    }
    // `align` is a power of two.
    if s.guest_addr & (align - 1) != 0 || s.size & (align - 1) != 0 {
        return Err(bad(if align == PAGE_SIZE {
            "address and size must be multiples of 4 KiB"
        } else {
            "hugetlbfs address and size must be multiples of 2 MiB"
        }));
    }
    match s.guest_addr.checked_add(s.size) {
        Some(end) if (end >> PAGE_SHIFT) <= MAX_INDEX + 1 => {}
        _ => {
            return Err(bad(
                "region ends past the 64-bit guest physical address space",
            ))
        }
    }
    if usize::try_from(s.size).is_err() {
        return Err(bad("size does not fit the host address space"));
    }
    if let RegionKind::Hotplug { block_size } = s.kind {
        if block_size == 0 || block_size & (align - 1) != 0 || s.size.rem_euclid(block_size) != 0 {
            return Err(bad(
                "block size must be a non-zero multiple of the page size dividing the region size",
            ));
        }
        if u32::try_from(s.size / block_size).is_err() {
            return Err(bad("more blocks than KVM slot numbers"));
        }
    }
    Ok(())
}

/// A region's mapping, its memfd for the file backings, and the guard pages around it.
pub(super) type Mapped = (MmapRegion<()>, Option<File>, sys::Reservation);

pub(super) fn map_region(s: &RegionSpec) -> Result<Mapped, Error> {
    let hotplug = matches!(s.kind, RegionKind::Hotplug { .. });
    let noreserve = if hotplug { libc::MAP_NORESERVE } else { 0 };
    let size = s.size as usize;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let mmap_err = |source| Error::Mmap {
        guest_addr: s.guest_addr,
        size: s.size,
        source,
    };
    let memfd = |hugetlb| {
        sys::memfd("guest-ram", s.size, hugetlb).map_err(|source| Error::Memfd {
            guest_addr: s.guest_addr,
            size: s.size,
            source,
        })
    };
    let dup = |f: &File| {
        f.try_clone().map_err(|source| Error::Memfd {
            guest_addr: s.guest_addr,
            size: s.size,
            source,
        })
    };
    Ok(match s.backing {
        Backing::PrivateAnonymous | Backing::PrivateAnonymousHuge | Backing::SharedAnonymous => {
            let share = if s.backing == Backing::SharedAnonymous {
                libc::MAP_SHARED
            } else {
                libc::MAP_PRIVATE
            };
            let m = map_huge_aligned(s, || {
                MmapRegionBuilder::new(size)
                    .with_mmap_prot(prot)
                    .with_mmap_flags(share | libc::MAP_ANONYMOUS | noreserve)
                    .build()
                    .map_err(mmap_err)
            })?;
            if s.backing == Backing::PrivateAnonymousHuge {
                // Not fatal: without THP the region is plain 4 KiB memory.
                if let Err(e) = sys::advise_hugepages(&m) {
                    log::warn!(
                        "memory: madvise(MADV_HUGEPAGE) on guest RAM at 0x{:x}: {e}; 4 KiB pages",
                        s.guest_addr
                    );
                }
                if !congruent(&m, s.guest_addr) {
                    log::warn!(
                        "memory: guest RAM at 0x{:x} is mapped at {:p}, not 2 MiB-aligned with it: \
                         guest and host huge pages do not coincide",
                        s.guest_addr,
                        m.as_ptr()
                    );
                }
            }
            let guards = sys::Reservation::guard_pages(&m);
            (m, None, guards)
        }
        Backing::SharedMemfd | Backing::HugetlbFs => {
            let huge = s.backing == Backing::HugetlbFs;
            let file = memfd(huge)?;
            let build = || {
                MmapRegionBuilder::new(size)
                    .with_mmap_prot(prot)
                    .with_mmap_flags(libc::MAP_SHARED | noreserve)
                    .with_file_offset(FileOffset::new(dup(&file)?, 0))
                    .with_hugetlbfs(huge)
                    .build()
                    .map_err(mmap_err)
            };
            // hugetlbfs mappings are huge-page aligned by the kernel itself.
            let m = if huge {
                build()?
            } else {
                map_huge_aligned(s, build)?
            };
            let guards = sys::Reservation::guard_pages(&m);
            (m, Some(file), guards)
        }
    })
}

/// Whether `m` starts at the same offset in a 2 MiB page as guest address `guest_addr`.
fn congruent(m: &MmapRegion<()>, guest_addr: u64) -> bool {
    (m.as_ptr() as u64 ^ guest_addr) & (HUGE_PAGE_SIZE - 1) == 0
}

/// How many mappings [`map_huge_aligned`] makes before it keeps one that is not where it asked.
const PLACEMENT_TRIES: usize = 8;

/// Maps region `s` with `build` (vm-memory's `mmap(NULL, ...)`, which owns the mapping) at a host
/// address congruent to `s.guest_addr` modulo 2 MiB, so that every 2 MiB-aligned piece of guest
/// RAM is one 2 MiB-aligned piece of host memory: only then can the kernel back it with one
/// transparent huge page (THP `always`, or `MADV_HUGEPAGE`) and KVM map it with one large page
/// in the guest's nested page tables. Older kernels (the nested test host's 6.1) place an
/// anonymous mapping with no regard to 2 MiB boundaries, so where guest RAM landed depended on
/// what the process had mapped before it (thread stacks, malloc arenas): there, the VMM booted
/// its guest about 5% later, with 5 MiB more of it resident, once its start-up order changed
/// to build the VM before starting its other threads (README, "Boot").
///
/// How: reserve `size` + 2 MiB + 4 KiB with `PROT_NONE` (address space only), give back the
/// `size` bytes at the aligned address inside it, so that they are a hole exactly `size` long
/// with the reservation's rest mapped on both sides, and let `build` map. A mapping of `size`
/// bytes that lands in that hole lands at its start, whichever way the kernel searches for
/// room; one that lands in another, earlier-searched hole is kept mapped while `build` tries
/// again (so that hole is taken), up to [`PLACEMENT_TRIES`] mappings, and then unmapped. The
/// reservation's rest is unmapped before returning (the caller guards the ends: the gaps it
/// leaves would otherwise be taken by the next mappings, right against guest RAM). Nothing
/// here maps with `MAP_FIXED`: `build`'s mapping is owned by its `MmapRegion` alone, as it
/// would be without this function.
/// Where no mapping lands in the hole (another thread mapped there first, or there was no room
/// to reserve), the region is mapped wherever `build` maps it, as before.
fn map_huge_aligned(
    s: &RegionSpec,
    mut build: impl FnMut() -> Result<MmapRegion<()>, Error>,
) -> Result<MmapRegion<()>, Error> {
    let align = HUGE_PAGE_SIZE as usize;
    let size = s.size as usize;
    if size < align {
        return build();
    }
    // Kernels that align large anonymous mappings themselves (6.7 on) mostly place it right
    // at once; then nothing more is done, as before this function. A first mapping elsewhere
    // is held below, so that its gap is taken.
    let first_try = build()?;
    if congruent(&first_try, s.guest_addr) {
        return Ok(first_try);
    }
    let Some(total) = size.checked_add(align + PAGE_SIZE as usize) else {
        return Ok(first_try);
    };
    let Ok(reserved) = sys::Reservation::new(total) else {
        return Ok(first_try);
    };
    // The first address past the reservation's first page with the guest address's offset in
    // a 2 MiB page: at least one page of the reservation stays below the hole and one above.
    let first = reserved.addr() + PAGE_SIZE as usize;
    let want = (s.guest_addr as usize).wrapping_sub(first) & (align - 1);
    let target = first + want;
    let offset = target - reserved.addr();
    let Ok(_rest) = reserved.give_back(offset, size) else {
        return Ok(first_try);
    };
    let mut elsewhere = vec![first_try];
    loop {
        let m = build()?;
        if m.as_ptr() as usize == target {
            // `elsewhere`'s mappings and the reservation's rest are unmapped here.
            return Ok(m);
        }
        if elsewhere.len() + 1 == PLACEMENT_TRIES {
            log::debug!(
                "memory: guest RAM at 0x{:x} mapped at {:p}, not at {target:#x} as reserved",
                s.guest_addr,
                m.as_ptr()
            );
            return Ok(m);
        }
        elsewhere.push(m);
    }
}

/// Splits `a..b` by region: `(Some(r), a, b)` inside region `r`, `(None, a, b)` outside guest
/// RAM.
pub(super) fn split(regions: &[Region], a: u64, b: u64) -> Vec<(Option<usize>, u64, u64)> {
    let mut out = Vec::new();
    let mut pos = a;
    let mut r = regions.partition_point(|g| g.end <= a);
    while pos < b {
        match regions.get(r) {
            Some(g) if g.start < b => {
                if pos < g.start {
                    out.push((None, pos, g.start));
                    pos = g.start;
                }
                let e = g.end.min(b);
                out.push((Some(r), pos, e));
                pos = e;
                r += 1;
            }
            _ => {
                out.push((None, pos, b));
                pos = b;
            }
        }
    }
    out
}
