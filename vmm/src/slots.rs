//! KVM memory slots for the memory manager: `memory` asks through its `SlotMapper` trait, this
//! answers with KVM_SET_USER_MEMORY_REGION.

use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

/// Registers and removes guest memory slots on one VM.
pub struct KvmSlots {
    vm: Arc<VmFd>,
}

impl KvmSlots {
    /// Slots of the KVM VM `vm`.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self { vm }
    }
}

impl memory::SlotMapper for KvmSlots {
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
        // SAFETY: our caller's contract (`memory::SlotMapper::map`): `host_addr..+size` is one
        // live mapping that stays mapped until this slot is removed by `unmap` (the memory
        // manager's `Drop` removes every slot before its mappings go).
        unsafe { self.vm.set_user_memory_region(r) }.map_err(|e| {
            format!("KVM_SET_USER_MEMORY_REGION slot {slot} at {guest_addr:#x}+{size:#x}: {e}")
        })
    }

    fn unmap(&mut self, slot: u32, guest_addr: u64, _size: u64) -> Result<(), String> {
        // A size of zero deletes the slot.
        let r = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: deleting a slot makes KVM forget the mapping; no host memory is referenced.
        unsafe { self.vm.set_user_memory_region(r) }
            .map_err(|e| format!("deleting KVM slot {slot} at {guest_addr:#x}: {e}"))
    }
}
