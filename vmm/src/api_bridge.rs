//! The VMM's side of the REST API: answers typed requests from the `api` crate's server.
//!
//! Two phases:
//! - **before start** ([`configure_until_start`]): `main` waits on the request channel, fills a
//!   [`PartialConfig`] from `PUT /boot-source`, `/machine-config`, `/balloon`, `/hotplug/memory`
//!   (and their PATCHes), answers GETs from it, and boots on `PUT /actions InstanceStart`
//!   (answered only once the VM really started, or with the reason it could not);
//! - **running** ([`ApiHandler`]): an event-loop subscriber woken by an eventfd drains the
//!   channel and answers from the devices and the memory manager. Nothing here blocks a vCPU.
//!
//! The limits are [`api::rules`], the ones the command line and the API server apply too;
//! `PUT /vm/resize` is decided by [`crate::resize`], and applied here. The phase before the
//! start is [`crate::configure`].

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use api::rules::{self, StatsQueue};
use api::{
    ActionType, ApiError, ApiMessage, ApiRequest, ApiResponse, ApiResult, BalloonState,
    BalloonStats, HostMemory, HotplugMemoryState, InstanceInfo, InstanceState, MemoryMap,
    MemoryQuery, MemoryRegionInfo, MemoryTotals, MetricFamily, MetricKind, MetricsSnapshot,
    OfflineReason, OfflineRuns, PageRun, ResizeStatus,
};
use balloon::{Balloon, StatTag, VirtioMem};
use event_manager::{EventOps, Events, MutEventSubscriber};
use log::warn;
use memory::tracker::Mark;
use memory::{MemoryManager, PageRange, Reason};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::HotplugOptions;
pub use crate::configure::{configure_until_start, start_config, start_failed, StartDecision};
use crate::resize::{self, BalloonNow, Devices, Event, Intent, Plan, Shape, VirtioMemNow};

const PAGE: u64 = 4096;

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn instance_info(state: InstanceState) -> InstanceInfo {
    InstanceInfo {
        id: format!("vmm-{}", std::process::id()),
        state,
        vmm_version: env!("CARGO_PKG_VERSION").to_string(),
        app_name: "vmm".to_string(),
    }
}

pub(crate) fn request_name(r: &ApiRequest) -> &'static str {
    match r {
        ApiRequest::GetInstanceInfo => "GET /",
        ApiRequest::PutBootSource(_) => "PUT /boot-source",
        ApiRequest::PutMachineConfig(_) => "PUT /machine-config",
        ApiRequest::Action(ActionType::InstanceStart) => "InstanceStart",
        ApiRequest::Action(ActionType::SendCtrlAltDel) => "SendCtrlAltDel",
        ApiRequest::Action(ActionType::FlushMetrics) => "FlushMetrics",
        ApiRequest::PutBalloon(_) => "PUT /balloon",
        ApiRequest::PatchBalloon(_) => "PATCH /balloon",
        ApiRequest::GetBalloon => "GET /balloon",
        ApiRequest::GetBalloonStats => "GET /balloon/statistics",
        ApiRequest::PatchBalloonStats(_) => "PATCH /balloon/statistics",
        ApiRequest::PutHotplugMemory(_) => "PUT /hotplug/memory",
        ApiRequest::PatchHotplugMemory(_) => "PATCH /hotplug/memory",
        ApiRequest::GetHotplugMemory => "GET /hotplug/memory",
        ApiRequest::PutResize(_) => "PUT /vm/resize",
        ApiRequest::GetResize => "GET /vm/resize",
        ApiRequest::GetMemory(_) => "GET /vm/memory",
        ApiRequest::GetMetrics => "GET /metrics",
    }
}

/// Handles to what a running VM's API answers from.
pub struct RunningVm {
    /// Boot memory, MiB.
    pub boot_mib: u64,
    /// The hot-add region, when the VM has one.
    pub hotplug: Option<HotplugOptions>,
    /// The balloon, when the VM has one.
    pub balloon: Option<Arc<Mutex<Balloon>>>,
    /// virtio-mem, when the VM has it.
    pub virtio_mem: Option<Arc<Mutex<VirtioMem>>>,
    /// The memory manager, for `GET /vm/memory` and the metrics.
    pub manager: Arc<Mutex<MemoryManager>>,
}

