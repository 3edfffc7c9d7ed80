//! virtio-mem driven through real descriptors: every request rule, the usable-region rules, and
//! the backend state after each.

use balloon::mem::{config_offsets as off, request, response, MemConfig, LINUX_MEMORY_BLOCK_SIZE};
use balloon::testing::{mem_request_bytes, Call, Desc, FakeMemBackend, MemRig, BUFFER_BASE};
use balloon::{MemError, PageRange};
use std::sync::Arc;
use virtio::VirtioDevice;

const MIB: u64 = 1 << 20;
const ADDR: u64 = 4 << 30; // 4 GiB, 128 MiB aligned
const BS: u64 = 2 * MIB;

fn rig_with(requested: u64) -> (MemRig, Arc<FakeMemBackend>) {
    MemRig::new(MemConfig {
        requested_size: requested,
        ..MemConfig::new(ADDR, 1024 * MIB)
    })
}

fn blocks(n: u64) -> u64 {
    n * BS
}

#[test]
fn config_layout_and_features() {
    let (rig, _) = rig_with(256 * MIB);
    assert_eq!(rig.dev.device_type(), 24);
    assert_eq!(rig.dev.queue_max_sizes().len(), 1);
    let f = rig.dev.avail_features();
    assert_ne!(f & (1 << 1), 0, "UNPLUGGED_INACCESSIBLE offered");
    assert_eq!(f & 1, 0, "ACPI_PXM not offered");
    assert_ne!(f & (1 << 32), 0);
    assert_eq!(rig.config_u64(off::BLOCK_SIZE), BS);
    assert_eq!(rig.config_u64(off::NODE_ID) & 0xffff, 0);
    assert_eq!(rig.config_u64(off::ADDR), ADDR);
    assert_eq!(rig.config_u64(off::REGION_SIZE), 1024 * MIB);
    assert_eq!(rig.config_u64(off::USABLE_REGION_SIZE), 256 * MIB);
    assert_eq!(rig.config_u64(off::PLUGGED_SIZE), 0);
    assert_eq!(rig.config_u64(off::REQUESTED_SIZE), 256 * MIB);
    assert_eq!(rig.config_u64(off::SIZE), 0, "past the end reads zero");
}

#[test]
fn bad_configs_are_refused() {
    let base = MemConfig::new(ADDR, 1024 * MIB);
    let bad = [
        MemConfig {
            block_size: 3 * MIB,
            ..base.clone()
        },
        MemConfig {
            block_size: 1024,
            ..base.clone()
        },
        MemConfig {
            addr: ADDR + MIB,
            ..base.clone()
        },
        MemConfig {
            region_size: 0,
            ..base.clone()
        },
        MemConfig {
            region_size: MIB,
            ..base.clone()
        },
        MemConfig {
            addr: u64::MAX - (BS - 1) - 511 * BS,
            ..base.clone()
        },
        MemConfig {
            requested_size: MIB,
            ..base.clone()
        },
        MemConfig {
            requested_size: 2048 * MIB,
            ..base.clone()
        },
    ];
    for c in bad {
        assert!(c.validate().is_err(), "{c:?} should be refused");
    }
}

#[test]
fn plug_unplug_state_happy_path() {
    let (mut rig, backend) = rig_with(256 * MIB);
    assert_eq!(
        rig.request(request::PLUG, ADDR, 4),
        Some((response::ACK, 0))
    );
    assert_eq!(rig.dev.plugged_size(), blocks(4));
    assert_eq!(
        backend.calls(),
        vec![Call::Plug(PageRange::new(ADDR >> 12, 4 * 512))]
    );
    assert_eq!(backend.plugged_pages(), 4 * 512);
    assert_eq!(
        rig.request(request::STATE, ADDR, 4),
        Some((response::ACK, response::STATE_PLUGGED))
    );
    assert_eq!(
        rig.request(request::STATE, ADDR + blocks(2), 4),
        Some((response::ACK, response::STATE_MIXED))
    );
    assert_eq!(
        rig.request(request::STATE, ADDR + blocks(4), 4),
        Some((response::ACK, response::STATE_UNPLUGGED))
    );
    assert_eq!(
        rig.request(request::UNPLUG, ADDR + blocks(1), 2),
        Some((response::ACK, 0))
    );
    assert_eq!(rig.dev.plugged_size(), blocks(2));
    assert_eq!(backend.plugged_pages(), 2 * 512);
    assert!(backend.is_plugged(ADDR >> 12));
    assert!(!backend.is_plugged((ADDR + BS) >> 12));
    assert_eq!(
        rig.dev.plugged_ranges(),
        vec![
            PageRange::new(ADDR >> 12, 512),
            PageRange::new((ADDR + blocks(3)) >> 12, 512)
        ]
    );
    let c = rig.dev.counters();
    assert_eq!(
        (c.plug_requests, c.unplug_requests, c.state_requests, c.acks),
        (1, 1, 3, 5)
    );
    assert_eq!(rig.interrupt.used_count(), 5);
}

