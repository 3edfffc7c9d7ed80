//! The guest-memory manager: regions, offline/online, discard by backing, hot-add, accounting.
//!
//! # Conventions in this file
//! - `r`: index of a region in `self.regions` (sorted by guest address).
//! - `a..b`: a half-open range of PFNs; parts of requests are split at region boundaries first.
//! - B, U, D: the tracker marks Ballooned, Unplugged, Discarded.
//!
//! # Page states
//! A page is online (absent from the tracker) or offline with exactly one reason, B or U, and
//! with D once its backing is released. Hot-add regions are born offline (U|D, one tracker entry
//! for the whole region) and are plugged/unplugged a block at a time; a page can be online only if
//! its block is plugged.
//!
//! # Requests
//! Every request is sorted and coalesced first, so a page named twice counts once. Pages outside
//! guest RAM, or not in a state the request applies to, are refused and counted (in the returned
//! [`Outcome`] and in [`MemoryStats`]), never touched. `Err` means the host failed (memory, a
//! system call, the slot mapper). The parts of a request before the failure are applied, the rest
//! not; every request is idempotent, so the device retries the whole request and the pages already
//! done count as unchanged. The tracker's own updates are all-or-nothing and cannot lose a page.
//!
//! # Discard
//! Newly offline pages are recorded in the tracker and queued first, then their backing is released
//! with the call that frees it for the region's backing (see [`Backing`]), one call per coalesced
//! run, or on private anonymous regions one `process_madvise` per 512 runs; so an online page is
//! never discarded. [`MemoryManager::flush_discards`] releases the pages of the queue that are
//! still offline and not yet discarded, so a page brought back online in between is not
//! discarded: `offline` calls it before returning under [`DiscardPolicy::Immediate`]; under
//! [`DiscardPolicy::Deferred`] it only records and queues, and the caller flushes later.
//! Free page reporting ([`MemoryManager::discard_free`]) and unplug always discard at once: the
//! guest reuses reported pages as soon as the report is acknowledged.

use std::fs::File;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::error::Error;
use crate::sys;
use crate::tracker::{Chunk, Mark, Marks, Tracker, MAX_INDEX};
use crate::types::*;

/// Registers guest memory with the hypervisor. The VMM implements it with
/// `KVM_SET_USER_MEMORY_REGION`; tests use a fake.
pub trait SlotMapper: Send {
    fn map(
        &mut self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: *mut u8,
    ) -> Result<(), String>;
    fn unmap(&mut self, slot: u32, guest_addr: u64, size: u64) -> Result<(), String>;
}

const B: Mark = Mark::Ballooned;
const U: Mark = Mark::Unplugged;
const D: Mark = Mark::Discarded;
const HUGE_PAGES: u64 = HUGE_PAGE_SIZE / PAGE_SIZE;

struct Region {
    spec: RegionSpec,
    /// First PFN and one past the last.
    start: u64,
    end: u64,
    mapping: Arc<GuestRegionMmap<()>>,
    /// The memfd behind shared file and hugetlbfs backings (mapped at offset 0).
    file: Option<File>,
    first_slot: u32,
    /// Hot-add regions: whether each block is plugged (mapped into the guest).
    plugged: Vec<bool>,
    /// Hot-add regions: pages per block.
    block_pages: u64,
}

impl Region {
    fn mmap(&self) -> &MmapRegion<()> {
        &self.mapping
    }
    fn is_hotplug(&self) -> bool {
        matches!(self.spec.kind, RegionKind::Hotplug { .. })
    }
    fn plugged_bytes(&self) -> u64 {
        match self.spec.kind {
            RegionKind::BootRam => self.spec.size,
            RegionKind::Hotplug { block_size } => {
                self.plugged.iter().filter(|&&p| p).count() as u64 * block_size
            }
        }
    }
    fn block_plugged(&self, pfn: u64) -> bool {
        self.plugged[((pfn - self.start) / self.block_pages) as usize]
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    free_reported_pages: u64,
    refused_offline: u64,
    refused_online: u64,
    refused_free: u64,
    refused_plug: u64,
    discard_calls: u64,
    compacted_leaves: u64,
}

/// Owner of guest RAM. `Send`; the VMM shares it as `Arc<Mutex<MemoryManager>>`.
pub struct MemoryManager {
    regions: Vec<Region>,
    guest_memory: GuestMemoryMmap<()>,
    tracker: Tracker,
    slots: Box<dyn SlotMapper>,
    policy: DiscardPolicy,
    /// Deferred discards: (region, a, b).
    queue: Vec<(usize, u64, u64)>,
    /// Batched `MADV_DONTNEED` for flushes of many runs.
    batch: sys::BatchDontneed,
    counters: Counters,
    /// The pages whose tracker entries requests changed since the last `compact`, as one
    /// span: what `compact` walks (a settled balloon's tree is not walked again).
    changed: Option<(u64, u64)>,
}

fn validate_spec(i: usize, s: &RegionSpec) -> Result<(), Error> {
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
    // `align` is a power of two (MSRV 1.85 has no `is_multiple_of`).
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
    }
    Ok(())
}