/// How a read takes the device locks: the VMM thread waits for them; the API thread only tries,
/// and hands the request to the VMM thread when a device is busy this instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Wait,
    Try,
}

/// Why a read did not produce an answer.
#[derive(Debug)]
enum ReadError {
    /// `Access::Try` found a lock taken.
    Busy,
    Api(ApiError),
}

impl From<ApiError> for ReadError {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

fn acquire<T>(m: &Mutex<T>, how: Access) -> Result<MutexGuard<'_, T>, ReadError> {
    match how {
        Access::Wait => Ok(lock(m)),
        Access::Try => match m.try_lock() {
            Ok(g) => Ok(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => Err(ReadError::Busy),
        },
    }
}

fn no_balloon() -> ApiError {
    ApiError::not_found("no balloon: start the VM with one (--balloon or PUT /balloon)")
}

fn no_hotplug() -> ApiError {
    ApiError::not_found("no hot-add memory: start the VM with --hotplug or PUT /hotplug/memory")
}

/// The running VM as the API's GETs see it: the devices' own numbers, read under their locks,
/// plus the resize intent. Shared by the VMM thread's [`ApiHandler`] and, as
/// [`api::DirectReads`], the API thread, which answers `GET /`, `/balloon`,
/// `/balloon/statistics`, `/hotplug/memory` and `/vm/resize` itself: no channel, no wake-up of
/// the VMM thread, and the device loop never waits for an HTTP client. Each lock is held only
/// to copy numbers out, and never two at once.
pub struct VmView {
    shape: Shape,
    balloon: Option<Arc<Mutex<Balloon>>>,
    virtio_mem: Option<Arc<Mutex<VirtioMem>>>,
    resize: Mutex<Intent>,
    /// GETs answered on the API thread, and those handed to the VMM thread because a device
    /// was busy.
    direct_reads: AtomicU64,
    direct_busy: AtomicU64,
}

impl VmView {
    fn balloon(&self, how: Access) -> Result<MutexGuard<'_, Balloon>, ReadError> {
        acquire(self.balloon.as_deref().ok_or_else(no_balloon)?, how)
    }

