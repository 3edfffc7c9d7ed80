//! Time per inflate request of 256 PFNs, from the notification (the device starts reading the
//! avail ring) to the used-ring update, and pages released per second, on the product backend:
//! memory/'s `MemoryManager` behind a `Mutex`, with the deferred discard policy, as the VMM builds
//! it (vmm/src/vm.rs). The naive baseline issues one madvise per page on the same kind of mapping
//! in the same run; the bursts also time the kernel's share alone (each request's ranges in one
//! `process_madvise` call before the ack, no bookkeeping), the floor any backend meets. Pages are touched before every request so that every discard really frees
//! memory.
//!
//! The burst group sends 64 such requests back to back, each after the previous ack (as Linux's
//! driver does), and measures the time until the burst's memory is released (and, printed
//! alongside, the acks of the same bursts), on guest RAM of 4 KiB pages and of transparent huge
//! pages.
//!
//! Run: `cargo bench -p balloon --bench inflate` (`-- inflate_burst` for the bursts only)

// criterion_group! generates a public fn with no doc comment; a bench has no API to document.
#![allow(missing_docs)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use balloon::backend::{BackendError, BalloonBackend, Outcome, PageRange, PageRanges};
use balloon::testing::{pfn_bytes, BalloonRig, Desc, BUFFER_BASE};
use balloon::BalloonConfig;
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use memory::{Backing, MemoryManager};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const RAM: u64 = 260 << 20;
/// Ballooned pages come from 4 MiB upward (queues and buffers live below).
const FIRST_PFN: u32 = (4 << 20) >> 12;
const PAGES: u32 = (256 << 20) >> 12;

type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Guest RAM as the VMM makes it: one boot region of `backing` behind the manager.
fn manager(backing: Backing) -> Arc<Mutex<MemoryManager>> {
    Arc::new(Mutex::new(balloon::testing::boot_ram_manager(RAM, backing)))
}

/// A baseline backend: only inflate does anything (these benches never deflate or report).
trait Inflate: Send + Sync {
    fn inflate(&self, ranges: &[PageRange]) -> Result<Outcome, BackendError>;
}

/// A baseline as a [`BalloonBackend`].
struct InflateOnly<T>(T);

impl<T: Inflate> BalloonBackend for InflateOnly<T> {
    fn inflate(&self, ranges: &PageRanges) -> Result<Outcome, BackendError> {
        self.0.inflate(ranges.as_slice())
    }
    fn deflate(&self, _: &PageRanges) -> Result<Outcome, BackendError> {
        Ok(Outcome::default())
    }
    fn report_free(&self, _: &PageRanges) -> Result<Outcome, BackendError> {
        Ok(Outcome::default())
    }
    fn deflate_all(&self) -> Result<Outcome, BackendError> {
        Ok(Outcome::default())
    }
}

/// The kernel's share alone: each request's ranges released before the ack in one
/// `process_madvise(MADV_DONTNEED)` call, with no bookkeeping at all (Linux 6.13+; where the
/// kernel refuses, the bench panics rather than report a wrong floor).
struct KernelBatchBackend {
    mem: GuestMemoryMmap,
    pidfd: i32,
}

impl KernelBatchBackend {
    fn new(mem: GuestMemoryMmap) -> Self {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) } as i32;
        assert!(
            pidfd >= 0,
            "pidfd_open: {}",
            std::io::Error::last_os_error()
        );
        Self { mem, pidfd }
    }
}

impl Inflate for KernelBatchBackend {
    fn inflate(&self, ranges: &[PageRange]) -> Result<Outcome, BackendError> {
        let iov: Vec<libc::iovec> = ranges
            .iter()
            .map(|r| libc::iovec {
                iov_base: self
                    .mem
                    .get_host_address(GuestAddress(r.start.0 << 12))
                    .expect("guest RAM")
                    .cast(),
                iov_len: (r.count << 12) as usize,
            })
            .collect();
        for chunk in iov.chunks(512) {
            // SAFETY: every iovec is a range of the live guest mapping (the device cut the
            // ranges to guest RAM); DONTNEED only drops contents the guest gave up.
            let done = unsafe {
                libc::syscall(
                    libc::SYS_process_madvise,
                    self.pidfd,
                    chunk.as_ptr(),
                    chunk.len(),
                    libc::MADV_DONTNEED,
                    0u32,
                )
            };
            let want: usize = chunk.iter().map(|v| v.iov_len).sum();
            assert_eq!(
                done as usize,
                want,
                "process_madvise: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(Outcome {
            changed: ranges.iter().map(|r| r.count).sum(),
            ..Outcome::default()
        })
    }
}

