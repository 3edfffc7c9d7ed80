//! A self-contained [`BalloonBackend`] that really releases host memory: a bitmap of ballooned
//! pages per guest RAM region and one `madvise(MADV_DONTNEED)` (or, for file-backed regions,
//! one `fallocate(PUNCH_HOLE)`) per coalesced run.
//!
//! Two modes:
//! - [`DiscardBackend::new`]: inflate releases the memory before it returns (the guest's ack waits
//!   for the system calls).
//! - [`DiscardBackend::after_ack`]: inflate marks the pages ballooned and queues the ranges; the
//!   device calls [`BalloonBackend::release_pending`] on its own thread after acknowledging
//!   (used ring written, guest interrupted), once per 16 MiB or when the inflate queue goes
//!   idle, so the guest's wait excludes the system calls and no thread hand-off is involved.
//!   The queued ranges of many requests are sorted and merged before the release. The release discards, under the bitmap
//!   lock, only pages still ballooned, so a page deflated in between is never discarded.
//!   Free page reports stay synchronous: the guest reuses reported pages as soon as the buffer
//!   comes back, so their discard must happen before the ack.
//!
//! (A worker-thread variant was measured and dropped: on a loaded host the woken worker
//! preempted the event loop and made the ack slower than releasing inline.)
//!
//! It is the benchmark's "real memory backend" and a stand-in for the VMM until memory/'s
//! manager is wired in; it does not know about hot-add regions.

use std::os::fd::AsRawFd;
use std::sync::{Mutex, MutexGuard};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::backend::{BackendError, BalloonBackend, Outcome, PageRange, PAGE_SHIFT, PAGE_SIZE};

type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

struct RegionBits {
    start_pfn: u64,
    pages: u64,
    /// One bit per page: set while ballooned.
    bits: Vec<u64>,
}

impl RegionBits {
    fn get(&self, page: u64) -> bool {
        self.bits[(page / 64) as usize] & (1 << (page % 64)) != 0
    }
}

struct Inner {
    mem: GuestMemoryMmap,
    batch: BatchDiscard,
    regions: Mutex<Vec<RegionBits>>,
    /// Ranges inflated but not yet released (after-ack mode).
    pending: Mutex<Vec<PageRange>>,
}

