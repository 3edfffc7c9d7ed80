//! What the user asks for: command-line flags and an equivalent JSON file, merged and validated
//! into one [`VmConfig`]. The limits are the API's ([`api::rules`]): every error names the flag
//! or field, the value with its unit, and what is allowed.

use std::path::{Path, PathBuf};

use api::rules::{self, Field, RuleError, StatsQueue};
use clap::Parser;

use crate::seccomp::SeccompMode;
use serde::Deserialize;

/// Default kernel command line: console on COM1, reset through the keyboard controller, reboot
/// (and so exit) at once on panic, no PCI bus to probe.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off";
/// Boot memory when none is given.
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// Largest boot RAM we lay out (1 TiB); the host may well refuse less.
pub const MAX_MEMORY_MIB: u64 = api::MAX_MEM_MIB;
/// MADT APIC IDs are 8-bit and 0xff is broadcast.
pub const MAX_VCPUS: u8 = api::MAX_VCPUS;
/// Smallest boot RAM (the API's limit too).
pub const MIN_MEMORY_MIB: u64 = api::MIN_MEM_MIB;

/// Command line of the `vmm` binary.
#[derive(Parser, Debug)]
#[command(
    name = "vmm",
    version,
    about = "A KVM virtual machine monitor",
    long_about = None,
    after_help = "Exit status: 0 guest powered off, 2 guest reset, 128+N stopped by signal N, \
                  1 error while starting or running, 64 command line refused, 70 a thread made \
                  a system call outside its seccomp filter (docs/security.md)."
)]
pub struct Cli {
    /// JSON file with the same fields as the flags (kernel, initramfs, cmdline, vcpus,
    /// memory_mib, serial, thp, balloon, hotplug); flags given as well override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Guest kernel: an x86-64 bzImage or ELF vmlinux.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initramfs (cpio, optionally compressed) for the guest.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Number of vCPUs (1..=254, and no more than KVM allows).
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u8>,
    /// Boot RAM in MiB.
    #[arg(long = "memory-mib", value_name = "N")]
    pub memory_mib: Option<u64>,
    /// Where the guest's serial console goes: `stdout` or a file path.
    #[arg(long, value_name = "stdout|PATH")]
    pub serial: Option<String>,
    /// Back guest RAM with transparent huge pages (madvise(MADV_HUGEPAGE); needs THP `enabled`
    /// = always or madvise on the host). Fewer TLB misses, and contiguous balloon releases free
    /// whole 2 MiB pages at once; but a scattered 4 KiB balloon page only splits its huge page,
    /// and the host gets that memory back only when its kernel's deferred split runs (memory
    /// pressure). Off by default: see docs/balloon.md.
    #[arg(long)]
    pub thp: bool,
    /// Add a virtio-balloon: `amount_mib=N,deflate_on_oom=BOOL,stats_interval_s=N,
    /// free_page_reporting=BOOL` (every key optional; `--balloon ""` for the defaults).
    #[arg(long, value_name = "KEY=VALUE,...")]
    pub balloon: Option<String>,
    /// Add a hot-add region served by virtio-mem: `total_mib=N[,block_mib=M][,requested_mib=R]`.
    /// total_mib is a multiple of 128 (the Linux memory block); block_mib a power of two >= 2.
    #[arg(long, value_name = "KEY=VALUE,...")]
    pub hotplug: Option<String>,
    /// Log level on stderr: error, warn, info, debug or trace (default: $VMM_LOG, else warn).
    #[arg(long = "log-level", value_name = "LEVEL")]
    pub log_level: Option<log::LevelFilter>,
    /// Seccomp filters, one per thread kind: `on` (a call outside the thread's filter ends the
    /// VMM with exit status 70), `log` (it is logged on stderr and fails with ENOSYS), `off`
    /// (no filters: for debugging only).
    #[arg(long, value_name = "on|log|off", value_enum, default_value_t = SeccompMode::On)]
    pub seccomp: SeccompMode,
    /// Started as root: become this user once /dev/kvm, the kernel, initramfs, serial file and
    /// API socket are open (no groups, no capabilities, no_new_privs). Needs --gid.
    #[arg(long, value_name = "UID", requires = "gid", value_parser = parse_non_root_id)]
    pub uid: Option<u32>,
    /// The group for --uid.
    #[arg(long, value_name = "GID", requires = "uid", value_parser = parse_non_root_id)]
    pub gid: Option<u32>,
    /// With --uid: before dropping root, move into a mount namespace of the VMM's own whose
    /// root is empty and read-only, so no host file can be opened from then on. Needs the VM
    /// on the command line (--kernel or --config): files named through the API later could not
    /// be opened.
    #[arg(long, requires = "uid")]
    pub jail: bool,
    /// The REST API (`--api-socket PATH`, `--api-tcp ADDR`, ...).
    #[command(flatten)]
    pub api: api::server::ApiArgs,
}

