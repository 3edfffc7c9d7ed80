//! The daemon's memory of its VMs and of the host: one record per VM (spec, process, state, how
//! it ended, the last readings and decision), the host's budget and policy settings, and the
//! admission rule. Everything the API shows is rendered from here; the state directory holds
//! what must survive a restart.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::procfs::HostReading;
use crate::spec::{MemorySpec, VmSpec};
use crate::statedir::{ExitRecord, VmDir, VmmRecord};

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// The VMM runs; its API has not answered yet.
    Starting,
    /// The VMM runs and answers.
    Running,
    /// DELETE asked it to stop; it goes away once the VMM has ended.
    Stopping,
    /// The VMM has ended; `exit` says how.
    Exited,
}

/// How a VMM ended, for people: the raw status and the cause in words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit code, when it exited.
    #[serde(default)]
    pub code: Option<i32>,
    /// Signal, when a signal killed it.
    #[serde(default)]
    pub signal: Option<i32>,
    /// What ended it, in words.
    pub cause: String,
    /// When it ended, if known.
    #[serde(default)]
    pub at_unix_ms: Option<u64>,
    /// The VMM's last lines on stderr.
    pub stderr_tail: Vec<String>,
}

impl ExitInfo {
    /// Reads an exit record the way the VMM's exit codes are documented (README: 0 power off,
    /// 2 reset, 128+N signal N, 1 error).
    pub fn from_record(r: Option<&ExitRecord>, stderr_tail: Vec<String>) -> Self {
        let last_error = || {
            stderr_tail
                .iter()
                .rev()
                .find(|l| l.contains("error"))
                .cloned()
        };
        let cause = match r {
            None => "the VMM is gone and its monitor recorded no status (both were killed, \
                     or the host rebooted)"
                .to_string(),
            Some(ExitRecord { error: Some(e), .. }) => format!("the VMM could not start: {e}"),
            Some(ExitRecord {
                signal: Some(s), ..
            }) => format!("the VMM was killed by signal {s} ({})", signal_name(*s)),
            Some(ExitRecord { code: Some(0), .. }) => "the guest powered off".into(),
            Some(ExitRecord { code: Some(2), .. }) => {
                "the guest reset (reboot, triple fault or panic)".into()
            }
            Some(ExitRecord { code: Some(c), .. }) if *c > 128 => format!(
                "the VMM stopped on signal {} ({})",
                c - 128,
                signal_name(c - 128)
            ),
            Some(ExitRecord { code: Some(c), .. }) => match last_error() {
                Some(line) => format!("the VMM failed (exit code {c}): {line}"),
                None => format!("the VMM failed (exit code {c})"),
            },
            Some(_) => "the VMM ended with an unknown status".into(),
        };
        Self {
            code: r.and_then(|r| r.code),
            signal: r.and_then(|r| r.signal),
            cause,
            at_unix_ms: r.map(|r| r.at_unix_ms),
            stderr_tail,
        }
    }
}

fn signal_name(s: i32) -> &'static str {
    match s {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "another signal",
    }
}

/// What the control loop last read from a VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readings {
    /// `desired_mib` of the VMM's `GET /vm/resize`: the target it works toward.
    pub target_mib: Option<u64>,
    /// `current_mib`: what the guest can use now.
    pub current_mib: Option<u64>,
    /// Hot-added memory plugged (virtio-mem), MiB.
    pub plugged_mib: Option<u64>,
    /// The VMM process's resident set (VmRSS), MiB.
    pub rss_mib: Option<u64>,
    /// The guest's available memory from its last statistics report, MiB.
    pub available_mib: Option<u64>,
    /// Age of that report, ms.
    pub stats_age_ms: Option<u64>,
    /// Whether the VMM's API answered at the last tick.
    pub reachable: bool,
}

