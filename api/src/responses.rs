//! Bodies the VMM fills and the server sends back.
//!
//! Unlike the request types these accept unknown fields when deserialized, so an older `vmmctl`
//! keeps working against a newer VMM that reports more.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::requests::OfflineReason;

/// `GET /` instance state, spelt as Firecracker spells it. (A VM that stopped has no API: the
/// VMM process ends with it.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Configured (or not yet), not booted.
    #[serde(rename = "Not started")]
    NotStarted,
    /// Booted and running.
    Running,
}

/// `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// The instance id, `vmm-` and the VMM's process id.
    pub id: String,
    /// Whether the VM runs.
    pub state: InstanceState,
    /// The VMM's version.
    pub vmm_version: String,
    /// The program's name.
    pub app_name: String,
}

/// `GET /balloon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    /// The configured target, as last set by PUT or PATCH.
    pub amount_mib: u64,
    /// Whether the guest may deflate under memory pressure.
    pub deflate_on_oom: bool,
    /// Seconds between statistics requests; 0 when the guest is not asked.
    pub stats_polling_interval_s: u16,
    /// Whether free page reporting is on.
    pub free_page_reporting: bool,
    /// `num_pages` in the device config: the target in 4 KiB pages.
    pub target_pages: u64,
    /// `actual` as the driver last wrote it: pages the guest has given.
    pub actual_pages: u64,
    /// `actual_pages` in MiB.
    pub actual_mib: u64,
}

/// `GET /balloon/statistics`: the guest's last statistics report plus the balloon's size.
/// A tag the guest did not send is absent (`None`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    /// The target, 4 KiB pages.
    pub target_pages: u64,
    /// Pages the guest has given.
    pub actual_pages: u64,
    /// The target, MiB.
    pub target_mib: u64,
    /// What the guest has given, MiB.
    pub actual_mib: u64,
    /// Tag 0: memory swapped in, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    /// Tag 1: memory swapped out, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    /// Tag 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    /// Tag 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    /// Tag 4, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    /// Tag 5, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    /// Tag 6, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    /// Tag 7, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    /// Tag 8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    /// Tag 9.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
    /// Tag 10 (Linux 6.12).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_kill: Option<u64>,
    /// Tag 11 (Linux 6.12).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alloc_stall: Option<u64>,
    /// Tag 12 (Linux 6.12).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_scan: Option<u64>,
    /// Tag 13 (Linux 6.12).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_scan: Option<u64>,
    /// Tag 14 (Linux 6.12).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_reclaim: Option<u64>,
    /// Tag 15 (Linux 6.12).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_reclaim: Option<u64>,
    /// Age of the last statistics report; absent before the first one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_ms: Option<u64>,
    /// `actual_pages` when that report arrived: with deflate-on-OOM the guest counts its ballooned
    /// pages in `total_memory` as used, so its working set is total - available - these pages,
    /// each of the same moment. Absent before the first report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_pages_at_report: Option<u64>,
}

/// `GET /hotplug/memory`: the virtio-mem device's view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HotplugMemoryState {
    /// Size of the hot-add region.
    pub total_size_mib: u64,
    /// virtio-mem block size: the unit of plug and unplug.
    pub block_size_mib: u64,
    /// How much is plugged now.
    pub plugged_size_mib: u64,
    /// How much the host asks the guest to have plugged.
    pub requested_size_mib: u64,
    /// How much of the region the guest may plug into.
    pub usable_region_size_mib: u64,
}

/// Which device a resize uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMechanism {
    /// No resize requested yet, or already at the size.
    None,
    /// Shrink or grow below the boot size.
    Balloon,
    /// Grow above the boot size by plugging hot-add memory, or unplug it again.
    VirtioMem,
    /// Crossing the boot size: one device is released first, then the other acts.
    Both,
}

/// Progress of the last `PUT /vm/resize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeState {
    /// No resize requested yet.
    Idle,
    /// The devices are moving towards `desired_mib`.
    InProgress,
    /// The guest reached `desired_mib`.
    Reached,
}

