//! One scenario per [`Reason`]: what the daemon would see, and the target a user expects.

use std::time::Duration;

use policy::{
    decide, Decision, GuestStats, HostObservation, Params, PolicyState, Reason, VmLimits,
    VmObservation,
};

const MIB: u64 = 1 << 20;

fn limits() -> VmLimits {
    VmLimits {
        min_mib: 256,
        max_mib: 4096,
        boot_mib: 2048,
        weight: 100,
    }
}

/// A VM at `target` = `current` MiB whose guest reports `available` MiB, fresh, all of it
/// free memory (no page cache: `tests/working_set.rs` covers the cache).
fn vm(id: &str, target: u64, available: u64) -> VmObservation {
    VmObservation {
        id: id.into(),
        limits: limits(),
        target_mib: target,
        current_mib: target,
        stats: Some(GuestStats {
            available_memory: Some(available * MIB),
            free_memory: Some(available * MIB),
            disk_caches: Some(0),
            major_faults: Some(0),
            swap_in: Some(0),
            age_ms: Some(500),
            ..GuestStats::default()
        }),
        rss_mib: None,
        deflate_on_oom_events: Some(0),
    }
}

fn host(budget: u64) -> HostObservation {
    HostObservation {
        budget_mib: budget,
        mem_available_mib: None,
        psi_some_avg10: None,
        psi_full_avg10: None,
    }
}

fn one(vm: VmObservation, state: &mut PolicyState, now_s: u64) -> Decision {
    let plan = decide(
        &Params::default(),
        &host(1 << 20),
        &[vm],
        state,
        Duration::from_secs(now_s),
    );
    plan.decisions.into_iter().next().unwrap()
}

#[test]
fn idle_guest_far_above_its_wanted_size_sheds_at_most_a_quarter_per_tick() {
    // 2048 MiB, 1848 available: working set 200 MiB, wanted 200 + 256 buffer.
    let d = one(vm("a", 2048, 1848), &mut PolicyState::new(), 10);
    assert_eq!(d.reason, Reason::IdleReclaim);
    assert_eq!(d.wanted_mib, Some(456));
    // Half the excess over 456 + 102 (half the band) is 745 MiB; 25% of 2048 is 512.
    assert_eq!(d.target_mib, 2048 - 512);
    assert!(d.changed());
}

#[test]
fn idle_guest_sheds_half_its_excess_per_tick_until_it_is_in_the_band() {
    // Working set 220 MiB, wanted 476; the band above it is 64 MiB below 640 MiB, and the
    // shrinks aim at its middle, 508.
    let mut state = PolicyState::new();
    let mut targets = vec![700];
    for tick in 0..6 {
        let t = *targets.last().unwrap();
        let d = one(vm("a", t, t - 220), &mut state, 10 + 2 * tick);
        targets.push(d.target_mib);
    }
    // 700 -> 605 sheds half of the 189 MiB above 511 (the band is 70 there); then half of 97;
    // then the 32 MiB minimum step; 524 is inside 476..=540, so it holds.
    assert_eq!(targets, [700, 605, 556, 524, 524, 524, 524]);
}

#[test]
fn guest_with_little_available_memory_grows_under_pressure() {
    // 1024 MiB with 40 MiB available: used 984, buffer 256, pressure (40 < 128).
    let d = one(vm("a", 1024, 40), &mut PolicyState::new(), 10);
    assert_eq!(d.reason, Reason::PressureGrow);
    assert!(d.flags.pressure);
    assert!(d.target_mib >= 984 + 256, "{d:?}");
}

#[test]
fn guest_whose_working_set_grew_past_its_buffer_grows() {
    // 1024 MiB, 150 available: used 874, buffer 256 > 150 but 150 is not below half of it.
    let d = one(vm("a", 1024, 150), &mut PolicyState::new(), 10);
    assert_eq!(d.reason, Reason::WorkingSetGrow);
    assert!(!d.flags.pressure);
    assert!(d.target_mib >= 874 + 256, "{d:?}");
}

#[test]
fn guest_near_its_wanted_size_is_held() {
    // 1024 MiB, 300 available: used 724, wanted 980; the band is 102 MiB.
    let d = one(vm("a", 1024, 300), &mut PolicyState::new(), 10);
    assert_eq!(d.reason, Reason::Hold);
    assert_eq!(d.target_mib, 1024);
}

#[test]
fn vm_without_statistics_is_frozen_and_never_shrunk() {
    let mut v = vm("a", 1024, 900);
    v.stats = None;
    v.current_mib = 1500; // a shrink in progress: stop it where it is
    let d = one(v, &mut PolicyState::new(), 10);
    assert_eq!(d.reason, Reason::FrozenNoStats);
    assert!(d.flags.frozen);
    assert_eq!(d.target_mib, 1500);
}