/// The policy's last decision for a VM, as shown and logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionView {
    /// The target the policy chose, MiB.
    pub target_mib: u64,
    /// The target before, MiB.
    pub previous_mib: u64,
    /// Why the target is what it is.
    pub reason: policy::Reason,
    /// Conditions the policy saw beside the reason.
    pub flags: policy::Flags,
    /// What the VM would get with memory to spare, MiB; `None` when frozen.
    #[serde(default)]
    pub wanted_mib: Option<u64>,
    /// When the decision was made.
    pub at_unix_ms: u64,
    /// The last change the daemon sent (`PUT /vm/resize`), when it made one.
    #[serde(default)]
    pub last_change: Option<ChangeView>,
}

/// One target change sent to a VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeView {
    /// The target before, MiB.
    pub from_mib: u64,
    /// The target sent, MiB.
    pub to_mib: u64,
    /// Why the policy changed it.
    pub reason: policy::Reason,
    /// When it was sent.
    pub at_unix_ms: u64,
    /// `None` when the VMM accepted it; else why not.
    #[serde(default)]
    pub error: Option<String>,
}

/// One VM.
#[derive(Debug, Clone)]
pub struct VmEntry {
    /// As created (every default filled in), limits as last PATCHed.
    pub spec: VmSpec,
    /// The VM's directory in the state directory.
    pub dir: VmDir,
    /// The VMM and its monitor, once recorded.
    pub record: Option<VmmRecord>,
    /// Where the VMM is in its life.
    pub state: VmState,
    /// How the VMM ended, once it has.
    pub exit: Option<ExitInfo>,
    /// Set by DELETE: SIGKILL after this instant if the VMM is still there.
    pub kill_at: Option<Instant>,
    /// When the VMM was first seen gone without an exit record yet.
    pub gone_since: Option<Instant>,
    /// What the control loop last read from the VM.
    pub readings: Readings,
    /// The policy's last decision for the VM.
    pub decision: Option<DecisionView>,
}

impl VmEntry {
    /// A VM about to start: state `starting`, nothing read or decided yet.
    pub fn new(spec: VmSpec, dir: VmDir) -> Self {
        Self {
            spec,
            dir,
            record: None,
            state: VmState::Starting,
            exit: None,
            kill_at: None,
            gone_since: None,
            readings: Readings::default(),
            decision: None,
        }
    }

    /// Whether it holds (or may soon hold) host memory: everything but an ended VMM.
    pub fn is_live(&self) -> bool {
        self.state != VmState::Exited
    }

    /// The VM as `GET /vms/{id}` shows it.
    pub fn info(&self) -> VmInfo {
        let m = self.spec.memory;
        VmInfo {
            id: self.spec.id.clone(),
            state: self.state,
            pid: self.record.as_ref().map(|r| r.vmm.pid),
            api_socket: self.dir.api_socket(),
            console_log: self.dir.console_log(),
            console_in: self.dir.console_in(),
            memory: VmMemoryInfo {
                boot_mib: m.boot_mib,
                min_mib: m.min(),
                max_mib: m.max(),
                weight: m.weight(),
                readings: self.readings,
            },
            last_decision: self.decision.clone(),
            exit: self.exit.clone(),
            spec: self.spec.clone(),
        }
    }
}

/// `GET /vms/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The VM's name.
    pub id: String,
    /// Where the VMM is in its life.
    pub state: VmState,
    /// The VMM's PID, once it runs.
    pub pid: Option<i32>,
    /// The VMM's own API socket (see api/README.md).
    pub api_socket: PathBuf,
    /// The guest's serial output.
    pub console_log: PathBuf,
    /// A FIFO: what is written to it is typed on the guest's serial console.
    pub console_in: PathBuf,
    /// Limits and the last readings.
    pub memory: VmMemoryInfo,
    /// The policy's last decision, if any.
    pub last_decision: Option<DecisionView>,
    /// How the VMM ended (state `exited`), else null.
    pub exit: Option<ExitInfo>,
    /// The VM as created (defaults filled in), limits as last patched.
    pub spec: VmSpec,
}

