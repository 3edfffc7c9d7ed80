//! CPUID as each vCPU sees it: what KVM supports, with this vCPU's APIC ID and the topology
//! (one core per vCPU, one thread per core) filled in.

use kvm_bindings::CpuId;

/// CPUID.1:ECX bit 31: running under a hypervisor (Linux then looks for kvm-clock).
const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:ECX bit 24: TSC deadline timer; KVM's in-kernel LAPIC emulates it.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID.1:EDX bit 28: HTT, set when the package has more than one logical CPU.
const EDX_HTT: u32 = 1 << 28;

/// Adjust the supported CPUID for vCPU `id` of `count`.
pub fn configure(cpuid: &mut CpuId, id: u8, count: u8) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                // EBX[31:24] initial APIC ID, [23:16] logical processors per package,
                // [15:8] CLFLUSH line size in 8-byte units.
                e.ebx = ((id as u32) << 24) | ((count as u32) << 16) | (8 << 8);
                e.ecx |= ECX_HYPERVISOR | ECX_TSC_DEADLINE;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            0x4 => {
                // Deterministic cache parameters: EAX[31:26] cores per package - 1.
                e.eax &= !(0x3f << 26);
                e.eax |= ((count as u32).saturating_sub(1) & 0x3f) << 26;
            }
            0xb | 0x1f => {
                // Extended topology: level 0 is SMT (1 thread), level 1 is core (count).
                e.edx = id as u32;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index; // level type SMT
                    }
                    1 => {
                        e.eax = bits_for(count);
                        e.ebx = count as u32;
                        e.ecx = (2 << 8) | e.index; // level type core
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0x8000_0008 => {
                // ECX[7:0] number of cores - 1 (AMD).
                e.ecx = (e.ecx & !0xff) | (count as u32).saturating_sub(1);
            }
            _ => {}
        }
    }
}

/// Bits of APIC ID needed to number `count` CPUs.
fn bits_for(count: u8) -> u32 {
    (count.max(1) as u32).next_power_of_two().trailing_zeros()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn apic_id_and_topology() {
        let mut c = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ])
        .unwrap();
        configure(&mut c, 3, 4);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!(e[1].edx, 3);
        assert_eq!(e[1].ebx, 4);
        assert_eq!(e[1].eax, 2);
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(3), 2);
    }
}
