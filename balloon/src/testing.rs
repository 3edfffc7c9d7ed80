//! A virtio driver for tests: lays out real split virtqueues (descriptor table, avail ring, used
//! ring) in mmap'd guest memory, writes buffers and descriptors, publishes them, and reads the used
//! ring back — the same bytes a Linux guest would write. Also fake backends that record every call
//! and panic if a device ever passes a range outside guest RAM or in the wrong shape.
//!
//! Used by the unit and integration tests, the fuzz targets and the benchmark.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use virtio::{ActiveQueue, GuestMemoryMmap, Interrupt, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{BackendError, BalloonBackend, MemBackend, Outcome, PageRange};

/// Descriptor flags (virtio 1.2 section 2.7.5).
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// Guest RAM from `(start, size)` pairs.
pub fn guest_memory(ranges: &[(u64, usize)]) -> GuestMemoryMmap {
    let r: Vec<(GuestAddress, usize)> = ranges.iter().map(|&(a, s)| (GuestAddress(a), s)).collect();
    GuestMemoryMmap::from_ranges(&r).expect("test guest memory")
}

/// Counts interrupts and remembers when the last used-buffer interrupt came.
#[derive(Default, Debug)]
pub struct TestInterrupt {
    pub used: AtomicUsize,
    pub config: AtomicUsize,
    pub last_used_at: Mutex<Option<std::time::Instant>>,
}

impl TestInterrupt {
    pub fn used_count(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }
    pub fn config_count(&self) -> usize {
        self.config.load(Ordering::SeqCst)
    }
}

impl Interrupt for TestInterrupt {
    fn notify_used(&self) {
        if let Ok(mut t) = self.last_used_at.lock() {
            *t = Some(std::time::Instant::now());
        }
        self.used.fetch_add(1, Ordering::SeqCst);
    }
    fn notify_config(&self) {
        self.config.fetch_add(1, Ordering::SeqCst);
    }
}

/// One descriptor of a chain to write.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (VIRTQ_DESC_F_WRITE).
    pub write: bool,
}

impl Desc {
    pub fn read(addr: u64, len: u32) -> Self {
        Desc {
            addr,
            len,
            write: false,
        }
    }
    pub fn write(addr: u64, len: u32) -> Self {
        Desc {
            addr,
            len,
            write: true,
        }
    }
}

/// The driver's view of one split virtqueue placed at `base` in guest memory.
#[derive(Debug)]
pub struct DriverQueue {
    pub size: u16,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    /// Bytes a queue of `size` takes from `base` (tables and rings).
    pub fn footprint(size: u16) -> u64 {
        let s = u64::from(size);
        let desc = 16 * s;
        let avail = 6 + 2 * s;
        let used = 6 + 8 * s;
        (desc + avail).next_multiple_of(4) + used
    }

