//! The system calls, each wrapped once in a small safe function.
//!
//! Each wrapper takes the mapping (which owns the address range for as long as the reference
//! lives) and an offset/length checked against it, so no caller can name memory that is not ours.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

use vm_memory::MmapRegion;

use crate::types::PAGE_SIZE;

fn check(region: &MmapRegion<()>, offset: u64, len: u64) -> io::Result<()> {
    let end = offset.checked_add(len);
    if offset & (PAGE_SIZE - 1) != 0
        || len & (PAGE_SIZE - 1) != 0
        || end.is_none_or(|e| e > region.size() as u64)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "range 0x{offset:x}+0x{len:x} is not page-aligned inside a 0x{:x}-byte mapping",
                region.size()
            ),
        ));
    }
    Ok(())
}

/// `madvise(advice)` on `len` bytes at `offset` in `region`. Only used with `MADV_DONTNEED` and
/// `MADV_REMOVE`, which change the contents guest memory reads as (to zeros), never the mapping,
/// and `MADV_HUGEPAGE`, which changes neither.
pub fn madvise(region: &MmapRegion<()>, offset: u64, len: u64, advice: i32) -> io::Result<()> {
    check(region, offset, len)?;
    if len == 0 {
        return Ok(());
    }
    // SAFETY: the range lies inside `region`'s mapping (checked above), which stays mapped while
    // the reference is held. DONTNEED/REMOVE only drop the pages' contents: guest memory is only
    // accessed through volatile accesses, so no Rust reference observes a value change it
    // assumed impossible, and no mapping is created or destroyed. HUGEPAGE only changes how
    // later faults are served.
    let rc = unsafe {
        libc::madvise(
            region.as_ptr().add(offset as usize).cast(),
            len as usize,
            advice,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Frees the file blocks under `len` bytes at `offset` of `file`, keeping its size.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: fallocate takes a file descriptor we own (borrowed from `file`) and integers; it
    // touches no memory of this process.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Number of pages of `len` bytes at `offset` in `region` that are resident in host memory.
pub fn resident_pages(region: &MmapRegion<()>, offset: u64, len: u64) -> io::Result<u64> {
    check(region, offset, len)?;
    const CHUNK: u64 = 1 << 30;
    let mut vec = vec![0u8; (CHUNK.min(len) / PAGE_SIZE) as usize];
    let mut resident = 0;
    let mut pos = offset;
    while pos < offset + len {
        let n = CHUNK.min(offset + len - pos);
        let pages = (n / PAGE_SIZE) as usize;
        // SAFETY: the range lies inside `region`'s live mapping (checked above) and `vec` holds
        // one byte for each of its `pages` pages; mincore only writes into `vec`.
        let rc = unsafe {
            libc::mincore(
                region.as_ptr().add(pos as usize).cast(),
                n as usize,
                vec.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        resident += vec[..pages].iter().filter(|&&b| b & 1 != 0).count() as u64;
        pos += n;
    }
    Ok(resident)
}

/// A new anonymous memory file (`MFD_HUGETLB` for 2 MiB huge pages) of `size` bytes.
pub fn memfd(name: &str, size: u64, hugetlb: bool) -> io::Result<File> {
    let name = std::ffi::CString::new(name).map_err(io::Error::other)?;
    let mut flags = libc::MFD_CLOEXEC;
    if hugetlb {
        flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
    }
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create, is open, and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

/// Blocks (512-byte units) the file occupies on its filesystem (tests; feature `testing`).
#[cfg(any(test, feature = "testing"))]
pub fn file_blocks(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(file.metadata()?.blocks())
}

/// Ranges per `process_madvise` call (the kernel's `UIO_MAXIOV` is 1024).
const IOV_BATCH: usize = 512;
/// Bytes per `process_madvise` call (the kernel caps a vector's total at `MAX_RW_COUNT`, ~2 GiB).
const BATCH_BYTES: u64 = 1 << 30;

/// `madvise(MADV_DONTNEED)` on many ranges of one mapping in few system calls:
/// `process_madvise(2)` on this process, one call per [`IOV_BATCH`] ranges. Linux 6.13 accepts
/// any advice when the target is the caller itself (and 6.15 flushes the TLB once per vector);
/// where the kernel refuses, the first call fails, and from then on every range gets its own
/// `madvise`.
pub struct BatchDontneed {
    pidfd: Option<std::os::fd::OwnedFd>,
}

impl BatchDontneed {
    pub fn open() -> Self {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
        let pidfd = (fd >= 0).then(|| {
            // SAFETY: `fd` is a fresh descriptor owned by nobody else.
            unsafe { <std::os::fd::OwnedFd as FromRawFd>::from_raw_fd(fd as i32) }
        });
        BatchDontneed { pidfd }
    }

    /// `MADV_DONTNEED` on every `(offset, len)` of `ranges` in `region`. Returns the system calls
    /// made, or the index of the first range that could not be discarded and the error.
    pub fn dontneed(
        &mut self,
        region: &MmapRegion<()>,
        ranges: &[(u64, u64)],
    ) -> Result<u64, (usize, io::Error)> {
        for (i, &(offset, len)) in ranges.iter().enumerate() {
            check(region, offset, len).map_err(|e| (i, e))?;
        }
        let mut calls = 0;
        let mut i = 0;
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(ranges.len().min(IOV_BATCH));
        while i < ranges.len() {
            let Some(fd) = self.pidfd.as_ref().filter(|_| ranges.len() - i >= 2) else {
                let (offset, len) = ranges[i];
                madvise(region, offset, len, libc::MADV_DONTNEED).map_err(|e| (i, e))?;
                calls += 1;
                i += 1;
                continue;
            };
            iov.clear();
            let mut bytes = 0;
            for &(offset, len) in &ranges[i..] {
                if iov.len() == IOV_BATCH || (!iov.is_empty() && bytes + len > BATCH_BYTES) {
                    break;
                }
                iov.push(libc::iovec {
                    // SAFETY: `check` above verified `offset + len` lies inside `region`'s
                    // mapping, so the offset pointer stays within that one allocation.
                    iov_base: unsafe { region.as_ptr().add(offset as usize) }.cast(),
                    iov_len: len as usize,
                });
                bytes += len;
            }
            // SAFETY: every iovec is a page-aligned range inside `region`'s live mapping (checked
            // above); the kernel only reads the vector. DONTNEED only drops contents, as in
            // `madvise`.
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_process_madvise,
                    fd.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len(),
                    libc::MADV_DONTNEED,
                    0u32,
                )
            };
            calls += 1;
            if ret < 0 {
                let e = io::Error::last_os_error();
                log::info!("memory: process_madvise(MADV_DONTNEED) refused ({e}); one madvise per run from now on");
                self.pidfd = None;
                continue;
            }
            // A short count means the kernel stopped at a range: skip what it did and let the
            // next round (or the per-range fallback) go on from there.
            let mut done = ret as u64;
            let mut n = 0;
            while n < iov.len() && done >= iov[n].iov_len as u64 {
                done -= iov[n].iov_len as u64;
                n += 1;
            }
            if n < iov.len() {
                // Finish the range it stopped in with a plain madvise (re-discarding is harmless).
                let (offset, len) = ranges[i + n];
                madvise(region, offset, len, libc::MADV_DONTNEED).map_err(|e| (i + n, e))?;
                calls += 1;
                n += 1;
            }
            i += n;
        }
        Ok(calls)
    }
}

/// `madvise(MADV_HUGEPAGE)` on the whole of `region`: anonymous faults there take 2 MiB
/// transparent huge pages where the kernel has them (THP `enabled` = `always` or `madvise`).
pub fn advise_hugepages(region: &MmapRegion<()>) -> io::Result<()> {
    madvise(region, 0, region.size() as u64, libc::MADV_HUGEPAGE)
}

/// Maps `len` bytes of `PROT_NONE` private anonymous memory with `MAP_NORESERVE` (address space
/// only: no memory, no commit charge): anywhere, or exactly at `at` if nothing is mapped there
/// (`MAP_FIXED_NOREPLACE`: nothing is ever replaced). The address, or `None` where `at` is taken.
fn map_none(at: Option<usize>, len: usize) -> io::Result<Option<usize>> {
    let (hint, fixed) = match at {
        Some(a) => (a as *mut libc::c_void, libc::MAP_FIXED_NOREPLACE),
        None => (std::ptr::null_mut(), 0),
    };
    // SAFETY: a new mapping with no access rights, where the kernel chooses or (with
    // MAP_FIXED_NOREPLACE) only where nothing is mapped: it replaces nothing, and nothing else
    // refers to it.
    let got = unsafe {
        libc::mmap(
            hint,
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | fixed,
            -1,
            0,
        )
    };
    if got == libc::MAP_FAILED {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EEXIST) if at.is_some() => Ok(None),
            _ => Err(e),
        };
    }
    if at.is_some_and(|a| a != got as usize) {
        // A kernel before 4.17 takes the address as a hint only: not where asked.
        // SAFETY: the range just mapped, referenced by nothing.
        unsafe { libc::munmap(got, len) };
        return Ok(None);
    }
    Ok(Some(got as usize))
}

/// `PROT_NONE` address space held by [`map_none`]: ranges no other mapping takes while they are
/// held (a placement's reservation, guard pages around guest RAM). Unmapped when dropped.
#[derive(Debug, Default)]
pub struct Reservation {
    /// (address, length) of each reserved range.
    ranges: Vec<(usize, usize)>,
}

impl Reservation {
    /// Reserves `len` bytes (a multiple of the page size) wherever the kernel finds room.
    pub fn new(len: usize) -> io::Result<Self> {
        if len == 0 || len as u64 & (PAGE_SIZE - 1) != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot reserve 0x{len:x} bytes: not a non-zero multiple of 4 KiB"),
            ));
        }
        let addr = map_none(None, len)?.expect("the kernel chooses the address");
        Ok(Self {
            ranges: vec![(addr, len)],
        })
    }

    /// One page right below and one right above `region`, where nothing lies against it yet
    /// (an end something else already lies against stays as it is): no other mapping is placed
    /// against it (and merged into its VMA), and an access running off either end faults.
    pub fn guard_pages(region: &MmapRegion<()>) -> Self {
        let start = region.as_ptr() as usize;
        let end = start + region.size();
        let page = PAGE_SIZE as usize;
        let ranges = [start.checked_sub(page), Some(end)]
            .into_iter()
            .flatten()
            .filter_map(|at| map_none(Some(at), page).ok().flatten())
            .map(|a| (a, page))
            .collect();
        Self { ranges }
    }

    /// The first reserved address.
    pub fn addr(&self) -> usize {
        self.ranges.first().map_or(0, |r| r.0)
    }

    /// Unmaps `len` bytes at `offset` of a reservation made by [`Reservation::new`], so that
    /// the next mapping may take them; what is below and above them stays reserved.
    pub fn give_back(mut self, offset: usize, len: usize) -> io::Result<Self> {
        let &[(addr, total)] = self.ranges.as_slice() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "only a reservation in one piece gives back part of it",
            ));
        };
        let end = offset.checked_add(len);
        if len == 0 || (offset | len) as u64 & (PAGE_SIZE - 1) != 0 || end.is_none_or(|e| e > total)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "0x{offset:x}+0x{len:x} is not a page-aligned part of a \
                     0x{total:x}-byte reservation"
                ),
            ));
        }
        // SAFETY: the range lies inside this reservation (checked above): a PROT_NONE mapping
        // of ours that no reference points into.
        if unsafe { libc::munmap((addr + offset) as *mut libc::c_void, len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        self.ranges = [(addr, offset), (addr + offset + len, total - offset - len)]
            .into_iter()
            .filter(|r| r.1 != 0)
            .collect();
        Ok(self)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        for &(addr, len) in &self.ranges {
            // SAFETY: a range of this reservation's own PROT_NONE mapping, which no reference
            // points into.
            unsafe { libc::munmap(addr as *mut libc::c_void, len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::mmap::MmapRegionBuilder;

    fn region(pages: usize) -> MmapRegion<()> {
        let m = MmapRegionBuilder::new(pages * PAGE_SIZE as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
            .build()
            .unwrap();
        for p in 0..pages {
            // SAFETY: inside the fresh mapping, which nothing else references.
            unsafe { *m.as_ptr().add(p * PAGE_SIZE as usize) = 7 };
        }
        m
    }

    fn resident(m: &MmapRegion<()>, page: u64) -> bool {
        resident_pages(m, page * PAGE_SIZE, PAGE_SIZE).unwrap() == 1
    }

    #[test]
    fn batched_and_fallback_dontneed_release_exactly_the_ranges() {
        let ranges: Vec<(u64, u64)> = (0..600u64)
            .map(|i| (3 * i * PAGE_SIZE, PAGE_SIZE * (1 + i % 2)))
            .collect();
        for batched in [true, false] {
            let m = region(1800);
            let mut b = BatchDontneed::open();
            if !batched {
                b.pidfd = None;
            }
            let calls = b.dontneed(&m, &ranges).unwrap();
            if batched {
                // Two calls (512 + 88 ranges), or 600 where the kernel refuses process_madvise.
                assert!(calls == 2 || calls == 600, "{calls} calls");
            } else {
                assert_eq!(calls, 600);
            }
            for i in 0..600u64 {
                assert!(!resident(&m, 3 * i), "range {i} released");
                assert_eq!(resident(&m, 3 * i + 1), i % 2 == 0, "page after range {i}");
                assert!(resident(&m, 3 * i + 2), "gap after range {i} kept");
            }
        }
    }

    #[test]
    fn a_reservation_gives_back_one_inner_range_and_keeps_the_rest() {
        let page = PAGE_SIZE as usize;
        assert!(Reservation::new(0).is_err());
        assert!(Reservation::new(page + 1).is_err());
        let r = Reservation::new(8 * page).unwrap();
        let a = r.addr();
        assert!(Reservation::new(8 * page)
            .unwrap()
            .give_back(4 * page, 5 * page)
            .is_err());
        assert!(Reservation::new(8 * page)
            .unwrap()
            .give_back(page + 1, page)
            .is_err());
        let r = r.give_back(2 * page, 3 * page).unwrap();
        assert_eq!(r.ranges, [(a, 2 * page), (a + 5 * page, 3 * page)]);
        assert_eq!(r.addr(), a);
        assert!(r.give_back(0, page).is_err(), "given back once only");
    }

    #[test]
    fn a_range_outside_the_mapping_is_named_and_nothing_is_released() {
        let m = region(16);
        let mut b = BatchDontneed::open();
        let err = b
            .dontneed(&m, &[(0, PAGE_SIZE), (15 * PAGE_SIZE, 2 * PAGE_SIZE)])
            .unwrap_err();
        assert_eq!(err.0, 1);
        assert!(resident(&m, 0));
    }
}
