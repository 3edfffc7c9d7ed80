//! The virtio-balloon device: negotiation, config space, queue processing, control API.
//!
//! Life of an inflate buffer: the driver notifies inflateq; the event loop calls
//! [`Balloon::process_queue`]; each chain's readable descriptors are read as little-endian u32
//! PFNs (at most [`MAX_PFNS_PER_BUFFER`]), normalised once into [`PageRanges`] (sorted,
//! de-duplicated, coalesced, cut to guest RAM) and handed to the backend in one
//! [`BalloonBackend::inflate`] call; the chain goes back on the used ring with length 0 and the
//! guest is interrupted once per batch of chains. When the host memory is released is the
//! memory manager's business (docs/architecture.md, "Inflate").

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use memory::units::{mib_to_bytes, mib_to_pages, pages_to_mib};

use log::{error, info, warn};
use virtio::{device_type, ActivateError, Activation, GuestMemoryMmap, Interrupt, VirtioDevice};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::metrics::BalloonCounters;
use super::stats::{BalloonStats, ENTRY_SIZE, MAX_ENTRIES};
use super::{
    config_offsets, queue_roles, BalloonConfig, BalloonError, GuestFault, QueueRole, FAULT_KINDS,
    MAX_PFNS_PER_BUFFER,
};
use crate::backend::{BalloonBackend, PageRange, PageRanges, RamMap, PAGE_SHIFT, PAGE_SIZE};
use crate::ratelimit::{FaultLog, RateLimitedLog};

/// Chains handled per queue per event before yielding back to the event loop (the queue's
/// eventfd is re-signalled so the rest is handled on the next turn).
const MAX_CHAINS_PER_EVENT: usize = 1024;

pub(crate) struct DeviceQueue {
    pub(crate) role: QueueRole,
    pub(crate) index: usize,
    pub(crate) queue: Queue,
    pub(crate) notify: EventFd,
}

pub(crate) struct ActiveState {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) interrupt: Arc<dyn Interrupt>,
    pub(crate) queues: Vec<DeviceQueue>,
    /// Whether the queue eventfds were added to the event loop.
    pub(crate) registered: bool,
}

/// What to do with a chain once handled.
enum Disposition {
    /// Put it on the used ring with this length.
    Return(u32),
    /// Keep it (the stats buffer, returned when fresh statistics are wanted).
    Hold,
}

/// The virtio-balloon device. Share it as `Arc<Mutex<Balloon>>`: one clone to the transport (as
/// `Arc<Mutex<dyn VirtioDevice>>`), one to the event manager (it is a `MutEventSubscriber`).
pub struct Balloon {
    config: BalloonConfig,
    avail_features: u64,
    acked_features: u64,
    queue_sizes: Vec<u16>,
    /// Config `num_pages`: the target, in 4 KiB pages.
    num_pages: u32,
    /// Config `actual`, as the driver last wrote it.
    actual: u32,
    backend: Arc<dyn BalloonBackend>,
    pub(crate) activation_evt: virtio::ActivationEvent,
    pub(crate) stats_timer: TimerFd,
    pub(crate) active: Option<ActiveState>,
    /// Queue eventfds of a previous activation, to be removed from the event loop.
    pub(crate) stale_fds: Vec<EventFd>,
    stats_interval: Duration,
    held_stats: Option<u16>,
    latest_stats: Option<BalloonStats>,
    /// Pages the backend confirmed as ballooned through this device.
    ballooned_pages: u64,
    /// Guest RAM size, known from activation (or [`Balloon::set_guest_ram_bytes`]).
    guest_ram_bytes: Option<u64>,
    counters: BalloonCounters,
    faults: FaultLog<FAULT_KINDS>,
    backend_log: RateLimitedLog,
    /// Guest RAM, from the activation's memory: what guest PFNs are checked against.
    ram: RamMap,
    // Scratch buffers reused across requests: the ack path does not allocate.
    pfns: Vec<u32>,
    reported: Vec<PageRange>,
    ranges: PageRanges,
}