/// One `madvise(MADV_DONTNEED)` per page, no bookkeeping: the baseline.
struct NaiveBackend {
    mem: GuestMemoryMmap,
}

impl Inflate for NaiveBackend {
    fn inflate(&self, ranges: &[PageRange]) -> Result<Outcome, BackendError> {
        let mut o = Outcome::default();
        for r in ranges {
            for p in r.start.0..r.end() {
                let host = self
                    .mem
                    .get_host_address(GuestAddress(p << 12))
                    .map_err(|_| BackendError::Manager(format!("PFN {p:#x} is not guest RAM")))?;
                // SAFETY: one page of a live guest mapping; DONTNEED only drops its contents
                // (the guest gave the page up) and no reference points into guest memory.
                if unsafe { libc::madvise(host.cast(), 4096, libc::MADV_DONTNEED) } != 0 {
                    let e = std::io::Error::last_os_error();
                    return Err(BackendError::Manager(format!("madvise of PFN {p:#x}: {e}")));
                }
                o.changed += 1;
            }
        }
        Ok(o)
    }
}

/// Records nothing, releases nothing: the device's own cost.
struct NullBackend;

impl Inflate for NullBackend {
    fn inflate(&self, r: &[PageRange]) -> Result<Outcome, BackendError> {
        Ok(Outcome {
            changed: r.iter().map(|r| r.count).sum(),
            ..Outcome::default()
        })
    }
}

/// What the manager's idle timer does: release everything queued.
fn release(mm: &Mutex<MemoryManager>) {
    mm.lock().unwrap().flush_discards().unwrap();
}

/// What the VMM's event loop does after each turn (vmm/src/memory_timer.rs `after_turn`):
/// `tick` if something is due now (a full batch is due at once).
fn timer_turn(mm: &Mutex<MemoryManager>) {
    let mut m = mm.lock().unwrap();
    if m.tick_due() {
        m.tick().unwrap();
    }
}

fn no_stats() -> BalloonConfig {
    BalloonConfig {
        stats: false,
        ..BalloonConfig::default()
    }
}

/// 256 PFNs, no two adjacent, spread over 256 MiB in a scrambled order (what a fragmented guest
/// sends).
fn scattered(round: u32) -> Vec<u32> {
    (0..256u32)
        .map(|i| {
            let slot = (i.wrapping_mul(97) + round.wrapping_mul(31)) % 256;
            FIRST_PFN + slot * (PAGES / 256) + (round % 7) * 2
        })
        .collect()
}

/// 256 consecutive PFNs (1 MiB), in the order Linux's balloon sends them (descending).
fn contiguous(round: u32) -> Vec<u32> {
    let base = FIRST_PFN + (round % 200) * 256;
    (0..256u32).rev().map(|i| base + i).collect()
}

fn ranges_of(pfns: &[u32]) -> Vec<memory::PageRange> {
    pfns.iter()
        .map(|&p| memory::PageRange::page(u64::from(p)))
        .collect()
}

/// How a single request is served.
#[derive(Clone, Copy)]
enum Single {
    /// NaiveBackend: one madvise per page before the ack.
    Naive,
    /// The product: ack, then release (clock stops at the ack).
    DeferredAck,
    /// The product: ack, then release (clock stops when released).
    DeferredReleased,
    /// NullBackend.
    DeviceOnly,
}

