//! The virtio-mem device: block states, the request rules, config space and control API.
//!
//! Request rules (virtio 1.2 section 5.15.6), checked in this order:
//! - ERROR: `nb_blocks` is 0, `addr` is not block aligned, the range is not inside the usable
//!   region, or (PLUG/UNPLUG) a block of the range is already in the asked state;
//! - NACK: a PLUG would take `plugged_size` past `requested_size`;
//! - BUSY: the host could not change its memory (backend failure); the driver retries;
//! - ACK otherwise; STATE answers PLUGGED / UNPLUGGED / MIXED.
//!
//! usable_region_size grows to cover `requested_size` in whole Linux memory blocks (Linux only
//! adds memory blocks lying fully inside the usable region) and shrinks only on UNPLUG_ALL or a
//! device reset, never below what is plugged.
//!
//! Which blocks are plugged is not kept here: the backend (the memory manager's tracker) is the
//! one record, asked through [`MemBackend::plugged_runs`].

use std::sync::Arc;

use log::{error, info, warn};
use virtio::{device_type, ActivateError, Activation, GuestMemoryMmap, Interrupt, VirtioDevice};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::{
    check_requested, config_offsets, features, request, response, MemConfig, MemCounters, MemError,
    MemFault, MemState, FAULT_KINDS, LINUX_MEMORY_BLOCK_SIZE,
};
use crate::backend::{MemBackend, PageRange, PAGE_SHIFT};
use crate::ratelimit::{FaultLog, RateLimitedLog};

const MAX_CHAINS_PER_EVENT: usize = 1024;

pub(crate) struct MemActive {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) interrupt: Arc<dyn Interrupt>,
    pub(crate) queue: Queue,
    pub(crate) notify: EventFd,
    pub(crate) registered: bool,
}

/// A parsed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Request {
    kind: u16,
    addr: u64,
    nb_blocks: u16,
}

/// The virtio-mem device. Share it as `Arc<Mutex<VirtioMem>>` like the balloon.
pub struct VirtioMem {
    config: MemConfig,
    avail_features: u64,
    acked_features: u64,
    queue_sizes: [u16; 1],
    usable_region_size: u64,
    requested_size: u64,
    backend: Arc<dyn MemBackend>,
    pub(crate) activation_evt: virtio::ActivationEvent,
    pub(crate) active: Option<MemActive>,
    pub(crate) stale_fds: Vec<EventFd>,
    counters: MemCounters,
    faults: FaultLog<FAULT_KINDS>,
    backend_log: RateLimitedLog,
    /// Written when `plugged_size` changes, for a VMM that waits for the guest to (un)plug.
    plugged_changed: Option<EventFd>,
}

impl VirtioMem {
    /// A device over `config`'s region, (un)plugging through `backend`. All blocks start
    /// unplugged (the VMM registers the region born offline in the tracker).
    pub fn new(config: MemConfig, backend: Arc<dyn MemBackend>) -> Result<Self, MemError> {
        config.validate()?;
        let mut avail_features = 1u64 << features::VERSION_1;
        if config.unplugged_inaccessible {
            avail_features |= 1 << features::UNPLUGGED_INACCESSIBLE;
        }
        let mut dev = VirtioMem {
            queue_sizes: [config.queue_size],
            avail_features,
            acked_features: 0,
            usable_region_size: 0,
            requested_size: config.requested_size,
            backend,
            activation_evt: virtio::ActivationEvent::new()
                .map_err(|e| MemError::Io(e.to_string()))?,
            active: None,
            stale_fds: Vec::new(),
            counters: MemCounters::default(),
            faults: FaultLog::new("virtio-mem"),
            backend_log: RateLimitedLog::default(),
            plugged_changed: None,
            config,
        };
        dev.usable_region_size = dev.usable_for(dev.requested_size);
        Ok(dev)
    }

    // ---- Control API ----

    /// Asks the guest to have `bytes` plugged (a multiple of the block size, at most the region
    /// size). Grows the usable region if needed and raises a config-change interrupt.
    pub fn set_requested_size(&mut self, bytes: u64) -> Result<(), MemError> {
        check_requested(bytes, self.config.region_size, self.config.block_size)?;
        let old = (self.requested_size, self.usable_region_size);
        self.requested_size = bytes;
        self.usable_region_size = self.usable_region_size.max(self.usable_for(bytes));
        if old != (self.requested_size, self.usable_region_size) {
            self.config_changed();
        }
        Ok(())
    }

    /// The sizes the config space shows.
    pub fn state(&self) -> MemState {
        MemState {
            addr: self.config.addr,
            region_size: self.config.region_size,
            block_size: self.config.block_size,
            usable_region_size: self.usable_region_size,
            plugged_size: self.plugged_size(),
            requested_size: self.requested_size,
        }
    }