#[test]
fn error_rules() {
    let (mut rig, backend) = rig_with(256 * MIB);
    let err = Some((response::ERROR, 0));
    // Unaligned, zero blocks, below the region, past the usable region, overflowing.
    assert_eq!(rig.request(request::PLUG, ADDR + 4096, 1), err);
    assert_eq!(rig.request(request::PLUG, ADDR, 0), err);
    assert_eq!(rig.request(request::PLUG, ADDR - BS, 1), err);
    assert_eq!(rig.request(request::PLUG, ADDR + 256 * MIB, 1), err);
    assert_eq!(
        rig.request(request::PLUG, ADDR + 254 * MIB, 1),
        Some((response::ACK, 0))
    );
    assert_eq!(
        rig.request(request::PLUG, ADDR + 254 * MIB, 2),
        err,
        "crosses usable end"
    );
    assert_eq!(
        rig.request(request::PLUG, u64::MAX - (BS - 1), u16::MAX),
        err
    );
    assert_eq!(rig.request(request::STATE, ADDR + 4096, 1), err);
    assert_eq!(rig.request(request::STATE, ADDR, 0), err);
    assert_eq!(rig.request(request::STATE, ADDR + 256 * MIB, 1), err);
    // Wrong state: plugging a plugged block, unplugging an unplugged or mixed range.
    assert_eq!(rig.request(request::PLUG, ADDR + 254 * MIB, 1), err);
    assert_eq!(rig.request(request::UNPLUG, ADDR, 1), err);
    assert_eq!(rig.request(request::UNPLUG, ADDR + 252 * MIB, 2), err);
    // Unknown request type.
    assert_eq!(rig.request(7, ADDR, 1), err);
    assert_eq!(rig.dev.plugged_size(), BS);
    assert_eq!(backend.plugged_pages(), 512);
    let c = rig.dev.counters();
    assert_eq!(c.errors, 13);
    assert_eq!(c.unknown_requests, 1);
}

#[test]
fn nack_beyond_requested() {
    let (mut rig, backend) = rig_with(8 * MIB);
    assert_eq!(
        rig.request(request::PLUG, ADDR, 3),
        Some((response::ACK, 0))
    );
    assert_eq!(
        rig.request(request::PLUG, ADDR + blocks(3), 2),
        Some((response::NACK, 0))
    );
    assert_eq!(
        rig.request(request::PLUG, ADDR + blocks(3), 1),
        Some((response::ACK, 0))
    );
    assert_eq!(
        rig.request(request::PLUG, ADDR + blocks(4), 1),
        Some((response::NACK, 0))
    );
    assert_eq!(backend.plugged_pages(), 4 * 512);
    // The host asks for less: plugging is refused, unplugging allowed.
    rig.dev.set_requested_size(2 * MIB).unwrap();
    assert_eq!(
        rig.request(request::PLUG, ADDR + blocks(5), 1),
        Some((response::NACK, 0))
    );
    assert_eq!(
        rig.request(request::UNPLUG, ADDR, 3),
        Some((response::ACK, 0))
    );
    assert_eq!(rig.dev.plugged_size(), BS);
    assert_eq!(rig.dev.counters().nacks, 3);
}