    /// Lays out a queue at `base` (16-byte aligned) and zeroes its rings.
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> Self {
        let s = u64::from(size);
        let desc_table = base;
        let avail_ring = base + 16 * s;
        let used_ring = (avail_ring + 6 + 2 * s).next_multiple_of(4);
        let zeros = vec![0u8; Self::footprint(size) as usize];
        mem.write_slice(&zeros, GuestAddress(base))
            .expect("queue area");
        DriverQueue {
            size,
            desc_table,
            avail_ring,
            used_ring,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// The device's `Queue`, as the transport would hand it over at DRIVER_OK.
    pub fn device_queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue size");
        q.set_size(self.size);
        q.set_desc_table_address(
            Some(self.desc_table as u32),
            Some((self.desc_table >> 32) as u32),
        );
        q.set_avail_ring_address(
            Some(self.avail_ring as u32),
            Some((self.avail_ring >> 32) as u32),
        );
        q.set_used_ring_address(
            Some(self.used_ring as u32),
            Some((self.used_ring >> 32) as u32),
        );
        q.set_ready(true);
        q
    }

    /// An `ActiveQueue` with a fresh notification eventfd.
    pub fn active_queue(&self, index: usize) -> ActiveQueue {
        ActiveQueue {
            index,
            queue: self.device_queue(),
            notify: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        }
    }

    /// Writes descriptor `index` verbatim.
    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = self.desc_table + 16 * u64::from(index % self.size);
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&d, GuestAddress(at))
            .expect("descriptor table");
    }

    /// Writes a chain into free descriptor slots (round robin) and returns its head, without
    /// publishing it.
    pub fn write_chain(&mut self, mem: &GuestMemoryMmap, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            let next = (idx + 1) % self.size;
            let mut flags = if d.write { VIRTQ_DESC_F_WRITE } else { 0 };
            if i + 1 < descs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            self.write_desc(mem, idx, d.addr, d.len, flags, next);
        }
        self.next_desc = (head + descs.len().max(1) as u16) % self.size;
        head
    }

    /// Puts `head` on the avail ring and bumps avail idx.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail_ring + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(slot))
            .expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(mem, self.avail_idx);
    }

    /// Writes avail idx verbatim (to test a driver that lies about it).
    pub fn set_avail_idx(&mut self, mem: &GuestMemoryMmap, idx: u16) {
        self.avail_idx = idx;
        mem.store(
            idx.to_le(),
            GuestAddress(self.avail_ring + 2),
            std::sync::atomic::Ordering::Release,
        )
        .expect("avail idx");
    }

    /// Writes and publishes a chain; returns the head.
    pub fn add(&mut self, mem: &GuestMemoryMmap, descs: &[Desc]) -> u16 {
        let head = self.write_chain(mem, descs);
        self.publish(mem, head);
        head
    }

    /// The used idx the device last wrote.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        u16::from_le(
            mem.read_obj(GuestAddress(self.used_ring + 2))
                .expect("used ring"),
        )
    }

    /// New used-ring entries `(id, len)` since the last call.
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let idx = self.used_idx(mem);
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.used_ring + 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = mem.read_obj(GuestAddress(at)).expect("used elem");
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).expect("used elem");
            out.push((u32::from_le(id), u32::from_le(len)));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// A bump allocator for buffers in a data area of guest memory.
#[derive(Debug)]
pub struct BufferArea {
    next: u64,
    end: u64,
}

impl BufferArea {
    pub fn new(start: u64, end: u64) -> Self {
        BufferArea { next: start, end }
    }

    /// Writes `bytes` to a fresh 16-byte aligned buffer and returns its guest address.
    pub fn put(&mut self, mem: &GuestMemoryMmap, bytes: &[u8]) -> u64 {
        let at = self.alloc(bytes.len() as u64);
        mem.write_slice(bytes, GuestAddress(at))
            .expect("buffer area");
        at
    }

    /// Reserves `len` bytes.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let at = self.next.next_multiple_of(16);
        assert!(at + len <= self.end, "test buffer area exhausted");
        self.next = at + len;
        at
    }

    /// Starts again from `start` (buffers already used by the device may be reused).
    pub fn reset(&mut self, start: u64) {
        self.next = start;
    }
}

/// Little-endian bytes of a PFN array.
pub fn pfn_bytes(pfns: &[u32]) -> Vec<u8> {
    pfns.iter().flat_map(|p| p.to_le_bytes()).collect()
}

/// One call a fake backend received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Inflate(Vec<PageRange>),
    Deflate(Vec<PageRange>),
    ReportFree(Vec<PageRange>),
    DeflateAll,
    Plug(PageRange),
    Unplug(PageRange),
}

fn check_shape(ram: &[PageRange], ranges: &[PageRange]) {
    for w in ranges.windows(2) {
        assert!(
            w[0].end() < w[1].start.0,
            "ranges not sorted/coalesced: {ranges:?}"
        );
    }
    for r in ranges {
        assert!(r.count > 0, "empty range passed: {ranges:?}");
        assert!(
            ram.iter()
                .any(|m| m.start.0 <= r.start.0 && r.end() <= m.end())
                || inside_union(ram, *r),
            "device passed {r} outside guest RAM {ram:?}"
        );
    }
}