    /// From now on, `fd` is written whenever `plugged_size` changes (guest plug or unplug
    /// requests, a system reset): the VMM can wait for the guest to follow a new requested
    /// size without polling.
    pub fn notify_plugged_changes(&mut self, fd: EventFd) {
        self.plugged_changed = Some(fd);
    }

    fn plugged_size_may_have_changed(&self, before: u64) {
        if self.plugged_size() != before {
            if let Some(fd) = &self.plugged_changed {
                let _ = fd.write(1);
            }
        }
    }

    /// Plugged bytes, as the backend records them.
    pub fn plugged_size(&self) -> u64 {
        self.plugged_ranges().iter().map(|r| r.bytes()).sum()
    }

    /// The size the host asks the guest to plug, in bytes (config field `requested_size`).
    pub fn requested_size(&self) -> u64 {
        self.requested_size
    }

    /// How much of the region the guest may plug into, in bytes (config `usable_region_size`).
    pub fn usable_region_size(&self) -> u64 {
        self.usable_region_size
    }

    /// Plugged memory as coalesced page ranges.
    pub fn plugged_ranges(&self) -> Vec<PageRange> {
        let all = self.config.region_size / self.config.block_size;
        self.backend.plugged_runs(self.block_range(0, all))
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> MemCounters {
        self.counters
    }

    /// The configuration the device was created with (later requested sizes are not in it).
    pub fn config(&self) -> &MemConfig {
        &self.config
    }

    /// Features the driver accepted; zero before it negotiated.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether the driver has started the device (DRIVER_OK) and not reset it since.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    // ---- Queue processing ----

    /// Handles every available request. Returns how many buffers went back to the guest.
    pub fn process_queue(&mut self) -> usize {
        let Some(mut active) = self.active.take() else {
            return 0;
        };
        let usable_before = self.usable_region_size;
        let plugged_before = self.plugged_size();
        let mut returned = 0;
        for handled in 0.. {
            if handled == MAX_CHAINS_PER_EVENT {
                let _ = active.notify.write(1);
                break;
            }
            let chain = match active.queue.iter(&active.mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    self.note(MemFault::BadChain(format!("avail ring: {e}")));
                    None
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let len = self.handle_chain(&active.mem, chain);
            match active.queue.add_used(&active.mem, head, len) {
                Ok(()) => returned += 1,
                Err(e) => self.note(MemFault::BadChain(format!("used ring: {e}"))),
            }
        }
        if returned > 0 {
            active.interrupt.notify_used();
        }
        // UNPLUG_ALL may have shrunk the usable region: tell the driver.
        self.active = Some(active);
        if self.usable_region_size != usable_before {
            self.config_changed();
        }
        self.plugged_size_may_have_changed(plugged_before);
        returned
    }

    /// Reads the request, executes it, writes the response. Returns the used length.
    fn handle_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        let mut req = [0u8; request::SIZE];
        let mut have = 0usize;
        let mut resp_at: Option<GuestAddress> = None;
        for desc in chain {
            if desc.is_write_only() {
                if resp_at.is_none() && desc.len() as usize >= response::SIZE {
                    resp_at = Some(desc.addr());
                }
                continue;
            }
            if resp_at.is_some() {
                // A readable descriptor after a writable one is against the spec; ignore it.
                self.note(MemFault::BadChain(
                    "readable descriptor after the response".into(),
                ));
                continue;
            }
            let take = (desc.len() as usize).min(request::SIZE - have);
            if take > 0 {
                if mem
                    .read_slice(&mut req[have..have + take], desc.addr())
                    .is_err()
                {
                    self.note(MemFault::BadChain(format!(
                        "request at {:#x} (len {}) is not in guest memory",
                        desc.addr().0,
                        desc.len()
                    )));
                    continue;
                }
                have += take;
            }
        }
        let Some(resp_at) = resp_at else {
            self.note(MemFault::BadChain(format!(
                "no device-writable descriptor of at least {} bytes for the response",
                response::SIZE
            )));
            return 0;
        };
        if !GuestMemoryBackend::check_range(mem, resp_at, response::SIZE) {
            self.note(MemFault::BadChain(format!(
                "response at {:#x} is not in guest memory",
                resp_at.0
            )));
            return 0;
        }
        let (kind, state) = if have < request::SIZE {
            self.note(MemFault::BadChain(format!(
                "request of {have} bytes, expected {}",
                request::SIZE
            )));
            (response::ERROR, 0)
        } else {
            let r = Request {
                kind: u16::from_le_bytes([req[0], req[1]]),
                addr: u64::from_le_bytes(req[8..16].try_into().unwrap_or_default()),
                nb_blocks: u16::from_le_bytes([req[16], req[17]]),
            };
            self.execute(r)
        };
        match kind {
            response::ACK => self.counters.acks += 1,
            response::NACK => self.counters.nacks += 1,
            response::BUSY => self.counters.busy += 1,
            _ => self.counters.errors += 1,
        }
        let mut resp = [0u8; response::SIZE];
        resp[0..2].copy_from_slice(&kind.to_le_bytes());
        resp[8..10].copy_from_slice(&state.to_le_bytes());
        if mem.write_slice(&resp, resp_at).is_err() {
            self.note(MemFault::BadChain(format!(
                "response at {:#x} is not in guest memory",
                resp_at.0
            )));
            return 0;
        }
        response::SIZE as u32
    }

    /// Applies one request; returns (response type, state).
    fn execute(&mut self, r: Request) -> (u16, u16) {
        match r.kind {
            request::PLUG => {
                self.counters.plug_requests += 1;
                let (first, n) = match self.check_range(r) {
                    Ok(b) => b,
                    Err(reason) => return self.reject(r, reason),
                };
                if self.count_plugged(first, n) != 0 {
                    return self.reject(r, "a block of the range is already plugged");
                }
                let after = n
                    .saturating_mul(self.config.block_size)
                    .saturating_add(self.plugged_size());
                if after > self.requested_size {
                    return (response::NACK, 0);
                }
                match self.backend.plug(self.block_range(first, n)) {
                    Ok(()) => (response::ACK, 0),
                    Err(e) => self.backend_failed("plug", &e),
                }
            }
            request::UNPLUG => {
                self.counters.unplug_requests += 1;
                let (first, n) = match self.check_range(r) {
                    Ok(b) => b,
                    Err(reason) => return self.reject(r, reason),
                };
                if self.count_plugged(first, n) != n {
                    return self.reject(r, "a block of the range is not plugged");
                }
                match self.backend.unplug(self.block_range(first, n)) {
                    Ok(()) => (response::ACK, 0),
                    Err(e) => self.backend_failed("unplug", &e),
                }
            }
            request::UNPLUG_ALL => {
                self.counters.unplug_all_requests += 1;
                if let Err(e) = self.unplug_all() {
                    return self.backend_failed("unplug all", &e);
                }
                // The config-change interrupt follows in `process_queue`.
                self.usable_region_size = self.usable_for(self.requested_size);
                (response::ACK, 0)
            }
            request::STATE => {
                self.counters.state_requests += 1;
                let (first, n) = match self.check_range(r) {
                    Ok(b) => b,
                    Err(reason) => return self.reject(r, reason),
                };
                let state = match self.count_plugged(first, n) {
                    0 => response::STATE_UNPLUGGED,
                    p if p == n => response::STATE_PLUGGED,
                    _ => response::STATE_MIXED,
                };
                (response::ACK, state)
            }
            other => {
                self.counters.unknown_requests += 1;
                self.note(MemFault::UnknownRequest(other));
                (response::ERROR, 0)
            }
        }
    }

    fn reject(&mut self, r: Request, reason: &'static str) -> (u16, u16) {
        self.note(MemFault::BadRequest {
            kind: r.kind,
            addr: r.addr,
            nb_blocks: r.nb_blocks,
            reason,
        });
        (response::ERROR, 0)
    }

    /// The request's blocks `(first index, count)` if well-formed and inside the usable region.
    fn check_range(&self, r: Request) -> Result<(u64, u64), &'static str> {
        let bs = self.config.block_size;
        if r.nb_blocks == 0 {
            return Err("zero blocks");
        }
        if r.addr & (bs - 1) != 0 {
            return Err("address not aligned to the block size");
        }
        let n = u64::from(r.nb_blocks);
        let end = n
            .checked_mul(bs)
            .and_then(|len| r.addr.checked_add(len))
            .ok_or("range overflows")?;
        let usable_end = self.config.addr + self.usable_region_size;
        if r.addr < self.config.addr || end > usable_end {
            return Err("range outside the usable region");
        }
        Ok(((r.addr - self.config.addr) / bs, n))
    }

