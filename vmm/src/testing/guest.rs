//! A simulated guest for the headless VMM: drivers for the balloon and virtio-mem that talk to
//! the real devices through their real virtqueues in guest memory, the way Linux's drivers do,
//! so that the balloon's `actual` and virtio-mem's plugged size move and the memory manager
//! tracks the pages. What it does not do is what no API test needs: interrupts (it polls), free
//! page reporting, and the guest's own use of memory.
//!
//! The balloon takes pages from the top of boot RAM downwards, leaving the first 16 MiB (where
//! its queues and buffers are) alone, in 64-page chunks with 64-page gaps until the gaps are all
//! that is left, so that `GET /vm/memory` has many runs to page through, as it does with a real
//! guest. virtio-mem plugs blocks from the bottom of the region up and unplugs from the top.

use std::sync::{Arc, Mutex, MutexGuard};

use balloon::balloon::{config_offsets as bcfg, queue_roles, QueueRole};
use balloon::mem::{config_offsets as mcfg, request, response};
use balloon::testing::{
    activation, mem_request_bytes, pfn_bytes, stats_bytes, BufferArea, Desc, DriverQueue,
    TestInterrupt,
};
use balloon::{Balloon, StatTag, VirtioMem};
use virtio::{GuestMemoryMmap, VirtioDevice};
use vm_memory::{Bytes, GuestAddress};

/// Linux sends at most this many PFNs per inflate or deflate buffer.
const PFNS_PER_BUFFER: u64 = 256;
/// Blocks per virtio-mem request.
const BLOCKS_PER_REQUEST: u64 = 64;
/// The balloon leaves the first 16 MiB (4096 pages): the guest keeps them, as the rules say.
const FLOOR_PFN: u64 = 4096;
/// Pages of a balloon chunk (and of the gaps between chunks).
const CHUNK: u64 = 64;
/// Where the drivers keep their queues and buffers in guest memory (below `FLOOR_PFN`).
const QUEUES_AT: u64 = 0x10_0000;
const QUEUE_STRIDE: u64 = 0x1_0000;
const BUFFERS_AT: u64 = 0x20_0000;
const BUFFERS_END: u64 = 0x30_0000;
/// The statistics buffer stays with the device between reports: its own place.
const STATS_AT: u64 = 0x30_0000;

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn config_u32(dev: &dyn VirtioDevice, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read_config(offset, &mut b);
    u32::from_le_bytes(b)
}

fn config_u64(dev: &dyn VirtioDevice, offset: u64) -> u64 {
    let mut b = [0u8; 8];
    dev.read_config(offset, &mut b);
    u64::from_le_bytes(b)
}

/// The guest's drivers.
pub struct Guest {
    mem: GuestMemoryMmap,
    balloon: Option<BalloonDriver>,
    virtio_mem: Option<MemDriver>,
    buffers: BufferArea,
    /// Boot RAM as (first PFN, end PFN) pairs, top region first.
    boot_ram: Vec<(u64, u64)>,
    plugged_bytes: u64,
}

struct BalloonDriver {
    dev: Arc<Mutex<Balloon>>,
    roles: Vec<QueueRole>,
    queues: Vec<DriverQueue>,
    /// Pages in the balloon: the first `ballooned` of [`Guest::balloon_pfn`]'s order.
    ballooned: u64,
    /// The statistics buffer is with the device (held until it wants fresh values).
    stats_with_device: bool,
}

struct MemDriver {
    dev: Arc<Mutex<VirtioMem>>,
    queue: DriverQueue,
}

