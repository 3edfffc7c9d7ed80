//! What a user asks for: a VM to create (`POST /vms`), its memory limits changed at run time
//! (`PATCH /vms/{id}/memory`), the host's budget and policy parameters (`PUT /host/memory`), and
//! the rules that keep each of them consistent. Every error names the field, the unit and what is
//! allowed; nothing here touches the host (see `registry` for the checks against other VMs).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Longest VM id. Ids name directories and end up in the VMM's socket path, which Unix limits
/// to 107 bytes.
pub const MAX_ID_LEN: usize = 48;
/// Largest weight: shares are relative, so a wide range adds nothing.
pub const MAX_WEIGHT: u32 = 10_000;
/// The weight of a VM that names none.
pub const DEFAULT_WEIGHT: u32 = 100;

/// A request that breaks a rule: the message says which field, its value and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError(msg.into()))
}

/// `POST /vms`: one VM. Optional fields take the defaults shown in `openapi.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// The VM's name: letters, digits, `-`, `_` and `.`, not starting with `.` or `-`.
    pub id: String,
    /// Guest kernel (bzImage or ELF vmlinux), a path on this host.
    pub kernel: PathBuf,
    /// Initramfs, a path on this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line; the VMM's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Number of vCPUs (default 1).
    #[serde(default = "one")]
    pub vcpus: u8,
    /// Memory limits.
    pub memory: MemorySpec,
    /// The balloon's settings (on by default).
    #[serde(default)]
    pub balloon: BalloonSpec,
    /// The hot-add region's settings.
    #[serde(default)]
    pub hotplug: HotplugSpec,
}

fn one() -> u8 {
    1
}

/// The VM's memory limits, MiB. `min_mib` and `max_mib` default to `boot_mib` (a VM of fixed
/// size); `weight` to 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemorySpec {
    /// Boot RAM: the balloon shrinks the guest below it, virtio-mem grows it above.
    pub boot_mib: u64,
    /// Guaranteed: never taken away; admission control sums these against the budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_mib: Option<u64>,
    /// The most the VM may get (boot RAM plus hot-added memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_mib: Option<u64>,
    /// Share of memory when it is short, relative to the other VMs' weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

impl MemorySpec {
    /// The guaranteed minimum, MiB: `min_mib`, else `boot_mib`.
    pub fn min(&self) -> u64 {
        self.min_mib.unwrap_or(self.boot_mib)
    }
    /// The most the VM may get, MiB: `max_mib`, else `boot_mib`.
    pub fn max(&self) -> u64 {
        self.max_mib.unwrap_or(self.boot_mib)
    }
    /// The weight: `weight`, else the default (100).
    pub fn weight(&self) -> u32 {
        self.weight.unwrap_or(DEFAULT_WEIGHT)
    }
}

/// The balloon. On by default with everything the policy needs: statistics every second, free
/// page reporting (freed guest pages go back to the host), and deflate-on-OOM (the guest's last
/// resort when memory runs out before the daemon reacts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalloonSpec {
    /// Let the guest take memory back from the balloon when it runs out.
    pub deflate_on_oom: bool,
    /// Free page reporting: freed guest pages go back to the host.
    pub free_page_reporting: bool,
    /// Seconds between statistics reports. 0 turns statistics off, which freezes the VM at its
    /// size: the policy shrinks nothing it cannot see.
    pub stats_interval_s: u64,
}

impl Default for BalloonSpec {
    fn default() -> Self {
        Self {
            deflate_on_oom: true,
            free_page_reporting: true,
            stats_interval_s: 1,
        }
    }
}

/// The hot-add region (virtio-mem). By default it is sized to reach `max_mib` (rounded up to
/// Linux's 128 MiB memory block); name a larger `region_mib` to be able to raise `max_mib` later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HotplugSpec {
    /// Size of the hot-add region, MiB; by default enough to reach `max_mib`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region_mib: Option<u64>,
    /// Plug granularity, MiB: a power of two from 2 to 1024 (default 2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_mib: Option<u64>,
}

impl HotplugSpec {
    /// The block size, MiB: `block_mib`, else the smallest allowed.
    pub fn block(&self) -> u64 {
        self.block_mib.unwrap_or(api::MIN_BLOCK_SIZE_MIB)
    }
}

