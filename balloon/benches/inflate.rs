//! Time per inflate request of 256 PFNs, from the notification (the device starts reading the
//! avail ring) to the used-ring update, with real host memory released by madvise, against a naive
//! baseline that issues one madvise per page. Pages are touched before every request so that
//! every discard really frees memory.
//!
//! The burst group sends 64 such requests back to back, each after the previous ack (as Linux's
//! driver does), and measures the acks and the time until the burst's memory is released.
//!
//! Run: `cargo bench -p balloon --bench inflate` (`-- inflate_burst` for the bursts only)

use std::sync::Arc;
use std::time::{Duration, Instant};

use balloon::backend::{BackendError, BalloonBackend, Outcome, PageRange};
use balloon::discard::{madvise_dontneed, DiscardBackend};
use balloon::testing::{guest_memory, pfn_bytes, BalloonRig, Desc, BUFFER_BASE};
use balloon::BalloonConfig;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const RAM: usize = 260 << 20;
/// Ballooned pages come from 4 MiB upward (queues and buffers live below).
const FIRST_PFN: u32 = (4 << 20) >> 12;
const PAGES: u32 = (256 << 20) >> 12;

type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// One madvise per page, no bookkeeping: the baseline.
struct NaiveBackend {
    mem: GuestMemoryMmap,
}

impl BalloonBackend for NaiveBackend {
    fn inflate(&self, ranges: &[PageRange]) -> Result<Outcome, BackendError> {
        let mut o = Outcome::default();
        for r in ranges {
            for p in r.start.0..r.end() {
                let host = self
                    .mem
                    .get_host_address(GuestAddress(p << 12))
                    .map_err(|_| BackendError::NotManaged {
                        range: PageRange::new(p, 1),
                    })?;
                madvise_dontneed(host, 4096).map_err(|source| BackendError::Discard {
                    range: PageRange::new(p, 1),
                    host_addr: host as u64,
                    len: 4096,
                    source,
                })?;
                o.changed += 1;
            }
        }
        Ok(o)
    }
    fn deflate(&self, _: &[PageRange]) -> Result<Outcome, BackendError> {
        Ok(Outcome::default())
    }
    fn report_free(&self, _: &[PageRange]) -> Result<Outcome, BackendError> {
        Ok(Outcome::default())
    }
    fn deflate_all(&self) -> Result<Outcome, BackendError> {
        Ok(Outcome::default())
    }
}

/// Records nothing, releases nothing: the device's own cost.
struct NullBackend;

