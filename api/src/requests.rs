//! Bodies and queries a client sends, with their validation.
//!
//! Every type here rejects unknown fields (`deny_unknown_fields`), so a misspelt field is a 400
//! naming the field instead of a silently ignored setting. `validate` checks what serde cannot,
//! with the rules of [`crate::rules`] (the same the VMM applies to its command line): errors
//! name the field, the value with its unit, and what is allowed. They are checked before
//! anything reaches the VMM, so a rejected request never changes state.
//!
//! Sizes are in MiB as in Firecracker's API; page numbers (PFNs) are in 4 KiB units. Optional
//! fields may be sent as `null`, which means the same as leaving them out.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::rules::{self, Field, StatsQueue};
pub use crate::rules::{
    RuleError, DEFAULT_RUN_LIMIT, HOTPLUG_ALIGN_MIB, MAX_BLOCK_SIZE_MIB, MAX_BOOT_ARGS_LEN,
    MAX_MEM_MIB, MAX_RUN_LIMIT, MAX_STATS_POLLING_INTERVAL_S, MIN_BLOCK_SIZE_MIB, MIN_MEM_MIB,
};

/// vCPU ids must fit an xAPIC id (0..=254).
pub const MAX_VCPUS: u8 = rules::MAX_VCPUS as u8;

/// A value that serde accepted but that breaks a rule (see [`crate::rules`]).
pub type ValidationError = RuleError;

/// Checks that serde cannot express.
pub trait Validate {
    /// `Ok` when every rule of [`crate::rules`] holds for this value, else the first broken one.
    fn validate(&self) -> Result<(), ValidationError>;
}

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSourceConfig {
    /// Host path of the kernel (bzImage or ELF vmlinux).
    pub kernel_image_path: String,
    /// Host path of an initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

impl Validate for BootSourceConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        rules::host_path(Field::KernelImagePath, &self.kernel_image_path)?;
        if let Some(p) = &self.initrd_path {
            rules::host_path(Field::InitrdPath, p)?;
        }
        if let Some(args) = &self.boot_args {
            rules::boot_args(args)?;
        }
        Ok(())
    }
}

/// Firecracker's `huge_pages` of `PUT /machine-config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// 4 KiB pages (the default).
    None,
    /// Transparent huge pages (`madvise(MADV_HUGEPAGE)`): the command line's `--thp`.
    Transparent,
    /// hugetlbfs 2 MiB pages: not supported here, refused with a reason.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// `PUT /machine-config`. Besides the two sizes it takes Firecracker's optional fields with the
/// values this VMM implements, so Firecracker's clients, which always send them, work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs, 1 to 254.
    pub vcpu_count: u8,
    /// Boot memory size. Hot-add memory is configured with `PUT /hotplug/memory`.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading: only `false` (one thread per core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// Dirty page tracking (for Firecracker's diff snapshots): only `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// Page size backing guest memory: `None` (4 KiB) or `Transparent` (`--thp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
    /// Firecracker's CPU templates: only `"None"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
}

impl MachineConfig {
    /// Just the sizes, every optional field left out.
    pub fn new(vcpu_count: u8, mem_size_mib: u64) -> Self {
        Self {
            vcpu_count,
            mem_size_mib,
            smt: None,
            track_dirty_pages: None,
            huge_pages: None,
            cpu_template: None,
        }
    }

    /// Whether guest memory is to be backed by transparent huge pages.
    pub fn thp(&self) -> bool {
        self.huge_pages == Some(HugePages::Transparent)
    }
}

impl Validate for MachineConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        rules::vcpu_count(u64::from(self.vcpu_count))?;
        rules::mem_size_mib(self.mem_size_mib)?;
        rules::off_only(
            Field::Smt,
            self.smt == Some(true),
            "the guest's vCPUs are single-threaded cores",
        )?;
        rules::off_only(
            Field::TrackDirtyPages,
            self.track_dirty_pages == Some(true),
            "this VMM takes no snapshots, so it tracks no dirty pages",
        )?;
        if self.huge_pages == Some(HugePages::Hugetlbfs2M) {
            return Err(RuleError::new(
                Field::HugePages,
                "\"2M\" (hugetlbfs) is not supported: guest memory is 4 KiB pages (\"None\") or \
                 transparent huge pages (\"Transparent\")",
            ));
        }
        match self.cpu_template.as_deref() {
            None | Some("None") => Ok(()),
            Some(other) => Err(RuleError::new(
                Field::CpuTemplate,
                format!(
                    "{other:?} is not supported: this VMM has no CPU templates (the guest sees \
                     the host's CPU model as KVM reports it); send \"None\" or leave it out"
                ),
            )),
        }
    }
}

