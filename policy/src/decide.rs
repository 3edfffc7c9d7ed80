//! The policy itself: one tick, observations in, a [`Plan`] out.
//!
//! Conventions in this file: `lo`/`hi` are a VM's effective min/max (MiB); `used` is its working
//! set: the guest's total minus the balloon's share of it minus what it said was available (free
//! plus reclaimable cache), all from one report (else estimated from the VM's size at the
//! report, see [`own_report`]); `wanted` is `used` plus the buffer plus the projected growth, within
//! `lo..=hi`; `band` is the hysteresis: a target in `wanted..=wanted + band` is left alone.
//!
//! A tick runs in three passes: [`assess`] proposes a target for each VM on its own (grow under
//! pressure, take back idle memory step by step, freeze without fresh statistics), [`fit_budget`]
//! cuts the proposals down to the budget when they do not fit, and [`decide`] records what the
//! next tick needs to remember.

use std::time::Duration;

use crate::budget::{fit_budget, Assessment};
use crate::decision::{Decision, Flags, Plan, Reason};
use crate::observation::{HostObservation, VmObservation};
use crate::params::Params;
use crate::state::{PolicyState, Report, VmMemory};

const MIB: u64 = 1 << 20;
/// Reports closer together than this are the same report seen twice (the VMM's statistics
/// interval is whole seconds; the caller's age readings jitter by a few milliseconds).
const SAME_REPORT: Duration = Duration::from_millis(500);
/// A working-set trend below this (MiB/s) is noise and counts as flat.
const FLAT_TREND: f64 = 0.5;
/// A working set growing at least this fast (MiB/s) is a guest at work, whose buffer the budget
/// pass serves before idle guests'; a slow creep (a leak) is not, or it would flip in and out.
const BUSY_TREND: f64 = 2.0;

/// Decides every VM's target for this tick.
///
/// `vms` are this tick's observations (ids unique); `state` is what the previous ticks left, owned
/// by the caller (a fresh one is safe); `now` is the caller's monotonic clock, used only for
/// rates and back-offs. The returned plan has one decision per VM in the order of `vms`.
/// Guarantees, for any input: every target is within the VM's `min..=max`; the targets add up to
/// at most the budget unless the VMs' floors (minimums, and the current size of frozen VMs) alone
/// exceed it, which `over_budget_mib` then reports.
pub fn decide(
    params: &Params,
    host: &HostObservation,
    vms: &[VmObservation],
    state: &mut PolicyState,
    now: Duration,
) -> Plan {
    let mut plan = Plan::default();
    decide_into(params, host, vms, state, now, &mut plan);
    plan
}

/// [`decide`], writing into the previous tick's `plan` so its allocations (a vector and one id
/// string per VM) are reused: a caller that keeps its plan between ticks saves a fifth of a
/// tick's instructions at 1,500 VMs (callgrind). The result is the same as `decide`'s,
/// whatever `plan` held before.
pub fn decide_into(
    params: &Params,
    host: &HostObservation,
    vms: &[VmObservation],
    state: &mut PolicyState,
    now: Duration,
    plan: &mut Plan,
) {
    // One hash lookup per VM: VMs seen this tick are stamped with `now`, the rest forgotten after.
    let mut assessed: Vec<Assessment> = Vec::with_capacity(vms.len());
    for vm in vms {
        let memory = match state.vms.get_mut(&vm.id) {
            Some(memory) => memory,
            None => state.vms.entry(vm.id.clone()).or_default(),
        };
        memory.seen_at = Some(now);
        assessed.push(assess(params, vm, memory, now));
        memory.size_seen = Some((now, vm.current_mib));
    }
    state.vms.retain(|_, memory| memory.seen_at == Some(now));
    plan.over_budget_mib = fit_budget(
        host.budget_mib,
        params.hysteresis_min_mib / 2,
        &mut assessed,
    );

    plan.total_target_mib = 0;
    plan.decisions.truncate(vms.len());
    for (i, (vm, a)) in vms.iter().zip(assessed).enumerate() {
        if a.proposed < vm.target_mib {
            if let Some(memory) = state.vms.get_mut(&vm.id) {
                memory.lowered_at = Some(now);
                // Only the policy's own choice to take idle memory can have gone too far (a
                // back-off's trigger); a budget squeeze is forced on the VM, and pressure after
                // it is the budget's.
                if a.reason == Reason::IdleReclaim {
                    memory.last_shrink_at = Some(now);
                }
            }
        }
        plan.total_target_mib = plan.total_target_mib.saturating_add(a.proposed);
        let decision = Decision {
            id: String::new(),
            target_mib: a.proposed,
            previous_mib: vm.target_mib,
            reason: a.reason,
            flags: a.flags,
            wanted_mib: a.wanted,
        };
        match plan.decisions.get_mut(i) {
            Some(old) => {
                let mut id = std::mem::take(&mut old.id);
                id.clone_from(&vm.id);
                *old = Decision { id, ..decision };
            }
            None => plan.decisions.push(Decision {
                id: vm.id.clone(),
                ..decision
            }),
        }
    }
}

