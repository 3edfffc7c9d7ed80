//! A canary mapping right beside a region in the host address space is untouched when the guest
//! names pages just past the region's end. In its own test binary: where the kernel places a new
//! mapping depends on what other threads map at the same time.

mod common;

use common::*;
use memory::{Backing, PageRange, PAGE_SIZE};

fn pages(addr: u64, len: u64) -> PageRange {
    PageRange::from_addr(addr, len)
}

/// A mapping placed right after the region in the host address space keeps its contents and
/// stays resident when the guest names pages just past the region's end.
#[test]
fn canary_beside_region_is_untouched() {
    // Where the kernel puts a new mapping depends on its version (top-down, packed, or aligned to
    // 2 MiB for large anonymous mappings) and on other threads: map a canary first (a packed
    // kernel puts the region right below it), else map one right after the region (the region's
    // odd size leaves a gap up to the next 2 MiB boundary on aligning kernels), else retry.
    let size = 8 * MIB + 4 * PAGE_SIZE;
    let mut keep = Vec::new();
    let (mut m, mut canary) = loop {
        let first = Canary::map(0, 4, 0).expect("mmap canary");
        let (m, _) = manager(&[boot(0, size, Backing::PrivateAnonymous)]);
        let info = &m.regions()[0];
        let end = info.host_addr + info.size as usize;
        if end == first.addr {
            break (m, first);
        }
        if let Some(c) = Canary::at(end, 4) {
            break (m, c);
        }
        keep.push((m, first));
        if keep.len() == 64 {
            // Says so rather than passing silently; seen on about 1 run in 6 on this host.
            eprintln!("skipped: could not place a canary right after a region in 64 tries");
            return;
        }
    };
    drop(keep);
    let info = &m.regions()[0];
    assert_eq!(canary.addr, info.host_addr + info.size as usize);
    canary.fill(0x5a);
    touch(&m, 0, size, 1);
    let out = m
        .offline(&m.page_ranges(&[
            pages(size, 4 * PAGE_SIZE),
            pages(size - PAGE_SIZE, 2 * PAGE_SIZE),
        ]))
        .unwrap();
    assert_eq!((out.changed, out.refused), (1, 4));
    assert_eq!(
        m.flush_discards().unwrap(),
        1,
        "the page inside RAM released"
    );
    let out = m
        .discard_free(&m.page_ranges(&[pages(size, 4 * PAGE_SIZE)]))
        .unwrap();
    assert_eq!(out.refused, 4);
    assert!(canary.all(0x5a), "canary contents intact");
    assert_eq!(canary.resident(), 4, "canary still resident");
}

/// A test-only mapping used as a canary beside guest memory.
struct Canary {
    addr: usize,
    pages: usize,
}

impl Canary {
    fn at(addr: usize, pages: usize) -> Option<Canary> {
        Self::map(addr, pages, libc::MAP_FIXED_NOREPLACE)
    }
    fn map(addr: usize, pages: usize, extra: i32) -> Option<Canary> {
        let len = pages * PAGE_SIZE as usize;
        // SAFETY: a fresh anonymous mapping; with MAP_FIXED_NOREPLACE the kernel refuses to
        // replace anything already mapped there.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra,
                -1,
                0,
            )
        };
        (p != libc::MAP_FAILED).then_some(Canary {
            addr: p as usize,
            pages,
        })
    }
    fn fill(&mut self, b: u8) {
        // SAFETY: the mapping is ours, live until drop, readable and writable, and only this
        // test thread touches it.
        unsafe { std::ptr::write_bytes(self.addr as *mut u8, b, self.pages * 4096) }
    }
    fn all(&self, b: u8) -> bool {
        // SAFETY: as in `fill`; the slice does not outlive `self`.
        let bytes =
            unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.pages * 4096) };
        bytes.iter().all(|&x| x == b)
    }
    fn resident(&self) -> usize {
        let mut v = vec![0u8; self.pages];
        // SAFETY: the range is our live mapping and `v` has one byte per page.
        let rc = unsafe {
            libc::mincore(
                self.addr as *mut libc::c_void,
                self.pages * 4096,
                v.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        v.iter().filter(|&&x| x & 1 != 0).count()
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping this value created.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.pages * 4096) };
    }
}
