//! The policy's invariants under random observation sequences: each plan checked against the
//! budget and the VMs' bounds, working sets cut last, the same input giving the same plan,
//! targets settling on constant input, and more pressure never giving a VM less memory.

use std::time::Duration;

use policy::{
    decide, decide_into, Decision, GuestStats, HostObservation, Params, Plan, PolicyState, Reason,
    VmLimits, VmObservation,
};
use proptest::prelude::*;

const MIB: u64 = 1 << 20;
/// Ticks (seconds) of the settling test: past two back-offs in a row (300 s + 600 s).
const TICKS: u64 = 1_100;

fn limits() -> impl Strategy<Value = VmLimits> {
    (64u64..4096, 0u64..8192, 0u64..8192, 0u32..1000).prop_map(|(min, extra, boot, weight)| {
        let max = min + extra;
        VmLimits {
            min_mib: min,
            max_mib: max,
            boot_mib: boot.clamp(min, max),
            weight,
        }
    })
}

fn stats(current: u64) -> impl Strategy<Value = Option<GuestStats>> {
    let fresh = (
        0..=current + 64,
        0u64..2_000_000,
        0u64..(1 << 32),
        0u64..4,
        0u64..100,
        0u64..40_000,
        any::<bool>(),
        // The guest's own total and its ballooned pages at the report (either may be missing).
        prop::option::of(0..=current + 1024),
        prop::option::of(0u64..2048),
    )
        .prop_map(
            |(avail, faults, swap, oom, stall, age, no_age, total, ballooned)| GuestStats {
                available_memory: Some(avail * MIB),
                total_memory: total.map(|t| t * MIB),
                ballooned_in_total: ballooned.map(|b| b * MIB),
                free_memory: Some(avail * MIB / 2),
                disk_caches: Some(avail * MIB / 2),
                major_faults: Some(faults),
                swap_in: Some(swap),
                oom_kill: Some(oom),
                alloc_stall: Some(stall),
                age_ms: (!no_age).then_some(age),
                ..GuestStats::default()
            },
        );
    prop_oneof![1 => Just(None), 6 => fresh.prop_map(Some)]
}

/// A VM with random limits, target, current size and statistics (the target may lie outside
/// the limits, as after `PATCH /vms/{id}/memory`).
fn vm(id: usize) -> impl Strategy<Value = VmObservation> {
    (limits(), 0u64..10_000, 0u64..10_000, 0u64..5).prop_flat_map(move |(limits, t, c, doom)| {
        stats(c).prop_map(move |stats| VmObservation {
            id: format!("vm{id}"),
            limits,
            target_mib: t,
            current_mib: c,
            stats,
            rss_mib: None,
            deflate_on_oom_events: Some(doom),
        })
    })
}

fn fleet(max: usize) -> impl Strategy<Value = Vec<VmObservation>> {
    (1..=max).prop_flat_map(|n| (0..n).map(vm).collect::<Vec<_>>())
}

fn host(budget: u64) -> HostObservation {
    HostObservation {
        budget_mib: budget,
        mem_available_mib: None,
        psi_some_avg10: None,
        psi_full_avg10: None,
    }
}

fn bounds(v: &VmObservation) -> (u64, u64) {
    let l = v.limits;
    (l.min_mib.min(l.max_mib), l.max_mib)
}

fn is_fresh(p: &Params, v: &VmObservation) -> bool {
    v.stats.is_some_and(|s| {
        s.available_memory.is_some() && s.age_ms.is_some_and(|a| a <= p.stale_after_ms)
    })
}

