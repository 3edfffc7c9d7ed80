//! The rules a VM description and every change to it follow, in one place.
//!
//! Who uses them: the API server checks request bodies and queries with them before anything
//! reaches the VMM (a refused request changes nothing); the VMM checks its command line and
//! config file, `PUT /actions InstanceStart`, and the requests whose limits depend on the VM
//! (`PATCH /balloon`, `PATCH /hotplug/memory`, `PATCH /balloon/statistics`, `PUT /vm/resize`)
//! with the very same functions. So a limit and its message cannot differ between the command
//! line and the API, or between the API's two layers.
//!
//! A broken rule is a [`RuleError`]: the [`Field`] at fault and a message with the value, the
//! unit the client used and what is allowed. The field is named when the error is shown, in the
//! words of whoever asked: the API's JSON field (`amount_mib: 2000 MiB is ...`, see
//! [`RuleError::for_api`]) or the command line's flag (`--balloon amount_mib: 2000 MiB is ...`,
//! [`RuleError::for_cli`]).

use std::fmt;

/// Largest boot memory, and largest hot-add region, the VMM lays out: 1 TiB each.
pub const MAX_MEM_MIB: u64 = 1 << 20;
/// Smallest memory a Linux guest is left with: the least boot memory, the least `desired_mib`,
/// and what a balloon must leave the guest.
pub const MIN_MEM_MIB: u64 = 16;
/// vCPU ids must fit an xAPIC id, 0xff being broadcast.
pub const MAX_VCPUS: u64 = 254;
/// Linux x86 `COMMAND_LINE_SIZE` is 2048 bytes including the terminating NUL.
pub const MAX_BOOT_ARGS_LEN: usize = 2047;
/// Longest balloon statistics polling interval.
pub const MAX_STATS_POLLING_INTERVAL_S: u64 = 3600;
/// Linux adds hot-plugged memory in memory blocks of 128 MiB on x86-64.
pub const HOTPLUG_ALIGN_MIB: u64 = 128;
/// virtio-mem block sizes: powers of two in this range.
pub const MIN_BLOCK_SIZE_MIB: u64 = 2;
/// Largest virtio-mem block size, MiB.
pub const MAX_BLOCK_SIZE_MIB: u64 = 1024;
/// The one `slot_size_mib` accepted: Firecracker's default, which its clients send.
pub const FIRECRACKER_SLOT_SIZE_MIB: u64 = 128;
/// Default and largest number of offline runs per reason in one `GET /vm/memory` answer.
pub const DEFAULT_RUN_LIMIT: u64 = 256;
/// Most offline runs per reason `limit` may ask for.
pub const MAX_RUN_LIMIT: u64 = 4096;
/// Page numbers (4 KiB pages) of x86-64's 52-bit physical address space: `pfn_start` and
/// `pfn_end` are at most this.
pub const MAX_PFN: u64 = 1 << 40;

/// Every value a client sets, with the name each interface gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    /// `kernel_image_path`, `--kernel`.
    KernelImagePath,
    /// `initrd_path`, `--initramfs`.
    InitrdPath,
    /// `boot_args`, `--cmdline`.
    BootArgs,
    /// `vcpu_count`, `--vcpus`.
    VcpuCount,
    /// `mem_size_mib`, `--memory-mib`.
    MemSizeMib,
    /// `smt` (API only).
    Smt,
    /// `track_dirty_pages` (API only).
    TrackDirtyPages,
    /// `huge_pages`, `--thp`.
    HugePages,
    /// `cpu_template` (API only).
    CpuTemplate,
    /// `amount_mib` of the balloon, `--balloon amount_mib`.
    BalloonAmountMib,
    /// `deflate_on_oom`, `--balloon deflate_on_oom`.
    DeflateOnOom,
    /// `stats_polling_interval_s`, `--balloon stats_interval_s`.
    StatsPollingIntervalS,
    /// `free_page_reporting`, `--balloon free_page_reporting`.
    FreePageReporting,
    /// `free_page_hinting` (API only).
    FreePageHinting,
    /// `total_size_mib` of the hot-add region, `--hotplug total_mib`.
    HotplugTotalSizeMib,
    /// `block_size_mib`, `--hotplug block_mib`.
    HotplugBlockSizeMib,
    /// `slot_size_mib` (API only).
    HotplugSlotSizeMib,
    /// `requested_size_mib`, `--hotplug requested_mib`.
    HotplugRequestedSizeMib,
    /// `desired_mib` of `PUT /vm/resize`.
    DesiredMib,
    /// `action_type` of `PUT /actions`.
    ActionType,
    /// `reason` query parameter of `GET /vm/memory`.
    Reason,
    /// `pfn_start` query parameter of `GET /vm/memory`.
    PfnStart,
    /// `pfn_end` query parameter of `GET /vm/memory`.
    PfnEnd,
    /// `limit` query parameter of `GET /vm/memory`.
    Limit,
    /// `--serial` (command line only).
    Serial,
}

