//! Both devices on memory/'s real MemoryManager: real mappings, real discards, the manager's
//! accounting checked after each guest request.

use std::sync::{Arc, Mutex};

use balloon::mem::{request, response, MemConfig};
use balloon::testing::{
    mem_request_bytes, BalloonRig, Desc, DriverQueue, TestInterrupt, BUFFER_BASE,
};
use balloon::{BalloonBackend, BalloonConfig, MemBackend, VirtioMem};
use memory::{Backing, MemoryManager, RegionKind, RegionSpec, SlotMapper};
use virtio::VirtioDevice;
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;
const HOTPLUG_AT: u64 = 1 << 30;

struct NoKvm;

impl SlotMapper for NoKvm {
    fn map(&mut self, _: u32, _: u64, _: u64, _: *mut u8) -> Result<(), String> {
        Ok(())
    }
    fn unmap(&mut self, _: u32, _: u64, _: u64) -> Result<(), String> {
        Ok(())
    }
}

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
        MemoryManager::new(&specs, Box::new(NoKvm)).expect("manager"),
    ))
}

#[test]
fn balloon_on_the_memory_manager() {
    let mm = manager();
    let mem = mm.lock().unwrap().guest_memory().clone();
    let backend: Arc<dyn BalloonBackend> = mm.clone();
    let config = BalloonConfig {
        free_page_reporting: true,
        stats: false,
        ..BalloonConfig::default()
    };
    let mut rig = BalloonRig::with_backend(mem.clone(), config, backend);
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
    assert_eq!(
        mm.lock().unwrap().queued_discards(),
        0,
        "released after the ack"
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
    dev.activate(virtio::Activation {
        mem: mem.clone(),
        queues: vec![q.active_queue(0)],
        interrupt: Arc::new(TestInterrupt::default()),
        acked_features: f,
    })
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