/// `--uid`/`--gid`: a number other than 0 (dropping to root would drop nothing).
fn parse_non_root_id(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(0) => Err("0 is root: name an unprivileged id".into()),
        Ok(id) => Ok(id),
        Err(_) => Err(format!("{s:?} is not a numeric id")),
    }
}

/// A VM description still being assembled: the JSON config file's shape, then flags and REST API
/// calls fill it in, then [`VmConfig::from_partial`] validates it. Unknown fields in the file are
/// an error, so a typo is not silently ignored.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct PartialConfig {
    /// `--kernel`: the kernel image (bzImage or ELF vmlinux).
    pub kernel: Option<PathBuf>,
    /// `--initramfs`.
    pub initramfs: Option<PathBuf>,
    /// `--cmdline`: the kernel command line.
    pub cmdline: Option<String>,
    /// `--vcpus`.
    pub vcpus: Option<u8>,
    /// `--memory-mib`: boot memory.
    pub memory_mib: Option<u64>,
    /// `--serial`: `stdout` or a file path.
    pub serial: Option<String>,
    /// `--thp`: guest RAM on transparent huge pages.
    pub thp: Option<bool>,
    /// `--balloon`.
    pub balloon: Option<BalloonOptions>,
    /// `--hotplug`.
    pub hotplug: Option<HotplugOptions>,
}

/// Hot-add memory settings (`--hotplug` or `"hotplug"` in the config file).
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HotplugOptions {
    /// Size of the hot-add region, MiB: a multiple of 128.
    pub total_mib: u64,
    /// Plug granularity, MiB: a power of two, at least 2.
    #[serde(default = "default_block_mib")]
    pub block_mib: u64,
    /// Initially requested size, MiB.
    #[serde(default)]
    pub requested_mib: u64,
}

fn default_block_mib() -> u64 {
    2
}

impl HotplugOptions {
    const KEYS: &'static str = "total_mib, block_mib, requested_mib";

    /// Parse `key=value,...`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let mut total = None;
        let mut o = Self {
            total_mib: 0,
            block_mib: default_block_mib(),
            requested_mib: 0,
        };
        for (k, v) in key_values("--hotplug", s, Self::KEYS)? {
            let n: u64 = v.parse().map_err(|_| ConfigError::Option {
                flag: "--hotplug",
                detail: format!("{k}={v}: expected a number of MiB"),
            })?;
            match k {
                "total_mib" => total = Some(n),
                "block_mib" => o.block_mib = n,
                "requested_mib" => o.requested_mib = n,
                _ => return Err(unknown_key("--hotplug", k, Self::KEYS)),
            }
        }
        o.total_mib = total.ok_or_else(|| ConfigError::Option {
            flag: "--hotplug",
            detail: "total_mib is required".into(),
        })?;
        Ok(o)
    }

    /// The rules of Linux's virtio-mem driver, the API's (`PUT /hotplug/memory`,
    /// `PATCH /hotplug/memory`) for the region and the initial request.
    pub fn validate(&self) -> Result<(), RuleError> {
        rules::hotplug_block_size_mib(self.block_mib)?;
        rules::hotplug_total_size_mib(self.total_mib, self.block_mib)?;
        rules::hotplug_requested_size_mib(
            self.requested_mib,
            Some((self.total_mib, self.block_mib)),
        )
    }
}

