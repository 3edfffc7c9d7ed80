//! The daemon's shared core: its configuration, its records (behind one mutex, never held across
//! an await or a request to a VMM) and its counters. The API handlers, the supervision loop and
//! the control loop all work on one `Arc<Daemon>`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use api::{MetricFamily, MetricKind, MetricSample};
use axum::http::StatusCode;

use crate::registry::{HostSettings, Registry, VmEntry, VmState};
use crate::statedir::StateDir;

/// How the daemon runs (from its command line).
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// The state directory: everything that survives a restart.
    pub state: StateDir,
    /// The daemon's own API socket.
    pub socket: PathBuf,
    /// The `vmm` binary each VM runs.
    pub vmm: PathBuf,
    /// This binary, started again as each VM's monitor.
    pub exe: PathBuf,
    /// DELETE: how long a VMM has after SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
    /// The most one tick waits for one VMM's answers.
    pub request_timeout: Duration,
    /// The most POST /vms waits for the monitor to start the VMM.
    pub start_timeout: Duration,
    /// The VMM's log level (its stderr goes to vmm.log).
    pub vmm_log_level: String,
}

/// Everything shared.
pub struct Daemon {
    /// How it was started.
    pub config: DaemonConfig,
    registry: Mutex<Registry>,
    /// Counters for `GET /metrics`.
    pub metrics: Metrics,
    /// When the daemon started, for its uptime.
    pub started: Instant,
}

/// An API error: the status and a message for the user (`{"fault_message": ...}`).
pub type Fault = api::Fault;

/// 400: the request is wrong.
pub fn bad_request(msg: impl Into<String>) -> Fault {
    Fault::new(StatusCode::BAD_REQUEST, msg)
}
/// 404: what was asked about does not exist.
pub fn not_found(msg: impl Into<String>) -> Fault {
    Fault::new(StatusCode::NOT_FOUND, msg)
}
/// 409: the request conflicts with the state (an id in use, no room in the budget).
pub fn conflict(msg: impl Into<String>) -> Fault {
    Fault::new(StatusCode::CONFLICT, msg)
}
/// 500: the daemon failed; not the client's fault.
pub fn internal(msg: impl Into<String>) -> Fault {
    Fault::new(StatusCode::INTERNAL_SERVER_ERROR, msg)
}

impl Daemon {
    /// A daemon with no VMs yet and these host settings.
    pub fn new(config: DaemonConfig, host: HostSettings) -> Self {
        Self {
            config,
            registry: Mutex::new(Registry::new(host)),
            metrics: Metrics::default(),
            started: Instant::now(),
        }
    }

    /// The records. Never hold the guard across an await.
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The budget, tick and policy parameters in force.
    pub fn host_settings(&self) -> HostSettings {
        self.registry().host
    }

    /// `GET /metrics`: per-VM gauges, host gauges, decision counters, tick timing, API requests.
    pub fn metric_families(&self) -> Vec<MetricFamily> {
        let reg = self.registry();
        let mut families = vm_gauges(&reg);
        let mb = |mib: u64| (mib << 20) as f64;
        let g =
            |name: &str, help: &str, v: f64| MetricFamily::single(name, help, MetricKind::Gauge, v);
        families.push(g(
            "hostd_budget_bytes",
            "What the VMs' targets may add up to.",
            mb(reg.host.budget_mib),
        ));
        families.push(g(
            "hostd_guaranteed_bytes",
            "The live VMs' minimums added up.",
            mb(reg.guaranteed_mib(None)),
        ));
        if let Some(t) = reg.last_tick {
            families.push(g(
                "hostd_total_target_bytes",
                "The targets added up at the last tick.",
                mb(t.total_target_mib),
            ));
            families.push(g(
                "hostd_over_budget_bytes",
                "How far the VMs' floors exceeded the budget at the last tick.",
                mb(t.over_budget_mib),
            ));
            families.push(g(
                "hostd_tick_duration_seconds",
                "How long the last control tick took.",
                t.duration_ms / 1000.0,
            ));
        }
        drop(reg);
        families.extend(self.metrics.families());
        families
    }
}