/// `GET /vm/resize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResizeStatus {
    /// The size asked for by the last `PUT /vm/resize` (the boot size before one).
    pub desired_mib: u64,
    /// Memory the guest can use now: boot RAM minus balloon plus plugged hot-add memory.
    pub current_mib: u64,
    /// Which device the resize uses.
    pub mechanism: ResizeMechanism,
    /// How far it got.
    pub state: ResizeState,
}

/// Kind of a guest physical memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegionKind {
    /// Boot RAM, in the e820 map.
    Ram,
    /// The virtio-mem hot-add region.
    Hotplug,
}

/// One guest physical memory region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionInfo {
    /// Boot RAM or hot-add region.
    pub kind: RegionKind,
    /// Guest physical address of the region's first byte.
    pub guest_phys_addr: u64,
    /// Size of the region.
    pub size_bytes: u64,
    /// Offline pages inside this region (any reason but `discarded`, which is a subset).
    pub offline_pages: u64,
    /// Host-resident bytes of this region's backing (mincore): a hot-add region with nothing
    /// plugged holds none.
    pub resident_bytes: u64,
}

/// A run of consecutive offline pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    /// First page of the run (4 KiB page frame number).
    pub start_pfn: u64,
    /// Length of the run in pages.
    pub pages: u64,
}

/// The runs of one reason inside the queried range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfflineRuns {
    /// The reason these runs are offline for.
    pub reason: OfflineReason,
    /// Pages with this reason inside the queried range (all of them, not only this page).
    pub pages_in_range: u64,
    /// At most `limit` runs, in PFN order, clipped to the range.
    pub runs: Vec<PageRun>,
    /// Where to continue (`pfn_start`) when more runs remain; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_pfn: Option<u64>,
}

/// Byte totals over the whole guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryTotals {
    /// Boot RAM plus the whole hot-add region.
    pub guest_phys_bytes: u64,
    /// What the guest can use.
    pub online_bytes: u64,
    /// What the guest cannot use: ballooned plus unplugged.
    pub offline_bytes: u64,
    /// Taken by the balloon.
    pub ballooned_bytes: u64,
    /// Hot-add memory not plugged.
    pub unplugged_bytes: u64,
    /// Offline bytes whose host backing was given back.
    pub discarded_bytes: u64,
}

/// What the host holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostMemory {
    /// Resident set of the guest memory mappings.
    pub guest_rss_bytes: u64,
    /// Resident set of the whole VMM process, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_rss_bytes: Option<u64>,
}

/// `GET /vm/memory`: where the guest's memory is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryMap {
    /// Bytes per page in the PFNs and page counts: 4096.
    pub page_size: u64,
    /// Each guest physical memory region.
    pub regions: Vec<MemoryRegionInfo>,
    /// One entry per reason asked for.
    pub offline: Vec<OfflineRuns>,
    /// Totals over the whole guest.
    pub totals: MemoryTotals,
    /// What the host holds for this VM.
    pub host: HostMemory,
    /// Named event counters of the memory manager and devices.
    pub counters: BTreeMap<String, u64>,
}

/// Prometheus metric type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    /// Only goes up (Prometheus `counter`).
    Counter,
    /// May go up and down (Prometheus `gauge`).
    Gauge,
}

/// One sample of a family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricSample {
    /// Label names and values, in the order they are rendered.
    pub labels: Vec<(String, String)>,
    /// The sample's value.
    pub value: f64,
}

/// A metric family the VMM reports for `GET /metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricFamily {
    /// `[a-zA-Z_:][a-zA-Z0-9_:]*`; families with other names are dropped and counted.
    pub name: String,
    /// The `# HELP` text.
    pub help: String,
    /// Counter or gauge.
    pub kind: MetricKind,
    /// One sample per label set.
    pub samples: Vec<MetricSample>,
}

impl MetricFamily {
    /// A family with one unlabelled sample.
    pub fn single(name: &str, help: &str, kind: MetricKind, value: f64) -> Self {
        Self {
            name: name.into(),
            help: help.into(),
            kind,
            samples: vec![MetricSample {
                labels: Vec::new(),
                value,
            }],
        }
    }
}

/// What the VMM answers to `ApiRequest::GetMetrics`; the server adds its own and renders text.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricsSnapshot {
    /// Every family, in the order they are rendered.
    pub families: Vec<MetricFamily>,
}
