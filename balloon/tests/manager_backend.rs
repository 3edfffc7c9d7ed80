//! Both devices on memory/'s real MemoryManager: real mappings, real discards, the manager's
//! accounting checked after each guest request.

use std::sync::{Arc, Mutex};

use balloon::mem::{request, response, MemConfig};
use balloon::testing::{
    mem_request_bytes, BalloonRig, Desc, DriverQueue, ManualClock, TestInterrupt, BUFFER_BASE,
};
use balloon::{BalloonBackend, BalloonConfig, MemBackend, VirtioMem};
use memory::{
    Backing, Clock, MemoryManager, RegionKind, RegionSpec, COMPACT_IDLE_DELAY, RELEASE_BATCH_PAGES,
    RELEASE_IDLE_DELAY,
};
use virtio::VirtioDevice;
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;
const HOTPLUG_AT: u64 = 1 << 30;

fn manager() -> Arc<Mutex<MemoryManager>> {
    let specs = [
        RegionSpec {
            guest_addr: 0,
            size: 32 * MIB,
            backing: Backing::PrivateAnonymous,
            kind: RegionKind::BootRam,
        },
        RegionSpec {
            guest_addr: HOTPLUG_AT,
            size: 256 * MIB,
            backing: Backing::PrivateAnonymous,
            kind: RegionKind::Hotplug {
                block_size: 2 * MIB,
            },
        },
    ];
    Arc::new(Mutex::new(
        MemoryManager::new(&specs, Box::new(balloon::testing::NoSlots)).expect("manager"),
    ))
}

/// A balloon (no statistics) driven by the test driver over `mm`'s guest RAM.
fn rig_on(
    mm: &Arc<Mutex<MemoryManager>>,
    config: BalloonConfig,
) -> (BalloonRig, vm_memory::GuestMemoryMmap<()>) {
    let mem = mm.lock().unwrap().guest_memory().clone();
    let backend: Arc<dyn BalloonBackend> = mm.clone();
    let config = BalloonConfig {
        stats: false,
        ..config
    };
    (BalloonRig::with_backend(mem.clone(), config, backend), mem)
}

/// As the VMM runs it: the manager queues discards and releases them on its own timer, here
/// on a manual clock.
fn deferred(mm: Arc<Mutex<MemoryManager>>) -> (Arc<Mutex<MemoryManager>>, ManualClock) {
    let clock = ManualClock::new();
    {
        let mut m = mm.lock().unwrap();
        m.set_clock(Arc::new(clock.clone()));
    }
    (mm, clock)
}

/// One turn of the VMM's event loop for the manager's timer: `tick` if its deadline has come.
fn timer_turn(mm: &Mutex<MemoryManager>, clock: &ManualClock) -> memory::Tick {
    let mut m = mm.lock().unwrap();
    assert_eq!(
        m.tick_due(),
        m.next_deadline().is_some_and(|d| d <= clock.now()),
        "tick_due reads the manager's clock"
    );
    if m.tick_due() {
        m.tick().unwrap()
    } else {
        memory::Tick::default()
    }
}

fn pending(mm: &Mutex<MemoryManager>) -> u64 {
    mm.lock().unwrap().stats().pending_discard_bytes
}

