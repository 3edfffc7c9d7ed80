//! Bodies and queries a client sends, with their validation.
//!
//! Every type here rejects unknown fields (`deny_unknown_fields`), so a misspelt field is a 400
//! naming the field instead of a silently ignored setting. `validate` checks what serde cannot:
//! ranges and alignments. Its errors name the field, the value and the allowed range, and they are
//! checked before anything reaches the VMM, so a rejected request never changes state.
//!
//! Sizes are in MiB as in Firecracker's API; page numbers (PFNs) are in 4 KiB units.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Largest guest memory size, boot plus hot-add, the API accepts: 1 TiB.
pub const MAX_MEM_MIB: u64 = 1 << 20;
/// Smallest boot memory size a Linux guest boots with.
pub const MIN_MEM_MIB: u64 = 16;
/// vCPU ids must fit an xAPIC id (0..=254).
pub const MAX_VCPUS: u8 = 254;
/// Linux x86 `COMMAND_LINE_SIZE` is 2048 bytes including the terminating NUL.
pub const MAX_BOOT_ARGS_LEN: usize = 2047;
/// Upper bound for the balloon statistics polling interval.
pub const MAX_STATS_POLLING_INTERVAL_S: u16 = 3600;
/// Linux adds hot-plugged memory in 128 MiB memory blocks on x86-64.
pub const HOTPLUG_ALIGN_MIB: u64 = 128;
/// virtio-mem block sizes the API accepts (powers of two in this range).
pub const MIN_BLOCK_SIZE_MIB: u64 = 2;
pub const MAX_BLOCK_SIZE_MIB: u64 = 1024;
/// Default and maximum number of offline runs per reason in one `GET /vm/memory` answer.
pub const DEFAULT_RUN_LIMIT: u32 = 256;
pub const MAX_RUN_LIMIT: u32 = 4096;

/// A value that serde accepted but that is out of range for its field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// The JSON field name (or query parameter) at fault.
    pub field: &'static str,
    /// What was wrong, with the value and the allowed range.
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for ValidationError {}

/// Checks that serde cannot express.
pub trait Validate {
    fn validate(&self) -> Result<(), ValidationError>;
}

fn in_range<T>(field: &'static str, value: T, min: T, max: T) -> Result<(), ValidationError>
where
    T: PartialOrd + fmt::Display + Copy,
{
    if value < min || value > max {
        return Err(ValidationError {
            field,
            message: format!("{value} is out of range {min}..={max}"),
        });
    }
    Ok(())
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
        if self.kernel_image_path.is_empty() {
            return Err(ValidationError {
                field: "kernel_image_path",
                message: "must not be empty".into(),
            });
        }
        if matches!(&self.initrd_path, Some(p) if p.is_empty()) {
            return Err(ValidationError {
                field: "initrd_path",
                message: "must not be empty when given".into(),
            });
        }
        if let Some(args) = &self.boot_args {
            if args.len() > MAX_BOOT_ARGS_LEN {
                return Err(ValidationError {
                    field: "boot_args",
                    message: format!(
                        "{} bytes is out of range 0..={MAX_BOOT_ARGS_LEN}",
                        args.len()
                    ),
                });
            }
            if args.contains('\0') {
                return Err(ValidationError {
                    field: "boot_args",
                    message: "must not contain NUL characters".into(),
                });
            }
        }
        Ok(())
    }
}

/// `PUT /machine-config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    /// Boot memory size. Hot-add memory is configured with `PUT /hotplug/memory`.
    pub mem_size_mib: u64,
}

impl Validate for MachineConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        in_range("vcpu_count", self.vcpu_count, 1, MAX_VCPUS)?;
        in_range("mem_size_mib", self.mem_size_mib, MIN_MEM_MIB, MAX_MEM_MIB)
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
}

impl Validate for BalloonConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        in_range("amount_mib", self.amount_mib, 0, MAX_MEM_MIB)?;
        in_range(
            "stats_polling_interval_s",
            self.stats_polling_interval_s,
            0,
            MAX_STATS_POLLING_INTERVAL_S,
        )
    }
}

/// `PATCH /balloon`: a new target (before or after boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    pub amount_mib: u64,
}

impl Validate for BalloonUpdate {
    fn validate(&self) -> Result<(), ValidationError> {
        in_range("amount_mib", self.amount_mib, 0, MAX_MEM_MIB)
    }
}

/// `PATCH /balloon/statistics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    pub stats_polling_interval_s: u16,
}