    fn block_range(&self, first: u64, n: u64) -> PageRange {
        let bs = self.config.block_size;
        PageRange::new(
            (self.config.addr + first * bs) >> PAGE_SHIFT,
            (n * bs) >> PAGE_SHIFT,
        )
    }

    /// Plugged blocks among `n` blocks from `first`.
    fn count_plugged(&self, first: u64, n: u64) -> u64 {
        let pages: u64 = self
            .backend
            .plugged_runs(self.block_range(first, n))
            .iter()
            .map(|r| r.count)
            .sum();
        pages / (self.config.block_size >> PAGE_SHIFT)
    }

    fn unplug_all(&mut self) -> Result<(), crate::backend::BackendError> {
        for run in self.plugged_ranges() {
            self.backend.unplug(run)?;
        }
        Ok(())
    }

    /// The usable region size that lets Linux plug `requested` bytes: up to the end of the Linux
    /// memory block holding the last requested byte, counted from the first whole memory block
    /// of the region, never past the region.
    fn usable_for(&self, requested: u64) -> u64 {
        let step = self.config.block_size.max(LINUX_MEMORY_BLOCK_SIZE);
        let addr = self.config.addr;
        let first_whole = addr.next_multiple_of(step);
        let end = first_whole.saturating_add(requested).next_multiple_of(step);
        let want = if requested == 0 { 0 } else { end - addr };
        // Never below what is plugged (the highest plugged block's end).
        let plugged_end = self
            .plugged_ranges()
            .last()
            .map_or(0, |r| (r.end() << PAGE_SHIFT) - addr);
        want.max(plugged_end).min(self.config.region_size)
    }

