//! virtio-balloon driven through real descriptors in guest memory: every malformed input a
//! guest can send is counted, skipped, and its buffer still returned.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use balloon::balloon::{features, queue_roles, QueueRole};
use balloon::testing::{
    stats_bytes, BalloonRig, Call, Desc, DriverQueue, FakeBalloonBackend, BUFFER_BASE,
};
use balloon::{Balloon, BalloonConfig, PageRange, StatTag};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio::VirtioDevice;

fn config_all() -> BalloonConfig {
    BalloonConfig {
        stats: true,
        deflate_on_oom: true,
        free_page_reporting: true,
        stats_interval: Duration::ZERO,
        ..BalloonConfig::default()
    }
}

fn rig() -> (BalloonRig, Arc<FakeBalloonBackend>) {
    BalloonRig::new(config_all())
}

/// First page of the second RAM region (32 MiB).
const HIGH: u32 = (32 << 20) >> 12;

#[test]
fn features_follow_the_config() {
    let c = BalloonConfig {
        stats: false,
        ..config_all()
    };
    let f = c.features();
    assert_ne!(f & (1 << features::VERSION_1), 0);
    assert_eq!(f & (1 << features::STATS_VQ), 0);
    assert_ne!(f & (1 << features::DEFLATE_ON_OOM), 0);
    assert_ne!(f & (1 << features::PAGE_REPORTING), 0);
    assert_eq!(f & (1 << features::FREE_PAGE_HINT), 0);
    let b = Balloon::new(c, Arc::new(FakeBalloonBackend::new(vec![]))).unwrap();
    assert_eq!(b.queue_max_sizes().len(), 3);
    assert_eq!(b.device_type(), 5);
}

#[test]
fn absent_queues_take_no_index() {
    use QueueRole::*;
    let s = 1u64 << features::STATS_VQ;
    let r = 1u64 << features::PAGE_REPORTING;
    assert_eq!(queue_roles(0), vec![Inflate, Deflate]);
    assert_eq!(queue_roles(s), vec![Inflate, Deflate, Stats]);
    assert_eq!(queue_roles(r), vec![Inflate, Deflate, Reporting]);
    assert_eq!(queue_roles(s | r), vec![Inflate, Deflate, Stats, Reporting]);

    // Driver accepts reporting but not stats: reporting_vq is queue 2.
    let (mut rig, backend) = rig();
    rig.dev.reset();
    rig.activate((1 << features::VERSION_1) | r);
    let a = rig.buffers.alloc(1 << 12);
    rig.buffers.reset(BUFFER_BASE);
    let used = rig.send(2, &[Desc::write(a, 4096)]);
    assert_eq!(used.len(), 1);
    assert_eq!(backend.reported(), vec![a >> 12]);
}

#[test]
fn missing_queue_refuses_activation() {
    let (mut rig, _) = rig();
    rig.dev.reset();
    let q = DriverQueue::new(&rig.mem, 0x1_0000, 256);
    let res = rig.dev.activate(virtio::Activation {
        mem: rig.mem.clone(),
        queues: vec![q.active_queue(0)],
        interrupt: rig.interrupt.clone(),
        acked_features: 0,
    });
    assert!(matches!(
        res,
        Err(virtio::ActivateError::MissingQueue { index: 1 })
    ));
}

#[test]
fn inflate_coalesces_into_one_backend_call() {
    let (mut rig, backend) = rig();
    let mut pfns: Vec<u32> = (0x800..0x880).rev().collect();
    pfns.extend([0x900, 0x902, 0x901, HIGH + 5]);
    let used = rig.inflate(&pfns);
    assert_eq!(used, vec![(0, 0)]);
    assert_eq!(
        backend.calls(),
        vec![Call::Inflate(vec![
            PageRange::new(0x800, 0x80),
            PageRange::new(0x900, 3),
            PageRange::new(u64::from(HIGH) + 5, 1)
        ])]
    );
    let c = rig.dev.counters();
    assert_eq!(c.inflated_pages, 0x84);
    assert_eq!(rig.dev.ballooned_bytes(), 0x84 * 4096);
    assert_eq!(rig.interrupt.used_count(), 1);

    // Deflate half of it back.
    let back: Vec<u32> = (0x800..0x840).collect();
    assert_eq!(rig.deflate(&back).len(), 1);
    assert_eq!(rig.dev.counters().deflated_pages, 0x40);
    assert_eq!(rig.dev.ballooned_bytes(), 0x44 * 4096);
    assert_eq!(backend.ballooned().len(), 0x44);
}

