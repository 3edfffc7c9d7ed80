//! CPUID as each vCPU sees it: what KVM supports, with this vCPU's APIC ID and the topology
//! (one core per vCPU, one thread per core) filled in, and the XSAVE leaf (0xD) made to agree
//! with itself and with the XCR0 the vCPU starts with (see [`xsave`]).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// CPUID.1:ECX bit 31: running under a hypervisor (Linux then looks for kvm-clock).
const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:ECX bit 24: TSC deadline timer; KVM's in-kernel LAPIC emulates it.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID.1:EDX bit 28: HTT, set when the package has more than one logical CPU.
const EDX_HTT: u32 = 1 << 28;
/// CPUID.1:ECX bit 26: XSAVE, XRSTOR, XSETBV and XCR0 exist.
const ECX_XSAVE: u32 = 1 << 26;
/// CPUID.1:ECX bit 27: OSXSAVE, a copy of CR4.OSXSAVE (clear at reset; KVM keeps it current).
const ECX_OSXSAVE: u32 = 1 << 27;

/// Adjust the supported CPUID for vCPU `id` of `count`. Returns the XCR0 the vCPU should start
/// with ([`xsave`]), `None` when the vCPU has no XSAVE.
pub fn configure(cpuid: &mut CpuId, id: u8, count: u8) -> Option<u64> {
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                // EBX[31:24] initial APIC ID, [23:16] logical processors per package,
                // [15:8] CLFLUSH line size in 8-byte units.
                e.ebx = ((id as u32) << 24) | ((count as u32) << 16) | (8 << 8);
                e.ecx |= ECX_HYPERVISOR | ECX_TSC_DEADLINE;
                e.ecx &= !ECX_OSXSAVE;
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
    xsave(cpuid)
}

/// The XSAVE legacy region (x87 and SSE state, 512 bytes) and header (64 bytes): where the
/// first extended state component starts in the standard format.
const XSAVE_LEGACY_AND_HEADER: u32 = 576;

/// XCR0 components that a CPU (and Linux) enables only together or with another one: each
/// group is all or nothing, and a group whose `needs` component is missing goes too.
const XCR0_GROUPS: [(u64, u64); 3] = [
    // AVX-512: opmask, ZMM_Hi256, Hi16_ZMM, which need YMM.
    (0b111 << 5, 1 << 2),
    // MPX: BNDREGS and BNDCSR.
    (0b11 << 3, 0),
    // AMX: XTILECFG and XTILEDATA.
    (0b11 << 17, 0),
];

/// Makes the XSAVE leaf (0xD) agree with itself and returns the XCR0 to start the vCPU with:
/// every user component that sub-leaf 0 offers and that has a sub-leaf with a size and an
/// offset past the legacy area (others are dropped from the offer, with their groups);
/// sub-leaf 0's ECX (the size for every offered component) and EBX (the size for the enabled
/// ones) follow from those sub-leaves.
///
/// Why the vCPU starts with XCR0 already set: Linux compares CPUID.0xD.0:EBX after it enables
/// its components with the size it computes from the sub-leaves and warns ("XSAVE consistency
/// problem", with a call trace) when they differ. KVM computes EBX from the vCPU's XCR0 and
/// recomputes it when the guest's XSETBV reaches it; in the nested test host (QEMU TCG
/// emulating SVM) it does not, so EBX kept the size for XCR0 = x87 (576) while the guest ran
/// with x87|SSE|AVX (832). Starting with the offered components enabled gives the guest the
/// size for what it enables; a guest that enables fewer still has KVM recompute EBX wherever
/// XSETBV exits, as on hardware.
pub fn xsave(cpuid: &mut CpuId) -> Option<u64> {
    let entries = cpuid.as_mut_slice();
    let has_xsave = entries
        .iter()
        .any(|e| e.function == 1 && e.ecx & ECX_XSAVE != 0);
    let leaf0 = entries
        .iter()
        .position(|e| e.function == 0xd && e.index == 0)?;
    if !has_xsave {
        return None;
    }
    let offered = u64::from(entries[leaf0].eax) | (u64::from(entries[leaf0].edx) << 32);
    let area = |e: &[kvm_cpuid_entry2], bit: u32| {
        e.iter()
            .find(|s| s.function == 0xd && s.index == bit)
            .filter(|s| s.eax != 0 && s.ebx >= XSAVE_LEGACY_AND_HEADER)
            .map(|s| s.ebx.saturating_add(s.eax))
    };
    // x87 and SSE live in the legacy area and have no sub-leaf of their own.
    let mut xcr0 = offered & 0b11;
    for bit in 2..64 {
        if offered & (1 << bit) != 0 && area(entries, bit).is_some() {
            xcr0 |= 1 << bit;
        }
    }
    for (group, needs) in XCR0_GROUPS {
        if xcr0 & group != group || xcr0 & needs != needs {
            xcr0 &= !group;
        }
    }
    if xcr0 != offered {
        log::warn!(
            "CPUID: XSAVE components {:#x} offered without a usable sub-leaf of leaf 0xD; \
             offering {xcr0:#x}",
            offered & !xcr0
        );
    }
    let size = |mask: u64| {
        (2..64)
            .filter(|b| mask & (1 << b) != 0)
            .filter_map(|b| area(entries, b))
            .fold(XSAVE_LEGACY_AND_HEADER, u32::max)
    };
    // Every offered component is enabled: the size for the enabled ones (EBX) is the size for
    // all of them (ECX).
    let full = size(xcr0);
    let e = &mut entries[leaf0];
    e.eax = xcr0 as u32;
    e.edx = (xcr0 >> 32) as u32;
    e.ebx = full;
    e.ecx = full;
    Some(xcr0)
}