/// Ballooned-page bitmap over guest RAM plus real discard of host backing.
pub struct DiscardBackend {
    inner: Inner,
    after_ack: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DiscardBackend {
    /// Synchronous release: inflate returns once the memory is released.
    pub fn new(mem: GuestMemoryMmap) -> Self {
        let regions = mem
            .iter()
            .map(|r| {
                let pages = r.len() >> PAGE_SHIFT;
                RegionBits {
                    start_pfn: r.start_addr().0 >> PAGE_SHIFT,
                    pages,
                    bits: vec![0; pages.div_ceil(64) as usize],
                }
            })
            .collect();
        Self {
            inner: Inner {
                batch: BatchDiscard::open(),
                mem,
                regions: Mutex::new(regions),
                pending: Mutex::default(),
            },
            after_ack: false,
        }
    }

    /// Release right after the ack, on the device's thread (see the module documentation).
    pub fn after_ack(mem: GuestMemoryMmap) -> Self {
        let mut b = Self::new(mem);
        b.after_ack = true;
        b
    }

    /// Pages currently ballooned.
    pub fn ballooned_pages(&self) -> u64 {
        lock(&self.inner.regions)
            .iter()
            .flat_map(|r| r.bits.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Whether `pfn` is ballooned.
    pub fn is_ballooned(&self, pfn: u64) -> bool {
        lock(&self.inner.regions)
            .iter()
            .any(|r| pfn >= r.start_pfn && pfn < r.start_pfn + r.pages && r.get(pfn - r.start_pfn))
    }

    /// Whether discards go to the kernel in batches (`process_madvise`), or one call per run.
    pub fn batched_discard(&self) -> bool {
        self.inner.batch.usable()
    }

    /// Releases what is queued now (after-ack mode; nothing to do otherwise).
    pub fn flush(&self) {
        if let Err(e) = self.release_pending() {
            log::error!("balloon: release failed: {e}");
        }
    }

    /// Applies `f(region bits, first page index, count)` to each region part of `range`; parts
    /// outside guest RAM are counted as refused.
    fn for_each_part(
        regions: &mut [RegionBits],
        range: PageRange,
        mut f: impl FnMut(&mut RegionBits, u64, u64),
    ) -> u64 {
        let mut covered = 0;
        for r in regions.iter_mut() {
            let lo = range.start.0.max(r.start_pfn);
            let hi = range.end().min(r.start_pfn + r.pages);
            if lo < hi {
                f(r, lo - r.start_pfn, hi - lo);
                covered += hi - lo;
            }
        }
        range.count - covered
    }
}

impl Inner {
    /// Releases many runs: private anonymous parts in one `process_madvise` call per
    /// [`IOV_BATCH`] runs where the kernel allows it, the rest one call per run.
    fn discard_many(&self, runs: &[PageRange]) -> Result<(), BackendError> {
        if runs.len() < 2 || !self.batch.usable() {
            return runs.iter().try_for_each(|&r| self.discard(r));
        }
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(runs.len().min(IOV_BATCH));
        let mut parts: Vec<PageRange> = Vec::with_capacity(iov.capacity());
        for &run in runs {
            let host = self.anonymous_host_range(run);
            match host {
                Some((base, len)) => {
                    iov.push(libc::iovec {
                        iov_base: base.cast(),
                        iov_len: len as usize,
                    });
                    parts.push(run);
                }
                None => self.discard(run)?,
            }
            if iov.len() == IOV_BATCH {
                self.flush_iov(&mut iov, &mut parts)?;
            }
        }
        self.flush_iov(&mut iov, &mut parts)
    }

    fn flush_iov(
        &self,
        iov: &mut Vec<libc::iovec>,
        parts: &mut Vec<PageRange>,
    ) -> Result<(), BackendError> {
        if iov.is_empty() {
            return Ok(());
        }
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        let done = self.batch.dontneed(iov).unwrap_or(0);
        if done < total {
            // Unsupported or partial: finish run by run (re-discarding is harmless).
            let mut skipped = 0usize;
            for (v, &run) in iov.iter().zip(parts.iter()) {
                if skipped + v.iov_len <= done {
                    skipped += v.iov_len;
                    continue;
                }
                self.discard(run)?;
            }
        }
        iov.clear();
        parts.clear();
        Ok(())
    }

    /// Host address and length of `run` if it lies in one private anonymous region.
    fn anonymous_host_range(&self, run: PageRange) -> Option<(*mut u8, u64)> {
        let addr = GuestAddress(run.start.0 << PAGE_SHIFT);
        let region = self.mem.find_region(addr)?;
        if region.file_offset().is_some() {
            return None;
        }
        let offset = addr.0 - region.start_addr().0;
        let len = run.count * PAGE_SIZE;
        if offset.checked_add(len)? > region.len() {
            return None;
        }
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(offset))
            .ok()?;
        Some((host, len))
    }

    fn discard(&self, range: PageRange) -> Result<(), BackendError> {
        let mut cur = range.start.0;
        while cur < range.end() {
            let addr = GuestAddress(cur << PAGE_SHIFT);
            let Some(region) = self.mem.find_region(addr) else {
                return Err(BackendError::NotManaged { range });
            };
            let region_end = (region.start_addr().0 + region.len()) >> PAGE_SHIFT;
            let stop = range.end().min(region_end);
            let offset = addr.0 - region.start_addr().0;
            let len = (stop - cur) * PAGE_SIZE;
            let part = PageRange::new(cur, stop - cur);
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(offset))
                .map_err(|_| BackendError::NotManaged { range: part })?;
            let res = match region.file_offset() {
                Some(fo) => punch_hole(fo.file(), fo.start() + offset, len),
                None => madvise_dontneed(host, len),
            };
            res.map_err(|source| BackendError::Discard {
                range: part,
                host_addr: host as u64,
                len,
                source,
            })?;
            cur = stop;
        }
        Ok(())
    }
}

/// Maximal runs of `range` whose pages are ballooned.
fn ballooned_runs(regions: &[RegionBits], range: PageRange) -> Vec<PageRange> {
    let mut runs: Vec<PageRange> = Vec::new();
    for r in regions {
        let lo = range.start.0.max(r.start_pfn);
        let hi = range.end().min(r.start_pfn + r.pages);
        for pfn in lo..hi {
            if r.get(pfn - r.start_pfn) {
                match runs.last_mut() {
                    Some(run) if run.end() == pfn => run.count += 1,
                    _ => runs.push(PageRange::new(pfn, 1)),
                }
            }
        }
    }
    runs
}

/// Runs per `process_madvise` call (the kernel's UIO_MAXIOV is 1024).
const IOV_BATCH: usize = 512;

/// `process_madvise(2)` on this process: one system call for many ranges. Linux 6.13 allows
/// any advice (MADV_DONTNEED included) when the target is the caller itself, and 6.15 batches
/// the TLB flushes of a vector. On older kernels the first call fails and the backend falls back
/// to one madvise per run for good.
struct BatchDiscard {
    pidfd: Option<std::os::fd::OwnedFd>,
    supported: std::sync::atomic::AtomicBool,
}

impl BatchDiscard {
    fn open() -> Self {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
        let pidfd = (fd >= 0).then(|| {
            // SAFETY: `fd` is a fresh descriptor we own from here on.
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) }
        });
        BatchDiscard {
            supported: std::sync::atomic::AtomicBool::new(pidfd.is_some()),
            pidfd,
        }
    }

    fn usable(&self) -> bool {
        self.supported.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Returns the bytes advised; on failure marks the call unsupported and returns an error.
    fn dontneed(&self, iov: &[libc::iovec]) -> std::io::Result<usize> {
        let Some(fd) = &self.pidfd else {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSYS));
        };
        // SAFETY: every iovec describes a page-aligned range of a live private anonymous guest
        // mapping (built by `anonymous_host_range`); the kernel only reads the vector. Dropping
        // page contents is what the guest asked for and no Rust reference points into them.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_process_madvise,
                std::os::fd::AsRawFd::as_raw_fd(fd),
                iov.as_ptr(),
                iov.len(),
                libc::MADV_DONTNEED,
                0u32,
            )
        };
        if ret < 0 {
            let e = std::io::Error::last_os_error();
            self.supported
                .store(false, std::sync::atomic::Ordering::Relaxed);
            log::info!("balloon: process_madvise unavailable ({e}); one madvise per run");
            return Err(e);
        }
        Ok(ret as usize)
    }
}

