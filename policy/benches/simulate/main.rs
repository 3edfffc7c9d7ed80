//! Trace-driven simulation of the host memory policy against two baselines.
//!
//! `cargo bench -p policy --bench simulate` prints a markdown table. Options (after `--`):
//! `--scales 10,100,1000` (budget = scale x boot size), `--seconds 3600` (simulated time),
//! `--no-search` (skip the search for the largest fleet that fits; report the 1.5x fleet only).
//! `SIM_PARAMS='{"buffer_pct": 30}'` runs the policy with other parameters. To see why (on
//! stderr, each run starting with a `run:` line): `SIM_TRACE=N` prints VM N's observation and
//! decision at every policy tick, `SIM_PRESSURE=1` every guest-second under pressure with the
//! guest's state; `SIM_SEED=N` draws other traces. `SIM_SLEEP_MS=N` sleeps N ms before each
//! tick, so the tick starts on a thread that just woke up, as in the daemon (use it with
//! `--no-search` and few `--seconds`): the wall time then shows the latency a daemon would see,
//! without the preemption a CPU-bound simulation meets on a busy machine.
//!
//! Every VM: min 256, boot 2048, max 4096 MiB, weight 100. Static allocation reserves each VM's
//! boot size (no balloon, no free page reporting), so it fits `scale` VMs. The other two
//! managers run `1.5 x scale` VMs (and larger fleets in the search) on the same budget, with
//! balloon, virtio-mem and free page reporting. A run *fits* when no guest ever had demand
//! above what it could use (zero OOM-risk events) and the host memory the guests hold,
//! sampled every second, never exceeded the budget.

mod guest;
mod trace;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use guest::{Guest, STATS_PERIOD};
use policy::{decide_into, HostObservation, Params, Plan, PolicyState, VmLimits, VmObservation};
use trace::{Kind, Trace};

const LIMITS: VmLimits = VmLimits {
    min_mib: 256,
    max_mib: 4096,
    boot_mib: 2048,
    weight: 100,
};

/// Who sets the targets.
enum Manager {
    /// Every VM keeps its boot size.
    Static,
    /// oVirt MOM's rule: host free below 20% of the budget shrinks every guest by at most 5%
    /// of its size per tick toward used + buffer (the policy's default buffer, so the two
    /// differ in their rules, not their margin); otherwise every guest grows by 5% up to max.
    Threshold,
    /// This crate.
    Policy(Box<PolicyRun>),
}

/// The policy's side of a run: it keeps its plan between ticks, as a daemon would, and decides
/// into it (`decide_into`); `reasons` counts the changes it made by reason.
struct PolicyRun {
    params: Params,
    state: PolicyState,
    plan: Plan,
    reasons: BTreeMap<String, u64>,
}

impl Manager {
    fn name(&self) -> &'static str {
        match self {
            Manager::Static => "static",
            Manager::Threshold => "threshold 20%/5%",
            Manager::Policy(..) => "policy",
        }
    }

    /// Sets `targets` from the observations; returns how long the decision took.
    fn tick(
        &mut self,
        now: Duration,
        host: &HostObservation,
        host_free: f64,
        vms: &[VmObservation],
        targets: &mut [u64],
    ) -> TickTime {
        let start = TickTime::start();
        match self {
            Manager::Static => {}
            Manager::Threshold => {
                let squeeze = host_free < 0.2 * host.budget_mib as f64;
                let p = Params::default();
                for (vm, target) in vms.iter().zip(targets.iter_mut()) {
                    let step = *target * 5 / 100;
                    *target = if squeeze {
                        let Some(s) = vm.stats else { continue };
                        let avail = s.available_memory.unwrap_or(0) >> 20;
                        let used = vm.current_mib.saturating_sub(avail);
                        let floor = used + (used * p.buffer_pct / 100).max(p.buffer_min_mib);
                        if *target > floor {
                            (*target - step).max(floor)
                        } else {
                            *target
                        }
                    } else {
                        (*target + step).min(vm.limits.max_mib)
                    }
                    .clamp(vm.limits.min_mib, vm.limits.max_mib);
                }
            }
            Manager::Policy(run) => {
                let PolicyRun {
                    params,
                    state,
                    plan,
                    reasons,
                } = &mut **run;
                decide_into(params, host, vms, state, now, plan);
                let took = start.took();
                if let Some(k) = std::env::var("SIM_TRACE")
                    .ok()
                    .and_then(|k| k.parse::<usize>().ok())
                {
                    let (v, d) = (&vms[k], &plan.decisions[k]);
                    let s = v.stats.unwrap_or_default();
                    eprintln!(
                        "t={} cur={} avail={} cache={} faults={:?} -> {} {:?} wanted={:?} total={} {:?}",
                        now.as_secs(), v.current_mib, s.available_memory.unwrap_or(0) >> 20,
                        s.disk_caches.unwrap_or(0) >> 20, s.major_faults, d.target_mib, d.reason,
                        d.wanted_mib, plan.total_target_mib, d.flags
                    );
                }
                for (d, target) in plan.decisions.iter().zip(targets.iter_mut()) {
                    *target = d.target_mib;
                    if d.changed() {
                        let reason = serde_json::to_string(&d.reason).unwrap_or_default();
                        *reasons
                            .entry(reason.trim_matches('"').to_owned())
                            .or_default() += 1;
                    }
                }
                return took;
            }
        }
        start.took()
    }
}

