//! ACPI tables: how a stock kernel finds the vCPUs, the IOAPIC, the serial port and the
//! virtio-mmio devices, and how it powers the machine off (addresses in `layout.rs`).
//!
//! The platform is ACPI "hardware-reduced": no PM1 blocks, no SCI, no legacy PIT/PIC timers
//! expected; power off goes through the FADT sleep control register and reset through the FADT
//! reset register (see `devices::power`). The FADT's IA-PC boot flags say which legacy devices
//! are absent ([`IAPC_BOOT_ARCH`]). Tables are laid out from [`ACPI_START`] with the RSDP first,
//! where Linux also scans for it.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::power::S5_SLEEP_TYPE;
use crate::layout::{
    ACPI_END, ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_SLEEP_PORT, ACPI_START, COM1_IRQ, COM1_PORT,
    IOAPIC_ADDR, LAPIC_ADDR,
};

const OEM_ID: [u8; 6] = *b"RVMMVM";
const OEM_TABLE_ID: [u8; 8] = *b"RVMMVMM ";
const OEM_REVISION: u32 = 1;

/// FADT IAPC_BOOT_ARCH bit 2 (ACPI 6.5 table 5.11): the OS must not probe for VGA.
const IAPC_NO_VGA: u16 = 1 << 2;
/// FADT IAPC_BOOT_ARCH bit 5: there is no CMOS RTC at ports 0x70/0x71. Without it Linux
/// registers its rtc_cmos device, whose probe reads all-ones from the empty ports: the "update in
/// progress" bit never clears and the probe waits it out (about 4 s of the guest's boot).
/// Linux reads it as `acpi_gbl_FADT.boot_flags & ACPI_FADT_NO_CMOS_RTC`; the guest then takes
/// its wall clock from kvm-clock.
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;
/// The IA-PC boot flags of this machine: no legacy devices (bit 0 clear), no 8042 keyboard
/// controller (bit 1 clear: Linux then skips i8042 probing), no VGA, no CMOS RTC.
pub const IAPC_BOOT_ARCH: u16 = IAPC_NO_VGA | IAPC_NO_CMOS_RTC;

/// A virtio-mmio device as the DSDT announces it.
#[derive(Debug, Clone, Copy)]
pub struct MmioDeviceInfo {
    /// Guest physical address of its register window.
    pub addr: u64,
    /// Size of the window in bytes.
    pub len: u64,
    /// Its interrupt line (GSI).
    pub gsi: u32,
}

/// Why the ACPI tables could not be built or written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit the area reserved for them.
    #[error("ACPI tables need {needed:#x} bytes but only {room:#x} are reserved")]
    TooLarge {
        /// Bytes the tables take.
        needed: u64,
        /// Bytes reserved.
        room: u64,
    },
    /// Guest memory refused the write.
    #[error("cannot write ACPI tables to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
    /// More vCPUs than the MADT can name.
    #[error("{0} vCPUs do not fit in the MADT's 8-bit APIC IDs")]
    TooManyCpus(u8),
}

/// The tables as bytes, each with its guest address.
pub struct Tables {
    /// Each table with its guest physical address.
    pub blobs: Vec<(u64, Vec<u8>)>,
    /// Where the RSDP is; the boot protocol passes it to the kernel.
    pub rsdp_addr: u64,
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn dsdt(devices: &[MmioDeviceInfo]) -> Vec<u8> {
    let mut body = Vec::new();
    // \_S5_: soft-off sleep type, written to the sleep control register on power off.
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &0u8]),
    )
    .to_aml_bytes(&mut body);

    let mut com1_bytes = Vec::new();
    {
        let io = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
        let irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
        let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
        let hid = aml::EISAName::new("PNP0501");
        aml::Device::new(
            "COM1".into(),
            vec![
                &aml::Name::new("_HID".into(), &hid),
                &aml::Name::new("_UID".into(), &0u8),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(&mut com1_bytes);
    }
    let com1 = RawAml(com1_bytes);

    // One LNRO0005 device per virtio-mmio window: Linux's virtio_mmio driver matches that ID.
    let mut virtio_bytes = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        let mem = aml::Memory32Fixed::new(true, d.addr as u32, d.len as u32);
        let irq = aml::Interrupt::new(true, true, false, false, d.gsi);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let name = format!("VR{i:02X}");
        let uid = i as u32;
        let hid: String = "LNRO0005".into();
        aml::Device::new(
            name.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &hid),
                &aml::Name::new("_UID".into(), &uid),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(&mut virtio_bytes);
    }
    let virtio_raw = RawAml(virtio_bytes);
    aml::Scope::new("\\_SB_".into(), vec![&com1, &virtio_raw]).to_aml_bytes(&mut body);

    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

/// Already-serialised AML spliced into a parent object.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io8 = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port as u64,
        )
    };
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    b.sleep_control_reg = io8(ACPI_SLEEP_PORT);
    b.sleep_status_reg = io8(ACPI_SLEEP_PORT);
    b.reset_reg = io8(ACPI_RESET_PORT);
    b.reset_value = ACPI_RESET_VALUE;
    b.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"RVMMVMM ").into();
    bytes_of(&b.finalize())
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR as u32),
    );
    for id in 0..vcpus {
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, IOAPIC_ADDR as u32, 0));
    bytes_of(&m)
}