fn inside_union(ram: &[PageRange], r: PageRange) -> bool {
    let mut cur = r.start.0;
    while cur < r.end() {
        match ram.iter().find(|m| m.contains(cur)) {
            Some(m) => cur = m.end(),
            None => return false,
        }
    }
    true
}

#[derive(Debug, Default)]
struct FakeBalloonState {
    ballooned: BTreeSet<u64>,
    reported: BTreeSet<u64>,
    calls: Vec<Call>,
    fail_next: bool,
}

/// A [`BalloonBackend`] that keeps ballooned pages in a set, records calls and panics when given
/// ranges outside guest RAM or not sorted and coalesced.
#[derive(Debug)]
pub struct FakeBalloonBackend {
    ram: Vec<PageRange>,
    state: Mutex<FakeBalloonState>,
}

impl FakeBalloonBackend {
    /// `ram`: the guest RAM the device may name.
    pub fn new(ram: Vec<PageRange>) -> Self {
        FakeBalloonBackend {
            ram,
            state: Mutex::default(),
        }
    }
    pub fn from_memory(mem: &GuestMemoryMmap) -> Self {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        Self::new(
            mem.iter()
                .map(|r| PageRange::new(r.start_addr().0 >> 12, r.len() >> 12))
                .collect(),
        )
    }
    fn state(&self) -> std::sync::MutexGuard<'_, FakeBalloonState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub fn ballooned(&self) -> Vec<u64> {
        self.state().ballooned.iter().copied().collect()
    }
    pub fn reported(&self) -> Vec<u64> {
        self.state().reported.iter().copied().collect()
    }
    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }
    /// Makes the next call fail as a host error would.
    pub fn fail_next(&self) {
        self.state().fail_next = true;
    }
    fn apply(
        &self,
        ranges: &[PageRange],
        call: Call,
        f: impl Fn(&mut FakeBalloonState, u64) -> bool,
    ) -> Result<Outcome, BackendError> {
        check_shape(&self.ram, ranges);
        let mut s = self.state();
        s.calls.push(call);
        if std::mem::take(&mut s.fail_next) {
            return Err(BackendError::Manager("injected failure".into()));
        }
        let mut o = Outcome::default();
        for r in ranges {
            for p in r.start.0..r.end() {
                if f(&mut s, p) {
                    o.changed += 1;
                } else {
                    o.unchanged += 1;
                }
            }
        }
        Ok(o)
    }
}

impl BalloonBackend for FakeBalloonBackend {
    fn inflate(&self, ranges: &[PageRange]) -> Result<Outcome, BackendError> {
        self.apply(ranges, Call::Inflate(ranges.to_vec()), |s, p| {
            s.ballooned.insert(p)
        })
    }
    fn deflate(&self, ranges: &[PageRange]) -> Result<Outcome, BackendError> {
        self.apply(ranges, Call::Deflate(ranges.to_vec()), |s, p| {
            s.ballooned.remove(&p)
        })
    }
    fn report_free(&self, ranges: &[PageRange]) -> Result<Outcome, BackendError> {
        self.apply(ranges, Call::ReportFree(ranges.to_vec()), |s, p| {
            !s.ballooned.contains(&p) && {
                s.reported.insert(p);
                true
            }
        })
    }
    fn deflate_all(&self) -> Result<Outcome, BackendError> {
        let mut s = self.state();
        s.calls.push(Call::DeflateAll);
        let n = s.ballooned.len() as u64;
        s.ballooned.clear();
        Ok(Outcome {
            changed: n,
            ..Outcome::default()
        })
    }
}

#[derive(Debug, Default)]
struct FakeMemState {
    plugged: BTreeSet<u64>,
    calls: Vec<Call>,
    fail_next: bool,
}