impl Field {
    /// The API's JSON field or query parameter.
    pub fn api_name(self) -> &'static str {
        match self {
            Self::KernelImagePath => "kernel_image_path",
            Self::InitrdPath => "initrd_path",
            Self::BootArgs => "boot_args",
            Self::VcpuCount => "vcpu_count",
            Self::MemSizeMib => "mem_size_mib",
            Self::Smt => "smt",
            Self::TrackDirtyPages => "track_dirty_pages",
            Self::HugePages => "huge_pages",
            Self::CpuTemplate => "cpu_template",
            Self::BalloonAmountMib => "amount_mib",
            Self::DeflateOnOom => "deflate_on_oom",
            Self::StatsPollingIntervalS => "stats_polling_interval_s",
            Self::FreePageReporting => "free_page_reporting",
            Self::FreePageHinting => "free_page_hinting",
            Self::HotplugTotalSizeMib => "total_size_mib",
            Self::HotplugBlockSizeMib => "block_size_mib",
            Self::HotplugSlotSizeMib => "slot_size_mib",
            Self::HotplugRequestedSizeMib => "requested_size_mib",
            Self::DesiredMib => "desired_mib",
            Self::ActionType => "action_type",
            Self::Reason => "reason",
            Self::PfnStart => "pfn_start",
            Self::PfnEnd => "pfn_end",
            Self::Limit => "limit",
            Self::Serial => "serial",
        }
    }

    /// The command line's flag (and key, for `--balloon` and `--hotplug`); the API's name where
    /// the command line has no such setting.
    pub fn cli_name(self) -> &'static str {
        match self {
            Self::KernelImagePath => "--kernel",
            Self::InitrdPath => "--initramfs",
            Self::BootArgs => "--cmdline",
            Self::VcpuCount => "--vcpus",
            Self::MemSizeMib => "--memory-mib",
            Self::HugePages => "--thp",
            Self::BalloonAmountMib => "--balloon amount_mib",
            Self::DeflateOnOom => "--balloon deflate_on_oom",
            Self::StatsPollingIntervalS => "--balloon stats_interval_s",
            Self::FreePageReporting => "--balloon free_page_reporting",
            Self::HotplugTotalSizeMib => "--hotplug total_mib",
            Self::HotplugBlockSizeMib => "--hotplug block_mib",
            Self::HotplugRequestedSizeMib => "--hotplug requested_mib",
            Self::Serial => "--serial",
            other => other.api_name(),
        }
    }

    /// What a value of this field must be, for a value of the wrong type or size: the same
    /// words as the rules' own messages and `openapi.yaml`.
    pub fn expected(self) -> &'static str {
        match self {
            Self::KernelImagePath => "a non-empty host path",
            Self::InitrdPath => "a non-empty host path, or null",
            Self::BootArgs => "a string of at most 2047 bytes, or null",
            Self::VcpuCount => "an integer from 1 to 254",
            Self::MemSizeMib => "an integer number of MiB from 16 to 1048576",
            Self::Smt | Self::TrackDirtyPages => "false or null",
            Self::HugePages => "\"None\" or \"Transparent\"",
            Self::CpuTemplate => "\"None\" or null",
            Self::BalloonAmountMib => "an integer number of MiB from 0 to 1048576",
            Self::DeflateOnOom | Self::FreePageReporting => "true or false",
            Self::FreePageHinting => "false or null",
            Self::StatsPollingIntervalS => "an integer number of seconds from 0 to 3600",
            Self::HotplugTotalSizeMib => {
                "an integer number of MiB from 128 to 1048576, a multiple of 128"
            }
            Self::HotplugBlockSizeMib => {
                "a power of two number of MiB from 2 to 1024 (2, 4, 8, ..., 1024)"
            }
            Self::HotplugSlotSizeMib => "128 or null",
            Self::HotplugRequestedSizeMib => "an integer number of MiB from 0 to 1048576",
            Self::DesiredMib => "an integer number of MiB from 16 to 2097152",
            Self::ActionType => "\"InstanceStart\", \"SendCtrlAltDel\" or \"FlushMetrics\"",
            Self::Reason => "ballooned, unplugged or discarded",
            Self::PfnStart | Self::PfnEnd => "an integer page number from 0 to 1099511627776",
            Self::Limit => "an integer number of runs from 1 to 4096",
            Self::Serial => "`stdout` or a file path",
        }
    }

    /// The field whose API name is `name`, if any.
    pub fn from_api_name(name: &str) -> Option<Field> {
        Self::ALL.into_iter().find(|f| f.api_name() == name)
    }

    /// Every field, for lookups by name.
    pub const ALL: [Field; 25] = [
        Self::KernelImagePath,
        Self::InitrdPath,
        Self::BootArgs,
        Self::VcpuCount,
        Self::MemSizeMib,
        Self::Smt,
        Self::TrackDirtyPages,
        Self::HugePages,
        Self::CpuTemplate,
        Self::BalloonAmountMib,
        Self::DeflateOnOom,
        Self::StatsPollingIntervalS,
        Self::FreePageReporting,
        Self::FreePageHinting,
        Self::HotplugTotalSizeMib,
        Self::HotplugBlockSizeMib,
        Self::HotplugSlotSizeMib,
        Self::HotplugRequestedSizeMib,
        Self::DesiredMib,
        Self::ActionType,
        Self::Reason,
        Self::PfnStart,
        Self::PfnEnd,
        Self::Limit,
        Self::Serial,
    ];
}