fn bench_single(c: &mut Criterion, name: &str, mode: Single, pattern: fn(u32) -> Vec<u32>) {
    let mm = manager(Backing::PrivateAnonymous);
    let mem = mm.lock().unwrap().guest_memory().clone();
    let backend: Arc<dyn BalloonBackend> = match mode {
        Single::Naive => Arc::new(InflateOnly(NaiveBackend { mem: mem.clone() })),
        Single::DeviceOnly => Arc::new(InflateOnly(NullBackend)),
        _ => mm.clone(),
    };
    let mut rig = BalloonRig::with_backend(mem.clone(), no_stats(), backend);
    let mut group = c.benchmark_group("inflate_256");
    group.throughput(Throughput::Elements(256));
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_millis(500));
    group.sample_size(40);
    let mut round = 0u32;
    let BalloonRig {
        dev,
        queues,
        buffers,
        interrupt,
        ..
    } = &mut rig;
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // Guest side, off the clock: the previous request's release finishes, its pages
                // come back (so this one inflates afresh), the pages are faulted in, the PFN
                // buffer written and published.
                release(&mm);
                round = round.wrapping_add(1);
                let pfns = pattern(round);
                {
                    let mut m = mm.lock().unwrap();
                    let back = m.page_ranges(&ranges_of(&pfns));
                    m.online(&back).unwrap();
                }
                for &p in &pfns {
                    mem.write_obj(0xa5u8, GuestAddress(u64::from(p) << 12))
                        .unwrap();
                }
                let bytes = pfn_bytes(&pfns);
                buffers.reset(BUFFER_BASE);
                let at = buffers.put(&mem, &bytes);
                queues[0].add(&mem, &[Desc::read(at, bytes.len() as u32)]);
                // On the clock: the notification is handled.
                let t0 = Instant::now();
                dev.process_queue(0);
                let end = match mode {
                    Single::DeferredReleased => {
                        release(&mm);
                        Instant::now()
                    }
                    _ => interrupt.last_used_at.lock().unwrap().expect("interrupt"),
                };
                total += end.duration_since(t0);
            }
            total
        })
    });
    group.finish();
    // (Nothing ran when a filter skipped this case.)
    assert!(!queues[0].take_used(&mem).is_empty() || dev.counters().inflate_buffers == 0);
}

/// Requests per burst: Linux sends 256-PFN buffers one after the other, each after the previous
/// ack.
const BURST: u32 = 64;

/// Request `i` of a scattered burst: 256 pages 1 MiB apart; the burst's 16384 pages are all
/// distinct and no two are adjacent, even across requests.
fn scattered_burst(i: u32) -> Vec<u32> {
    (0..256u32)
        .map(|j| {
            let slot = (j.wrapping_mul(97) + i.wrapping_mul(31)) % 256;
            FIRST_PFN + slot * (PAGES / 256) + i * 2
        })
        .collect()
}

/// Request `i` of a contiguous burst: 1 MiB in descending order, right above the previous
/// request's (64 MiB in all, 2 MiB-aligned).
fn contiguous_burst(i: u32) -> Vec<u32> {
    let base = FIRST_PFN + i * 256;
    (0..256u32).rev().map(|k| base + k).collect()
}

/// Runs a burst group case: every iteration starts from the same state (all 256 MiB faulted in;
/// on huge pages, as huge pages again), sends the 64 requests, and releases what is left as the
/// idle timer would. Criterion times everything the event loop spends until the memory is
/// released (the device's queue handling, the manager's timer turns, the idle release); the
/// acks of the same bursts are printed.
/// Who releases a burst's pages.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Releaser {
    /// NaiveBackend: one madvise per page before each ack (the baseline).
    Naive,
    /// KernelBatchBackend: one process_madvise per request before its ack, no bookkeeping.
    KernelOnly,
    /// The product: memory's manager, deferred discards released after the acks.
    Manager,
}