/// A balloon quiet for `COMPACT_IDLE_DELAY` has the manager compact its tracker: the two
/// boot-RAM leaves holding 40 scattered ballooned pages each become sparse leaves, and the
/// balloon goes on working on them.
#[test]
fn a_quiet_balloon_compacts_the_tracker() {
    let (mm, clock) = deferred(manager());
    let (mut rig, mem) = rig_on(&mm, BalloonConfig::default());
    let pfns: Vec<u32> = (0..40)
        .map(|k| 0x100 + 97 * k)
        .chain((0..40).map(|k| 0x1100 + 89 * k))
        .collect();
    for &p in &pfns {
        mem.write_obj(5u8, GuestAddress(u64::from(p) << 12))
            .unwrap();
    }
    assert_eq!(rig.inflate(&pfns).len(), 1);
    clock.advance(RELEASE_IDLE_DELAY);
    assert_eq!(
        timer_turn(&mm, &clock).released_pages,
        80,
        "idle timer releases"
    );
    let heap = mm.lock().unwrap().stats().tracker_heap_bytes;
    // Not quiet for long enough yet: nothing compacted.
    clock.advance(COMPACT_IDLE_DELAY / 2);
    assert_eq!(timer_turn(&mm, &clock).compacted_leaves, 0);
    assert_eq!(mm.lock().unwrap().stats().tracker_compacted_leaves, 0);

    clock.advance(COMPACT_IDLE_DELAY / 2);
    assert_eq!(timer_turn(&mm, &clock).compacted_leaves, 2);
    let s = mm.lock().unwrap().stats();
    assert_eq!(s.tracker_compacted_leaves, 2);
    // Two 528-byte bitmaps become two sparse leaves of 40 pages (96 bytes each, and the
    // node's list of them); the nodes themselves stay.
    assert!(
        s.tracker_heap_bytes + 700 < heap,
        "tracker heap {heap} -> {} bytes",
        s.tracker_heap_bytes
    );
    assert_eq!(s.ballooned_bytes, 80 * 4096);

    // Deflate half of them, inflate others in the same leaves: the sparse leaves take the
    // changes (and turn back into bitmaps where they must).
    rig.deflate(&pfns[..20]);
    let more: Vec<u32> = (0..30).map(|k| 0x180 + 101 * k).collect();
    for &p in &more {
        mem.write_obj(6u8, GuestAddress(u64::from(p) << 12))
            .unwrap();
    }
    assert_eq!(rig.inflate(&more).len(), 1);
    assert_eq!(mm.lock().unwrap().flush_discards().unwrap(), 30);
    let s = mm.lock().unwrap().stats();
    assert_eq!(s.ballooned_bytes, (60 + 30) * 4096);
    for &p in pfns[20..].iter().chain(&more) {
        let v: u8 = mem.read_obj(GuestAddress(u64::from(p) << 12)).unwrap();
        assert_eq!(v, 0, "ballooned page {p:#x} was discarded");
    }
    let t = mm.lock().unwrap();
    for &p in &pfns[..20] {
        assert!(!t.tracker().contains(u64::from(p)), "deflated {p:#x}");
    }
    for &p in pfns[20..].iter().chain(&more) {
        assert!(t.tracker().contains(u64::from(p)), "ballooned {p:#x}");
    }
    t.tracker().check_invariants().unwrap();
}

#[test]
fn balloon_on_the_memory_manager() {
    let (mm, clock) = deferred(manager());
    let (mut rig, mem) = rig_on(
        &mm,
        BalloonConfig {
            free_page_reporting: true,
            ..BalloonConfig::default()
        },
    );
    for p in 0x1000..0x1100u64 {
        mem.write_obj(7u8, GuestAddress(p << 12)).unwrap();
    }
    let pfns: Vec<u32> = (0x1000..0x1100).collect();
    assert_eq!(rig.inflate(&pfns).len(), 1);
    // PFNs in the hot-add region are not boot RAM the balloon may take: refused by someone.
    rig.inflate(&[(HOTPLUG_AT >> 12) as u32]);
    let s = mm.lock().unwrap().stats();
    assert_eq!(s.ballooned_bytes, 256 * 4096);
    assert_eq!(rig.dev.ballooned_bytes(), 256 * 4096);
    // Acknowledged, not released yet: the pages wait for a batch or for the queue to go idle.
    assert!(
        mm.lock().unwrap().queued_discards() > 0,
        "queued after the ack"
    );
    assert_eq!(pending(&mm), 256 * 4096);
    clock.advance(RELEASE_IDLE_DELAY);
    assert_eq!(
        timer_turn(&mm, &clock).released_pages,
        256,
        "idle timer releases"
    );
    assert_eq!(
        mm.lock().unwrap().queued_discards(),
        0,
        "released once the inflate queue went idle"
    );
    let v: u8 = mem.read_obj(GuestAddress(0x1000 << 12)).unwrap();
    assert_eq!(v, 0, "inflated page was discarded");
    assert!(rig.dev.counters().refused_pfns >= 1);

    rig.deflate(&pfns[..128]);
    assert_eq!(mm.lock().unwrap().stats().ballooned_bytes, 128 * 4096);
    rig.deflate(&[0x1800]);
    assert_eq!(rig.dev.counters().deflate_not_inflated_pfns, 1);

    // Free page reporting: 16 pages, not ballooned afterwards.
    rig.buffers.reset(BUFFER_BASE);
    assert_eq!(rig.send(2, &[Desc::write(0x180_0000, 16 * 4096)]).len(), 1);
    let s = mm.lock().unwrap().stats();
    assert_eq!(s.ballooned_bytes, 128 * 4096);
    assert_eq!(rig.dev.counters().reported_bytes_freed, 16 * 4096);

    // Reset gives the rest back.
    rig.dev.reset();
    assert_eq!(mm.lock().unwrap().stats().ballooned_bytes, 0);
}

