//! The virtio-balloon device: negotiation, config space, queue processing, control API.
//!
//! Life of an inflate buffer: the driver notifies inflateq; the event loop calls
//! [`Balloon::process_queue`]; each chain's readable descriptors are read as little-endian u32
//! PFNs (at most [`MAX_PFNS_PER_BUFFER`]), sorted, de-duplicated and coalesced
//! ([`coalesce_pfns`]), cut to guest RAM ([`clip_to_ram`]), and handed to the backend in one
//! [`BalloonBackend::inflate`] call; the chain goes back on the used ring with length 0 and the
//! guest is interrupted once per batch of chains. The host memory is released after the ack and
//! in batches: once [`RELEASE_BATCH_PAGES`] gathered, or when the inflate queue has been idle for
//! [`RELEASE_IDLE_DELAY`] (the release timer, on the event loop), or on reset.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
use crate::backend::{BalloonBackend, PageRange, PAGE_SHIFT, PAGE_SIZE};
use crate::ranges::{clip_to_ram, coalesce_pfns};
use crate::ratelimit::{FaultLog, RateLimitedLog};

/// Chains handled per queue per event before yielding back to the event loop (the queue's
/// eventfd is re-signalled so the rest is handled on the next turn).
const MAX_CHAINS_PER_EVENT: usize = 1024;

/// Pages per MiB.
const PAGES_PER_MIB: u64 = (1 << 20) / PAGE_SIZE;