impl Validate for BalloonStatsUpdate {
    fn validate(&self) -> Result<(), ValidationError> {
        in_range(
            "stats_polling_interval_s",
            self.stats_polling_interval_s,
            0,
            MAX_STATS_POLLING_INTERVAL_S,
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
}

impl Validate for HotplugMemoryConfig {
    fn validate(&self) -> Result<(), ValidationError> {
        in_range(
            "block_size_mib",
            self.block_size_mib,
            MIN_BLOCK_SIZE_MIB,
            MAX_BLOCK_SIZE_MIB,
        )?;
        if !self.block_size_mib.is_power_of_two() {
            return Err(ValidationError {
                field: "block_size_mib",
                message: format!(
                    "{} is not a power of two in {MIN_BLOCK_SIZE_MIB}..={MAX_BLOCK_SIZE_MIB}",
                    self.block_size_mib
                ),
            });
        }
        in_range(
            "total_size_mib",
            self.total_size_mib,
            HOTPLUG_ALIGN_MIB,
            MAX_MEM_MIB,
        )?;
        let align = HOTPLUG_ALIGN_MIB.max(self.block_size_mib);
        // Both are powers of two (checked above), so is `align`.
        if self.total_size_mib & (align - 1) != 0 {
            return Err(ValidationError {
                field: "total_size_mib",
                message: format!(
                    "{} is not a multiple of {align} (the Linux memory block size and block_size_mib)",
                    self.total_size_mib
                ),
            });
        }
        Ok(())
    }
}

/// `PATCH /hotplug/memory`: how much of the hot-add region the guest should have plugged.
/// Alignment to the block size is checked by the VMM, which knows the block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HotplugMemoryUpdate {
    pub requested_size_mib: u64,
}

impl Validate for HotplugMemoryUpdate {
    fn validate(&self) -> Result<(), ValidationError> {
        in_range(
            "requested_size_mib",
            self.requested_size_mib,
            0,
            MAX_MEM_MIB,
        )
    }
}

/// `PUT /actions` `action_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

/// `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
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
    pub desired_mib: u64,
}

impl Validate for ResizeRequest {
    fn validate(&self) -> Result<(), ValidationError> {
        in_range("desired_mib", self.desired_mib, MIN_MEM_MIB, MAX_MEM_MIB)
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
    pub const ALL: [OfflineReason; 3] = [Self::Ballooned, Self::Unplugged, Self::Discarded];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ballooned => "ballooned",
            Self::Unplugged => "unplugged",
            Self::Discarded => "discarded",
        }
    }
}

impl fmt::Display for OfflineReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn default_run_limit() -> u32 {
    DEFAULT_RUN_LIMIT
}

/// Query of `GET /vm/memory`: `?reason=ballooned&pfn_start=0&pfn_end=262144&limit=256`.
///
/// Runs of offline pages are reported per reason, clipped to `[pfn_start, pfn_end)`, at most
/// `limit` runs per reason. When a reason has more, its `next_pfn` says where to continue: ask
/// again with `pfn_start=next_pfn`. The range and the cursor are one mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryQuery {
    /// Only this reason; all reasons when absent.
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
            limit: DEFAULT_RUN_LIMIT,
        }
    }
}

impl Validate for MemoryQuery {
    fn validate(&self) -> Result<(), ValidationError> {
        in_range("limit", self.limit, 1, MAX_RUN_LIMIT)?;
        if let Some(end) = self.pfn_end {
            if end <= self.pfn_start {
                return Err(ValidationError {
                    field: "pfn_end",
                    message: format!("{end:#x} must be above pfn_start ({:#x})", self.pfn_start),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_field_and_range() {
        let e = MachineConfig {
            vcpu_count: 0,
            mem_size_mib: 512,
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.to_string(), "vcpu_count: 0 is out of range 1..=254");
        let e = MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 8,
        }
        .validate()
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "mem_size_mib: 8 is out of range 16..=1048576"
        );
    }

    #[test]
    fn hotplug_alignment() {
        let ok = HotplugMemoryConfig {
            total_size_mib: 1024,
            block_size_mib: 2,
        };
        assert!(ok.validate().is_ok());
        let bad = HotplugMemoryConfig {
            total_size_mib: 1000,
            block_size_mib: 2,
        };
        assert_eq!(bad.validate().unwrap_err().field, "total_size_mib");
        let bad = HotplugMemoryConfig {
            total_size_mib: 1024,
            block_size_mib: 3,
        };
        assert_eq!(bad.validate().unwrap_err().field, "block_size_mib");
        let bad = HotplugMemoryConfig {
            total_size_mib: 1024,
            block_size_mib: 512,
        };
        assert!(bad.validate().is_ok());
        let bad = HotplugMemoryConfig {
            total_size_mib: 640,
            block_size_mib: 512,
        };
        assert_eq!(bad.validate().unwrap_err().field, "total_size_mib");
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
            r#"{"vcpu_count": 1, "mem_size_mib": 128, "smt": true}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `smt`"), "{e}");
    }
}
