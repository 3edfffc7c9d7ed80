//! virtio-mem plug and unplug on the host side: the real `VirtioMem` device driven through real
//! descriptors by the test driver, the real `MemoryManager` behind it (as vmm/src/vm.rs builds
//! them), and real KVM memory slots when /dev/kvm opens (an empty VM, no vCPU; otherwise a
//! slot mapper that does nothing, and the bench says so).
//!
//! The workload is the end-to-end test's: a 2 GiB hot-add region of 2 MiB blocks, 1 GiB of it
//! plugged the way Linux plugs it (one PLUG of 64 blocks per 128 MiB memory block), then
//! unplugged to 0:
//! - `whole_memory_blocks`: one UNPLUG of 64 blocks per memory block, what Linux sends when a
//!   whole memory block goes offline (the usual case with `online_movable`);
//! - `block_by_block`: one UNPLUG per 2 MiB block, Linux's fallback when a memory block cannot
//!   go offline whole.
//!
//! `touched` cases write every page of the plugged memory first (off the clock), so each
//! discard frees 1 GiB of resident memory; `untouched` ones measure the bookkeeping, the slot
//! calls and the system calls with nothing to free. The clock runs from the notification until
//! each request's used-ring update, summed over the requests.
//!
//! Run: `cargo bench -p balloon --bench virtio_mem` (criterion filters as usual:
//! `-- unplug_1g/whole`). `VIRTIO_MEM_BENCH_ONCE=unplug` runs one untouched plug + unplug of
//! 1 GiB in whole memory blocks and exits, with the unplug inside `measured_unplug` (for
//! `valgrind --tool=callgrind --toggle-collect='*measured_unplug*'`).

// criterion_group! generates a public fn with no doc comment; a bench has no API to document.
#![allow(missing_docs)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use balloon::mem::{request, response, MemConfig};
use balloon::testing::{activation, mem_request_bytes, Desc, DriverQueue, TestInterrupt};
use balloon::{MemBackend, VirtioMem};
use criterion::{criterion_group, Criterion, SamplingMode};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};
use memory::{Backing, MemoryManager, RegionKind, RegionSpec, SlotMapper};
use virtio::{GuestMemoryMmap, VirtioDevice};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;
const BOOT: u64 = 16 * MIB;
const HOTPLUG_AT: u64 = 4 << 30;
const REGION: u64 = 2048 * MIB;
const BLOCK: u64 = 2 * MIB;
/// What Linux plugs and unplugs at once: one memory block of 128 MiB.
const MEMORY_BLOCK_BLOCKS: u16 = 64;
const PLUGGED: u64 = 1024 * MIB;
const QUEUE_AT: u64 = 0x1_0000;
const REQ_AT: u64 = 0x10_0000;
const RESP_AT: u64 = REQ_AT + 64;

/// KVM memory slots on an empty VM, as vmm/src/slots.rs registers them.
struct KvmSlots {
    vm: VmFd,
}

impl SlotMapper for KvmSlots {
    unsafe fn map(
        &mut self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: *mut u8,
    ) -> Result<(), String> {
        let r = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr as u64,
        };
        // SAFETY: our caller's contract (`SlotMapper::map`): the memory stays mapped until the
        // slot is removed; the VM has no vCPU, so nothing reads it meanwhile anyway.
        unsafe { self.vm.set_user_memory_region(r) }.map_err(|e| format!("map slot {slot}: {e}"))
    }

    fn unmap(&mut self, slot: u32, guest_addr: u64, _size: u64) -> Result<(), String> {
        let r = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: a size of zero deletes the slot; no host memory is referenced.
        unsafe { self.vm.set_user_memory_region(r) }.map_err(|e| format!("unmap slot {slot}: {e}"))
    }
}

/// KVM slots if /dev/kvm opens and allows a slot per block, else none.
fn slot_mapper() -> (Box<dyn SlotMapper>, &'static str) {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("virtio_mem bench: /dev/kvm: {e}; KVM slots NOT measured (no-op mapper)");
            return (Box::new(balloon::testing::NoSlots), "no KVM");
        }
    };
    let need = (REGION / BLOCK) as usize + 1;
    if kvm.get_nr_memslots() < need {
        eprintln!(
            "virtio_mem bench: KVM allows {} slots, {need} needed; KVM slots NOT measured",
            kvm.get_nr_memslots()
        );
        return (Box::new(balloon::testing::NoSlots), "no KVM");
    }
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    (Box::new(KvmSlots { vm }), "KVM slots")
}

/// The VMM's memory as vm.rs builds it, with the virtio-mem device over its hot-add region.
struct Rig {
    mm: Arc<Mutex<MemoryManager>>,
    mem: GuestMemoryMmap,
    dev: VirtioMem,
    queue: DriverQueue,
}

