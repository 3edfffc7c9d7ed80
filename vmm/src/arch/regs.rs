//! Registers, segments, page tables, MSRs, FPU and LAPIC for the first instruction of Linux.
//!
//! Two entry states:
//! - **64-bit boot protocol** (bzImage, or an ELF vmlinux without a PVH note): long mode, paging
//!   on with an identity map of the first 4 GiB in 2 MiB pages, flat 64-bit code segment,
//!   RSI = boot_params (Documentation/arch/x86/boot.rst, "64-bit boot protocol").
//! - **PVH** (ELF vmlinux with a PVH note): 32-bit protected mode, paging off, flat 4 GiB
//!   segments, EBX = hvm_start_info (the Xen PVH ABI that Linux implements).

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, kvm_xcr, kvm_xcrs, Msrs,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    BOOT_STACK_TOP, GDT_ADDR, IDT_ADDR, PAGE_SIZE, PDPT_ADDR, PD_ADDR, PML4_ADDR, ZERO_PAGE_ADDR,
};

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit boot protocol at this address.
    Linux64 {
        /// Guest physical address of the 64-bit entry point.
        entry: u64,
    },
    /// PVH 32-bit entry at this address with start_info at `start_info`.
    Pvh {
        /// Guest physical address of the 32-bit PVH entry point.
        entry: u32,
        /// Guest physical address of `hvm_start_info`, passed in %ebx.
        start_info: u32,
    },
}

/// Why a vCPU's boot state could not be set.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM ioctl refused the state.
    #[error("KVM refused vCPU state ({what}): {source}")]
    Kvm {
        /// Which state.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// The page tables or the GDT could not be written to guest memory.
    #[error("cannot write boot page tables or GDT: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// A GDT entry from base, limit and the 12 flag bits (access byte + flags nibble).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The kvm_segment a GDT entry describes when loaded with `selector`.
fn segment(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// GDT: null, code, data, TSS. The code segment is 64-bit for long mode, 32-bit for PVH.
fn gdt(long_mode: bool) -> [u64; 4] {
    let code = if long_mode { 0xa09b } else { 0xc09b };
    [
        0,
        gdt_entry(code, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

fn write_gdt(mem: &GuestMemoryMmap, table: &[u64; 4]) -> Result<(), RegsError> {
    for (i, e) in table.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
    Ok(())
}

/// Identity map of the first 4 GiB with 2 MiB pages (PML4 -> PDPT -> 4 page directories).
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR))?;
    for pd in 0..4u64 {
        let pd_addr = PD_ADDR + pd * PAGE_SIZE;
        mem.write_obj(pd_addr | 0x3, GuestAddress(PDPT_ADDR + pd * 8))?;
        for i in 0..512u64 {
            let phys = (pd * 512 + i) << 21;
            // Present, writable, page size (2 MiB).
            mem.write_obj(phys | 0x83, GuestAddress(pd_addr + i * 8))?;
        }
    }
    Ok(())
}

/// Write the boot data structures and set the special registers for `mode`.
pub fn setup_sregs(vcpu: &VcpuFd, mem: &GuestMemoryMmap, mode: EntryMode) -> Result<(), RegsError> {
    let long_mode = matches!(mode, EntryMode::Linux64 { .. });
    let table = gdt(long_mode);
    write_gdt(mem, &table)?;
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("get sregs"))?;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    let code = segment(table[1], 0x08);
    let data = segment(table[2], 0x10);
    let tss = segment(table[3], 0x18);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    if long_mode {
        write_page_tables(mem)?;
        sregs.cr3 = PML4_ADDR;
        sregs.cr4 |= CR4_PAE;
        sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
        sregs.efer |= EFER_LME | EFER_LMA;
    } else {
        sregs.cr0 = CR0_PE | CR0_ET;
        sregs.cr4 = 0;
        sregs.efer = 0;
    }
    vcpu.set_sregs(&sregs).map_err(kvm("set sregs"))
}

/// General registers at the kernel's first instruction.
pub fn setup_regs(vcpu: &VcpuFd, mode: EntryMode) -> Result<(), RegsError> {
    let regs = match mode {
        EntryMode::Linux64 { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_TOP,
            rbp: BOOT_STACK_TOP,
            rsi: ZERO_PAGE_ADDR,
            ..Default::default()
        },
        EntryMode::Pvh { entry, start_info } => kvm_regs {
            rflags: 0x2,
            rip: entry as u64,
            rbx: start_info as u64,
            ..Default::default()
        },
    };
    vcpu.set_regs(&regs).map_err(kvm("set regs"))
}

/// x87 control word and SSE control/status as after FNINIT / reset.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("set fpu"))
}