impl Guest {
    /// Probes the devices: negotiates every feature offered and lays out the queues, as Linux
    /// does at boot.
    pub fn probe(
        mem: GuestMemoryMmap,
        boot_ram: &[(u64, u64)],
        balloon: Option<Arc<Mutex<Balloon>>>,
        virtio_mem: Option<Arc<Mutex<VirtioMem>>>,
    ) -> Self {
        let mut next_queue = QUEUES_AT;
        let mut place = |mem: &GuestMemoryMmap, size: u16| {
            let q = DriverQueue::new(mem, next_queue, size);
            next_queue += QUEUE_STRIDE;
            q
        };
        let balloon = balloon.map(|dev| {
            let (roles, queues) = {
                let mut d = lock(&dev);
                let features = d.avail_features();
                let roles = queue_roles(features);
                let queues: Vec<DriverQueue> = roles
                    .iter()
                    .map(|_| place(&mem, d.config().queue_size))
                    .collect();
                d.ack_features(features);
                let interrupt = Arc::new(TestInterrupt::default());
                d.activate(activation(&mem, &queues, interrupt, features))
                    .expect("the balloon takes a driver with every feature it offers");
                (roles, queues)
            };
            BalloonDriver {
                dev,
                roles,
                queues,
                ballooned: 0,
                stats_with_device: false,
            }
        });
        let virtio_mem = virtio_mem.map(|dev| {
            let queue = {
                let mut d = lock(&dev);
                let features = d.avail_features();
                let queue = place(&mem, d.config().queue_size);
                d.ack_features(features);
                let interrupt = Arc::new(TestInterrupt::default());
                d.activate(activation(
                    &mem,
                    std::slice::from_ref(&queue),
                    interrupt,
                    features,
                ))
                .expect("virtio-mem takes a driver with every feature it offers");
                queue
            };
            MemDriver { dev, queue }
        });
        let mut boot_ram: Vec<(u64, u64)> = boot_ram
            .iter()
            .map(|&(addr, size)| ((addr >> 12).max(FLOOR_PFN), (addr + size) >> 12))
            .filter(|(lo, hi)| lo < hi)
            .collect();
        boot_ram.reverse();
        let mut guest = Self {
            mem,
            balloon,
            virtio_mem,
            buffers: BufferArea::new(BUFFERS_AT, BUFFERS_END),
            boot_ram,
            plugged_bytes: 0,
        };
        guest.refill_stats();
        guest
    }

    /// Pages the balloon can take.
    fn usable_pages(&self) -> u64 {
        self.boot_ram.iter().map(|(lo, hi)| hi - lo).sum()
    }

    /// The PFN of the `i`-th page the balloon takes: chunks of 64 pages from the top down,
    /// every other chunk first, then the chunks in between.
    fn balloon_pfn(&self, i: u64) -> u64 {
        let chunks = self.usable_pages() / CHUNK;
        let half = chunks.div_ceil(2);
        let (k, o) = (i / CHUNK, i % CHUNK);
        let chunk = if k < half { 2 * k } else { 2 * (k - half) + 1 };
        let mut j = chunk * CHUNK + o;
        for &(lo, hi) in &self.boot_ram {
            if j < hi - lo {
                return hi - 1 - j;
            }
            j -= hi - lo;
        }
        unreachable!("page {i} of the balloon is beyond boot RAM")
    }

    /// Does what the devices ask, at most `balloon_pages` pages of balloon and `plug_bytes` of
    /// plugging or unplugging. Returns whether anything moved.
    pub fn step(&mut self, mut balloon_pages: u64, mut plug_bytes: u64) -> bool {
        let mut moved = false;
        loop {
            let pages = self.balloon_step(balloon_pages);
            let bytes = self.mem_step(plug_bytes);
            if pages == 0 && bytes == 0 {
                break;
            }
            balloon_pages -= pages;
            plug_bytes -= bytes;
            moved = true;
        }
        self.refill_stats();
        moved
    }

    /// Does everything the devices ask now. Returns whether anything moved.
    pub fn step_all(&mut self) -> bool {
        self.step(u64::MAX, u64::MAX)
    }

    /// One inflate or deflate buffer of at most `budget` pages; returns the pages moved.
    fn balloon_step(&mut self, budget: u64) -> u64 {
        let usable = self.usable_pages();
        let Some(b) = self.balloon.as_ref() else {
            return 0;
        };
        let target = u64::from(config_u32(&*lock(&b.dev), bcfg::NUM_PAGES)).min(usable);
        let have = b.ballooned;
        if target == have || budget == 0 {
            return 0;
        }
        let inflate = target > have;
        let n = target.abs_diff(have).min(budget).min(PFNS_PER_BUFFER);
        let pages: Vec<u32> = if inflate {
            (have..have + n)
                .map(|i| self.balloon_pfn(i) as u32)
                .collect()
        } else {
            (have - n..have)
                .rev()
                .map(|i| self.balloon_pfn(i) as u32)
                .collect()
        };
        self.buffers.reset(BUFFERS_AT);
        let at = self.buffers.put(&self.mem, &pfn_bytes(&pages));
        let role = if inflate {
            QueueRole::Inflate
        } else {
            QueueRole::Deflate
        };
        let b = self.balloon.as_mut().expect("checked above");
        let q = b
            .roles
            .iter()
            .position(|r| *r == role)
            .expect("always present");
        b.queues[q].add(&self.mem, &[Desc::read(at, pages.len() as u32 * 4)]);
        let mut dev = lock(&b.dev);
        dev.process_queue(q);
        let used = b.queues[q].take_used(&self.mem);
        assert_eq!(used.len(), 1, "the balloon returns every buffer");
        b.ballooned = if inflate { have + n } else { have - n };
        dev.write_config(bcfg::ACTUAL, &(b.ballooned as u32).to_le_bytes());
        n
    }

