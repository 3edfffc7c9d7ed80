//! A device with a driver in front of it: queues laid out in guest memory, the device
//! activated, one call to send a buffer and read what came back.

use virtio::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::{
    activation, guest_memory, mem_request_bytes, pfn_bytes, BufferArea, Desc, DriverQueue,
    FakeBalloonBackend, FakeMemBackend, TestInterrupt,
};
use crate::backend::{BalloonBackend, PageRange};

/// Guest layout of the rigs: queue `i` at `QUEUE_BASE + i * QUEUE_STRIDE`, buffers from
/// `BUFFER_BASE` to `BUFFER_END`, both inside the first RAM region.
pub const QUEUE_BASE: u64 = 0x1_0000;
/// Distance between two queues' layouts.
pub const QUEUE_STRIDE: u64 = 0x1_0000;
/// First byte of the buffer area.
pub const BUFFER_BASE: u64 = 0x10_0000;
/// End (exclusive) of the buffer area.
pub const BUFFER_END: u64 = 0x20_0000;

/// A balloon with a driver in front of it: every queue laid out in guest memory, the device
/// activated with all offered features accepted.
pub struct BalloonRig {
    /// Guest memory the driver writes queues and buffers into.
    pub mem: GuestMemoryMmap,
    /// The device under test.
    pub dev: crate::balloon::Balloon,
    /// The driver's side of each queue, in index order.
    pub queues: Vec<DriverQueue>,
    /// Counts the device's interrupts.
    pub interrupt: std::sync::Arc<TestInterrupt>,
    /// Where buffers are allocated.
    pub buffers: BufferArea,
}

impl BalloonRig {
    /// Guest RAM: 16 MiB at 0 and 16 MiB at 32 MiB (a hole between), fake backend.
    pub fn new(
        config: crate::balloon::BalloonConfig,
    ) -> (Self, std::sync::Arc<FakeBalloonBackend>) {
        let mem = guest_memory(&[(0, 16 << 20), (32 << 20, 16 << 20)]);
        let backend = std::sync::Arc::new(FakeBalloonBackend::from_memory(&mem));
        let rig = Self::with_backend(mem, config, backend.clone());
        (rig, backend)
    }

    /// A rig over `mem` (which must hold the first 2 MiB) and any backend.
    pub fn with_backend(
        mem: GuestMemoryMmap,
        config: crate::balloon::BalloonConfig,
        backend: std::sync::Arc<dyn BalloonBackend>,
    ) -> Self {
        let dev = crate::balloon::Balloon::new(config, backend).expect("balloon");
        let mut rig = BalloonRig {
            mem,
            dev,
            queues: Vec::new(),
            interrupt: std::sync::Arc::default(),
            buffers: BufferArea::new(BUFFER_BASE, BUFFER_END),
        };
        let features = virtio::VirtioDevice::avail_features(&rig.dev);
        rig.activate(features);
        rig
    }

    /// (Re)activates with `features` accepted, laying the queues out afresh.
    pub fn activate(&mut self, features: u64) {
        use virtio::VirtioDevice;
        let n = crate::balloon::queue_roles(features & self.dev.avail_features()).len();
        let size = self.dev.config().queue_size;
        self.queues = (0..n)
            .map(|i| DriverQueue::new(&self.mem, QUEUE_BASE + i as u64 * QUEUE_STRIDE, size))
            .collect();
        self.dev.ack_features(features);
        let activation = activation(&self.mem, &self.queues, self.interrupt.clone(), features);
        self.dev.activate(activation).expect("activation");
    }

    /// Sends one chain on queue `q`, lets the device process the queue, returns the new used
    /// entries.
    pub fn send(&mut self, q: usize, descs: &[Desc]) -> Vec<(u32, u32)> {
        self.queues[q].add(&self.mem, descs);
        self.dev.process_queue(q);
        self.queues[q].take_used(&self.mem)
    }

    /// A PFN buffer as one readable descriptor.
    pub fn pfn_desc(&mut self, pfns: &[u32]) -> Desc {
        let bytes = pfn_bytes(pfns);
        let addr = self.buffers.put(&self.mem, &bytes);
        Desc::read(addr, bytes.len() as u32)
    }