/// XCR0 as [`super::cpuid::xsave`] chose it. Call after setting CPUID: KVM accepts only the
/// components the vCPU's CPUID offers, and recomputes CPUID.0xD's sizes from the new value.
/// A refusal is logged and not fatal: the guest then starts with XCR0 = x87 as after reset
/// (and may print Linux's XSAVE warning where its XSETBV does not reach KVM).
pub fn setup_xcr0(vcpu: &VcpuFd, xcr0: u64) {
    let mut xcrs = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0] = kvm_xcr {
        xcr: 0,
        value: xcr0,
        ..Default::default()
    };
    if let Err(e) = vcpu.set_xcrs(&xcrs) {
        log::warn!("KVM did not accept XCR0 {xcr0:#x}: {e}");
    }
}

/// MSRs Linux expects a boot loader or firmware to have set.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    // MTRRs enabled, default type write-back.
    const MTRR_DEF_ENABLE_WB: u64 = (1 << 11) | 6;
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_DEF_ENABLE_WB),
    ]
}

/// Set the boot MSRs one at a time: some KVMs (this project's PVM hosts among them) refuse
/// particular MSRs, and one refusal must not leave the rest unset. Returns how many were set.
pub fn setup_msrs(vcpu: &VcpuFd) -> usize {
    let mut set = 0;
    for entry in boot_msrs() {
        let msrs = match Msrs::from_entries(&[entry]) {
            Ok(m) => m,
            Err(_) => continue,
        };
        match vcpu.set_msrs(&msrs) {
            Ok(1) => set += 1,
            Ok(_) | Err(_) => log::debug!("KVM did not accept MSR {:#x}", entry.index),
        }
    }
    set
}

/// Local APIC: LINT0 as ExtINT (the legacy PIC's output), LINT1 as NMI.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic().map_err(kvm("get lapic"))?;
    let regs = &mut lapic.regs;
    let set_mode = |regs: &mut [std::os::raw::c_char; 1024], off: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *x as std::os::raw::c_char;
        }
    };
    set_mode(regs, APIC_LVT0, MODE_EXTINT);
    set_mode(regs, APIC_LVT1, MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm("set lapic"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let t = gdt(true);
        assert_eq!(t[1], 0x00af_9b00_0000_ffff);
        assert_eq!(t[2], 0x00cf_9300_0000_ffff);
        let cs = segment(t[1], 0x8);
        assert_eq!(
            (cs.base, cs.limit, cs.l, cs.db, cs.type_),
            (0, 0xffff_ffff, 1, 0, 0xb)
        );
        let cs32 = segment(gdt(false)[1], 0x8);
        assert_eq!((cs32.l, cs32.db), (0, 1));
        let tss = segment(t[3], 0x18);
        assert_eq!((tss.s, tss.type_), (0, 0xb));
    }

    #[test]
    fn page_tables_identity_map_4gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_ADDR);
        let pdpt3: u64 = mem.read_obj(GuestAddress(PDPT_ADDR + 24)).unwrap();
        let last: u64 = mem
            .read_obj(GuestAddress((pdpt3 & !0xfff) + 511 * 8))
            .unwrap();
        assert_eq!(last & !0xfff, (4u64 << 30) - (2 << 20));
        assert_eq!(last & 0x83, 0x83);
    }
}