    /// One plug or unplug request of at most `budget` bytes; returns the bytes moved.
    fn mem_step(&mut self, budget: u64) -> u64 {
        let Some(m) = self.virtio_mem.as_mut() else {
            return 0;
        };
        let mut dev = lock(&m.dev);
        let block = config_u64(&*dev, mcfg::BLOCK_SIZE);
        let addr = config_u64(&*dev, mcfg::ADDR);
        let usable = config_u64(&*dev, mcfg::USABLE_REGION_SIZE);
        let plugged = config_u64(&*dev, mcfg::PLUGGED_SIZE);
        let requested = config_u64(&*dev, mcfg::REQUESTED_SIZE).min(usable);
        self.plugged_bytes = plugged;
        if plugged == requested || budget < block {
            return 0;
        }
        let blocks = (plugged.abs_diff(requested) / block)
            .min(budget / block)
            .min(BLOCKS_PER_REQUEST);
        if blocks == 0 {
            return 0;
        }
        let (kind, at) = if plugged < requested {
            (request::PLUG, addr + plugged)
        } else {
            (request::UNPLUG, addr + plugged - blocks * block)
        };
        self.buffers.reset(BUFFERS_AT);
        let req = self
            .buffers
            .put(&self.mem, &mem_request_bytes(kind, at, blocks as u16));
        let resp = self.buffers.put(&self.mem, &[0xffu8; response::SIZE]);
        m.queue.add(
            &self.mem,
            &[
                Desc::read(req, request::SIZE as u32),
                Desc::write(resp, response::SIZE as u32),
            ],
        );
        dev.process_queue();
        m.queue.take_used(&self.mem);
        let mut r = [0u8; 2];
        self.mem
            .read_slice(&mut r, GuestAddress(resp))
            .expect("response buffer");
        let code = u16::from_le_bytes(r);
        assert_eq!(
            code,
            response::ACK,
            "virtio-mem refused a well-formed request {kind} at {at:#x} x{blocks}"
        );
        self.plugged_bytes = config_u64(&*dev, mcfg::PLUGGED_SIZE);
        blocks * block
    }

    /// Gives the device a statistics buffer when it has none (at probe, and each time it
    /// returned the last one to ask for fresh values), with values a small idle guest reports.
    fn refill_stats(&mut self) {
        let usable = self.usable_pages();
        let plugged = self.plugged_bytes;
        let Some(b) = self.balloon.as_mut() else {
            return;
        };
        let Some(q) = b.roles.iter().position(|r| *r == QueueRole::Stats) else {
            return;
        };
        if !b.queues[q].take_used(&self.mem).is_empty() {
            b.stats_with_device = false;
        }
        if b.stats_with_device {
            return;
        }
        let total = ((usable + FLOOR_PFN - b.ballooned) << 12) + plugged;
        let values: Vec<(u16, u64)> = StatTag::ALL
            .iter()
            .map(|&t| {
                let v = match t {
                    StatTag::TotalMemory => total,
                    StatTag::FreeMemory => total / 2,
                    StatTag::AvailableMemory => total / 4 * 3,
                    StatTag::DiskCaches => total / 16,
                    StatTag::MinorFaults => 54321,
                    StatTag::MajorFaults => 120,
                    _ => 0,
                };
                (t as u16, v)
            })
            .collect();
        let bytes = stats_bytes(&values);
        self.mem
            .write_slice(&bytes, GuestAddress(STATS_AT))
            .expect("stats buffer");
        b.queues[q].add(&self.mem, &[Desc::read(STATS_AT, bytes.len() as u32)]);
        lock(&b.dev).process_queue(q);
        b.stats_with_device = true;
    }
}
