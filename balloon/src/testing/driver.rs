//! The driver's side of a split virtqueue, written into guest memory byte for byte as a Linux
//! guest would: descriptor tables, avail and used rings, buffers, and the wire formats the
//! devices read (PFN arrays, statistics, virtio-mem requests).

use virtio::{ActiveQueue, GuestMemoryMmap, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Descriptor flags (virtio 1.2 section 2.7.5).
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// The buffer is device-writable.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// The buffer holds a table of indirect descriptors.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// One descriptor of a chain to write.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    /// Guest physical address of the buffer.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (VIRTQ_DESC_F_WRITE).
    pub write: bool,
}

impl Desc {
    /// A device-readable descriptor (the driver's request).
    pub fn read(addr: u64, len: u32) -> Self {
        Desc {
            addr,
            len,
            write: false,
        }
    }
    /// A device-writable descriptor (room for the device's answer).
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
    /// Number of descriptors (a power of two).
    pub size: u16,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the avail ring.
    pub avail_ring: u64,
    /// Guest address of the used ring.
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
    /// Buffers are handed out from `start` up to `end` (exclusive).
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

/// Bytes of a stats buffer with `(tag, value)` entries.
pub fn stats_bytes(entries: &[(u16, u64)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (t, v) in entries {
        b.extend_from_slice(&t.to_le_bytes());
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

/// A virtio-mem request on the wire.
pub fn mem_request_bytes(kind: u16, addr: u64, nb_blocks: u16) -> [u8; 24] {
    let mut r = [0u8; 24];
    r[0..2].copy_from_slice(&kind.to_le_bytes());
    r[8..16].copy_from_slice(&addr.to_le_bytes());
    r[16..18].copy_from_slice(&nb_blocks.to_le_bytes());
    r
}