/// `a` rounded up to a multiple of `to`.
fn round_up(a: u64, to: u64) -> u64 {
    a.div_ceil(to) * to
}

impl VmSpec {
    /// The hot-add region the VMM gets, MiB (0: none).
    pub fn region_mib(&self) -> u64 {
        let need = self.memory.max().saturating_sub(self.memory.boot_mib);
        self.hotplug
            .region_mib
            .unwrap_or_else(|| round_up(need, api::HOTPLUG_ALIGN_MIB))
    }

    /// The largest `max_mib` this VM can ever have: boot RAM plus its hot-add region.
    pub fn ceiling_mib(&self) -> u64 {
        self.memory.boot_mib + self.region_mib()
    }

    /// The spec with every default filled in, as stored and shown.
    pub fn resolved(mut self) -> Self {
        let m = self.memory;
        self.memory = MemorySpec {
            boot_mib: m.boot_mib,
            min_mib: Some(m.min()),
            max_mib: Some(m.max()),
            weight: Some(m.weight()),
        };
        self.hotplug = HotplugSpec {
            region_mib: Some(self.region_mib()),
            block_mib: Some(self.hotplug.block()),
        };
        self
    }

    /// Every rule a spec must follow on its own (files that must exist are checked by
    /// [`VmSpec::check_files`]; the budget by the registry).
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_id(&self.id)?;
        if self.vcpus == 0 || self.vcpus > api::MAX_VCPUS {
            return err(format!(
                "vcpus: {} is out of range 1..={}",
                self.vcpus,
                api::MAX_VCPUS
            ));
        }
        if let Some(c) = &self.cmdline {
            if c.len() > api::MAX_BOOT_ARGS_LEN || c.contains(['\0', '\n']) {
                return err(format!(
                    "cmdline: {} bytes; at most {} bytes on one line, without NUL",
                    c.len(),
                    api::MAX_BOOT_ARGS_LEN
                ));
            }
        }
        validate_memory(&self.memory)?;
        validate_balloon(&self.balloon)?;
        self.validate_hotplug()
    }

    fn validate_hotplug(&self) -> Result<(), SpecError> {
        let block = self.hotplug.block();
        if !block.is_power_of_two()
            || !(api::MIN_BLOCK_SIZE_MIB..=api::MAX_BLOCK_SIZE_MIB).contains(&block)
        {
            return err(format!(
                "hotplug.block_mib: {block} MiB is not a power of two in {}..={} MiB",
                api::MIN_BLOCK_SIZE_MIB,
                api::MAX_BLOCK_SIZE_MIB
            ));
        }
        let region = self.region_mib();
        if !region.is_multiple_of(api::HOTPLUG_ALIGN_MIB) || !region.is_multiple_of(block) {
            return err(format!(
                "hotplug.region_mib: {region} MiB is not a multiple of {} MiB (the Linux memory \
                 block) and of block_mib ({block} MiB)",
                api::HOTPLUG_ALIGN_MIB
            ));
        }
        let (boot, max) = (self.memory.boot_mib, self.memory.max());
        if boot + region < max {
            return err(format!(
                "hotplug.region_mib: {region} MiB is too small for memory.max_mib {max} MiB: \
                 it must be at least {} MiB (max_mib - boot_mib)",
                max - boot
            ));
        }
        if boot + region > api::MAX_MEM_MIB {
            return err(format!(
                "hotplug.region_mib: boot_mib + region_mib is {} MiB; at most {} MiB",
                boot + region,
                api::MAX_MEM_MIB
            ));
        }
        Ok(())
    }

    /// The kernel and initramfs exist as files on this host (checked at creation, so a typo is a
    /// 400 rather than a VM that dies at once).
    pub fn check_files(&self) -> Result<(), SpecError> {
        check_file("kernel", &self.kernel)?;
        if let Some(i) = &self.initramfs {
            check_file("initramfs", i)?;
        }
        Ok(())
    }
}

fn check_file(field: &str, path: &Path) -> Result<(), SpecError> {
    if !path.is_absolute() {
        return err(format!(
            "{field}: {} is not an absolute path (the daemon starts VMMs from its own directory)",
            path.display()
        ));
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => err(format!("{field}: {} is not a file", path.display())),
        Err(e) => err(format!("{field}: cannot read {}: {e}", path.display())),
    }
}

