//! How the working set is read from the guest's statistics: what a user would check on the
//! decisions' `wanted_mib` and reasons when the guest's size moves between two reports.

use std::time::Duration;

use policy::{
    decide, Decision, GuestStats, HostObservation, Params, PolicyState, Reason, VmLimits,
    VmObservation,
};

const MIB: u64 = 1 << 20;

/// A VM asked for `target`, at `current` MiB now, whose last report (made `age_ms` ago) said
/// `available` MiB.
fn vm(target: u64, current: u64, available: u64, age_ms: u64) -> VmObservation {
    VmObservation {
        id: "a".into(),
        limits: VmLimits {
            min_mib: 256,
            max_mib: 4096,
            boot_mib: 2048,
            weight: 100,
        },
        target_mib: target,
        current_mib: current,
        stats: Some(GuestStats {
            available_memory: Some(available * MIB),
            major_faults: Some(0),
            swap_in: Some(0),
            age_ms: Some(age_ms),
            ..GuestStats::default()
        }),
        rss_mib: None,
        deflate_on_oom_events: Some(0),
    }
}

fn tick(vm: VmObservation, state: &mut PolicyState, now_ms: u64) -> Decision {
    let host = HostObservation {
        budget_mib: 1 << 20,
        mem_available_mib: None,
        psi_some_avg10: None,
        psi_full_avg10: None,
    };
    let plan = decide(
        &Params::default(),
        &host,
        &[vm],
        state,
        Duration::from_millis(now_ms),
    );
    plan.decisions.into_iter().next().unwrap()
}

#[test]
fn a_shrinking_balloon_is_not_read_as_memory_the_guest_freed() {
    let mut state = PolicyState::new();
    // A fresh report: 1500 of 2000 MiB available, so the working set is 500 MiB.
    let first = tick(vm(1800, 2000, 1500, 500), &mut state, 10_000);
    // One second later the balloon has taken 128 MiB more; the guest has not reported again.
    // Its working set did not change, so neither does what the policy wants for it.
    let again = tick(vm(1800, 1872, 1500, 1500), &mut state, 11_000);
    assert_eq!(first.wanted_mib, Some(500 + 256));
    assert_eq!(again.wanted_mib, first.wanted_mib, "{again:?}");
}

#[test]
fn memory_just_given_is_not_read_as_a_growing_working_set() {
    let mut state = PolicyState::new();
    // 1024 MiB with 40 available: pressure, the target rises.
    let first = tick(vm(1024, 1024, 40, 500), &mut state, 10_000);
    assert_eq!(first.reason, Reason::PressureGrow);
    let grown = first.target_mib;
    // The VMM has deflated to the new target; the guest's next report is not in yet. The same
    // report does not show pressure again, and the working set is still 984 MiB.
    let again = tick(vm(grown, grown, 40, 1500), &mut state, 11_000);
    assert_eq!(again.wanted_mib, first.wanted_mib, "{again:?}");
    assert_eq!(again.target_mib, grown, "{again:?}");
    assert!(!again.flags.pressure, "{again:?}");
}

#[test]
fn a_third_of_the_page_cache_is_left_to_the_guest() {
    // 2048 MiB: 500 MiB used, 1000 MiB of page cache, 548 MiB free (all counted as available).
    let mut v = vm(2048, 2048, 1548, 500);
    let s = v.stats.as_mut().unwrap();
    s.free_memory = Some(548 * MIB);
    s.disk_caches = Some(1000 * MIB);
    let d = tick(v.clone(), &mut PolicyState::new(), 10_000);
    // Working set 500 + buffer 256 + a third of the cache (330).
    assert_eq!(d.wanted_mib, Some(500 + 256 + 330), "{d:?}");
    // Cache the guest cannot drop (tmpfs, shared memory) is not in MemAvailable: only the
    // reclaimable part (available minus free) counts, even when the disk caches say more.
    let s = v.stats.as_mut().unwrap();
    s.disk_caches = Some(1500 * MIB);
    let d = tick(v, &mut PolicyState::new(), 10_000);
    assert_eq!(d.wanted_mib, Some(500 + 256 + 330), "{d:?}");
}

#[test]
fn without_a_cache_figure_only_the_working_set_and_buffer_are_wanted() {
    let d = tick(vm(2048, 2048, 1548, 500), &mut PolicyState::new(), 10_000);
    assert_eq!(d.wanted_mib, Some(500 + 256), "{d:?}");
}
