//! The guest-memory manager: regions, offline/online, discard by backing, hot-add, accounting,
//! and when deferred discards and tracker compaction happen.
//!
//! # Files
//! - `mod.rs` (this file): the manager, its public requests and accounting, its timer.
//! - [`regions`]: region specs, mappings, KVM slots ([`SlotMapper`]), splitting at boundaries.
//! - [`requests`]: what each balloon request does to the pages of one region.
//! - [`plug`]: plugging and unplugging hot-add blocks, a whole request at a time.
//! - [`discard`]: releasing host backing, and the deferred-discard queue.
//! - [`schedule`]: the pure rules for when to release and when to compact.
//!
//! # Conventions
//! - `r`: index of a region in `self.regions` (sorted by guest address).
//! - `a..b`: a half-open range of PFNs inside one region.
//! - B, U, D: the tracker marks Ballooned, Unplugged, Discarded.
//!
//! # Page states
//! A page is online (absent from the tracker) or offline with exactly one reason, B or U, and
//! with D once its backing is released. Hot-add regions are born offline (U|D, one tracker entry
//! for the whole region) and are plugged and unplugged a whole block at a time, so the tracker
//! is the one record of which blocks are plugged: a block is plugged iff none of its pages is U.
//!
//! # Requests
//! Requests take [`PageRanges`], normalised once where the guest's input entered (sorted,
//! disjoint, inside guest RAM). Pages outside guest RAM, or not in a state the request applies
//! to, are refused and counted (in the returned [`Outcome`] and in [`MemoryStats`]), never
//! touched. `Err` means the host failed (memory, a system call, the slot mapper). The parts of a
//! balloon request before the failure are applied, the rest not; every request is idempotent,
//! so a retry of the whole request counts the pages already done as unchanged (the balloon
//! device does not retry: it returns the buffer and counts `backend_errors`; the pages it could
//! not record stay backed, so nothing is lost but the memory). Plug and unplug are all or
//! nothing: virtio-mem answers BUSY and the guest retries.
//!
//! # Discard and compaction
//! Newly offline pages are recorded in the tracker and queued first, then their backing is
//! released with the call that frees it for the region's backing (see [`Backing`]), one call
//! per coalesced run, or on private anonymous regions one `process_madvise` per 512 runs; so an
//! online page is never discarded. `offline` only queues, so the guest's ack never waits for the
//! kernel, and makes no system call of its own: [`MemoryManager::tick`] releases the queue when a
//! batch is full or the queue went idle, and compacts the tracker once it has been left alone for
//! a while (see [`schedule`]). Whoever owns the manager calls `tick` when
//! [`MemoryManager::wake_fd`] (a timerfd, for deadlines ahead) is readable and when
//! [`MemoryManager::tick_due`] says work is due now (the VMM asks after every turn of its event
//! loop); [`MemoryManager::flush_discards`] releases the queue at once. Free page reports and
//! unplug discard at once.

mod discard;
mod plug;
mod regions;
mod requests;
pub mod schedule;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::timerfd::TimerFd;

use crate::error::Error;
use crate::ranges::{PageRanges, RamMap};
use crate::sys;
use crate::tracker::{Mark, Marks, Tracker};
use crate::types::*;

pub use regions::SlotMapper;
use regions::{map_region, validate_spec, Region};
use schedule::{Clock, Schedule, SystemClock};

const B: Mark = Mark::Ballooned;
const U: Mark = Mark::Unplugged;
const D: Mark = Mark::Discarded;

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    free_reported_pages: u64,
    refused_offline: u64,
    refused_online: u64,
    refused_free: u64,
    refused_plug: u64,
    discard_calls: u64,
    compacted_leaves: u64,
    released_pages: u64,
    release_errors: u64,
}

/// What one [`MemoryManager::tick`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    /// Pages whose deferred discard was released.
    pub released_pages: u64,
    /// Tracker leaves compacted.
    pub compacted_leaves: u64,
}