/// Ids become directory names: a safe file name, short enough for the socket path.
pub fn validate_id(id: &str) -> Result<(), SpecError> {
    let safe = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if id.is_empty() || id.len() > MAX_ID_LEN || !safe || id.starts_with(['.', '-']) {
        return err(format!(
            "id: {id:?} is not allowed: 1 to {MAX_ID_LEN} letters, digits, '-', '_' or '.', \
             not starting with '.' or '-'"
        ));
    }
    Ok(())
}

fn validate_memory(m: &MemorySpec) -> Result<(), SpecError> {
    let (boot, min, max) = (m.boot_mib, m.min(), m.max());
    if !(api::MIN_MEM_MIB..=api::MAX_MEM_MIB).contains(&boot) {
        return err(format!(
            "memory.boot_mib: {boot} MiB is out of range {}..={} MiB",
            api::MIN_MEM_MIB,
            api::MAX_MEM_MIB
        ));
    }
    if min < api::MIN_MEM_MIB || min > boot {
        return err(format!(
            "memory.min_mib: {min} MiB is out of range {}..={boot} MiB (at most boot_mib)",
            api::MIN_MEM_MIB
        ));
    }
    if max < boot {
        return err(format!(
            "memory.max_mib: {max} MiB is below boot_mib ({boot} MiB); it must be at least that"
        ));
    }
    validate_weight("memory.weight", m.weight())
}

fn validate_weight(field: &str, w: u32) -> Result<(), SpecError> {
    if w == 0 || w > MAX_WEIGHT {
        return err(format!("{field}: {w} is out of range 1..={MAX_WEIGHT}"));
    }
    Ok(())
}

fn validate_balloon(b: &BalloonSpec) -> Result<(), SpecError> {
    let max = api::MAX_STATS_POLLING_INTERVAL_S;
    if b.stats_interval_s > max {
        return err(format!(
            "balloon.stats_interval_s: {} s is out of range 0..={max} s",
            b.stats_interval_s
        ));
    }
    Ok(())
}

/// `PATCH /vms/{id}/memory`: new limits for a running VM; absent fields keep their value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryPatch {
    /// The new guaranteed minimum, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_mib: Option<u64>,
    /// The new maximum, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_mib: Option<u64>,
    /// The new weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// Why a patch cannot apply: a bad value (400) or one the VM's shape forbids (409).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatchError {
    /// A value out of range (400).
    Invalid(String),
    /// A value the VM's shape forbids, e.g. a maximum beyond its hot-add region (409).
    Conflict(String),
}