impl Balloon {
    /// A balloon with `config`, releasing memory through `backend`.
    pub fn new(
        config: BalloonConfig,
        backend: Arc<dyn BalloonBackend>,
    ) -> Result<Self, BalloonError> {
        let qs = config.queue_size;
        if qs == 0 || qs > 32768 || !qs.is_power_of_two() {
            return Err(BalloonError::BadQueueSize(qs));
        }
        let avail_features = config.features();
        let queue_sizes = vec![qs; queue_roles(avail_features).len()];
        let num_pages = target_pages(config.amount_mib)?;
        let stats_timer = TimerFd::new()?;
        set_nonblocking(&stats_timer)?;
        Ok(Self {
            stats_interval: config.stats_interval,
            config,
            avail_features,
            acked_features: 0,
            queue_sizes,
            num_pages,
            actual: 0,
            backend,
            activation_evt: virtio::ActivationEvent::new()?,
            stats_timer,
            active: None,
            stale_fds: Vec::new(),
            held_stats: None,
            latest_stats: None,
            ballooned_pages: 0,
            guest_ram_bytes: None,
            counters: BalloonCounters::default(),
            faults: FaultLog::new("virtio-balloon"),
            backend_log: RateLimitedLog::default(),
            ram: RamMap::default(),
            pfns: Vec::with_capacity(MAX_PFNS_PER_BUFFER),
            reported: Vec::new(),
            ranges: PageRanges::with_capacity(MAX_PFNS_PER_BUFFER),
        })
    }

    // ---- Control API (the VMM's side) ----

    /// Tells the device how much RAM the guest has, so that targets can be checked before the
    /// driver starts (activation sets it from guest memory otherwise).
    pub fn set_guest_ram_bytes(&mut self, bytes: u64) {
        self.guest_ram_bytes = Some(bytes);
    }

    /// Sets the target: the guest should give `mib` MiB to the balloon. Raises a config-change
    /// interrupt if the driver is running and the target changed.
    pub fn set_target_mib(&mut self, mib: u64) -> Result<(), BalloonError> {
        let pages = target_pages(mib)?;
        if let Some(ram) = self.guest_ram_bytes {
            if mib_to_bytes(mib).is_none_or(|b| b > ram) {
                return Err(BalloonError::TargetTooLarge {
                    mib,
                    ram_mib: memory::units::bytes_to_mib(ram),
                });
            }
        }
        self.set_target_pages(pages);
        Ok(())
    }

    /// Sets the target in 4 KiB pages.
    pub fn set_target_pages(&mut self, pages: u32) {
        if pages == self.num_pages {
            return;
        }
        self.num_pages = pages;
        if let Some(a) = &self.active {
            a.interrupt.notify_config();
            self.counters.config_interrupts += 1;
        }
    }

    /// Target, in bytes.
    pub fn target_bytes(&self) -> u64 {
        u64::from(self.num_pages) * PAGE_SIZE
    }

    /// Target, in MiB (rounded down).
    pub fn target_mib(&self) -> u64 {
        pages_to_mib(u64::from(self.num_pages))
    }

    /// What the driver reports as in the balloon (`actual`), in bytes.
    pub fn actual_bytes(&self) -> u64 {
        u64::from(self.actual) * PAGE_SIZE
    }

    /// What the backend confirmed as ballooned through this device, in bytes.
    pub fn ballooned_bytes(&self) -> u64 {
        self.ballooned_pages * PAGE_SIZE
    }

    /// The latest statistics and when they arrived (`None` before the first report).
    pub fn latest_stats(&self) -> Option<BalloonStats> {
        self.latest_stats.clone()
    }

    /// Changes how often the device asks for fresh statistics; zero stops asking.
    pub fn set_stats_interval(&mut self, interval: Duration) -> Result<(), BalloonError> {
        if !self.config.stats {
            return Err(BalloonError::StatsDisabled);
        }
        self.stats_interval = interval;
        self.arm_stats_timer()?;
        Ok(())
    }