/// Owner of guest RAM. `Send`; the VMM shares it as `Arc<Mutex<MemoryManager>>`.
pub struct MemoryManager {
    regions: Vec<Region>,
    ram: RamMap,
    guest_memory: GuestMemoryMmap<()>,
    tracker: Tracker,
    slots: Box<dyn SlotMapper>,
    /// Deferred discards: (region, a, b).
    queue: Vec<(usize, u64, u64)>,
    /// Batched `MADV_DONTNEED` for flushes of many runs.
    batch: sys::BatchDontneed,
    counters: Counters,
    /// The pages whose tracker entries requests changed since the last `compact`, as one
    /// span: what `compact` walks (a settled balloon's tree is not walked again).
    changed: Option<(u64, u64)>,
    clock: Arc<dyn Clock>,
    schedule: Schedule,
    /// Fires at the schedule's next deadline; the event loop calls `tick` when it does. Work
    /// due at once (a full batch) does not use it: the event loop asks [`Self::tick_due`] after
    /// every turn, so the guest's ack path makes no system call to wake it.
    timer: TimerFd,
    /// The deadline `timer` is armed for.
    armed: Option<Instant>,
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
            let (mmap, file, guards) = map_region(s)?;
            let mapping = Arc::new(
                GuestRegionMmap::new(mmap, GuestAddress(s.guest_addr))
                    .expect("region end checked against the address space"),
            );
            let start = s.guest_addr >> PAGE_SHIFT;
            let end = start + (s.size >> PAGE_SHIFT);
            let (first_slot, block_pages) = match s.kind {
                RegionKind::BootRam => {
                    next_boot_slot += 1;
                    (next_boot_slot - 1, 0)
                }
                RegionKind::Hotplug { block_size } => {
                    let first = next_block_slot;
                    next_block_slot = next_block_slot.saturating_add((s.size / block_size) as u32);
                    tracker.insert_range(start, end - start, Marks::of(&[U, D]))?;
                    (first, block_size >> PAGE_SHIFT)
                }
            };
            regions.push(Region {
                spec: *s,
                start,
                end,
                mapping,
                file,
                first_slot,
                block_pages,
                _guards: guards,
            });
        }
        let guest_memory =
            GuestMemoryMmap::from_arc_regions(regions.iter().map(|g| g.mapping.clone()).collect())?;
        let ram = RamMap::new(
            regions
                .iter()
                .map(|g| PageRange::new(g.start, g.end - g.start)),
        );
        let timer_err = |e: vmm_sys_util::errno::Error| {
            Error::Timer(std::io::Error::from_raw_os_error(e.errno()))
        };
        let timer = TimerFd::new().map_err(timer_err)?;
        register_boot_slots(&regions, slots.as_mut())?;
        Ok(MemoryManager {
            regions,
            ram,
            guest_memory,
            tracker,
            slots,
            queue: Vec::new(),
            batch: sys::BatchDontneed::open(),
            counters: Counters::default(),
            changed: None,
            clock: Arc::new(SystemClock),
            schedule: Schedule::default(),
            timer,
            armed: None,
        })
    }

    /// All regions, for devices and the loader.
    pub fn guest_memory(&self) -> &GuestMemoryMmap<()> {
        &self.guest_memory
    }

    /// Guest RAM as page spans: what requests are normalised against.
    pub fn ram(&self) -> &RamMap {
        &self.ram
    }

    /// `ranges` normalised against this guest's RAM (for callers that hold raw ranges: the
    /// devices normalise their guest buffers themselves).
    pub fn page_ranges(&self, ranges: &[PageRange]) -> PageRanges {
        PageRanges::from_ranges(ranges, &self.ram)
    }

    /// The offline-page tracker (read-only).
    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    /// Where the manager reads the time for its schedule (tests step a manual clock; feature
    /// `testing`).
    #[cfg(any(test, feature = "testing"))]
    pub fn set_clock(&mut self, clock: Arc<dyn Clock>) {
        self.clock = clock;
    }

    /// Balloon inflate: takes online pages offline as [`Reason::Ballooned`] and queues them
    /// for release (see [`Self::tick`]). Refused: pages outside guest RAM and unplugged pages;
    /// already ballooned pages are unchanged.
    pub fn offline(&mut self, pages: &PageRanges) -> Result<Outcome, Error> {
        let now = self.clock.now();
        self.note_changed_ranges(pages);
        let mut out = Outcome {
            refused: pages.outside_ram(),
            ..Outcome::default()
        };
        let queued_before = self.queue.len();
        let res = self.each_part(pages, &mut out, |m, r, a, b| m.offline_part(r, a, b));
        if self.queue.len() > queued_before {
            self.schedule.queued(out.changed, now);
        }
        if out.changed > 0 {
            self.schedule.changed(now);
            self.arm_timer(now);
        }
        self.counters.refused_offline += out.refused;
        res.map(|_| out)
    }

    /// Balloon deflate: brings ballooned pages back online. They read as zeros if they were
    /// discarded. Refused: pages outside guest RAM and unplugged pages; online pages are
    /// unchanged.
    pub fn online(&mut self, pages: &PageRanges) -> Result<Outcome, Error> {
        let now = self.clock.now();
        self.note_changed_ranges(pages);
        let mut out = Outcome {
            refused: pages.outside_ram(),
            ..Outcome::default()
        };
        let res = self.each_part(pages, &mut out, |m, r, a, b| m.online_part(r, a, b));
        if out.changed > 0 {
            self.schedule.changed(now);
            self.arm_timer(now);
        }
        self.counters.refused_online += out.refused;
        res.map(|_| out)
    }

    /// Every ballooned page back online (a balloon reset). Queued discards are released first:
    /// the pages were ballooned until now, so the guest gets them back as if released right
    /// after their ack.
    pub fn online_all(&mut self) -> Result<Outcome, Error> {
        self.flush_discards()?;
        let mut total = Outcome::default();
        loop {
            let runs: Vec<PageRange> = self
                .offline_runs(Some(Reason::Ballooned), None, 1024)
                .into_iter()
                .map(|(r, _)| r)
                .collect();
            if runs.is_empty() {
                break;
            }
            let o = self.online(&self.page_ranges(&runs))?;
            total += o;
            if o.changed == 0 {
                // Nothing moved: stop rather than spin.
                break;
            }
        }
        Ok(total)
    }

    /// Free page reporting: the guest says these online pages are free. Their backing is released
    /// now; they stay online and are not tracked. Ballooned pages count as unchanged; unplugged
    /// pages and pages outside guest RAM are refused. On hugetlbfs only whole huge pages inside a
    /// reported run are released; the other pages count as unchanged.
    pub fn discard_free(&mut self, pages: &PageRanges) -> Result<Outcome, Error> {
        let mut out = Outcome {
            refused: pages.outside_ram(),
            ..Outcome::default()
        };
        let res = self.each_part(pages, &mut out, |m, r, a, b| m.free_part(r, a, b));
        self.counters.refused_free += out.refused;
        self.counters.free_reported_pages += out.changed;
        res.map(|_| out)
    }

    /// Plugs the whole hot-add blocks in `range`: maps each block's slot and brings its pages
    /// online. Pages outside hot-add regions or in blocks only partly covered are refused.
    pub fn plug(&mut self, range: PageRange) -> Result<Outcome, Error> {
        self.plug_and_note(range, true)
    }

    /// Unplugs the whole hot-add blocks in `range`: unmaps each block's slot, takes all its pages
    /// offline as `Unplugged` (ballooned ones included) and discards their backing at once.
    pub fn unplug(&mut self, range: PageRange) -> Result<Outcome, Error> {
        self.plug_and_note(range, false)
    }

    fn plug_and_note(&mut self, range: PageRange, plug: bool) -> Result<Outcome, Error> {
        let now = self.clock.now();
        let out = self.plug_range(range, plug)?;
        if out.changed > 0 {
            self.schedule.changed(now);
            self.arm_timer(now);
        }
        Ok(out)
    }

    /// The plugged pages of `range` (pages of hot-add regions that are not unplugged), as
    /// sorted runs. What virtio-mem derives its block states from.
    pub fn plugged_runs(&self, range: PageRange) -> Vec<PageRange> {
        let (a, b) = (range.start.0, range.end());
        let mut out = Vec::new();
        for g in &self.regions {
            if g.is_hotplug() && g.start < b && a < g.end {
                self.plugged_in(a.max(g.start), b.min(g.end), &mut out);
            }
        }
        out
    }

    /// Shrinks the tracker: leaves holding few offline pages (at most 63 of their 4096) become
    /// sparse leaves, 2 bytes a page instead of a 528-byte bitmap (`Tracker::compact`). The
    /// tracker's updates never do this themselves, so that they stay bit flips; [`Self::tick`]
    /// calls it once the tracker has been left alone for a while. Only the span of pages that
    /// requests changed since the last call is walked. Returns the leaves turned.
    pub fn compact(&mut self) -> u64 {
        self.schedule.compacted();
        let Some((a, b)) = self.changed.take() else {
            return 0;
        };
        let n = self.tracker.compact(a, b - a) as u64;
        self.counters.compacted_leaves += n;
        n
    }

    fn note_changed_ranges(&mut self, ranges: &PageRanges) {
        let s = ranges.as_slice();
        if let (Some(first), Some(last)) = (s.first(), s.last()) {
            self.note_changed(first.start.0, last.end());
        }
    }

    /// Widens the span `compact` walks to `a..b`.
    fn note_changed(&mut self, a: u64, b: u64) {
        self.changed = Some(match self.changed {
            Some((x, y)) => (x.min(a), y.max(b)),
            None => (a, b),
        });
    }

    // ---- The schedule's timer ----

    /// A timerfd that becomes readable at the schedule's next deadline: the VMM watches it on
    /// its event loop and calls [`Self::tick`] when it is. It stays open as long as the manager.
    /// Work due at once is not signalled through it: see [`Self::tick_due`].
    pub fn wake_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// When [`Self::tick`] next has something to do, if anything is pending.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.schedule.next_deadline()
    }

    /// Whether [`Self::tick`] has something to do now. A request can make work due at once (an
    /// inflate that fills a release batch) without any system call to wake the event loop, so
    /// the loop asks this after every turn: a clock read and a compare.
    pub fn tick_due(&self) -> bool {
        self.schedule
            .next_deadline()
            .is_some_and(|d| d <= self.clock.now())
    }

    /// Does what is due now: releases the deferred discards if a batch is full or the queue has
    /// been idle for [`schedule::RELEASE_IDLE_DELAY`], compacts the tracker if it has been left
    /// alone for [`schedule::COMPACT_IDLE_DELAY`]. Then arms the timer for the next deadline.
    /// A failed release is kept queued and tried again later; its error is returned.
    pub fn tick(&mut self) -> Result<Tick, Error> {
        let now = self.clock.now();
        let due = self.schedule.due(now);
        let mut tick = Tick::default();
        let mut res = Ok(());
        if due.release {
            match self.flush_discards() {
                Ok(n) => {
                    tick.released_pages = n;
                    self.counters.released_pages += n;
                }
                Err(e) => {
                    self.counters.release_errors += 1;
                    res = Err(e);
                }
            }
        }
        if due.compact {
            tick.compacted_leaves = self.compact();
            if tick.compacted_leaves > 0 {
                log::info!(
                    "memory: tracker left alone for {COMPACT_IDLE:?}: {} leaves compacted",
                    tick.compacted_leaves
                );
            }
        }
        // Re-arming (or disarming) also clears the timer's expiry, so the event loop stops
        // reporting it.
        self.armed = None;
        match self.schedule.next_deadline() {
            Some(d) => self.arm_at(d, now),
            None => {
                if let Err(e) = self.timer.clear() {
                    log::error!("memory: cannot disarm the discard timer: {e}");
                }
            }
        }
        res.map(|_| tick)
    }

    /// Arms the timer for the schedule's next deadline unless it is armed early enough. Work
    /// due now needs no re-arming when the timer is armed at all: the event loop finds it
    /// through [`Self::tick_due`] after this turn, and the armed timer is the backstop. So a
    /// burst of inflates arms the timer once, at its first request, and the requests after it
    /// (the guest waits for each ack) make no timer system call.
    fn arm_timer(&mut self, now: Instant) {
        let Some(d) = self.schedule.next_deadline() else {
            return;
        };
        match self.armed {
            Some(armed) if armed <= d || d <= now => {}
            _ => self.arm_at(d, now),
        }
    }

    fn arm_at(&mut self, deadline: Instant, now: Instant) {
        // A zero duration would disarm the timer.
        let after = deadline
            .saturating_duration_since(now)
            .max(Duration::from_micros(1));
        match self.timer.reset(after, None) {
            Ok(()) => self.armed = Some(deadline),
            Err(e) => log::error!("memory: cannot arm the discard timer: {e}"),
        }
    }

    // ---- Accounting ----

    /// Where the guest's memory is now (online, offline by reason, released) and the cumulative
    /// counters.
    pub fn stats(&self) -> MemoryStats {
        let t = &self.tracker;
        let total: u64 = self.regions.iter().map(|g| g.spec.size).sum();
        let offline = t.len() * PAGE_SIZE;
        let hotplug_total: u64 = self
            .regions
            .iter()
            .filter(|g| g.is_hotplug())
            .map(|g| g.spec.size)
            .sum();
        // Unplugged pages lie only in hot-add regions.
        let unplugged = t.count_marked(U) * PAGE_SIZE;
        MemoryStats {
            total_bytes: total,
            online_bytes: total - offline,
            ballooned_bytes: t.count_marked(B) * PAGE_SIZE,
            unplugged_bytes: unplugged,
            discarded_bytes: t.count_marked(D) * PAGE_SIZE,
            pending_discard_bytes: (t.len() - t.count_marked(D)) * PAGE_SIZE,
            hotplug_total_bytes: hotplug_total,
            hotplug_plugged_bytes: hotplug_total - unplugged,
            free_reported_bytes: self.counters.free_reported_pages * PAGE_SIZE,
            refused_offline_pages: self.counters.refused_offline,
            refused_online_pages: self.counters.refused_online,
            refused_free_pages: self.counters.refused_free,
            refused_plug_pages: self.counters.refused_plug,
            discard_calls: self.counters.discard_calls,
            released_pages: self.counters.released_pages,
            release_errors: self.counters.release_errors,
            tracker_heap_bytes: t.heap_bytes() as u64,
            tracker_compacted_leaves: self.counters.compacted_leaves,
        }
    }

    /// The regions as created: where each is in the guest and in the host, and how much is plugged.
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
                plugged_bytes: match g.spec.kind {
                    RegionKind::BootRam => g.spec.size,
                    RegionKind::Hotplug { .. } => {
                        let mut runs = Vec::new();
                        self.plugged_in(g.start, g.end, &mut runs);
                        runs.iter().map(|p| p.bytes()).sum()
                    }
                },
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
        Ok(self.resident_bytes_by_region()?.iter().sum())
    }

    /// Host-resident bytes of each region, in the order of [`MemoryManager::regions`]: what a
    /// hot-add region costs the host is its own figure, apart from boot RAM's.
    pub fn resident_bytes_by_region(&self) -> std::io::Result<Vec<u64>> {
        self.regions
            .iter()
            .map(|g| Ok(sys::resident_pages(g.mmap(), 0, g.spec.size)? * PAGE_SIZE))
            .collect()
    }

    /// Blocks the backing file occupies, for file-backed regions (tests; feature `testing`).
    #[cfg(any(test, feature = "testing"))]
    pub fn region_file_blocks(&self, index: usize) -> Option<std::io::Result<u64>> {
        self.regions[index].file.as_ref().map(sys::file_blocks)
    }
}