/// A VM's limits and the last readings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmMemoryInfo {
    /// Boot RAM, MiB.
    pub boot_mib: u64,
    /// The guaranteed minimum, MiB.
    pub min_mib: u64,
    /// The most the VM may get, MiB.
    pub max_mib: u64,
    /// Share of memory when it is short.
    pub weight: u32,
    /// The last readings (flattened into this object).
    #[serde(flatten)]
    pub readings: Readings,
}

/// `GET /vms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmList {
    /// Every VM, live or ended, by id.
    pub vms: Vec<VmInfo>,
}

/// What `PUT /host/memory` sets; kept in `host.json` across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSettings {
    /// What the VMs' targets may add up to, MiB.
    pub budget_mib: u64,
    /// How often the control loop runs, ms.
    pub tick_ms: u64,
    /// The policy's parameters in force.
    pub params: policy::Params,
}

/// The host side of the last tick.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TickView {
    /// When the tick started.
    pub at_unix_ms: u64,
    /// How long it took, ms.
    pub duration_ms: f64,
    /// The host's memory readings.
    pub host: HostReading,
    /// The targets of every live VM added up, MiB.
    pub total_target_mib: u64,
    /// How far the targets' sum exceeds the budget, MiB (0 when within it).
    pub over_budget_mib: u64,
}

/// The daemon's records.
#[derive(Debug)]
pub struct Registry {
    /// Every VM by id.
    pub vms: BTreeMap<String, VmEntry>,
    /// The budget, tick and parameters in force.
    pub host: HostSettings,
    /// The host side of the last tick; `None` before the first.
    pub last_tick: Option<TickView>,
}

/// Refused by admission control: the guaranteed minimums would exceed the budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoRoom {
    /// How much more budget the new minimum needs, MiB.
    pub missing_mib: u64,
    /// What the other live VMs' minimums already take, MiB.
    pub guaranteed_mib: u64,
    /// The budget, MiB.
    pub budget_mib: u64,
}

impl Registry {
    /// Empty records with these host settings.
    pub fn new(host: HostSettings) -> Self {
        Self {
            vms: BTreeMap::new(),
            host,
            last_tick: None,
        }
    }

    /// The minimums of every live VM but `except`, MiB.
    pub fn guaranteed_mib(&self, except: Option<&str>) -> u64 {
        self.vms
            .values()
            .filter(|v| v.is_live() && Some(v.spec.id.as_str()) != except)
            .map(|v| v.spec.memory.min())
            .sum()
    }

    /// Admission: `min_mib` more (for VM `id`, replacing its current minimum if it has one)
    /// fits beside the other live VMs' minimums within `budget_mib`.
    pub fn admit(&self, id: &str, min_mib: u64, budget_mib: u64) -> Result<(), NoRoom> {
        let guaranteed = self.guaranteed_mib(Some(id));
        let need = guaranteed + min_mib;
        if need > budget_mib {
            return Err(NoRoom {
                missing_mib: need - budget_mib,
                guaranteed_mib: guaranteed,
                budget_mib,
            });
        }
        Ok(())
    }

    /// `GET /host/memory`.
    pub fn host_view(&self) -> HostMemory {
        let vms: Vec<HostVm> = self
            .vms
            .values()
            .filter(|v| v.is_live())
            .map(|v| HostVm {
                id: v.spec.id.clone(),
                state: v.state,
                limits: v.spec.memory,
                readings: v.readings,
                last_decision: v.decision.clone(),
            })
            .collect();
        let total_rss_mib = vms.iter().filter_map(|v| v.readings.rss_mib).sum();
        HostMemory {
            budget_mib: self.host.budget_mib,
            guaranteed_mib: self.guaranteed_mib(None),
            total_rss_mib,
            tick_ms: self.host.tick_ms,
            params: self.host.params,
            last_tick: self.last_tick,
            vms,
        }
    }
}