    fn virtio_mem(&self, how: Access) -> Result<MutexGuard<'_, VirtioMem>, ReadError> {
        acquire(self.virtio_mem.as_deref().ok_or_else(no_hotplug)?, how)
    }

    /// The answer to a GET this view serves; `None` for any other request.
    fn answer(&self, request: &ApiRequest, how: Access) -> Option<Result<ApiResponse, ReadError>> {
        Some(match request {
            ApiRequest::GetInstanceInfo => Ok(ApiResponse::InstanceInfo(instance_info(
                InstanceState::Running,
            ))),
            ApiRequest::GetBalloon => self.balloon_state(how).map(ApiResponse::Balloon),
            ApiRequest::GetBalloonStats => self.balloon_stats(how).map(ApiResponse::BalloonStats),
            ApiRequest::GetHotplugMemory => self.hotplug_state(how).map(ApiResponse::HotplugMemory),
            ApiRequest::GetResize => self.resize_status(how).map(ApiResponse::Resize),
            _ => return None,
        })
    }

    fn balloon_state(&self, how: Access) -> Result<BalloonState, ReadError> {
        let b = self.balloon(how)?;
        let cfg = b.config();
        Ok(BalloonState {
            amount_mib: b.target_mib(),
            deflate_on_oom: cfg.deflate_on_oom,
            stats_polling_interval_s: b.stats_interval().as_secs().min(u16::MAX as u64) as u16,
            free_page_reporting: cfg.free_page_reporting,
            target_pages: b.target_bytes() / PAGE,
            actual_pages: b.actual_bytes() / PAGE,
            actual_mib: b.actual_bytes() >> 20,
        })
    }

    fn balloon_stats(&self, how: Access) -> Result<BalloonStats, ReadError> {
        let b = self.balloon(how)?;
        let mut s = BalloonStats {
            target_pages: b.target_bytes() / PAGE,
            actual_pages: b.actual_bytes() / PAGE,
            target_mib: b.target_mib(),
            actual_mib: b.actual_bytes() >> 20,
            ..Default::default()
        };
        if let Some(st) = b.latest_stats() {
            s.swap_in = st.get(StatTag::SwapIn);
            s.swap_out = st.get(StatTag::SwapOut);
            s.major_faults = st.get(StatTag::MajorFaults);
            s.minor_faults = st.get(StatTag::MinorFaults);
            s.free_memory = st.get(StatTag::FreeMemory);
            s.total_memory = st.get(StatTag::TotalMemory);
            s.available_memory = st.get(StatTag::AvailableMemory);
            s.disk_caches = st.get(StatTag::DiskCaches);
            s.hugetlb_allocations = st.get(StatTag::HugetlbAllocations);
            s.hugetlb_failures = st.get(StatTag::HugetlbFailures);
            s.oom_kill = st.get(StatTag::OomKills);
            s.alloc_stall = st.get(StatTag::AllocStalls);
            s.async_scan = st.get(StatTag::AsyncScans);
            s.direct_scan = st.get(StatTag::DirectScans);
            s.async_reclaim = st.get(StatTag::AsyncReclaims);
            s.direct_reclaim = st.get(StatTag::DirectReclaims);
            s.age_ms = Some(st.age().as_millis() as u64);
            s.actual_pages_at_report = Some(u64::from(st.actual_pages));
        }
        Ok(s)
    }

    fn hotplug_state(&self, how: Access) -> Result<HotplugMemoryState, ReadError> {
        let st = self.virtio_mem(how)?.state();
        Ok(HotplugMemoryState {
            total_size_mib: st.region_size >> 20,
            block_size_mib: st.block_size >> 20,
            plugged_size_mib: st.plugged_size >> 20,
            requested_size_mib: st.requested_size >> 20,
            usable_region_size_mib: st.usable_region_size >> 20,
        })
    }

    /// What the devices report now, one lock at a time.
    fn devices(&self, how: Access) -> Result<Devices, ReadError> {
        let balloon = match self.balloon.as_deref() {
            Some(b) => {
                let b = acquire(b, how)?;
                Some(BalloonNow {
                    target_bytes: b.target_bytes(),
                    actual_bytes: b.actual_bytes(),
                })
            }
            None => None,
        };
        let virtio_mem = match self.virtio_mem.as_deref() {
            Some(m) => {
                let m = acquire(m, how)?;
                Some(VirtioMemNow {
                    requested_bytes: m.requested_size(),
                    plugged_bytes: m.plugged_size(),
                })
            }
            None => None,
        };
        Ok(Devices {
            balloon,
            virtio_mem,
        })
    }

    fn resize_status(&self, how: Access) -> Result<ResizeStatus, ReadError> {
        let intent = *acquire(&self.resize, how)?;
        let now = self.devices(how)?;
        Ok(resize::status(&self.shape, &now, &intent))
    }
}