#[test]
fn vm_with_stale_statistics_is_frozen() {
    let mut v = vm("a", 2048, 1800);
    v.stats.as_mut().unwrap().age_ms = Some(60_000);
    let d = one(v, &mut PolicyState::new(), 100);
    assert_eq!(d.reason, Reason::FrozenStaleStats);
    assert_eq!(d.target_mib, 2048);
}

#[test]
fn frozen_vm_still_grows_after_deflate_on_oom() {
    let mut state = PolicyState::new();
    let mut v = vm("a", 1024, 10);
    v.stats = None;
    one(v.clone(), &mut state, 10);
    v.deflate_on_oom_events = Some(3);
    let d = one(v, &mut state, 11);
    assert_eq!(d.reason, Reason::PressureGrow);
    assert!(d.flags.frozen && d.flags.pressure);
    assert_eq!(d.target_mib, 1024 + 128);
}

#[test]
fn shrink_waits_for_the_balloon_to_reach_the_last_target() {
    let mut v = vm("a", 1500, 1400);
    v.current_mib = 1800;
    let d = one(v, &mut PolicyState::new(), 10);
    assert_eq!(d.reason, Reason::InProgress);
    assert_eq!(d.target_mib, 1500);
}

#[test]
fn pressure_right_after_a_shrink_backs_off_further_shrinks() {
    let mut state = PolicyState::new();
    // Tick 1: idle, shrunk.
    let d = one(vm("a", 2048, 1848), &mut state, 10);
    assert_eq!(d.reason, Reason::IdleReclaim);
    // Tick 2: the guest then shows major faults.
    let mut v = vm("a", d.target_mib, 1700);
    v.stats.as_mut().unwrap().major_faults = Some(100_000);
    let d = one(v, &mut state, 12);
    assert!(d.flags.pressure, "{d:?}");
    assert!(state.backoff_until("a", Duration::from_secs(12)).is_some());
    // Tick 3: idle again, but in back-off: no shrink.
    let mut v = vm("a", d.target_mib, 1700);
    v.stats.as_mut().unwrap().major_faults = Some(100_000);
    let d = one(v, &mut state, 14);
    assert_eq!(d.reason, Reason::BackOff);
    assert!(d.flags.backoff);
    assert!(!d.changed());
    // After the back-off (300 s) it shrinks again, by 5% at a time: shrinks hurt it once.
    let before = d.target_mib;
    let mut v = vm("a", before, 1700);
    v.stats.as_mut().unwrap().major_faults = Some(100_000);
    let d = one(v, &mut state, 400);
    assert_eq!(d.reason, Reason::IdleReclaim);
    assert_eq!(d.target_mib, before - before * 5 / 100, "{d:?}");
}

#[test]
fn idle_guest_at_its_minimum_says_so() {
    // Working set 62 MiB, wanted 318, min 512.
    let mut v = vm("a", 512, 450);
    v.limits.min_mib = 512;
    let d = one(v, &mut PolicyState::new(), 10);
    assert_eq!(d.reason, Reason::AtMin);
    assert_eq!(d.target_mib, 512);
}

#[test]
fn guest_under_pressure_at_its_maximum_says_so() {
    let d = one(vm("a", 4096, 10), &mut PolicyState::new(), 10);
    assert_eq!(d.reason, Reason::AtMax);
    assert_eq!(d.target_mib, 4096);
}

#[test]
fn budget_squeeze_takes_idle_memory_before_working_sets() {
    // Two VMs at 2048: "busy" uses 1500 MiB, "idle" 100 MiB; budget 2600.
    let vms = [vm("busy", 2048, 548), vm("idle", 2048, 1948)];
    let plan = decide(
        &Params::default(),
        &host(2600),
        &vms,
        &mut PolicyState::new(),
        Duration::from_secs(10),
    );
    assert!(plan.total_target_mib <= 2600, "{plan:?}");
    let busy = &plan.decisions[0];
    let idle = &plan.decisions[1];
    assert!(busy.target_mib >= 1500 + 300, "{plan:?}");
    assert_eq!(idle.reason, Reason::BudgetSqueeze);
    assert!(idle.flags.squeezed);
    assert!(idle.target_mib < 2048 - 102, "faster than a step: {plan:?}");
}

#[test]
fn budget_below_the_minimums_reports_the_shortfall() {
    let vms = [vm("a", 2048, 100), vm("b", 2048, 100)];
    let plan = decide(
        &Params::default(),
        &host(400),
        &vms,
        &mut PolicyState::new(),
        Duration::from_secs(10),
    );
    assert_eq!(plan.over_budget_mib, 512 - 400);
    assert!(plan.decisions.iter().all(|d| d.target_mib == 256));
}

