//! A fake VMM thread for tests, `vmmctl` demos and `api-bench`: it answers every [`ApiRequest`]
//! from a small state machine (not started -> running -> exited), and moves the balloon and the
//! hot-plugged size toward their targets a little on every tick, like a guest would.
//!
//! It is a test double: it checks the state rules a real VMM must check (configuration only before
//! `InstanceStart`, a balloon no larger than memory, ...) so the server's error paths can be tested
//! without KVM, but it touches no memory.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::bridge::{ApiError, ApiMessage, ApiRequest, ApiResponse, ApiResult};
use crate::requests::{
    ActionType, BalloonConfig, BootSourceConfig, HotplugMemoryConfig, MachineConfig, MemoryQuery,
    OfflineReason,
};
use crate::responses::{
    BalloonState, BalloonStats, HostMemory, HotplugMemoryState, InstanceInfo, InstanceState,
    MemoryMap, MemoryRegionInfo, MemoryTotals, MetricFamily, MetricKind, MetricsSnapshot,
    OfflineRuns, PageRun, RegionKind, ResizeMechanism, ResizeState, ResizeStatus,
};
use crate::routes::WakeFn;

const PAGES_PER_MIB: u64 = 256;
/// Where the fake puts the hot-add region: at 4 GiB, or right above boot RAM when that is larger
/// (a real VMM also aligns it to 128 MiB and skips the 32-bit hole).
const HOTPLUG_BASE_MIB: u64 = 4096;
/// The fake balloon takes pages in chunks of this many pages with gaps between them, so the
/// memory map has many runs to page through, as a real guest's balloon does.
const BALLOON_CHUNK_PAGES: u64 = 64;

/// How the fake behaves.
#[derive(Debug, Clone)]
pub struct FakeVmmConfig {
    /// How often the fake moves the balloon and the plugged size toward their targets.
    pub tick: Duration,
    /// How many MiB the balloon inflates or deflates per tick.
    pub balloon_mib_per_tick: u64,
    /// How many MiB are plugged or unplugged per tick (rounded to blocks).
    pub hotplug_mib_per_tick: u64,
    /// Delay before answering each request (to test the server's timeout).
    pub reply_delay: Duration,
}

impl Default for FakeVmmConfig {
    fn default() -> Self {
        Self {
            tick: Duration::from_millis(20),
            balloon_mib_per_tick: 16,
            hotplug_mib_per_tick: 64,
            reply_delay: Duration::ZERO,
        }
    }
}