#[test]
fn virtio_mem_on_the_memory_manager() {
    let mm = manager();
    let mem = mm.lock().unwrap().guest_memory().clone();
    let backend: Arc<dyn MemBackend> = mm.clone();
    let config = MemConfig {
        requested_size: 64 * MIB,
        ..MemConfig::new(HOTPLUG_AT, 256 * MIB)
    };
    let mut dev = VirtioMem::new(config, backend).unwrap();
    let mut q = DriverQueue::new(&mem, 0x1_0000, 128);
    let f = dev.avail_features();
    dev.ack_features(f);
    dev.activate(balloon::testing::activation(
        &mem,
        std::slice::from_ref(&q),
        Arc::new(TestInterrupt::default()),
        f,
    ))
    .unwrap();
    let mut req = |dev: &mut VirtioMem, kind: u16, addr: u64, nb: u16| -> u16 {
        mem.write_slice(
            &mem_request_bytes(kind, addr, nb),
            GuestAddress(BUFFER_BASE),
        )
        .unwrap();
        q.add(
            &mem,
            &[
                Desc::read(BUFFER_BASE, 24),
                Desc::write(BUFFER_BASE + 64, 10),
            ],
        );
        dev.process_queue();
        q.take_used(&mem);
        let r: u16 = mem.read_obj(GuestAddress(BUFFER_BASE + 64)).unwrap();
        r
    };
    assert_eq!(req(&mut dev, request::PLUG, HOTPLUG_AT, 8), response::ACK);
    assert_eq!(mm.lock().unwrap().stats().hotplug_plugged_bytes, 16 * MIB);
    mem.write_obj(9u8, GuestAddress(HOTPLUG_AT)).unwrap();
    assert_eq!(
        req(&mut dev, request::UNPLUG, HOTPLUG_AT + 8 * MIB, 4),
        response::ACK
    );
    assert_eq!(mm.lock().unwrap().stats().hotplug_plugged_bytes, 8 * MIB);
    let v: u8 = mem.read_obj(GuestAddress(HOTPLUG_AT)).unwrap();
    assert_eq!(v, 9, "plugged data survives unplugging other blocks");
    assert_eq!(req(&mut dev, request::UNPLUG_ALL, 0, 0), response::ACK);
    assert_eq!(mm.lock().unwrap().stats().hotplug_plugged_bytes, 0);
    assert_eq!(dev.plugged_size(), 0);
}

/// Whether the host page behind guest `pfn` is resident (mincore).
fn resident(mem: &vm_memory::GuestMemoryMmap<()>, pfn: u64) -> bool {
    use vm_memory::GuestMemoryBackend;
    let host = mem.get_host_address(GuestAddress(pfn << 12)).unwrap();
    let mut v = [0u8; 1];
    // SAFETY: mincore on one page of a live mapping, writing one byte into `v`.
    let ret = unsafe { libc::mincore(host.cast(), 4096, v.as_mut_ptr()) };
    assert_eq!(ret, 0);
    v[0] & 1 != 0
}