fn map_region(s: &RegionSpec) -> Result<(MmapRegion<()>, Option<File>), Error> {
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
            let m = MmapRegionBuilder::new(size)
                .with_mmap_prot(prot)
                .with_mmap_flags(share | libc::MAP_ANONYMOUS | noreserve)
                .build()
                .map_err(mmap_err)?;
            if s.backing == Backing::PrivateAnonymousHuge {
                // Not fatal: without THP the region is plain 4 KiB memory.
                if let Err(e) = sys::advise_hugepages(&m) {
                    log::warn!(
                        "memory: madvise(MADV_HUGEPAGE) on guest RAM at 0x{:x}: {e}; 4 KiB pages",
                        s.guest_addr
                    );
                }
                if (m.as_ptr() as u64 ^ s.guest_addr) & (HUGE_PAGE_SIZE - 1) != 0 {
                    log::warn!(
                        "memory: guest RAM at 0x{:x} is mapped at {:p}, not 2 MiB-aligned with it: \
                         guest and host huge pages do not coincide",
                        s.guest_addr,
                        m.as_ptr()
                    );
                }
            }
            (m, None)
        }
        Backing::SharedMemfd | Backing::HugetlbFs => {
            let huge = s.backing == Backing::HugetlbFs;
            let file = memfd(huge)?;
            let m = MmapRegionBuilder::new(size)
                .with_mmap_prot(prot)
                .with_mmap_flags(libc::MAP_SHARED | noreserve)
                .with_file_offset(FileOffset::new(dup(&file)?, 0))
                .with_hugetlbfs(huge)
                .build()
                .map_err(mmap_err)?;
            (m, Some(file))
        }
    })
}

/// Sorted, coalesced `(a, b)` page runs of a request; pages past the end of the PFN space are
/// returned as a refused count.
fn normalise(pages: &[PageRange]) -> Result<(Vec<(u64, u64)>, u64), Error> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    runs.try_reserve(pages.len()).map_err(|_| Error::NoMemory {
        what: "a request's page runs",
        bytes: pages.len() * 16,
    })?;
    let mut refused = 0;
    for p in pages {
        let a = p.start.0.min(MAX_INDEX + 1);
        let b = p.start.0.saturating_add(p.count).min(MAX_INDEX + 1);
        refused += p.count - (b - a);
        if a < b {
            runs.push((a, b));
        }
    }
    coalesce(&mut runs);
    Ok((runs, refused))
}

/// Sorts `runs` (`[a, b)` pairs) and merges, in place, those that overlap or touch.
fn coalesce(runs: &mut Vec<(u64, u64)>) {
    if !runs.is_sorted() {
        runs.sort_unstable();
    }
    let mut n = 0;
    for i in 0..runs.len() {
        let (a, b) = runs[i];
        if n > 0 && a <= runs[n - 1].1 {
            runs[n - 1].1 = runs[n - 1].1.max(b);
        } else {
            runs[n] = (a, b);
            n += 1;
        }
    }
    runs.truncate(n);
}