/// Signals read from one VM's statistics this tick.
struct Reading {
    used: u64,
    available: u64,
    /// Reclaimable page cache (available minus free, no more than the disk caches), MiB.
    cache: u64,
    /// Faults, swap-in, stalls or OOM kills since the previous report.
    counter_pressure: bool,
    trend_mib_per_s: f64,
}

/// Reads the report in `vm.stats` (known to be fresh), updating the VM's memory when it is new.
fn read_stats(p: &Params, vm: &VmObservation, memory: &mut VmMemory, now: Duration) -> Reading {
    let stats = vm.stats.unwrap_or_default();
    let (available, own_used) = own_report(&stats);
    let available = available / MIB;
    let at = now.saturating_sub(Duration::from_millis(stats.age_ms.unwrap_or(0)));
    let used = match own_used {
        Some(used) => used / MIB,
        None => estimated_used(&stats, available, memory, vm.current_mib, at),
    };
    let cache = match (stats.free_memory, stats.disk_caches) {
        (Some(free), caches) => available
            .saturating_sub(free / MIB)
            .min(caches.map_or(u64::MAX, |c| c / MIB)),
        (None, Some(caches)) => (caches / MIB).min(available),
        (None, None) => 0,
    };
    let report = Report {
        at,
        major_faults: stats.major_faults,
        swap_in: stats.swap_in,
        alloc_stall: stats.alloc_stall,
        oom_kill: stats.oom_kill,
        used_mib: used,
        cache_mib: cache,
    };
    match memory.report {
        // The same report again: its working set was computed against the size the guest had
        // when it was new; the size moved since (the balloon, virtio-mem), the report did not.
        Some(last) if at < last.at + SAME_REPORT => {
            let used = last.used_mib;
            return Reading {
                used,
                cache: last.cache_mib,
                available: vm.current_mib.saturating_sub(used),
                counter_pressure: memory.counter_pressure,
                trend_mib_per_s: memory.trend_mib_per_s,
            };
        }
        Some(last) => {
            let secs = (at - last.at).as_secs_f64();
            let rate = |new: Option<u64>, old: Option<u64>| match (new, old) {
                (Some(n), Some(o)) => n.saturating_sub(o) as f64 / secs,
                _ => 0.0,
            };
            let grew = |new: Option<u64>, old: Option<u64>| rate(new, old) > 0.0;
            // A balloon that is inflating makes the guest reclaim, so stalls then are ours: now,
            // or in this report's span when the target was lowered in it (a step of a few dozen
            // MiB is done within the tick; a longer margin hid real stalls of VMs squeezed at
            // every tick: the simulation's leaky trace changed targets 25% more often).
            let inflating = vm.current_mib > vm.target_mib
                || memory.lowered_at.is_some_and(|lowered| lowered >= last.at);
            memory.counter_pressure = rate(report.major_faults, last.major_faults)
                > p.major_fault_rate as f64
                || rate(report.swap_in, last.swap_in) / 1024.0 > p.swap_in_kib_rate as f64
                || grew(report.oom_kill, last.oom_kill)
                || (!inflating && grew(report.alloc_stall, last.alloc_stall));
            let growth = (used as f64 - last.used_mib as f64) / secs;
            // Fast attack, slow decay: a guest that keeps allocating is believed at its second
            // rising report (the smaller of the two rises), and forgotten by halves.
            let confirmed = growth.min(memory.last_growth_mib_per_s);
            memory.last_growth_mib_per_s = growth;
            let trend = confirmed.max(0.5 * memory.trend_mib_per_s);
            memory.trend_mib_per_s = if trend < FLAT_TREND { 0.0 } else { trend };
            memory.report = Some(report);
        }
        None => memory.report = Some(report),
    }
    Reading {
        used,
        available,
        cache,
        counter_pressure: memory.counter_pressure,
        trend_mib_per_s: memory.trend_mib_per_s,
    }
}