/// Request `i` (< 24) of a burst: 256 PFNs from 4 MiB up, none adjacent within the request.
fn burst_request(i: u32) -> Vec<u32> {
    (0..256u32).map(|j| 0x400 + j * 24 + i).collect()
}

/// A burst of inflate requests as Linux sends them, with the event loop's timer turn after
/// each ack: a full batch is released on the turn right after the ack that filled it, the rest
/// once the queue has been idle for `RELEASE_IDLE_DELAY`, and never before the guest has its
/// buffer back.
#[test]
fn burst_is_released_in_batches_and_by_the_idle_timer() {
    let (mm, clock) = deferred(manager());
    let (mut rig, mem) = rig_on(&mm, BalloonConfig::default());
    let batch_requests = (RELEASE_BATCH_PAGES / 256) as u32;
    let requests = batch_requests + 8;
    for i in 0..requests {
        for p in burst_request(i) {
            mem.write_obj(0x5au8, GuestAddress(u64::from(p) << 12))
                .unwrap();
        }
    }
    for i in 0..requests {
        clock.advance(RELEASE_IDLE_DELAY / 4);
        let used_before = rig.interrupt.used_count();
        assert_eq!(rig.inflate(&burst_request(i)).len(), 1, "request {i} acked");
        assert_eq!(rig.interrupt.used_count(), used_before + 1);
        // The ack is out; only now does the event loop get to the manager's timer.
        let unreleased = pending(&mm);
        if i + 1 == batch_requests {
            assert_eq!(
                unreleased,
                u64::from(batch_requests) * 256 * 4096,
                "not before the ack"
            );
            assert_eq!(
                timer_turn(&mm, &clock).released_pages,
                RELEASE_BATCH_PAGES,
                "a full batch is released on the next turn"
            );
            for r in 0..batch_requests {
                for p in burst_request(r) {
                    assert!(!resident(&mem, u64::from(p)), "page {p:#x} kept");
                }
            }
        } else {
            assert_eq!(timer_turn(&mm, &clock).released_pages, 0, "request {i}");
            let expect = u64::from((i + 1) % batch_requests) * 256 * 4096;
            assert_eq!(unreleased, expect, "request {i}");
        }
    }
    for p in burst_request(requests - 1) {
        assert!(
            resident(&mem, u64::from(p)),
            "released before the queue went idle"
        );
    }
    assert_eq!(
        mm.lock().unwrap().stats().ballooned_bytes,
        u64::from(requests) * 256 * 4096
    );

    // The idle timer releases the rest, exactly RELEASE_IDLE_DELAY after the last request.
    clock.advance(RELEASE_IDLE_DELAY - std::time::Duration::from_micros(1));
    assert_eq!(timer_turn(&mm, &clock).released_pages, 0, "not idle yet");
    clock.advance(std::time::Duration::from_micros(1));
    assert_eq!(timer_turn(&mm, &clock).released_pages, 8 * 256);
    assert_eq!(pending(&mm), 0);
    for i in 0..requests {
        for p in burst_request(i) {
            assert!(!resident(&mem, u64::from(p)), "page {p:#x} kept");
            let v: u8 = mem.read_obj(GuestAddress(u64::from(p) << 12)).unwrap();
            assert_eq!(v, 0);
        }
    }
    assert_eq!(rig.interrupt.used_count(), requests as usize);
}