/// `PUT /balloon`: installs the balloon device (before boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Target size of the balloon: memory taken from the guest.
    pub amount_mib: u64,
    /// Let the guest take pages back from the balloon when it runs out of memory.
    pub deflate_on_oom: bool,
    /// Statistics polling interval; 0 disables the statistics queue.
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Offer free page reporting (VIRTIO_BALLOON_F_PAGE_REPORTING).
    #[serde(default)]
    pub free_page_reporting: bool,
    /// Firecracker's free page hinting: only `false` (free page reporting does the same job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_page_hinting: Option<bool>,
}

impl Validate for BalloonConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        rules::balloon_amount_mib(self.amount_mib, None)?;
        rules::stats_polling_interval_s(
            u64::from(self.stats_polling_interval_s),
            StatsQueue::NotFixed,
        )?;
        rules::off_only(
            Field::FreePageHinting,
            self.free_page_hinting == Some(true),
            "this balloon has free page reporting instead (free_page_reporting), which returns \
             free memory without a host-driven hinting run",
        )
    }
}

/// `PATCH /balloon`: a new target (before or after boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// The new target: MiB of guest RAM for the balloon to take.
    pub amount_mib: u64,
}

impl Validate for BalloonUpdate {
    fn validate(&self) -> Result<(), ValidationError> {
        rules::balloon_amount_mib(self.amount_mib, None)
    }
}

/// `PATCH /balloon/statistics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    /// Seconds between statistics requests to the guest; 0 stops asking.
    pub stats_polling_interval_s: u16,
}

impl Validate for BalloonStatsUpdate {
    fn validate(&self) -> Result<(), ValidationError> {
        rules::stats_polling_interval_s(
            u64::from(self.stats_polling_interval_s),
            StatsQueue::NotFixed,
        )
    }
}

fn default_block_size_mib() -> u64 {
    MIN_BLOCK_SIZE_MIB
}

/// `PUT /hotplug/memory`: installs a virtio-mem device and its hot-add region (before boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HotplugMemoryConfig {
    /// Size of the hot-add region: the most memory that can be plugged.
    pub total_size_mib: u64,
    /// virtio-mem block size, the unit of plug and unplug.
    #[serde(default = "default_block_size_mib")]
    pub block_size_mib: u64,
    /// Firecracker's KVM slot size: only its default, 128 (see [`rules::hotplug_slot_size_mib`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_size_mib: Option<u64>,
}

impl HotplugMemoryConfig {
    /// A region of `total_size_mib` in blocks of `block_size_mib`.
    pub fn new(total_size_mib: u64, block_size_mib: u64) -> Self {
        Self {
            total_size_mib,
            block_size_mib,
            slot_size_mib: None,
        }
    }
}

impl Validate for HotplugMemoryConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        rules::hotplug_block_size_mib(self.block_size_mib)?;
        rules::hotplug_total_size_mib(self.total_size_mib, self.block_size_mib)?;
        if let Some(slot) = self.slot_size_mib {
            rules::hotplug_slot_size_mib(slot)?;
        }
        Ok(())
    }
}

/// `PATCH /hotplug/memory`: how much of the hot-add region the guest should have plugged.
/// Its fit in the region is checked by the VMM, which knows the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HotplugMemoryUpdate {
    /// How much of the hot-add region the guest should have plugged, MiB.
    pub requested_size_mib: u64,
}

impl Validate for HotplugMemoryUpdate {
    fn validate(&self) -> Result<(), ValidationError> {
        rules::hotplug_requested_size_mib(self.requested_size_mib, None)
    }
}

/// `PUT /actions` `action_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Boot the configured VM.
    InstanceStart,
    /// Ask the guest to reboot (a keyboard Ctrl-Alt-Del: refused, the VM has no i8042).
    SendCtrlAltDel,
    /// Flush metrics (accepted and done: metrics are read live).
    FlushMetrics,
}

/// `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    /// What to do.
    pub action_type: ActionType,
}

impl Validate for ActionRequest {
    fn validate(&self) -> Result<(), ValidationError> {
        Ok(())
    }
}

/// `PUT /vm/resize`: make the guest this size; the VMM picks virtio-mem or the balloon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeRequest {
    /// The size to make the guest, MiB.
    pub desired_mib: u64,
}

