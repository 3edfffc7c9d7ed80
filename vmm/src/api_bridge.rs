//! The VMM's side of the REST API: answers typed requests from the `api` crate's server.
//!
//! Two phases:
//! - **before start** ([`configure_until_start`]): `main` waits on the request channel, fills a
//!   [`PartialConfig`] from `PUT /boot-source`, `/machine-config`, `/balloon`, `/hotplug/memory`,
//!   and boots on `PUT /actions InstanceStart` (answering only once the VM really started, or
//!   with the reason it could not);
//! - **running** ([`ApiHandler`]): an event-loop subscriber woken by an eventfd drains the
//!   channel and answers from the devices and the memory manager. Nothing here blocks a vCPU.
//!
//! `PUT /vm/resize` picks the mechanism: below the boot size the balloon shrinks the guest,
//! above it virtio-mem plugs hot-add memory; the other one is released, so they never pull
//! against each other.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use api::{
    ActionType, ApiError, ApiMessage, ApiRequest, ApiResponse, ApiResult, BalloonState,
    BalloonStats, HostMemory, HotplugMemoryState, InstanceInfo, InstanceState, MemoryMap,
    MemoryQuery, MemoryRegionInfo, MemoryTotals, MetricFamily, MetricKind, MetricsSnapshot,
    OfflineReason, OfflineRuns, PageRun, ResizeMechanism, ResizeState, ResizeStatus,
};
use balloon::{Balloon, StatTag, VirtioMem};
use event_manager::{EventOps, Events, MutEventSubscriber};
use log::warn;
use memory::{MemoryManager, PageRange, Reason};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::config::{BalloonOptions, HotplugOptions, PartialConfig, VmConfig};

const PAGE: u64 = 4096;

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn instance_info(state: InstanceState) -> InstanceInfo {
    InstanceInfo {
        id: format!("vmm-{}", std::process::id()),
        state,
        vmm_version: env!("CARGO_PKG_VERSION").to_string(),
        app_name: "vmm".to_string(),
    }
}

/// What `main` should do after the configuration phase.
pub enum StartDecision {
    /// Boot this configuration; `reply` (if any) is answered once the VM started.
    Start {
        config: VmConfig,
        reply: Option<api::bridge::Responder>,
    },
    /// The API server went away before a start was asked.
    ChannelClosed,
}

fn balloon_options(b: &api::BalloonConfig) -> BalloonOptions {
    BalloonOptions {
        amount_mib: b.amount_mib,
        deflate_on_oom: b.deflate_on_oom,
        stats_interval_s: b.stats_polling_interval_s as u64,
        free_page_reporting: b.free_page_reporting,
    }
}