#[test]
fn usable_region_grows_in_memory_blocks_and_never_shrinks_on_request() {
    let (mut rig, _) = rig_with(0);
    assert_eq!(rig.dev.usable_region_size(), 0);
    assert_eq!(
        rig.request(request::PLUG, ADDR, 1),
        Some((response::ERROR, 0))
    );
    rig.dev.set_requested_size(130 * MIB).unwrap();
    assert_eq!(rig.dev.usable_region_size(), 2 * LINUX_MEMORY_BLOCK_SIZE);
    assert_eq!(rig.interrupt.config_count(), 1);
    rig.dev.set_requested_size(2 * MIB).unwrap();
    assert_eq!(
        rig.dev.usable_region_size(),
        256 * MIB,
        "shrinks only on UNPLUG_ALL/reset"
    );
    assert_eq!(rig.interrupt.config_count(), 2, "requested_size changed");
    rig.dev.set_requested_size(1024 * MIB).unwrap();
    assert_eq!(rig.dev.usable_region_size(), 1024 * MIB);
    assert_eq!(
        rig.dev.set_requested_size(1026 * MIB),
        Err(MemError::RequestTooLarge {
            size: 1026 * MIB,
            region_size: 1024 * MIB
        })
    );
    assert!(matches!(
        rig.dev.set_requested_size(MIB),
        Err(MemError::UnalignedRequest { .. })
    ));
    assert_eq!(rig.dev.requested_size(), 1024 * MIB);
}

#[test]
fn unplug_all_shrinks_the_usable_region() {
    let (mut rig, backend) = rig_with(512 * MIB);
    assert_eq!(
        rig.request(request::PLUG, ADDR, 10),
        Some((response::ACK, 0))
    );
    assert_eq!(
        rig.request(request::PLUG, ADDR + 300 * MIB, 10),
        Some((response::ACK, 0))
    );
    rig.dev.set_requested_size(0).unwrap();
    let irqs = rig.interrupt.config_count();
    assert_eq!(rig.dev.usable_region_size(), 512 * MIB);
    assert_eq!(
        rig.request(request::UNPLUG_ALL, 0, 0),
        Some((response::ACK, 0))
    );
    assert_eq!(rig.dev.plugged_size(), 0);
    assert_eq!(backend.plugged_pages(), 0);
    assert_eq!(rig.dev.usable_region_size(), 0);
    assert_eq!(rig.interrupt.config_count(), irqs + 1);
    // Unplug-all with nothing plugged is still ACK.
    assert_eq!(
        rig.request(request::UNPLUG_ALL, 0, 0),
        Some((response::ACK, 0))
    );
}

#[test]
fn device_reset_keeps_blocks_and_usable_covers_them() {
    let (mut rig, backend) = rig_with(512 * MIB);
    assert_eq!(
        rig.request(request::PLUG, ADDR + 300 * MIB, 2),
        Some((response::ACK, 0))
    );
    rig.dev.set_requested_size(4 * MIB).unwrap();
    rig.dev.reset();
    assert_eq!(rig.dev.plugged_size(), 4 * MIB);
    assert_eq!(backend.plugged_pages(), 2 * 512);
    assert_eq!(
        rig.dev.usable_region_size(),
        304 * MIB,
        "covers the plugged blocks"
    );
    rig.activate();
    assert_eq!(
        rig.request(request::UNPLUG_ALL, 0, 0),
        Some((response::ACK, 0))
    );
    assert_eq!(rig.dev.usable_region_size(), 128 * MIB);
    assert_eq!(backend.plugged_pages(), 0);
}

#[test]
fn region_not_aligned_to_memory_blocks() {
    // Region at 4 GiB + 64 MiB: Linux can only use memory blocks from 4 GiB + 128 MiB on.
    let (rig, _) = MemRig::new(MemConfig {
        requested_size: 128 * MIB,
        ..MemConfig::new(ADDR + 64 * MIB, 1024 * MIB)
    });
    assert_eq!(rig.dev.usable_region_size(), 192 * MIB);
}

#[test]
fn backend_failure_is_busy_and_changes_nothing() {
    let (mut rig, backend) = rig_with(64 * MIB);
    backend.fail_next();
    assert_eq!(
        rig.request(request::PLUG, ADDR, 1),
        Some((response::BUSY, 0))
    );
    assert_eq!(rig.dev.plugged_size(), 0);
    assert_eq!(
        rig.request(request::PLUG, ADDR, 1),
        Some((response::ACK, 0))
    );
    backend.fail_next();
    assert_eq!(
        rig.request(request::UNPLUG, ADDR, 1),
        Some((response::BUSY, 0))
    );
    assert_eq!(rig.dev.plugged_size(), BS);
    backend.fail_next();
    assert_eq!(
        rig.request(request::UNPLUG_ALL, 0, 0),
        Some((response::BUSY, 0))
    );
    assert_eq!(rig.dev.counters().busy, 3);
    assert_eq!(rig.dev.counters().backend_errors, 3);
}