/// How long one tick's decision took: wall time, and the CPU time of this thread (what the
/// decision costs; the wall time adds whatever else the machine ran meanwhile).
#[derive(Clone, Copy)]
struct TickTime {
    wall: Duration,
    cpu: Duration,
}

impl TickTime {
    /// Starts measuring; `took` on the result gives the time since.
    fn start() -> TickStart {
        TickStart {
            wall: Instant::now(),
            cpu: thread_cpu_time(),
        }
    }
}

struct TickStart {
    wall: Instant,
    cpu: Duration,
}

impl TickStart {
    fn took(&self) -> TickTime {
        TickTime {
            wall: self.wall.elapsed(),
            cpu: thread_cpu_time().saturating_sub(self.cpu),
        }
    }
}

/// CPU time this thread has used (`CLOCK_THREAD_CPUTIME_ID`; std has no thread CPU clock).
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call; the clock id is
    // a constant the kernel knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// What one run measured.
struct Outcome {
    vms: usize,
    oom_risk_events: u64,
    pressure_seconds: u64,
    target_changes: u64,
    peak_resident: f64,
    tick_times: Vec<TickTime>,
    seconds: u64,
    /// The policy's target changes by reason.
    reasons: BTreeMap<String, u64>,
}

impl Outcome {
    fn fits(&self, budget: u64) -> bool {
        self.oom_risk_events == 0 && self.peak_resident <= budget as f64
    }
}

/// VM `vm`'s trace seed; `SIM_SEED=N` (default 0) draws another set of traces, to see how much
/// a result owes to one draw.
fn seed(kind: Kind, vm: usize) -> u64 {
    let draw: u64 = std::env::var("SIM_SEED").map_or(0, |s| s.parse().expect("SIM_SEED: a number"));
    draw << 40 | (kind as u64) << 32 | vm as u64
}

fn run(kind: Kind, vms: usize, budget: u64, mut manager: Manager, seconds: u64) -> Outcome {
    let managed = !matches!(manager, Manager::Static);
    let show_pressure = std::env::var_os("SIM_PRESSURE").is_some();
    let sleep = std::env::var("SIM_SLEEP_MS").map_or(Duration::ZERO, |ms| {
        Duration::from_millis(ms.parse().expect("SIM_SLEEP_MS: milliseconds"))
    });
    if show_pressure || std::env::var_os("SIM_TRACE").is_some() {
        eprintln!("run: {} {} {vms}", kind.name(), manager.name());
    }
    let mut traces: Vec<Trace> = (0..vms).map(|i| Trace::new(kind, seed(kind, i))).collect();
    let mut guests: Vec<Guest> = traces
        .iter_mut()
        .map(|t| Guest::new(LIMITS, managed, &t.next(0.0)))
        .collect();
    let mut observations: Vec<VmObservation> = (0..vms)
        .map(|i| VmObservation {
            id: format!("vm{i}"),
            limits: LIMITS,
            target_mib: LIMITS.boot_mib,
            current_mib: LIMITS.boot_mib,
            stats: None,
            rss_mib: None,
            deflate_on_oom_events: Some(0),
        })
        .collect();
    let mut targets = vec![LIMITS.boot_mib; vms];
    let mut out = Outcome {
        vms,
        oom_risk_events: 0,
        pressure_seconds: 0,
        target_changes: 0,
        peak_resident: 0.0,
        tick_times: Vec::with_capacity(seconds as usize),
        seconds,
        reasons: BTreeMap::new(),
    };
    for t in 1..=seconds {
        let mut resident = 0.0;
        for (i, (g, tr)) in guests.iter_mut().zip(&mut traces).enumerate() {
            let before = g.pressure_seconds;
            let d = tr.next(t as f64);
            g.step(t, &d);
            if show_pressure && g.pressure_seconds > before {
                eprintln!("pressure: vm{i} t={t} {}", g.describe(&d));
            }
            resident += g.resident();
        }
        out.peak_resident = out.peak_resident.max(resident);
        for (o, g) in observations.iter_mut().zip(&guests) {
            o.target_mib = g.target;
            o.current_mib = g.size.round() as u64;
            o.rss_mib = Some(g.resident() as u64);
            o.deflate_on_oom_events = Some(g.doom_events);
            // The daemon reads the stats half a second after the tick's start.
            let mut s = g.report;
            s.age_ms = Some((t - g.report_at) * 1000 + 500);
            o.stats = (g.report_at > 0 || t >= STATS_PERIOD).then_some(s);
        }
        let host = HostObservation {
            budget_mib: budget,
            mem_available_mib: None,
            psi_some_avg10: None,
            psi_full_avg10: None,
        };
        let now = Duration::from_secs(t);
        // A daemon's thread wakes up to decide (its VMMs' answers are in): sleeping here lets
        // the tick's wall time show what such a thread sees on a busy machine.
        if !sleep.is_zero() {
            std::thread::sleep(sleep);
        }
        let took = manager.tick(
            now,
            &host,
            budget as f64 - resident,
            &observations,
            &mut targets,
        );
        out.tick_times.push(took);
        for (g, &new) in guests.iter_mut().zip(&targets) {
            if new != g.target {
                out.target_changes += 1;
                g.target = new;
            }
        }
    }
    out.oom_risk_events = guests.iter().map(|g| g.oom_risk_events).sum();
    out.pressure_seconds = guests.iter().map(|g| g.pressure_seconds).sum();
    if let Manager::Policy(run) = manager {
        out.reasons = run.reasons;
    }
    out
}

