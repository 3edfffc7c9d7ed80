//! The manager on real mappings: what the balloon, virtio-mem and free page reporting devices do,
//! checked the way an operator would (resident memory by mincore, file blocks, guest reads).

mod common;

use memory::Clock as _;

use common::*;
use memory::{Backing, Error, MemoryManager, Outcome, PageRange, Pfn, Reason};

fn pages(addr: u64, len: u64) -> PageRange {
    PageRange::from_addr(addr, len)
}

/// A balloon inflate as the VMM completes it: `offline` records and queues the pages, then the
/// manager's timer releases them (here at once, by `flush_discards`).
fn inflate(m: &mut MemoryManager, ranges: &[PageRange]) -> Outcome {
    let out = m.offline(&m.page_ranges(ranges)).unwrap();
    m.flush_discards().unwrap();
    out
}

#[test]
fn manager_is_send() {
    fn send<T: Send>() {}
    send::<MemoryManager>();
}

#[test]
fn inflate_frees_resident_memory_and_deflate_reads_zeros() {
    let (mut m, slots) = manager(&[boot(0, 64 * MIB, Backing::PrivateAnonymous)]);
    assert_eq!(
        slots.calls.lock().unwrap().len(),
        1,
        "boot RAM slot registered"
    );
    touch(&m, 0, 64 * MIB, 0xa5);
    let before = m.resident_bytes().unwrap();
    assert!(before >= 64 * MIB, "all touched: {before}");

    let out = inflate(&mut m, &[pages(16 * MIB, 16 * MIB)]);
    assert_eq!(
        out,
        Outcome {
            changed: 4096,
            refused: 0,
            unchanged: 0
        }
    );
    assert_eq!(m.stats().discard_calls, 1, "one madvise for one run");
    let after = m.resident_bytes().unwrap();
    assert_eq!(
        before - after,
        16 * MIB,
        "RSS dropped by the ballooned pages"
    );
    let s = m.stats();
    assert_eq!(s.ballooned_bytes, 16 * MIB);
    assert_eq!(s.discarded_bytes, 16 * MIB);
    assert_eq!(s.online_bytes, 48 * MIB);

    // Asking again changes nothing.
    let again = inflate(&mut m, &[pages(16 * MIB, 16 * MIB)]);
    assert_eq!(again.unchanged, 4096);
    assert_eq!(again.changed, 0);

    let out = m
        .online(&m.page_ranges(&[pages(16 * MIB, 16 * MIB)]))
        .unwrap();
    assert_eq!(out.changed, 4096);
    assert_eq!(read_u64(&m, 20 * MIB), 0, "a discarded page reads as zeros");
    assert_eq!(read_u64(&m, 40 * MIB), 0xa5a5_a5a5_a5a5_a5a5, "others kept");
    assert_eq!(m.stats().online_bytes, 64 * MIB);
    assert!(m.tracker().is_empty());
}

#[test]
fn refused_pages_are_counted_and_never_discarded() {
    let (mut m, _) = manager(&[
        boot(0, 16 * MIB, Backing::PrivateAnonymous),
        boot(32 * MIB, 16 * MIB, Backing::PrivateAnonymous),
    ]);
    touch(&m, 0, 16 * MIB, 1);
    touch(&m, 32 * MIB, 16 * MIB, 1);
    let before = m.resident_bytes().unwrap();
    // The hole between the regions, pages past the end, and the top of the PFN space.
    let req = [
        pages(16 * MIB, 16 * MIB),
        pages(48 * MIB, 4 * MIB),
        PageRange::new(u64::MAX - 3, 10),
    ];
    let out = inflate(&mut m, &req);
    assert_eq!(out.changed, 0);
    assert_eq!(out.refused, 4096 + 1024 + 10);
    assert_eq!(m.resident_bytes().unwrap(), before, "nothing discarded");
    assert_eq!(m.stats().refused_offline_pages, out.refused);
    assert_eq!(m.stats().discard_calls, 0);

    // A run straddling the end of the first region: only the inside part is taken.
    let out = inflate(&mut m, &[pages(15 * MIB, 2 * MIB)]);
    assert_eq!((out.changed, out.refused), (256, 256));
    assert_eq!(m.resident_bytes().unwrap(), before - MIB);

    // What the device logs for a request naming pages outside RAM: how many, and the first.
    let outside = m.page_ranges(&[PageRange::new(0x12345, 3), PageRange::new(0x2fff, 2)]);
    assert_eq!(outside.first_outside(), Some(0x3000));
    assert_eq!(outside.outside_ram(), 4);
}