/// A value that breaks a rule: the field, and what was wrong in words that fit both the API
/// and the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    /// The field whose value broke the rule.
    pub field: Field,
    /// The value with its unit and what is allowed, without the field's name.
    pub message: String,
}

impl RuleError {
    /// `field`'s value broke a rule; `message` says how.
    pub fn new(field: Field, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }

    /// `field: message`, naming the field as the API does.
    pub fn for_api(&self) -> String {
        format!("{}: {}", self.field.api_name(), self.message)
    }

    /// `--flag key: message`, naming the field as the command line does.
    pub fn for_cli(&self) -> String {
        format!("{}: {}", self.field.cli_name(), self.message)
    }
}

/// Shown the API's way; the command line uses [`RuleError::for_cli`].
impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.for_api())
    }
}

impl std::error::Error for RuleError {}

/// Result of a rule.
pub type Checked = Result<(), RuleError>;

/// The unit of a value, as the client wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Mebibytes.
    Mib,
    /// Seconds.
    Seconds,
    /// Virtual CPUs.
    Vcpus,
    /// Bytes.
    Bytes,
    /// Offline runs.
    Runs,
    /// A 4 KiB page frame number.
    Pfn,
}

impl Unit {
    /// `value` with its unit: `8 MiB`, `3600 s`, `2 vCPUs`.
    pub fn show(self, value: u64) -> String {
        match self {
            Self::Mib => format!("{value} MiB"),
            Self::Seconds => format!("{value} s"),
            Self::Vcpus if value == 1 => "1 vCPU".to_string(),
            Self::Vcpus => format!("{value} vCPUs"),
            Self::Bytes => format!("{value} bytes"),
            Self::Runs => format!("{value} runs"),
            Self::Pfn => format!("page {value}"),
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Self::Mib => " MiB",
            Self::Seconds => " s",
            Self::Vcpus => " vCPUs",
            Self::Bytes => " bytes",
            Self::Runs => " runs",
            Self::Pfn => " (page numbers)",
        }
    }
}