/// Bits of APIC ID needed to number `count` CPUs.
fn bits_for(count: u8) -> u32 {
    (count.max(1) as u32).next_power_of_two().trailing_zeros()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            ..Default::default()
        }
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    /// The size Linux computes from the sub-leaves for `xcr0` (standard format), which it
    /// compares with CPUID.0xD.0:EBX (`paranoid_xstate_size_valid`).
    fn linux_size(c: &CpuId, xcr0: u64) -> u32 {
        (2..64)
            .filter(|b| xcr0 & (1 << b) != 0)
            .map(|b| find(c, 0xd, b))
            .fold(576, |size, s| size.max(s.ebx + s.eax))
    }

    /// What KVM reported in the nested test host (QEMU TCG, EPYC): x87, SSE and AVX; EBX is
    /// the size for XCR0 = x87 (the vCPU's reset value).
    fn nested_host_leaves() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(1, 0, 0, 0, ECX_XSAVE | ECX_OSXSAVE),
            leaf(0xd, 0, 0b111, 0x240, 0x340),
            leaf(0xd, 1, 0b101, 0, 0),
            leaf(0xd, 2, 0x100, 0x240, 0),
        ]
    }

    #[test]
    fn the_vcpu_starts_with_what_the_guest_will_enable_and_its_size() {
        let mut c = CpuId::from_entries(&nested_host_leaves()).unwrap();
        let xcr0 = configure(&mut c, 0, 1).expect("XSAVE is offered");
        assert_eq!(xcr0, 0b111, "x87, SSE and AVX");
        let d0 = find(&c, 0xd, 0);
        assert_eq!(u64::from(d0.eax), xcr0);
        assert_eq!(d0.ebx, linux_size(&c, xcr0), "the size Linux checks");
        assert_eq!(d0.ebx, 832);
        assert_eq!(d0.ecx, 832);
        assert_eq!(
            find(&c, 1, 0).ecx & ECX_OSXSAVE,
            0,
            "CR4.OSXSAVE is clear at reset"
        );
    }

    #[test]
    fn components_without_a_usable_sub_leaf_are_not_offered() {
        // AVX-512 offered, but ZMM_Hi256 (bit 6) has no sub-leaf and AVX's size is 0.
        let mut leaves = nested_host_leaves();
        leaves[1].eax = 0b1110_0111;
        leaves[3].eax = 0;
        leaves.push(leaf(0xd, 5, 0x40, 0x440, 0));
        leaves.push(leaf(0xd, 7, 0x400, 0x680, 0));
        let mut c = CpuId::from_entries(&leaves).unwrap();
        assert_eq!(xsave(&mut c), Some(0b11));
        let d0 = find(&c, 0xd, 0);
        assert_eq!((d0.eax, d0.ebx, d0.ecx), (0b11, 576, 576));
        // With AVX whole, AVX-512 still goes as a group: bit 6 is missing.
        let mut leaves = nested_host_leaves();
        leaves[1].eax = 0b1110_0111;
        leaves.push(leaf(0xd, 5, 0x40, 0x440, 0));
        leaves.push(leaf(0xd, 7, 0x400, 0x680, 0));
        let mut c = CpuId::from_entries(&leaves).unwrap();
        assert_eq!(xsave(&mut c), Some(0b111));
    }

    #[test]
    fn no_xsave_no_xcr0() {
        let mut leaves = nested_host_leaves();
        leaves[0].ecx = 0;
        let mut c = CpuId::from_entries(&leaves).unwrap();
        assert_eq!(configure(&mut c, 0, 1), None);
        assert_eq!(find(&c, 0xd, 0).ebx, 0x240, "left as KVM gave it");
        let mut c = CpuId::from_entries(&[leaf(1, 0, 0, 0, ECX_XSAVE)]).unwrap();
        assert_eq!(xsave(&mut c), None, "no leaf 0xD");
    }

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
        assert_eq!(configure(&mut c, 3, 4), None, "no XSAVE offered");
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