impl Validate for ResizeRequest {
    fn validate(&self) -> Result<(), ValidationError> {
        rules::desired_mib(self.desired_mib, None)
    }
}

/// Why a guest page is not usable by the guest; the tracker's marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OfflineReason {
    /// Taken by the balloon.
    Ballooned,
    /// In the hot-add region and not plugged (or unplugged again).
    Unplugged,
    /// Offline and its host backing already given back (a subset of the two above).
    Discarded,
}

impl OfflineReason {
    /// Every reason, in the order answers list them.
    pub const ALL: [OfflineReason; 3] = [Self::Ballooned, Self::Unplugged, Self::Discarded];

    /// The reason's name in the API (`ballooned`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ballooned => "ballooned",
            Self::Unplugged => "unplugged",
            Self::Discarded => "discarded",
        }
    }

    /// The reason named `name` in the API, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl fmt::Display for OfflineReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn default_run_limit() -> u32 {
    DEFAULT_RUN_LIMIT as u32
}

/// Query of `GET /vm/memory`: `?reason=ballooned&pfn_start=0&pfn_end=262144&limit=256`.
///
/// Runs of offline pages are reported per reason, clipped to `[pfn_start, pfn_end)`, at most
/// `limit` runs per reason. When a reason has more, its `next_pfn` says where to continue: ask
/// again with `pfn_start=next_pfn`. The range and the cursor are one mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryQuery {
    /// Only this reason; every reason when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<OfflineReason>,
    /// First PFN of the range (inclusive).
    #[serde(default)]
    pub pfn_start: u64,
    /// End of the range (exclusive); the end of guest memory when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pfn_end: Option<u64>,
    /// Most runs per reason.
    #[serde(default = "default_run_limit")]
    pub limit: u32,
}

impl Default for MemoryQuery {
    fn default() -> Self {
        Self {
            reason: None,
            pfn_start: 0,
            pfn_end: None,
            limit: default_run_limit(),
        }
    }
}

impl MemoryQuery {
    /// Parses a query string (`reason=ballooned&limit=7`, no leading `?`), checking every
    /// parameter with the rules: an unknown, repeated or malformed parameter is named with what
    /// is allowed. Values are not percent-decoded: none of them needs it.
    pub fn parse(query: &str) -> Result<Self, String> {
        Self::parse_checked(query).map_err(|e| match e {
            QueryError::Rule(e) => e.for_api(),
            QueryError::Unknown(key) => format!(
                "`{key}` is not a parameter of GET /vm/memory: allowed reason, pfn_start, \
                 pfn_end and limit"
            ),
        })
    }

    fn parse_checked(query: &str) -> Result<Self, QueryError> {
        let mut q = Self::default();
        let mut seen = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let field = match Field::from_api_name(key) {
                Some(f @ (Field::Reason | Field::PfnStart | Field::PfnEnd | Field::Limit)) => f,
                _ => return Err(QueryError::Unknown(key.to_owned())),
            };
            if seen.contains(&field) {
                return Err(RuleError::new(field, "appears twice: give it once").into());
            }
            seen.push(field);
            let number = || {
                value.parse::<u64>().map_err(|_| {
                    RuleError::new(
                        field,
                        format!("`{value}` is not allowed: {}", field.expected()),
                    )
                })
            };
            match field {
                Field::Reason => {
                    q.reason = Some(OfflineReason::from_name(value).ok_or_else(|| {
                        RuleError::new(
                            field,
                            format!("`{value}` is not allowed: {}", field.expected()),
                        )
                    })?)
                }
                Field::PfnStart => q.pfn_start = number()?,
                Field::PfnEnd => q.pfn_end = Some(number()?),
                _ => {
                    let n = number()?;
                    rules::run_limit(n)?;
                    q.limit = n as u32;
                }
            }
        }
        q.validate()?;
        Ok(q)
    }
}

enum QueryError {
    Rule(RuleError),
    Unknown(String),
}

impl From<RuleError> for QueryError {
    fn from(e: RuleError) -> Self {
        Self::Rule(e)
    }
}

impl Validate for MemoryQuery {
    fn validate(&self) -> Result<(), ValidationError> {
        rules::run_limit(u64::from(self.limit))?;
        rules::pfn_range(self.pfn_start, self.pfn_end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_field_unit_and_range() {
        let e = MachineConfig::new(0, 512).validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "vcpu_count: 0 vCPUs is out of range: allowed 1 to 254 vCPUs"
        );
        let e = MachineConfig::new(1, 8).validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "mem_size_mib: 8 MiB is out of range: allowed 16 to 1048576 MiB"
        );
    }

