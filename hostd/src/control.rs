//! The control loop: every tick, observe every VM through its VMM's API and /proc, hand the
//! observations to the policy (`policy::decide`, a pure function), apply the targets that changed
//! with `PUT /vm/resize`, and log and export every change with its reason.
//!
//! This is the only module that knows the policy's interface. A slow or hung VMM cannot stall the
//! others: all VMMs are read at once, each within `request_timeout`; one that does not answer is
//! observed as "no statistics", which the policy answers by freezing that VM at its size.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::client::{Client, ClientError};
use api::{BalloonStats, HotplugMemoryState, ResizeRequest, ResizeStatus};
use hyper::{Method, StatusCode};
use policy::{Decision, GuestStats, HostObservation, Plan, PolicyState, VmLimits, VmObservation};
use tokio::task::JoinSet;

use crate::daemon::Daemon;
use crate::procfs::{self, HostReading};
use crate::registry::{ChangeView, DecisionView, Readings, TickView, VmState};
use crate::spec::MemorySpec;
use crate::statedir::unix_ms;

/// A failure to change a VM's target is logged at most this often per VM (the policy asks
/// again every tick).
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

/// The loop's own memory between ticks.
pub struct Controller {
    policy: PolicyState,
    epoch: Instant,
    deflate: HashMap<String, DeflateWatch>,
    failures_logged: HashMap<String, Instant>,
}

/// Counts deflate-on-OOM: the balloon's actual size fell while its target stayed put (the guest
/// took pages back by itself).
#[derive(Debug, Clone, Copy)]
struct DeflateWatch {
    target_pages: u64,
    actual_pages: u64,
    events: u64,
}

/// One VM as the tick sees it before asking its VMM.
struct Subject {
    id: String,
    state: VmState,
    limits: MemorySpec,
    socket: Option<PathBuf>,
    pid: Option<i32>,
    last: Readings,
    /// The guest keeps ballooned pages in its total memory (see `GuestStats::ballooned_in_total`).
    deflate_on_oom: bool,
}

/// What one VMM answered this tick.
#[derive(Default)]
struct VmmAnswer {
    resize: Option<ResizeStatus>,
    stats: Option<BalloonStats>,
    hotplug: Option<HotplugMemoryState>,
    error: Option<String>,
    /// It did not answer within the timeout (hung or very slow).
    timed_out: bool,
}

impl Default for Controller {
    fn default() -> Self {
        Self::new()
    }
}

impl Controller {
    /// A controller with a fresh policy state: no history of any VM.
    pub fn new() -> Self {
        Self {
            policy: PolicyState::new(),
            epoch: Instant::now(),
            deflate: HashMap::new(),
            failures_logged: HashMap::new(),
        }
    }

    /// One tick. Returns the plan (for tests).
    pub async fn tick(&mut self, d: &Arc<Daemon>) -> Plan {
        let t0 = Instant::now();
        let (settings, subjects) = snapshot(d);
        let host = HostReading::read();
        let timeout = d.config.request_timeout;
        let answers = read_all(&subjects, timeout).await;
        let observations: Vec<VmObservation> = subjects
            .iter()
            .map(|s| self.observe(s, answers.get(&s.id)))
            .collect();
        let host_obs = HostObservation {
            budget_mib: settings.budget_mib,
            mem_available_mib: host.mem_available_mib,
            psi_some_avg10: host.psi_some_avg10,
            psi_full_avg10: host.psi_full_avg10,
        };
        let now = self.epoch.elapsed();
        let plan = policy::decide(
            &settings.params,
            &host_obs,
            &observations,
            &mut self.policy,
            now,
        );
        let changes = apply(&subjects, &plan, timeout).await;
        self.record(d, &subjects, &observations, &answers, &plan, &changes);
        let duration = t0.elapsed();
        d.metrics.tick(duration.as_secs_f64());
        d.registry().last_tick = Some(TickView {
            at_unix_ms: unix_ms(),
            duration_ms: duration.as_secs_f64() * 1000.0,
            host,
            total_target_mib: plan.total_target_mib,
            over_budget_mib: plan.over_budget_mib,
        });
        plan
    }