/// Splits `a..b` of a request by region: `(Some(r), a, b)` inside region `r`, `(None, a, b)`
/// outside guest RAM.
fn split(regions: &[Region], a: u64, b: u64) -> Vec<(Option<usize>, u64, u64)> {
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

/// The offline segments of `a..b` and the online gaps between them.
fn segments(t: &Tracker, a: u64, b: u64) -> (Vec<Chunk>, Vec<(u64, u64)>) {
    if b - a == 1 && t.get(a).is_none() {
        // One online page (a scattered inflate): no walk.
        return (Vec::new(), vec![(a, b)]);
    }
    let segs: Vec<Chunk> = t.marked_runs(Some((a, b))).collect();
    let mut gaps = Vec::new();
    let mut pos = a;
    for c in &segs {
        if c.start > pos {
            gaps.push((pos, c.start));
        }
        pos = c.start + c.len;
    }
    if pos < b {
        gaps.push((pos, b));
    }
    (segs, gaps)
}

impl MemoryManager {
    /// Maps every region (hot-add regions `MAP_NORESERVE`, born offline as
    /// [`Reason::Unplugged`] with one tracker entry) and registers boot RAM slots. Boot regions
    /// get slots in address order from 0; hot-add blocks get the following slots, a region's
    /// blocks consecutively.
    pub fn new(specs: &[RegionSpec], mut slots: Box<dyn SlotMapper>) -> Result<Self, Error> {
        if specs.is_empty() {
            return Err(Error::NoRegions);
        }
        for (i, s) in specs.iter().enumerate() {
            validate_spec(i, s)?;
        }
        let mut sorted: Vec<RegionSpec> = specs.to_vec();
        sorted.sort_by_key(|s| s.guest_addr);
        for w in sorted.windows(2) {
            if w[0].guest_addr + w[0].size > w[1].guest_addr {
                return Err(Error::Overlap {
                    a_start: w[0].guest_addr,
                    a_end: w[0].guest_addr + w[0].size,
                    b_start: w[1].guest_addr,
                    b_end: w[1].guest_addr + w[1].size,
                });
            }
        }
        let boot_count = sorted
            .iter()
            .filter(|s| s.kind == RegionKind::BootRam)
            .count() as u32;
        let mut next_boot_slot = 0u32;
        let mut next_block_slot = boot_count;
        let mut regions = Vec::with_capacity(sorted.len());
        let mut tracker = Tracker::new();
        for s in &sorted {
            let (mmap, file) = map_region(s)?;
            let mapping = Arc::new(
                GuestRegionMmap::new(mmap, GuestAddress(s.guest_addr))
                    .expect("region end checked against the address space"),
            );
            let start = s.guest_addr >> PAGE_SHIFT;
            let end = start + (s.size >> PAGE_SHIFT);
            let (first_slot, plugged, block_pages) = match s.kind {
                RegionKind::BootRam => {
                    next_boot_slot += 1;
                    (next_boot_slot - 1, Vec::new(), 0)
                }
                RegionKind::Hotplug { block_size } => {
                    let blocks = s.size / block_size;
                    let first = next_block_slot;
                    next_block_slot += blocks as u32;
                    tracker.insert_range(start, end - start, Marks::of(&[U, D]))?;
                    (
                        first,
                        vec![false; blocks as usize],
                        block_size >> PAGE_SHIFT,
                    )
                }
            };
            regions.push(Region {
                spec: *s,
                start,
                end,
                mapping,
                file,
                first_slot,
                plugged,
                block_pages,
            });
        }
        for g in &regions {
            if g.spec.kind == RegionKind::BootRam {
                slots
                    .map(
                        g.first_slot,
                        g.spec.guest_addr,
                        g.spec.size,
                        g.mmap().as_ptr(),
                    )
                    .map_err(|message| Error::Slot {
                        slot: g.first_slot,
                        guest_addr: g.spec.guest_addr,
                        size: g.spec.size,
                        message,
                    })?;
            }
        }
        let guest_memory =
            GuestMemoryMmap::from_arc_regions(regions.iter().map(|g| g.mapping.clone()).collect())?;
        Ok(MemoryManager {
            regions,
            guest_memory,
            tracker,
            slots,
            policy: DiscardPolicy::Immediate,
            queue: Vec::new(),
            batch: sys::BatchDontneed::open(),
            counters: Counters::default(),
            changed: None,
        })
    }

    /// All regions, for devices and the loader.
    pub fn guest_memory(&self) -> &GuestMemoryMmap<()> {
        &self.guest_memory
    }

    /// The offline-page tracker (read-only).
    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    pub fn discard_policy(&self) -> DiscardPolicy {
        self.policy
    }

    /// Chooses when newly offline pages are discarded. Switching to `Immediate` flushes the queue.
    pub fn set_discard_policy(&mut self, policy: DiscardPolicy) -> Result<(), Error> {
        if policy == DiscardPolicy::Immediate {
            self.flush_discards()?;
        }
        self.policy = policy;
        Ok(())
    }

    /// `Ok` if every page of `range` is guest RAM, else the first page that is not.
    pub fn validate(&self, range: PageRange) -> Result<(), Error> {
        let lo = self.regions.first().map_or(0, |g| g.start);
        let hi = self.regions.last().map_or(0, |g| g.end);
        let b = range.end();
        for (r, a, _) in split(&self.regions, range.start.0, b) {
            if r.is_none() {
                return Err(Error::PfnOutsideRam { pfn: a, lo, hi });
            }
        }
        if range.start.0.checked_add(range.count).is_none() {
            return Err(Error::PfnOutsideRam { pfn: b, lo, hi });
        }
        Ok(())
    }

    /// Takes pages offline (balloon inflate with `Ballooned`; with `Unplugged`, part of a plugged
    /// hot-add block) and releases their backing (see the module docs for the policy).
    /// Refused: pages outside guest RAM; `Ballooned` pages that are unplugged; `Unplugged` pages
    /// outside hot-add regions.
    pub fn offline(&mut self, pages: &[PageRange], reason: Reason) -> Result<Outcome, Error> {
        let (runs, refused) = normalise(pages)?;
        self.note_changed(&runs);
        let mut out = Outcome {
            refused,
            ..Outcome::default()
        };
        let mut res = self.each_part(&runs, &mut out, |m, r, a, b| {
            m.offline_part(r, a, b, reason)
        });
        if self.policy == DiscardPolicy::Immediate {
            // What was recorded is released even if a later part failed.
            let flushed = self.flush_discards().map(|_| ());
            res = res.and(flushed);
        }
        self.counters.refused_offline += out.refused;
        res.map(|_| out)
    }

    /// Brings offline pages back (balloon deflate). They read as zeros if they were discarded.
    /// Refused: pages outside guest RAM, pages offline for the other reason, and `Unplugged`
    /// pages of blocks that are not plugged (use [`MemoryManager::plug`]).
    pub fn online(&mut self, pages: &[PageRange], reason: Reason) -> Result<Outcome, Error> {
        let (runs, refused) = normalise(pages)?;
        self.note_changed(&runs);
        let mut out = Outcome {
            refused,
            ..Outcome::default()
        };
        let res = self.each_part(&runs, &mut out, |m, r, a, b| m.online_part(r, a, b, reason));
        self.counters.refused_online += out.refused;
        res.map(|_| out)
    }

    /// Free page reporting: the guest says these online pages are free. Their backing is released
    /// now; they stay online and are not tracked. Ballooned pages count as unchanged; unplugged
    /// pages and pages outside guest RAM are refused. On hugetlbfs only whole huge pages inside a
    /// reported run are released; the other pages count as unchanged.
    pub fn discard_free(&mut self, pages: &[PageRange]) -> Result<Outcome, Error> {
        let (runs, refused) = normalise(pages)?;
        let mut out = Outcome {
            refused,
            ..Outcome::default()
        };
        let res = self.each_part(&runs, &mut out, |m, r, a, b| m.free_part(r, a, b));
        self.counters.refused_free += out.refused;
        self.counters.free_reported_pages += out.changed;
        res.map(|_| out)
    }

    /// Plugs the whole hot-add blocks in `range`: maps each block's slot and brings its pages
    /// online. Pages outside hot-add regions or in blocks only partly covered are refused.
    pub fn plug(&mut self, range: PageRange) -> Result<Outcome, Error> {
        self.plug_range(range, true)
    }

    /// Unplugs the whole hot-add blocks in `range`: unmaps each block's slot, takes all its pages
    /// offline as `Unplugged` (ballooned ones included) and discards their backing at once.
    pub fn unplug(&mut self, range: PageRange) -> Result<Outcome, Error> {
        self.plug_range(range, false)
    }

    /// Shrinks the tracker: leaves holding few offline pages (at most 63 of their 4096) become
    /// sparse leaves, 2 bytes a page instead of a 528-byte bitmap (`Tracker::compact`). The
    /// tracker's updates never do this themselves, so that they stay bit flips; the balloon
    /// calls it once it has been quiet for a while. Only the span of pages that requests
    /// changed since the last call is walked. Returns the leaves turned.
    pub fn compact(&mut self) -> u64 {
        let Some((a, b)) = self.changed.take() else {
            return 0;
        };
        let n = self.tracker.compact(a, b - a) as u64;
        self.counters.compacted_leaves += n;
        n
    }

    /// Widens the span `compact` walks to sorted, coalesced `runs`.
    fn note_changed(&mut self, runs: &[(u64, u64)]) {
        if let (Some(&(a, _)), Some(&(_, b))) = (runs.first(), runs.last()) {
            self.changed = Some(match self.changed {
                Some((x, y)) => (x.min(a), y.max(b)),
                None => (a, b),
            });
        }
    }

    /// Releases the backing of queued pages that are still offline and not yet discarded.
    /// Returns the number of pages discarded.
    pub fn flush_discards(&mut self) -> Result<u64, Error> {
        let mut queue = std::mem::take(&mut self.queue);
        queue.sort_unstable();
        let mut done = 0;
        let mut i = 0;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        while i < queue.len() {
            // One region's runs, merged, go to the kernel together.
            let r = queue[i].0;
            let first = i;
            runs.clear();
            while i < queue.len() && queue[i].0 == r {
                let (_, a, b) = queue[i];
                i += 1;
                match runs.last_mut() {
                    Some(last) if a <= last.1 => last.1 = last.1.max(b),
                    _ => runs.push((a, b)),
                }
            }
            match self.release_runs(r, &runs) {
                Ok(n) => done += n,
                Err(e) => {
                    // Keep what is left for the next flush (what was done is marked discarded).
                    self.queue.extend_from_slice(&queue[first..]);
                    return Err(e);
                }
            }
        }
        Ok(done)
    }

    /// Page runs queued for a deferred discard (before coalescing).
    pub fn queued_discards(&self) -> usize {
        self.queue.len()
    }

    pub fn stats(&self) -> MemoryStats {
        let t = &self.tracker;
        let total: u64 = self.regions.iter().map(|g| g.spec.size).sum();
        let offline = t.len() * PAGE_SIZE;
        let hot = self.regions.iter().filter(|g| g.is_hotplug());
        MemoryStats {
            total_bytes: total,
            online_bytes: total - offline,
            ballooned_bytes: t.count_marked(B) * PAGE_SIZE,
            unplugged_bytes: t.count_marked(U) * PAGE_SIZE,
            discarded_bytes: t.count_marked(D) * PAGE_SIZE,
            pending_discard_bytes: (t.len() - t.count_marked(D)) * PAGE_SIZE,
            hotplug_total_bytes: hot.clone().map(|g| g.spec.size).sum(),
            hotplug_plugged_bytes: hot.map(|g| g.plugged_bytes()).sum(),
            free_reported_bytes: self.counters.free_reported_pages * PAGE_SIZE,
            refused_offline_pages: self.counters.refused_offline,
            refused_online_pages: self.counters.refused_online,
            refused_free_pages: self.counters.refused_free,
            refused_plug_pages: self.counters.refused_plug,
            discard_calls: self.counters.discard_calls,
            tracker_heap_bytes: t.heap_bytes() as u64,
            tracker_compacted_leaves: self.counters.compacted_leaves,
        }
    }

    pub fn regions(&self) -> Vec<RegionInfo> {
        self.regions
            .iter()
            .map(|g| RegionInfo {
                guest_addr: g.spec.guest_addr,
                size: g.spec.size,
                backing: g.spec.backing,
                kind: g.spec.kind,
                host_addr: g.mmap().as_ptr() as usize,
                first_slot: g.first_slot,
                plugged_bytes: g.plugged_bytes(),
            })
            .collect()
    }

    /// Up to `limit` maximal runs of offline pages with their reason, in address order,
    /// optionally only of one reason and within a range.
    pub fn offline_runs(
        &self,
        filter: Option<Reason>,
        within: Option<PageRange>,
        limit: usize,
    ) -> Vec<(PageRange, Reason)> {
        let mut out: Vec<(PageRange, Reason)> = Vec::new();
        let w = within.map(|p| (p.start.0, p.end()));
        for c in self.tracker.marked_runs(w) {
            let reason = if c.marks.contains(U) {
                Reason::Unplugged
            } else {
                Reason::Ballooned
            };
            if filter.is_some_and(|f| f != reason) {
                continue;
            }
            if let Some((last, lr)) = out.last_mut() {
                if *lr == reason && last.end() == c.start {
                    last.count += c.len;
                    continue;
                }
            }
            if out.len() == limit {
                break;
            }
            out.push((PageRange::new(c.start, c.len), reason));
        }
        out
    }

    /// Host-resident bytes of guest memory (mincore over every region).
    pub fn resident_bytes(&self) -> std::io::Result<u64> {
        let mut pages = 0;
        for g in &self.regions {
            pages += sys::resident_pages(g.mmap(), 0, g.spec.size)?;
        }
        Ok(pages * PAGE_SIZE)
    }

    // ---- internals ----

    fn each_part(
        &mut self,
        runs: &[(u64, u64)],
        out: &mut Outcome,
        mut f: impl FnMut(&mut Self, usize, u64, u64) -> Result<Outcome, Error>,
    ) -> Result<(), Error> {
        for &(a, b) in runs {
            // Most runs lie inside one region: no need to split them.
            let r = self.regions.partition_point(|g| g.end <= a);
            if self
                .regions
                .get(r)
                .is_some_and(|g| g.start <= a && b <= g.end)
            {
                *out += f(self, r, a, b)?;
                continue;
            }
            for (r, pa, pb) in split(&self.regions, a, b) {
                match r {
                    None => out.refused += pb - pa,
                    Some(r) => *out += f(self, r, pa, pb)?,
                }
            }
        }
        Ok(())
    }

    fn offline_part(&mut self, r: usize, a: u64, b: u64, reason: Reason) -> Result<Outcome, Error> {
        let mut out = Outcome::default();
        let g = &self.regions[r];
        if reason == Reason::Unplugged && !g.is_hotplug() {
            out.refused = b - a;
            return Ok(out);
        }
        let (segs, gaps) = segments(&self.tracker, a, b);
        let mark = if reason == Reason::Ballooned { B } else { U };
        let mut convert = Vec::new();
        for c in &segs {
            if c.marks.contains(mark) {
                out.unchanged += c.len;
            } else if reason == Reason::Ballooned {
                out.refused += c.len;
            } else {
                convert.push((c.start, c.start + c.len));
            }
        }
        // Recorded, then queued: `offline` flushes the queue before it returns under the
        // immediate policy, so the runs of a whole request reach the kernel together.
        let marks = Marks::from(mark);
        self.queue
            .try_reserve(gaps.len() + convert.len())
            .map_err(|_| Error::NoMemory {
                what: "deferred discards",
                bytes: (gaps.len() + convert.len()) * 24,
            })?;
        for &(x, y) in &gaps {
            out.changed += self.tracker.insert_range(x, y - x, marks)?;
            self.queue.push((r, x, y));
        }
        for &(x, y) in &convert {
            self.tracker.set_mark(x, y - x, U)?;
            self.tracker.clear_mark(x, y - x, B)?;
            out.changed += y - x;
            self.queue.push((r, x, y));
        }
        Ok(out)
    }

    fn online_part(&mut self, r: usize, a: u64, b: u64, reason: Reason) -> Result<Outcome, Error> {
        let mut out = Outcome::default();
        let g = &self.regions[r];
        if reason == Reason::Unplugged && !g.is_hotplug() {
            out.refused = b - a;
            return Ok(out);
        }
        let hugetlb = g.spec.backing == Backing::HugetlbFs;
        let (segs, gaps) = segments(&self.tracker, a, b);
        out.unchanged += gaps.iter().map(|(x, y)| y - x).sum::<u64>();
        let mark = if reason == Reason::Ballooned { B } else { U };
        let mut remove = Vec::new();
        for c in &segs {
            if !c.marks.contains(mark) {
                out.refused += c.len;
                continue;
            }
            // Unplugged pages come back only inside plugged blocks; page by page block check.
            let mut x = c.start;
            let end = c.start + c.len;
            while x < end {
                let g = &self.regions[r];
                let blk_end = if g.is_hotplug() {
                    (g.start + ((x - g.start) / g.block_pages + 1) * g.block_pages).min(end)
                } else {
                    end
                };
                if reason == Reason::Unplugged && !g.block_plugged(x) {
                    out.refused += blk_end - x;
                } else {
                    remove.push((x, blk_end));
                }
                x = blk_end;
            }
        }
        for &(x, y) in &remove {
            out.changed += self.tracker.remove_range(x, y - x)?;
            if hugetlb {
                // The huge pages these pages sit in are backed again as soon as they are touched.
                let (hx, hy) = self.huge_bounds(r, x, y);
                self.tracker.clear_mark(hx, hy - hx, D)?;
            }
        }
        Ok(out)
    }

    fn free_part(&mut self, r: usize, a: u64, b: u64) -> Result<Outcome, Error> {
        let mut out = Outcome::default();
        let (segs, gaps) = segments(&self.tracker, a, b);
        for c in &segs {
            if c.marks.contains(U) {
                out.refused += c.len;
            } else {
                out.unchanged += c.len;
            }
        }
        let hugetlb = self.regions[r].spec.backing == Backing::HugetlbFs;
        for &(x, y) in &gaps {
            if hugetlb {
                let base = self.regions[r].start;
                let hx = base + (x - base).div_ceil(HUGE_PAGES) * HUGE_PAGES;
                let hy = base + (y - base) / HUGE_PAGES * HUGE_PAGES;
                if hx < hy {
                    self.discard(r, hx, hy)?;
                    out.changed += hy - hx;
                    out.unchanged += (y - x) - (hy - hx);
                } else {
                    out.unchanged += y - x;
                }
            } else {
                self.discard(r, x, y)?;
                out.changed += y - x;
            }
        }
        Ok(out)
    }

    fn plug_range(&mut self, range: PageRange, plug: bool) -> Result<Outcome, Error> {
        let (runs, refused) = normalise(&[range])?;
        self.note_changed(&runs);
        let mut out = Outcome {
            refused,
            ..Outcome::default()
        };
        let res = self.each_part(&runs, &mut out, |m, r, a, b| m.plug_part(r, a, b, plug));
        self.counters.refused_plug += out.refused;
        res.map(|_| out)
    }

    fn plug_part(&mut self, r: usize, a: u64, b: u64, plug: bool) -> Result<Outcome, Error> {
        let mut out = Outcome::default();
        let g = &self.regions[r];
        if !g.is_hotplug() {
            out.refused = b - a;
            return Ok(out);
        }
        let bp = g.block_pages;
        let first = (a - g.start).div_ceil(bp);
        let last = (b - g.start) / bp; // exclusive
        if first >= last {
            out.refused = b - a;
            return Ok(out);
        }
        out.refused += (g.start + first * bp - a) + (b - (g.start + last * bp));
        for blk in first..last {
            let g = &self.regions[r];
            let x = g.start + blk * bp;
            let y = x + bp;
            let slot = g.first_slot + blk as u32;
            let guest_addr = x << PAGE_SHIFT;
            let size = bp << PAGE_SHIFT;
            if g.plugged[blk as usize] == plug {
                out.unchanged += bp;
                continue;
            }
            let slot_err = |message| Error::Slot {
                slot,
                guest_addr,
                size,
                message,
            };
            if plug {
                let host = g
                    .mmap()
                    .as_ptr()
                    .wrapping_add(((x - g.start) << PAGE_SHIFT) as usize);
                self.slots
                    .map(slot, guest_addr, size, host)
                    .map_err(slot_err)?;
                if let Err(e) = self.tracker.remove_range(x, bp) {
                    let _ = self.slots.unmap(slot, guest_addr, size);
                    return Err(e.into());
                }
                self.regions[r].plugged[blk as usize] = true;
            } else {
                self.slots.unmap(slot, guest_addr, size).map_err(slot_err)?;
                self.regions[r].plugged[blk as usize] = false;
                self.tracker.insert_range(x, bp, Marks::from(U))?;
                self.tracker.set_mark(x, bp, U)?;
                self.tracker.clear_mark(x, bp, B)?;
                self.release(r, x, y)?;
            }
            out.changed += bp;
        }
        Ok(out)
    }

    /// `a..b` widened to whole huge pages, clipped to region `r`.
    fn huge_bounds(&self, r: usize, a: u64, b: u64) -> (u64, u64) {
        let g = &self.regions[r];
        let x = g.start + (a - g.start) / HUGE_PAGES * HUGE_PAGES;
        let y = (g.start + (b - g.start).div_ceil(HUGE_PAGES) * HUGE_PAGES).min(g.end);
        (x, y)
    }

    /// Discards the offline, not yet discarded pages of `a..b` (on hugetlbfs: the whole huge
    /// pages around them that are wholly offline) and marks them discarded.
    fn release(&mut self, r: usize, a: u64, b: u64) -> Result<u64, Error> {
        self.release_runs(r, &[(a, b)])
    }

    /// The runs of `a..b` to discard: offline pages without D (on hugetlbfs: the whole huge pages
    /// around them whose pieces are all offline), appended to `todo`.
    fn undiscarded(&self, r: usize, a: u64, b: u64, todo: &mut Vec<(u64, u64)>) {
        let hugetlb = self.regions[r].spec.backing == Backing::HugetlbFs;
        let (a, b) = if hugetlb {
            self.huge_bounds(r, a, b)
        } else {
            (a, b)
        };
        // Coalesced runs of present pages without D.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for c in self.tracker.marked_runs(Some((a, b))) {
            if c.marks.contains(D) {
                continue;
            }
            match runs.last_mut() {
                Some(last) if last.1 == c.start => last.1 += c.len,
                _ => runs.push((c.start, c.start + c.len)),
            }
        }
        if !hugetlb {
            todo.extend(runs);
            return;
        }
        // Only huge pages whose pieces are all offline.
        for (x, y) in runs {
            let (hx, hy) = self.huge_bounds(r, x, y);
            let mut h = hx;
            while h < hy {
                if self.tracker.contains_range(h, HUGE_PAGES) {
                    match todo.last_mut() {
                        Some(last) if last.1 == h => last.1 += HUGE_PAGES,
                        Some(last) if last.1 > h => {}
                        _ => todo.push((h, h + HUGE_PAGES)),
                    }
                }
                h += HUGE_PAGES;
            }
        }
    }

    /// [`Self::undiscarded`] for many sorted, disjoint runs outside hugetlbfs, in one walk of the
    /// tracker over their span instead of one walk per run.
    fn undiscarded_many(&self, runs: &[(u64, u64)], todo: &mut Vec<(u64, u64)>) {
        let (Some(&(lo, _)), Some(&(_, hi))) = (runs.first(), runs.last()) else {
            return;
        };
        let mut i = 0;
        for c in self.tracker.marked_runs(Some((lo, hi))) {
            if c.marks.contains(D) {
                continue;
            }
            let (cs, ce) = (c.start, c.start + c.len);
            while i < runs.len() && runs[i].1 <= cs {
                i += 1;
            }
            // Runs overlapping the chunk; the last one may reach into the next chunk.
            while i < runs.len() && runs[i].0 < ce {
                let (x, y) = (cs.max(runs[i].0), ce.min(runs[i].1));
                match todo.last_mut() {
                    Some(last) if last.1 == x => last.1 = y,
                    _ => todo.push((x, y)),
                }
                if runs[i].1 > ce {
                    break;
                }
                i += 1;
            }
        }
    }

    /// [`Self::release`] for many sorted, disjoint runs of region `r`: on private anonymous
    /// backings the runs go to the kernel in batches (one `process_madvise` per 512 runs).
    fn release_runs(&mut self, r: usize, runs: &[(u64, u64)]) -> Result<u64, Error> {
        let mut todo: Vec<(u64, u64)> = Vec::new();
        if runs.len() >= 16 && self.regions[r].spec.backing != Backing::HugetlbFs {
            self.undiscarded_many(runs, &mut todo);
        } else {
            for &(a, b) in runs {
                self.undiscarded(r, a, b, &mut todo);
            }
        }
        // Runs widened to huge pages may meet or overlap their neighbours.
        coalesce(&mut todo);
        let g = &self.regions[r];
        let anonymous_private = matches!(
            g.spec.backing,
            Backing::PrivateAnonymous | Backing::PrivateAnonymousHuge
        );
        let mut done = 0;
        if anonymous_private && todo.len() >= 2 {
            let start = g.start;
            let bytes: Vec<(u64, u64)> = todo
                .iter()
                .map(|&(x, y)| ((x - start) << PAGE_SHIFT, (y - x) << PAGE_SHIFT))
                .collect();
            let res = self.batch.dontneed(g.mmap(), &bytes);
            let (ok, err) = match res {
                Ok(calls) => {
                    self.counters.discard_calls += calls;
                    (todo.len(), None)
                }
                Err((i, source)) => {
                    self.counters.discard_calls += 1;
                    (i, Some((i, source)))
                }
            };
            for &(x, y) in &todo[..ok] {
                done += self.tracker.set_mark(x, y - x, D)?;
            }
            if let Some((i, source)) = err {
                let (x, y) = todo[i];
                return Err(Error::Discard {
                    call: "process_madvise(MADV_DONTNEED)",
                    guest_addr: x << PAGE_SHIFT,
                    size: (y - x) << PAGE_SHIFT,
                    source,
                });
            }
            return Ok(done);
        }
        for (x, y) in todo {
            self.discard(r, x, y)?;
            done += self.tracker.set_mark(x, y - x, D)?;
        }
        Ok(done)
    }

    /// Releases the host backing of pages `a..b` of region `r` with the call that frees memory for
    /// its backing.
    fn discard(&mut self, r: usize, a: u64, b: u64) -> Result<(), Error> {
        let g = &self.regions[r];
        let offset = (a - g.start) << PAGE_SHIFT;
        let len = (b - a) << PAGE_SHIFT;
        let (call, res) = match g.spec.backing {
            Backing::PrivateAnonymous | Backing::PrivateAnonymousHuge => (
                "madvise(MADV_DONTNEED)",
                sys::madvise(g.mmap(), offset, len, libc::MADV_DONTNEED),
            ),
            Backing::SharedAnonymous => (
                "madvise(MADV_REMOVE)",
                sys::madvise(g.mmap(), offset, len, libc::MADV_REMOVE),
            ),
            Backing::SharedMemfd | Backing::HugetlbFs => (
                "fallocate(PUNCH_HOLE)",
                sys::punch_hole(g.file.as_ref().expect("file-backed"), offset, len),
            ),
        };
        self.counters.discard_calls += 1;
        res.map_err(|source| Error::Discard {
            call,
            guest_addr: a << PAGE_SHIFT,
            size: len,
            source,
        })
    }

    /// Blocks the backing file occupies, for file-backed regions (tests and diagnostics).
    pub fn region_file_blocks(&self, index: usize) -> Option<std::io::Result<u64>> {
        self.regions[index].file.as_ref().map(sys::file_blocks)
    }
}