/// Build every table for `vcpus` vCPUs and the given virtio-mmio devices.
pub fn build(vcpus: u8, devices: &[MmioDeviceInfo]) -> Result<Tables, AcpiError> {
    if vcpus == 0 || vcpus == u8::MAX {
        return Err(AcpiError::TooManyCpus(vcpus));
    }
    let align = |a: u64| a.div_ceil(16) * 16;
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    // XSDT: header plus three 8-byte entries.
    let fadt_addr = align(xsdt_addr + 36 + 3 * 8);
    let fadt = fadt(0); // length only; rebuilt below with the DSDT address
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(vcpus);
    let dsdt_addr = align(madt_addr + madt.len() as u64);
    let dsdt = dsdt(devices);
    let fadt = self::fadt(dsdt_addr);

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(dsdt_addr);
    // Linux finds the DSDT through the FADT; listing it in the XSDT as well is harmless and
    // lets tools that dump the XSDT see every table.
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);

    let end = dsdt_addr + dsdt.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge {
            needed: end - ACPI_START,
            room: ACPI_END - ACPI_START,
        });
    }
    Ok(Tables {
        blobs: vec![
            (rsdp_addr, bytes_of(&rsdp)),
            (xsdt_addr, bytes_of(&xsdt)),
            (fadt_addr, fadt),
            (madt_addr, madt),
            (dsdt_addr, dsdt),
        ],
        rsdp_addr,
    })
}

impl Tables {
    /// Copies every table into guest memory at its address.
    pub fn write(&self, mem: &GuestMemoryMmap) -> Result<(), AcpiError> {
        for (addr, blob) in &self.blobs {
            mem.write_slice(blob, GuestAddress(*addr))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn devices() -> Vec<MmioDeviceInfo> {
        vec![
            MmioDeviceInfo {
                addr: 0xd000_0000,
                len: 0x1000,
                gsi: 5,
            },
            MmioDeviceInfo {
                addr: 0xd000_1000,
                len: 0x1000,
                gsi: 6,
            },
        ]
    }

    #[test]
    fn every_table_checksums_to_zero_and_has_its_length() {
        let t = build(2, &devices()).unwrap();
        let (_, rsdp) = &t.blobs[0];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        for (_, table) in &t.blobs[1..] {
            let len = u32::from_le_bytes(table[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, table.len(), "{}", String::from_utf8_lossy(&table[..4]));
            assert_eq!(sum(table), 0, "{}", String::from_utf8_lossy(&table[..4]));
        }
    }

    #[test]
    fn tables_point_at_each_other() {
        let t = build(1, &devices()).unwrap();
        let addr_of = |sig: &[u8]| t.blobs.iter().find(|(_, b)| &b[..4] == sig).unwrap().0;
        let (_, rsdp) = &t.blobs[0];
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        assert_eq!(xsdt_addr, addr_of(b"XSDT"));
        let (_, fadt) = t.blobs.iter().find(|(_, b)| &b[..4] == b"FACP").unwrap();
        let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        assert_eq!(x_dsdt, addr_of(b"DSDT"));
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "hardware-reduced");
        // ACPICA zeroes the boot flags of FADTs no longer than the ACPI 2.0 layout (116 bytes).
        assert_eq!(fadt.len(), 276, "an ACPI 6 FADT");
        // Sleep control register: system I/O at the power port.
        assert_eq!(fadt[244], 1);
        assert_eq!(
            u64::from_le_bytes(fadt[248..256].try_into().unwrap()),
            ACPI_SLEEP_PORT as u64
        );
    }

    #[test]
    fn dsdt_names_each_virtio_device_and_madt_each_cpu() {
        let t = build(3, &devices()).unwrap();
        let (_, dsdt) = t.blobs.iter().find(|(_, b)| &b[..4] == b"DSDT").unwrap();
        let count = dsdt.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(count, 2);
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        let (_, madt) = t.blobs.iter().find(|(_, b)| &b[..4] == b"APIC").unwrap();
        // Header 44 bytes, 3 local APICs of 8 bytes, one IOAPIC of 12.
        assert_eq!(madt.len(), 44 + 3 * 8 + 12);
    }

    /// The guest must learn that the platform has no CMOS RTC (or it waits ~4 s for one at
    /// boot), no 8042 and no VGA, from the FADT's IA-PC boot flags at offset 109.
    #[test]
    fn fadt_says_there_is_no_cmos_rtc_8042_or_vga() {
        let t = build(1, &devices()).unwrap();
        let (_, fadt) = t.blobs.iter().find(|(_, b)| &b[..4] == b"FACP").unwrap();
        let boot_flags = u16::from_le_bytes(fadt[109..111].try_into().unwrap());
        assert_ne!(boot_flags & (1 << 5), 0, "CMOS RTC not present");
        assert_ne!(boot_flags & (1 << 2), 0, "VGA not present");
        assert_eq!(
            boot_flags & (1 << 1),
            0,
            "8042 present would make Linux probe it"
        );
        assert_eq!(boot_flags & 1, 0, "legacy (ISA) devices present");
    }

    #[test]
    fn zero_cpus_refused() {
        assert!(build(0, &[]).is_err());
    }
}