/// `value` must lie in `min..=max`.
pub fn in_range(field: Field, value: u64, min: u64, max: u64, unit: Unit) -> Checked {
    if value < min || value > max {
        return Err(RuleError::new(
            field,
            format!(
                "{} is out of range: allowed {min} to {max}{}",
                unit.show(value),
                unit.suffix()
            ),
        ));
    }
    Ok(())
}

// ---- Boot source ----

/// A host path given for `field` must not be empty.
pub fn host_path(field: Field, path: &str) -> Checked {
    if path.is_empty() {
        return Err(RuleError::new(
            field,
            "is empty; give the host path of the file",
        ));
    }
    Ok(())
}

/// The kernel command line: what Linux accepts.
pub fn boot_args(args: &str) -> Checked {
    if args.len() > MAX_BOOT_ARGS_LEN {
        return Err(RuleError::new(
            Field::BootArgs,
            format!(
                "{} is too long: allowed up to {MAX_BOOT_ARGS_LEN} bytes (Linux's command line)",
                Unit::Bytes.show(args.len() as u64)
            ),
        ));
    }
    if args.contains('\0') {
        return Err(RuleError::new(
            Field::BootArgs,
            "contains a NUL character, which would end the command line early",
        ));
    }
    Ok(())
}

// ---- Machine ----

/// `vcpu_count`: 1 to [`MAX_VCPUS`].
pub fn vcpu_count(n: u64) -> Checked {
    in_range(Field::VcpuCount, n, 1, MAX_VCPUS, Unit::Vcpus)
}

/// Boot memory.
pub fn mem_size_mib(mib: u64) -> Checked {
    in_range(Field::MemSizeMib, mib, MIN_MEM_MIB, MAX_MEM_MIB, Unit::Mib)
}

/// A Firecracker option this VMM does not have, accepted only with the value that means "off":
/// Firecracker's clients send it with that value whether they use it or not.
pub fn off_only(field: Field, on: bool, why: &str) -> Checked {
    if on {
        return Err(RuleError::new(
            field,
            format!("true is not supported: {why}; send false or leave it out"),
        ));
    }
    Ok(())
}

// ---- Balloon ----

/// The balloon leaves the guest at least [`MIN_MEM_MIB`] of its boot memory. Before the boot
/// memory is known (a body on its own) only the absolute limit applies.
pub fn balloon_amount_mib(amount: u64, boot_mib: Option<u64>) -> Checked {
    let Some(boot) = boot_mib else {
        return in_range(Field::BalloonAmountMib, amount, 0, MAX_MEM_MIB, Unit::Mib);
    };
    let max = boot.saturating_sub(MIN_MEM_MIB);
    if amount > max {
        return Err(RuleError::new(
            Field::BalloonAmountMib,
            format!(
                "{} is out of range: allowed 0 to {max} MiB (the boot memory, {boot} MiB, less \
                 the {MIN_MEM_MIB} MiB a guest keeps)",
                Unit::Mib.show(amount)
            ),
        ));
    }
    Ok(())
}

/// Whether the VM runs with the balloon's statistics queue, which is fixed once it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsQueue {
    /// Not started yet: statistics can still be switched on or off.
    NotFixed,
    /// Running with statistics on: the interval can change but not to 0.
    On,
    /// Running with statistics off: they stay off.
    Off,
}

/// A statistics polling interval, for a balloon being configured or (`queue`) one running.
pub fn stats_polling_interval_s(secs: u64, queue: StatsQueue) -> Checked {
    let field = Field::StatsPollingIntervalS;
    in_range(field, secs, 0, MAX_STATS_POLLING_INTERVAL_S, Unit::Seconds)?;
    match queue {
        StatsQueue::On if secs == 0 => Err(RuleError::new(
            field,
            format!(
                "0 s would switch statistics off, which cannot change once the VM runs (the \
                 statistics queue is set up at boot): allowed 1 to \
                 {MAX_STATS_POLLING_INTERVAL_S} s"
            ),
        )),
        StatsQueue::Off if secs != 0 => Err(RuleError::new(
            field,
            format!(
                "{} would switch statistics on, but the VM started with them off and that \
                 cannot change once it runs: allowed 0 s",
                Unit::Seconds.show(secs)
            ),
        )),
        _ => Ok(()),
    }
}