#[test]
fn duplicate_and_overlapping_pages_count_once_and_coalesce() {
    let (mut m, _) = manager(&[boot(0, 16 * MIB, Backing::PrivateAnonymous)]);
    let req: Vec<PageRange> = [5u64, 3, 4, 4, 6, 100, 7]
        .iter()
        .map(|&p| PageRange::page(p))
        .collect();
    let out = inflate(&mut m, &req);
    assert_eq!(out.changed, 6);
    // Two runs, one process_madvise call (two madvise calls where the kernel refuses it).
    let calls = m.stats().discard_calls;
    assert!(calls == 1 || calls == 2, "3..8 and 100: {calls} calls");
    let runs = m.offline_runs(None, None, 10);
    assert_eq!(
        runs,
        vec![
            (PageRange::new(3, 5), Reason::Ballooned),
            (PageRange::new(100, 1), Reason::Ballooned)
        ]
    );
    assert_eq!(m.offline_runs(None, None, 1).len(), 1, "limit");
}

#[test]
fn memfd_punch_hole_frees_file_blocks() {
    let (mut m, _) = manager(&[boot(0, 32 * MIB, Backing::SharedMemfd)]);
    touch(&m, 0, 32 * MIB, 7);
    let full = m.region_file_blocks(0).unwrap().unwrap() * 512;
    assert!(full >= 32 * MIB, "file fully allocated: {full}");
    let out = inflate(&mut m, &[pages(8 * MIB, 8 * MIB)]);
    assert_eq!(out.changed, 2048);
    let after = m.region_file_blocks(0).unwrap().unwrap() * 512;
    assert_eq!(full - after, 8 * MIB, "punch-hole released the blocks");
    m.online(&m.page_ranges(&[pages(8 * MIB, 8 * MIB)]))
        .unwrap();
    assert_eq!(read_u64(&m, 10 * MIB), 0);
    assert_eq!(read_u64(&m, 20 * MIB), 0x0707_0707_0707_0707);
}

#[test]
fn shared_anonymous_uses_madv_remove() {
    let (mut m, _) = manager(&[boot(0, 16 * MIB, Backing::SharedAnonymous)]);
    touch(&m, 0, 16 * MIB, 3);
    let before = m.resident_bytes().unwrap();
    inflate(&mut m, &[pages(0, 4 * MIB)]);
    assert_eq!(before - m.resident_bytes().unwrap(), 4 * MIB);
    m.online(&m.page_ranges(&[pages(0, 4 * MIB)])).unwrap();
    assert_eq!(read_u64(&m, 0), 0);
}

#[test]
fn free_page_reporting_discards_but_does_not_track() {
    let (mut m, _) = manager(&[boot(0, 16 * MIB, Backing::PrivateAnonymous)]);
    touch(&m, 0, 16 * MIB, 9);
    inflate(&mut m, &[pages(0, MIB)]);
    let before = m.resident_bytes().unwrap();
    let out = m
        .discard_free(&m.page_ranges(&[pages(0, 4 * MIB)]))
        .unwrap();
    assert_eq!((out.changed, out.unchanged), (768, 256));
    assert_eq!(before - m.resident_bytes().unwrap(), 3 * MIB);
    assert_eq!(m.tracker().len(), 256, "reported pages are not offline");
    assert_eq!(m.stats().free_reported_bytes, 3 * MIB);
    assert_eq!(read_u64(&m, 2 * MIB), 0);
}

