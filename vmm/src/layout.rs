//! The guest physical address map: where boot data, ACPI tables, RAM, the MMIO hole and the
//! hot-add region sit.
//!
//! ```text
//! 0x0000_0500  GDT                      0x0000_7000  boot_params (zero page)
//! 0x0000_0520  IDT (empty)              0x0000_8ff0  boot stack top
//! 0x0000_6000  PVH start_info + memmap  0x0000_9000  page tables (PML4, PDPT, 4 PDs)
//! 0x0002_0000  kernel command line      0x0009_fc00  EBDA (reserved) .. 1 MiB
//! 0x000e_0000  ACPI tables (RSDP first) 0x0010_0000  high memory: kernel, initramfs, RAM
//! 0xc000_0000  32-bit MMIO hole: virtio-mmio windows at 0xd000_0000, IOAPIC, LAPIC
//! 0x1_0000_0000 RAM above 4 GiB, then the hot-add region aligned to 128 MiB
//! ```

/// x86-64 base page size.
pub const PAGE_SIZE: u64 = 0x1000;

/// The boot GDT (flat code and data segments).
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT: the kernel installs its own.
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_ADDR: u64 = 0x6080;
/// The Linux boot protocol's `boot_params` (zero page).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Top of the stack the boot vCPU starts with.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// The boot page tables' top level.
pub const PML4_ADDR: u64 = 0x9000;
/// The boot page tables' PDPT.
pub const PDPT_ADDR: u64 = 0xa000;
/// Four page directories of 2 MiB pages identity-map the first 4 GiB.
pub const PD_ADDR: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Linux's default COMMAND_LINE_SIZE on x86-64.
pub const CMDLINE_MAX: usize = 2048;
/// Start of the EBDA: reserved from here to 1 MiB.
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of the ACPI tables (the RSDP first).
pub const ACPI_START: u64 = 0xe_0000;
/// End (exclusive) of the ACPI area.
pub const ACPI_END: u64 = 0x10_0000;
/// Where high memory starts: the kernel, initramfs and the rest of RAM.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole; RAM stops here and resumes at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// Where RAM resumes above the MMIO hole.
pub const RAM_ABOVE_4G: u64 = 0x1_0000_0000;
/// virtio-mmio device windows, 4 KiB each.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// The IOAPIC's MMIO window.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APIC's MMIO window.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS and one for the identity map, inside the hole.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity-map page, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Linux's x86-64 memory block size: hot-add regions are aligned to it.
pub const MEMORY_BLOCK_SIZE: u64 = 128 << 20;

/// Legacy I/O ports.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;
/// The i8042 keyboard controller's data port (command port at +4).
pub const I8042_PORT: u16 = 0x60;
/// ACPI hardware-reduced sleep control/status register (FADT), one byte.
pub const ACPI_SLEEP_PORT: u16 = 0x3c0;
/// ACPI reset register (FADT), one byte; writing [`ACPI_RESET_VALUE`] resets.
pub const ACPI_RESET_PORT: u16 = 0x3c1;
/// The value that resets the machine when written to [`ACPI_RESET_PORT`].
pub const ACPI_RESET_VALUE: u8 = 1;

/// GSIs for virtio-mmio devices: legacy ISA lines left free by the platform.
pub const VIRTIO_IRQS: [u32; 6] = [5, 6, 7, 9, 10, 11];

/// Guest RAM ranges for `mem_size` bytes of boot RAM: below the hole, then above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (RAM_ABOVE_4G, mem_size - MMIO_HOLE_START),
        ]
    }
}

/// First guest address after boot RAM.
pub fn ram_end(mem_size: u64) -> u64 {
    let (start, size) = *ram_ranges(mem_size).last().expect("at least one range");
    start + size
}

/// Where a hot-add region goes: after boot RAM (and never inside the hole), 128 MiB aligned.
pub fn hotplug_base(mem_size: u64) -> u64 {
    let end = ram_end(mem_size).max(RAM_ABOVE_4G);
    end.div_ceil(MEMORY_BLOCK_SIZE) * MEMORY_BLOCK_SIZE
}

/// Base address of virtio-mmio window `index`.
pub fn virtio_mmio_addr(index: usize) -> u64 {
    VIRTIO_MMIO_BASE + index as u64 * virtio::mmio::MMIO_WINDOW_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_range_below_the_hole() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(hotplug_base(512 << 20), RAM_ABOVE_4G);
    }

    #[test]
    fn large_guest_is_split_around_the_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r, vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        assert_eq!(ram_end(4 << 30), 5 << 30);
        assert_eq!(hotplug_base((4 << 30) + (1 << 20)), (5 << 30) + (128 << 20));
    }

    // The fixed boot areas must not overlap; checked at compile time.
    const _: () = {
        assert!(GDT_ADDR + 32 <= IDT_ADDR);
        assert!(PVH_MEMMAP_ADDR + 8 * 24 <= ZERO_PAGE_ADDR);
        assert!(ZERO_PAGE_ADDR + PAGE_SIZE <= BOOT_STACK_TOP);
        assert!(PD_ADDR + 4 * PAGE_SIZE <= CMDLINE_ADDR);
        assert!(CMDLINE_ADDR + CMDLINE_MAX as u64 <= EBDA_START);
    };

    #[test]
    fn virtio_windows_stay_below_the_ioapic() {
        assert!(virtio_mmio_addr(VIRTIO_IRQS.len()) <= IOAPIC_ADDR);
    }
}