/// The policy's parameters: the defaults, or `SIM_PARAMS` (a JSON object, as for the daemon's
/// `PUT /host/memory`) to try others.
fn policy() -> Manager {
    let params = std::env::var("SIM_PARAMS").map_or_else(
        |_| Params::default(),
        |json| serde_json::from_str(&json).expect("SIM_PARAMS: a JSON object of Params fields"),
    );
    params.validate().expect("SIM_PARAMS");
    Manager::Policy(Box::new(PolicyRun {
        params,
        state: PolicyState::new(),
        plan: Plan::default(),
        reasons: BTreeMap::new(),
    }))
}

/// The largest fleet (up to 4x scale) whose run fits the budget, by bisection (assumes that a
/// fleet that fits still fits with one VM fewer, which the traces' fixed seeds make true in
/// practice: VM i has the same trace in every fleet).
fn largest_fit(kind: Kind, scale: usize, budget: u64, make: fn() -> Manager, secs: u64) -> usize {
    let (mut lo, mut hi) = (0usize, 4 * scale + 1);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if run(kind, mid, budget, make(), secs).fits(budget) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

fn percentile(times: &mut [Duration], p: f64) -> Duration {
    times.sort_unstable();
    times[((times.len() - 1) as f64 * p) as usize]
}

fn row(scale: usize, kind: Kind, name: &str, fit: String, o: &mut Outcome, budget: u64) {
    let hours = o.vms as f64 * o.seconds as f64 / 3600.0;
    let mut cpu: Vec<Duration> = o.tick_times.iter().map(|t| t.cpu).collect();
    let mut wall: Vec<Duration> = o.tick_times.iter().map(|t| t.wall).collect();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "| {scale} | {} | {name} | {fit} | {} | {} | {} | {:.1} | {:.2} | {:.3} / {:.3} / {:.3} | {:.3} |",
        kind.name(),
        o.vms,
        o.oom_risk_events,
        o.pressure_seconds,
        o.target_changes as f64 / hours,
        o.peak_resident / budget as f64,
        ms(percentile(&mut cpu, 0.5)),
        ms(percentile(&mut cpu, 0.99)),
        ms(percentile(&mut cpu, 1.0)),
        ms(percentile(&mut wall, 0.99)),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let scales: Vec<usize> = value("--scales")
        .unwrap_or_else(|| "10,100,1000".into())
        .split(',')
        .map(|s| s.parse().expect("--scales: comma-separated VM counts"))
        .collect();
    let secs: u64 = value("--seconds").map_or(3600, |s| s.parse().expect("--seconds: a number"));
    let search = !args.iter().any(|a| a == "--no-search");

    println!("Simulated {secs} s per run, 1 s ticks; VMs min 256 / boot 2048 / max 4096 MiB.\n");
    println!(
        "| scale | trace | manager | VMs that fit (x static) | VMs run | OOM-risk events | \
         pressure guest-s | target changes /VM-h | peak host memory / budget | \
         tick CPU ms p50 / p99 / max | tick wall ms p99 |"
    );
    println!("| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut notes = Vec::new();
    for &scale in &scales {
        let budget = scale as u64 * LIMITS.boot_mib;
        for kind in Kind::ALL {
            let mut o = run(kind, scale, budget, Manager::Static, secs);
            let static_fit = if o.oom_risk_events == 0 { scale } else { 0 };
            row(
                scale,
                kind,
                "static",
                static_fit.to_string(),
                &mut o,
                budget,
            );
            type Maker = fn() -> Manager;
            let makers: [(Maker, &str); 2] = [
                (|| Manager::Threshold, "threshold 20%/5%"),
                (policy, "policy"),
            ];
            for (make, name) in makers {
                let fleet = scale * 3 / 2;
                let mut o = run(kind, fleet, budget, make(), secs);
                let fit = if search {
                    let n = largest_fit(kind, scale, budget, make, secs);
                    format!("{n} ({:.2}x)", n as f64 / scale as f64)
                } else if o.fits(budget) {
                    format!(">= {fleet} (1.5x)")
                } else {
                    format!("< {fleet}")
                };
                debug_assert_eq!(name, make().name());
                row(scale, kind, name, fit, &mut o, budget);
                if !o.reasons.is_empty() {
                    notes.push(format!("{scale} {}: {:?}", kind.name(), o.reasons));
                }
            }
        }
    }
    println!("\nThe policy's target changes by reason, at 1.5x scale:\n");
    for note in notes {
        println!("- {note}");
    }
}