    /// The policy's view of one VM. A VMM that did not answer is observed with its last known
    /// sizes and no statistics: the policy freezes it rather than shrink it blind.
    fn observe(&mut self, s: &Subject, answer: Option<&VmmAnswer>) -> VmObservation {
        let resize = answer.and_then(|a| a.resize);
        let boot = s.limits.boot_mib;
        let target = resize
            .map(|r| r.desired_mib)
            .or(s.last.target_mib)
            .unwrap_or(boot);
        let current = resize
            .map(|r| r.current_mib)
            .or(s.last.current_mib)
            .unwrap_or(boot);
        let stats = answer.and_then(|a| a.stats);
        let deflate_on_oom_events = stats.map(|st| self.deflate_events(&s.id, &st));
        VmObservation {
            id: s.id.clone(),
            limits: VmLimits {
                min_mib: s.limits.min(),
                max_mib: s.limits.max(),
                boot_mib: boot,
                weight: s.limits.weight(),
            },
            target_mib: target,
            current_mib: current,
            stats: stats
                .filter(|st| st.age_ms.is_some())
                .map(|st| guest_stats(st, s.deflate_on_oom)),
            rss_mib: s.pid.and_then(procfs::rss_kib).map(|k| k / 1024),
            deflate_on_oom_events,
        }
    }

    fn deflate_events(&mut self, id: &str, st: &BalloonStats) -> u64 {
        let w = self.deflate.entry(id.to_string()).or_insert(DeflateWatch {
            target_pages: st.target_pages,
            actual_pages: st.actual_pages,
            events: 0,
        });
        if st.target_pages == w.target_pages
            && st.actual_pages < w.actual_pages
            && st.actual_pages < st.target_pages
        {
            w.events += 1;
        }
        w.target_pages = st.target_pages;
        w.actual_pages = st.actual_pages;
        w.events
    }

    /// Writes readings and decisions back, logs changes, counts everything.
    fn record(
        &mut self,
        d: &Daemon,
        subjects: &[Subject],
        observations: &[VmObservation],
        answers: &HashMap<String, VmmAnswer>,
        plan: &Plan,
        changes: &HashMap<String, Option<String>>,
    ) {
        let at = unix_ms();
        let mut reg = d.registry();
        for ((s, obs), dec) in subjects.iter().zip(observations).zip(&plan.decisions) {
            let answer = answers.get(&s.id);
            let reached = answer.is_some_and(|a| a.resize.is_some());
            // A running VMM that fails to answer, or any VMM that hangs past the timeout.
            let hung = answer.is_some_and(|a| a.timed_out);
            if hung || (s.state == VmState::Running && s.socket.is_some() && !reached) {
                d.metrics.unreachable();
            }
            let change = changes.get(&s.id);
            d.metrics
                .decision(reason_name(dec.reason), change.is_some_and(|e| e.is_none()));
            if let Some(result) = change {
                self.log_change(s, obs, dec, result.as_deref());
                if result.is_some() {
                    d.metrics.change_failed();
                }
            }
            let Some(entry) = reg.vms.get_mut(&s.id) else {
                continue; // deleted meanwhile
            };
            if reached && entry.state == VmState::Starting {
                entry.state = VmState::Running;
                log::info!("vm {}: VMM API answers; running", s.id);
            }
            entry.readings = readings(obs, answer, reached);
            let last_change = match change {
                Some(error) => Some(ChangeView {
                    from_mib: dec.previous_mib,
                    to_mib: dec.target_mib,
                    reason: dec.reason,
                    at_unix_ms: at,
                    error: error.clone(),
                }),
                None => entry.decision.as_ref().and_then(|v| v.last_change.clone()),
            };
            entry.decision = Some(DecisionView {
                target_mib: dec.target_mib,
                previous_mib: dec.previous_mib,
                reason: dec.reason,
                flags: dec.flags,
                wanted_mib: dec.wanted_mib,
                at_unix_ms: at,
                last_change,
            });
        }
        let live: std::collections::HashSet<&str> =
            subjects.iter().map(|s| s.id.as_str()).collect();
        self.deflate.retain(|id, _| live.contains(id.as_str()));
        self.failures_logged
            .retain(|id, _| live.contains(id.as_str()));
    }