impl BalloonBackend for NullBackend {
    fn inflate(&self, r: &[PageRange]) -> Result<Outcome, BackendError> {
        Ok(Outcome {
            changed: r.iter().map(|r| r.count).sum(),
            ..Outcome::default()
        })
    }
    fn deflate(&self, _: &[PageRange]) -> Result<Outcome, BackendError> {
        Ok(Outcome::default())
    }
    fn report_free(&self, _: &[PageRange]) -> Result<Outcome, BackendError> {
        Ok(Outcome::default())
    }
    fn deflate_all(&self) -> Result<Outcome, BackendError> {
        Ok(Outcome::default())
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

/// Where the clock stops.
#[derive(Clone, Copy)]
enum Stop {
    /// At the used-buffer interrupt: what the guest waits for.
    Ack,
    /// When the host memory is released: gives pages released per second.
    Released,
}

type Made = (Arc<dyn BalloonBackend>, Option<Arc<DiscardBackend>>);

fn bench_case(
    c: &mut Criterion,
    name: &str,
    make_backend: &dyn Fn(GuestMemoryMmap) -> Made,
    pattern: fn(u32) -> Vec<u32>,
    stop: Stop,
) {
    let mem = guest_memory(&[(0, RAM)]);
    let (backend, discard) = make_backend(mem.clone());
    let config = BalloonConfig {
        stats: false,
        ..BalloonConfig::default()
    };
    let mut rig = BalloonRig::with_backend(mem.clone(), config, backend);
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
                // Guest side, off the clock: fault the pages in, write the PFN buffer, publish;
                // let the previous request's release finish.
                round = round.wrapping_add(1);
                let pfns = pattern(round);
                for &p in &pfns {
                    mem.write_obj(0xa5u8, GuestAddress(u64::from(p) << 12))
                        .unwrap();
                }
                let bytes = pfn_bytes(&pfns);
                buffers.reset(BUFFER_BASE);
                let at = buffers.put(&mem, &bytes);
                queues[0].add(&mem, &[Desc::read(at, bytes.len() as u32)]);
                if let Some(b) = &discard {
                    b.flush();
                }
                // On the clock: the notification is handled.
                let t0 = Instant::now();
                dev.process_queue(0);
                let end = match stop {
                    Stop::Ack => interrupt.last_used_at.lock().unwrap().expect("interrupt"),
                    Stop::Released => {
                        if let Some(b) = &discard {
                            b.flush();
                        }
                        Instant::now()
                    }
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
/// request's (64 MiB in all).
fn contiguous_burst(i: u32) -> Vec<u32> {
    let base = FIRST_PFN + i * 256;
    (0..256u32).rev().map(|k| base + k).collect()
}

/// How the burst's memory is released.
#[derive(Clone, Copy)]
enum BurstMode {
    /// NaiveBackend: one madvise per page before each ack.
    Naive,
    /// The device as shipped: ack, then release in batches of RELEASE_BATCH_PAGES; what is left
    /// at the end is released as the idle timer would (`release_now`).
    Batched,
    /// The previous design: ack, then release that request's pages right away.
    EachRequest,
}

/// Where the burst's clock stops.
#[derive(Clone, Copy)]
enum BurstStop {
    /// Sum over the 64 requests of notification to interrupt: what the guest waits for.
    Acks,
    /// Sum over the 64 requests of the whole handling (ack and any release), plus the final
    /// release: everything the event loop spends until the burst's memory is back on the host.
    Released,
}

fn bench_burst(
    c: &mut Criterion,
    name: &str,
    mode: BurstMode,
    pattern: fn(u32) -> Vec<u32>,
    stop: BurstStop,
) {
    let mem = guest_memory(&[(0, RAM)]);
    let (backend, discard): Made = match mode {
        BurstMode::Naive => (Arc::new(NaiveBackend { mem: mem.clone() }), None),
        _ => {
            let b = Arc::new(DiscardBackend::after_ack(mem.clone()));
            (b.clone(), Some(b))
        }
    };
    let config = BalloonConfig {
        stats: false,
        ..BalloonConfig::default()
    };
    let mut rig = BalloonRig::with_backend(mem.clone(), config, backend);
    let requests: Vec<Vec<u8>> = (0..BURST).map(|i| pfn_bytes(&pattern(i))).collect();
    let all_pfns: Vec<u32> = (0..BURST).flat_map(pattern).collect();
    let mut group = c.benchmark_group("inflate_burst_64x256");
    group.throughput(Throughput::Elements(u64::from(BURST) * 256));
    group.measurement_time(Duration::from_secs(4));
    group.warm_up_time(Duration::from_millis(500));
    group.sample_size(10);
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
                // Off the clock: the guest touches every page, and the previous burst's pages
                // are taken back so that this burst inflates (and releases) them afresh.
                if let Some(d) = &discard {
                    d.deflate(&[PageRange::new(u64::from(FIRST_PFN), u64::from(PAGES))])
                        .unwrap();
                }
                for &p in &all_pfns {
                    mem.write_obj(0xa5u8, GuestAddress(u64::from(p) << 12))
                        .unwrap();
                }
                for bytes in &requests {
                    buffers.reset(BUFFER_BASE);
                    let at = buffers.put(&mem, bytes);
                    queues[0].add(&mem, &[Desc::read(at, bytes.len() as u32)]);
                    let t0 = Instant::now();
                    dev.process_queue(0);
                    if let BurstMode::EachRequest = mode {
                        dev.release_now();
                    }
                    let end = match stop {
                        BurstStop::Acks => {
                            interrupt.last_used_at.lock().unwrap().expect("interrupt")
                        }
                        BurstStop::Released => Instant::now(),
                    };
                    total += end.duration_since(t0);
                    queues[0].take_used(&mem);
                }
                // The idle timer's work (for Acks, off the clock).
                let t0 = Instant::now();
                dev.release_now();
                if let BurstStop::Released = stop {
                    total += t0.elapsed();
                }
                assert_eq!(dev.unreleased_bytes(), 0);
            }
            total
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    let sync = |m: GuestMemoryMmap| -> Made { (Arc::new(DiscardBackend::new(m)), None) };
    let after_ack = |m: GuestMemoryMmap| -> Made {
        let b = Arc::new(DiscardBackend::after_ack(m));
        (b.clone(), Some(b))
    };
    let naive = |m: GuestMemoryMmap| -> Made { (Arc::new(NaiveBackend { mem: m }), None) };
    let null = |_: GuestMemoryMmap| -> Made { (Arc::new(NullBackend), None) };
    type Case<'a> = (&'a str, &'a dyn Fn(GuestMemoryMmap) -> Made, Stop);
    for (pattern_name, pattern) in [
        ("scattered", scattered as fn(u32) -> Vec<u32>),
        ("contiguous", contiguous),
    ] {
        let cases: [Case; 6] = [
            ("naive_per_page_madvise", &naive, Stop::Ack),
            ("coalesced_sync", &sync, Stop::Ack),
            ("release_after_ack/ack", &after_ack, Stop::Ack),
            ("release_after_ack/released", &after_ack, Stop::Released),
            ("device_only_no_release", &null, Stop::Ack),
            ("naive_per_page_madvise_again", &naive, Stop::Ack),
        ];
        for (name, make, stop) in cases {
            bench_case(c, &format!("{pattern_name}/{name}"), make, pattern, stop);
        }
    }
}

fn burst_benches(c: &mut Criterion) {
    for (pattern_name, pattern) in [
        ("scattered", scattered_burst as fn(u32) -> Vec<u32>),
        ("contiguous", contiguous_burst),
    ] {
        let cases = [
            (
                "naive_per_page_madvise",
                BurstMode::Naive,
                BurstStop::Released,
            ),
            ("batched/acks", BurstMode::Batched, BurstStop::Acks),
            ("batched/released", BurstMode::Batched, BurstStop::Released),
            (
                "release_each_request/released",
                BurstMode::EachRequest,
                BurstStop::Released,
            ),
            (
                "naive_per_page_madvise_again",
                BurstMode::Naive,
                BurstStop::Released,
            ),
        ];
        for (name, mode, stop) in cases {
            bench_burst(c, &format!("{pattern_name}/{name}"), mode, pattern, stop);
        }
    }
}

criterion_group!(inflate, benches, burst_benches);
criterion_main!(inflate);