#[test]
fn duplicates_are_counted_and_dropped() {
    let (mut rig, backend) = rig();
    rig.inflate(&[0x800, 0x800, 0x801, 0x800]);
    assert_eq!(rig.dev.counters().duplicate_pfns, 2);
    assert_eq!(
        backend.calls(),
        vec![Call::Inflate(vec![PageRange::new(0x800, 2)])]
    );
}

#[test]
fn more_than_256_pfns_are_refused_past_the_limit() {
    let (mut rig, backend) = rig();
    let pfns: Vec<u32> = (0x800..0x800 + 300).collect();
    let used = rig.inflate(&pfns);
    assert_eq!(used.len(), 1);
    let c = rig.dev.counters();
    assert_eq!(c.inflated_pages, 256);
    assert_eq!(c.refused_pfns, 44);
    assert_eq!(c.malformed_buffers, 1);
    assert_eq!(backend.ballooned().len(), 256);

    // The limit spans the whole chain, not one descriptor.
    let a = rig.pfn_desc(&(HIGH..HIGH + 200).collect::<Vec<_>>());
    let b = rig.pfn_desc(&(HIGH + 0x400..HIGH + 0x400 + 200).collect::<Vec<_>>());
    rig.buffers.reset(BUFFER_BASE);
    assert_eq!(rig.send(0, &[a, b]).len(), 1);
    assert_eq!(rig.dev.counters().inflated_pages, 512);
    assert_eq!(rig.dev.counters().refused_pfns, 44 + 144);
}

#[test]
fn pfns_outside_ram_do_not_stop_the_batch() {
    let (mut rig, backend) = rig();
    let hole = (20 << 20) >> 12; // between the two regions
    let beyond = (64 << 20) >> 12;
    rig.inflate(&[0x800, hole, hole + 1, 0x801, beyond, u32::MAX, HIGH]);
    let c = rig.dev.counters();
    assert_eq!(c.refused_pfns, 4);
    assert_eq!(c.inflated_pages, 3);
    assert_eq!(
        backend.calls(),
        vec![Call::Inflate(vec![
            PageRange::new(0x800, 2),
            PageRange::new(u64::from(HIGH), 1)
        ])]
    );
}

#[test]
fn all_pfns_outside_ram_reach_no_backend() {
    let (mut rig, backend) = rig();
    assert_eq!(rig.inflate(&[u32::MAX, u32::MAX - 1]).len(), 1);
    assert!(backend.calls().is_empty());
    assert_eq!(rig.dev.counters().refused_pfns, 2);
}

#[test]
fn wrong_direction_is_skipped_but_the_rest_of_the_chain_counts() {
    let (mut rig, backend) = rig();
    let good = rig.pfn_desc(&[0x800]);
    let bad = rig.pfn_desc(&[0x900]);
    rig.buffers.reset(BUFFER_BASE);
    let used = rig.send(0, &[Desc::write(bad.addr, bad.len), good]);
    assert_eq!(used.len(), 1);
    assert_eq!(rig.dev.counters().malformed_buffers, 1);
    assert_eq!(backend.ballooned(), vec![0x800]);
}

#[test]
fn odd_lengths_and_bad_addresses() {
    let (mut rig, backend) = rig();
    // 9 bytes: two PFNs and a stray byte.
    let mut bytes = balloon::testing::pfn_bytes(&[0x800, 0x801]);
    bytes.push(7);
    let a = rig.buffers.put(&rig.mem, &bytes);
    assert_eq!(rig.send(0, &[Desc::read(a, 9)]).len(), 1);
    assert_eq!(backend.ballooned(), vec![0x800, 0x801]);
    assert_eq!(rig.dev.counters().malformed_buffers, 1);

    // A descriptor pointing outside guest memory, and one straddling its end.
    assert_eq!(rig.send(0, &[Desc::read(1 << 40, 16)]).len(), 1);
    assert_eq!(rig.send(0, &[Desc::read((48 << 20) - 4, 8)]).len(), 1);
    // Zero-length buffer.
    assert_eq!(rig.send(0, &[Desc::read(a, 0)]).len(), 1);
    assert_eq!(rig.dev.counters().malformed_buffers, 4);
    assert_eq!(backend.calls().len(), 1);
}

#[test]
fn deflate_of_pages_never_inflated() {
    let (mut rig, backend) = rig();
    rig.inflate(&[0x800]);
    rig.deflate(&[0x800, 0x801, 0x900]);
    let c = rig.dev.counters();
    assert_eq!(c.deflated_pages, 1);
    assert_eq!(c.deflate_not_inflated_pfns, 2);
    assert_eq!(rig.dev.ballooned_bytes(), 0);
    assert!(backend.ballooned().is_empty());
}