/// Registers every boot RAM region as its KVM slot. On a failure the slots already registered
/// are removed again, since the mappings go when `new` fails.
fn register_boot_slots(regions: &[Region], slots: &mut dyn SlotMapper) -> Result<(), Error> {
    let boot: Vec<&Region> = regions
        .iter()
        .filter(|g| g.spec.kind == RegionKind::BootRam)
        .collect();
    for (i, g) in boot.iter().enumerate() {
        // SAFETY: the whole mapping of region `g`, which the manager holds until its `Drop`;
        // `Drop`, or the error path below when `new` fails, removes this slot first.
        let res = unsafe {
            slots.map(
                g.first_slot,
                g.spec.guest_addr,
                g.spec.size,
                g.mmap().as_ptr(),
            )
        };
        if let Err(message) = res {
            for done in &boot[..i] {
                let _ = slots.unmap(done.first_slot, done.spec.guest_addr, done.spec.size);
            }
            return Err(Error::Slot {
                slot: g.first_slot,
                guest_addr: g.spec.guest_addr,
                size: g.spec.size,
                message,
            });
        }
    }
    Ok(())
}

const COMPACT_IDLE: Duration = schedule::COMPACT_IDLE_DELAY;

/// The KVM slots go before the mappings they point at: the guest must never reach memory the
/// host has unmapped (or mapped again for something else).
impl Drop for MemoryManager {
    fn drop(&mut self) {
        let mut plugged = Vec::new();
        for r in 0..self.regions.len() {
            let g = &self.regions[r];
            if !g.is_hotplug() {
                let _ = self
                    .slots
                    .unmap(g.first_slot, g.spec.guest_addr, g.spec.size);
                continue;
            }
            plugged.clear();
            self.plugged_in(g.start, g.end, &mut plugged);
            for p in &plugged {
                let g = &self.regions[r];
                let (first, last) = (
                    (p.start.0 - g.start) / g.block_pages,
                    (p.end() - g.start) / g.block_pages,
                );
                for blk in first..last {
                    let k = g.block(blk);
                    let _ = self.slots.unmap(k.slot, k.guest_addr, k.size);
                }
            }
        }
    }
}