    /// How often the device asks the guest for fresh statistics (zero: never asks).
    pub fn stats_interval(&self) -> Duration {
        self.stats_interval
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> BalloonCounters {
        self.counters
    }

    /// The configuration the device was created with (later targets and intervals are not in
    /// it).
    pub fn config(&self) -> &BalloonConfig {
        &self.config
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether the driver started the device (DRIVER_OK) and has not reset it since.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    // ---- Queue processing (called from the event loop, or directly by tests) ----

    /// Handles every available buffer of queue `index` (as the driver numbered it). Returns how
    /// many buffers went back to the guest. Unknown indexes and an inactive device do nothing.
    pub fn process_queue(&mut self, index: usize) -> usize {
        let Some(mut active) = self.active.take() else {
            return 0;
        };
        let returned = match active.queues.iter().position(|q| q.index == index) {
            Some(pos) => self.drain_queue(&mut active, pos),
            None => 0,
        };
        self.active = Some(active);
        returned
    }

    /// Handles every queue once (after activation, in case the driver notified before the
    /// eventfds were in the event loop).
    pub fn process_all_queues(&mut self) -> usize {
        let indexes: Vec<usize> = match &self.active {
            Some(a) => a.queues.iter().map(|q| q.index).collect(),
            None => return 0,
        };
        indexes.into_iter().map(|i| self.process_queue(i)).sum()
    }

    /// The stats timer fired: return the held stats buffer to ask the guest for fresh values.
    pub fn request_stats(&mut self) -> bool {
        let Some(head) = self.held_stats else {
            return false;
        };
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let Some(q) = active
            .queues
            .iter_mut()
            .find(|q| q.role == QueueRole::Stats)
        else {
            return false;
        };
        self.held_stats = None;
        if let Err(e) = q.queue.add_used(&active.mem, head, 0) {
            let fault = GuestFault::BrokenQueue {
                queue: "statsq",
                reason: e.to_string(),
            };
            self.note(fault);
            return false;
        }
        active.interrupt.notify_used();
        self.counters.stats_requests += 1;
        true
    }

    fn drain_queue(&mut self, active: &mut ActiveState, pos: usize) -> usize {
        let ActiveState {
            mem,
            interrupt,
            queues,
            ..
        } = active;
        let dq = &mut queues[pos];
        let role = dq.role;
        let mut returned = 0;
        for handled in 0.. {
            if handled == MAX_CHAINS_PER_EVENT {
                // Yield: come back on the next turn of the event loop.
                let _ = dq.notify.write(1);
                break;
            }
            let chain = match dq.queue.iter(&*mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    self.note(GuestFault::BrokenQueue {
                        queue: role.name(),
                        reason: e.to_string(),
                    });
                    None
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let disposition = match role {
                QueueRole::Inflate => self.handle_pfn_buffer(mem, chain, true),
                QueueRole::Deflate => self.handle_pfn_buffer(mem, chain, false),
                QueueRole::Stats => self.handle_stats_buffer(mem, chain),
                QueueRole::Reporting => self.handle_report(chain),
            };
            let mut to_return = None;
            match disposition {
                Disposition::Return(len) => to_return = Some((head, len)),
                Disposition::Hold => {
                    // A second stats buffer while one is held: give the older one back.
                    if let Some(old) = self.held_stats.replace(head) {
                        to_return = Some((old, 0));
                    }
                }
            }
            if let Some((head, len)) = to_return {
                match dq.queue.add_used(&*mem, head, len) {
                    Ok(()) => returned += 1,
                    Err(e) => self.note(GuestFault::BrokenQueue {
                        queue: role.name(),
                        reason: e.to_string(),
                    }),
                }
            }
        }
        if returned > 0 {
            interrupt.notify_used();
        }
        returned
    }

    /// Reads the PFN array of an inflate/deflate chain and passes it to the backend.
    fn handle_pfn_buffer(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        inflate: bool,
    ) -> Disposition {
        let queue = if inflate { "inflateq" } else { "deflateq" };
        let mut bytes = [0u8; MAX_PFNS_PER_BUFFER * 4];
        self.pfns.clear();
        let mut excess = 0usize;
        let mut usable = false;
        let mut faulted = false;
        for desc in chain {
            let (addr, len) = (desc.addr().0, desc.len());
            if desc.is_write_only() {
                self.note(GuestFault::WrongDirection { queue, addr, len });
                faulted = true;
                continue;
            }
            if len % 4 != 0 {
                self.note(GuestFault::BadLength {
                    queue,
                    len,
                    unit: 4,
                });
                faulted = true;
            }
            let n = (len / 4) as usize;
            let take = n.min(MAX_PFNS_PER_BUFFER - self.pfns.len());
            excess += n - take;
            let buf = &mut bytes[..take * 4];
            if mem.read_slice(buf, desc.addr()).is_err() {
                self.note(GuestFault::Unreadable { queue, addr, len });
                faulted = true;
                continue;
            }
            usable |= n > 0;
            self.pfns.extend(
                buf.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        if excess > 0 {
            self.counters.refused_pfns += excess as u64;
            self.note(GuestFault::TooManyPfns {
                queue,
                count: self.pfns.len() + excess,
                max: MAX_PFNS_PER_BUFFER,
                refused: excess,
            });
        }
        if !usable && !faulted {
            self.note(GuestFault::EmptyBuffer { queue });
        }
        if inflate {
            self.counters.inflate_buffers += 1;
        } else {
            self.counters.deflate_buffers += 1;
        }
        if self.pfns.is_empty() {
            return Disposition::Return(0);
        }

        self.ranges.set_pfns(&mut self.pfns, &self.ram);
        if self.ranges.duplicates() > 0 {
            self.note(GuestFault::Duplicates {
                queue,
                count: self.ranges.duplicates(),
            });
        }
        if let Some(first) = self.ranges.first_outside() {
            self.note(GuestFault::OutsideRam {
                queue,
                count: self.ranges.outside_ram(),
                first,
            });
        }
        if self.ranges.is_empty() {
            // Nothing for the backend (whose outcome would count these otherwise).
            self.counters.refused_pfns += self.ranges.outside_ram();
            return Disposition::Return(0);
        }

        self.send_pfns(queue, inflate);
        Disposition::Return(0)
    }

    /// Hands the normalised pages of an inflate or deflate buffer to the backend and counts
    /// what it did.
    fn send_pfns(&mut self, queue: &'static str, inflate: bool) {
        let result = if inflate {
            self.backend.inflate(&self.ranges)
        } else {
            self.backend.deflate(&self.ranges)
        };
        match result {
            Ok(o) => {
                self.counters.refused_pfns += o.refused;
                if inflate {
                    self.counters.inflated_pages += o.changed;
                    self.counters.reinflated_pfns += o.unchanged;
                    self.ballooned_pages += o.changed;
                } else {
                    self.counters.deflated_pages += o.changed;
                    self.ballooned_pages = self.ballooned_pages.saturating_sub(o.changed);
                    if o.unchanged > 0 {
                        self.note(GuestFault::NotInflated { count: o.unchanged });
                    }
                }
            }
            Err(e) => {
                self.counters.refused_pfns += self.ranges.outside_ram();
                self.backend_failed(queue, &e);
            }
        }
    }

    /// Keeps the guest's stats buffer and records the values it carries.
    fn handle_stats_buffer(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Disposition {
        const MAX_BYTES: usize = MAX_ENTRIES * ENTRY_SIZE;
        let mut bytes = [0u8; MAX_BYTES];
        let mut filled = 0usize;
        let mut total: u64 = 0;
        let mut faulted = false;
        for desc in chain {
            let (addr, len) = (desc.addr().0, desc.len());
            if desc.is_write_only() {
                self.note(GuestFault::WrongDirection {
                    queue: "statsq",
                    addr,
                    len,
                });
                faulted = true;
                continue;
            }
            total += u64::from(len);
            let take = (len as usize).min(MAX_BYTES - filled);
            if mem
                .read_slice(&mut bytes[filled..filled + take], desc.addr())
                .is_err()
            {
                self.note(GuestFault::Unreadable {
                    queue: "statsq",
                    addr,
                    len,
                });
                faulted = true;
                continue;
            }
            filled += take;
        }
        let len = u32::try_from(total).unwrap_or(u32::MAX);
        if total == 0 {
            if !faulted {
                self.note(GuestFault::BadStatsBuffer {
                    len,
                    reason: "empty",
                });
            }
        } else if total > MAX_BYTES as u64 {
            self.note(GuestFault::BadStatsBuffer {
                len,
                reason: "longer than 64 entries, truncated",
            });
        } else if total.rem_euclid(ENTRY_SIZE as u64) != 0 {
            self.note(GuestFault::BadStatsBuffer {
                len,
                reason: "not a whole number of 10-byte entries",
            });
        }
        if filled >= ENTRY_SIZE {
            self.latest_stats = Some(BalloonStats::parse(
                &bytes[..filled],
                Instant::now(),
                self.actual,
            ));
            self.counters.stats_updates += 1;
        }
        Disposition::Hold
    }

    /// Free page reporting: each device-writable descriptor names a free range; discard it.
    fn handle_report(&mut self, chain: DescriptorChain<&GuestMemoryMmap>) -> Disposition {
        const QUEUE: &str = "reporting_vq";
        self.reported.clear();
        let mut any = false;
        for desc in chain {
            let (addr, len) = (desc.addr().0, desc.len());
            if !desc.is_write_only() {
                self.note(GuestFault::WrongDirection {
                    queue: QUEUE,
                    addr,
                    len,
                });
                continue;
            }
            any = true;
            if addr % PAGE_SIZE != 0 || u64::from(len) % PAGE_SIZE != 0 {
                self.note(GuestFault::UnalignedReport { addr, len });
            }
            // Only whole pages inside the reported bytes are discarded.
            let Some(end) = addr.checked_add(u64::from(len)) else {
                self.note(GuestFault::Unreadable {
                    queue: QUEUE,
                    addr,
                    len,
                });
                continue;
            };
            let first = addr.div_ceil(PAGE_SIZE);
            let last = end >> PAGE_SHIFT;
            if last <= first {
                continue;
            }
            self.reported.push(PageRange::new(first, last - first));
        }
        if !any {
            self.note(GuestFault::EmptyBuffer { queue: QUEUE });
        }
        // A guest may report overlapping ranges: they count once, without a fault.
        self.ranges.set_ranges(&mut self.reported, &self.ram);
        if let Some(first) = self.ranges.first_outside() {
            self.note(GuestFault::OutsideRam {
                queue: QUEUE,
                count: self.ranges.outside_ram(),
                first,
            });
        }
        self.counters.reports += 1;
        if self.ranges.is_empty() {
            // Nothing for the backend (whose outcome would count these otherwise).
            self.counters.refused_pfns += self.ranges.outside_ram();
            return Disposition::Return(0);
        }
        match self.backend.report_free(&self.ranges) {
            Ok(o) => {
                self.counters.refused_pfns += o.refused;
                self.counters.reported_bytes_freed += o.changed * PAGE_SIZE;
            }
            Err(e) => {
                self.counters.refused_pfns += self.ranges.outside_ram();
                self.backend_failed(QUEUE, &e);
            }
        }
        Disposition::Return(0)
    }

    /// Counts a guest mistake and logs it (rate limited).
    fn note(&mut self, fault: GuestFault) {
        let c = &mut self.counters;
        match &fault {
            // Counted as refused by the backend's outcome (PageRanges carries them there).
            GuestFault::OutsideRam { .. } => {}
            GuestFault::Duplicates { count, .. } => c.duplicate_pfns += count,
            GuestFault::NotInflated { count } => c.deflate_not_inflated_pfns += count,
            GuestFault::ReadOnlyConfig { .. } => c.config_writes_refused += 1,
            _ => c.malformed_buffers += 1,
        }
        self.faults.note(fault.kind(), &fault);
    }

    fn backend_failed(&mut self, queue: &str, e: &crate::backend::BackendError) {
        self.counters.backend_errors += 1;
        if let Some(suppressed) = self.backend_log.hit() {
            error!(
                "virtio-balloon: {queue}: backend failed: {e} ({suppressed} similar suppressed)"
            );
        }
    }

    fn arm_stats_timer(&mut self) -> Result<(), BalloonError> {
        let stats_on = self.acked_features & (1 << super::features::STATS_VQ) != 0;
        if self.active.is_some() && stats_on && !self.stats_interval.is_zero() {
            self.stats_timer
                .reset(self.stats_interval, Some(self.stats_interval))?;
        } else {
            self.stats_timer.clear()?;
        }
        Ok(())
    }

    fn config_bytes(&self) -> [u8; config_offsets::SIZE as usize] {
        let mut c = [0u8; config_offsets::SIZE as usize];
        c[0..4].copy_from_slice(&self.num_pages.to_le_bytes());
        c[4..8].copy_from_slice(&self.actual.to_le_bytes());
        c
    }
}

/// The target `mib` as the 32-bit `num_pages` field.
fn target_pages(mib: u64) -> Result<u32, BalloonError> {
    mib_to_pages(mib)
        .and_then(|p| u32::try_from(p).ok())
        .ok_or(BalloonError::TargetOverflow { mib })
}

fn set_nonblocking(fd: &impl AsRawFd) -> std::io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with integer arguments only; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the same descriptor, still ours; F_SETFL takes the integer flags read above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
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
        let end = offset.checked_add(data.len() as u64);
        match end {
            Some(end)
                if offset >= config_offsets::ACTUAL
                    && end <= config_offsets::FREE_PAGE_HINT_CMD_ID =>
            {
                let mut actual = self.actual.to_le_bytes();
                let at = (offset - config_offsets::ACTUAL) as usize;
                actual[at..at + data.len()].copy_from_slice(data);
                self.actual = u32::from_le_bytes(actual);
            }
            _ => self.note(GuestFault::ReadOnlyConfig {
                offset,
                len: data.len(),
            }),
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation {
            mem,
            queues,
            interrupt,
            acked_features,
        } = activation;
        self.acked_features = acked_features & self.avail_features;
        let roles = queue_roles(self.acked_features);
        let mut slots: Vec<Option<virtio::ActiveQueue>> = roles.iter().map(|_| None).collect();
        for q in queues {
            match slots.get_mut(q.index) {
                Some(slot) => *slot = Some(q),
                None => warn!(
                    "virtio-balloon: ignoring queue {} (the negotiated features have {} queues)",
                    q.index,
                    roles.len()
                ),
            }
        }
        let mut device_queues = Vec::with_capacity(roles.len());
        for (index, (role, slot)) in roles.iter().zip(slots).enumerate() {
            let q = slot.ok_or(ActivateError::MissingQueue { index })?;
            if !q.queue.is_valid(&mem) {
                return Err(ActivateError::InvalidQueue { index });
            }
            if let Err(e) = set_nonblocking(&q.notify) {
                return Err(ActivateError::Other(format!("queue {index} eventfd: {e}")));
            }
            device_queues.push(DeviceQueue {
                role: *role,
                index,
                queue: q.queue,
                notify: q.notify,
            });
        }
        if let Some(old) = self.active.take() {
            self.stale_fds
                .extend(old.queues.into_iter().map(|q| q.notify));
        }
        self.guest_ram_bytes
            .get_or_insert_with(|| mem.iter().map(|r| r.len()).sum());
        self.ram = RamMap::from_guest_memory(&mem);
        self.active = Some(ActiveState {
            mem,
            interrupt,
            queues: device_queues,
            registered: false,
        });
        self.held_stats = None;
        if let Err(e) = self.arm_stats_timer() {
            error!("virtio-balloon: cannot arm the stats timer: {e}");
        }
        info!(
            "virtio-balloon: activated, features {:#x}, queues {:?}",
            self.acked_features,
            roles.iter().map(|r| r.name()).collect::<Vec<_>>()
        );
        self.activation_evt.trigger();
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(old) = self.active.take() {
            self.stale_fds
                .extend(old.queues.into_iter().map(|q| q.notify));
            self.activation_evt.trigger();
        }
        self.acked_features = 0;
        self.actual = 0;
        self.held_stats = None;
        if let Err(e) = self.arm_stats_timer() {
            error!("virtio-balloon: cannot disarm the stats timer: {e}");
        }
        if self.ballooned_pages > 0 {
            // After a reset the guest owns all of its RAM again.
            match self.backend.deflate_all() {
                Ok(o) => info!(
                    "virtio-balloon: reset with {} pages ballooned; {} returned to the guest",
                    self.ballooned_pages, o.changed
                ),
                Err(e) => self.backend_failed("reset", &e),
            }
            self.ballooned_pages = 0;
        }
    }
}