#[test]
fn params_accept_a_partial_object_and_explain_a_bad_value() {
    let p: Params = serde_json::from_str(r#"{"buffer_pct": 30}"#).unwrap();
    assert_eq!(p.buffer_pct, 30);
    assert_eq!(p.shrink_step_pct, Params::default().shrink_step_pct);
    assert!(serde_json::from_str::<Params>(r#"{"bufer_pct": 30}"#).is_err());
    let p = Params {
        shrink_step_pct: 0,
        ..Params::default()
    };
    assert_eq!(
        p.validate().unwrap_err().to_string(),
        "shrink_step_pct: 0 % is out of range 1..=100 %"
    );
    assert!(Params::default().validate().is_ok());
}

#[test]
fn guest_stats_read_the_vmm_statistics_body() {
    // The shape of GET /balloon/statistics (api/src/responses.rs BalloonStats).
    let body = r#"{"target_pages":0,"actual_pages":0,"target_mib":0,"actual_mib":0,
        "major_faults":12,"available_memory":1048576,"hugetlb_failures":0,"age_ms":700}"#;
    let s: GuestStats = serde_json::from_str(body).unwrap();
    assert_eq!(s.major_faults, Some(12));
    assert_eq!(s.available_memory, Some(1 << 20));
    assert_eq!(s.age_ms, Some(700));
    assert_eq!(s.swap_in, None);
}

#[test]
fn noise_in_one_guest_does_not_move_the_other_squeezed_vms_every_tick() {
    // Two busy VMs (1500 MiB used each) on a budget of 3400: both are squeezed. Then one
    // guest's available memory wobbles by 5 MiB each tick; the other's target should settle.
    let p = Params::default();
    let mut state = PolicyState::new();
    let mut targets = [2048u64, 2048];
    let mut changes_b = 0;
    for tick in 0..40u64 {
        let wobble = if tick % 2 == 0 { 0 } else { 5 };
        let vms: Vec<VmObservation> = ["a", "b"]
            .iter()
            .zip(targets)
            .map(|(id, t)| {
                let mut v = vm(id, t, t.saturating_sub(1500));
                let s = v.stats.as_mut().unwrap();
                s.major_faults = Some(0);
                if *id == "a" {
                    s.available_memory = Some((t - 1500 - wobble) * MIB);
                }
                v
            })
            .collect();
        let plan = decide(
            &p,
            &host(3400),
            &vms,
            &mut state,
            Duration::from_secs(tick * 2),
        );
        assert!(plan.total_target_mib <= 3400);
        if tick >= 5 && plan.decisions[1].changed() {
            changes_b += 1;
        }
        targets = [plan.decisions[0].target_mib, plan.decisions[1].target_mib];
    }
    assert!(
        changes_b <= 2,
        "b's target changed {changes_b} times in 35 ticks"
    );
}

#[test]
fn a_vm_no_longer_observed_is_forgotten() {
    let mut state = PolicyState::new();
    let p = Params::default();
    let now = Duration::from_secs(1);
    decide(
        &p,
        &host(1 << 20),
        &[vm("a", 1024, 500), vm("b", 1024, 500)],
        &mut state,
        now,
    );
    assert_eq!(state.len(), 2);
    let later = Duration::from_secs(2);
    decide(&p, &host(1 << 20), &[vm("b", 1024, 500)], &mut state, later);
    assert_eq!(state.len(), 1);
}

#[test]
fn pressure_after_a_budget_squeeze_starts_no_back_off() {
    let mut state = PolicyState::new();
    // Two busy VMs that do not fit: both squeezed below what they want.
    let vms = |t: [u64; 2], avail: u64| -> Vec<VmObservation> {
        vec![vm("a", t[0], avail), vm("b", t[1], avail)]
    };
    let plan = decide(
        &Params::default(),
        &host(3000),
        &vms([2048, 2048], 548),
        &mut state,
        Duration::from_secs(10),
    );
    assert!(
        plan.decisions
            .iter()
            .all(|d| d.reason == Reason::BudgetSqueeze),
        "{plan:?}"
    );
    let t = [plan.decisions[0].target_mib, plan.decisions[1].target_mib];
    // Then both show pressure: the squeeze, not an idle reclaim, took their memory.
    decide(
        &Params::default(),
        &host(3000),
        &vms(t, 20),
        &mut state,
        Duration::from_secs(12),
    );
    assert_eq!(state.backoff_until("a", Duration::from_secs(12)), None);
    assert_eq!(state.backoff_until("b", Duration::from_secs(12)), None);
}

#[test]
fn a_growing_guest_gets_its_buffer_before_an_idle_guest_keeps_its_own() {
    // a's working set rises 100 MiB a second (two reports: a trend); b idles at 200 MiB used.
    // The budget (1700) cannot hold both buffers: b's goes first.
    let p = Params::default();
    let mut state = PolicyState::new();
    let mut plan = None;
    for (i, used_a) in [600u64, 700, 800].into_iter().enumerate() {
        let vms = vec![vm("a", 1200, 1200 - used_a), vm("b", 500, 300)];
        plan = Some(decide(
            &p,
            &host(1700),
            &vms,
            &mut state,
            Duration::from_secs(10 + i as u64),
        ));
    }
    let plan = plan.unwrap();
    let (a, b) = (&plan.decisions[0], &plan.decisions[1]);
    // a wants 800 + 256 + 5 s of 100 MiB/s, b 200 + 256. a's buffer is served before b keeps
    // more than its working set (200 MiB, so its minimum, 256).
    assert_eq!(b.target_mib, 256, "{plan:?}");
    assert_eq!(a.target_mib, 1700 - 256, "{plan:?}");
}

/// The nested scenario's end: a has just allocated 700 MiB and holds it (working set 800 MiB, no
/// longer growing); b and c idle at their minimum (256 MiB) with a 90 MiB working set, so their
/// minimum already gives them 166 MiB of headroom. The buffers that remain are shared counting
/// that headroom: a keeps almost all of the room above its working set, instead of a third.
#[test]
fn headroom_a_minimum_already_gives_counts_as_buffer_in_a_squeeze() {
    let vms = vec![vm("a", 1024, 224), vm("b", 256, 166), vm("c", 256, 166)];
    let plan = decide(
        &Params::default(),
        &host(1536),
        &vms,
        &mut PolicyState::new(),
        Duration::from_secs(10),
    );
    let t: Vec<u64> = plan.decisions.iter().map(|d| d.target_mib).collect();
    assert!(t.iter().sum::<u64>() <= 1536, "{plan:?}");
    // 1536 - 3 * 256 floors - 544 of a's working set above its floor = 224 MiB of room; counting
    // b's and c's 166 MiB each, (224 + 332) / 3 = 185 each: a 185, b and c 19 each.
    assert!(t[0] >= 800 + 180, "a: {plan:?}");
    assert!(t[1] <= 256 + 32 && t[2] <= 256 + 32, "b, c: {plan:?}");
}

/// A squeeze lowers b's target; its balloon inflates within the next second, and the guest's
/// allocation-stall counter rises while it does. The next report, which spans that inflate,
/// comes in after the balloon got there (current = target): the stalls were the balloon's, not
/// pressure.
#[test]
fn stalls_while_a_squeeze_inflated_the_balloon_are_not_pressure() {
    let mut state = PolicyState::new();
    let stats = |avail: u64, stall: u64, age_ms: u64| {
        let mut v = vm("b", 0, avail).stats.unwrap();
        v.alloc_stall = Some(stall);
        v.age_ms = Some(age_ms);
        v
    };
    let obs = |target: u64, s: GuestStats| VmObservation {
        stats: Some(s),
        ..vm("b", target, 0)
    };
    let p = Params::default();
    // A report at 9.5 s; the budget squeezes b from 600 MiB at 10 s.
    let plan = decide(
        &p,
        &host(700),
        &[vm("a", 400, 100), obs(600, stats(500, 7, 500))],
        &mut state,
        Duration::from_secs(10),
    );
    let lowered = plan.decisions[1].target_mib;
    assert!(lowered < 600, "{plan:?}");
    // The next report, at 11.5 s: 12 more stalls; b is at its new target.
    let plan = decide(
        &p,
        &host(700),
        &[
            vm("a", 400, 100),
            obs(lowered, stats(lowered - 100, 19, 500)),
        ],
        &mut state,
        Duration::from_secs(12),
    );
    assert!(!plan.decisions[1].flags.pressure, "{plan:?}");
    let lowered = plan.decisions[1].target_mib;
    assert_eq!(lowered, 256, "at its minimum now: {plan:?}");
    // A quiet report; then stalls in a report whose span saw no change of target: pressure.
    decide(
        &p,
        &host(700),
        &[
            vm("a", 400, 100),
            obs(lowered, stats(lowered - 100, 19, 500)),
        ],
        &mut state,
        Duration::from_secs(16),
    );
    let plan = decide(
        &p,
        &host(700),
        &[
            vm("a", 400, 100),
            obs(lowered, stats(lowered - 100, 40, 500)),
        ],
        &mut state,
        Duration::from_secs(20),
    );
    assert!(plan.decisions[1].flags.pressure, "{plan:?}");
}
