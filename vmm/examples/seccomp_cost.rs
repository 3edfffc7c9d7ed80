//! What the VMM thread's seccomp filter costs on the memory release path, side by side in one
//! process: `cargo run --release -p vmm --example seccomp_cost`.
//!
//! Each round runs the same work on a fresh unfiltered thread, then on a fresh thread that
//! installed the VMM thread's filter (`vmm::seccomp`), alternating:
//! - 200 000 `madvise(MADV_DONTNEED)` calls on one page with nothing mapped (the system call and
//!   the filter alone);
//! - 16 MiB of 4 KiB pages touched, then released with one `madvise(MADV_DONTNEED)` per page
//!   (what a scattered inflate costs the host per page), timing the releases only;
//! - the same 16 MiB released as 4096 runs with `process_madvise`, 512 runs a call (the
//!   product's batched release).
//!
//! Prints the median of 7 rounds of each, ns per call or per page.

use std::time::Instant;

use vmm::seccomp::{compile, ThreadKind};

const PAGE: usize = 4096;
const LEN: usize = 16 << 20;
const EMPTY_CALLS: usize = 200_000;
const ROUNDS: usize = 7;

/// ns per empty call, ns per page with one madvise each, ns per page batched.
type Figures = (f64, f64, f64);

fn madvise(addr: usize, len: usize) {
    // SAFETY: the range lies in the mapping made in main, alive for the whole program;
    // MADV_DONTNEED only drops its pages (they read back as zeros).
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    assert_eq!(rc, 0, "madvise: {}", std::io::Error::last_os_error());
}

fn touch(addr: usize) {
    for off in (0..LEN).step_by(PAGE) {
        // SAFETY: inside the live read/write mapping made in main.
        unsafe { ((addr + off) as *mut u8).write_volatile(1) };
    }
}

fn measure(addr: usize, pidfd: i32, filtered: bool) -> Figures {
    if filtered {
        let prog = compile(ThreadKind::Vmm).expect("the VMM filter compiles");
        seccompiler::apply_filter(&prog).expect("the VMM filter installs");
    }
    let t = Instant::now();
    for _ in 0..EMPTY_CALLS {
        madvise(addr, PAGE);
    }
    let empty = t.elapsed().as_nanos() as f64 / EMPTY_CALLS as f64;

    touch(addr);
    let t = Instant::now();
    for off in (0..LEN).step_by(PAGE) {
        madvise(addr + off, PAGE);
    }
    let per_page = t.elapsed().as_nanos() as f64 / (LEN / PAGE) as f64;

    touch(addr);
    // Every other page: 4096 runs of one page, 512 per call.
    let iov: Vec<libc::iovec> = (0..LEN)
        .step_by(2 * PAGE)
        .map(|off| libc::iovec {
            iov_base: (addr + off) as *mut libc::c_void,
            iov_len: PAGE,
        })
        .collect();
    let t = Instant::now();
    for chunk in iov.chunks(512) {
        // SAFETY: the iovecs name ranges of our live mapping; the kernel only reads them.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_process_madvise,
                pidfd,
                chunk.as_ptr(),
                chunk.len(),
                libc::MADV_DONTNEED,
                0,
            )
        };
        assert!(
            rc >= 0,
            "process_madvise: {}",
            std::io::Error::last_os_error()
        );
    }
    let batched = t.elapsed().as_nanos() as f64 / iov.len() as f64;
    (empty, per_page, batched)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED);
    let addr = addr as usize;
    // SAFETY: pidfd_open on our own pid; integer arguments only.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) } as i32;
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    let mut plain = Vec::new();
    let mut filtered = Vec::new();
    for _ in 0..ROUNDS {
        for (f, out) in [(false, &mut plain), (true, &mut filtered)] {
            out.push(
                std::thread::spawn(move || measure(addr, pidfd, f))
                    .join()
                    .expect("measuring thread"),
            );
        }
    }
    let col = |v: &[Figures], i: usize| {
        median(v.iter().map(|f| [f.0, f.1, f.2][i]).collect::<Vec<f64>>())
    };
    println!("median of {ROUNDS} rounds | unfiltered | VMM thread's filter");
    for (i, what) in [
        "madvise on an empty page, ns/call",
        "madvise per touched 4 KiB page, ns/page",
        "process_madvise, 512 one-page runs a call, ns/page",
    ]
    .iter()
    .enumerate()
    {
        println!("{what} | {:.0} | {:.0}", col(&plain, i), col(&filtered, i));
    }
}
