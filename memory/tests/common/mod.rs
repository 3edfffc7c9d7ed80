//! Shared helpers for the manager tests: a fake slot mapper that records calls.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use memory::{Backing, MemoryManager, RegionKind, RegionSpec, SlotMapper};

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotCall {
    Map {
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: usize,
    },
    Unmap {
        slot: u32,
        guest_addr: u64,
        size: u64,
    },
}

/// Records every call; fails the next map when `fail_next` is set, or the map or unmap after
/// `fail_after` more successful calls.
#[derive(Clone, Default)]
pub struct FakeSlots {
    pub calls: Arc<Mutex<Vec<SlotCall>>>,
    pub fail_next: Arc<Mutex<bool>>,
    pub fail_after: Arc<Mutex<Option<u32>>>,
}

impl FakeSlots {
    fn countdown(&self, slot: u32) -> Result<(), String> {
        let mut after = self.fail_after.lock().unwrap();
        match *after {
            Some(0) => {
                *after = None;
                Err(format!("fake KVM refused slot {slot}"))
            }
            Some(n) => {
                *after = Some(n - 1);
                Ok(())
            }
            None => Ok(()),
        }
    }
}

impl SlotMapper for FakeSlots {
    unsafe fn map(
        &mut self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host: *mut u8,
    ) -> Result<(), String> {
        if std::mem::take(&mut *self.fail_next.lock().unwrap()) {
            return Err(format!("fake KVM refused slot {slot}"));
        }
        self.countdown(slot)?;
        self.calls.lock().unwrap().push(SlotCall::Map {
            slot,
            guest_addr,
            size,
            host_addr: host as usize,
        });
        Ok(())
    }
    fn unmap(&mut self, slot: u32, guest_addr: u64, size: u64) -> Result<(), String> {
        self.countdown(slot)?;
        self.calls.lock().unwrap().push(SlotCall::Unmap {
            slot,
            guest_addr,
            size,
        });
        Ok(())
    }
}

pub fn boot(guest_addr: u64, size: u64, backing: Backing) -> RegionSpec {
    RegionSpec {
        guest_addr,
        size,
        backing,
        kind: RegionKind::BootRam,
    }
}

pub fn hotplug(guest_addr: u64, size: u64, backing: Backing, block_size: u64) -> RegionSpec {
    RegionSpec {
        guest_addr,
        size,
        backing,
        kind: RegionKind::Hotplug { block_size },
    }
}

pub fn manager(specs: &[RegionSpec]) -> (MemoryManager, FakeSlots) {
    let slots = FakeSlots::default();
    let m = MemoryManager::new(specs, Box::new(slots.clone())).expect("manager");
    (m, slots)
}

/// Writes a non-zero byte into every page of guest bytes `addr..addr+len`.
pub fn touch(m: &MemoryManager, addr: u64, len: u64, byte: u8) {
    use vm_memory::{Bytes, GuestAddress};
    let buf = vec![byte; len as usize];
    m.guest_memory()
        .write_slice(&buf, GuestAddress(addr))
        .expect("write guest memory");
}

pub fn read_u64(m: &MemoryManager, addr: u64) -> u64 {
    use vm_memory::{Bytes, GuestAddress};
    m.guest_memory()
        .read_obj::<u64>(GuestAddress(addr))
        .expect("read guest memory")
}