/// Answer pre-boot requests until `InstanceStart` with a valid configuration.
pub fn configure_until_start(
    rx: &Receiver<ApiMessage>,
    partial: &mut PartialConfig,
) -> StartDecision {
    loop {
        let Ok(msg) = rx.recv() else {
            return StartDecision::ChannelClosed;
        };
        let (request, responder) = msg.into_parts();
        let result: ApiResult = match request {
            ApiRequest::GetInstanceInfo => {
                Ok(ApiResponse::InstanceInfo(instance_info(InstanceState::NotStarted)))
            }
            ApiRequest::PutBootSource(b) => {
                partial.kernel = Some(b.kernel_image_path.into());
                partial.initramfs = b.initrd_path.map(Into::into);
                partial.cmdline = b.boot_args;
                Ok(ApiResponse::Empty)
            }
            ApiRequest::PutMachineConfig(m) => {
                partial.vcpus = Some(m.vcpu_count);
                partial.memory_mib = Some(m.mem_size_mib);
                Ok(ApiResponse::Empty)
            }
            ApiRequest::PutBalloon(b) => {
                partial.balloon = Some(balloon_options(&b));
                Ok(ApiResponse::Empty)
            }
            ApiRequest::PutHotplugMemory(h) => {
                let opts = HotplugOptions {
                    total_mib: h.total_size_mib,
                    block_mib: h.block_size_mib,
                    requested_mib: 0,
                };
                match opts.validate() {
                    Ok(()) => {
                        partial.hotplug = Some(opts);
                        Ok(ApiResponse::Empty)
                    }
                    Err(e) => Err(ApiError::bad_request(e.to_string())),
                }
            }
            ApiRequest::GetBalloon => match &partial.balloon {
                Some(b) => Ok(ApiResponse::Balloon(BalloonState {
                    amount_mib: b.amount_mib,
                    deflate_on_oom: b.deflate_on_oom,
                    stats_polling_interval_s: b.stats_interval_s as u16,
                    free_page_reporting: b.free_page_reporting,
                    target_pages: b.amount_mib << 8,
                    actual_pages: 0,
                    actual_mib: 0,
                })),
                None => Err(ApiError::not_found("no balloon is configured")),
            },
            ApiRequest::Action(ActionType::InstanceStart) => {
                if partial.kernel.is_none() {
                    Err(ApiError::bad_request(
                        "no kernel: PUT /boot-source {\"kernel_image_path\": ...} first",
                    ))
                } else {
                    match VmConfig::from_partial(partial.clone()) {
                        Ok(config) => {
                            return StartDecision::Start {
                                config,
                                reply: Some(responder),
                            }
                        }
                        Err(e) => Err(ApiError::bad_request(e.to_string())),
                    }
                }
            }
            ApiRequest::Action(ActionType::FlushMetrics) => Ok(ApiResponse::Empty),
            other => Err(ApiError::conflict(format!(
                "{} needs a running VM; configure it and PUT /actions {{\"action_type\": \"InstanceStart\"}} first",
                request_name(&other)
            ))),
        };
        responder.respond(result);
    }
}

fn request_name(r: &ApiRequest) -> &'static str {
    match r {
        ApiRequest::GetInstanceInfo => "GET /",
        ApiRequest::PutBootSource(_) => "PUT /boot-source",
        ApiRequest::PutMachineConfig(_) => "PUT /machine-config",
        ApiRequest::Action(_) => "PUT /actions",
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
    pub boot_mib: u64,
    pub hotplug: Option<HotplugOptions>,
    pub balloon: Option<Arc<Mutex<Balloon>>>,
    pub virtio_mem: Option<Arc<Mutex<VirtioMem>>>,
    pub manager: Arc<Mutex<MemoryManager>>,
}

/// Event-loop subscriber that answers API requests while the VM runs.
pub struct ApiHandler {
    rx: Receiver<ApiMessage>,
    wake: EventFd,
    vm: RunningVm,
    desired_mib: Option<u64>,
    /// Whether the current resize needs both devices (it crosses the boot size).
    crossing: bool,
    /// A balloon target held back until virtio-mem has finished unplugging: inflating while
    /// Linux unplugs makes it migrate balloon pages out of the blocks it is emptying.
    pending_balloon_mib: Option<u64>,
    /// Polls virtio-mem progress while a balloon target is held back.
    resize_timer: TimerFd,
    requests: u64,
}

impl ApiHandler {
    pub fn new(rx: Receiver<ApiMessage>, wake: EventFd, vm: RunningVm) -> std::io::Result<Self> {
        Ok(Self {
            rx,
            wake,
            vm,
            desired_mib: None,
            crossing: false,
            pending_balloon_mib: None,
            resize_timer: TimerFd::new()
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?,
            requests: 0,
        })
    }

    /// A direct PATCH of either device ends any resize in progress.
    fn cancel_resize(&mut self) {
        self.desired_mib = None;
        self.crossing = false;
        self.pending_balloon_mib = None;
        let _ = self.resize_timer.clear();
    }