#[test]
fn hot_add_is_born_offline_and_costs_nothing_until_written() {
    let block = 128 * MIB;
    let (mut m, slots) = manager(&[
        boot(0, 64 * MIB, Backing::PrivateAnonymous),
        hotplug(4 * GIB, 64 * GIB, Backing::PrivateAnonymous, block),
    ]);
    let s = m.stats();
    assert_eq!(s.unplugged_bytes, 64 * GIB);
    assert_eq!(s.online_bytes, 64 * MIB);
    assert_eq!(s.hotplug_plugged_bytes, 0);
    assert!(
        s.tracker_heap_bytes < 1024,
        "born-offline 64 GiB region costs {} bytes",
        s.tracker_heap_bytes
    );
    assert_eq!(m.resident_bytes().unwrap(), 0, "nothing touched");
    assert_eq!(slots.calls.lock().unwrap().len(), 1, "only boot RAM mapped");

    // Ballooning unplugged memory is refused.
    let out = m.offline(&m.page_ranges(&[pages(4 * GIB, MIB)])).unwrap();
    assert_eq!(out.refused, 256);

    // Plug two blocks, with a partial block on each side refused.
    let out = m
        .plug(pages(4 * GIB + block - MIB, 2 * block + 2 * MIB))
        .unwrap();
    assert_eq!((out.changed, out.refused), (2 * 32768, 512));
    let calls = slots.calls.lock().unwrap().clone();
    let host = m.regions()[1].host_addr;
    assert_eq!(
        calls[1],
        SlotCall::Map {
            slot: 2,
            guest_addr: 4 * GIB + block,
            size: block,
            host_addr: host + block as usize
        }
    );
    assert_eq!(m.stats().hotplug_plugged_bytes, 2 * block);
    assert_eq!(m.resident_bytes().unwrap(), 0, "plugging touches nothing");
    touch(&m, 4 * GIB + block, block, 1);
    assert_eq!(m.resident_bytes().unwrap(), block);

    // Balloon part of a plugged block, then unplug it: all of it becomes unplugged again.
    m.offline(&m.page_ranges(&[pages(4 * GIB + block, MIB)]))
        .unwrap();
    let out = m.unplug(pages(4 * GIB + block, block)).unwrap();
    assert_eq!(out.changed, 32768);
    assert_eq!(m.resident_bytes().unwrap(), 0, "unplug released the block");
    let s = m.stats();
    assert_eq!(s.ballooned_bytes, 0);
    assert_eq!(s.unplugged_bytes, 64 * GIB - block);
    assert_eq!(s.discarded_bytes, 64 * GIB - block);
    assert_eq!(
        slots.calls.lock().unwrap().last().unwrap(),
        &SlotCall::Unmap {
            slot: 2,
            guest_addr: 4 * GIB + block,
            size: block
        }
    );
    // Plugged blocks come and go only whole: the tracker is the one record of them.
    assert_eq!(
        m.plugged_runs(pages(4 * GIB, 4 * block)),
        vec![pages(4 * GIB + 2 * block, block)]
    );
    assert_eq!(
        m.offline_runs(Some(Reason::Unplugged), None, 8),
        vec![
            (PageRange::from_addr(4 * GIB, 2 * block), Reason::Unplugged),
            (
                PageRange::from_addr(4 * GIB + 3 * block, 64 * GIB - 3 * block),
                Reason::Unplugged
            ),
        ]
    );
    assert_eq!(m.regions()[1].plugged_bytes, block);
}

#[test]
fn failed_slot_map_leaves_block_unplugged() {
    let (mut m, slots) = manager(&[hotplug(0, 256 * MIB, Backing::PrivateAnonymous, 128 * MIB)]);
    *slots.fail_next.lock().unwrap() = true;
    let err = m.plug(pages(0, 128 * MIB)).unwrap_err();
    assert!(matches!(err, Error::Slot { slot: 0, .. }), "{err}");
    assert_eq!(m.stats().hotplug_plugged_bytes, 0);
    assert_eq!(m.tracker().len(), 65536);
    assert_eq!(m.plug(pages(0, 128 * MIB)).unwrap().changed, 32768);
}

