//! Putting Linux into guest memory: the kernel (bzImage or ELF vmlinux, via linux-loader), the
//! initramfs, the command line, and the boot information the kernel reads first: `boot_params`
//! with the e820 map for the 64-bit protocol, or `hvm_start_info` with its memory map for PVH.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::regs::EntryMode;
use crate::layout::{
    ram_ranges, ACPI_END, CMDLINE_ADDR, CMDLINE_MAX, EBDA_START, HIMEM_START, MMIO_HOLE_START,
    PAGE_SIZE, PVH_INFO_ADDR, PVH_MEMMAP_ADDR, PVH_MODLIST_ADDR, ZERO_PAGE_ADDR,
};

/// Why the kernel, initramfs or command line could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be read.
    #[error("cannot read kernel image {path}: {source}")]
    KernelUnreadable {
        /// The path given.
        path: String,
        /// The system's error.
        source: std::io::Error,
    },
    /// The file is not a bzImage or ELF vmlinux for x86-64.
    #[error("{path} is not a kernel this VMM can boot (expected an x86-64 bzImage or ELF vmlinux): {detail}")]
    NotAKernel {
        /// The path given.
        path: String,
        /// What the loader said.
        detail: String,
    },
    /// The initramfs file could not be read.
    #[error("cannot read initramfs {path}: {source}")]
    InitrdUnreadable {
        /// The path given.
        path: String,
        /// The system's error.
        source: std::io::Error,
    },
    /// The initramfs does not fit below the kernel's limit in guest RAM.
    #[error("initramfs of {size} bytes does not fit in guest memory below {limit:#x}; give the guest more memory")]
    InitrdTooLarge {
        /// Its size in bytes.
        size: u64,
        /// The highest address it may reach.
        limit: u64,
    },
    /// The command line is longer than Linux accepts.
    #[error("kernel command line is {len} bytes; the limit is {max}")]
    CmdlineTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit, NUL included.
        max: usize,
    },
    /// The command line holds a NUL byte, which would cut it short.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// Guest memory refused a write.
    #[error("cannot write boot data to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// What the vCPU needs to start the kernel.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// How the vCPU enters the kernel.
    pub entry: EntryMode,
}

/// e820 entry types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// The guest's memory map: low RAM below the EBDA, the reserved legacy area with the ACPI tables,
/// then RAM from 1 MiB (split around the MMIO hole for large guests).
pub fn memory_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, ACPI_END - EBDA_START, E820_RESERVED),
    ];
    for (start, size) in ram_ranges(mem_size) {
        let start = start.max(HIMEM_START);
        let end = if start < MMIO_HOLE_START {
            size.min(MMIO_HOLE_START)
        } else {
            start + size
        };
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

fn open_kernel(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::KernelUnreadable {
        path: path.display().to_string(),
        source,
    })
}

/// Load `kernel`, `initrd` and `cmdline` into `mem` for a guest of `mem_size` bytes of boot RAM
/// whose ACPI RSDP is at `rsdp_addr`.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp_addr: u64,
) -> Result<BootInfo, BootError> {
    let path = kernel.display().to_string();
    let mut file = open_kernel(kernel)?;
    let mut magic = [0u8; 4];
    let is_elf = file.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF";
    file.seek(SeekFrom::Start(0))
        .map_err(|source| BootError::KernelUnreadable {
            path: path.clone(),
            source,
        })?;
    let not_kernel = |e: linux_loader::loader::Error| BootError::NotAKernel {
        path: path.clone(),
        detail: e.to_string(),
    };
    let loaded = if is_elf {
        Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(not_kernel)?
    } else {
        BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(not_kernel)?
    };

    if cmdline.len() >= CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX - 1,
        });
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let mut cmd = cmdline.as_bytes().to_vec();
    cmd.push(0);
    mem.write_slice(&cmd, GuestAddress(CMDLINE_ADDR))?;

    // linux-loader reports the end as an absolute guest address for both formats.
    let kernel_end = loaded.kernel_end;
    let initrd_limit = loaded
        .setup_header
        .map(|h| h.initrd_addr_max as u64)
        .filter(|&m| m != 0)
        .unwrap_or(0x37ff_ffff);
    let initrd = match initrd {
        Some(p) => Some(load_initrd(mem, mem_size, p, kernel_end, initrd_limit)?),
        None => None,
    };

    match (is_elf, loaded.pvh_boot_cap) {
        (true, PvhBootCapability::PvhEntryPresent(entry)) => {
            write_pvh_info(mem, mem_size, initrd, rsdp_addr)?;
            Ok(BootInfo {
                entry: EntryMode::Pvh {
                    entry: entry.raw_value() as u32,
                    start_info: PVH_INFO_ADDR as u32,
                },
            })
        }
        _ => {
            let mut params = boot_params::default();
            if let Some(hdr) = loaded.setup_header {
                params.hdr = hdr;
            }
            params.hdr.type_of_loader = 0xff; // "undefined" boot loader
            params.hdr.boot_flag = 0xaa55;
            params.hdr.header = 0x5372_6448; // "HdrS"
            params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
            params.hdr.cmdline_size = cmd.len() as u32;
            params.hdr.kernel_alignment = 0x0100_0000;
            if let Some((addr, size)) = initrd {
                params.hdr.ramdisk_image = addr as u32;
                params.hdr.ramdisk_size = size as u32;
            }
            params.acpi_rsdp_addr = rsdp_addr;
            let map = memory_map(mem_size);
            for (i, (addr, size, type_)) in map.iter().enumerate() {
                params.e820_table[i] = boot_e820_entry {
                    addr: *addr,
                    size: *size,
                    r#type: *type_,
                };
            }
            params.e820_entries = map.len() as u8;
            mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))?;
            // A bzImage's 64-bit entry point is 0x200 past where its protected-mode code loads.
            let entry = if is_elf {
                loaded.kernel_load.raw_value()
            } else {
                loaded.kernel_load.raw_value() + 0x200
            };
            Ok(BootInfo {
                entry: EntryMode::Linux64 { entry },
            })
        }
    }
}