    fn config_changed(&mut self) {
        if let Some(a) = &self.active {
            a.interrupt.notify_config();
            self.counters.config_interrupts += 1;
        }
    }

    fn note(&mut self, fault: MemFault) {
        match fault {
            MemFault::ReadOnlyConfig { .. } => self.counters.config_writes_refused += 1,
            MemFault::BadChain(_) => self.counters.malformed_buffers += 1,
            _ => {}
        }
        self.faults.note(fault.kind(), &fault);
    }

    fn backend_failed(&mut self, what: &str, e: &crate::backend::BackendError) -> (u16, u16) {
        self.counters.backend_errors += 1;
        if let Some(suppressed) = self.backend_log.hit() {
            error!("virtio-mem: {what}: backend failed: {e} ({suppressed} similar suppressed)");
        }
        (response::BUSY, 0)
    }

    fn config_bytes(&self) -> [u8; config_offsets::SIZE as usize] {
        let mut c = [0u8; config_offsets::SIZE as usize];
        let mut put =
            |off: u64, v: &[u8]| c[off as usize..off as usize + v.len()].copy_from_slice(v);
        put(
            config_offsets::BLOCK_SIZE,
            &self.config.block_size.to_le_bytes(),
        );
        put(config_offsets::NODE_ID, &self.config.node_id.to_le_bytes());
        put(config_offsets::ADDR, &self.config.addr.to_le_bytes());
        put(
            config_offsets::REGION_SIZE,
            &self.config.region_size.to_le_bytes(),
        );
        put(
            config_offsets::USABLE_REGION_SIZE,
            &self.usable_region_size.to_le_bytes(),
        );
        put(
            config_offsets::PLUGGED_SIZE,
            &self.plugged_size().to_le_bytes(),
        );
        put(
            config_offsets::REQUESTED_SIZE,
            &self.requested_size.to_le_bytes(),
        );
        c
    }
}

impl VirtioDevice for VirtioMem {
    fn device_type(&self) -> u32 {
        device_type::MEM
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| c.get(usize::try_from(o).ok()?))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.note(MemFault::ReadOnlyConfig {
            offset,
            len: data.len(),
        });
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation {
            mem,
            queues,
            interrupt,
            acked_features,
        } = activation;
        let mut request_queue = None;
        for q in queues {
            if q.index == 0 {
                request_queue = Some(q);
            } else {
                warn!(
                    "virtio-mem: ignoring queue {} (the device has one queue)",
                    q.index
                );
            }
        }
        let q = request_queue.ok_or(ActivateError::MissingQueue { index: 0 })?;
        if !q.queue.is_valid(&mem) {
            return Err(ActivateError::InvalidQueue { index: 0 });
        }
        if let Some(old) = self.active.take() {
            self.stale_fds.push(old.notify);
        }
        self.acked_features = acked_features & self.avail_features;
        let inaccessible = 1 << features::UNPLUGGED_INACCESSIBLE;
        if self.avail_features & inaccessible != 0 && self.acked_features & inaccessible == 0 {
            // The host does not map unplugged blocks: a driver that may read them will fault.
            warn!("virtio-mem: the driver did not accept UNPLUGGED_INACCESSIBLE");
        }
        self.active = Some(MemActive {
            mem,
            interrupt,
            queue: q.queue,
            notify: q.notify,
            registered: false,
        });
        info!(
            "virtio-mem: activated, features {:#x}, region {:#x}+{:#x}, plugged {:#x}",
            self.acked_features,
            self.config.addr,
            self.config.region_size,
            self.plugged_size()
        );
        self.activation_evt.trigger();
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(old) = self.active.take() {
            self.stale_fds.push(old.notify);
            self.activation_evt.trigger();
        }
        self.acked_features = 0;
        // Block states survive a device reset (the driver asks UNPLUG_ALL when it comes back);
        // the usable region shrinks to what the request and the plugged blocks need.
        self.usable_region_size = self.usable_for(self.requested_size);
    }
}