    #[test]
    fn firecracker_machine_fields_take_their_off_values() {
        let ok: MachineConfig = serde_json::from_str(
            r#"{"vcpu_count": 2, "mem_size_mib": 1024, "smt": false, "track_dirty_pages": false,
                "huge_pages": "None", "cpu_template": "None"}"#,
        )
        .unwrap();
        ok.validate().unwrap();
        assert!(!ok.thp());
        let thp: MachineConfig = serde_json::from_str(
            r#"{"vcpu_count": 2, "mem_size_mib": 1024, "huge_pages": "Transparent"}"#,
        )
        .unwrap();
        assert!(thp.thp());
        for (body, field) in [
            (r#""smt": true"#, "smt"),
            (r#""track_dirty_pages": true"#, "track_dirty_pages"),
            (r#""huge_pages": "2M""#, "huge_pages"),
            (r#""cpu_template": "T2""#, "cpu_template"),
        ] {
            let m: MachineConfig = serde_json::from_str(&format!(
                r#"{{"vcpu_count": 1, "mem_size_mib": 128, {body}}}"#
            ))
            .unwrap();
            let e = m.validate().unwrap_err();
            assert_eq!(e.field.api_name(), field);
            assert!(e.message.contains("not supported"), "{e}");
        }
    }

    #[test]
    fn hotplug_alignment() {
        assert!(HotplugMemoryConfig::new(1024, 2).validate().is_ok());
        let field = |t, b| HotplugMemoryConfig::new(t, b).validate().unwrap_err().field;
        assert_eq!(field(1000, 2), Field::HotplugTotalSizeMib);
        assert_eq!(field(1024, 3), Field::HotplugBlockSizeMib);
        assert!(HotplugMemoryConfig::new(1024, 512).validate().is_ok());
        assert_eq!(field(640, 512), Field::HotplugTotalSizeMib);
        let fc: HotplugMemoryConfig = serde_json::from_str(
            r#"{"total_size_mib": 1024, "block_size_mib": 2, "slot_size_mib": 128}"#,
        )
        .unwrap();
        fc.validate().unwrap();
        let other = HotplugMemoryConfig {
            slot_size_mib: Some(256),
            ..fc
        };
        assert_eq!(
            other.validate().unwrap_err().field,
            Field::HotplugSlotSizeMib
        );
    }

    #[test]
    fn defaults_fill_optional_fields() {
        let b: BalloonConfig =
            serde_json::from_str(r#"{"amount_mib": 0, "deflate_on_oom": true}"#).unwrap();
        assert_eq!(b.stats_polling_interval_s, 0);
        assert!(!b.free_page_reporting);
        let h: HotplugMemoryConfig = serde_json::from_str(r#"{"total_size_mib": 1024}"#).unwrap();
        assert_eq!(h.block_size_mib, 2);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let e = serde_json::from_str::<MachineConfig>(
            r#"{"vcpu_count": 1, "mem_size_mib": 128, "smp": true}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `smp`"), "{e}");
    }

    #[test]
    fn memory_query_parameters_are_checked_by_name() {
        let q = MemoryQuery::parse("reason=discarded&limit=7&pfn_start=10&pfn_end=20").unwrap();
        assert_eq!(
            q,
            MemoryQuery {
                reason: Some(OfflineReason::Discarded),
                pfn_start: 10,
                pfn_end: Some(20),
                limit: 7
            }
        );
        assert_eq!(MemoryQuery::parse("").unwrap(), MemoryQuery::default());
        let msg = |s: &str| MemoryQuery::parse(s).unwrap_err();
        assert_eq!(
            msg("limit=0"),
            "limit: 0 runs is out of range: allowed 1 to 4096 runs"
        );
        assert_eq!(
            msg("limit=x"),
            "limit: `x` is not allowed: an integer number of runs from 1 to 4096"
        );
        assert_eq!(
            msg("reason=lost"),
            "reason: `lost` is not allowed: ballooned, unplugged or discarded"
        );
        assert_eq!(
            msg("color=red"),
            "`color` is not a parameter of GET /vm/memory: allowed reason, pfn_start, pfn_end \
             and limit"
        );
        assert_eq!(msg("limit=1&limit=2"), "limit: appears twice: give it once");
        assert!(msg("pfn_start=-1").starts_with("pfn_start: `-1` is not allowed"));
    }
}