// ---- Hot-add memory (virtio-mem) ----

/// `block_size_mib`: a power of two from [`MIN_BLOCK_SIZE_MIB`] to [`MAX_BLOCK_SIZE_MIB`].
pub fn hotplug_block_size_mib(block: u64) -> Checked {
    if !(MIN_BLOCK_SIZE_MIB..=MAX_BLOCK_SIZE_MIB).contains(&block) || !block.is_power_of_two() {
        return Err(RuleError::new(
            Field::HotplugBlockSizeMib,
            format!(
                "{} is not allowed: a power of two from {MIN_BLOCK_SIZE_MIB} to \
                 {MAX_BLOCK_SIZE_MIB} MiB (2, 4, 8, ..., {MAX_BLOCK_SIZE_MIB})",
                Unit::Mib.show(block)
            ),
        ));
    }
    Ok(())
}

/// The hot-add region: whole Linux memory blocks and whole virtio-mem blocks. `block` must
/// have passed [`hotplug_block_size_mib`].
pub fn hotplug_total_size_mib(total: u64, block: u64) -> Checked {
    let field = Field::HotplugTotalSizeMib;
    in_range(field, total, HOTPLUG_ALIGN_MIB, MAX_MEM_MIB, Unit::Mib)?;
    let align = HOTPLUG_ALIGN_MIB.max(block);
    if !total.is_multiple_of(align) {
        let why = if block > HOTPLUG_ALIGN_MIB {
            format!("block_size_mib ({block} MiB)")
        } else {
            format!("{HOTPLUG_ALIGN_MIB} MiB (the Linux memory block)")
        };
        return Err(RuleError::new(
            field,
            format!(
                "{} is not a multiple of {why}: allowed {align} to {} MiB in steps of {align} MiB",
                Unit::Mib.show(total),
                MAX_MEM_MIB - MAX_MEM_MIB % align
            ),
        ));
    }
    Ok(())
}

/// Firecracker's KVM slot size. Here every plugged block is its own KVM slot (unplugged memory
/// is never mapped into the guest), so only Firecracker's default is accepted.
pub fn hotplug_slot_size_mib(slot: u64) -> Checked {
    if slot != FIRECRACKER_SLOT_SIZE_MIB {
        return Err(RuleError::new(
            Field::HotplugSlotSizeMib,
            format!(
                "{} is not supported: this VMM maps every plugged block as its own KVM memory \
                 slot, so the slot size is block_size_mib; send {FIRECRACKER_SLOT_SIZE_MIB} \
                 (Firecracker's default) or leave it out",
                Unit::Mib.show(slot)
            ),
        ));
    }
    Ok(())
}

/// How much of the hot-add region the guest should have plugged: whole blocks of the region.
/// Before the region is known (a body on its own) only the absolute limit applies.
pub fn hotplug_requested_size_mib(requested: u64, region: Option<(u64, u64)>) -> Checked {
    let field = Field::HotplugRequestedSizeMib;
    let Some((total, block)) = region else {
        return in_range(field, requested, 0, MAX_MEM_MIB, Unit::Mib);
    };
    if requested > total || !requested.is_multiple_of(block) {
        let what = if requested > total {
            "is above total_size_mib".to_string()
        } else {
            format!("is not a multiple of block_size_mib ({block} MiB)")
        };
        return Err(RuleError::new(
            field,
            format!(
                "{} {what}: allowed 0 to {total} MiB in steps of {block} MiB",
                Unit::Mib.show(requested)
            ),
        ));
    }
    Ok(())
}

// ---- Resize ----

/// The most `desired_mib` can be for any VM: the largest boot memory plus the largest region.
pub const MAX_DESIRED_MIB: u64 = 2 * MAX_MEM_MIB;

/// What a VM's devices can reach: the balloon takes boot memory down to [`MIN_MEM_MIB`], virtio-mem
/// adds up to its region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reach {
    /// Boot memory, MiB.
    pub boot_mib: u64,
    /// Whether the VM has a balloon to shrink it.
    pub has_balloon: bool,
    /// Size of the hot-add region, when the VM has one.
    pub hotplug_mib: Option<u64>,
}