/// The guest's available memory and, when the report says how much of the guest's total the
/// balloon holds, its working set, bytes. All of one moment, from the guest: what it has onlined
/// (plugged memory not onlined yet, or offlined for an unplug, is not in its total), minus the
/// balloon's pages it still counts, minus what it could free. Available memory is never more than
/// that usable total: a report that says otherwise is inconsistent, and less available memory
/// must never read as a smaller working set plus cache.
fn own_report(stats: &crate::GuestStats) -> (u64, Option<u64>) {
    let available = stats.available_memory.unwrap_or(0);
    match (stats.total_memory, stats.ballooned_in_total) {
        (Some(total), Some(ballooned)) => {
            let usable = total.saturating_sub(ballooned);
            let available = available.min(usable);
            (available, Some(usable - available))
        }
        (Some(total), None) => (available.min(total), None),
        (None, _) => (available, None),
    }
}

/// The working set without the balloon's share of the guest's total: the VM's size as the policy
/// saw it around the report, minus `available` (MiB), bounded by the guest's own total.
fn estimated_used(
    stats: &crate::GuestStats,
    available: u64,
    memory: &VmMemory,
    current: u64,
    at: Duration,
) -> u64 {
    // The guest's available memory is from the report; its size must be too, or a balloon
    // moving between the report and now reads as the working set moving.
    let used = size_at(memory.size_seen, current, at).saturating_sub(available);
    // Plugged memory the guest has not onlined yet is in the VMM's size but not in the guest's
    // MemTotal, nor in its available memory: the guest's own total, from the same report, bounds
    // the working set (with deflate-on-OOM it also counts ballooned pages, so it is only a bound).
    match stats.total_memory {
        Some(total) => used.min((total / MIB).saturating_sub(available)),
        None => used,
    }
}

/// The VM's size when the guest made a report at `at`: the balloon and virtio-mem move right
/// after a tick sets a target (a step takes well under a tick), so a report made after the
/// previous tick saw this tick's size, and an older one the previous tick's (`before`, if any).
fn size_at(before: Option<(Duration, u64)>, current: u64, at: Duration) -> u64 {
    match before {
        Some((then, size)) if at <= then => size,
        _ => current,
    }
}

/// Proposes one VM's target from its own observation, ignoring the budget.
fn assess(p: &Params, vm: &VmObservation, memory: &mut VmMemory, now: Duration) -> Assessment {
    let mut flags = Flags::default();
    let limits = vm.limits;
    let (lo, hi) = if limits.min_mib > limits.max_mib {
        flags.bad_limits = true;
        (limits.max_mib, limits.max_mib)
    } else {
        (limits.min_mib, limits.max_mib)
    };
    let weight = u64::from(limits.weight.max(1));
    let grow_cap = vm.target_mib.saturating_add(p.grow_step_max_mib);

    // Deflate-on-OOM is counted by the VMM, not the guest: it holds even when the stats are stale.
    let deflated_on_oom = matches!(
        (vm.deflate_on_oom_events, memory.deflate_on_oom_events),
        (Some(new), Some(old)) if new > old
    );
    memory.deflate_on_oom_events = vm.deflate_on_oom_events;

    let stats = vm.stats.filter(|s| s.available_memory.is_some());
    if stats.is_none_or(|s| s.age_ms.is_none_or(|age| age > p.stale_after_ms)) {
        return assess_frozen(p, vm, stats, deflated_on_oom, (lo, hi), weight, flags);
    }

    let reading = read_stats(p, vm, memory, now);
    let used = reading.used;
    let buffer = (used.saturating_mul(p.buffer_pct) / 100).max(p.buffer_min_mib);
    let projected = (reading.trend_mib_per_s * p.lookahead_ms as f64 / 1000.0) as u64;
    // Part of the page cache is hot: MemAvailable counts it as free to take, but taking it
    // costs refaults. Keep a share (ESX taxes idle memory at 75%, not 100%).
    let cache_keep = reading.cache.saturating_mul(p.cache_keep_pct) / 100;
    let wanted = used
        .saturating_add(buffer)
        .saturating_add(cache_keep)
        .saturating_add(projected)
        .clamp(lo, hi);
    let band = (vm.target_mib.saturating_mul(p.hysteresis_pct) / 100).max(p.hysteresis_min_mib);
    let pressure = reading.available < buffer / 2 || reading.counter_pressure || deflated_on_oom;
    flags.pressure = pressure;

    if pressure {
        note_pressure(p, memory, now);
    }
    let in_backoff = memory.backoff_until.is_some_and(|until| until > now);
    flags.backoff = in_backoff;

    let target = vm.target_mib;
    let settle_at = wanted.saturating_add(band / 2);
    let (proposed, reason) = if pressure {
        let grow_to = settle_at.max(vm.current_mib.saturating_add(p.pressure_grow_mib));
        (target.max(grow_to.min(grow_cap)), Reason::PressureGrow)
    } else if wanted > target {
        (settle_at.min(grow_cap), Reason::WorkingSetGrow)
    } else if target > wanted.saturating_add(band) {
        if in_backoff {
            (target, Reason::BackOff)
        } else if vm.current_mib > target.saturating_add(p.shrink_step_min_mib) {
            (target, Reason::InProgress)
        } else {
            let mut step =
                (target.saturating_mul(p.shrink_step_pct) / 100).max(p.shrink_step_min_mib);
            // A VM whose shrinks never hurt it (no back-off) sheds half its excess at a time,
            // within a cap: far above what it wants, that is a few ticks instead of dozens.
            if memory.backoffs == 0 {
                let fast = (target - settle_at).div_ceil(2);
                step = step.max(fast.min(target.saturating_mul(p.fast_shrink_pct) / 100));
            }
            (
                settle_at.max(target.saturating_sub(step)),
                Reason::IdleReclaim,
            )
        }
    } else {
        (target, Reason::Hold)
    };
    let proposed = proposed.clamp(lo, hi);
    let need = used.clamp(lo, proposed);
    Assessment {
        target,
        lo,
        weight,
        proposed,
        reason: limit_reason(reason, proposed, target, lo, hi),
        flags,
        wanted: Some(wanted),
        need,
        comfort: wanted.clamp(need, proposed),
        spare: need.saturating_sub(used),
        // From the working set and the guest's counters, not from the size (available memory
        // changes with the target), so that on constant input it stays put.
        busy: reading.trend_mib_per_s >= BUSY_TREND || reading.counter_pressure || deflated_on_oom,
    }
}

