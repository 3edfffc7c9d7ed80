//! The virtio-mmio transport (virtio 1.2 section 4.2.2, the modern "version 2" layout), generic
//! over [`VirtioDevice`].
//!
//! The transport is plain state plus register semantics: it does not know KVM. The VMM places it
//! on its MMIO bus, registers [`MmioTransport::queue_notify_fds`] as ioeventfds on the QueueNotify
//! register and [`MmioTransport::interrupt_fd`] as an irqfd. Without ioeventfds (tests), a write to
//! QueueNotify signals the queue's eventfd from here.
//!
//! ConfigGeneration (virtio 1.2 section 4.2.2.2) moves whenever the device configuration may have
//! changed since the driver last read it, so a driver that reads a 64-bit field as two 32-bit
//! halves and re-reads until the generation is stable never keeps a torn value. Devices change
//! their configuration under their own lock; the transport reads the generation under the same
//! lock and moves it when the device signalled a change ([`Interrupt::notify_config`]) or when
//! the configuration bytes differ from those it saw at the previous generation read (a change
//! made before DRIVER_OK has no interrupt to signal it).
//!
//! Conventions in this file: `offset` is relative to the start of the device's 4 KiB window;
//! registers are 32-bit and accesses of another width to them are ignored (reads give zeros), as
//! the spec requires the driver to use 32-bit accesses for them.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use log::{debug, warn};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{
    status, Activation, ActiveQueue, GuestMemoryMmap, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
};

/// Size of one device window in guest physical space.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register, where ioeventfds are placed.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
/// Vendor ID register: drivers do not interpret it; ours spells "RVMM".
const VENDOR_ID: u32 = 0x4d4d_5652;
const CONFIG_SPACE_OFFSET: u64 = 0x100;
/// Bytes of device configuration compared at each ConfigGeneration read. Covers every config
/// space this VMM has (virtio-balloon 16 bytes, virtio-mem 56); a device with a larger config
/// space must raise a config interrupt for changes past it.
const CONFIG_COMPARED_LEN: usize = 256;

/// Interrupt status bits (virtio 1.2 section 4.2.2, InterruptStatus).
pub const INT_USED_RING: u32 = 1;
/// The device configuration changed.
pub const INT_CONFIG: u32 = 2;

/// The interrupt line of one virtio-mmio device: the InterruptStatus register plus the eventfd
/// that KVM turns into a guest interrupt (irqfd).
pub struct MmioInterrupt {
    status: AtomicU32,
    irq: EventFd,
    /// Config-change notifications so far (the transport's ConfigGeneration follows it).
    config_changes: AtomicU32,
}

impl MmioInterrupt {
    /// An interrupt line with no status bits set.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            irq: EventFd::new(EFD_NONBLOCK)?,
            config_changes: AtomicU32::new(0),
        })
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irq.write(1) {
            warn!("virtio-mmio: cannot signal interrupt: {e}");
        }
    }

    /// Current InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The eventfd to register as an irqfd.
    pub fn fd(&self) -> &EventFd {
        &self.irq
    }
}

impl Interrupt for MmioInterrupt {
    fn notify_used(&self) {
        self.raise(INT_USED_RING);
    }
    fn notify_config(&self) {
        // Counted before the interrupt: a driver woken by it must see the new generation.
        self.config_changes.fetch_add(1, Ordering::SeqCst);
        self.raise(INT_CONFIG);
    }
}

/// Counters of driver mistakes at the transport level (never fatal to the VMM).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TransportCounters {
    /// Accesses of a width other than 32 bits to a register, or to unknown offsets.
    pub bad_accesses: u64,
    /// Queue set-up writes while the queue was already ready or the device already live.
    pub bad_queue_setup: u64,
    /// Activations the device refused.
    pub failed_activations: u64,
}

/// Set-up state of one queue before activation.
struct QueueSlot {
    queue: Queue,
    notify: Arc<EventFd>,
}

/// A virtio device behind the virtio-mmio register interface.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<MmioInterrupt>,
    queues: Vec<QueueSlot>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: ConfigGeneration,
    activated: bool,
    counters: TransportCounters,
}