impl Reach {
    /// The least the VM can be made: [`MIN_MEM_MIB`] with a balloon, else its boot memory.
    pub fn min_mib(&self) -> u64 {
        if self.has_balloon {
            MIN_MEM_MIB.min(self.boot_mib)
        } else {
            self.boot_mib
        }
    }

    /// The most the VM can be made: boot memory plus the whole hot-add region.
    pub fn max_mib(&self) -> u64 {
        self.boot_mib + self.hotplug_mib.unwrap_or(0)
    }
}

/// `desired_mib` of `PUT /vm/resize`: static limits without a VM, the VM's reach with one.
pub fn desired_mib(desired: u64, reach: Option<Reach>) -> Checked {
    let field = Field::DesiredMib;
    let Some(r) = reach else {
        return in_range(field, desired, MIN_MEM_MIB, MAX_DESIRED_MIB, Unit::Mib);
    };
    let (min, max) = (r.min_mib(), r.max_mib());
    if desired < min || desired > max {
        let shrink = if r.has_balloon {
            format!("a balloon to shrink it to {MIN_MEM_MIB} MiB")
        } else {
            "no balloon to shrink it".to_string()
        };
        let grow = match r.hotplug_mib {
            Some(h) => format!("{h} MiB of hot-add memory to grow it"),
            None => "no hot-add memory to grow it".to_string(),
        };
        return Err(RuleError::new(
            field,
            format!(
                "{} is out of reach: allowed {min} to {max} MiB for this VM ({} MiB of boot \
                 memory, {shrink}, {grow})",
                Unit::Mib.show(desired),
                r.boot_mib
            ),
        ));
    }
    Ok(())
}

// ---- GET /vm/memory ----

/// `limit` of `GET /vm/memory`: 1 to [`MAX_RUN_LIMIT`].
pub fn run_limit(limit: u64) -> Checked {
    in_range(Field::Limit, limit, 1, MAX_RUN_LIMIT, Unit::Runs)
}