#[test]
fn inflating_twice_counts_once() {
    let (mut rig, _) = rig();
    rig.inflate(&[0x800, 0x801]);
    rig.inflate(&[0x801, 0x802]);
    let c = rig.dev.counters();
    assert_eq!(c.inflated_pages, 3);
    assert_eq!(c.reinflated_pfns, 1);
    assert_eq!(rig.dev.ballooned_bytes(), 3 * 4096);
}

#[test]
fn backend_failure_still_returns_the_buffer() {
    let (mut rig, backend) = rig();
    backend.fail_next();
    assert_eq!(rig.inflate(&[0x800]).len(), 1);
    assert_eq!(rig.dev.counters().backend_errors, 1);
    assert_eq!(rig.inflate(&[0x800]).len(), 1);
    assert_eq!(rig.dev.counters().inflated_pages, 1);
}

#[test]
fn many_buffers_one_interrupt() {
    let (mut rig, backend) = rig();
    for i in 0..10u32 {
        let d = rig.pfn_desc(&[0x800 + i]);
        rig.queues[0].add(&rig.mem, &[d]);
    }
    assert_eq!(rig.dev.process_queue(0), 10);
    assert_eq!(rig.queues[0].take_used(&rig.mem).len(), 10);
    assert_eq!(rig.interrupt.used_count(), 1);
    assert_eq!(backend.calls().len(), 10);
}

#[test]
fn broken_rings_are_counted_not_fatal() {
    let (mut rig, _) = rig();
    // avail idx far ahead of anything published.
    rig.queues[0].set_avail_idx(&rig.mem, 1000);
    assert_eq!(rig.dev.process_queue(0), 0);
    assert!(rig.dev.counters().malformed_buffers >= 1);

    // A self-referencing chain and a head index outside the table.
    let (mut rig, backend) = self::rig();
    let q = &mut rig.queues[0];
    q.write_desc(
        &rig.mem,
        0,
        BUFFER_BASE,
        4,
        balloon::testing::VIRTQ_DESC_F_NEXT,
        0,
    );
    q.publish(&rig.mem, 0);
    q.publish(&rig.mem, 300);
    rig.dev.process_queue(0);
    assert!(
        backend.calls().len() <= 1,
        "the looping chain yields at most its PFNs once"
    );
    assert!(rig.dev.counters().malformed_buffers >= 1);
}

#[test]
fn stats_buffer_is_held_and_returned_on_request() {
    let (mut rig, _) = rig();
    let b = stats_bytes(&[(4, 1000), (5, 4000), (15, 9), (77, 1)]);
    let a = rig.buffers.put(&rig.mem, &b);
    assert!(
        rig.send(2, &[Desc::read(a, b.len() as u32)]).is_empty(),
        "held"
    );
    let s = rig.dev.latest_stats().expect("stats");
    assert_eq!(s.get(StatTag::FreeMemory), Some(1000));
    assert_eq!(s.get(StatTag::TotalMemory), Some(4000));
    assert_eq!(s.get(StatTag::DirectReclaims), Some(9));
    assert_eq!(s.unknown_tags, 1);
    assert!(s.age() < Duration::from_secs(5));
    assert_eq!(s.actual_pages, 0, "the balloon was empty when they came");

    // The balloon's size is stamped on each report as it arrives (the driver's `actual`).
    rig.dev.write_config(4, &300u32.to_le_bytes());
    rig.send(2, &[Desc::read(a, b.len() as u32)]);
    assert_eq!(rig.dev.latest_stats().unwrap().actual_pages, 300);
    rig.dev.write_config(4, &20u32.to_le_bytes());
    assert_eq!(
        rig.dev.latest_stats().unwrap().actual_pages,
        300,
        "until the next report"
    );

    assert!(rig.dev.request_stats());
    assert_eq!(rig.queues[2].take_used(&rig.mem).len(), 1);
    assert!(!rig.dev.request_stats(), "nothing held any more");
    assert_eq!(rig.dev.counters().stats_requests, 1);
}