/// Inflated pages left unreleased before the device releases them at once, after the ack that
/// reached the count (16 MiB: 64 of Linux's 256-PFN buffers).
pub const RELEASE_BATCH_PAGES: u64 = 4096;
/// The inflate queue idle this long (no inflate buffer acknowledged) releases whatever is left.
pub const RELEASE_IDLE_DELAY: Duration = Duration::from_millis(2);
/// After a failed release, try again this much later (the backend keeps what it could not do).
const RELEASE_RETRY_DELAY: Duration = Duration::from_secs(1);
/// How long the balloon must be quiet (no inflate, deflate or release) before the backend is
/// asked to compact its bookkeeping ([`BalloonBackend::compact`]): long enough that a stream of
/// requests never waits for it, short enough that a settled balloon soon costs the host little.
pub const COMPACT_IDLE_DELAY: Duration = Duration::from_secs(1);

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
    /// One-shot: fires once the inflate queue has been idle for [`RELEASE_IDLE_DELAY`] with
    /// pages still unreleased, or (`timer_for_compact`) once the balloon has been quiet for
    /// [`COMPACT_IDLE_DELAY`] with a compaction due.
    pub(crate) release_timer: TimerFd,
    /// `release_timer` is armed for the compaction, not for a release.
    timer_for_compact: bool,
    /// The balloon changed since the backend last compacted.
    compact_due: bool,
    /// When pages were last inflated, deflated or released.
    last_activity: Option<Instant>,
    /// Whether `release_timer` is armed.
    release_armed: bool,
    /// The event loop refused to watch `release_timer`: release after every ack instead.
    pub(crate) release_unwatched: bool,
    /// Pages inflated (acknowledged) and not yet handed to `release_pending`.
    unreleased_pages: u64,
    /// When the last inflate buffer with new pages was acknowledged.
    last_inflate: Option<Instant>,
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
    // Scratch buffers reused across requests: the ack path does not allocate.
    pfns: Vec<u32>,
    ranges: Vec<PageRange>,
    in_ram: Vec<PageRange>,
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
        let num_pages = mib_to_pages(config.amount_mib)?;
        let stats_timer = TimerFd::new()?;
        set_nonblocking(&stats_timer)?;
        let release_timer = TimerFd::new()?;
        set_nonblocking(&release_timer)?;
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
            release_timer,
            release_armed: false,
            timer_for_compact: false,
            compact_due: false,
            last_activity: None,
            release_unwatched: false,
            unreleased_pages: 0,
            last_inflate: None,
            active: None,
            stale_fds: Vec::new(),
            held_stats: None,
            latest_stats: None,
            ballooned_pages: 0,
            guest_ram_bytes: None,
            counters: BalloonCounters::default(),
            faults: FaultLog::new("virtio-balloon"),
            backend_log: RateLimitedLog::default(),
            pfns: Vec::with_capacity(MAX_PFNS_PER_BUFFER),
            ranges: Vec::with_capacity(MAX_PFNS_PER_BUFFER),
            in_ram: Vec::with_capacity(MAX_PFNS_PER_BUFFER),
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
        let pages = mib_to_pages(mib)?;
        if let Some(ram) = self.guest_ram_bytes {
            if mib.saturating_mul(1 << 20) > ram {
                return Err(BalloonError::TargetTooLarge {
                    mib,
                    ram_mib: ram >> 20,
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
        u64::from(self.num_pages) / PAGES_PER_MIB
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

    pub fn stats_interval(&self) -> Duration {
        self.stats_interval
    }

    /// Inflated pages whose host memory is not released yet, in bytes. They are released once
    /// [`RELEASE_BATCH_PAGES`] have gathered, once the inflate queue was idle for
    /// [`RELEASE_IDLE_DELAY`] (the release timer on the event loop), on [`Balloon::release_now`]
    /// and on reset.
    pub fn unreleased_bytes(&self) -> u64 {
        self.unreleased_pages * PAGE_SIZE
    }

    /// Releases the host memory of every inflated page now (what the idle timer does). Returns
    /// the pages the backend released.
    pub fn release_now(&mut self) -> u64 {
        self.disarm_release_timer();
        let pages = std::mem::take(&mut self.unreleased_pages);
        match self.backend.release_pending() {
            Ok(n) => {
                self.note_activity();
                n
            }
            Err(e) => {
                self.backend_failed("inflateq", &e);
                // The backend keeps what it could not release: try again later (or on the next
                // inflate, should even the timer fail).
                self.unreleased_pages = pages.max(1);
                let _ = self.arm_release_timer(RELEASE_RETRY_DELAY);
                0
            }
        }
    }

    /// The release timer fired: release if the inflate queue stayed idle long enough, or wait
    /// for the rest of the delay after the latest inflate.
    pub fn release_timer_fired(&mut self) -> u64 {
        // Non-blocking: a disarmed timer just reads EAGAIN.
        let _ = self.release_timer.wait();
        self.release_armed = false;
        self.timer_for_compact = false;
        if self.unreleased_pages == 0 {
            self.compact_if_quiet();
            return 0;
        }
        let idle = self
            .last_inflate
            .map_or(RELEASE_IDLE_DELAY, |t| t.elapsed());
        if idle < RELEASE_IDLE_DELAY && self.arm_release_timer(RELEASE_IDLE_DELAY - idle).is_ok() {
            return 0;
        }
        self.release_now()
    }

    /// After an acknowledged batch of inflate buffers: release now if enough pages gathered,
    /// otherwise make sure the idle timer will.
    fn schedule_release(&mut self) {
        if self.unreleased_pages == 0 {
            return;
        }
        if self.unreleased_pages >= RELEASE_BATCH_PAGES || self.release_unwatched {
            self.release_now();
            return;
        }
        self.last_inflate = Some(Instant::now());
        if (!self.release_armed || self.timer_for_compact)
            && self.arm_release_timer(RELEASE_IDLE_DELAY).is_err()
        {
            // Without a timer nothing would release these pages later: do it now.
            self.release_now();
        }
    }

    /// Pages were inflated, deflated or released: the backend is to compact once the balloon
    /// has been quiet for [`COMPACT_IDLE_DELAY`] (the release timer does it when no release is
    /// pending).
    fn note_activity(&mut self) {
        self.compact_due = true;
        self.last_activity = Some(Instant::now());
        if !self.release_armed && self.arm_release_timer(COMPACT_IDLE_DELAY).is_ok() {
            self.timer_for_compact = true;
        }
    }

    /// The release timer fired with nothing to release: compact if the balloon has been quiet
    /// long enough, or wait for the rest of the delay.
    fn compact_if_quiet(&mut self) {
        if !self.compact_due {
            return;
        }
        let quiet = self
            .last_activity
            .map_or(COMPACT_IDLE_DELAY, |t| t.elapsed());
        if quiet < COMPACT_IDLE_DELAY {
            if self.arm_release_timer(COMPACT_IDLE_DELAY - quiet).is_ok() {
                self.timer_for_compact = true;
            }
            return;
        }
        self.compact_due = false;
        let leaves = self.backend.compact();
        if leaves > 0 {
            info!("virtio-balloon: quiet for {COMPACT_IDLE_DELAY:?}: {leaves} tracker leaves compacted");
        }
    }

    fn arm_release_timer(&mut self, after: Duration) -> Result<(), ()> {
        // A zero duration would disarm the timer.
        let after = after.max(Duration::from_micros(1));
        self.timer_for_compact = false;
        match self.release_timer.reset(after, None) {
            Ok(()) => {
                self.release_armed = true;
                Ok(())
            }
            Err(e) => {
                error!("virtio-balloon: cannot arm the release timer: {e}");
                Err(())
            }
        }
    }

    fn disarm_release_timer(&mut self) {
        if self.release_armed {
            if let Err(e) = self.release_timer.clear() {
                error!("virtio-balloon: cannot disarm the release timer: {e}");
            }
            self.release_armed = false;
        }
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> BalloonCounters {
        self.counters
    }

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
                QueueRole::Reporting => self.handle_report(mem, chain),
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
        if role == QueueRole::Inflate && returned > 0 {
            // Off the ack path (the guest already has its buffers back), and in batches: the
            // pages wait for RELEASE_BATCH_PAGES more or for the queue to go idle.
            self.schedule_release();
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

        self.ranges.clear();
        let duplicates = coalesce_pfns(&mut self.pfns, &mut self.ranges);
        if duplicates > 0 {
            self.note(GuestFault::Duplicates {
                queue,
                count: duplicates,
            });
        }
        self.in_ram.clear();
        let mut outside = 0;
        let mut first_outside = None;
        for r in &self.ranges {
            let refused = clip_to_ram(mem, *r, &mut self.in_ram);
            if refused > 0 {
                outside += refused;
                first_outside.get_or_insert(r.start.0);
            }
        }
        if let Some(first) = first_outside {
            self.note(GuestFault::OutsideRam {
                queue,
                count: outside,
                first,
            });
        }
        if self.in_ram.is_empty() {
            return Disposition::Return(0);
        }

        let result = if inflate {
            self.backend.inflate(&self.in_ram)
        } else {
            self.backend.deflate(&self.in_ram)
        };
        match result {
            Ok(o) => {
                self.counters.refused_pfns += o.refused;
                if inflate {
                    self.counters.inflated_pages += o.changed;
                    self.unreleased_pages += o.changed;
                    self.counters.reinflated_pfns += o.unchanged;
                    self.ballooned_pages += o.changed;
                } else {
                    if o.changed > 0 {
                        self.note_activity();
                    }
                    self.counters.deflated_pages += o.changed;
                    self.ballooned_pages = self.ballooned_pages.saturating_sub(o.changed);
                    if o.unchanged > 0 {
                        self.note(GuestFault::NotInflated { count: o.unchanged });
                    }
                }
            }
            Err(e) => self.backend_failed(queue, &e),
        }
        Disposition::Return(0)
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
            self.latest_stats = Some(BalloonStats::parse(&bytes[..filled], Instant::now()));
            self.counters.stats_updates += 1;
        }
        Disposition::Hold
    }

    /// Free page reporting: each device-writable descriptor names a free range; discard it.
    fn handle_report(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Disposition {
        const QUEUE: &str = "reporting_vq";
        self.in_ram.clear();
        let mut outside = 0;
        let mut first_outside = None;
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
            let range = PageRange::new(first, last - first);
            let refused = clip_to_ram(mem, range, &mut self.in_ram);
            if refused > 0 {
                outside += refused;
                first_outside.get_or_insert(first);
            }
        }
        if !any {
            self.note(GuestFault::EmptyBuffer { queue: QUEUE });
        }
        if let Some(first) = first_outside {
            self.note(GuestFault::OutsideRam {
                queue: QUEUE,
                count: outside,
                first,
            });
        }
        self.counters.reports += 1;
        if self.in_ram.is_empty() {
            return Disposition::Return(0);
        }
        normalize(&mut self.in_ram);
        match self.backend.report_free(&self.in_ram) {
            Ok(o) => {
                self.counters.refused_pfns += o.refused;
                self.counters.reported_bytes_freed += o.changed * PAGE_SIZE;
            }
            Err(e) => self.backend_failed(QUEUE, &e),
        }
        Disposition::Return(0)
    }

    /// Counts a guest mistake and logs it (rate limited).
    fn note(&mut self, fault: GuestFault) {
        let c = &mut self.counters;
        match &fault {
            GuestFault::OutsideRam { count, .. } => c.refused_pfns += count,
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

/// Sorts ranges and merges overlapping or touching ones (a guest may report overlaps).
fn normalize(ranges: &mut Vec<PageRange>) {
    ranges.sort_unstable_by_key(|r| r.start);
    let mut out = 0;
    for i in 0..ranges.len() {
        let r = ranges[i];
        if out > 0 && ranges[out - 1].end() >= r.start.0 {
            let prev = &mut ranges[out - 1];
            let end = prev.end().max(r.end());
            prev.count = end - prev.start.0;
        } else {
            ranges[out] = r;
            out += 1;
        }
    }
    ranges.truncate(out);
}

fn mib_to_pages(mib: u64) -> Result<u32, BalloonError> {
    mib.checked_mul(PAGES_PER_MIB)
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
    // SAFETY: as above.
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
        if self.unreleased_pages > 0 || self.release_armed {
            // Nothing stays queued past a reset: the pages were ballooned until now, so their
            // memory goes back to the host before the guest gets them back (as if released
            // right after their ack).
            self.release_now();
        }
        self.last_inflate = None;
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