/// virtio-balloon settings (`--balloon` or `"balloon"` in the config file).
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BalloonOptions {
    /// Initial target: MiB the guest should give back.
    #[serde(default)]
    pub amount_mib: u64,
    /// Let the guest take pages back under memory pressure.
    #[serde(default)]
    pub deflate_on_oom: bool,
    /// Seconds between statistics requests; 0 disables statistics.
    #[serde(default = "default_stats_interval")]
    pub stats_interval_s: u64,
    /// Free page reporting: the guest reports free pages, the host releases them.
    #[serde(default)]
    pub free_page_reporting: bool,
}

fn default_stats_interval() -> u64 {
    1
}

impl Default for BalloonOptions {
    fn default() -> Self {
        Self {
            amount_mib: 0,
            deflate_on_oom: false,
            stats_interval_s: default_stats_interval(),
            free_page_reporting: false,
        }
    }
}

impl BalloonOptions {
    const KEYS: &'static str = "amount_mib, deflate_on_oom, stats_interval_s, free_page_reporting";

    /// Parse `key=value,...`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let mut o = Self::default();
        for (k, v) in key_values("--balloon", s, Self::KEYS)? {
            let bad = |what: &str| ConfigError::Option {
                flag: "--balloon",
                detail: format!("{k}={v}: expected {what}"),
            };
            match k {
                "amount_mib" => o.amount_mib = v.parse().map_err(|_| bad("a number of MiB"))?,
                "stats_interval_s" => {
                    o.stats_interval_s = v.parse().map_err(|_| bad("a number of seconds"))?
                }
                "deflate_on_oom" => {
                    o.deflate_on_oom = parse_bool(v).ok_or_else(|| bad("true or false"))?
                }
                "free_page_reporting" => {
                    o.free_page_reporting = parse_bool(v).ok_or_else(|| bad("true or false"))?
                }
                _ => return Err(unknown_key("--balloon", k, Self::KEYS)),
            }
        }
        Ok(o)
    }
}

/// Split `key=value,...` (the form of `--balloon` and `--hotplug`), refusing items without `=`
/// and keys given twice (which would otherwise silently take the last value).
fn key_values<'a>(
    flag: &'static str,
    s: &'a str,
    keys: &str,
) -> Result<Vec<(&'a str, &'a str)>, ConfigError> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (k, v) = item.split_once('=').ok_or_else(|| ConfigError::Option {
            flag,
            detail: format!("`{item}` is not KEY=VALUE; keys are {keys}"),
        })?;
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(ConfigError::Option {
                flag,
                detail: format!("{k} is given twice; give each key once"),
            });
        }
        out.push((k, v));
    }
    Ok(out)
}

fn unknown_key(flag: &'static str, key: &str, keys: &str) -> ConfigError {
    ConfigError::Option {
        flag,
        detail: format!("unknown key `{key}`; keys are {keys}"),
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "true" | "on" | "1" => Some(true),
        "false" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// Where the guest console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOut {
    /// The VMM's standard output.
    Stdout,
    /// A file, created if missing and appended to.
    File(PathBuf),
}

/// A validated VM description.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initramfs, if any.
    pub initramfs: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Boot memory, MiB.
    pub memory_mib: u64,
    /// Where the guest console goes.
    pub serial: SerialOut,
    /// Guest RAM on transparent huge pages (`--thp`).
    pub thp: bool,
    /// The balloon, if the VM has one.
    pub balloon: Option<BalloonOptions>,
    /// Hot-add memory, if the VM has it.
    pub hotplug: Option<HotplugOptions>,
}