/// `pfn_start` and `pfn_end`: page numbers of the physical address space, `pfn_end` above
/// `pfn_start`.
pub fn pfn_range(start: u64, end: Option<u64>) -> Checked {
    in_range(Field::PfnStart, start, 0, MAX_PFN, Unit::Pfn)?;
    if let Some(end) = end {
        in_range(Field::PfnEnd, end, 0, MAX_PFN, Unit::Pfn)?;
        if end <= start {
            return Err(RuleError::new(
                Field::PfnEnd,
                format!("page {end} is not above pfn_start (page {start}): the range is empty"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_field_the_unit_and_the_range() {
        let e = mem_size_mib(8).unwrap_err();
        assert_eq!(
            e.for_api(),
            "mem_size_mib: 8 MiB is out of range: allowed 16 to 1048576 MiB"
        );
        assert_eq!(
            e.for_cli(),
            "--memory-mib: 8 MiB is out of range: allowed 16 to 1048576 MiB"
        );
        assert_eq!(
            vcpu_count(0).unwrap_err().to_string(),
            "vcpu_count: 0 vCPUs is out of range: allowed 1 to 254 vCPUs"
        );
        let e = stats_polling_interval_s(4000, StatsQueue::NotFixed).unwrap_err();
        assert_eq!(
            e.for_cli(),
            "--balloon stats_interval_s: 4000 s is out of range: allowed 0 to 3600 s"
        );
    }

    #[test]
    fn the_balloon_leaves_the_guest_its_minimum() {
        assert!(balloon_amount_mib(1008, Some(1024)).is_ok());
        let e = balloon_amount_mib(1009, Some(1024)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "amount_mib: 1009 MiB is out of range: allowed 0 to 1008 MiB (the boot memory, \
             1024 MiB, less the 16 MiB a guest keeps)"
        );
        // Equal to the boot memory: refused (it was accepted by PATCH and refused at start).
        assert!(balloon_amount_mib(1024, Some(1024)).is_err());
        assert!(balloon_amount_mib(1 << 20, None).is_ok());
        assert!(balloon_amount_mib((1 << 20) + 1, None).is_err());
    }

    #[test]
    fn statistics_cannot_be_switched_once_running() {
        assert!(stats_polling_interval_s(0, StatsQueue::NotFixed).is_ok());
        assert!(stats_polling_interval_s(5, StatsQueue::On).is_ok());
        let e = stats_polling_interval_s(0, StatsQueue::On).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("stats_polling_interval_s: 0 s would switch statistics off"),
            "{e}"
        );
        assert!(e.message.contains("allowed 1 to 3600 s"), "{e}");
        assert!(stats_polling_interval_s(0, StatsQueue::Off).is_ok());
        let e = stats_polling_interval_s(2, StatsQueue::Off).unwrap_err();
        assert!(e.message.contains("allowed 0 s"), "{e}");
    }

    #[test]
    fn hotplug_region_and_requests() {
        for b in [2, 4, 128, 1024] {
            assert!(hotplug_block_size_mib(b).is_ok(), "{b}");
        }
        for b in [0, 1, 3, 6, 2048] {
            let e = hotplug_block_size_mib(b).unwrap_err();
            assert!(
                e.message.contains("a power of two from 2 to 1024 MiB"),
                "{e}"
            );
        }
        assert!(hotplug_total_size_mib(1024, 2).is_ok());
        let e = hotplug_total_size_mib(1000, 2).unwrap_err();
        assert_eq!(
            e.to_string(),
            "total_size_mib: 1000 MiB is not a multiple of 128 MiB (the Linux memory block): \
             allowed 128 to 1048576 MiB in steps of 128 MiB"
        );
        let e = hotplug_total_size_mib(640, 512).unwrap_err();
        assert!(e.message.contains("block_size_mib (512 MiB)"), "{e}");
        assert!(hotplug_total_size_mib(64, 2)
            .unwrap_err()
            .message
            .contains("allowed 128 to"));
        assert!(hotplug_requested_size_mib(512, Some((2048, 2))).is_ok());
        assert!(hotplug_requested_size_mib(2048, Some((2048, 2))).is_ok());
        let e = hotplug_requested_size_mib(3, Some((2048, 2))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "requested_size_mib: 3 MiB is not a multiple of block_size_mib (2 MiB): allowed 0 \
             to 2048 MiB in steps of 2 MiB"
        );
        let e = hotplug_requested_size_mib(4096, Some((2048, 2))).unwrap_err();
        assert!(
            e.message.starts_with("4096 MiB is above total_size_mib"),
            "{e}"
        );
        assert!(hotplug_slot_size_mib(128).is_ok());
        assert!(hotplug_slot_size_mib(256)
            .unwrap_err()
            .message
            .contains("send 128 (Firecracker's default) or leave it out"));
    }

    #[test]
    fn resize_reach_names_what_the_vm_has() {
        let r = Reach {
            boot_mib: 1024,
            has_balloon: true,
            hotplug_mib: Some(2048),
        };
        assert!(desired_mib(16, Some(r)).is_ok());
        assert!(desired_mib(3072, Some(r)).is_ok());
        let e = desired_mib(8192, Some(r)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "desired_mib: 8192 MiB is out of reach: allowed 16 to 3072 MiB for this VM (1024 \
             MiB of boot memory, a balloon to shrink it to 16 MiB, 2048 MiB of hot-add memory \
             to grow it)"
        );
        let bare = Reach {
            boot_mib: 512,
            has_balloon: false,
            hotplug_mib: None,
        };
        let e = desired_mib(256, Some(bare)).unwrap_err();
        assert!(e.message.contains("allowed 512 to 512 MiB"), "{e}");
        assert!(
            e.message.contains("no balloon") && e.message.contains("no hot-add"),
            "{e}"
        );
        assert!(desired_mib(1, None).is_err());
    }

    #[test]
    fn every_field_has_names_and_an_expectation() {
        for f in Field::ALL {
            assert_eq!(Field::from_api_name(f.api_name()), Some(f));
            assert!(!f.cli_name().is_empty() && !f.expected().is_empty());
        }
        assert_eq!(
            pfn_range(10, Some(10)).unwrap_err().to_string(),
            "pfn_end: page 10 is not above pfn_start (page 10): the range is empty"
        );
        assert!(pfn_range(MAX_PFN + 1, None).is_err());
    }
}