impl MmioTransport {
    /// Wrap `device`. `mem` is the guest memory the device will use.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
    ) -> std::io::Result<Self> {
        let max_sizes: Vec<u16> = lock(&device).queue_max_sizes().to_vec();
        let mut queues = Vec::with_capacity(max_sizes.len());
        for max in max_sizes {
            let queue = Queue::new(max).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("queue: {e:?}"))
            })?;
            queues.push(QueueSlot {
                queue,
                notify: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            });
        }
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(MmioInterrupt::new()?),
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: ConfigGeneration::default(),
            activated: false,
            counters: TransportCounters::default(),
        })
    }

    /// The eventfds, one per queue in index order, to register as ioeventfds on
    /// `window base + QUEUE_NOTIFY_OFFSET` with the queue index as data match.
    pub fn queue_notify_fds(&self) -> Vec<Arc<EventFd>> {
        self.queues.iter().map(|q| q.notify.clone()).collect()
    }

    /// The interrupt line, for the VMM to register as an irqfd.
    pub fn interrupt(&self) -> Arc<MmioInterrupt> {
        self.interrupt.clone()
    }

    /// A snapshot of the transport's counters.
    pub fn counters(&self) -> TransportCounters {
        self.counters
    }

    /// Device status register as the driver last wrote it.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn device_id(&self) -> u32 {
        lock(&self.device).device_type()
    }

    fn selected_queue(&mut self) -> Option<&mut QueueSlot> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A guest read from the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 {
            self.counters.bad_accesses += 1;
            data.fill(0);
            return;
        }
        let v: u32 = match offset {
            0x00 => MAGIC_VALUE,
            0x04 => MMIO_VERSION,
            0x08 => self.device_id(),
            0x0c => VENDOR_ID,
            0x10 => {
                let features = lock(&self.device).avail_features() | (1u64 << VIRTIO_F_VERSION_1);
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => self
                .selected_queue()
                .map_or(0, |q| q.queue.max_size() as u32),
            0x44 => self.selected_queue().map_or(0, |q| q.queue.ready() as u32),
            0x60 => self.interrupt.status(),
            0x70 => self.status,
            // Shared memory regions: none. SHMLen of all ones means "no such region".
            0xb0 | 0xb4 | 0xb8 | 0xbc => u32::MAX,
            0xfc => self.config_generation(),
            _ => {
                self.counters.bad_accesses += 1;
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write to the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if self.status & status::DRIVER == 0 {
                self.counters.bad_accesses += 1;
                return;
            }
            lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 {
            self.counters.bad_accesses += 1;
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 => self.write_driver_features(v),
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 => self.queue_setup(|q| q.set_size(v as u16)),
            0x44 => self.queue_setup(|q| q.set_ready(v == 1)),
            0x50 => self.notify_queue(v),
            0x64 => {
                self.interrupt.status.fetch_and(!v, Ordering::SeqCst);
            }
            0x70 => self.write_status(v),
            0x80 => self.queue_setup(|q| q.set_desc_table_address(Some(v), None)),
            0x84 => self.queue_setup(|q| q.set_desc_table_address(None, Some(v))),
            0x90 => self.queue_setup(|q| q.set_avail_ring_address(Some(v), None)),
            0x94 => self.queue_setup(|q| q.set_avail_ring_address(None, Some(v))),
            0xa0 => self.queue_setup(|q| q.set_used_ring_address(Some(v), None)),
            0xa4 => self.queue_setup(|q| q.set_used_ring_address(None, Some(v))),
            0xac => {} // SHMSel: no regions, nothing to select.
            _ => self.counters.bad_accesses += 1,
        }
    }

    /// The ConfigGeneration register: moved on by every config change since the last read.
    fn config_generation(&mut self) -> u32 {
        // The device lock orders this read after or before a whole config update, never inside.
        let device = lock(&self.device);
        let mut config = [0u8; CONFIG_COMPARED_LEN];
        device.read_config(0, &mut config);
        let signalled = self.interrupt.config_changes.load(Ordering::SeqCst);
        drop(device);
        self.config_generation.observe(signalled, config)
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
            self.counters.bad_accesses += 1;
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v as u64,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | ((v as u64) << 32),
            _ => self.counters.bad_accesses += 1,
        }
    }

    /// Queue registers may change only while the driver sets the device up and the queue is not
    /// yet ready (virtio 1.2 section 4.2.3.2).
    fn queue_setup(&mut self, f: impl FnOnce(&mut Queue)) {
        let live = self.activated || self.status & status::FEATURES_OK == 0;
        match self.queues.get_mut(self.queue_sel as usize) {
            Some(slot) if !live => {
                // Ready may always be cleared or set; other fields only while not ready.
                f(&mut slot.queue);
            }
            _ => self.counters.bad_queue_setup += 1,
        }
    }

    fn notify_queue(&mut self, index: u32) {
        match self.queues.get(index as usize) {
            Some(slot) => {
                if let Err(e) = slot.notify.write(1) {
                    warn!("virtio-mmio: cannot signal queue {index}: {e}");
                }
            }
            None => self.counters.bad_accesses += 1,
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits (virtio 1.2 section 2.1.2), FAILED excepted.
        if v & self.status != self.status {
            self.counters.bad_accesses += 1;
            return;
        }
        let newly = v & !self.status;
        if newly & status::FEATURES_OK != 0 {
            let offered = lock(&self.device).avail_features() | (1u64 << VIRTIO_F_VERSION_1);
            let accepted = self.driver_features & offered;
            if accepted != self.driver_features || accepted & (1u64 << VIRTIO_F_VERSION_1) == 0 {
                // Unknown features or a legacy driver: FEATURES_OK does not stick.
                debug!(
                    "virtio-mmio: driver features {:#x} refused (offered {offered:#x})",
                    self.driver_features
                );
                self.status = v & !status::FEATURES_OK;
                return;
            }
            lock(&self.device).ack_features(accepted);
        }
        self.status = v;
        if newly & status::DRIVER_OK != 0 && self.status & status::FEATURES_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let mut queues = Vec::new();
        for (index, slot) in self.queues.iter().enumerate() {
            if !slot.queue.ready() {
                continue;
            }
            if !slot.queue.is_valid(&self.mem) {
                warn!("virtio-mmio: queue {index} is not valid in guest memory");
                self.status |= status::DEVICE_NEEDS_RESET;
                self.counters.failed_activations += 1;
                self.interrupt.notify_config();
                return;
            }
            let notify = match slot.notify.try_clone() {
                Ok(fd) => fd,
                Err(e) => {
                    warn!("virtio-mmio: cannot clone queue eventfd: {e}");
                    self.status |= status::DEVICE_NEEDS_RESET;
                    return;
                }
            };
            // The device gets its own copy; the transport keeps the set-up registers readable.
            let queue = match Queue::try_from(slot.queue.state()) {
                Ok(q) => q,
                Err(e) => {
                    warn!("virtio-mmio: queue {index} state is invalid: {e:?}");
                    self.status |= status::DEVICE_NEEDS_RESET;
                    self.counters.failed_activations += 1;
                    return;
                }
            };
            queues.push(ActiveQueue {
                index,
                queue,
                notify,
            });
        }
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            acked_features: self.driver_features,
        };
        match lock(&self.device).activate(activation) {
            Ok(()) => self.activated = true,
            Err(e) => {
                warn!("virtio-mmio: device refused activation: {e}");
                self.counters.failed_activations += 1;
                self.status |= status::DEVICE_NEEDS_RESET;
                self.interrupt.notify_config();
            }
        }
    }

    fn reset(&mut self) {
        if self.activated || self.status != 0 {
            lock(&self.device).reset();
        }
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.status.store(0, Ordering::SeqCst);
        for slot in &mut self.queues {
            slot.queue.reset();
        }
    }
}