#[test]
fn malformed_chains() {
    let (mut rig, backend) = rig_with(64 * MIB);
    let req = rig
        .buffers
        .put(&rig.mem, &mem_request_bytes(request::PLUG, ADDR, 1));
    let resp = rig.buffers.alloc(16);
    // No writable descriptor: returned with length 0, request not executed.
    assert_eq!(rig.send(&[Desc::read(req, 24)]), vec![(0, 0)]);
    // Response buffer too small.
    assert_eq!(
        rig.send(&[Desc::read(req, 24), Desc::write(resp, 9)])[0].1,
        0
    );
    // Request too short: ERROR.
    let used = rig.send(&[Desc::read(req, 20), Desc::write(resp, 10)]);
    assert_eq!(used[0].1, 10);
    // Request outside guest memory.
    assert_eq!(
        rig.send(&[Desc::read(1 << 40, 24), Desc::write(resp, 10)])[0].1,
        10
    );
    // Response outside guest memory.
    assert_eq!(
        rig.send(&[Desc::read(req, 24), Desc::write(1 << 40, 10)])[0].1,
        0
    );
    assert!(backend.calls().is_empty());
    // Request split over two descriptors is fine.
    let used = rig.send(&[
        Desc::read(req, 8),
        Desc::read(req + 8, 16),
        Desc::write(resp, 10),
    ]);
    assert_eq!(used[0].1, 10);
    assert_eq!(rig.dev.plugged_size(), BS);
    let c = rig.dev.counters();
    assert!(c.malformed_buffers >= 5, "{c:?}");
    assert_eq!(c.errors, 2);
    let _ = BUFFER_BASE;
}

#[test]
fn config_writes_are_refused() {
    let (mut rig, _) = rig_with(64 * MIB);
    rig.dev.write_config(off::REQUESTED_SIZE, &[0; 8]);
    rig.dev.write_config(off::PLUGGED_SIZE, &[1; 8]);
    rig.dev.write_config(u64::MAX, &[1]);
    assert_eq!(rig.dev.counters().config_writes_refused, 3);
    assert_eq!(rig.config_u64(off::REQUESTED_SIZE), 64 * MIB);
    assert_eq!(rig.config_u64(off::PLUGGED_SIZE), 0);
}

#[test]
fn no_interrupt_before_activation_and_after_reset() {
    let (mut rig, _) = rig_with(0);
    rig.dev.reset();
    rig.dev.set_requested_size(128 * MIB).unwrap();
    assert_eq!(rig.interrupt.config_count(), 0);
    assert_eq!(rig.dev.process_queue(), 0);
}

/// The VMM waits for the guest to follow a new requested size on this eventfd: it is written
/// when plugged_size changes, and only then.
#[test]
fn plugged_size_changes_are_signalled() {
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let (mut rig, _) = rig_with(256 * MIB);
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    rig.dev.notify_plugged_changes(fd.try_clone().unwrap());
    let signalled = |fd: &EventFd| fd.read().is_ok();

    assert_eq!(
        rig.request(request::STATE, ADDR, 4),
        Some((response::ACK, response::STATE_UNPLUGGED))
    );
    assert!(!signalled(&fd), "a STATE request changes nothing");
    assert_eq!(
        rig.request(request::PLUG, ADDR, 4),
        Some((response::ACK, 0))
    );
    assert!(signalled(&fd), "plug");
    assert_eq!(
        rig.request(request::PLUG, ADDR + blocks(200), 1)
            .map(|r| r.0),
        Some(response::ERROR),
        "outside the usable region"
    );
    assert!(!signalled(&fd), "a refused request changes nothing");
    assert_eq!(
        rig.request(request::UNPLUG_ALL, 0, 0),
        Some((response::ACK, 0))
    );
    assert!(signalled(&fd), "unplug all");
    assert_eq!(rig.dev.plugged_size(), 0);
}