/// A running fake VMM thread.
pub struct FakeVmm {
    tx: Sender<ApiMessage>,
    wakes: Arc<AtomicU64>,
    handled: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl FakeVmm {
    pub fn spawn(cfg: FakeVmmConfig) -> Self {
        let (tx, rx) = mpsc::channel();
        let handled = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (handled2, stop2) = (handled.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("fake-vmm".into())
            .spawn(move || run(cfg, rx, handled2, stop2))
            .expect("spawn the fake VMM thread");
        Self {
            stop,
            tx,
            wakes: Arc::new(AtomicU64::new(0)),
            handled,
            thread: Some(thread),
        }
    }

    /// The sender to give to [`crate::spawn_server`].
    pub fn sender(&self) -> Sender<ApiMessage> {
        self.tx.clone()
    }

    /// A wake-up callback that counts calls (the fake polls its channel, it needs no wake-up).
    pub fn wake_fn(&self) -> WakeFn {
        let wakes = self.wakes.clone();
        Arc::new(move || {
            wakes.fetch_add(1, Ordering::Relaxed);
        })
    }

    pub fn wakes(&self) -> u64 {
        self.wakes.load(Ordering::Relaxed)
    }

    pub fn handled(&self) -> u64 {
        self.handled.load(Ordering::Relaxed)
    }
}

impl Drop for FakeVmm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Balloon {
    cfg: BalloonConfig,
    actual_pages: u64,
}

struct Hotplug {
    cfg: HotplugMemoryConfig,
    requested_mib: u64,
    plugged_mib: u64,
}

/// The fake's state machine.
pub struct FakeState {
    state: InstanceState,
    boot_source: Option<BootSourceConfig>,
    machine: MachineConfig,
    balloon: Option<Balloon>,
    hotplug: Option<Hotplug>,
    desired_mib: Option<u64>,
    mechanism: ResizeMechanism,
    flushes: u64,
    started_at: Instant,
}

impl Default for FakeState {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeState {
    pub fn new() -> Self {
        Self {
            state: InstanceState::NotStarted,
            boot_source: None,
            machine: MachineConfig {
                vcpu_count: 1,
                mem_size_mib: 128,
            },
            balloon: None,
            hotplug: None,
            desired_mib: None,
            mechanism: ResizeMechanism::None,
            flushes: 0,
            started_at: Instant::now(),
        }
    }

    fn before_start(&self, what: &str) -> Result<(), ApiError> {
        match self.state {
            InstanceState::NotStarted => Ok(()),
            _ => Err(ApiError::conflict(format!(
                "{what} is only allowed before InstanceStart"
            ))),
        }
    }

    fn running(&self, what: &str) -> Result<(), ApiError> {
        match self.state {
            InstanceState::Running => Ok(()),
            InstanceState::NotStarted => Err(ApiError::conflict(format!(
                "{what} needs a running VM; send InstanceStart first"
            ))),
            InstanceState::Exited => Err(ApiError::conflict(format!(
                "{what} needs a running VM; the VM has exited"
            ))),
        }
    }

    fn not_exited(&self, what: &str) -> Result<(), ApiError> {
        if self.state == InstanceState::Exited {
            return Err(ApiError::conflict(format!("{what}: the VM has exited")));
        }
        Ok(())
    }

    fn balloon(&self) -> Result<&Balloon, ApiError> {
        self.balloon
            .as_ref()
            .ok_or_else(|| ApiError::not_found("no balloon device; configure it with PUT /balloon"))
    }

    fn hotplug(&self) -> Result<&Hotplug, ApiError> {
        self.hotplug.as_ref().ok_or_else(|| {
            ApiError::not_found("no hot-plug memory; configure it with PUT /hotplug/memory")
        })
    }

    fn check_balloon_size(&self, amount_mib: u64) -> Result<(), ApiError> {
        if amount_mib > self.machine.mem_size_mib {
            return Err(ApiError::bad_request(format!(
                "amount_mib: {amount_mib} is out of range 0..={} (the boot memory size)",
                self.machine.mem_size_mib
            )));
        }
        Ok(())
    }

    fn current_mib(&self) -> u64 {
        let ballooned = self
            .balloon
            .as_ref()
            .map_or(0, |b| b.actual_pages / PAGES_PER_MIB);
        let plugged = self.hotplug.as_ref().map_or(0, |h| h.plugged_mib);
        self.machine.mem_size_mib - ballooned + plugged
    }

    /// Moves the devices toward their targets, as a guest would.
    pub fn tick(&mut self, cfg: &FakeVmmConfig) {
        if self.state != InstanceState::Running {
            return;
        }
        if let Some(b) = &mut self.balloon {
            let target = b.cfg.amount_mib * PAGES_PER_MIB;
            let step = cfg.balloon_mib_per_tick * PAGES_PER_MIB;
            b.actual_pages = if b.actual_pages < target {
                (b.actual_pages + step).min(target)
            } else {
                b.actual_pages.saturating_sub(step).max(target)
            };
        }
        if let Some(h) = &mut self.hotplug {
            let step = cfg
                .hotplug_mib_per_tick
                .max(h.cfg.block_size_mib)
                .next_multiple_of(h.cfg.block_size_mib);
            h.plugged_mib = if h.plugged_mib < h.requested_mib {
                (h.plugged_mib + step).min(h.requested_mib)
            } else {
                h.plugged_mib.saturating_sub(step).max(h.requested_mib)
            };
        }
    }

    /// Answers one request.
    pub fn handle(&mut self, request: &ApiRequest) -> ApiResult {
        match request {
            ApiRequest::GetInstanceInfo => Ok(ApiResponse::InstanceInfo(InstanceInfo {
                id: "fake-vm".into(),
                state: self.state,
                vmm_version: env!("CARGO_PKG_VERSION").into(),
                app_name: "vmm (fake)".into(),
            })),
            ApiRequest::PutBootSource(b) => {
                self.before_start("PUT /boot-source")?;
                self.boot_source = Some(b.clone());
                Ok(ApiResponse::Empty)
            }
            ApiRequest::PutMachineConfig(m) => {
                self.before_start("PUT /machine-config")?;
                if let Some(b) = &self.balloon {
                    if b.cfg.amount_mib > m.mem_size_mib {
                        return Err(ApiError::bad_request(format!(
                            "mem_size_mib: {} is smaller than the balloon target ({} MiB)",
                            m.mem_size_mib, b.cfg.amount_mib
                        )));
                    }
                }
                self.machine = *m;
                Ok(ApiResponse::Empty)
            }
            ApiRequest::Action(ActionType::InstanceStart) => {
                self.before_start("InstanceStart")?;
                if self.boot_source.is_none() {
                    return Err(ApiError::bad_request(
                        "cannot start: no boot source; configure it with PUT /boot-source",
                    ));
                }
                self.state = InstanceState::Running;
                self.started_at = Instant::now();
                Ok(ApiResponse::Empty)
            }
            ApiRequest::Action(ActionType::SendCtrlAltDel) => {
                self.running("SendCtrlAltDel")?;
                self.state = InstanceState::Exited;
                Ok(ApiResponse::Empty)
            }
            ApiRequest::Action(ActionType::FlushMetrics) => {
                self.flushes += 1;
                Ok(ApiResponse::Empty)
            }
            ApiRequest::PutBalloon(cfg) => {
                self.before_start("PUT /balloon")?;
                self.check_balloon_size(cfg.amount_mib)?;
                self.balloon = Some(Balloon {
                    cfg: *cfg,
                    actual_pages: 0,
                });
                Ok(ApiResponse::Empty)
            }
            ApiRequest::PatchBalloon(u) => {
                self.not_exited("PATCH /balloon")?;
                self.balloon()?;
                self.check_balloon_size(u.amount_mib)?;
                if let Some(b) = &mut self.balloon {
                    b.cfg.amount_mib = u.amount_mib;
                }
                Ok(ApiResponse::Empty)
            }
            ApiRequest::GetBalloon => {
                let b = self.balloon()?;
                Ok(ApiResponse::Balloon(BalloonState {
                    amount_mib: b.cfg.amount_mib,
                    deflate_on_oom: b.cfg.deflate_on_oom,
                    stats_polling_interval_s: b.cfg.stats_polling_interval_s,
                    free_page_reporting: b.cfg.free_page_reporting,
                    target_pages: b.cfg.amount_mib * PAGES_PER_MIB,
                    actual_pages: b.actual_pages,
                    actual_mib: b.actual_pages / PAGES_PER_MIB,
                }))
            }
            ApiRequest::GetBalloonStats => {
                let b = self.balloon()?;
                let total = self.machine.mem_size_mib << 20;
                let ballooned = b.actual_pages << 12;
                // The guest reports only when running with statistics enabled; without a
                // report, only the balloon's sizes are there.
                let running =
                    self.state == InstanceState::Running && b.cfg.stats_polling_interval_s > 0;
                Ok(ApiResponse::BalloonStats(BalloonStats {
                    target_pages: b.cfg.amount_mib * PAGES_PER_MIB,
                    actual_pages: b.actual_pages,
                    target_mib: b.cfg.amount_mib,
                    actual_mib: b.actual_pages / PAGES_PER_MIB,
                    swap_in: running.then_some(0),
                    swap_out: running.then_some(0),
                    major_faults: running.then_some(12),
                    minor_faults: running.then_some(3400),
                    free_memory: running.then(|| (total - ballooned) / 2),
                    total_memory: running.then_some(total - ballooned),
                    available_memory: running.then(|| (total - ballooned) * 3 / 4),
                    disk_caches: running.then_some(8 << 20),
                    hugetlb_allocations: running.then_some(0),
                    hugetlb_failures: running.then_some(0),
                    oom_kill: running.then_some(0),
                    alloc_stall: running.then_some(0),
                    async_scan: running.then_some(0),
                    direct_scan: running.then_some(0),
                    async_reclaim: running.then_some(0),
                    direct_reclaim: running.then_some(0),
                    age_ms: running.then(|| self.started_at.elapsed().as_millis() as u64 % 1000),
                }))
            }
            ApiRequest::PatchBalloonStats(u) => {
                self.not_exited("PATCH /balloon/statistics")?;
                let b = self.balloon()?;
                if self.state == InstanceState::Running
                    && (b.cfg.stats_polling_interval_s == 0) != (u.stats_polling_interval_s == 0)
                {
                    return Err(ApiError::bad_request(
                        "stats_polling_interval_s: cannot enable or disable statistics after \
                         InstanceStart (the stats queue is fixed at boot); change a non-zero \
                         interval to another non-zero one",
                    ));
                }
                if let Some(b) = &mut self.balloon {
                    b.cfg.stats_polling_interval_s = u.stats_polling_interval_s;
                }
                Ok(ApiResponse::Empty)
            }
            ApiRequest::PutHotplugMemory(cfg) => {
                self.before_start("PUT /hotplug/memory")?;
                self.hotplug = Some(Hotplug {
                    cfg: *cfg,
                    requested_mib: 0,
                    plugged_mib: 0,
                });
                Ok(ApiResponse::Empty)
            }
            ApiRequest::PatchHotplugMemory(u) => {
                self.not_exited("PATCH /hotplug/memory")?;
                let h = self.hotplug()?;
                if u.requested_size_mib > h.cfg.total_size_mib {
                    return Err(ApiError::bad_request(format!(
                        "requested_size_mib: {} is out of range 0..={} (total_size_mib)",
                        u.requested_size_mib, h.cfg.total_size_mib
                    )));
                }
                if u.requested_size_mib % h.cfg.block_size_mib != 0 {
                    return Err(ApiError::bad_request(format!(
                        "requested_size_mib: {} is not a multiple of block_size_mib ({})",
                        u.requested_size_mib, h.cfg.block_size_mib
                    )));
                }
                if let Some(h) = &mut self.hotplug {
                    h.requested_mib = u.requested_size_mib;
                }
                Ok(ApiResponse::Empty)
            }
            ApiRequest::GetHotplugMemory => {
                let h = self.hotplug()?;
                Ok(ApiResponse::HotplugMemory(HotplugMemoryState {
                    total_size_mib: h.cfg.total_size_mib,
                    block_size_mib: h.cfg.block_size_mib,
                    plugged_size_mib: h.plugged_mib,
                    requested_size_mib: h.requested_mib,
                    usable_region_size_mib: h.requested_mib.next_multiple_of(128),
                }))
            }
            ApiRequest::PutResize(r) => self.resize(r.desired_mib),
            ApiRequest::GetResize => Ok(ApiResponse::Resize(self.resize_status())),
            ApiRequest::GetMemory(q) => Ok(ApiResponse::Memory(self.memory_map(q))),
            ApiRequest::GetMetrics => Ok(ApiResponse::Metrics(self.metrics())),
        }
    }

    fn resize(&mut self, desired: u64) -> ApiResult {
        self.running("PUT /vm/resize")?;
        let boot = self.machine.mem_size_mib;
        let hot_total = self.hotplug.as_ref().map_or(0, |h| h.cfg.total_size_mib);
        let min = if self.balloon.is_some() { 16 } else { boot };
        if desired < min || desired > boot + hot_total {
            return Err(ApiError::bad_request(format!(
                "desired_mib: {desired} is out of range {min}..={} for this VM (boot memory \
                 {boot} MiB, hot-add region {hot_total} MiB{})",
                boot + hot_total,
                if self.balloon.is_some() {
                    ""
                } else {
                    ", no balloon"
                }
            )));
        }
        let was_plugged = self.hotplug.as_ref().is_some_and(|h| h.plugged_mib > 0);
        let was_ballooned = self.balloon.as_ref().is_some_and(|b| b.actual_pages > 0);
        if desired <= boot {
            if let Some(h) = &mut self.hotplug {
                h.requested_mib = 0;
            }
            if let Some(b) = &mut self.balloon {
                b.cfg.amount_mib = boot - desired;
            }
            self.mechanism = if was_plugged {
                ResizeMechanism::Both
            } else {
                ResizeMechanism::Balloon
            };
        } else {
            if let Some(b) = &mut self.balloon {
                b.cfg.amount_mib = 0;
            }
            let h = self
                .hotplug
                .as_mut()
                .expect("desired above boot implies hotplug");
            h.requested_mib = (desired - boot).next_multiple_of(h.cfg.block_size_mib);
            self.mechanism = if was_ballooned {
                ResizeMechanism::Both
            } else {
                ResizeMechanism::VirtioMem
            };
        }
        self.desired_mib = Some(desired);
        Ok(ApiResponse::Empty)
    }

    fn resize_status(&self) -> ResizeStatus {
        let current = self.current_mib();
        let settled = self
            .balloon
            .as_ref()
            .is_none_or(|b| b.actual_pages == b.cfg.amount_mib * PAGES_PER_MIB)
            && self
                .hotplug
                .as_ref()
                .is_none_or(|h| h.plugged_mib == h.requested_mib);
        ResizeStatus {
            desired_mib: self.desired_mib.unwrap_or(current),
            current_mib: current,
            mechanism: self.mechanism,
            state: match (self.desired_mib, settled) {
                (None, _) => ResizeState::Idle,
                (Some(_), true) => ResizeState::Reached,
                (Some(_), false) => ResizeState::InProgress,
            },
        }
    }

    fn hotplug_base_pfn(&self) -> u64 {
        self.machine.mem_size_mib.max(HOTPLUG_BASE_MIB) * PAGES_PER_MIB
    }

    /// All offline runs of one reason, in PFN order.
    fn runs(&self, reason: OfflineReason) -> Vec<PageRun> {
        let mut runs = Vec::new();
        let ram_pages = self.machine.mem_size_mib * PAGES_PER_MIB;
        let ballooned = self.balloon.as_ref().map_or(0, |b| b.actual_pages);
        let balloon_runs = |runs: &mut Vec<PageRun>| {
            // Chunks taken from the top of RAM down, one chunk every two.
            let mut left = ballooned;
            let mut top = ram_pages;
            while left > 0 && top >= 2 * BALLOON_CHUNK_PAGES {
                let n = left.min(BALLOON_CHUNK_PAGES);
                top -= 2 * BALLOON_CHUNK_PAGES;
                runs.push(PageRun {
                    start_pfn: top,
                    pages: n,
                });
                left -= n;
            }
            runs.reverse();
        };
        let unplugged_run = |runs: &mut Vec<PageRun>| {
            if let Some(h) = &self.hotplug {
                let start = self.hotplug_base_pfn() + h.plugged_mib * PAGES_PER_MIB;
                let pages = (h.cfg.total_size_mib - h.plugged_mib) * PAGES_PER_MIB;
                if pages > 0 {
                    runs.push(PageRun {
                        start_pfn: start,
                        pages,
                    });
                }
            }
        };
        match reason {
            OfflineReason::Ballooned => balloon_runs(&mut runs),
            OfflineReason::Unplugged => unplugged_run(&mut runs),
            // The fake discards everything offline: the union of the two.
            OfflineReason::Discarded => {
                balloon_runs(&mut runs);
                unplugged_run(&mut runs);
            }
        }
        runs
    }

    fn memory_map(&self, q: &MemoryQuery) -> MemoryMap {
        let reasons: Vec<OfflineReason> = match q.reason {
            Some(r) => vec![r],
            None => OfflineReason::ALL.to_vec(),
        };
        let offline = reasons
            .into_iter()
            .map(|r| page_runs(r, &self.runs(r), q))
            .collect();
        let ram = self.machine.mem_size_mib << 20;
        let ballooned = self.balloon.as_ref().map_or(0, |b| b.actual_pages << 12);
        let (hot_total, plugged) = self.hotplug.as_ref().map_or((0, 0), |h| {
            (h.cfg.total_size_mib << 20, h.plugged_mib << 20)
        });
        let unplugged = hot_total - plugged;
        let mut regions = vec![MemoryRegionInfo {
            kind: RegionKind::Ram,
            guest_phys_addr: 0,
            size_bytes: ram,
            offline_pages: ballooned >> 12,
        }];
        if self.hotplug.is_some() {
            regions.push(MemoryRegionInfo {
                kind: RegionKind::Hotplug,
                guest_phys_addr: self.hotplug_base_pfn() << 12,
                size_bytes: hot_total,
                offline_pages: unplugged >> 12,
            });
        }
        let mut counters = BTreeMap::new();
        counters.insert("balloon_inflate_pages".into(), ballooned >> 12);
        counters.insert("virtio_mem_plug_requests".into(), plugged >> 21);
        MemoryMap {
            page_size: 4096,
            regions,
            offline,
            totals: MemoryTotals {
                guest_phys_bytes: ram + hot_total,
                online_bytes: ram - ballooned + plugged,
                offline_bytes: ballooned + unplugged,
                ballooned_bytes: ballooned,
                unplugged_bytes: unplugged,
                discarded_bytes: ballooned + unplugged,
            },
            host: HostMemory {
                guest_rss_bytes: (ram - ballooned + plugged) / 4,
                process_rss_bytes: Some((ram - ballooned + plugged) / 4 + (8 << 20)),
            },
            counters,
        }
    }

    fn metrics(&self) -> MetricsSnapshot {
        let b = self.balloon.as_ref();
        MetricsSnapshot {
            families: vec![
                MetricFamily::single(
                    "vmm_guest_memory_current_bytes",
                    "Memory the guest can use now.",
                    MetricKind::Gauge,
                    (self.current_mib() << 20) as f64,
                ),
                MetricFamily::single(
                    "vmm_balloon_actual_pages",
                    "Pages the guest has given to the balloon.",
                    MetricKind::Gauge,
                    b.map_or(0, |b| b.actual_pages) as f64,
                ),
                MetricFamily::single(
                    "vmm_balloon_target_pages",
                    "Balloon target in 4 KiB pages.",
                    MetricKind::Gauge,
                    b.map_or(0, |b| b.cfg.amount_mib * PAGES_PER_MIB) as f64,
                ),
                MetricFamily::single(
                    "vmm_metrics_flushes_total",
                    "FlushMetrics actions received.",
                    MetricKind::Counter,
                    self.flushes as f64,
                ),
            ],
        }
    }
}

/// Clips `runs` (sorted, disjoint) to the query's range and pages them. Public so a real VMM
/// can check its own paging against it.
pub fn page_runs(reason: OfflineReason, runs: &[PageRun], q: &MemoryQuery) -> OfflineRuns {
    let end = q.pfn_end.unwrap_or(u64::MAX);
    let mut out = Vec::new();
    let mut pages_in_range = 0;
    let mut next_pfn = None;
    for run in runs {
        let s = run.start_pfn.max(q.pfn_start);
        let e = (run.start_pfn + run.pages).min(end);
        if s >= e {
            continue;
        }
        pages_in_range += e - s;
        if out.len() < q.limit as usize {
            out.push(PageRun {
                start_pfn: s,
                pages: e - s,
            });
        } else if next_pfn.is_none() {
            next_pfn = Some(s);
        }
    }
    OfflineRuns {
        reason,
        pages_in_range,
        runs: out,
        next_pfn,
    }
}

fn run(
    cfg: FakeVmmConfig,
    rx: Receiver<ApiMessage>,
    handled: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let mut state = FakeState::new();
    let mut next_tick = Instant::now() + cfg.tick;
    while !stop.load(Ordering::Relaxed) {
        let wait = next_tick.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(msg) => {
                if !cfg.reply_delay.is_zero() {
                    std::thread::sleep(cfg.reply_delay);
                }
                let answer = state.handle(&msg.request);
                msg.respond(answer);
                handled.fetch_add(1, Ordering::Relaxed);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if Instant::now() >= next_tick {
            state.tick(&cfg);
            next_tick = Instant::now() + cfg.tick;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Sorted, disjoint, non-adjacent runs built from gaps and lengths.
    fn runs() -> impl Strategy<Value = Vec<PageRun>> {
        prop::collection::vec((1u64..50, 1u64..50), 0..40).prop_map(|parts| {
            let mut pfn = 0;
            parts
                .into_iter()
                .map(|(gap, pages)| {
                    pfn += gap;
                    let run = PageRun {
                        start_pfn: pfn,
                        pages,
                    };
                    pfn += pages;
                    run
                })
                .collect()
        })
    }

    proptest! {
        /// Following `next_pfn` from `pfn_start` visits exactly the pages of the range, each
        /// once, in order, never more than `limit` runs at a time.
        #[test]
        fn paging_visits_the_range_exactly(
            runs in runs(),
            start in 0u64..2500,
            len in prop::option::of(1u64..2500),
            limit in 1u32..8,
        ) {
            let end = len.map(|l| start + l);
            let expected: Vec<u64> = runs
                .iter()
                .flat_map(|r| r.start_pfn..r.start_pfn + r.pages)
                .filter(|p| *p >= start && end.is_none_or(|e| *p < e))
                .collect();
            let mut seen = Vec::new();
            let mut q = MemoryQuery { reason: None, pfn_start: start, pfn_end: end, limit };
            let first_total = page_runs(OfflineReason::Ballooned, &runs, &q).pages_in_range;
            prop_assert_eq!(first_total, expected.len() as u64);
            loop {
                let page = page_runs(OfflineReason::Ballooned, &runs, &q);
                prop_assert!(page.runs.len() <= limit as usize);
                for r in &page.runs {
                    prop_assert!(r.pages > 0);
                    seen.extend(r.start_pfn..r.start_pfn + r.pages);
                }
                match page.next_pfn {
                    Some(next) => {
                        prop_assert!(next > q.pfn_start);
                        q.pfn_start = next;
                    }
                    None => break,
                }
            }
            prop_assert_eq!(seen, expected);
        }
    }

    #[test]
    fn paging_clips_and_continues() {
        let runs = [
            PageRun {
                start_pfn: 10,
                pages: 10,
            },
            PageRun {
                start_pfn: 30,
                pages: 10,
            },
            PageRun {
                start_pfn: 50,
                pages: 10,
            },
        ];
        let q = MemoryQuery {
            reason: None,
            pfn_start: 15,
            pfn_end: Some(55),
            limit: 2,
        };
        let got = page_runs(OfflineReason::Ballooned, &runs, &q);
        assert_eq!(got.pages_in_range, 5 + 10 + 5);
        assert_eq!(
            got.runs,
            vec![
                PageRun {
                    start_pfn: 15,
                    pages: 5
                },
                PageRun {
                    start_pfn: 30,
                    pages: 10
                }
            ]
        );
        assert_eq!(got.next_pfn, Some(50));
    }
}