/// Why a configuration was refused; main exits with 64 (usage) for these.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The `--config` file could not be read.
    #[error("cannot read config file {path}: {source}")]
    FileUnreadable {
        /// The path given.
        path: String,
        /// The system's error.
        source: std::io::Error,
    },
    /// The `--config` file is not valid JSON for a VM.
    #[error("config file {path} is not valid: {detail}")]
    FileInvalid {
        /// The path given.
        path: String,
        /// serde's message.
        detail: String,
    },
    /// Neither a kernel was given nor the default guest image built.
    #[error("no kernel given: pass --kernel PATH (or \"kernel\" in --config), or build the default guest with `{build}`")]
    NoKernel {
        /// The command that builds it.
        build: String,
    },
    /// A value breaks one of the rules the API applies too; named by its flag here, by its
    /// JSON field for the API ([`ConfigError::for_api`]).
    #[error("{}", .0.for_cli())]
    Rule(RuleError),
    /// A flag's value cannot be used.
    #[error("{flag}: {detail}")]
    Option {
        /// The flag.
        flag: &'static str,
        /// What is wrong with it.
        detail: String,
    },
}

impl From<RuleError> for ConfigError {
    fn from(e: RuleError) -> Self {
        Self::Rule(e)
    }
}

impl ConfigError {
    /// The error in the API's words, for `PUT /actions InstanceStart`: fields named as the
    /// API's bodies name them.
    pub fn for_api(&self) -> String {
        match self {
            Self::Rule(e) => e.for_api(),
            Self::NoKernel { .. } => {
                "kernel_image_path: no kernel: PUT /boot-source {\"kernel_image_path\": ...} first"
                    .to_string()
            }
            other => other.to_string(),
        }
    }
}

impl VmConfig {
    /// Merge the config file (if any) with the flags, flags winning, and validate.
    pub fn from_cli(cli: Cli) -> Result<Self, ConfigError> {
        Self::from_partial(PartialConfig::from_cli(cli)?)
    }

    /// Validate a partial description, filling defaults (the default guest when no kernel).
    pub fn from_partial(p: PartialConfig) -> Result<Self, ConfigError> {
        let kernel = match p.kernel {
            Some(k) => k,
            None => default_guest_file("bzImage").ok_or_else(|| ConfigError::NoKernel {
                build: "resources/build-guest.sh".into(),
            })?,
        };
        let initramfs = p.initramfs.or_else(|| {
            // The default guest comes with its initramfs.
            let d = default_guest_file("bzImage")?;
            (d == kernel).then(|| default_guest_file("initramfs.cpio.gz"))?
        });
        let vcpus = p.vcpus.unwrap_or(1);
        rules::vcpu_count(u64::from(vcpus))?;
        let memory_mib = p.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
        rules::mem_size_mib(memory_mib)?;
        rules::host_path(Field::KernelImagePath, &kernel.to_string_lossy())?;
        if let Some(i) = &initramfs {
            rules::host_path(Field::InitrdPath, &i.to_string_lossy())?;
        }
        if let Some(c) = &p.cmdline {
            rules::boot_args(c)?;
        }
        let serial = match p.serial.as_deref() {
            None | Some("stdout") => SerialOut::Stdout,
            Some("") => {
                return Err(
                    RuleError::new(Field::Serial, "is empty; use `stdout` or a file path").into(),
                )
            }
            Some(path) => SerialOut::File(PathBuf::from(path)),
        };
        if let Some(b) = &p.balloon {
            rules::balloon_amount_mib(b.amount_mib, Some(memory_mib))?;
            rules::stats_polling_interval_s(b.stats_interval_s, StatsQueue::NotFixed)?;
        }
        if let Some(h) = &p.hotplug {
            h.validate()?;
        }
        Ok(Self {
            balloon: p.balloon,
            hotplug: p.hotplug,
            kernel,
            initramfs,
            cmdline: p.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
            vcpus,
            memory_mib,
            serial,
            thp: p.thp.unwrap_or(false),
        })
    }

    /// Boot memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
}