#[test]
fn silly_stats_buffers() {
    let (mut rig, _) = rig();
    let b = stats_bytes(&[(4, 1)]);
    let a = rig.buffers.put(&rig.mem, &b);
    // 7 bytes, 0 bytes, 2000 bytes, device-writable: all counted, none fatal.
    rig.send(2, &[Desc::read(a, 7)]);
    rig.send(2, &[Desc::read(a, 0)]);
    rig.send(2, &[Desc::read(BUFFER_BASE, 2000)]);
    rig.send(2, &[Desc::write(a, 10)]);
    assert_eq!(rig.dev.counters().malformed_buffers, 4);
    // Each new buffer returned the previously held one.
    assert_eq!(rig.queues[2].take_used(&rig.mem).len(), 0);
    assert!(rig.dev.request_stats());
    // 3 returned on replacement + 1 on request.
    assert_eq!(rig.queues[2].used_idx(&rig.mem), 4);
    // A good buffer after all that still parses.
    rig.send(2, &[Desc::read(a, 10)]);
    assert_eq!(
        rig.dev.latest_stats().unwrap().get(StatTag::FreeMemory),
        Some(1)
    );
}

#[test]
fn stats_interval_cannot_enable_what_was_not_offered() {
    let (mut rig, _) = BalloonRig::new(BalloonConfig {
        stats: false,
        ..config_all()
    });
    assert!(rig.dev.set_stats_interval(Duration::from_secs(1)).is_err());
}

#[test]
fn config_space() {
    let (mut rig, _) = rig();
    let read = |dev: &Balloon, off: u64| {
        let mut b = [0u8; 4];
        dev.read_config(off, &mut b);
        u32::from_le_bytes(b)
    };
    rig.dev.set_target_mib(16).unwrap();
    assert_eq!(read(&rig.dev, 0), 16 * 256);
    assert_eq!(rig.interrupt.config_count(), 1);
    rig.dev.set_target_mib(16).unwrap();
    assert_eq!(
        rig.interrupt.config_count(),
        1,
        "no interrupt without a change"
    );
    assert_eq!(rig.dev.target_bytes(), 16 << 20);

    rig.dev.write_config(4, &100u32.to_le_bytes());
    assert_eq!(rig.dev.actual_bytes(), 100 * 4096);
    rig.dev.write_config(5, &[1]); // byte write inside actual
    assert_eq!(read(&rig.dev, 4), 100 + 256);

    rig.dev.write_config(0, &0u32.to_le_bytes());
    rig.dev.write_config(8, &1u32.to_le_bytes());
    rig.dev.write_config(12, &1u32.to_le_bytes());
    rig.dev.write_config(6, &[0; 4]); // straddles actual and the next field
    rig.dev.write_config(u64::MAX, &[0; 4]);
    assert_eq!(rig.dev.counters().config_writes_refused, 5);
    assert_eq!(read(&rig.dev, 0), 16 * 256);
    assert_eq!(read(&rig.dev, 16), 0);
    let mut big = [0xaau8; 32];
    rig.dev.read_config(u64::MAX - 1, &mut big);
    assert_eq!(big, [0; 32]);

    assert!(rig.dev.set_target_mib(33).is_err(), "guest RAM is 32 MiB");
    assert!(rig.dev.set_target_mib(u64::MAX).is_err());
}

#[test]
fn free_page_reporting_discards_without_ballooning() {
    let (mut rig, backend) = rig();
    rig.inflate(&[0x801]);
    let used = rig.send(
        3,
        &[
            Desc::write(0x80_0000, 4 * 4096),
            Desc::write(0x90_0000, 4096),
        ],
    );
    assert_eq!(used.len(), 1);
    let c = rig.dev.counters();
    assert_eq!(c.reports, 1);
    // 0x801 was ballooned: not re-reported, still ballooned.
    assert_eq!(c.reported_bytes_freed, 4 * 4096);
    assert_eq!(backend.ballooned(), vec![0x801]);
    assert_eq!(rig.dev.ballooned_bytes(), 4096);
    assert_eq!(backend.reported(), vec![0x800, 0x802, 0x803, 0x900]);
}

#[test]
fn hostile_reports() {
    let (mut rig, backend) = rig();
    // Readable descriptor (wrong direction), unaligned, outside RAM, overflowing, overlapping.
    rig.send(3, &[Desc::read(0x80_0000, 4096)]);
    rig.send(3, &[Desc::write(0x80_0800, 4096 * 2)]);
    rig.send(3, &[Desc::write(1 << 40, 1 << 21)]);
    rig.send(3, &[Desc::write(u64::MAX - 100, 4096)]);
    rig.send(
        3,
        &[Desc::write(0xa0_0000, 8192), Desc::write(0xa0_1000, 8192)],
    );
    assert_eq!(rig.queues[3].used_idx(&rig.mem), 5);
    let c = rig.dev.counters();
    assert_eq!(c.refused_pfns, 512);
    assert!(c.malformed_buffers >= 4);
    // Unaligned: only the one whole page inside; overlapping ranges merged.
    assert_eq!(backend.reported(), vec![0x801, 0xa00, 0xa01, 0xa02]);
}

