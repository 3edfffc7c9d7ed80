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
/// `MADV_REMOVE`, which change the contents guest memory reads as (to zeros), never the mapping.
pub fn madvise(region: &MmapRegion<()>, offset: u64, len: u64, advice: i32) -> io::Result<()> {
    check(region, offset, len)?;
    if len == 0 {
        return Ok(());
    }
    // SAFETY: the range lies inside `region`'s mapping (checked above), which stays mapped while
    // the reference is held. DONTNEED/REMOVE only drop the pages' contents: guest memory is only
    // accessed through volatile accesses, so no Rust reference observes a value change it
    // assumed impossible, and no mapping is created or destroyed.
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

/// Blocks (512-byte units) the file occupies on its filesystem.
pub fn file_blocks(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(file.metadata()?.blocks())
}