impl Rig {
    fn new(slots: Box<dyn SlotMapper>) -> Rig {
        let specs = [
            RegionSpec {
                guest_addr: 0,
                size: BOOT,
                backing: Backing::PrivateAnonymous,
                kind: RegionKind::BootRam,
            },
            RegionSpec {
                guest_addr: HOTPLUG_AT,
                size: REGION,
                backing: Backing::PrivateAnonymous,
                kind: RegionKind::Hotplug { block_size: BLOCK },
            },
        ];
        let mm = Arc::new(Mutex::new(
            MemoryManager::new(&specs, slots).expect("manager"),
        ));
        let mem = mm.lock().unwrap().guest_memory().clone();
        let backend: Arc<dyn MemBackend> = mm.clone();
        let config = MemConfig {
            block_size: BLOCK,
            requested_size: PLUGGED,
            ..MemConfig::new(HOTPLUG_AT, REGION)
        };
        let mut dev = VirtioMem::new(config, backend).expect("virtio-mem");
        let queue = DriverQueue::new(&mem, QUEUE_AT, 256);
        let features = dev.avail_features();
        dev.ack_features(features);
        dev.activate(activation(
            &mem,
            std::slice::from_ref(&queue),
            Arc::new(TestInterrupt::default()),
            features,
        ))
        .expect("activate");
        Rig {
            mm,
            mem,
            dev,
            queue,
        }
    }

    /// One request, from the notification to the used-ring update: (response, time taken).
    fn request(&mut self, kind: u16, addr: u64, nb_blocks: u16) -> (u16, Duration) {
        self.mem
            .write_slice(
                &mem_request_bytes(kind, addr, nb_blocks),
                GuestAddress(REQ_AT),
            )
            .unwrap();
        self.queue.add(
            &self.mem,
            &[Desc::read(REQ_AT, 24), Desc::write(RESP_AT, 10)],
        );
        let t0 = Instant::now();
        self.dev.process_queue();
        let took = t0.elapsed();
        assert_eq!(self.queue.take_used(&self.mem).len(), 1);
        let r: u16 = self.mem.read_obj(GuestAddress(RESP_AT)).unwrap();
        (r, took)
    }

    /// `bytes` from the region's start in requests of `per_request` blocks; the time taken.
    fn requests(&mut self, kind: u16, bytes: u64, per_request: u16) -> Duration {
        let mut total = Duration::ZERO;
        let step = u64::from(per_request) * BLOCK;
        for addr in (HOTPLUG_AT..HOTPLUG_AT + bytes).step_by(step as usize) {
            let (r, took) = self.request(kind, addr, per_request);
            assert_eq!(r, response::ACK, "request {kind} at {addr:#x}");
            total += took;
        }
        total
    }

    /// The guest writes every page of the first `bytes` of the region.
    fn touch(&self, bytes: u64) {
        for addr in (HOTPLUG_AT..HOTPLUG_AT + bytes).step_by(4096) {
            self.mem.write_obj(1u8, GuestAddress(addr)).unwrap();
        }
    }

    fn plugged(&self) -> u64 {
        self.mm.lock().unwrap().stats().hotplug_plugged_bytes
    }
}

fn bench_unplug(c: &mut Criterion, name: &str, per_request: u16, touched: bool) {
    let (slots, what) = slot_mapper();
    let mut rig = Rig::new(slots);
    let mut group = c.benchmark_group("unplug_1g");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(100));
    group.measurement_time(Duration::from_secs(if touched { 8 } else { 3 }));
    let mut per_iteration: Vec<Duration> = Vec::new();
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                rig.requests(request::PLUG, PLUGGED, MEMORY_BLOCK_BLOCKS);
                if touched {
                    rig.touch(PLUGGED);
                }
                let took = rig.requests(request::UNPLUG, PLUGGED, per_request);
                assert_eq!(rig.plugged(), 0);
                per_iteration.push(took);
                total += took;
            }
            total
        })
    });
    group.finish();
    if !per_iteration.is_empty() {
        per_iteration.sort_unstable();
        eprintln!(
            "unplug_1g/{name} ({what}): median {:.2} ms over {} unplugs of 1 GiB",
            per_iteration[per_iteration.len() / 2].as_secs_f64() * 1e3,
            per_iteration.len()
        );
    }
}

fn bench_plug(c: &mut Criterion) {
    let (slots, what) = slot_mapper();
    let mut rig = Rig::new(slots);
    let mut group = c.benchmark_group("plug_1g");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(100));
    group.measurement_time(Duration::from_secs(3));
    group.bench_function(format!("whole_memory_blocks ({what})"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += rig.requests(request::PLUG, PLUGGED, MEMORY_BLOCK_BLOCKS);
                rig.requests(request::UNPLUG, PLUGGED, MEMORY_BLOCK_BLOCKS);
            }
            total
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_unplug(
        c,
        "whole_memory_blocks/untouched",
        MEMORY_BLOCK_BLOCKS,
        false,
    );
    bench_unplug(c, "whole_memory_blocks/touched", MEMORY_BLOCK_BLOCKS, true);
    bench_unplug(c, "block_by_block/untouched", 1, false);
    bench_plug(c);
}

/// The unplug alone, for callgrind's `--toggle-collect`.
#[inline(never)]
fn measured_unplug(rig: &mut Rig) -> Duration {
    rig.requests(request::UNPLUG, PLUGGED, MEMORY_BLOCK_BLOCKS)
}

criterion_group!(virtio_mem, benches);

fn main() {
    if std::env::var("VIRTIO_MEM_BENCH_ONCE").as_deref() == Ok("unplug") {
        let mut rig = Rig::new(Box::new(balloon::testing::NoSlots));
        rig.requests(request::PLUG, PLUGGED, MEMORY_BLOCK_BLOCKS);
        let took = measured_unplug(&mut rig);
        assert_eq!(rig.plugged(), 0);
        eprintln!("one unplug of 1 GiB: {:.3} ms", took.as_secs_f64() * 1e3);
        return;
    }
    virtio_mem();
    Criterion::default().configure_from_args().final_summary();
}