/// Place the initramfs as high as allowed in low RAM, page aligned, above the kernel.
fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    path: &Path,
    kernel_end: u64,
    addr_max: u64,
) -> Result<(u64, u64), BootError> {
    let unreadable = |source| BootError::InitrdUnreadable {
        path: path.display().to_string(),
        source,
    };
    let mut f = File::open(path).map_err(unreadable)?;
    let size = f.metadata().map_err(unreadable)?.len();
    let low_ram_end = mem_size.min(MMIO_HOLE_START);
    let top = low_ram_end.min(addr_max.saturating_add(1));
    let addr = top.saturating_sub(size) & !(PAGE_SIZE - 1);
    if size == 0 || top < size || addr < kernel_end.max(HIMEM_START) {
        return Err(BootError::InitrdTooLarge { size, limit: top });
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)?;
    Ok((addr, size))
}

/// `hvm_start_info` (version 1) of the Xen PVH boot ABI.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct HvmStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}
// SAFETY: plain-old-data, repr(C), no padding holes that could leak (all fields are integers and
// the layout has no implicit padding: 4*4 + 8*4 + 4*2 = 56 bytes).
unsafe impl ByteValued for HvmStartInfo {}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct HvmModlistEntry {
    paddr: u64,
    size: u64,
    cmdline_paddr: u64,
    reserved: u64,
}
// SAFETY: plain-old-data, repr(C), four u64 fields, no padding.
unsafe impl ByteValued for HvmModlistEntry {}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct HvmMemmapEntry {
    addr: u64,
    size: u64,
    type_: u32,
    reserved: u32,
}
// SAFETY: plain-old-data, repr(C), 8+8+4+4 bytes, no padding.
unsafe impl ByteValued for HvmMemmapEntry {}

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    initrd: Option<(u64, u64)>,
    rsdp_addr: u64,
) -> Result<(), BootError> {
    let map = memory_map(mem_size);
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        let e = HvmMemmapEntry {
            addr: *addr,
            size: *size,
            type_: *type_,
            reserved: 0,
        };
        mem.write_obj(e, GuestAddress(PVH_MEMMAP_ADDR + i as u64 * 24))?;
    }
    let mut info = HvmStartInfo {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: rsdp_addr,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((paddr, size)) = initrd {
        mem.write_obj(
            HvmModlistEntry {
                paddr,
                size,
                ..Default::default()
            },
            GuestAddress(PVH_MODLIST_ADDR),
        )?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_ADDR))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_small_and_split() {
        let m = memory_map(256 << 20);
        assert_eq!(m[0], (0, EBDA_START, E820_RAM));
        assert_eq!(m[1].2, E820_RESERVED);
        assert_eq!(m[2], (HIMEM_START, (256 << 20) - HIMEM_START, E820_RAM));
        let big = memory_map(4 << 30);
        assert_eq!(
            big[2],
            (HIMEM_START, MMIO_HOLE_START - HIMEM_START, E820_RAM)
        );
        assert_eq!(big[3], (4 << 30, 1 << 30, E820_RAM));
        assert_eq!(std::mem::size_of::<HvmStartInfo>(), 56);
    }

    #[test]
    fn not_a_kernel_is_a_clear_error() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let dir = std::env::temp_dir().join(format!("vmm-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk");
        std::fs::write(&junk, vec![0x55u8; 8192]).unwrap();
        let e = load(&mem, 64 << 20, &junk, None, "", 0).unwrap_err();
        assert!(matches!(e, BootError::NotAKernel { .. }), "{e}");
        assert!(e.to_string().contains("not a kernel"));
        let missing = dir.join("missing");
        let e = load(&mem, 64 << 20, &missing, None, "", 0).unwrap_err();
        assert!(matches!(e, BootError::KernelUnreadable { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