impl PartialConfig {
    /// The config file (if any) with the flags laid over it.
    pub fn from_cli(cli: Cli) -> Result<Self, ConfigError> {
        let mut p = match &cli.config {
            Some(path) => load_file(path)?,
            None => PartialConfig::default(),
        };
        p.kernel = cli.kernel.or(p.kernel);
        p.initramfs = cli.initramfs.or(p.initramfs);
        p.cmdline = cli.cmdline.or(p.cmdline);
        p.vcpus = cli.vcpus.or(p.vcpus);
        p.memory_mib = cli.memory_mib.or(p.memory_mib);
        p.serial = cli.serial.or(p.serial);
        if cli.thp {
            p.thp = Some(true);
        }
        if let Some(b) = cli.balloon {
            p.balloon = Some(BalloonOptions::parse(&b)?);
        }
        if let Some(h) = cli.hotplug {
            p.hotplug = Some(HotplugOptions::parse(&h)?);
        }
        Ok(p)
    }
}

fn load_file(path: &Path) -> Result<PartialConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::FileUnreadable {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ConfigError::FileInvalid {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

/// A file of the default guest image built by `resources/build-guest.sh`, if it exists.
/// Looked up beside the binary's source tree and in `$VMM_GUEST_DIR`.
pub fn default_guest_file(name: &str) -> Option<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(d) = std::env::var("VMM_GUEST_DIR") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/guest"));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut v = vec!["vmm"];
        v.extend_from_slice(args);
        Cli::parse_from(v)
    }

    #[test]
    fn flags_are_validated_with_the_allowed_range() {
        let e = VmConfig::from_cli(cli(&["--kernel", "/k", "--vcpus", "0"])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--vcpus: 0 vCPUs is out of range: allowed 1 to 254 vCPUs"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "--vcpus: {}",
                api::Validate::validate(&api::MachineConfig::new(0, 256))
                    .unwrap_err()
                    .message
            ),
            "the API's own message, named by the flag"
        );
        let c = VmConfig::from_cli(cli(&["--kernel", "/k", "--serial", "/tmp/s"])).unwrap();
        assert_eq!(c.serial, SerialOut::File("/tmp/s".into()));
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
        assert_eq!(c.balloon, None);
    }

    #[test]
    fn balloon_option_parsing() {
        let c = VmConfig::from_cli(cli(&[
            "--kernel",
            "/k",
            "--balloon",
            "amount_mib=64,deflate_on_oom=true,free_page_reporting=on",
        ]))
        .unwrap();
        let b = c.balloon.unwrap();
        assert_eq!(
            (b.amount_mib, b.deflate_on_oom, b.free_page_reporting),
            (64, true, true)
        );
        assert_eq!(b.stats_interval_s, 1);
        let e = BalloonOptions::parse("amount=3").unwrap_err().to_string();
        assert!(
            e.contains("unknown key `amount`") && e.contains("amount_mib"),
            "{e}"
        );
        let e = BalloonOptions::parse("deflate_on_oom=maybe")
            .unwrap_err()
            .to_string();
        assert!(e.contains("true or false"), "{e}");
        let e = VmConfig::from_cli(cli(&["--kernel", "/k", "--balloon", "amount_mib=256"]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "--balloon amount_mib: 256 MiB is out of range: allowed 0 to 240 MiB (the boot \
             memory, 256 MiB, less the 16 MiB a guest keeps)"
        );
        assert_eq!(
            BalloonOptions::parse("").unwrap(),
            BalloonOptions::default()
        );
    }

    #[test]
    fn hotplug_option_rules() {
        let h = HotplugOptions::parse("total_mib=2048,block_mib=4").unwrap();
        assert_eq!((h.total_mib, h.block_mib, h.requested_mib), (2048, 4, 0));
        h.validate().unwrap();
        let e = HotplugOptions::parse("block_mib=4")
            .unwrap_err()
            .to_string();
        assert!(e.contains("total_mib is required"), "{e}");
        let e = HotplugOptions::parse("total_mib=100")
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(
            e.for_cli(),
            "--hotplug total_mib: 100 MiB is out of range: allowed 128 to 1048576 MiB"
        );
        let e = HotplugOptions::parse("total_mib=200")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.for_cli().contains("multiple of 128"), "{e}");
        let e = HotplugOptions::parse("total_mib=256,block_mib=3")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.for_cli().contains("power of two"), "{e}");
        let e = HotplugOptions::parse("total_mib=256,requested_mib=512")
            .unwrap()
            .validate();
        assert!(e.is_err());
        let e = HotplugOptions::parse("total_mib=256,size=1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key `size`"), "{e}");
    }

    /// The command line had limits of its own (1 MiB of memory, any stats interval, repeated
    /// keys taking the last value): now the API's.
    #[test]
    fn command_line_limits_are_the_apis() {
        let err = |args: &[&str]| {
            let mut v = vec!["--kernel", "/k"];
            v.extend_from_slice(args);
            VmConfig::from_cli(cli(&v)).unwrap_err().to_string()
        };
        assert_eq!(
            err(&["--memory-mib", "8"]),
            "--memory-mib: 8 MiB is out of range: allowed 16 to 1048576 MiB"
        );
        assert_eq!(
            err(&["--balloon", "stats_interval_s=4000"]),
            "--balloon stats_interval_s: 4000 s is out of range: allowed 0 to 3600 s"
        );
        assert_eq!(
            err(&["--balloon", "amount_mib=1,amount_mib=2"]),
            "--balloon: amount_mib is given twice; give each key once"
        );
        assert_eq!(
            err(&["--hotplug", "total_mib=256,total_mib=512"]),
            "--hotplug: total_mib is given twice; give each key once"
        );
        assert!(
            err(&["--cmdline", &"x".repeat(3000)]).starts_with("--cmdline: 3000 bytes is too long")
        );
        assert_eq!(
            err(&["--hotplug", "total_mib=256,requested_mib=3"]),
            "--hotplug requested_mib: 3 MiB is not a multiple of block_size_mib (2 MiB): \
             allowed 0 to 256 MiB in steps of 2 MiB"
        );
        // The same error in the API's words, for InstanceStart.
        let e = VmConfig::from_cli(cli(&["--kernel", "/k", "--memory-mib", "8"])).unwrap_err();
        assert_eq!(
            e.for_api(),
            "mem_size_mib: 8 MiB is out of range: allowed 16 to 1048576 MiB"
        );
        let c = VmConfig::from_cli(cli(&["--kernel", "/k", "--memory-mib", "16"])).unwrap();
        assert_eq!(c.memory_mib, 16);
    }

    #[test]
    fn config_file_errors_name_the_field() {
        let dir = std::env::temp_dir().join(format!("vmm-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("bad.json");
        std::fs::write(&f, r#"{"kernel": "/k", "memory_mb": 5}"#).unwrap();
        let e = VmConfig::from_cli(cli(&["--config", f.to_str().unwrap()])).unwrap_err();
        assert!(e.to_string().contains("memory_mb"), "{e}");
        std::fs::write(&f, r#"{"kernel": "/k", "vcpus": "two"}"#).unwrap();
        let e = VmConfig::from_cli(cli(&["--config", f.to_str().unwrap()])).unwrap_err();
        assert!(e.to_string().contains("invalid type"), "{e}");
        std::fs::write(&f, r#"{"kernel": "/k", "vcpus": 2, "memory_mib": 512}"#).unwrap();
        let c =
            VmConfig::from_cli(cli(&["--config", f.to_str().unwrap(), "--vcpus", "3"])).unwrap();
        assert_eq!((c.vcpus, c.memory_mib), (3, 512), "flags override the file");
        assert!(!c.thp, "4 KiB pages unless asked");
        let c = VmConfig::from_cli(cli(&["--config", f.to_str().unwrap(), "--thp"])).unwrap();
        assert!(c.thp);
        std::fs::write(&f, r#"{"kernel": "/k", "thp": true}"#).unwrap();
        let c = VmConfig::from_cli(cli(&["--config", f.to_str().unwrap()])).unwrap();
        assert!(c.thp, "from the file");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