/// `madvise(MADV_DONTNEED)`: private anonymous pages read as zero afterwards.
pub fn madvise_dontneed(host: *mut u8, len: u64) -> std::io::Result<()> {
    // SAFETY: callers pass a host address of a live guest mapping and a length inside it;
    // MADV_DONTNEED on guest RAM only drops page contents (the guest asked for exactly that), it
    // cannot invalidate Rust references because the device holds none into these pages.
    let ret = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `fallocate(PUNCH_HOLE | KEEP_SIZE)` at a file offset (memfd or other shared file backing).
pub fn punch_hole(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: plain system call on a descriptor we borrow; no memory is passed.
    let ret = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn test_and_set(r: &mut RegionBits, first: u64, count: u64, set: bool) -> u64 {
    let mut changed = 0;
    for p in first..first + count {
        let (w, b) = ((p / 64) as usize, p % 64);
        let was = r.bits[w] & (1 << b) != 0;
        if was != set {
            r.bits[w] ^= 1 << b;
            changed += 1;
        }
    }
    changed
}

impl BalloonBackend for DiscardBackend {
    fn inflate(&self, ranges: &[PageRange]) -> Result<Outcome, BackendError> {
        let mut out = Outcome::default();
        let mut regions = lock(&self.inner.regions);
        for &range in ranges {
            out.refused += Self::for_each_part(&mut regions, range, |r, first, count| {
                let c = test_and_set(r, first, count, true);
                out.changed += c;
                out.unchanged += count - c;
            });
        }
        if self.after_ack {
            drop(regions);
            lock(&self.inner.pending).extend_from_slice(ranges);
        } else {
            // Discarding an already discarded page is harmless.
            self.inner.discard_many(ranges)?;
        }
        Ok(out)
    }

    fn deflate(&self, ranges: &[PageRange]) -> Result<Outcome, BackendError> {
        let mut out = Outcome::default();
        let mut regions = lock(&self.inner.regions);
        for &range in ranges {
            out.refused += Self::for_each_part(&mut regions, range, |r, first, count| {
                let c = test_and_set(r, first, count, false);
                out.changed += c;
                out.unchanged += count - c;
            });
        }
        Ok(out)
    }

    fn report_free(&self, ranges: &[PageRange]) -> Result<Outcome, BackendError> {
        let mut out = Outcome::default();
        // Held across the discards: a ballooned page cannot be deflated (and reused) while its
        // neighbours are being released.
        let mut regions = lock(&self.inner.regions);
        let mut runs = Vec::new();
        for &range in ranges {
            out.refused += Self::for_each_part(&mut regions, range, |r, first, count| {
                // Discard the pages that are not ballooned (ballooned ones are discarded already
                // and stay counted as ballooned).
                for p in first..first + count {
                    if r.get(p) {
                        out.unchanged += 1;
                    } else {
                        out.changed += 1;
                        let pfn = r.start_pfn + p;
                        match runs.last_mut() {
                            Some(PageRange { start, count }) if start.0 + *count == pfn => {
                                *count += 1
                            }
                            _ => runs.push(PageRange::new(pfn, 1)),
                        }
                    }
                }
            });
        }
        self.inner.discard_many(&runs)?;
        drop(regions);
        Ok(out)
    }

    fn release_pending(&self) -> Result<u64, BackendError> {
        if !self.after_ack {
            return Ok(0);
        }
        let queued = std::mem::take(&mut *lock(&self.inner.pending));
        if queued.is_empty() {
            return Ok(0);
        }
        // Ranges of many requests: sorted and merged, neighbouring requests become one run and
        // the kernel walks the page tables in order.
        let mut queued = queued;
        queued.sort_unstable_by_key(|r| r.start);
        let mut merged: Vec<PageRange> = Vec::with_capacity(queued.len());
        for r in queued {
            match merged.last_mut() {
                Some(m) if m.end() >= r.start.0 => m.count = m.end().max(r.end()) - m.start.0,
                _ => merged.push(r),
            }
        }
        let regions = lock(&self.inner.regions);
        let runs: Vec<PageRange> = merged
            .iter()
            .flat_map(|&range| ballooned_runs(&regions, range))
            .collect();
        self.inner.discard_many(&runs)?;
        Ok(runs.iter().map(|r| r.count).sum())
    }

    fn deflate_all(&self) -> Result<Outcome, BackendError> {
        let mut regions = lock(&self.inner.regions);
        let mut out = Outcome::default();
        for r in regions.iter_mut() {
            for w in r.bits.iter_mut() {
                out.changed += u64::from(w.count_ones());
                *w = 0;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    fn resident(mem: &GuestMemoryMmap, pfn: u64) -> bool {
        let host = mem.get_host_address(GuestAddress(pfn << 12)).unwrap();
        let mut vec = [0u8; 1];
        // SAFETY: mincore on one page of a live mapping, writing one byte into `vec`.
        let ret = unsafe { libc::mincore(host.cast(), 4096, vec.as_mut_ptr()) };
        assert_eq!(ret, 0);
        vec[0] & 1 != 0
    }

    fn touch(mem: &GuestMemoryMmap, pfn: u64, v: u8) {
        mem.write_obj(v, GuestAddress(pfn << 12)).unwrap();
    }

    fn read(mem: &GuestMemoryMmap, pfn: u64) -> u8 {
        mem.read_obj(GuestAddress(pfn << 12)).unwrap()
    }

    #[test]
    fn inflate_releases_and_deflate_keeps_zeroes() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 22)]).unwrap();
        let b = DiscardBackend::new(mem.clone());
        for p in 10..20 {
            touch(&mem, p, 7);
        }
        let o = b.inflate(&[PageRange::new(10, 5)]).unwrap();
        assert_eq!(o.changed, 5);
        assert!(!resident(&mem, 10));
        assert!(resident(&mem, 15));
        assert_eq!(read(&mem, 12), 0, "discarded pages read as zero");
        assert_eq!(b.deflate(&[PageRange::new(10, 10)]).unwrap().changed, 5);
        assert_eq!(b.ballooned_pages(), 0);
    }

    #[test]
    fn scattered_runs_are_all_released() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 24)]).unwrap();
        let b = DiscardBackend::new(mem.clone());
        let runs: Vec<PageRange> = (0..600)
            .map(|i| PageRange::new(16 + i * 4, 1 + i % 2))
            .collect();
        for r in &runs {
            for p in r.start.0..r.end() + 1 {
                touch(&mem, p, 5);
            }
        }
        b.inflate(&runs).unwrap();
        eprintln!("process_madvise batching: {}", b.batched_discard());
        for r in &runs {
            for p in r.start.0..r.end() {
                assert!(!resident(&mem, p), "page {p:#x} still resident");
            }
            assert_eq!(read(&mem, r.end()), 5, "neighbour {:#x} kept", r.end());
        }
    }

    #[test]
    fn report_free_skips_ballooned_and_counts_discarded() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 22)]).unwrap();
        let b = DiscardBackend::new(mem.clone());
        b.inflate(&[PageRange::new(11, 1)]).unwrap();
        for p in 10..14 {
            touch(&mem, p, 1);
        }
        let o = b.report_free(&[PageRange::new(10, 4)]).unwrap();
        assert_eq!((o.changed, o.unchanged), (3, 1));
        assert!(!resident(&mem, 10));
        assert!(b.is_ballooned(11));
        assert!(!b.is_ballooned(10));
    }

    #[test]
    fn after_ack_release_skips_pages_deflated_meanwhile() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 22)]).unwrap();
        let b = DiscardBackend::after_ack(mem.clone());
        for p in 16..32 {
            touch(&mem, p, 4);
        }
        b.inflate(&[PageRange::new(16, 16)]).unwrap();
        assert!(resident(&mem, 16), "nothing released before the ack");
        b.deflate(&[PageRange::new(16, 8)]).unwrap();
        touch(&mem, 16, 8);
        assert_eq!(b.release_pending().unwrap(), 8);
        assert_eq!(read(&mem, 16), 8);
        assert!(resident(&mem, 17));
        assert!(!resident(&mem, 24));
        assert_eq!(b.release_pending().unwrap(), 0);
    }

    #[test]
    fn after_ack_release_is_idempotent_over_rounds() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 24)]).unwrap();
        let b = DiscardBackend::after_ack(mem.clone());
        for round in 0..100u64 {
            let base = 16 + (round % 50) * 64;
            for p in base..base + 64 {
                touch(&mem, p, 3);
            }
            b.inflate(&[PageRange::new(base, 64)]).unwrap();
            b.deflate(&[PageRange::new(base, 32)]).unwrap();
            for p in base..base + 32 {
                touch(&mem, p, 9);
            }
            b.flush();
            for p in base..base + 32 {
                assert_eq!(read(&mem, p), 9, "round {round}: page {p} lost its data");
            }
            for p in base + 32..base + 64 {
                assert!(!resident(&mem, p));
            }
            b.deflate(&[PageRange::new(base + 32, 32)]).unwrap();
        }
    }
}