#[test]
fn reset_in_the_middle_of_a_burst_leaves_nothing_queued() {
    let (mm, clock) = deferred(manager());
    let (mut rig, mem) = rig_on(&mm, BalloonConfig::default());
    for i in 0..8 {
        for p in burst_request(i) {
            mem.write_obj(0x5au8, GuestAddress(u64::from(p) << 12))
                .unwrap();
        }
        assert_eq!(rig.inflate(&burst_request(i)).len(), 1);
    }
    // The guest takes request 0's pages back before their release and writes to them.
    assert_eq!(rig.deflate(&burst_request(0)).len(), 1);
    for p in burst_request(0) {
        mem.write_obj(0x77u8, GuestAddress(u64::from(p) << 12))
            .unwrap();
    }
    assert_eq!(pending(&mm), 7 * 256 * 4096);
    assert!(mm.lock().unwrap().queued_discards() > 0);

    rig.dev.reset();
    assert_eq!(pending(&mm), 0);
    assert_eq!(mm.lock().unwrap().queued_discards(), 0, "no stale queue");
    assert_eq!(mm.lock().unwrap().stats().ballooned_bytes, 0);
    for p in burst_request(0) {
        let v: u8 = mem.read_obj(GuestAddress(u64::from(p) << 12)).unwrap();
        assert_eq!(v, 0x77, "deflated page {p:#x} kept its data");
    }
    for i in 1..8 {
        for p in burst_request(i) {
            assert!(!resident(&mem, u64::from(p)), "page {p:#x} never released");
        }
    }
    // A late timer expiry after the reset finds nothing to do.
    clock.advance(RELEASE_IDLE_DELAY);
    assert_eq!(mm.lock().unwrap().tick().unwrap().released_pages, 0);

    // The device works again after the driver comes back; the pages were online meanwhile.
    let f = rig.dev.avail_features();
    rig.activate(f);
    for p in burst_request(3) {
        mem.write_obj(0x11u8, GuestAddress(u64::from(p) << 12))
            .unwrap();
    }
    assert_eq!(rig.inflate(&burst_request(3)).len(), 1);
    assert_eq!(pending(&mm), 256 * 4096);
    clock.advance(RELEASE_IDLE_DELAY);
    assert_eq!(timer_turn(&mm, &clock).released_pages, 256);
    assert!(!resident(&mem, u64::from(burst_request(3)[0])));
}

/// The balloon on guest RAM of 4 KiB pages and of transparent huge pages, as the VMM runs it
/// (deferred discards, release after the ack): the manager's resident memory falls by exactly the
/// inflated pages, scattered or contiguous; their online neighbours keep their contents; a
/// deflated page reads zeros.
#[test]
fn balloon_releases_on_both_backings() {
    for backing in [Backing::PrivateAnonymous, Backing::PrivateAnonymousHuge] {
        let mm = Arc::new(Mutex::new(balloon::testing::boot_ram_manager(
            64 * MIB,
            backing,
        )));
        let (mut rig, mem) = rig_on(&mm, BalloonConfig::default());
        for p in 0..((64 * MIB) >> 12) {
            mem.write_obj(0x3cu8, GuestAddress(p << 12)).unwrap();
        }
        let before = mm.lock().unwrap().resident_bytes().unwrap();
        // 256 pages 64 KiB apart from 16 MiB, then 4 MiB (2 MiB-aligned) from 32 MiB in requests
        // of 256 descending PFNs.
        let scattered: Vec<u32> = (0..256u32).map(|i| 0x1000 + i * 16).collect();
        rig.inflate(&scattered);
        for k in 0..4u32 {
            let pfns: Vec<u32> = (0..256u32).rev().map(|i| 0x2000 + k * 256 + i).collect();
            rig.inflate(&pfns);
        }
        mm.lock().unwrap().flush_discards().unwrap();
        let after = mm.lock().unwrap().resident_bytes().unwrap();
        assert_eq!(
            before - after,
            (256 + 1024) * 4096,
            "{backing:?}: resident memory fell by the inflated pages"
        );
        let v: u8 = mem.read_obj(GuestAddress((0x1000 + 1) << 12)).unwrap();
        assert_eq!(v, 0x3c, "{backing:?}: online neighbour kept");
        rig.deflate(&scattered[..8]);
        let v: u8 = mem.read_obj(GuestAddress(0x1000 << 12)).unwrap();
        assert_eq!(v, 0, "{backing:?}: deflated page reads zeros");
        let v: u8 = mem.read_obj(GuestAddress(0x2000 << 12)).unwrap();
        assert_eq!(v, 0, "{backing:?}: still ballooned page reads zeros");
    }
}