    fn log_change(
        &mut self,
        s: &Subject,
        obs: &VmObservation,
        dec: &Decision,
        error: Option<&str>,
    ) {
        let why = format!(
            "{}; wanted {}, current {} MiB{}{}",
            reason_name(dec.reason),
            dec.wanted_mib.map_or("?".into(), |w| format!("{w} MiB")),
            obs.current_mib,
            if dec.flags.pressure { ", pressure" } else { "" },
            if dec.flags.squeezed {
                ", budget squeeze"
            } else {
                ""
            },
        );
        match error {
            None => log::info!(
                "vm {}: target {} -> {} MiB ({why})",
                s.id,
                dec.previous_mib,
                dec.target_mib
            ),
            Some(e) => {
                let now = Instant::now();
                let due = self
                    .failures_logged
                    .get(&s.id)
                    .is_none_or(|t| now.duration_since(*t) >= FAILURE_LOG_EVERY);
                if due {
                    self.failures_logged.insert(s.id.clone(), now);
                    log::warn!(
                        "vm {}: cannot change target {} -> {} MiB ({why}): {e} (logged once a minute)",
                        s.id,
                        dec.previous_mib,
                        dec.target_mib
                    );
                }
            }
        }
    }
}

/// The settings and the live VMs, copied out of the registry (the lock is not held while the
/// VMMs are asked).
fn snapshot(d: &Daemon) -> (crate::registry::HostSettings, Vec<Subject>) {
    let reg = d.registry();
    let subjects = reg
        .vms
        .values()
        .filter(|v| v.is_live())
        .map(|v| Subject {
            id: v.spec.id.clone(),
            state: v.state,
            limits: v.spec.memory,
            socket: v.record.as_ref().map(|r| r.api_socket.clone()),
            pid: v.record.as_ref().map(|r| r.vmm.pid),
            last: v.readings,
            deflate_on_oom: v.spec.balloon.deflate_on_oom,
        })
        .collect();
    (reg.host, subjects)
}

/// Asks every VMM at once; each gets `timeout` for all its answers.
async fn read_all(subjects: &[Subject], timeout: Duration) -> HashMap<String, VmmAnswer> {
    let mut set = JoinSet::new();
    for s in subjects {
        if let Some(socket) = s.socket.clone() {
            let id = s.id.clone();
            set.spawn(async move {
                let answer = tokio::time::timeout(timeout, read_vmm(socket))
                    .await
                    .unwrap_or_else(|_| VmmAnswer {
                        error: Some(format!("no answer within {timeout:?}")),
                        timed_out: true,
                        ..Default::default()
                    });
                (id, answer)
            });
        }
    }
    let mut answers = HashMap::new();
    while let Some(r) = set.join_next().await {
        if let Ok((id, answer)) = r {
            answers.insert(id, answer);
        }
    }
    answers
}

/// `GET /vm/resize`, `/balloon/statistics` and `/hotplug/memory` on one keep-alive connection.
/// A 404 means the device is not configured (no statistics then: the VM is frozen).
async fn read_vmm(socket: PathBuf) -> VmmAnswer {
    let mut c = Client::new(socket);
    let mut a = VmmAnswer::default();
    match c.get::<ResizeStatus>("/vm/resize").await {
        Ok(r) => a.resize = Some(r),
        Err(e) => {
            a.error = Some(e.to_string());
            return a;
        }
    }
    a.stats = optional(c.get("/balloon/statistics").await, &mut a.error);
    a.hotplug = optional(c.get("/hotplug/memory").await, &mut a.error);
    a
}

fn optional<T>(r: Result<T, ClientError>, error: &mut Option<String>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(ClientError::Status { status, .. }) if status == StatusCode::NOT_FOUND => None,
        Err(e) => {
            *error = Some(e.to_string());
            None
        }
    }
}

/// Sends the changed targets of running VMs, all at once. Returns, per VM sent to, `None` on
/// success or the error.
async fn apply(
    subjects: &[Subject],
    plan: &Plan,
    timeout: Duration,
) -> HashMap<String, Option<String>> {
    let mut set = JoinSet::new();
    for (s, dec) in subjects.iter().zip(&plan.decisions) {
        let (Some(socket), true) = (s.socket.clone(), s.state == VmState::Running) else {
            continue;
        };
        if !dec.changed() {
            continue;
        }
        let (id, desired_mib) = (s.id.clone(), dec.target_mib);
        set.spawn(async move {
            let mut c = Client::new(socket);
            let body = ResizeRequest { desired_mib };
            let sent =
                tokio::time::timeout(timeout, c.send(Method::PUT, "/vm/resize", &body)).await;
            let error = match sent {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!("no answer within {timeout:?}")),
            };
            (id, error)
        });
    }
    let mut out = HashMap::new();
    while let Some(r) = set.join_next().await {
        if let Ok((id, error)) = r {
            out.insert(id, error);
        }
    }
    out
}

