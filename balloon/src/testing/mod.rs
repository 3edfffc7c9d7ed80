//! Test support, built with the `testing` feature (the crate's tests, fuzz targets, benchmark
//! and examples enable it): a virtio driver that lays out real split virtqueues in mmap'd guest
//! memory and writes the same bytes a Linux guest would ([`driver`]), fake backends that record
//! calls and enforce guest-RAM bounds ([`fakes`]), devices with a driver in front
//! ([`rigs`]), and the fuzz harnesses ([`fuzz`]).

mod driver;
mod fakes;
pub mod fuzz;
mod rigs;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use virtio::{GuestMemoryMmap, Interrupt};
use vm_memory::GuestAddress;

pub use driver::*;
pub use fakes::*;
pub use memory::ManualClock;
pub use rigs::*;

/// Guest RAM from `(start, size)` pairs.
pub fn guest_memory(ranges: &[(u64, usize)]) -> GuestMemoryMmap {
    let r: Vec<(GuestAddress, usize)> = ranges.iter().map(|&(a, s)| (GuestAddress(a), s)).collect();
    GuestMemoryMmap::from_ranges(&r).expect("test guest memory")
}

/// Counts interrupts and remembers when the last used-buffer interrupt came.
#[derive(Default, Debug)]
pub struct TestInterrupt {
    /// Used-buffer interrupts so far.
    pub used: AtomicUsize,
    /// Config-change interrupts so far.
    pub config: AtomicUsize,
    /// When the last used-buffer interrupt came.
    pub last_used_at: Mutex<Option<std::time::Instant>>,
}

impl TestInterrupt {
    /// Used-buffer interrupts so far.
    pub fn used_count(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }
    /// Config-change interrupts so far.
    pub fn config_count(&self) -> usize {
        self.config.load(Ordering::SeqCst)
    }
}

impl Interrupt for TestInterrupt {
    fn notify_used(&self) {
        if let Ok(mut t) = self.last_used_at.lock() {
            *t = Some(std::time::Instant::now());
        }
        self.used.fetch_add(1, Ordering::SeqCst);
    }
    fn notify_config(&self) {
        self.config.fetch_add(1, Ordering::SeqCst);
    }
}

/// A [`memory::SlotMapper`] for a memory manager with no hypervisor behind it (tests, the
/// benchmark, examples): every map and unmap succeeds and does nothing.
pub struct NoSlots;

impl memory::SlotMapper for NoSlots {
    unsafe fn map(&mut self, _: u32, _: u64, _: u64, _: *mut u8) -> Result<(), String> {
        Ok(())
    }
    fn unmap(&mut self, _: u32, _: u64, _: u64) -> Result<(), String> {
        Ok(())
    }
}

/// What a driver hands the device once it has laid out `queues`: queue `i` of the slice is the
/// device's queue `i`, each with a fresh notification eventfd.
pub fn activation(
    mem: &GuestMemoryMmap,
    queues: &[DriverQueue],
    interrupt: std::sync::Arc<TestInterrupt>,
    acked_features: u64,
) -> virtio::Activation {
    virtio::Activation {
        mem: mem.clone(),
        queues: queues
            .iter()
            .enumerate()
            .map(|(i, q)| q.active_queue(i))
            .collect(),
        interrupt,
        acked_features,
    }
}

/// Guest RAM as the VMM makes it, without a hypervisor: one boot region of `size` bytes at guest
/// address 0 on `backing`, behind a memory manager (whose discards wait for its `tick` or
/// `flush_discards`).
pub fn boot_ram_manager(size: u64, backing: memory::Backing) -> memory::MemoryManager {
    let spec = memory::RegionSpec {
        guest_addr: 0,
        size,
        backing,
        kind: memory::RegionKind::BootRam,
    };
    memory::MemoryManager::new(&[spec], Box::new(NoSlots)).expect("manager")
}