    /// Timer tick: apply the held-back balloon target once virtio-mem is done unplugging.
    fn resize_tick(&mut self) {
        let Some(mib) = self.pending_balloon_mib else {
            let _ = self.resize_timer.clear();
            return;
        };
        let unplugged = self.vm.virtio_mem.as_deref().is_none_or(|m| {
            let m = lock(m);
            m.plugged_size() <= m.requested_size()
        });
        if unplugged {
            self.pending_balloon_mib = None;
            let _ = self.resize_timer.clear();
            if let Ok(mut b) = self.balloon() {
                if let Err(e) = b.set_target_mib(mib) {
                    warn!("resize: balloon target {mib} MiB refused: {e}");
                }
            }
        }
    }

    fn balloon(&self) -> Result<MutexGuard<'_, Balloon>, ApiError> {
        self.vm.balloon.as_deref().map(lock).ok_or_else(|| {
            ApiError::not_found("no balloon: start the VM with one (--balloon or PUT /balloon)")
        })
    }

    fn virtio_mem(&self) -> Result<MutexGuard<'_, VirtioMem>, ApiError> {
        self.vm.virtio_mem.as_deref().map(lock).ok_or_else(|| {
            ApiError::not_found(
                "no hot-add memory: start the VM with --hotplug or PUT /hotplug/memory",
            )
        })
    }

    /// Answer one request.
    pub fn handle(&mut self, request: ApiRequest) -> ApiResult {
        self.requests += 1;
        match request {
            ApiRequest::GetInstanceInfo => Ok(ApiResponse::InstanceInfo(instance_info(
                InstanceState::Running,
            ))),
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
                self.cancel_resize();
                let boot = self.vm.boot_mib;
                self.balloon()?.set_target_mib(u.amount_mib).map_err(|e| {
                    ApiError::bad_request(format!(
                        "amount_mib: {} is out of range 0..{boot} (the guest's boot memory): {e}",
                        u.amount_mib
                    ))
                })?;
                Ok(ApiResponse::Empty)
            }
            ApiRequest::GetBalloon => Ok(ApiResponse::Balloon(self.balloon_state()?)),
            ApiRequest::GetBalloonStats => self.balloon_stats(),
            ApiRequest::PatchBalloonStats(u) => {
                self.balloon()?
                    .set_stats_interval(Duration::from_secs(u.stats_polling_interval_s as u64))
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
                Ok(ApiResponse::Empty)
            }
            ApiRequest::PatchHotplugMemory(u) => {
                self.cancel_resize();
                self.set_requested_mib(u.requested_size_mib)?;
                Ok(ApiResponse::Empty)
            }
            ApiRequest::GetHotplugMemory => Ok(ApiResponse::HotplugMemory(self.hotplug_state()?)),
            ApiRequest::PutResize(r) => {
                self.resize(r.desired_mib)?;
                Ok(ApiResponse::Empty)
            }
            ApiRequest::GetResize => Ok(ApiResponse::Resize(self.resize_status())),
            ApiRequest::GetMemory(q) => Ok(ApiResponse::Memory(self.memory_map(&q)?)),
            ApiRequest::GetMetrics => Ok(ApiResponse::Metrics(self.metrics())),
        }
    }

    fn set_requested_mib(&self, mib: u64) -> Result<(), ApiError> {
        self.virtio_mem()?
            .set_requested_size(mib << 20)
            .map_err(|e| ApiError::bad_request(e.to_string()))
    }

    fn balloon_state(&self) -> Result<BalloonState, ApiError> {
        let b = self.balloon()?;
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

    fn balloon_stats(&self) -> ApiResult {
        let b = self.balloon()?;
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
        }
        Ok(ApiResponse::BalloonStats(s))
    }

    fn hotplug_state(&self) -> Result<HotplugMemoryState, ApiError> {
        let m = self.virtio_mem()?;
        let st = m.state();
        Ok(HotplugMemoryState {
            total_size_mib: st.region_size >> 20,
            block_size_mib: st.block_size >> 20,
            plugged_size_mib: st.plugged_size >> 20,
            requested_size_mib: st.requested_size >> 20,
            usable_region_size_mib: st.usable_region_size >> 20,
        })
    }

    /// One size for the guest: balloon below the boot size, virtio-mem above it.
    fn resize(&mut self, desired: u64) -> Result<(), ApiError> {
        let boot = self.vm.boot_mib;
        let hot = self.vm.hotplug.map_or(0, |h| h.total_mib);
        if desired > boot + hot {
            return Err(ApiError::bad_request(format!(
                "desired_mib {desired} is above the most this VM can have: {} MiB ({boot} MiB of \
                 boot memory plus {hot} MiB of hot-add memory)",
                boot + hot
            )));
        }
        if desired < boot && self.vm.balloon.is_none() {
            return Err(ApiError::bad_request(format!(
                "desired_mib {desired} is below the boot memory ({boot} MiB) and the VM has no balloon"
            )));
        }
        if desired > boot && self.vm.virtio_mem.is_none() {
            return Err(ApiError::bad_request(format!(
                "desired_mib {desired} is above the boot memory ({boot} MiB) and the VM has no hot-add memory"
            )));
        }
        let plug_mib = match self.vm.hotplug {
            Some(h) => desired.saturating_sub(boot).div_ceil(h.block_mib) * h.block_mib,
            None => 0,
        };
        let balloon_mib = boot.saturating_sub(desired);
        let plugged_now = self
            .vm
            .virtio_mem
            .as_deref()
            .map_or(0, |m| lock(m).plugged_size());
        let ballooned_now = self
            .vm
            .balloon
            .as_deref()
            .map_or(0, |b| lock(b).target_bytes());
        self.cancel_resize();
        if self.vm.virtio_mem.is_some() {
            self.set_requested_mib(plug_mib)?;
        }
        if self.vm.balloon.is_some() {
            if balloon_mib > 0 && plugged_now > (plug_mib << 20) {
                // Down across the boot size: unplug first, inflate once that is done.
                self.pending_balloon_mib = Some(balloon_mib);
                let tick = Duration::from_millis(100);
                self.resize_timer.reset(tick, Some(tick)).map_err(|e| {
                    ApiError::new(api::ApiErrorKind::Internal, format!("timer: {e}"))
                })?;
            } else {
                // Deflating and plugging do not compete: both give the guest memory.
                self.balloon()?
                    .set_target_mib(balloon_mib)
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
            }
        }
        self.crossing = (balloon_mib > 0 && plugged_now > 0) || (plug_mib > 0 && ballooned_now > 0);
        self.desired_mib = Some(desired);
        Ok(())
    }

    fn current_mib(&self) -> u64 {
        let ballooned = self
            .vm
            .balloon
            .as_deref()
            .map_or(0, |b| lock(b).actual_bytes() >> 20);
        let plugged = self
            .vm
            .virtio_mem
            .as_deref()
            .map_or(0, |m| lock(m).plugged_size() >> 20);
        self.vm.boot_mib - ballooned.min(self.vm.boot_mib) + plugged
    }

    fn resize_status(&self) -> ResizeStatus {
        let current = self.current_mib();
        let Some(desired) = self.desired_mib else {
            return ResizeStatus {
                desired_mib: current,
                current_mib: current,
                mechanism: ResizeMechanism::None,
                state: ResizeState::Idle,
            };
        };
        let boot = self.vm.boot_mib;
        let mechanism = match desired.cmp(&boot) {
            _ if self.crossing => ResizeMechanism::Both,
            std::cmp::Ordering::Less => ResizeMechanism::Balloon,
            std::cmp::Ordering::Greater => ResizeMechanism::VirtioMem,
            std::cmp::Ordering::Equal => ResizeMechanism::None,
        };
        // Reached when both devices report their targets; plugging rounds up to whole blocks.
        let balloon_done = self.vm.balloon.as_deref().is_none_or(|b| {
            let b = lock(b);
            b.actual_bytes() == b.target_bytes()
        });
        let mem_done = self.vm.virtio_mem.as_deref().is_none_or(|m| {
            let m = lock(m);
            m.plugged_size() == m.requested_size()
        });
        ResizeStatus {
            desired_mib: desired,
            current_mib: current,
            mechanism,
            state: if balloon_done && mem_done && self.pending_balloon_mib.is_none() {
                ResizeState::Reached
            } else {
                ResizeState::InProgress
            },
        }
    }

    fn memory_map(&self, q: &MemoryQuery) -> Result<MemoryMap, ApiError> {
        let m = lock(&self.vm.manager);
        let stats = m.stats();
        let mut regions = Vec::new();
        for r in m.regions() {
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
            });
        }
        let end = q.pfn_end.unwrap_or(u64::MAX >> 12);
        if end <= q.pfn_start {
            return Err(ApiError::bad_request(format!(
                "pfn_end {end:#x} must be above pfn_start {:#x}",
                q.pfn_start
            )));
        }
        let within = PageRange::new(q.pfn_start, end - q.pfn_start);
        let reasons: Vec<OfflineReason> = match q.reason {
            Some(OfflineReason::Discarded) => {
                return Err(ApiError::bad_request(
                    "reason=discarded is not listed run by run; totals.discarded_bytes has the amount. \
                     Ask for ballooned or unplugged",
                ))
            }
            Some(r) => vec![r],
            None => vec![OfflineReason::Ballooned, OfflineReason::Unplugged],
        };
        let mut offline = Vec::new();
        for reason in reasons {
            let r = match reason {
                OfflineReason::Ballooned => Reason::Ballooned,
                _ => Reason::Unplugged,
            };
            let all = m.offline_runs(Some(r), Some(within), usize::MAX);
            let pages_in_range = all.iter().map(|(r, _)| r.count).sum();
            let limit = q.limit as usize;
            let next_pfn = (all.len() > limit).then(|| all[limit].0.start.0);
            offline.push(OfflineRuns {
                reason,
                pages_in_range,
                runs: all
                    .iter()
                    .take(limit)
                    .map(|(r, _)| PageRun {
                        start_pfn: r.start.0,
                        pages: r.count,
                    })
                    .collect(),
                next_pfn,
            });
        }
        let guest_rss_bytes = m
            .resident_bytes()
            .map_err(|e| ApiError::new(api::ApiErrorKind::Internal, format!("mincore: {e}")))?;
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
        if let Some(b) = self.vm.balloon.as_deref() {
            let k = lock(b).counters();
            c.insert("balloon_inflated_pages".into(), k.inflated_pages);
            c.insert("balloon_deflated_pages".into(), k.deflated_pages);
            c.insert("balloon_refused_pfns".into(), k.refused_pfns);
            c.insert("balloon_duplicate_pfns".into(), k.duplicate_pfns);
            c.insert("balloon_malformed_buffers".into(), k.malformed_buffers);
            c.insert(
                "balloon_config_writes_refused".into(),
                k.config_writes_refused,
            );
            c.insert("balloon_stats_updates".into(), k.stats_updates);
        }
        if let Some(m) = self.vm.virtio_mem.as_deref() {
            let k = lock(m).counters();
            c.insert("virtio_mem_plug_requests".into(), k.plug_requests);
            c.insert("virtio_mem_unplug_requests".into(), k.unplug_requests);
            c.insert("virtio_mem_acks".into(), k.acks);
            c.insert("virtio_mem_nacks".into(), k.nacks);
            c.insert("virtio_mem_errors".into(), k.errors);
            c.insert("virtio_mem_malformed_buffers".into(), k.malformed_buffers);
        }
        c.insert("api_requests".into(), self.requests);
        c
    }

    fn metrics(&self) -> MetricsSnapshot {
        let m = lock(&self.vm.manager);
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

/// The VMM process's resident set, from /proc/self/statm.
pub fn process_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * PAGE)
}

impl MutEventSubscriber for ApiHandler {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.wake, EventSet::IN)) {
            warn!("API: cannot watch the wake-up eventfd: {e:?}");
        }
        if let Err(e) = ops.add(Events::new(&self.resize_timer, EventSet::IN)) {
            warn!("API: cannot watch the resize timer: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.resize_timer.as_raw_fd() {
            let _ = self.resize_timer.wait();
            self.resize_tick();
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