fn readings(obs: &VmObservation, answer: Option<&VmmAnswer>, reached: bool) -> Readings {
    let stats = answer.and_then(|a| a.stats);
    Readings {
        target_mib: Some(obs.target_mib),
        current_mib: Some(obs.current_mib),
        plugged_mib: answer.and_then(|a| a.hotplug).map(|h| h.plugged_size_mib),
        rss_mib: obs.rss_mib,
        available_mib: stats.and_then(|s| s.available_memory).map(|b| b >> 20),
        stats_age_ms: stats.and_then(|s| s.age_ms),
        reachable: reached,
    }
}

/// The balloon's statistics as the policy reads them (same names, same units).
fn guest_stats(s: BalloonStats, deflate_on_oom: bool) -> GuestStats {
    const PAGE: u64 = 4096;
    GuestStats {
        ballooned_in_total: s.actual_pages_at_report.map(|pages| {
            if deflate_on_oom {
                pages.saturating_mul(PAGE)
            } else {
                0
            }
        }),
        swap_in: s.swap_in,
        swap_out: s.swap_out,
        major_faults: s.major_faults,
        minor_faults: s.minor_faults,
        free_memory: s.free_memory,
        total_memory: s.total_memory,
        available_memory: s.available_memory,
        disk_caches: s.disk_caches,
        oom_kill: s.oom_kill,
        alloc_stall: s.alloc_stall,
        async_scan: s.async_scan,
        direct_scan: s.direct_scan,
        async_reclaim: s.async_reclaim,
        direct_reclaim: s.direct_reclaim,
        age_ms: s.age_ms,
    }
}

/// The reason as the API spells it (`idle_reclaim`, ...).
pub fn reason_name(r: policy::Reason) -> &'static str {
    use policy::Reason::*;
    match r {
        Hold => "hold",
        IdleReclaim => "idle_reclaim",
        WorkingSetGrow => "working_set_grow",
        PressureGrow => "pressure_grow",
        BudgetSqueeze => "budget_squeeze",
        InProgress => "in_progress",
        BackOff => "back_off",
        FrozenNoStats => "frozen_no_stats",
        FrozenStaleStats => "frozen_stale_stats",
        AtMin => "at_min",
        AtMax => "at_max",
    }
}

/// Runs ticks forever at the current `tick_ms` (re-read each tick, so `PUT /host/memory` takes
/// effect at the next one).
pub async fn run(d: Arc<Daemon>) {
    let mut c = Controller::new();
    loop {
        let next = tokio::time::Instant::now() + Duration::from_millis(d.host_settings().tick_ms);
        c.tick(&d).await;
        tokio::time::sleep_until(next).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_names_match_the_policy_serialization() {
        use policy::Reason::*;
        for r in [
            Hold,
            IdleReclaim,
            WorkingSetGrow,
            PressureGrow,
            BudgetSqueeze,
            InProgress,
            BackOff,
            FrozenNoStats,
            FrozenStaleStats,
            AtMin,
            AtMax,
        ] {
            assert_eq!(
                serde_json::to_value(r).unwrap(),
                serde_json::Value::String(reason_name(r).into())
            );
        }
    }

    #[test]
    fn deflate_on_oom_counts_only_falls_below_an_unchanged_target() {
        let mut c = Controller::new();
        let st = |target_pages, actual_pages| BalloonStats {
            target_pages,
            actual_pages,
            ..Default::default()
        };
        assert_eq!(c.deflate_events("a", &st(1000, 1000)), 0);
        assert_eq!(
            c.deflate_events("a", &st(1000, 744)),
            1,
            "guest took 256 pages back"
        );
        assert_eq!(
            c.deflate_events("a", &st(500, 500)),
            1,
            "our own deflate is no event"
        );
        assert_eq!(
            c.deflate_events("a", &st(500, 600)),
            1,
            "inflating is no event"
        );
        assert_eq!(c.deflate_events("a", &st(500, 244)), 2);
    }
}