    /// Inflates `pfns` in one buffer; returns the used entries.
    pub fn inflate(&mut self, pfns: &[u32]) -> Vec<(u32, u32)> {
        let d = self.pfn_desc(pfns);
        self.buffers.reset(BUFFER_BASE);
        self.send(0, &[d])
    }

    /// Deflates `pfns` in one buffer; returns the used entries.
    pub fn deflate(&mut self, pfns: &[u32]) -> Vec<(u32, u32)> {
        let d = self.pfn_desc(pfns);
        self.buffers.reset(BUFFER_BASE);
        self.send(1, &[d])
    }
}

/// A virtio-mem device with a driver in front of it. Guest RAM is 2 MiB at 0 (queue and
/// buffers); the device region lies above it and is not mapped (the device never touches it).
pub struct MemRig {
    /// Guest memory the driver writes the queue and buffers into.
    pub mem: GuestMemoryMmap,
    /// The device under test.
    pub dev: crate::mem::VirtioMem,
    /// The driver's side of the request queue.
    pub queue: DriverQueue,
    /// Counts the device's interrupts.
    pub interrupt: std::sync::Arc<TestInterrupt>,
    /// Where buffers are allocated.
    pub buffers: BufferArea,
}

impl MemRig {
    /// A device over `config`, activated, with the fake backend it plugs into.
    pub fn new(config: crate::mem::MemConfig) -> (Self, std::sync::Arc<FakeMemBackend>) {
        let region = PageRange::new(config.addr >> 12, config.region_size >> 12);
        let backend = std::sync::Arc::new(FakeMemBackend::new(region));
        let dev = crate::mem::VirtioMem::new(config, backend.clone()).expect("virtio-mem");
        let mem = guest_memory(&[(0, 2 << 20)]);
        let mut rig = MemRig {
            queue: DriverQueue::new(&mem, QUEUE_BASE, dev.config().queue_size),
            mem,
            dev,
            interrupt: std::sync::Arc::default(),
            buffers: BufferArea::new(BUFFER_BASE, BUFFER_END),
        };
        rig.activate();
        (rig, backend)
    }

    /// Resets the queue and activates the device again, all offered features accepted.
    pub fn activate(&mut self) {
        use virtio::VirtioDevice;
        let features = self.dev.avail_features();
        self.queue = DriverQueue::new(&self.mem, QUEUE_BASE, self.dev.config().queue_size);
        self.dev.ack_features(features);
        let activation = activation(
            &self.mem,
            std::slice::from_ref(&self.queue),
            self.interrupt.clone(),
            features,
        );
        self.dev.activate(activation).expect("activation");
    }

    /// Sends a raw chain and processes it; returns the used entries.
    pub fn send(&mut self, descs: &[Desc]) -> Vec<(u32, u32)> {
        self.queue.add(&self.mem, descs);
        self.dev.process_queue();
        self.queue.take_used(&self.mem)
    }

    /// Sends a well-formed request; returns `(response type, state)`, or `None` if the device
    /// returned the buffer without a response.
    pub fn request(&mut self, kind: u16, addr: u64, nb_blocks: u16) -> Option<(u16, u16)> {
        self.buffers.reset(BUFFER_BASE);
        let req = mem_request_bytes(kind, addr, nb_blocks);
        let req_at = self.buffers.put(&self.mem, &req);
        let resp_at = self.buffers.put(&self.mem, &[0xffu8; 10]);
        let used = self.send(&[Desc::read(req_at, 24), Desc::write(resp_at, 10)]);
        assert_eq!(used.len(), 1, "one request, one used entry");
        if used[0].1 < 10 {
            return None;
        }
        let mut resp = [0u8; 10];
        self.mem
            .read_slice(&mut resp, GuestAddress(resp_at))
            .expect("response");
        Some((
            u16::from_le_bytes([resp[0], resp[1]]),
            u16::from_le_bytes([resp[8], resp[9]]),
        ))
    }

    /// Reads a u64 config field.
    pub fn config_u64(&self, offset: u64) -> u64 {
        let mut b = [0u8; 8];
        virtio::VirtioDevice::read_config(&self.dev, offset, &mut b);
        u64::from_le_bytes(b)
    }
}
