//! Both devices behind the VMM's real virtio-mmio transport and event loop, driven register by
//! register as a Linux driver does: handshake, queue set-up, DRIVER_OK, notify, interrupt status.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use balloon::mem::{request, response, MemConfig};
use balloon::testing::{
    guest_memory, mem_request_bytes, pfn_bytes, Desc, DriverQueue, FakeBalloonBackend,
    FakeMemBackend,
};
use balloon::{Balloon, BalloonConfig, PageRange, VirtioMem};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio::mmio::{MmioTransport, INT_CONFIG, INT_USED_RING};
use virtio::{status, GuestMemoryMmap};
use vm_memory::{Bytes, GuestAddress};

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

fn rd(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// The driver's side of the handshake; accepts `accept` of the offered features and sets up
/// `queues` (index, layout). Returns the features the device offered.
fn handshake(t: &mut MmioTransport, accept: u64, queues: &[&DriverQueue]) -> u64 {
    assert_eq!(rd(t, 0x00), 0x7472_6976);
    wr(t, 0x70, status::ACKNOWLEDGE);
    wr(t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
    wr(t, 0x14, 0);
    let lo = rd(t, 0x10) as u64;
    wr(t, 0x14, 1);
    let offered = lo | ((rd(t, 0x10) as u64) << 32);
    let f = offered & accept;
    wr(t, 0x24, 0);
    wr(t, 0x20, f as u32);
    wr(t, 0x24, 1);
    wr(t, 0x20, (f >> 32) as u32);
    let st = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    wr(t, 0x70, st);
    assert_ne!(rd(t, 0x70) & status::FEATURES_OK, 0);
    for (i, q) in queues.iter().enumerate() {
        wr(t, 0x30, i as u32);
        assert!(rd(t, 0x34) >= u32::from(q.size));
        wr(t, 0x38, u32::from(q.size));
        wr(t, 0x80, q.desc_table as u32);
        wr(t, 0x84, (q.desc_table >> 32) as u32);
        wr(t, 0x90, q.avail_ring as u32);
        wr(t, 0x94, (q.avail_ring >> 32) as u32);
        wr(t, 0xa0, q.used_ring as u32);
        wr(t, 0xa4, (q.used_ring >> 32) as u32);
        wr(t, 0x44, 1);
    }
    wr(t, 0x70, st | status::DRIVER_OK);
    offered
}

fn run_until<T: MutEventSubscriber>(em: &mut EventManager<T>, mut done: impl FnMut() -> bool) {
    for _ in 0..300 {
        if done() {
            return;
        }
        em.run_with_timeout(10).unwrap();
    }
    assert!(done(), "event loop did not get there");
}

fn ack_interrupt(t: &mut MmioTransport) -> u32 {
    let s = rd(t, 0x60);
    wr(t, 0x64, s);
    s
}

#[test]
fn balloon_behind_the_mmio_transport() {
    let mem: GuestMemoryMmap = guest_memory(&[(0, 64 << 20)]);
    let backend = Arc::new(FakeBalloonBackend::from_memory(&mem));
    let config = BalloonConfig {
        free_page_reporting: true,
        stats_interval: Duration::from_millis(20),
        ..BalloonConfig::default()
    };
    let dev = Arc::new(Mutex::new(Balloon::new(config, backend.clone()).unwrap()));
    let mut em: EventManager<Subscriber> = EventManager::new().unwrap();
    em.add_subscriber(dev.clone());
    let mut t = MmioTransport::new(dev.clone(), mem.clone()).unwrap();
    assert_eq!(rd(&mut t, 0x08), 5);

    // The driver accepts everything but stats: reporting_vq becomes queue 2.
    let mut qs: Vec<DriverQueue> = (0..3)
        .map(|i| DriverQueue::new(&mem, 0x1_0000 * (i + 1), 256))
        .collect();
    let accept = !(1u64 << balloon::balloon::features::STATS_VQ);
    handshake(&mut t, accept, &qs.iter().collect::<Vec<_>>());
    assert!(dev.lock().unwrap().is_active());
    let fds = t.queue_notify_fds();

    // Target through the control API: config interrupt, num_pages at config offset 0.
    dev.lock().unwrap().set_target_mib(4).unwrap();
    assert_ne!(ack_interrupt(&mut t) & INT_CONFIG, 0);
    assert_eq!(rd(&mut t, 0x100), 4 * 256);

    // Inflate through a notification, as KVM's ioeventfd would deliver it.
    let pfns: Vec<u32> = (0x2000..0x2400).step_by(4).collect();
    mem.write_slice(&pfn_bytes(&pfns), GuestAddress(0x80_0000))
        .unwrap();
    qs[0].add(&mem, &[Desc::read(0x80_0000, (pfns.len() * 4) as u32)]);
    fds[0].write(1).unwrap();
    run_until(&mut em, || qs[0].used_idx(&mem) == 1);
    assert_eq!(backend.ballooned().len(), 256);
    assert_ne!(ack_interrupt(&mut t) & INT_USED_RING, 0);

    // The driver writes actual through the transport; a write to num_pages is refused.
    wr(&mut t, 0x104, 256);
    wr(&mut t, 0x100, 0);
    {
        let d = dev.lock().unwrap();
        assert_eq!(d.actual_bytes(), 1 << 20);
        assert_eq!(d.target_bytes(), 4 << 20);
        assert_eq!(d.counters().config_writes_refused, 1);
    }

    // Free page reporting on queue 2.
    qs[2].add(&mem, &[Desc::write(0x100_0000, 1 << 21)]);
    fds[2].write(1).unwrap();
    run_until(&mut em, || qs[2].used_idx(&mem) == 1);
    assert_eq!(backend.reported().len(), 512);

    // Reset through the status register: pages go back, later notifications do nothing.
    wr(&mut t, 0x70, 0);
    assert!(!dev.lock().unwrap().is_active());
    assert!(backend.ballooned().is_empty());
    qs[0].add(&mem, &[Desc::read(0x80_0000, 4)]);
    fds[0].write(1).unwrap();
    for _ in 0..3 {
        em.run_with_timeout(5).unwrap();
    }
    assert_eq!(qs[0].used_idx(&mem), 1);

    // And the driver comes back, this time with stats.
    qs = (0..4)
        .map(|i| DriverQueue::new(&mem, 0x1_0000 * (i + 1), 256))
        .collect();
    handshake(&mut t, u64::MAX, &qs.iter().collect::<Vec<_>>());
    let fds = t.queue_notify_fds();
    mem.write_slice(
        &balloon::testing::stats_bytes(&[(6, 12345)]),
        GuestAddress(0x90_0000),
    )
    .unwrap();
    qs[2].add(&mem, &[Desc::read(0x90_0000, 10)]);
    fds[2].write(1).unwrap();
    run_until(&mut em, || qs[2].used_idx(&mem) == 1);
    let stats = dev.lock().unwrap().latest_stats().unwrap();
    assert_eq!(stats.get(balloon::StatTag::AvailableMemory), Some(12345));
}

#[test]
fn virtio_mem_behind_the_mmio_transport() {
    let mem: GuestMemoryMmap = guest_memory(&[(0, 4 << 20)]);
    let region_addr = 4u64 << 30;
    let backend = Arc::new(FakeMemBackend::new(PageRange::new(
        region_addr >> 12,
        (1 << 30) >> 12,
    )));
    let dev = Arc::new(Mutex::new(
        VirtioMem::new(MemConfig::new(region_addr, 1 << 30), backend.clone()).unwrap(),
    ));
    let mut em: EventManager<Subscriber> = EventManager::new().unwrap();
    em.add_subscriber(dev.clone());
    let mut t = MmioTransport::new(dev.clone(), mem.clone()).unwrap();
    assert_eq!(rd(&mut t, 0x08), 24);
    let mut q = DriverQueue::new(&mem, 0x1_0000, 128);
    let offered = handshake(&mut t, u64::MAX, &[&q]);
    assert_ne!(offered & 2, 0, "UNPLUGGED_INACCESSIBLE");
    assert_eq!(dev.lock().unwrap().acked_features() & 2, 2);
    let fds = t.queue_notify_fds();

    dev.lock().unwrap().set_requested_size(64 << 20).unwrap();
    assert_ne!(ack_interrupt(&mut t) & INT_CONFIG, 0);
    let cfg64 = |t: &mut MmioTransport, off: u64| {
        u64::from(rd(t, 0x100 + off)) | (u64::from(rd(t, 0x104 + off)) << 32)
    };
    assert_eq!(cfg64(&mut t, 48), 64 << 20, "requested_size");
    assert_eq!(cfg64(&mut t, 32), 128 << 20, "usable_region_size");

    mem.write_slice(
        &mem_request_bytes(request::PLUG, region_addr, 32),
        GuestAddress(0x20_0000),
    )
    .unwrap();
    q.add(
        &mem,
        &[Desc::read(0x20_0000, 24), Desc::write(0x20_0100, 10)],
    );
    fds[0].write(1).unwrap();
    run_until(&mut em, || q.used_idx(&mem) == 1);
    let resp: u16 = mem.read_obj(GuestAddress(0x20_0100)).unwrap();
    assert_eq!(resp, response::ACK);
    assert_eq!(cfg64(&mut t, 40), 64 << 20, "plugged_size");
    assert_eq!(backend.plugged_pages(), (64 << 20) >> 12);
}
