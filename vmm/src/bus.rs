//! Dispatch of guest port I/O and MMIO accesses to devices.
//!
//! A vCPU exit names an address; the bus finds the device whose range holds it and hands it the
//! offset inside that range. Ranges never overlap (insertion refuses it). Accesses that hit no
//! device are counted: reads return all ones (as an empty ISA/PCI bus does), writes are dropped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of the range it was inserted with.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset`; fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a device could not be placed on a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps past the end of the address space.
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange {
        /// Its start.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// The range overlaps a device already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps the device at {other:#x}")]
    Overlap {
        /// Its start.
        base: u64,
        /// Its length.
        len: u64,
        /// Where the other device starts.
        other: u64,
    },
}

struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// One address space: port I/O or MMIO.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
    unhandled: AtomicU64,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `base..base + len`; it then sees offsets from `base`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        if let Some((&other, e)) = self.ranges.range(..end).next_back() {
            if other + e.len > base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Entry)> {
        let (&base, e) = self.ranges.range(..=addr).next_back()?;
        (addr - base < e.len).then_some((base, e))
    }

    /// Returns whether a device handled the read.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((base, e)) => {
                e.device
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(addr - base, data);
                true
            }
            None => {
                self.unhandled.fetch_add(1, Ordering::Relaxed);
                data.fill(0xff);
                false
            }
        }
    }

    /// Returns whether a device handled the write.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((base, e)) => {
                e.device
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(addr - base, data);
                true
            }
            None => {
                self.unhandled.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Accesses that hit no device.
    pub fn unhandled(&self) -> u64 {
        self.unhandled.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(a.clone(), 0x100, 0x10).unwrap();
        bus.insert(b.clone(), 0x110, 0x10).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x105, &mut d));
        assert_eq!(d, [5]);
        assert!(bus.write(0x110, &[7]));
        assert!(bus.write(0x11f, &[8, 9]));
        assert_eq!(
            b.lock().unwrap().writes,
            vec![(0, vec![7]), (0xf, vec![8, 9])]
        );
        assert!(a.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn misses_read_all_ones_and_are_counted() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x100, 0x10)
            .unwrap();
        let mut d = [0u8; 2];
        assert!(!bus.read(0xff, &mut d));
        assert_eq!(d, [0xff, 0xff]);
        assert!(!bus.write(0x110, &[1]));
        assert!(!bus.read(u64::MAX, &mut d));
        assert_eq!(bus.unhandled(), 3);
    }

    #[test]
    fn overlapping_and_bad_ranges_are_refused() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev(), 0x108, 0x10),
            Err(BusError::Overlap {
                base: 0x108,
                len: 0x10,
                other: 0x100
            })
        );
        assert!(bus.insert(dev(), 0xf8, 0x9).is_err());
        assert!(bus.insert(dev(), 0xf8, 0x8).is_ok());
        assert!(bus.insert(dev(), 0x200, 0).is_err());
        assert!(bus.insert(dev(), u64::MAX, 2).is_err());
    }
}