#[test]
fn deferred_discard_skips_pages_back_online() {
    let (mut m, _) = manager(&[boot(0, 16 * MIB, Backing::PrivateAnonymous)]);
    touch(&m, 0, 16 * MIB, 0x11);
    let before = m.resident_bytes().unwrap();
    m.offline(&m.page_ranges(&[pages(0, 4 * MIB)])).unwrap();
    assert_eq!(m.resident_bytes().unwrap(), before, "nothing discarded yet");
    assert_eq!(m.stats().pending_discard_bytes, 4 * MIB);
    // The guest takes 1 MiB back and writes to it before the flush.
    m.online(&m.page_ranges(&[pages(MIB, MIB)])).unwrap();
    touch(&m, MIB, MIB, 0x22);
    let done = m.flush_discards().unwrap();
    assert_eq!(done, 768);
    assert_eq!(read_u64(&m, MIB), 0x2222_2222_2222_2222, "online page kept");
    assert_eq!(before - m.resident_bytes().unwrap(), 3 * MIB);
    let s = m.stats();
    assert_eq!((s.pending_discard_bytes, s.discarded_bytes), (0, 3 * MIB));
    assert_eq!(m.flush_discards().unwrap(), 0, "queue drained");
}

#[test]
fn hugetlbfs_discards_only_whole_huge_pages() {
    let huge = 2 * MIB;
    let Ok((mut m, _)) = std::panic::catch_unwind(|| {
        MemoryManager::new(
            &[boot(0, 8 * MIB, Backing::HugetlbFs)],
            Box::new(FakeSlots::default()),
        )
        .map(|m| (m, ()))
    })
    .unwrap_or_else(|_| Err(Error::NoRegions)) else {
        eprintln!("skipped: no 2 MiB huge pages available on this host");
        return;
    };
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| touch(&m, 0, 8 * MIB, 1))).is_err()
    {
        eprintln!("skipped: huge pages could not be faulted in");
        return;
    }
    let calls0 = m.stats().discard_calls;
    // Half a huge page: tracked, not discarded.
    inflate(&mut m, &[pages(0, MIB)]);
    assert_eq!(m.stats().discard_calls, calls0);
    assert_eq!(m.stats().pending_discard_bytes, MIB);
    // The other half: now the whole huge page goes.
    inflate(&mut m, &[pages(MIB, MIB)]);
    assert_eq!(m.stats().discard_calls, calls0 + 1);
    assert_eq!(m.stats().discarded_bytes, huge);
    // One piece back online: the huge page is backed again when touched.
    m.online(&m.page_ranges(&[PageRange::page(0)])).unwrap();
    assert_eq!(m.stats().discarded_bytes, 0);
    assert_eq!(read_u64(&m, 0), 0);
}

