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

/// A guest whose working set stays at 300 MiB while its balloon takes 64 MiB at every tick (the
/// step done within 200 ms of the tick), reporting once a second at a phase that drifts against
/// the daemon's ticks, as the daemon sees it.
#[test]
fn a_balloon_moving_between_reports_is_not_read_as_growth() {
    let mut state = PolicyState::new();
    let used = 300;
    // Size at time `ms`: 1000 MiB until the first tick, then 64 MiB less 200 ms after each tick.
    let size_at =
        |ms: u64| 1000 - 64 * (ms.saturating_sub(10_200) / 1000 + u64::from(ms >= 10_200));
    let mut report_at = 9_700;
    for n in 0..8u64 {
        let now = 10_000 + n * 1000;
        // Reports every 1.1 s: their age at the ticks drifts through the whole second.
        while report_at + 1100 <= now {
            report_at += 1100;
        }
        let current = size_at(now);
        let available = size_at(report_at) - used;
        let d = tick(
            vm(current - 64, current, available, now - report_at),
            &mut state,
            now,
        );
        // A report made inside a step's 200 ms is off by that step, no more; never above.
        let wanted = d.wanted_mib.unwrap();
        assert!(
            (used + 256 - 64..=used + 256).contains(&wanted),
            "tick {n}: size {current}, report {} ms old: wanted {wanted} MiB: {d:?}",
            now - report_at
        );
    }
}

/// A guest that allocates 50 MiB a second at a steady size: its growth is projected from its
/// second rising report on, not from its first (one pair of reports can be noise).
#[test]
fn a_working_set_that_keeps_growing_is_believed_at_its_second_rise() {
    let mut state = PolicyState::new();
    let mut wanted = Vec::new();
    for i in 0..4u64 {
        let used = 500 + 50 * i;
        let d = tick(
            vm(3000, 3000, 3000 - used, 500),
            &mut state,
            10_000 + i * 1000,
        );
        wanted.push(d.wanted_mib.unwrap() - used - 256);
    }
    // Buffer is 256 MiB (the minimum) while used < 1280; what is left is the projection.
    assert_eq!(wanted[0], 0, "{wanted:?}");
    assert_eq!(wanted[1], 0, "one rise is not a trend yet: {wanted:?}");
    assert!(wanted[2] >= 200, "5 s of 50 MiB/s: {wanted:?}");
    assert!(wanted[3] >= 200, "{wanted:?}");
}

/// Memory virtio-mem just plugged is in the VMM's size at once, but in the guest's MemTotal and
/// available memory only once the guest onlined it: until then it is not working set.
#[test]
fn plugged_memory_not_yet_online_is_not_read_as_working_set() {
    let mut state = PolicyState::new();
    // 768 MiB plugged up to, the guest still sees 512 MiB total with 300 available.
    let mut v = vm(768, 768, 300, 500);
    v.stats.as_mut().unwrap().total_memory = Some(512 * MIB);
    let d = tick(v, &mut state, 10_000);
    assert_eq!(d.wanted_mib, Some(212 + 256), "{d:?}");
}

/// With the balloon's size at the report (`ballooned_in_total`) the working set is read from the
/// guest's report alone: deflate-on-OOM keeps ballooned pages in the guest's total as used, and
/// the VM's size now (the balloon and virtio-mem moved since the report) does not enter it.
#[test]
fn the_guests_own_report_gives_the_working_set_whatever_the_size_does() {
    for current in [300, 624, 1024, 1536] {
        let mut state = PolicyState::new();
        // Total 1024 MiB, 300 available, 400 of it in the balloon: 324 MiB used.
        let mut v = vm(current, current, 300, 500);
        let stats = v.stats.as_mut().unwrap();
        stats.total_memory = Some(1024 * MIB);
        stats.ballooned_in_total = Some(400 * MIB);
        let d = tick(v, &mut state, 10_000);
        assert_eq!(d.wanted_mib, Some(324 + 256), "size {current}: {d:?}");
    }
}

/// A guest allocating while virtio-mem plugs under it: each report's total grows as the guest
/// onlines memory, and the working set follows what it touched, not the plugged size.
#[test]
fn an_allocating_guest_is_read_by_what_it_touched_while_memory_is_plugged() {
    let mut state = PolicyState::new();
    let mut last = None;
    for i in 0..5u64 {
        // Touched 100 MiB more each second; the guest onlined 128 MiB blocks as they came, and
        // the VMM has already plugged the next two (not in the guest's total yet).
        let used = 500 + 100 * i;
        let total = 640 + 128 * i;
        let mut v = vm(total + 256, total + 256, total - used, 300);
        let stats = v.stats.as_mut().unwrap();
        stats.total_memory = Some(total * MIB);
        stats.ballooned_in_total = Some(0);
        let d = tick(v, &mut state, 10_000 + i * 1000);
        let wanted = d.wanted_mib.unwrap();
        assert!(
            wanted >= used + 256,
            "second {i}: used {used}, wanted {wanted}: {d:?}"
        );
        if i >= 2 {
            assert!(
                wanted >= used + 256 + 400,
                "5 s of 100 MiB/s ahead: {wanted}: {d:?}"
            );
        }
        last = Some(d);
    }
    assert!(last.unwrap().target_mib >= 900 + 256);
}
