//! x86-64 vCPU state for booting Linux: CPUID, MSRs, registers, the GDT and page tables of the
//! 64-bit boot protocol, the 32-bit flat state of PVH, FPU and local APIC.

pub mod cpuid;
pub mod regs;