#[test]
fn invalid_layouts_are_explained() {
    let slots = || Box::new(FakeSlots::default());
    let e = MemoryManager::new(
        &[
            boot(0, 16 * MIB, Backing::PrivateAnonymous),
            boot(8 * MIB, 16 * MIB, Backing::PrivateAnonymous),
        ],
        slots(),
    )
    .err()
    .unwrap();
    assert_eq!(
        e.to_string(),
        "region at 0x0..0x1000000 overlaps region at 0x800000..0x1800000"
    );
    let e = MemoryManager::new(
        &[boot(0x1001, 16 * MIB, Backing::PrivateAnonymous)],
        slots(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("0x1001"), "{e}");
    let e = MemoryManager::new(
        &[hotplug(0, 100 * MIB, Backing::PrivateAnonymous, 64 * MIB)],
        slots(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("block size"), "{e}");
    assert!(matches!(
        MemoryManager::new(&[], slots()).err().unwrap(),
        Error::NoRegions
    ));
}

#[test]
fn pfn_helpers() {
    assert_eq!(Pfn::from_addr(0x12345678).0, 0x12345);
    assert_eq!(format!("{:?}", PageRange::new(0x10, 2)), "0x10+0x2");
    assert_eq!(PageRange::new(u64::MAX, 5).end(), u64::MAX);
}

/// A deferred flush of many scattered runs (what the balloon's batched release does) goes to the
/// kernel in a few batched calls, releases every run still offline and nothing else (pages taken
/// back before the flush keep their contents), on 4 KiB and on huge pages; whole 2 MiB pieces of a
/// huge-page region are released too.
#[test]
fn deferred_flush_of_scattered_runs_is_batched() {
    for backing in [Backing::PrivateAnonymous, Backing::PrivateAnonymousHuge] {
        let (mut m, _) = manager(&[boot(0, 32 * MIB, backing)]);
        touch(&m, 0, 32 * MIB, 0x5a);
        let before = m.resident_bytes().unwrap();
        // 1200 single pages, two apart, from 4 MiB up; and 4 MiB from 16 MiB (2 MiB-aligned).
        let scattered: Vec<PageRange> = (0..1200u64)
            .map(|i| PageRange::page(1024 + 2 * i))
            .collect();
        m.offline(&m.page_ranges(&scattered)).unwrap();
        m.offline(&m.page_ranges(&[pages(16 * MIB, 4 * MIB)]))
            .unwrap();
        // Every sixth page comes back before the flush and is written to.
        let back: Vec<PageRange> = scattered.iter().copied().step_by(6).collect();
        m.online(&m.page_ranges(&back)).unwrap();
        for r in &back {
            touch(&m, r.start.addr(), 4096, 0x77);
        }
        assert_eq!(
            m.stats().discard_calls,
            0,
            "{backing:?}: nothing before the flush"
        );
        assert_eq!(m.flush_discards().unwrap(), 1000 + 1024);
        let calls = m.stats().discard_calls;
        // 1001 calls where the kernel refuses process_madvise(MADV_DONTNEED) (before 6.13).
        assert!(
            calls <= 4 || calls == 1001,
            "{backing:?}: 1001 runs in {calls} calls"
        );
        assert_eq!(
            before - m.resident_bytes().unwrap(),
            (1000 + 1024) * 4096,
            "{backing:?}: RSS fell by exactly the released pages"
        );
        for (i, r) in scattered.iter().enumerate() {
            let p = r.start.0;
            assert_eq!(
                read_u64(&m, (p + 1) * 4096),
                0x5a5a5a5a5a5a5a5a,
                "{backing:?}: online neighbour kept"
            );
            if i % 6 == 0 {
                assert_eq!(
                    read_u64(&m, p * 4096),
                    0x7777777777777777,
                    "{backing:?}: page back online kept"
                );
            }
        }
        assert_eq!(m.stats().discarded_bytes, (1000 + 1024) * 4096);
        m.online(&m.page_ranges(&scattered)).unwrap();
        m.online(&m.page_ranges(&[pages(16 * MIB, 4 * MIB)]))
            .unwrap();
        assert_eq!(
            read_u64(&m, 1026 * 4096),
            0,
            "{backing:?}: released page reads zeros"
        );
        assert_eq!(
            read_u64(&m, 16 * MIB + 8192),
            0,
            "{backing:?}: released page reads zeros"
        );
        assert_eq!(m.flush_discards().unwrap(), 0);
    }
}

/// The manager's schedule on a manual clock, as the VMM's event loop drives it: deferred
/// discards wait for the inflate queue to be idle for `RELEASE_IDLE_DELAY` (counted from the
/// last queued page), a page deflated before its release keeps its data, and the tracker is
/// compacted once it was left alone for `COMPACT_IDLE_DELAY`.
#[test]
fn the_timer_releases_when_idle_and_compacts_when_quiet() {
    use memory::{ManualClock, COMPACT_IDLE_DELAY, RELEASE_IDLE_DELAY};
    use std::sync::Arc;
    use std::time::Duration;

    let (mut m, _) = manager(&[boot(0, 64 * MIB, Backing::PrivateAnonymous)]);
    let clock = ManualClock::new();
    m.set_clock(Arc::new(clock.clone()));
    assert_eq!(m.next_deadline(), None, "nothing to do");
    touch(&m, 0, 64 * MIB, 0x3c);
    let before = m.resident_bytes().unwrap();
    // 40 scattered pages in each of the first two tracker leaves (16 MiB each).
    let scattered: Vec<PageRange> = (0..40)
        .map(|k| PageRange::page(0x100 + 97 * k))
        .chain((0..40).map(|k| PageRange::page(0x1100 + 89 * k)))
        .collect();
    assert_eq!(m.offline(&m.page_ranges(&scattered)).unwrap().changed, 80);
    let t0 = clock.now();
    assert_eq!(m.next_deadline(), Some(t0 + RELEASE_IDLE_DELAY));

    // More pages 1 ms later push the release back; one of the first is deflated meanwhile.
    clock.advance(Duration::from_millis(1));
    m.offline(&m.page_ranges(&[pages(32 * MIB, MIB)])).unwrap();
    m.online(&m.page_ranges(&[PageRange::page(0x100)])).unwrap();
    clock.advance(Duration::from_millis(1));
    assert_eq!(m.tick().unwrap().released_pages, 0, "queue not idle yet");
    assert_eq!(m.resident_bytes().unwrap(), before, "nothing released");
    clock.advance(Duration::from_millis(1));
    let tick = m.tick().unwrap();
    assert_eq!(tick.released_pages, 79 + 256);
    assert_eq!(tick.compacted_leaves, 0, "compaction waits for quiet");
    assert_eq!(m.resident_bytes().unwrap(), before - (79 + 256) * 4096);
    assert_eq!(
        read_u64(&m, 0x100 << 12),
        0x3c3c_3c3c_3c3c_3c3c,
        "deflated page kept"
    );
    assert_eq!(m.stats().released_pages, 79 + 256);

    // Left alone for COMPACT_IDLE_DELAY after the release: the two scattered leaves turn sparse.
    let released_at = clock.now();
    assert_eq!(m.next_deadline(), Some(released_at + COMPACT_IDLE_DELAY));
    let heap = m.stats().tracker_heap_bytes;
    clock.advance(COMPACT_IDLE_DELAY - Duration::from_millis(1));
    assert_eq!(
        m.tick().unwrap().compacted_leaves,
        0,
        "not quiet long enough"
    );
    clock.advance(Duration::from_millis(1));
    assert_eq!(m.tick().unwrap().compacted_leaves, 2);
    assert!(m.stats().tracker_heap_bytes + 700 < heap);
    assert_eq!(m.next_deadline(), None, "all done");
    m.tracker().check_invariants().unwrap();

    // The sparse leaves take further changes.
    m.online(&m.page_ranges(&scattered[..20])).unwrap();
    assert_eq!(m.stats().ballooned_bytes, (60 + 256) * 4096);
}

/// A full batch is due at once: the event loop releases it on its next turn, after the ack.
#[test]
fn a_full_batch_is_due_at_once() {
    use memory::{ManualClock, RELEASE_BATCH_PAGES};
    use std::sync::Arc;

    let (mut m, _) = manager(&[boot(0, 64 * MIB, Backing::PrivateAnonymous)]);
    let clock = ManualClock::new();
    m.set_clock(Arc::new(clock.clone()));
    m.offline(&m.page_ranges(&[PageRange::new(0, RELEASE_BATCH_PAGES - 1)]))
        .unwrap();
    assert!(m.next_deadline().unwrap() > clock.now());
    m.offline(&m.page_ranges(&[PageRange::new(RELEASE_BATCH_PAGES, 1)]))
        .unwrap();
    assert_eq!(m.next_deadline(), Some(clock.now()), "due now");
    assert_eq!(m.tick().unwrap().released_pages, RELEASE_BATCH_PAGES);
    assert_eq!(m.queued_discards(), 0);
}

/// Hot-add memory changes the tracker too: the schedule compacts after plug and unplug, with
/// no balloon in the VM.
#[test]
fn plugging_schedules_a_compaction() {
    use memory::{ManualClock, COMPACT_IDLE_DELAY};
    use std::sync::Arc;

    let (mut m, _) = manager(&[
        boot(0, 16 * MIB, Backing::PrivateAnonymous),
        hotplug(GIB, 64 * MIB, Backing::PrivateAnonymous, 2 * MIB),
    ]);
    let clock = ManualClock::new();
    m.set_clock(Arc::new(clock.clone()));
    m.plug(pages(GIB, 4 * MIB)).unwrap();
    assert_eq!(m.next_deadline(), Some(clock.now() + COMPACT_IDLE_DELAY));
    clock.advance(COMPACT_IDLE_DELAY);
    m.tick().unwrap();
    assert_eq!(m.next_deadline(), None, "compacted");
}

/// Plug and unplug are all or nothing: when KVM refuses one block's slot, the blocks already
/// done in the same request go back, so the device can answer BUSY and the guest retry.
#[test]
fn a_failed_plug_or_unplug_undoes_its_other_blocks() {
    let (mut m, slots) = manager(&[hotplug(0, 256 * MIB, Backing::PrivateAnonymous, 2 * MIB)]);
    *slots.fail_after.lock().unwrap() = Some(2);
    let err = m.plug(pages(0, 8 * MIB)).unwrap_err();
    assert!(matches!(err, Error::Slot { slot: 2, .. }), "{err}");
    assert_eq!(m.stats().hotplug_plugged_bytes, 0, "blocks 0 and 1 undone");
    assert_eq!(m.plugged_runs(pages(0, 256 * MIB)), vec![]);
    let calls = slots.calls.lock().unwrap().clone();
    assert!(
        matches!(
            calls[..],
            [
                SlotCall::Map { slot: 0, .. },
                SlotCall::Map { slot: 1, .. },
                SlotCall::Unmap { slot: 1, .. },
                SlotCall::Unmap { slot: 0, .. }
            ]
        ),
        "{calls:?}"
    );
    // The retry succeeds.
    assert_eq!(m.plug(pages(0, 8 * MIB)).unwrap().changed, 4 * 512);
    // Unplug of blocks 1 and 2: block 2's slot cannot be removed, so block 1 is plugged again.
    touch(&m, 0, 8 * MIB, 7);
    *slots.fail_after.lock().unwrap() = Some(1);
    slots.calls.lock().unwrap().clear();
    let err = m.unplug(pages(2 * MIB, 4 * MIB)).unwrap_err();
    assert!(matches!(err, Error::Slot { slot: 2, .. }), "{err}");
    assert_eq!(m.plugged_runs(pages(0, 256 * MIB)), vec![pages(0, 8 * MIB)]);
    assert_eq!(read_u64(&m, 0), 0x0707_0707_0707_0707, "block 0 untouched");
    assert_eq!(
        read_u64(&m, 2 * MIB),
        0x0707_0707_0707_0707,
        "block 1 kept its contents: nothing is released before every slot is gone"
    );
    assert_eq!(m.stats().unplugged_bytes, 248 * MIB);
}

/// Linux unplugs a whole memory block (64 blocks of 2 MiB) in one request: every block loses
/// its slot, and the backing of the request's adjacent blocks goes back to the host in one
/// system call, not one per block. Blocks already unplugged in a request are left alone, and
/// the others still go in one call per run of adjacent blocks.
#[test]
fn unplugging_adjacent_blocks_releases_them_in_one_call() {
    let (mut m, slots) = manager(&[hotplug(0, 256 * MIB, Backing::PrivateAnonymous, 2 * MIB)]);
    m.plug(pages(0, 128 * MIB)).unwrap();
    touch(&m, 0, 128 * MIB, 3);
    assert_eq!(m.resident_bytes().unwrap(), 128 * MIB);
    slots.calls.lock().unwrap().clear();
    let calls = m.stats().discard_calls;
    let out = m.unplug(pages(0, 128 * MIB)).unwrap();
    assert_eq!((out.changed, out.unchanged, out.refused), (32768, 0, 0));
    assert_eq!(
        m.stats().discard_calls - calls,
        1,
        "64 adjacent blocks, one call"
    );
    assert_eq!(m.resident_bytes().unwrap(), 0, "all released");
    let unmapped: Vec<u32> = slots
        .calls
        .lock()
        .unwrap()
        .iter()
        .map(|c| match c {
            SlotCall::Unmap { slot, .. } => *slot,
            other => panic!("only unmaps expected: {other:?}"),
        })
        .collect();
    assert_eq!(
        unmapped,
        (0..64).collect::<Vec<u32>>(),
        "every block's slot removed"
    );
    assert_eq!(m.stats().discarded_bytes, 256 * MIB);

    // Blocks 2..6 and 8..10 plugged, then the request covers 0..12: two runs, two calls.
    m.plug(pages(4 * MIB, 8 * MIB)).unwrap();
    m.plug(pages(16 * MIB, 4 * MIB)).unwrap();
    touch(&m, 4 * MIB, 8 * MIB, 4);
    touch(&m, 16 * MIB, 4 * MIB, 4);
    let calls = m.stats().discard_calls;
    let out = m.unplug(pages(0, 24 * MIB)).unwrap();
    assert_eq!((out.changed, out.unchanged), (6 * 512, 6 * 512));
    assert_eq!(m.stats().discard_calls - calls, 2);
    assert_eq!(m.resident_bytes().unwrap(), 0);
    assert_eq!(m.plugged_runs(pages(0, 256 * MIB)), vec![]);
}

/// Dropping the manager removes every KVM slot before the mappings go.
#[test]
fn drop_unmaps_every_slot() {
    let (mut m, slots) = manager(&[
        boot(0, 16 * MIB, Backing::PrivateAnonymous),
        hotplug(GIB, 64 * MIB, Backing::PrivateAnonymous, 2 * MIB),
    ]);
    m.plug(pages(GIB + 4 * MIB, 4 * MIB)).unwrap();
    slots.calls.lock().unwrap().clear();
    drop(m);
    let mut unmapped: Vec<u32> = slots
        .calls
        .lock()
        .unwrap()
        .iter()
        .map(|c| match c {
            SlotCall::Unmap { slot, .. } => *slot,
            other => panic!("{other:?}"),
        })
        .collect();
    unmapped.sort();
    // Boot RAM is slot 0; hot-add block k is slot 1 + k.
    assert_eq!(unmapped, vec![0, 3, 4]);
}

/// A boot slot KVM refuses while the manager is made: the slots registered before it are
/// removed again, since `new` fails and the mappings go.
#[test]
fn a_failed_boot_slot_removes_the_ones_before_it() {
    let slots = FakeSlots::default();
    *slots.fail_after.lock().unwrap() = Some(1);
    let specs = [
        boot(0, 16 * MIB, Backing::PrivateAnonymous),
        boot(32 * MIB, 16 * MIB, Backing::PrivateAnonymous),
    ];
    let err = MemoryManager::new(&specs, Box::new(slots.clone()))
        .err()
        .unwrap();
    assert!(matches!(err, Error::Slot { slot: 1, .. }), "{err}");
    let calls = slots.calls.lock().unwrap().clone();
    assert!(
        matches!(
            calls[..],
            [
                SlotCall::Map { slot: 0, .. },
                SlotCall::Unmap { slot: 0, .. }
            ]
        ),
        "{calls:?}"
    );
}