impl MemoryPatch {
    /// The VM's memory limits after the patch, or why not. `spec` is the VM as created.
    pub fn apply(&self, spec: &VmSpec) -> Result<MemorySpec, PatchError> {
        use PatchError::*;
        if self.min_mib.is_none() && self.max_mib.is_none() && self.weight.is_none() {
            return Err(Invalid(
                "the body names no field; give min_mib, max_mib or weight".into(),
            ));
        }
        let old = spec.memory;
        let min = self.min_mib.unwrap_or(old.min());
        let max = self.max_mib.unwrap_or(old.max());
        let weight = self.weight.unwrap_or(old.weight());
        validate_weight("weight", weight).map_err(|e| Invalid(e.0))?;
        if min < api::MIN_MEM_MIB {
            return Err(Invalid(format!(
                "min_mib: {min} MiB is below {} MiB",
                api::MIN_MEM_MIB
            )));
        }
        if min > max {
            return Err(Invalid(format!(
                "min_mib ({min} MiB) is above max_mib ({max} MiB); min_mib must be at most max_mib"
            )));
        }
        let ceiling = spec.ceiling_mib();
        if max > ceiling {
            return Err(Conflict(format!(
                "max_mib: {max} MiB is above what this VM can reach: {ceiling} MiB (boot_mib {} \
                 MiB plus its hot-add region of {} MiB, fixed when it was created)",
                old.boot_mib,
                spec.region_mib()
            )));
        }
        Ok(MemorySpec {
            boot_mib: old.boot_mib,
            min_mib: Some(min),
            max_mib: Some(max),
            weight: Some(weight),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(boot: u64, min: Option<u64>, max: Option<u64>) -> VmSpec {
        VmSpec {
            id: "a".into(),
            kernel: "/k".into(),
            initramfs: None,
            cmdline: None,
            vcpus: 1,
            memory: MemorySpec {
                boot_mib: boot,
                min_mib: min,
                max_mib: max,
                weight: None,
            },
            balloon: BalloonSpec::default(),
            hotplug: HotplugSpec::default(),
        }
    }

    #[test]
    fn ids_must_be_safe_file_names() {
        for good in ["a", "web-1", "db_2.prod", "A9"] {
            validate_id(good).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "-a",
            ".hidden",
            "a b",
            "é",
            &"x".repeat(49),
        ] {
            let e = validate_id(bad).unwrap_err().0;
            assert!(
                e.starts_with("id: ") && e.contains("letters, digits"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn limits_must_be_ordered_min_boot_max() {
        spec(512, Some(256), Some(1024)).validate().unwrap();
        let e = spec(512, Some(600), Some(1024)).validate().unwrap_err().0;
        assert_eq!(
            e,
            "memory.min_mib: 600 MiB is out of range 16..=512 MiB (at most boot_mib)"
        );
        let e = spec(512, None, Some(256)).validate().unwrap_err().0;
        assert!(
            e.starts_with("memory.max_mib: 256 MiB is below boot_mib"),
            "{e}"
        );
        let e = spec(8, None, None).validate().unwrap_err().0;
        assert!(
            e.starts_with("memory.boot_mib: 8 MiB is out of range 16.."),
            "{e}"
        );
    }

    #[test]
    fn the_hot_add_region_reaches_max_in_whole_memory_blocks() {
        let s = spec(512, Some(256), Some(1000));
        assert_eq!(s.region_mib(), 512);
        assert_eq!(s.ceiling_mib(), 1024);
        assert_eq!(spec(512, None, None).region_mib(), 0);
        let mut s = spec(512, None, Some(1024));
        s.hotplug.region_mib = Some(256);
        let e = s.validate().unwrap_err().0;
        assert!(e.contains("too small for memory.max_mib 1024 MiB"), "{e}");
        s.hotplug.region_mib = Some(600);
        let e = s.validate().unwrap_err().0;
        assert!(e.contains("not a multiple of 128 MiB"), "{e}");
        s.hotplug = HotplugSpec {
            region_mib: None,
            block_mib: Some(3),
        };
        let e = s.validate().unwrap_err().0;
        assert!(
            e.starts_with("hotplug.block_mib: 3 MiB is not a power of two"),
            "{e}"
        );
    }

    #[test]
    fn resolved_fills_every_default() {
        let s = spec(512, None, Some(1024)).resolved();
        assert_eq!(s.memory.min_mib, Some(512));
        assert_eq!(s.memory.weight, Some(DEFAULT_WEIGHT));
        assert_eq!(s.hotplug.region_mib, Some(512));
        assert_eq!(s.hotplug.block_mib, Some(2));
        assert_eq!(s.clone().resolved(), s, "idempotent");
    }

    #[test]
    fn patch_rules() {
        let s = spec(512, Some(256), Some(1024)).resolved();
        let p = MemoryPatch {
            max_mib: Some(2048),
            ..Default::default()
        };
        match p.apply(&s) {
            Err(PatchError::Conflict(m)) => {
                assert!(m.contains("above what this VM can reach: 1024 MiB"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        let p = MemoryPatch {
            min_mib: Some(900),
            max_mib: Some(800),
            ..Default::default()
        };
        assert!(matches!(p.apply(&s), Err(PatchError::Invalid(m)) if m.contains("above max_mib")));
        assert!(matches!(
            MemoryPatch::default().apply(&s),
            Err(PatchError::Invalid(_))
        ));
        let p = MemoryPatch {
            min_mib: Some(700),
            weight: Some(5),
            ..Default::default()
        };
        let m = p.apply(&s).unwrap();
        assert_eq!((m.min(), m.max(), m.weight()), (700, 1024, 5));
    }

    #[test]
    fn files_must_exist_and_be_absolute() {
        let mut s = spec(512, None, None);
        s.kernel = "relative/bzImage".into();
        assert!(s
            .check_files()
            .unwrap_err()
            .0
            .contains("not an absolute path"));
        s.kernel = "/nonexistent/bzImage".into();
        assert!(s
            .check_files()
            .unwrap_err()
            .0
            .starts_with("kernel: cannot read"));
        s.kernel = "/".into();
        assert!(s.check_files().unwrap_err().0.contains("is not a file"));
    }
}