// Long: set-up, the timed closure and the report share the rig, manager and touch helper.
fn bench_burst(
    c: &mut Criterion,
    name: &str,
    backing: Backing,
    releaser: Releaser,
    pattern: fn(u32) -> Vec<u32>,
) {
    let mm = manager(backing);
    let mem = mm.lock().unwrap().guest_memory().clone();
    let backend: Arc<dyn BalloonBackend> = match releaser {
        Releaser::Naive => Arc::new(InflateOnly(NaiveBackend { mem: mem.clone() })),
        Releaser::KernelOnly => Arc::new(InflateOnly(KernelBatchBackend::new(mem.clone()))),
        Releaser::Manager => mm.clone(),
    };
    let mut rig = BalloonRig::with_backend(mem.clone(), no_stats(), backend);
    let requests: Vec<Vec<u8>> = (0..BURST).map(|i| pfn_bytes(&pattern(i))).collect();
    let all_pfns: Vec<u32> = (0..BURST).flat_map(pattern).collect();
    let span = memory::PageRange::new(u64::from(FIRST_PFN), u64::from(PAGES));
    let huge = backing == Backing::PrivateAnonymousHuge;
    let touch = |pfns: &mut dyn Iterator<Item = u32>| {
        for p in pfns {
            mem.write_obj(0xa5u8, GuestAddress(u64::from(p) << 12))
                .unwrap();
        }
    };
    touch(&mut (FIRST_PFN..FIRST_PFN + PAGES));
    if huge {
        eprintln!(
            "{name}: AnonHugePages after faulting in: {} kB",
            anon_huge_kb()
        );
    }
    let mut group = c.benchmark_group("inflate_burst_64x256");
    group.throughput(Throughput::Elements(u64::from(BURST) * 256));
    group.sampling_mode(SamplingMode::Flat);
    group.measurement_time(Duration::from_secs(2));
    group.warm_up_time(Duration::from_millis(300));
    group.sample_size(10);
    let mut acks: Vec<Duration> = Vec::new();
    let mut calls: Vec<u64> = Vec::new();
    let BalloonRig {
        dev,
        queues,
        buffers,
        interrupt,
        ..
    } = &mut rig;
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // Off the clock: the previous burst's pages come back, and the guest touches
                // them again. On huge pages the whole span is dropped and faulted in afresh, so
                // that every burst meets whole huge pages (a discard inside one splits it).
                {
                    let mut m = mm.lock().unwrap();
                    let span = m.page_ranges(&[span]);
                    m.online(&span).unwrap();
                    if huge {
                        m.discard_free(&span).unwrap();
                    }
                }
                if huge {
                    touch(&mut (FIRST_PFN..FIRST_PFN + PAGES));
                } else {
                    touch(&mut all_pfns.iter().copied());
                }
                let calls0 = mm.lock().unwrap().stats().discard_calls;
                let mut ack = Duration::ZERO;
                for bytes in &requests {
                    buffers.reset(BUFFER_BASE);
                    let at = buffers.put(&mem, bytes);
                    queues[0].add(&mem, &[Desc::read(at, bytes.len() as u32)]);
                    let t0 = Instant::now();
                    dev.process_queue(0);
                    let end = Instant::now();
                    ack += interrupt
                        .last_used_at
                        .lock()
                        .unwrap()
                        .expect("interrupt")
                        .duration_since(t0);
                    total += end.duration_since(t0);
                    queues[0].take_used(&mem);
                    // The event loop's next turn: the manager's timer, if a batch is due.
                    let t0 = Instant::now();
                    timer_turn(&mm);
                    total += t0.elapsed();
                }
                // The idle timer's work.
                let t0 = Instant::now();
                release(&mm);
                total += t0.elapsed();
                assert_eq!(mm.lock().unwrap().queued_discards(), 0);
                acks.push(ack);
                calls.push(mm.lock().unwrap().stats().discard_calls - calls0);
            }
            total
        })
    });
    group.finish();
    if !acks.is_empty() {
        acks.sort_unstable();
        calls.sort_unstable();
        let median = acks[acks.len() / 2];
        let pages = f64::from(BURST * 256);
        eprintln!(
            "{name}: acks {:.3} ms per burst (median of {}), {:.1} M pages/s acked; \
             discard calls per burst: {}",
            median.as_secs_f64() * 1e3,
            acks.len(),
            pages / median.as_secs_f64() / 1e6,
            match releaser {
                Releaser::Naive => "one per page".to_string(),
                Releaser::KernelOnly => "one per request".to_string(),
                Releaser::Manager => calls[calls.len() / 2].to_string(),
            }
        );
    }
}

/// This process's `AnonHugePages` (kB), from /proc/self/smaps_rollup.
fn anon_huge_kb() -> u64 {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("AnonHugePages:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn benches(c: &mut Criterion) {
    for (pattern_name, pattern) in [
        ("scattered", scattered as fn(u32) -> Vec<u32>),
        ("contiguous", contiguous),
    ] {
        for (name, mode) in [
            ("naive_per_page_madvise", Single::Naive),
            ("manager_deferred/ack", Single::DeferredAck),
            ("manager_deferred/released", Single::DeferredReleased),
            ("device_only_no_release", Single::DeviceOnly),
            ("naive_per_page_madvise_again", Single::Naive),
        ] {
            bench_single(c, &format!("{pattern_name}/{name}"), mode, pattern);
        }
    }
}

fn burst_benches(c: &mut Criterion) {
    for (backing_name, backing) in [
        ("4k", Backing::PrivateAnonymous),
        ("thp", Backing::PrivateAnonymousHuge),
    ] {
        for (pattern_name, pattern) in [
            ("scattered", scattered_burst as fn(u32) -> Vec<u32>),
            ("contiguous", contiguous_burst),
        ] {
            for (name, releaser) in [
                ("naive_per_page_madvise", Releaser::Naive),
                ("kernel_only_process_madvise", Releaser::KernelOnly),
                ("manager", Releaser::Manager),
                ("naive_per_page_madvise_again", Releaser::Naive),
            ] {
                bench_burst(
                    c,
                    &format!("{backing_name}/{pattern_name}/{name}"),
                    backing,
                    releaser,
                    pattern,
                );
            }
        }
    }
}

criterion_group!(inflate, benches, burst_benches);
criterion_main!(inflate);