/// A [`MemBackend`] over a region that records calls, tracks plugged pages, and panics if a
/// device plugs what is plugged, unplugs what is not, or leaves the region.
#[derive(Debug)]
pub struct FakeMemBackend {
    region: PageRange,
    state: Mutex<FakeMemState>,
}

impl FakeMemBackend {
    pub fn new(region: PageRange) -> Self {
        FakeMemBackend {
            region,
            state: Mutex::default(),
        }
    }
    fn state(&self) -> std::sync::MutexGuard<'_, FakeMemState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub fn plugged_pages(&self) -> u64 {
        self.state().plugged.len() as u64
    }
    pub fn is_plugged(&self, pfn: u64) -> bool {
        self.state().plugged.contains(&pfn)
    }
    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }
    pub fn fail_next(&self) {
        self.state().fail_next = true;
    }
    fn check(&self, range: PageRange) {
        assert!(range.count > 0, "empty range");
        assert!(
            self.region.start.0 <= range.start.0 && range.end() <= self.region.end(),
            "device passed {range} outside its region {}",
            self.region
        );
    }
}

impl MemBackend for FakeMemBackend {
    fn plug(&self, range: PageRange) -> Result<(), BackendError> {
        self.check(range);
        let mut s = self.state();
        s.calls.push(Call::Plug(range));
        if std::mem::take(&mut s.fail_next) {
            return Err(BackendError::Manager("injected failure".into()));
        }
        for p in range.start.0..range.end() {
            assert!(s.plugged.insert(p), "page {p:#x} plugged twice");
        }
        Ok(())
    }
    fn unplug(&self, range: PageRange) -> Result<(), BackendError> {
        self.check(range);
        let mut s = self.state();
        s.calls.push(Call::Unplug(range));
        if std::mem::take(&mut s.fail_next) {
            return Err(BackendError::Manager("injected failure".into()));
        }
        for p in range.start.0..range.end() {
            assert!(
                s.plugged.remove(&p),
                "page {p:#x} unplugged while not plugged"
            );
        }
        Ok(())
    }
}

/// Guest layout of the rigs: queue `i` at `QUEUE_BASE + i * QUEUE_STRIDE`, buffers from
/// `BUFFER_BASE` to `BUFFER_END`, both inside the first RAM region.
pub const QUEUE_BASE: u64 = 0x1_0000;
pub const QUEUE_STRIDE: u64 = 0x1_0000;
pub const BUFFER_BASE: u64 = 0x10_0000;
pub const BUFFER_END: u64 = 0x20_0000;