impl api::DirectReads for VmView {
    fn read(&self, request: &ApiRequest) -> Option<ApiResult> {
        match self.answer(request, Access::Try)? {
            Ok(response) => {
                self.direct_reads.fetch_add(1, Ordering::Relaxed);
                Some(Ok(response))
            }
            Err(ReadError::Api(e)) => {
                self.direct_reads.fetch_add(1, Ordering::Relaxed);
                Some(Err(e))
            }
            Err(ReadError::Busy) => {
                self.direct_busy.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}

/// Event-loop subscriber that answers API requests while the VM runs.
pub struct ApiHandler {
    rx: Receiver<ApiMessage>,
    wake: EventFd,
    view: Arc<VmView>,
    manager: Arc<Mutex<MemoryManager>>,
    /// Written by virtio-mem when its plugged size changes: a held-back balloon target waits
    /// for it.
    plugged_changed: EventFd,
    requests: u64,
}

impl ApiHandler {
    /// A handler that takes requests from `rx`, woken by `wake`, answering for `vm`.
    pub fn new(rx: Receiver<ApiMessage>, wake: EventFd, vm: RunningVm) -> std::io::Result<Self> {
        let plugged_changed = EventFd::new(EFD_NONBLOCK)?;
        if let Some(m) = vm.virtio_mem.as_deref() {
            lock(m).notify_plugged_changes(plugged_changed.try_clone()?);
        }
        let shape = Shape {
            boot_mib: vm.boot_mib,
            has_balloon: vm.balloon.is_some(),
            hotplug: vm.hotplug.map(|h| resize::Region {
                total_mib: h.total_mib,
                block_mib: h.block_mib,
            }),
        };
        Ok(Self {
            rx,
            wake,
            view: Arc::new(VmView {
                shape,
                balloon: vm.balloon,
                virtio_mem: vm.virtio_mem,
                resize: Mutex::new(Intent::default()),
                direct_reads: AtomicU64::new(0),
                direct_busy: AtomicU64::new(0),
            }),
            manager: vm.manager,
            plugged_changed,
            requests: 0,
        })
    }

    /// The view to give the API server (`ServerHandle::set_direct_reads`), so that it answers
    /// GETs on its own thread.
    pub fn view(&self) -> Arc<VmView> {
        self.view.clone()
    }

    fn devices(&self) -> Devices {
        match self.view.devices(Access::Wait) {
            Ok(d) => d,
            Err(_) => unreachable!("Access::Wait never finds a lock busy"),
        }
    }

    /// Feeds `event` to the resize decision and applies what it says.
    fn resize_event(&mut self, event: Event) -> Result<(), ApiError> {
        let intent = *lock(&self.view.resize);
        let plan = resize::decide(&self.view.shape, &self.devices(), intent, event)
            .map_err(|e| ApiError::bad_request(e.for_api()))?;
        self.apply(plan)
    }

    fn apply(&mut self, plan: Plan) -> Result<(), ApiError> {
        if let Some(mib) = plan.requested_mib {
            self.set_requested_mib(mib)?;
        }
        if let Some(mib) = plan.balloon_mib {
            self.balloon()?.set_target_mib(mib).map_err(|e| {
                ApiError::internal(format!("the balloon refused a target of {mib} MiB: {e}"))
            })?;
        }
        *lock(&self.view.resize) = plan.intent;
        Ok(())
    }

    /// A direct PATCH of either device ends any resize in progress.
    fn cancel_resize(&mut self) {
        // A direct change touches no device: it cannot fail.
        let _ = self.resize_event(Event::DirectChange);
    }

    /// virtio-mem's plugged size changed (or a resize just began): apply a held-back balloon
    /// target once virtio-mem is done unplugging.
    fn plugged_size_changed(&mut self) {
        if let Err(e) = self.resize_event(Event::PluggedChanged) {
            warn!(
                "resize: the held-back balloon target was not applied: {}",
                e.message
            );
        }
    }

    fn balloon(&self) -> Result<MutexGuard<'_, Balloon>, ApiError> {
        self.view
            .balloon
            .as_deref()
            .map(lock)
            .ok_or_else(no_balloon)
    }

    fn virtio_mem(&self) -> Result<MutexGuard<'_, VirtioMem>, ApiError> {
        self.view
            .virtio_mem
            .as_deref()
            .map(lock)
            .ok_or_else(no_hotplug)
    }

    /// Answer one request.
    pub fn handle(&mut self, request: ApiRequest) -> ApiResult {
        self.requests += 1;
        if let Some(answer) = self.view.answer(&request, Access::Wait) {
            return answer.map_err(|e| match e {
                ReadError::Api(e) => e,
                ReadError::Busy => ApiError::internal("a device lock was busy (cannot happen)"),
            });
        }
        let bad = |e: rules::RuleError| ApiError::bad_request(e.for_api());
        match request {
            ApiRequest::PutBootSource(_)
            | ApiRequest::PutMachineConfig(_)
            | ApiRequest::PutBalloon(_)
            | ApiRequest::PutHotplugMemory(_)
            | ApiRequest::Action(ActionType::InstanceStart) => Err(ApiError::conflict(format!(
                "{} is only allowed before the VM starts; it is running",
                request_name(&request)
            ))),
            ApiRequest::Action(ActionType::SendCtrlAltDel) => Err(ApiError::bad_request(
                "SendCtrlAltDel needs an emulated i8042 keyboard, which this VMM does not have; \
                 ask the guest to power off instead",
            )),
            ApiRequest::Action(ActionType::FlushMetrics) => Ok(ApiResponse::Empty),
            ApiRequest::PatchBalloon(u) => {
                self.view.balloon.as_ref().ok_or_else(no_balloon)?;
                rules::balloon_amount_mib(u.amount_mib, Some(self.view.shape.boot_mib))
                    .map_err(bad)?;
                self.cancel_resize();
                self.apply(Plan {
                    balloon_mib: Some(u.amount_mib),
                    ..Plan::default()
                })?;
                Ok(ApiResponse::Empty)
            }
            ApiRequest::PatchBalloonStats(u) => {
                let mut b = self.balloon()?;
                let queue = if b.config().stats {
                    StatsQueue::On
                } else {
                    StatsQueue::Off
                };
                let secs = u64::from(u.stats_polling_interval_s);
                rules::stats_polling_interval_s(secs, queue).map_err(bad)?;
                // Off stays off: 0 is all the rules allow then, and there is nothing to set.
                if queue == StatsQueue::On {
                    b.set_stats_interval(Duration::from_secs(secs))
                        .map_err(|e| ApiError::internal(format!("the balloon refused: {e}")))?;
                }
                Ok(ApiResponse::Empty)
            }
            ApiRequest::PatchHotplugMemory(u) => {
                self.view.virtio_mem.as_ref().ok_or_else(no_hotplug)?;
                let region = self.view.shape.hotplug.map(|h| (h.total_mib, h.block_mib));
                rules::hotplug_requested_size_mib(u.requested_size_mib, region).map_err(bad)?;
                self.cancel_resize();
                self.set_requested_mib(u.requested_size_mib)?;
                Ok(ApiResponse::Empty)
            }
            ApiRequest::PutResize(r) => {
                self.resize_event(Event::Resize {
                    desired_mib: r.desired_mib,
                })?;
                // The guest may have unplugged already, before the intent was recorded.
                self.plugged_size_changed();
                Ok(ApiResponse::Empty)
            }
            ApiRequest::GetMemory(q) => Ok(ApiResponse::Memory(self.memory_map(&q)?)),
            ApiRequest::GetMetrics => Ok(ApiResponse::Metrics(self.metrics())),
            ApiRequest::GetInstanceInfo
            | ApiRequest::GetBalloon
            | ApiRequest::GetBalloonStats
            | ApiRequest::GetHotplugMemory
            | ApiRequest::GetResize => unreachable!("answered by the view above"),
        }
    }

    fn set_requested_mib(&self, mib: u64) -> Result<(), ApiError> {
        self.virtio_mem()?
            .set_requested_size(mib << 20)
            .map_err(|e| ApiError::internal(format!("virtio-mem refused {mib} MiB: {e}")))
    }

    fn memory_map(&self, q: &MemoryQuery) -> Result<MemoryMap, ApiError> {
        let m = lock(&self.manager);
        let stats = m.stats();
        let resident = m
            .resident_bytes_by_region()
            .map_err(|e| ApiError::new(api::ApiErrorKind::Internal, format!("mincore: {e}")))?;
        let mut regions = Vec::new();
        for (r, resident_bytes) in m.regions().into_iter().zip(resident.iter().copied()) {
            let range = PageRange::new(r.guest_addr / PAGE, r.size / PAGE);
            let offline_pages = m
                .offline_runs(None, Some(range), usize::MAX)
                .iter()
                .map(|(r, _)| r.count)
                .sum();
            regions.push(MemoryRegionInfo {
                kind: match r.kind {
                    memory::RegionKind::BootRam => api::RegionKind::Ram,
                    memory::RegionKind::Hotplug { .. } => api::RegionKind::Hotplug,
                },
                guest_phys_addr: r.guest_addr,
                size_bytes: r.size,
                offline_pages,
                resident_bytes,
            });
        }
        // The query was validated by the server (pfn_end above pfn_start, both in range).
        let end = q.pfn_end.unwrap_or(rules::MAX_PFN);
        let within = PageRange::new(q.pfn_start, end.saturating_sub(q.pfn_start));
        let reasons: Vec<OfflineReason> = match q.reason {
            Some(r) => vec![r],
            None => OfflineReason::ALL.to_vec(),
        };
        let mut offline = Vec::new();
        for reason in reasons {
            let all = offline_runs(&m, reason, within);
            let pages_in_range = all.iter().map(|r| r.count).sum();
            let limit = q.limit as usize;
            let next_pfn = (all.len() > limit).then(|| all[limit].start.0);
            offline.push(OfflineRuns {
                reason,
                pages_in_range,
                runs: all
                    .iter()
                    .take(limit)
                    .map(|r| PageRun {
                        start_pfn: r.start.0,
                        pages: r.count,
                    })
                    .collect(),
                next_pfn,
            });
        }
        let guest_rss_bytes = resident.iter().sum();
        // Lock order is device before manager (vCPU threads resetting a device take both):
        // release the manager before the counters lock the devices.
        drop(m);
        Ok(MemoryMap {
            page_size: PAGE,
            regions,
            offline,
            totals: MemoryTotals {
                guest_phys_bytes: stats.total_bytes,
                online_bytes: stats.online_bytes,
                offline_bytes: stats.ballooned_bytes + stats.unplugged_bytes,
                ballooned_bytes: stats.ballooned_bytes,
                unplugged_bytes: stats.unplugged_bytes,
                discarded_bytes: stats.discarded_bytes,
            },
            host: HostMemory {
                guest_rss_bytes,
                process_rss_bytes: process_rss_bytes(),
            },
            counters: self.counters(&stats),
        })
    }

    fn counters(&self, stats: &memory::MemoryStats) -> BTreeMap<String, u64> {
        let mut c = BTreeMap::new();
        c.insert(
            "memory_refused_offline_pages".into(),
            stats.refused_offline_pages,
        );
        c.insert(
            "memory_refused_online_pages".into(),
            stats.refused_online_pages,
        );
        c.insert("memory_refused_free_pages".into(), stats.refused_free_pages);
        c.insert("memory_refused_plug_pages".into(), stats.refused_plug_pages);
        c.insert("memory_discard_calls".into(), stats.discard_calls);
        c.insert(
            "memory_free_reported_bytes".into(),
            stats.free_reported_bytes,
        );
        c.insert("memory_tracker_heap_bytes".into(), stats.tracker_heap_bytes);
        c.insert(
            "memory_tracker_compacted_leaves".into(),
            stats.tracker_compacted_leaves,
        );
        c.insert("memory_released_pages".into(), stats.released_pages);
        c.insert("memory_release_errors".into(), stats.release_errors);
        if let Some(b) = self.view.balloon.as_deref() {
            for (name, v) in lock(b).counters().named() {
                c.insert(format!("balloon_{name}"), v);
            }
        }
        if let Some(m) = self.view.virtio_mem.as_deref() {
            for (name, v) in lock(m).counters().named() {
                c.insert(format!("virtio_mem_{name}"), v);
            }
        }
        c.insert("api_vmm_thread_requests".into(), self.requests);
        c.insert(
            "api_direct_reads".into(),
            self.view.direct_reads.load(Ordering::Relaxed),
        );
        c.insert(
            "api_direct_reads_busy".into(),
            self.view.direct_busy.load(Ordering::Relaxed),
        );
        c
    }

    fn metrics(&self) -> MetricsSnapshot {
        let m = lock(&self.manager);
        let stats = m.stats();
        let rss = m.resident_bytes().unwrap_or(0);
        drop(m);
        let g = |name: &str, help: &str, v: u64| {
            MetricFamily::single(name, help, MetricKind::Gauge, v as f64)
        };
        let mut families = vec![
            g(
                "vmm_guest_memory_bytes",
                "Guest RAM, boot and hot-add",
                stats.total_bytes,
            ),
            g(
                "vmm_guest_online_bytes",
                "Guest RAM usable by the guest",
                stats.online_bytes,
            ),
            g(
                "vmm_guest_ballooned_bytes",
                "Guest RAM taken by the balloon",
                stats.ballooned_bytes,
            ),
            g(
                "vmm_guest_unplugged_bytes",
                "Hot-add memory not plugged",
                stats.unplugged_bytes,
            ),
            g(
                "vmm_guest_discarded_bytes",
                "Offline guest RAM whose host backing is released",
                stats.discarded_bytes,
            ),
            g(
                "vmm_guest_resident_bytes",
                "Host-resident bytes of guest RAM (mincore)",
                rss,
            ),
            g(
                "vmm_tracker_heap_bytes",
                "Heap held by the offline-page tracker",
                stats.tracker_heap_bytes,
            ),
        ];
        if let Some(p) = process_rss_bytes() {
            families.push(g(
                "vmm_process_resident_bytes",
                "Resident set of the VMM process",
                p,
            ));
        }
        for (name, value) in self.counters(&stats) {
            families.push(MetricFamily::single(
                &format!("vmm_{name}_total"),
                "Cumulative count (see GET /vm/memory counters)",
                MetricKind::Counter,
                value as f64,
            ));
        }
        MetricsSnapshot { families }
    }
}

/// /proc/self/statm, opened by [`open_process_stats`] (before the seccomp filters, which allow
/// no `open`) and read in place from then on.
static STATM: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();

/// Opens /proc/self/statm for [`process_rss_bytes`] while the process may still open files.
pub fn open_process_stats() -> std::io::Result<()> {
    let f = std::fs::File::open("/proc/self/statm")?;
    let _ = STATM.set(f);
    Ok(())
}

/// The VMM process's resident set, from /proc/self/statm.
pub fn process_rss_bytes() -> Option<u64> {
    let s = match STATM.get() {
        Some(f) => {
            use std::os::unix::fs::FileExt;
            let mut buf = [0u8; 256];
            let n = f.read_at(&mut buf, 0).ok()?;
            String::from_utf8_lossy(&buf[..n]).into_owned()
        }
        None => std::fs::read_to_string("/proc/self/statm").ok()?,
    };
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * PAGE)
}