/// What the transport knows of the device configuration, to tell the driver whether it changed.
struct ConfigGeneration {
    value: u32,
    /// [`MmioInterrupt::config_changes`] at the previous read.
    signalled: u32,
    /// The configuration bytes at the previous read.
    config: [u8; CONFIG_COMPARED_LEN],
    /// Whether there was a previous read.
    seen: bool,
}

impl Default for ConfigGeneration {
    fn default() -> Self {
        Self {
            value: 0,
            signalled: 0,
            config: [0; CONFIG_COMPARED_LEN],
            seen: false,
        }
    }
}

impl ConfigGeneration {
    /// The generation to report given the device's signalled changes and its config bytes now.
    fn observe(&mut self, signalled: u32, config: [u8; CONFIG_COMPARED_LEN]) -> u32 {
        if self.seen && (signalled != self.signalled || config != self.config) {
            self.value = self.value.wrapping_add(1);
        }
        self.seen = true;
        self.signalled = signalled;
        self.config = config;
        self.value
    }
}

/// Lock the device, recovering from a poisoned lock: a panic elsewhere must not take the guest's
/// transport down with it.
fn lock(device: &Mutex<dyn VirtioDevice>) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ActivateError;
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct FakeDevice {
        acked: Option<u64>,
        activated_queues: Vec<usize>,
        resets: u32,
        config: [u8; 8],
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            crate::device_type::BALLOON
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[128, 128, 64]
        }
        fn avail_features(&self) -> u64 {
            0b110
        }
        fn ack_features(&mut self, features: u64) {
            self.acked = Some(features);
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = *self.config.get(offset as usize + i).unwrap_or(&0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(c) = self.config.get_mut(offset as usize + i) {
                    *c = *b;
                }
            }
        }
        fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
            self.activated_queues = a.queues.iter().map(|q| q.index).collect();
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.activated_queues.clear();
        }
    }

    fn setup() -> (Arc<Mutex<FakeDevice>>, MmioTransport) {
        let dev = Arc::new(Mutex::new(FakeDevice::default()));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let t = MmioTransport::new(dev.clone(), mem).unwrap();
        (dev, t)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, base: u64) {
        w(t, 0x30, index);
        w(t, 0x38, 16);
        w(t, 0x80, base as u32);
        w(t, 0x90, (base + 0x100) as u32);
        w(t, 0xa0, (base + 0x200) as u32);
        w(t, 0x44, 1);
    }

    #[test]
    fn identity_registers() {
        let (_, mut t) = setup();
        assert_eq!(r(&mut t, 0x00), 0x7472_6976);
        assert_eq!(r(&mut t, 0x04), 2);
        assert_eq!(r(&mut t, 0x08), 5);
        w(&mut t, 0x14, 0);
        assert_eq!(r(&mut t, 0x10), 0b110);
        w(&mut t, 0x14, 1);
        assert_eq!(r(&mut t, 0x10), 1, "VERSION_1 is bit 32");
        w(&mut t, 0x30, 2);
        assert_eq!(r(&mut t, 0x34), 64);
        w(&mut t, 0x30, 7);
        assert_eq!(r(&mut t, 0x34), 0, "absent queue has max size 0");
    }

    #[test]
    fn full_handshake_activates_ready_queues_only() {
        let (dev, mut t) = setup();
        w(&mut t, 0x70, status::ACKNOWLEDGE);
        w(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, 0x24, 0);
        w(&mut t, 0x20, 0b100);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        w(&mut t, 0x70, s);
        assert_eq!(r(&mut t, 0x70), s, "FEATURES_OK sticks");
        assert_eq!(dev.lock().unwrap().acked, Some((1 << 32) | 0b100));
        setup_queue(&mut t, 0, 0x1000);
        setup_queue(&mut t, 1, 0x2000);
        w(&mut t, 0x70, s | status::DRIVER_OK);
        assert_eq!(dev.lock().unwrap().activated_queues, vec![0, 1]);
        // Queue registers are frozen once live.
        let before = t.counters().bad_queue_setup;
        w(&mut t, 0x30, 0);
        w(&mut t, 0x38, 8);
        assert_eq!(t.counters().bad_queue_setup, before + 1);
        // Reset.
        w(&mut t, 0x70, 0);
        assert_eq!(r(&mut t, 0x70), 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        w(&mut t, 0x30, 0);
        assert_eq!(r(&mut t, 0x44), 0, "reset clears queue ready");
    }

    #[test]
    fn features_without_version_1_or_unknown_are_refused() {
        let (dev, mut t) = setup();
        w(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, 0x24, 0);
        w(&mut t, 0x20, 0b10);
        w(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(
            r(&mut t, 0x70) & status::FEATURES_OK,
            0,
            "legacy driver refused"
        );
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(&mut t, 0x24, 0);
        w(&mut t, 0x20, 0b1000_0010); // bit 7 is not offered
        w(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(
            r(&mut t, 0x70) & status::FEATURES_OK,
            0,
            "unknown feature refused"
        );
        assert_eq!(dev.lock().unwrap().acked, None);
    }

    #[test]
    fn invalid_queue_sets_needs_reset_instead_of_activating() {
        let (dev, mut t) = setup();
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        w(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(&mut t, 0x70, s);
        setup_queue(&mut t, 0, 0xffff_0000); // outside the 1 MiB of guest memory
        w(&mut t, 0x70, s | status::DRIVER_OK);
        assert!(dev.lock().unwrap().activated_queues.is_empty());
        assert_ne!(r(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(t.counters().failed_activations, 1);
        assert_ne!(r(&mut t, 0x60) & INT_CONFIG, 0);
    }

    #[test]
    fn notify_interrupt_and_bad_accesses() {
        let (_, mut t) = setup();
        let fds = t.queue_notify_fds();
        w(&mut t, 0x50, 1);
        assert_eq!(fds[1].read().unwrap(), 1);
        assert!(fds[0].read().is_err(), "other queues not signalled");
        w(&mut t, 0x50, 9);
        assert_eq!(t.counters().bad_accesses, 1);
        t.interrupt().notify_used();
        t.interrupt().notify_config();
        assert_eq!(r(&mut t, 0x60), 3);
        w(&mut t, 0x64, 1);
        assert_eq!(r(&mut t, 0x60), 2);
        let mut b = [0u8; 2];
        t.read(0x00, &mut b);
        assert_eq!(b, [0, 0], "16-bit register read is refused");
        assert_eq!(t.counters().bad_accesses, 2);
        // Config space: writes before DRIVER are refused, reads pass through.
        t.write(0x100, &[9]);
        let mut c = [0u8; 1];
        t.read(0x100, &mut c);
        assert_eq!(c, [0]);
        w(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        t.write(0x100, &[9]);
        t.read(0x100, &mut c);
        assert_eq!(c, [9]);
    }

    /// A driver's read of a 64-bit config field as Linux does it (virtio_cread64 over
    /// virtio-mmio): generation, low half, high half, generation, again until the generation is
    /// stable. `between_halves` runs once, after the first low half. Returns the value and how
    /// many attempts it took.
    fn driver_read_u64(
        t: &mut MmioTransport,
        offset: u64,
        mut between_halves: impl FnMut(),
    ) -> (u64, u32) {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let before = r(t, 0xfc);
            let low = r(t, 0x100 + offset);
            if attempts == 1 {
                between_halves();
            }
            let high = r(t, 0x100 + offset + 4);
            if r(t, 0xfc) == before {
                return ((u64::from(high) << 32) | u64::from(low), attempts);
            }
            assert!(attempts < 10, "the generation never settles");
        }
    }

    fn set_config(dev: &Mutex<FakeDevice>, v: u64) {
        dev.lock().unwrap().config = v.to_le_bytes();
    }

    const OLD: u64 = 0x0000_0001_ffff_ffff;
    const NEW: u64 = 0x0000_0002_0000_0000;

    #[test]
    fn a_signalled_config_change_between_two_halves_is_never_read_torn() {
        let (dev, mut t) = setup();
        set_config(&dev, OLD);
        let irq = t.interrupt();
        // The device updates its config and signals it under its lock, as the devices do.
        let (v, attempts) = driver_read_u64(&mut t, 0, || {
            let mut d = dev.lock().unwrap();
            d.config = NEW.to_le_bytes();
            irq.notify_config();
        });
        assert_eq!(v, NEW, "torn read {v:#x} (old {OLD:#x}, new {NEW:#x})");
        assert_eq!(attempts, 2);
    }

    #[test]
    fn an_unsignalled_config_change_moves_the_generation_too() {
        // Before DRIVER_OK a device has no interrupt to raise, yet the driver reads its config.
        let (dev, mut t) = setup();
        set_config(&dev, OLD);
        let (v, attempts) = driver_read_u64(&mut t, 0, || set_config(&dev, NEW));
        assert_eq!(v, NEW, "torn read {v:#x}");
        assert_eq!(attempts, 2);
    }

    #[test]
    fn a_signalled_change_and_back_moves_the_generation() {
        // The driver may have read a half of the intermediate value: the bytes alone are equal.
        let (dev, mut t) = setup();
        set_config(&dev, OLD);
        let irq = t.interrupt();
        let g = r(&mut t, 0xfc);
        set_config(&dev, NEW);
        irq.notify_config();
        set_config(&dev, OLD);
        irq.notify_config();
        assert_ne!(r(&mut t, 0xfc), g);
    }

    #[test]
    fn the_generation_stays_while_nothing_changes() {
        let (dev, mut t) = setup();
        set_config(&dev, OLD);
        let g = r(&mut t, 0xfc);
        assert_eq!(driver_read_u64(&mut t, 0, || {}), (OLD, 1));
        assert_eq!(r(&mut t, 0xfc), g);
        // A used-ring interrupt is no config change.
        t.interrupt().notify_used();
        assert_eq!(r(&mut t, 0xfc), g);
        set_config(&dev, NEW);
        let g2 = r(&mut t, 0xfc);
        assert_ne!(g2, g);
        assert_eq!(r(&mut t, 0xfc), g2);
    }

    #[test]
    fn status_bits_cannot_be_cleared_except_by_reset() {
        let (_, mut t) = setup();
        w(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, 0x70, status::ACKNOWLEDGE);
        assert_eq!(r(&mut t, 0x70), status::ACKNOWLEDGE | status::DRIVER);
    }
}