/// `GET /host/memory`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostMemory {
    /// What the VMs' targets may add up to, MiB.
    pub budget_mib: u64,
    /// The live VMs' minimums added up: what admission control has promised.
    pub guaranteed_mib: u64,
    /// The live VMMs' resident sets added up, MiB (guest memory plus each VMM's own).
    pub total_rss_mib: u64,
    /// Control loop period, ms.
    pub tick_ms: u64,
    /// The policy's parameters in force.
    pub params: policy::Params,
    /// The host's readings and the targets' sum at the last tick (none before the first).
    pub last_tick: Option<TickView>,
    /// Every live VM.
    pub vms: Vec<HostVm>,
}

/// One live VM in `GET /host/memory`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostVm {
    /// The VM's name.
    pub id: String,
    /// Where the VMM is in its life.
    pub state: VmState,
    /// Its memory limits as given.
    pub limits: MemorySpec,
    /// The last readings (flattened into this object).
    #[serde(flatten)]
    pub readings: Readings,
    /// The policy's last decision, if any.
    pub last_decision: Option<DecisionView>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{BalloonSpec, HotplugSpec};

    fn entry(id: &str, min: u64, state: VmState) -> VmEntry {
        let spec = VmSpec {
            id: id.into(),
            kernel: "/k".into(),
            initramfs: None,
            cmdline: None,
            vcpus: 1,
            memory: MemorySpec {
                boot_mib: 512,
                min_mib: Some(min),
                max_mib: Some(1024),
                weight: None,
            },
            balloon: BalloonSpec::default(),
            hotplug: HotplugSpec::default(),
        }
        .resolved();
        let mut e = VmEntry::new(
            spec,
            VmDir {
                path: format!("/s/vms/{id}").into(),
            },
        );
        e.state = state;
        e
    }

    fn registry() -> Registry {
        Registry::new(HostSettings {
            budget_mib: 1000,
            tick_ms: 1000,
            params: policy::Params::default(),
        })
    }

    #[test]
    fn admission_counts_live_minimums_and_says_what_is_missing() {
        let mut r = registry();
        r.vms.insert("a".into(), entry("a", 300, VmState::Running));
        r.vms.insert("b".into(), entry("b", 400, VmState::Starting));
        r.vms
            .insert("dead".into(), entry("dead", 900, VmState::Exited));
        assert_eq!(r.guaranteed_mib(None), 700, "an exited VM holds nothing");
        r.admit("c", 300, 1000).unwrap();
        assert_eq!(
            r.admit("c", 350, 1000),
            Err(NoRoom {
                missing_mib: 50,
                guaranteed_mib: 700,
                budget_mib: 1000
            })
        );
        // Raising a VM's own minimum counts it once.
        r.admit("a", 600, 1000).unwrap();
        assert!(r.admit("a", 601, 1000).is_err());
    }

    #[test]
    fn exit_causes_read_like_the_vmm_exit_codes() {
        let rec = |code, signal| ExitRecord {
            code,
            signal,
            error: None,
            at_unix_ms: 1,
        };
        let cause = |r: Option<ExitRecord>, tail: &[&str]| {
            ExitInfo::from_record(r.as_ref(), tail.iter().map(|s| s.to_string()).collect()).cause
        };
        assert_eq!(
            cause(Some(rec(Some(0), None)), &[]),
            "the guest powered off"
        );
        assert_eq!(
            cause(Some(rec(None, Some(9))), &[]),
            "the VMM was killed by signal 9 (SIGKILL)"
        );
        assert_eq!(
            cause(Some(rec(Some(143), None)), &[]),
            "the VMM stopped on signal 15 (SIGTERM)"
        );
        assert_eq!(
            cause(
                Some(rec(Some(1), None)),
                &["vmm: error: cannot open /dev/kvm", "bye"]
            ),
            "the VMM failed (exit code 1): vmm: error: cannot open /dev/kvm"
        );
        assert!(cause(None, &[]).contains("recorded no status"));
        let info = ExitInfo::from_record(Some(&rec(Some(2), None)), vec!["x".into()]);
        assert_eq!(info.code, Some(2));
        assert!(info.cause.contains("reset"));
        assert_eq!(info.stderr_tail, vec!["x"]);
    }
}