impl MutEventSubscriber for ApiHandler {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.wake, EventSet::IN)) {
            warn!("API: cannot watch the wake-up eventfd: {e:?}");
        }
        if let Err(e) = ops.add(Events::new(&self.plugged_changed, EventSet::IN)) {
            warn!("API: cannot watch virtio-mem's plugged size: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.plugged_changed.as_raw_fd() {
            let _ = self.plugged_changed.read();
            self.plugged_size_changed();
            return;
        }
        if events.fd() != self.wake.as_raw_fd() {
            return;
        }
        let _ = self.wake.read();
        loop {
            match self.rx.try_recv() {
                Ok(msg) => {
                    let (request, responder) = msg.into_parts();
                    let result = self.handle(request);
                    responder.respond(result);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    let _ = ops.remove(Events::new(&self.wake, EventSet::IN));
                    break;
                }
            }
        }
    }
}

/// Every run of offline pages of `reason` within `within`, in address order. Ballooned and
/// unplugged are the manager's runs; discarded (offline pages whose host backing is released,
/// of either reason) comes from the tracker's marks.
fn offline_runs(m: &MemoryManager, reason: OfflineReason, within: PageRange) -> Vec<PageRange> {
    match reason {
        OfflineReason::Ballooned | OfflineReason::Unplugged => {
            let r = if reason == OfflineReason::Ballooned {
                Reason::Ballooned
            } else {
                Reason::Unplugged
            };
            m.offline_runs(Some(r), Some(within), usize::MAX)
                .into_iter()
                .map(|(range, _)| range)
                .collect()
        }
        OfflineReason::Discarded => {
            let mut out: Vec<PageRange> = Vec::new();
            let chunks = m
                .tracker()
                .marked_runs(Some((within.start.0, within.end())));
            for c in chunks.filter(|c| c.marks.contains(Mark::Discarded)) {
                match out.last_mut() {
                    Some(last) if last.end() == c.start => last.count += c.len,
                    _ => out.push(PageRange::new(c.start, c.len)),
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A handler over 64 MiB of boot RAM with `runs` (start, pages) ballooned, no devices.
    fn handler_with(runs: &[(u64, u64)]) -> ApiHandler {
        let spec = memory::RegionSpec {
            guest_addr: 0,
            size: 64 << 20,
            backing: memory::Backing::PrivateAnonymous,
            kind: memory::RegionKind::BootRam,
        };
        let mut m = MemoryManager::new(&[spec], Box::new(balloon::testing::NoSlots)).unwrap();
        let ranges: Vec<PageRange> = runs.iter().map(|&(s, n)| PageRange::new(s, n)).collect();
        let ranges = memory::PageRanges::from_ranges(&ranges, m.ram());
        m.offline(&ranges).unwrap();
        let (_tx, rx) = std::sync::mpsc::channel();
        let vm = RunningVm {
            boot_mib: 64,
            hotplug: None,
            balloon: None,
            virtio_mem: None,
            manager: Arc::new(Mutex::new(m)),
        };
        ApiHandler::new(rx, EventFd::new(EFD_NONBLOCK).unwrap(), vm).unwrap()
    }

    fn ballooned(h: &mut ApiHandler, q: MemoryQuery) -> OfflineRuns {
        match h.handle(ApiRequest::GetMemory(q)) {
            Ok(ApiResponse::Memory(m)) => m.offline.into_iter().next().unwrap(),
            other => panic!("{other:?}"),
        }
    }

    /// Sorted, disjoint, non-adjacent runs inside 64 MiB (16384 pages).
    fn runs() -> impl Strategy<Value = Vec<(u64, u64)>> {
        prop::collection::vec((1u64..200, 1u64..200), 0..40).prop_map(|parts| {
            let mut pfn = 0;
            parts
                .into_iter()
                .map(|(gap, pages)| {
                    pfn += gap;
                    let run = (pfn, pages);
                    pfn += pages;
                    run
                })
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        /// Following `next_pfn` from `pfn_start` visits exactly the offline pages of the range,
        /// each once, in order, never more than `limit` runs at a time, and `pages_in_range`
        /// counts them all: what `GET /vm/memory` documents.
        #[test]
        fn paging_visits_the_range_exactly(
            runs in runs(),
            start in 0u64..20_000,
            len in prop::option::of(1u64..20_000),
            limit in 1u32..8,
        ) {
            let mut h = handler_with(&runs);
            let end = len.map(|l| start + l);
            let expected: Vec<u64> = runs
                .iter()
                .flat_map(|&(s, n)| s..s + n)
                .filter(|p| *p >= start && end.is_none_or(|e| *p < e))
                .collect();
            let mut q = MemoryQuery { reason: Some(OfflineReason::Ballooned), pfn_start: start, pfn_end: end, limit };
            prop_assert_eq!(ballooned(&mut h, q).pages_in_range, expected.len() as u64);
            let mut seen = Vec::new();
            loop {
                let page = ballooned(&mut h, q);
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
}