#[test]
fn reset_returns_ballooned_pages_and_stops_the_device() {
    let (mut rig, backend) = rig();
    rig.inflate(&[0x800, 0x801]);
    rig.dev.write_config(4, &2u32.to_le_bytes());
    rig.dev.reset();
    assert!(!rig.dev.is_active());
    assert_eq!(rig.dev.actual_bytes(), 0);
    assert_eq!(rig.dev.ballooned_bytes(), 0);
    assert!(backend.ballooned().is_empty());
    assert_eq!(backend.calls().last(), Some(&Call::DeflateAll));
    assert_eq!(rig.dev.process_queue(0), 0);
    // Target changes while inactive raise no interrupt.
    rig.dev.set_target_mib(1).unwrap();
    assert_eq!(rig.interrupt.config_count(), 0);
}

/// Runs the event loop until `done` or a timeout.
fn run_until<T: MutEventSubscriber>(em: &mut EventManager<T>, mut done: impl FnMut() -> bool) {
    for _ in 0..200 {
        if done() {
            return;
        }
        em.run_with_timeout(10).unwrap();
    }
    assert!(done(), "event loop did not get there");
}

#[test]
fn event_loop_activation_queue_and_stats_timer() {
    let mem = balloon::testing::guest_memory(&[(0, 16 << 20)]);
    let backend = Arc::new(FakeBalloonBackend::from_memory(&mem));
    let dev = Arc::new(Mutex::new(
        Balloon::new(config_all(), backend.clone()).unwrap(),
    ));
    let mut em: EventManager<Arc<Mutex<Balloon>>> = EventManager::new().unwrap();
    em.add_subscriber(dev.clone());

    // Activation as the transport does it, from "another thread".
    let queues: Vec<DriverQueue> = (0..4)
        .map(|i| DriverQueue::new(&mem, 0x1_0000 * (i + 1), 256))
        .collect();
    let active: Vec<_> = queues
        .iter()
        .enumerate()
        .map(|(i, q)| q.active_queue(i))
        .collect();
    let notify0 = active[0].notify.try_clone().unwrap();
    let notify2 = active[2].notify.try_clone().unwrap();
    let interrupt = Arc::new(balloon::testing::TestInterrupt::default());
    {
        let mut d = dev.lock().unwrap();
        let f = d.avail_features();
        d.ack_features(f);
        d.activate(virtio::Activation {
            mem: mem.clone(),
            queues: active,
            interrupt: interrupt.clone(),
            acked_features: f,
        })
        .unwrap();
    }
    let mut queues = queues;
    let bytes = balloon::testing::pfn_bytes(&[0x900, 0x901]);
    use vm_memory::Bytes;
    mem.write_slice(&bytes, vm_memory::GuestAddress(0x10_0000))
        .unwrap();
    queues[0].add(&mem, &[Desc::read(0x10_0000, 8)]);
    notify0.write(1).unwrap();
    run_until(&mut em, || backend.ballooned().len() == 2);
    assert_eq!(queues[0].take_used(&mem).len(), 1);

    // Stats every 20 ms: the held buffer comes back.
    let s = stats_bytes(&[(4, 5)]);
    mem.write_slice(&s, vm_memory::GuestAddress(0x11_0000))
        .unwrap();
    queues[2].add(&mem, &[Desc::read(0x11_0000, 10)]);
    notify2.write(1).unwrap();
    dev.lock()
        .unwrap()
        .set_stats_interval(Duration::from_millis(20))
        .unwrap();
    run_until(&mut em, || queues[2].used_idx(&mem) == 1);
    assert_eq!(
        dev.lock()
            .unwrap()
            .latest_stats()
            .unwrap()
            .get(StatTag::FreeMemory),
        Some(5)
    );

    // Reset: the queue eventfds leave the loop; a late notification does nothing.
    dev.lock().unwrap().reset();
    em.run_with_timeout(10).unwrap();
    notify0.write(1).unwrap();
    em.run_with_timeout(10).unwrap();
    em.run_with_timeout(10).unwrap();
}

#[test]
fn shares_as_the_vmm_needs() {
    fn send<T: Send>() {}
    send::<Balloon>();
    send::<balloon::VirtioMem>();
    let (rig, _) = BalloonRig::new(config_all());
    let dev = Arc::new(Mutex::new(rig.dev));
    let _transport: Arc<Mutex<dyn VirtioDevice>> = dev.clone();
    let _event_loop: Arc<Mutex<dyn MutEventSubscriber + Send>> = dev;
}