/// A VM without fresh statistics: held where it is (never below what the guest has or was
/// promised: nothing is shrunk blind), raised only when the VMM saw deflate-on-OOM.
fn assess_frozen(
    p: &Params,
    vm: &VmObservation,
    stats: Option<crate::GuestStats>,
    deflated_on_oom: bool,
    (lo, hi): (u64, u64),
    weight: u64,
    mut flags: Flags,
) -> Assessment {
    flags.frozen = true;
    let mut reason = if stats.is_some_and(|s| s.age_ms.is_some()) {
        Reason::FrozenStaleStats
    } else {
        Reason::FrozenNoStats
    };
    let mut proposed = vm.current_mib.max(vm.target_mib);
    if deflated_on_oom {
        flags.pressure = true;
        reason = Reason::PressureGrow;
        let grow_cap = vm.target_mib.saturating_add(p.grow_step_max_mib);
        proposed = proposed.max(
            vm.current_mib
                .saturating_add(p.pressure_grow_mib)
                .min(grow_cap),
        );
    }
    let proposed = proposed.clamp(lo, hi);
    Assessment {
        target: vm.target_mib,
        lo,
        weight,
        proposed,
        reason: limit_reason(reason, proposed, vm.target_mib, lo, hi),
        flags,
        wanted: None,
        need: proposed,
        comfort: proposed,
        spare: 0,
        busy: false,
    }
}

/// A target pinned at a limit: `AtMin`/`AtMax` say so when the policy would have moved it further
/// but nothing changed; a change keeps the reason that made it.
fn limit_reason(reason: Reason, proposed: u64, target: u64, lo: u64, hi: u64) -> Reason {
    if proposed != target {
        return if proposed == lo && target < lo {
            Reason::AtMin
        } else if proposed == hi && target > hi {
            Reason::AtMax
        } else {
            reason
        };
    }
    match reason {
        Reason::PressureGrow | Reason::WorkingSetGrow if proposed == hi => Reason::AtMax,
        Reason::IdleReclaim | Reason::Hold if proposed == lo => Reason::AtMin,
        _ => reason,
    }
}

/// Pressure soon after a shrink means the shrink went too far: no idle reclaim for a while,
/// longer at each repeat.
fn note_pressure(p: &Params, memory: &mut VmMemory, now: Duration) {
    let backoff = Duration::from_millis(p.backoff_ms);
    if memory
        .backoff_until
        .is_some_and(|until| now > until + backoff * 4)
    {
        memory.backoffs = 0;
    }
    let Some(shrunk_at) = memory.last_shrink_at else {
        return;
    };
    if now.saturating_sub(shrunk_at) <= Duration::from_millis(p.backoff_window_ms) {
        memory.backoff_until = Some(now + backoff * (1u32 << memory.backoffs.min(4)));
        memory.backoffs = memory.backoffs.saturating_add(1);
        memory.last_shrink_at = None;
    }
}