/// One gauge family per VM figure, labelled `vm`; a figure not read yet is left out.
fn vm_gauges(reg: &Registry) -> Vec<MetricFamily> {
    type Figure = (&'static str, &'static str, fn(&VmEntry) -> Option<f64>);
    let figures: [Figure; 7] = [
        (
            "hostd_vm_up",
            "1 while the VM's VMM runs, 0 once it ended.",
            |v| {
                Some(f64::from(u8::from(matches!(
                    v.state,
                    VmState::Running | VmState::Starting
                ))))
            },
        ),
        ("hostd_vm_min_bytes", "The VM's guaranteed minimum.", |v| {
            Some(((v.spec.memory.min()) << 20) as f64)
        }),
        ("hostd_vm_max_bytes", "The VM's maximum.", |v| {
            Some(((v.spec.memory.max()) << 20) as f64)
        }),
        (
            "hostd_vm_target_bytes",
            "The size the VMM works toward (GET /vm/resize desired_mib).",
            |v| v.readings.target_mib.map(|m| (m << 20) as f64),
        ),
        (
            "hostd_vm_actual_bytes",
            "What the guest can use now (GET /vm/resize current_mib).",
            |v| v.readings.current_mib.map(|m| (m << 20) as f64),
        ),
        (
            "hostd_vm_rss_bytes",
            "The VMM process's resident set (VmRSS).",
            |v| v.readings.rss_mib.map(|m| (m << 20) as f64),
        ),
        (
            "hostd_vm_stats_age_seconds",
            "Age of the guest's last statistics report.",
            |v| v.readings.stats_age_ms.map(|a| a as f64 / 1000.0),
        ),
    ];
    figures
        .iter()
        .map(|(name, help, read)| MetricFamily {
            name: (*name).into(),
            help: (*help).into(),
            kind: MetricKind::Gauge,
            samples: reg
                .vms
                .iter()
                .filter_map(|(id, v)| {
                    read(v).map(|value| MetricSample {
                        labels: vec![("vm".into(), id.clone())],
                        value,
                    })
                })
                .collect(),
        })
        .filter(|f| !f.samples.is_empty())
        .collect()
}

/// Counters (the per-VM gauges are rendered from the registry).
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    decisions: BTreeMap<String, u64>,
    changes: BTreeMap<String, u64>,
    change_failures: u64,
    unreachable: u64,
    ticks: u64,
    tick_seconds: f64,
    exits: u64,
    requests: BTreeMap<(&'static str, &'static str, u16), u64>,
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Counters) -> R) -> R {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// One decision of the policy; `changed` when it moved the target.
    pub fn decision(&self, reason: &str, changed: bool) {
        self.with(|c| {
            *c.decisions.entry(reason.into()).or_default() += 1;
            if changed {
                *c.changes.entry(reason.into()).or_default() += 1;
            }
        })
    }
    /// A target change a VMM refused or did not answer.
    pub fn change_failed(&self) {
        self.with(|c| c.change_failures += 1)
    }
    /// A VMM whose API did not answer at a tick.
    pub fn unreachable(&self) {
        self.with(|c| c.unreachable += 1)
    }
    /// One control-loop tick that took `seconds`.
    pub fn tick(&self, seconds: f64) {
        self.with(|c| {
            c.ticks += 1;
            c.tick_seconds += seconds;
        })
    }
    /// A VMM ended.
    pub fn vm_exited(&self) {
        self.with(|c| c.exits += 1)
    }
    /// One API request answered, by method, route pattern and status.
    pub fn request(&self, method: &'static str, route: &'static str, status: u16) {
        self.with(|c| *c.requests.entry((method, route, status)).or_default() += 1)
    }

    fn families(&self) -> Vec<MetricFamily> {
        self.with(|c| {
            let by = |label: &str, map: &BTreeMap<String, u64>| {
                map.iter()
                    .map(|(k, v)| MetricSample {
                        labels: vec![(label.into(), k.clone())],
                        value: *v as f64,
                    })
                    .collect()
            };
            let counter = |name: &str, help: &str, samples: Vec<MetricSample>| MetricFamily {
                name: name.into(),
                help: help.into(),
                kind: MetricKind::Counter,
                samples,
            };
            let one = |v: f64| {
                vec![MetricSample {
                    labels: Vec::new(),
                    value: v,
                }]
            };
            let requests = c
                .requests
                .iter()
                .map(|((m, r, s), n)| MetricSample {
                    labels: vec![
                        ("method".into(), (*m).into()),
                        ("route".into(), (*r).into()),
                        ("status".into(), s.to_string()),
                    ],
                    value: *n as f64,
                })
                .collect();
            vec![
                counter(
                    "hostd_decisions_total",
                    "Policy decisions, by reason (one per VM per tick).",
                    by("reason", &c.decisions),
                ),
                counter(
                    "hostd_target_changes_total",
                    "Targets changed and sent to a VMM, by reason.",
                    by("reason", &c.changes),
                ),
                counter(
                    "hostd_target_change_failures_total",
                    "Target changes a VMM refused or did not answer.",
                    one(c.change_failures as f64),
                ),
                counter(
                    "hostd_vmm_unreachable_total",
                    "Ticks at which a VMM did not answer in time (or a running one failed to answer).",
                    one(c.unreachable as f64),
                ),
                counter(
                    "hostd_ticks_total",
                    "Control loop ticks.",
                    one(c.ticks as f64),
                ),
                counter(
                    "hostd_tick_seconds_total",
                    "Time spent in control loop ticks.",
                    one(c.tick_seconds),
                ),
                counter(
                    "hostd_vm_exits_total",
                    "VMMs that ended.",
                    one(c.exits as f64),
                ),
                counter(
                    "hostd_api_requests_total",
                    "API requests answered, by method, route and HTTP status.",
                    requests,
                ),
            ]
        })
    }
}
