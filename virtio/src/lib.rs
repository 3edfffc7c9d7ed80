//! The contract between a virtio device and the VMM's virtio-mmio transport.
//!
//! `vmm` owns the transport (registers, queue setup, interrupts, ioeventfds); the device crates
//! (`balloon`) own the device logic. Both depend on this crate and on nothing of each other, which
//! keeps calls one way: `vmm -> {balloon, memory}`, `balloon -> memory` (docs/architecture.md,
//! "Crates, and who calls whom").
//!
//! Life of a device, as the transport drives it (virtio 1.2 section 3.1):
//! 1. The driver reads [`VirtioDevice::avail_features`] and writes the features it accepts; at
//!    FEATURES_OK the transport calls [`VirtioDevice::ack_features`].
//! 2. The driver sets up queues. Only queues the driver marked ready are handed over.
//! 3. At DRIVER_OK the transport calls [`VirtioDevice::activate`] with guest memory, the ready queues
//!    and their notification eventfds, and the [`Interrupt`] to signal the guest with.
//! 4. A write of 0 to the status register resets: [`VirtioDevice::reset`].
//!
//! Devices run their queue processing on the VMM's event loop (event-manager). Activation happens
//! on a vCPU thread, so a device typically records the activation and wakes its own event-loop
//! subscriber with [`ActivationEvent`] to register the queue eventfds from there.

pub mod mmio;

use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use virtio_queue::{Queue, QueueT};

/// Guest memory as the devices see it: every RAM region of the guest, hot-add regions included.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Feature bit shared by all modern devices (virtio 1.2 section 6).
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Device status bits (virtio 1.2 section 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready: the device may serve its queues.
    pub const DRIVER_OK: u32 = 4;
    /// The driver accepted the features.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from until a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// Device IDs (virtio 1.2 section 5).
pub mod device_type {
    /// virtio-balloon.
    pub const BALLOON: u32 = 5;
    /// virtio-mem.
    pub const MEM: u32 = 24;
}

/// How a device tells the guest that something happened.
pub trait Interrupt: Send + Sync {
    /// Buffers were returned on a used ring.
    fn notify_used(&self);
    /// The device configuration space changed.
    fn notify_config(&self);
}

/// One queue the driver made ready, handed to the device at activation.
pub struct ActiveQueue {
    /// Queue index as the driver numbered it (QueueSel).
    pub index: usize,
    /// The queue as the driver configured it.
    pub queue: Queue,
    /// Signalled when the driver notifies this queue (by KVM ioeventfd, or the transport itself).
    pub notify: EventFd,
}

/// Everything a device needs to start serving its queues.
pub struct Activation {
    /// Guest memory the queues and buffers live in.
    pub mem: GuestMemoryMmap,
    /// The queues the driver made ready.
    pub queues: Vec<ActiveQueue>,
    /// How the device interrupts the guest.
    pub interrupt: Arc<dyn Interrupt>,
    /// Features the driver accepted (already intersected with the device's offer).
    pub acked_features: u64,
}

/// Why a device refused to start; the transport sets DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// A queue the device cannot work without was not made ready.
    #[error("queue {index} is required but the driver did not make it ready")]
    MissingQueue {
        /// The queue's index.
        index: usize,
    },
    /// A queue's rings lie outside guest memory.
    #[error("queue {index} is not valid in guest memory")]
    InvalidQueue {
        /// The queue's index.
        index: usize,
    },
    /// Anything else, with its reason.
    #[error("device could not start: {0}")]
    Other(String),
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// Device ID (virtio 1.2 section 5), e.g. [`device_type::BALLOON`].
    fn device_type(&self) -> u32;
    /// Maximum size of every queue the device can have, in queue-index order for the largest
    /// feature set it offers. The driver may make fewer ready.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers, VERSION_1 included.
    fn avail_features(&self) -> u64;
    /// The driver accepted `features` (a subset of the offer) and set FEATURES_OK.
    fn ack_features(&mut self, features: u64);
    /// Read from the device configuration space. Out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write to the device configuration space. Writes to read-only fields are the device's to
    /// count and refuse.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start serving.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// The driver reset the device: drop queues, return to the pre-negotiation state.
    fn reset(&mut self);
}

/// An eventfd a device registers with the event loop at start-up, so that an activation that
/// happened on a vCPU thread can be finished on the event-loop thread (where queue eventfds can be
/// added to the epoll set).
pub struct ActivationEvent(EventFd);

impl ActivationEvent {
    /// A fresh, unsignalled event.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self(EventFd::new(EFD_NONBLOCK)?))
    }
    /// Wake the event loop (called from `activate`).
    pub fn trigger(&self) {
        if let Err(e) = self.0.write(1) {
            log::error!("cannot signal device activation: {e}");
        }
    }
    /// Consume the wake-up (called from the subscriber's `process`).
    pub fn consume(&self) {
        let _ = self.0.read();
    }
    /// The eventfd, for the subscriber's `init` to register.
    pub fn fd(&self) -> &EventFd {
        &self.0
    }
    /// Adds the event to the event loop with `data` (from the subscriber's `init`); a failure is
    /// logged, naming `device`.
    pub fn watch(&self, ops: &mut EventOps, data: u32, device: &str) {
        if let Err(e) = ops.add(Events::with_data(&self.0, data, EventSet::IN)) {
            log::error!("{device}: cannot watch the activation event: {e:?}");
        }
    }
}

/// The queue eventfds of a device on the event loop, kept in line with its activations: removes
/// the eventfds of earlier activations (`stale`, drained), then adds the current activation's
/// `queues` (eventfd and event data) once, recording it in `registered`. `current` is `None`
/// while the device is not active. Called from the subscriber's `init` and on its activation
/// event (activation itself happens on a vCPU thread, where the loop cannot be changed).
/// Failures are logged, naming `device`.
pub fn sync_queue_events<'a>(
    ops: &mut EventOps,
    device: &str,
    stale: &mut Vec<EventFd>,
    current: Option<(&mut bool, impl IntoIterator<Item = (&'a EventFd, u32)>)>,
) {
    for fd in stale.drain(..) {
        // It may never have been added (reset before the loop ran): nothing to undo then.
        let _ = ops.remove(Events::empty(&fd));
    }
    let Some((registered, queues)) = current else {
        return;
    };
    if *registered {
        return;
    }
    for (fd, data) in queues {
        if let Err(e) = ops.add(Events::with_data(fd, data, EventSet::IN)) {
            log::error!("{device}: cannot watch a queue eventfd (event data {data}): {e:?}");
        }
    }
    *registered = true;
}