/// A balloon with a driver in front of it: every queue laid out in guest memory, the device
/// activated with all offered features accepted.
pub struct BalloonRig {
    pub mem: GuestMemoryMmap,
    pub dev: crate::balloon::Balloon,
    pub queues: Vec<DriverQueue>,
    pub interrupt: std::sync::Arc<TestInterrupt>,
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

/// Bytes of a stats buffer with `(tag, value)` entries.
pub fn stats_bytes(entries: &[(u16, u64)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (t, v) in entries {
        b.extend_from_slice(&t.to_le_bytes());
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

/// A virtio-mem device with a driver in front of it. Guest RAM is 2 MiB at 0 (queue and
/// buffers); the device region lies above it and is not mapped (the device never touches it).
pub struct MemRig {
    pub mem: GuestMemoryMmap,
    pub dev: crate::mem::VirtioMem,
    pub queue: DriverQueue,
    pub interrupt: std::sync::Arc<TestInterrupt>,
    pub buffers: BufferArea,
}

impl MemRig {
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

/// A virtio-mem request on the wire.
pub fn mem_request_bytes(kind: u16, addr: u64, nb_blocks: u16) -> [u8; 24] {
    let mut r = [0u8; 24];
    r[0..2].copy_from_slice(&kind.to_le_bytes());
    r[8..16].copy_from_slice(&addr.to_le_bytes());
    r[16..18].copy_from_slice(&nb_blocks.to_le_bytes());
    r
}

/// Fuzz harnesses: each turns arbitrary bytes into a guest that writes descriptor tables, avail
/// rings and buffer contents at will into a small mmap'd guest memory, notifies, resets and
/// reconfigures, and checks the device's invariants after every step. Shared by the cargo-fuzz
/// targets in `balloon/fuzz` and the proptest runs in `tests/fuzz_proptest.rs`.
pub mod fuzz {
    use std::sync::Arc;

    use virtio::VirtioDevice;

    use super::*;
    use crate::balloon::{queue_roles, Balloon, BalloonConfig};
    use crate::mem::{MemConfig, VirtioMem};

    /// Reads the input; zero once exhausted.
    struct Input<'a> {
        data: &'a [u8],
    }

    impl Input<'_> {
        fn done(&self) -> bool {
            self.data.is_empty()
        }
        fn u8(&mut self) -> u8 {
            match self.data.split_first() {
                Some((b, rest)) => {
                    self.data = rest;
                    *b
                }
                None => 0,
            }
        }
        fn u16(&mut self) -> u16 {
            u16::from_le_bytes([self.u8(), self.u8()])
        }
        fn u32(&mut self) -> u32 {
            u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
        }
        fn u64(&mut self) -> u64 {
            u64::from(self.u32()) | (u64::from(self.u32()) << 32)
        }
        fn bytes(&mut self, n: usize) -> &[u8] {
            let n = n.min(self.data.len());
            let (a, b) = self.data.split_at(n);
            self.data = b;
            a
        }
    }

    const QSIZE: u16 = 8;
    const RAM_LO: usize = 64 << 10;
    const RAM_HI_START: u64 = 128 << 10;
    const DATA: u64 = 0x8000;

    fn small_memory() -> GuestMemoryMmap {
        guest_memory(&[(0, RAM_LO), (RAM_HI_START, 64 << 10)])
    }

    /// A guest address: mostly inside the data area, sometimes anywhere.
    fn addr(inp: &mut Input) -> u64 {
        match inp.u8() % 4 {
            0 => inp.u64(),
            1 => RAM_HI_START + u64::from(inp.u16()),
            _ => DATA + u64::from(inp.u16() % 0x8000),
        }
    }

    fn write_desc(inp: &mut Input, mem: &GuestMemoryMmap, q: &DriverQueue) {
        let idx = u16::from(inp.u8()) % QSIZE;
        let a = addr(inp);
        let len = if inp.u8() & 7 == 0 {
            inp.u32()
        } else {
            u32::from(inp.u16() % 1200)
        };
        let flags = u16::from(inp.u8() & 7);
        let next = u16::from(inp.u8() % (QSIZE as u8 + 2));
        q.write_desc(mem, idx, a, len, flags, next);
    }

    fn write_data(inp: &mut Input, mem: &GuestMemoryMmap) {
        let at = DATA + u64::from(inp.u16() % 0x7c00);
        if inp.u8() & 1 == 0 {
            // Small PFNs: in RAM, in the hole, past the end.
            let n = usize::from(inp.u8() % 64);
            let pfns: Vec<u32> = (0..n).map(|_| u32::from(inp.u8() % 64)).collect();
            let _ = mem.write_slice(&pfn_bytes(&pfns), GuestAddress(at));
        } else {
            let n = usize::from(inp.u8());
            let b = inp.bytes(n).to_vec();
            let _ = mem.write_slice(&b, GuestAddress(at));
        }
    }

    /// Drives a balloon's queues with arbitrary descriptors and contents.
    pub fn balloon_queues(data: &[u8]) {
        let mut inp = Input { data };
        let mem = small_memory();
        let backend = Arc::new(FakeBalloonBackend::from_memory(&mem));
        let cfg = inp.u8();
        let config = BalloonConfig {
            stats: cfg & 1 != 0,
            free_page_reporting: cfg & 2 != 0,
            deflate_on_oom: cfg & 4 != 0,
            stats_interval: std::time::Duration::ZERO,
            queue_size: QSIZE,
            ..BalloonConfig::default()
        };
        let mut dev = Balloon::new(config, backend.clone()).expect("balloon");
        let interrupt = Arc::new(TestInterrupt::default());
        let mut queues: Vec<DriverQueue> = Vec::new();
        let activate = |dev: &mut Balloon, inp: &mut Input, queues: &mut Vec<DriverQueue>| {
            let accepted = dev.avail_features() & (u64::from(inp.u8()) | (1 << 32));
            let n = queue_roles(accepted).len();
            *queues = (0..n)
                .map(|i| DriverQueue::new(&mem, 0x1000 * (i as u64 + 1), QSIZE))
                .collect();
            dev.ack_features(accepted);
            let _ = dev.activate(activation(&mem, queues, interrupt.clone(), accepted));
        };
        activate(&mut dev, &mut inp, &mut queues);
        while !inp.done() {
            let op = inp.u8();
            let qi = usize::from(inp.u8()) % queues.len().max(1);
            match op % 8 {
                0 | 1 => write_desc(&mut inp, &mem, &queues[qi]),
                2 => write_data(&mut inp, &mem),
                3 => {
                    let head = u16::from(inp.u8() % (QSIZE as u8 + 2));
                    queues[qi].publish(&mem, head);
                    dev.process_queue(qi);
                }
                4 => {
                    let idx = inp.u16();
                    queues[qi].set_avail_idx(&mem, idx);
                    dev.process_queue(qi);
                }
                5 => {
                    dev.request_stats();
                }
                6 => match inp.u8() % 3 {
                    0 => {
                        let off = u64::from(inp.u8() % 24);
                        let n = usize::from(inp.u8() % 9);
                        let b = inp.bytes(n).to_vec();
                        dev.write_config(off, &b);
                    }
                    1 => {
                        let _ = dev.set_target_mib(u64::from(inp.u8()));
                    }
                    _ => {
                        let mut b = [0u8; 8];
                        dev.read_config(u64::from(inp.u8()), &mut b);
                    }
                },
                _ => {
                    dev.reset();
                    activate(&mut dev, &mut inp, &mut queues);
                }
            }
            assert_eq!(
                dev.ballooned_bytes(),
                backend.ballooned().len() as u64 * 4096,
                "device and backend disagree on ballooned pages"
            );
        }
    }

    /// Drives a virtio-mem request queue with arbitrary descriptors and requests.
    pub fn mem_queue(data: &[u8]) {
        let mut inp = Input { data };
        let mem = small_memory();
        let bs = 4096u64 << (inp.u8() % 11); // 4 KiB .. 4 MiB
        let region_addr = 1u64 << 30;
        let region_size = 64 << 20;
        let config = MemConfig {
            block_size: bs,
            requested_size: (u64::from(inp.u8()) * bs).min(region_size),
            queue_size: QSIZE,
            ..MemConfig::new(region_addr, region_size)
        };
        let backend = Arc::new(FakeMemBackend::new(PageRange::new(
            region_addr >> 12,
            region_size >> 12,
        )));
        let mut dev = VirtioMem::new(config, backend.clone()).expect("virtio-mem");
        let interrupt = Arc::new(TestInterrupt::default());
        let mut q = DriverQueue::new(&mem, 0x1000, QSIZE);
        let activate = |dev: &mut VirtioMem, q: &mut DriverQueue| {
            *q = DriverQueue::new(&mem, 0x1000, QSIZE);
            let f = dev.avail_features();
            dev.ack_features(f);
            let _ = dev.activate(activation(
                &mem,
                std::slice::from_ref(q),
                interrupt.clone(),
                f,
            ));
        };
        activate(&mut dev, &mut q);
        while !inp.done() {
            match inp.u8() % 8 {
                0 => write_desc(&mut inp, &mem, &q),
                1 => write_data(&mut inp, &mem),
                2 | 3 => {
                    // A well-shaped request with fuzzed fields, then a response buffer.
                    let kind = u16::from(inp.u8() % 5);
                    let a = match inp.u8() % 4 {
                        0 => inp.u64(),
                        _ => region_addr
                            .wrapping_add(u64::from(inp.u16()).wrapping_mul(bs / 2))
                            .wrapping_sub(bs),
                    };
                    let nb = if inp.u8() & 7 == 0 {
                        inp.u16()
                    } else {
                        u16::from(inp.u8() % 40)
                    };
                    let at = DATA + u64::from(inp.u16() % 0x7000);
                    let _ = mem.write_slice(&mem_request_bytes(kind, a, nb), GuestAddress(at));
                    let resp_len = if inp.u8() & 7 == 0 {
                        u32::from(inp.u8() % 16)
                    } else {
                        10
                    };
                    q.add(
                        &mem,
                        &[Desc::read(at, 24), Desc::write(at + 0x100, resp_len)],
                    );
                    dev.process_queue();
                }
                4 => {
                    let head = u16::from(inp.u8() % (QSIZE as u8 + 2));
                    q.publish(&mem, head);
                    dev.process_queue();
                }
                5 => {
                    let idx = inp.u16();
                    q.set_avail_idx(&mem, idx);
                    dev.process_queue();
                }
                6 => {
                    let _ = dev.set_requested_size(u64::from(inp.u8()) * bs);
                    let b = inp.bytes(2).to_vec();
                    dev.write_config(u64::from(inp.u8()), &b);
                }
                _ => {
                    if inp.u8() & 1 == 0 {
                        dev.reset();
                    } else {
                        let _ = dev.system_reset();
                    }
                    activate(&mut dev, &mut q);
                }
            }
            let s = dev.state();
            assert_eq!(
                s.plugged_size,
                backend.plugged_pages() * 4096,
                "device and backend disagree"
            );
            assert!(s.usable_region_size <= s.region_size);
            assert_eq!(s.usable_region_size % bs, 0);
            if let Some(last) = dev.plugged_ranges().last() {
                assert!(
                    last.end() << 12 <= region_addr + s.usable_region_size,
                    "plugged past usable"
                );
            }
        }
    }
}

/// A [`memory::SlotMapper`] for a memory manager with no hypervisor behind it (tests, the
/// benchmark, examples): every map and unmap succeeds and does nothing.
pub struct NoSlots;

impl memory::SlotMapper for NoSlots {
    fn map(&mut self, _: u32, _: u64, _: u64, _: *mut u8) -> Result<(), String> {
        Ok(())
    }
    fn unmap(&mut self, _: u32, _: u64, _: u64) -> Result<(), String> {
        Ok(())
    }
}

/// What a driver hands the device once it has laid out `queues`: queue `i` of the slice is the
/// device's queue `i`, each with a fresh notification eventfd.
pub fn activation(
    mem: &GuestMemoryMmap,
    queues: &[DriverQueue],
    interrupt: std::sync::Arc<TestInterrupt>,
    acked_features: u64,
) -> virtio::Activation {
    virtio::Activation {
        mem: mem.clone(),
        queues: queues
            .iter()
            .enumerate()
            .map(|(i, q)| q.active_queue(i))
            .collect(),
        interrupt,
        acked_features,
    }
}

/// Guest RAM as the VMM makes it, without a hypervisor: one boot region of `size` bytes at guest
/// address 0 on `backing`, behind a memory manager with discard `policy`.
pub fn boot_ram_manager(
    size: u64,
    backing: memory::Backing,
    policy: memory::DiscardPolicy,
) -> memory::MemoryManager {
    let spec = memory::RegionSpec {
        guest_addr: 0,
        size,
        backing,
        kind: memory::RegionKind::BootRam,
    };
    let mut mm = memory::MemoryManager::new(&[spec], Box::new(NoSlots)).expect("manager");
    mm.set_discard_policy(policy).expect("policy");
    mm
}
