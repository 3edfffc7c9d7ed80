//! A self-contained [`BalloonBackend`] that really releases host memory: a bitmap of ballooned
//! pages per guest RAM region and one `madvise(MADV_DONTNEED)` (or, for file-backed regions,
//! one `fallocate(PUNCH_HOLE)`) per coalesced run.
//!
//! It is the benchmark's "real memory backend" and a stand-in for the VMM until memory/'s
//! manager is wired in (see [`crate::manager`]); it does not know about hot-add regions.

use std::os::fd::AsRawFd;
use std::sync::Mutex;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::backend::{BackendError, BalloonBackend, Outcome, PageRange, PAGE_SHIFT, PAGE_SIZE};

type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

struct RegionBits {
    start_pfn: u64,
    pages: u64,
    /// One bit per page: set while ballooned.
    bits: Vec<u64>,
}

/// Ballooned-page bitmap over guest RAM plus real discard of host backing.
pub struct DiscardBackend {
    mem: GuestMemoryMmap,
    regions: Mutex<Vec<RegionBits>>,
}

impl DiscardBackend {
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
            mem,
            regions: Mutex::new(regions),
        }
    }

    /// Pages currently ballooned.
    pub fn ballooned_pages(&self) -> u64 {
        let regions = self.regions.lock().unwrap_or_else(|e| e.into_inner());
        regions
            .iter()
            .flat_map(|r| r.bits.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
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
        {
            let mut regions = self.regions.lock().unwrap_or_else(|e| e.into_inner());
            for &range in ranges {
                out.refused += Self::for_each_part(&mut regions, range, |r, first, count| {
                    let c = test_and_set(r, first, count, true);
                    out.changed += c;
                    out.unchanged += count - c;
                });
            }
        }
        // One system call per run; discarding an already discarded page is harmless.
        for &range in ranges {
            self.discard(range)?;
        }
        Ok(out)
    }

    fn deflate(&self, ranges: &[PageRange]) -> Result<Outcome, BackendError> {
        let mut out = Outcome::default();
        let mut regions = self.regions.lock().unwrap_or_else(|e| e.into_inner());
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
        let mut runs = Vec::new();
        {
            let mut regions = self.regions.lock().unwrap_or_else(|e| e.into_inner());
            for &range in ranges {
                out.refused += Self::for_each_part(&mut regions, range, |r, first, count| {
                    // Discard the runs of pages that are not ballooned (ballooned ones are
                    // already discarded and stay counted as ballooned).
                    let mut run: Option<(u64, u64)> = None;
                    for p in first..first + count {
                        let ballooned = r.bits[(p / 64) as usize] & (1 << (p % 64)) != 0;
                        if ballooned {
                            out.unchanged += 1;
                            if let Some((s, n)) = run.take() {
                                runs.push(PageRange::new(r.start_pfn + s, n));
                            }
                        } else {
                            out.changed += 1;
                            match run.as_mut() {
                                Some((_, n)) => *n += 1,
                                None => run = Some((p, 1)),
                            }
                        }
                    }
                    if let Some((s, n)) = run {
                        runs.push(PageRange::new(r.start_pfn + s, n));
                    }
                });
            }
        }
        for range in runs {
            self.discard(range)?;
        }
        Ok(out)
    }

    fn deflate_all(&self) -> Result<Outcome, BackendError> {
        let mut regions = self.regions.lock().unwrap_or_else(|e| e.into_inner());
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