/// The invariants that hold for every plan, whatever came before.
fn check_plan(p: &Params, budget: u64, vms: &[VmObservation], plan: &Plan) {
    assert_eq!(plan.decisions.len(), vms.len());
    let mut floors = 0u64;
    for (v, d) in vms.iter().zip(&plan.decisions) {
        assert_eq!(d.id, v.id);
        assert_eq!(d.previous_mib, v.target_mib);
        let (lo, hi) = bounds(v);
        assert!((lo..=hi).contains(&d.target_mib), "bounds: {v:?} -> {d:?}");
        if is_fresh(p, v) {
            floors += lo;
        } else {
            // Stale or missing data never shrinks: not below what the guest has or was given.
            let keep = v.current_mib.max(v.target_mib).clamp(lo, hi);
            assert!(d.target_mib >= keep, "shrunk blind: {v:?} -> {d:?}");
            assert!(d.flags.frozen);
            floors += d.target_mib;
        }
        // Step limit: a target inside the limits moves at most one step (the larger one of a
        // VM that never backed off), unless the budget forces it down.
        let prev = v.target_mib;
        if (lo..=hi).contains(&prev) && d.reason != Reason::BudgetSqueeze {
            let step = (prev * p.shrink_step_pct / 100)
                .max(p.shrink_step_min_mib)
                .max(prev * p.fast_shrink_pct / 100);
            assert!(
                prev - prev.min(d.target_mib) <= step,
                "shrink step: {v:?} -> {d:?}"
            );
            // A frozen VM's target rises to what the guest already has: not a grow.
            let held = if d.flags.frozen {
                v.current_mib.min(hi)
            } else {
                0
            };
            assert!(
                d.target_mib <= (prev + p.grow_step_max_mib).max(held),
                "grow step: {v:?} -> {d:?}"
            );
        }
    }
    let total: u64 = plan.decisions.iter().map(|d| d.target_mib).sum();
    assert_eq!(total, plan.total_target_mib);
    if floors <= budget {
        assert!(
            total <= budget,
            "budget {budget}, floors {floors}: {plan:?}"
        );
        assert_eq!(plan.over_budget_mib, 0);
    } else {
        assert_eq!(plan.over_budget_mib, floors - budget);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Bounds, budget, stale data and step limits over random sequences of ticks.
    #[test]
    fn invariants_hold_over_random_ticks(
        ticks in prop::collection::vec((fleet(6), 0u64..40_000, 1u64..20_000), 1..12),
    ) {
        let p = Params::default();
        let mut state = PolicyState::new();
        let mut now = Duration::ZERO;
        for (vms, budget, dt) in ticks {
            now += Duration::from_millis(dt);
            let plan = decide(&p, &host(budget), &vms, &mut state, now);
            check_plan(&p, budget, &vms, &plan);
        }
    }

    /// A squeeze takes idle memory, buffers and the kept share of page cache before any working
    /// set: while one VM is cut below its working set, no other keeps more than its own.
    #[test]
    fn working_sets_are_cut_last(vms in fleet(6), budget in 0u64..40_000) {
        let p = Params::default();
        let plan = decide(&p, &host(budget), &vms, &mut PolicyState::new(), Duration::from_secs(5));
        // The working set each VM reports, within its limits (fresh statistics only): from its
        // own total when it gives the balloon's share of it, else from its size.
        let working_set = |v: &VmObservation| {
            let (lo, hi) = bounds(v);
            let s = v.stats.unwrap_or_default();
            let total = s.total_memory.unwrap_or(u64::MAX);
            let used = match s.ballooned_in_total {
                Some(ballooned) if s.total_memory.is_some() => {
                    let usable = total.saturating_sub(ballooned);
                    usable - s.available_memory.unwrap_or(0).min(usable)
                }
                // Bounded by the guest's total: plugged memory it has not onlined is not used.
                _ => (v.current_mib * MIB).min(total)
                    .saturating_sub(s.available_memory.unwrap_or(0).min(total)),
            } / MIB;
            used.clamp(lo, hi)
        };
        let fresh: Vec<(&VmObservation, &Decision)> = vms
            .iter()
            .zip(&plan.decisions)
            .filter(|(v, d)| is_fresh(&p, v) && !d.flags.frozen)
            .collect();
        if fresh.iter().any(|(v, d)| d.flags.squeezed && d.target_mib < working_set(v)) {
            for (v, d) in &fresh {
                let t = d.target_mib;
                prop_assert!(t <= working_set(v), "{v:?} keeps {t}: {plan:?}");
            }
        }
    }

    /// `decide_into` gives exactly `decide`'s plan, whatever the plan it writes into held (a
    /// previous tick's, with more, fewer or other VMs).
    #[test]
    fn deciding_into_a_used_plan_gives_the_same_plan(
        ticks in prop::collection::vec((fleet(6), 0u64..40_000, 1u64..20_000), 1..8),
    ) {
        let p = Params::default();
        let (mut state_a, mut state_b) = (PolicyState::new(), PolicyState::new());
        let mut reused = Plan::default();
        let mut now = Duration::ZERO;
        for (vms, budget, dt) in ticks {
            now += Duration::from_millis(dt);
            let fresh = decide(&p, &host(budget), &vms, &mut state_a, now);
            decide_into(&p, &host(budget), &vms, &mut state_b, now, &mut reused);
            prop_assert_eq!(&fresh, &reused);
            prop_assert_eq!(&state_a, &state_b);
        }
    }

    /// On constant input (each guest uses a fixed amount, follows its target at once), the
    /// targets settle and then stop changing. The run is long enough for the back-offs the first
    /// ticks may start (300 s, doubled at a repeat) to end and the last shrinks to happen.
    #[test]
    fn targets_settle_on_constant_input(
        guests in prop::collection::vec((limits(), 0u64..6000, 0u64..10_000), 1..8),
        budget in 0u64..40_000,
    ) {
        let p = Params::default();
        let mut state = PolicyState::new();
        let mut targets: Vec<u64> = guests.iter().map(|g| g.2).collect();
        let mut history = Vec::new();
        for tick in 0..TICKS {
            let vms: Vec<VmObservation> = guests.iter().zip(&targets).enumerate().map(
                |(i, ((limits, used, _), &target))| VmObservation {
                    id: format!("vm{i}"),
                    limits: *limits,
                    target_mib: target,
                    current_mib: target,
                    stats: Some(GuestStats {
                        available_memory: Some(target.saturating_sub(*used) * MIB),
                        major_faults: Some(7),
                        swap_in: Some(0),
                        age_ms: Some(300),
                        ..GuestStats::default()
                    }),
                    rss_mib: None,
                    deflate_on_oom_events: Some(0),
                }).collect();
            let plan = decide(&p, &host(budget), &vms, &mut state, Duration::from_secs(tick));
            check_plan(&p, budget, &vms, &plan);
            targets = plan.decisions.iter().map(|d| d.target_mib).collect();
            history.push(targets.clone());
        }
        // Settled: the last 100 ticks changed nothing.
        let last = &history[history.len() - 1];
        let from = TICKS as usize - 100;
        for (i, t) in history[from..].iter().enumerate() {
            prop_assert_eq!(t, last, "tick {} still moving", from + i);
        }
    }

    /// More pressure on one VM (less available memory, more major faults or swap-in) never gives
    /// it a smaller target, all else equal, after the same history.
    #[test]
    fn more_pressure_never_gives_less_memory(
        vms in fleet(6),
        budget in 0u64..40_000,
        pick in any::<prop::sample::Index>(),
        less_available in 0u64..4096,
        more_faults in 0u64..100_000,
        more_swap in 0u64..(1 << 30),
    ) {
        let p = Params::default();
        let k = pick.index(vms.len());
        // The same first tick for both runs.
        let mut state = PolicyState::new();
        decide(&p, &host(budget), &vms, &mut state, Duration::from_secs(100));
        let later = |vms: &[VmObservation]| -> Vec<VmObservation> {
            vms.iter().map(|v| {
                let mut v = v.clone();
                if let Some(s) = v.stats.as_mut() {
                    s.age_ms = s.age_ms.map(|a| a.min(p.stale_after_ms));
                }
                v
            }).collect()
        };
        let base = later(&vms);
        let mut worse = base.clone();
        if let Some(s) = worse[k].stats.as_mut() {
            s.available_memory = s.available_memory.map(|a| a.saturating_sub(less_available * MIB));
            s.major_faults = s.major_faults.map(|f| f + more_faults);
            s.swap_in = s.swap_in.map(|b| b + more_swap);
        }
        let now = Duration::from_secs(102);
        let a = decide(&p, &host(budget), &base, &mut state.clone(), now);
        let b = decide(&p, &host(budget), &worse, &mut state.clone(), now);
        prop_assert!(
            b.decisions[k].target_mib >= a.decisions[k].target_mib,
            "base {:?}\nworse {:?}", a.decisions[k], b.decisions[k]
        );
    }
}
