//! What the caller (the host daemon) observes each tick and hands to [`crate::decide`].
//!
//! Memory sizes are MiB (`u64`), as in the VMM's `PUT /vm/resize`; the guest's statistics keep the
//! balloon's own units (bytes and event counts) and field names, so the body of a VMM's
//! `GET /balloon/statistics` deserializes straight into [`GuestStats`] (extra fields are ignored).

use serde::{Deserialize, Serialize};

/// The operator's limits for one VM, in MiB.
///
/// `boot_mib` is the guest's boot RAM: below it the VMM shrinks with the balloon, above it grows
/// with virtio-mem up to `max_mib`. The policy does not care which: it speaks in "usable MiB"
/// targets and the VMM's `PUT /vm/resize` does the split. It still needs `boot_mib` to know how far
/// deflate-on-OOM can give memory back without the host (up to boot size, never above).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmLimits {
    /// Guaranteed: the policy never sets a target below it (admission control sums these).
    pub min_mib: u64,
    /// Ceiling: the policy never sets a target above it.
    pub max_mib: u64,
    /// Boot RAM (balloon below, virtio-mem above).
    pub boot_mib: u64,
    /// Relative share when memory is short (like Hyper-V's weight or ESX's shares); 0 acts as 1.
    pub weight: u32,
}

/// The guest's balloon statistics, as the VMM's `GET /balloon/statistics` returns them.
///
/// Every value is optional: older guests send fewer tags, and a guest that has not reported yet
/// sends none. Counters (faults, swap, stalls, scans) are cumulative since guest boot; the policy
/// turns them into rates with the previous tick's values it keeps in [`crate::PolicyState`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GuestStats {
    /// Tag 0: memory swapped in, bytes (cumulative).
    pub swap_in: Option<u64>,
    /// Tag 1: memory swapped out, bytes (cumulative).
    pub swap_out: Option<u64>,
    /// Tag 2: major page faults (cumulative).
    pub major_faults: Option<u64>,
    /// Tag 3: minor page faults (cumulative).
    pub minor_faults: Option<u64>,
    /// Tag 4: free memory, bytes.
    pub free_memory: Option<u64>,
    /// Tag 5: total memory as the guest sees it, bytes.
    pub total_memory: Option<u64>,
    /// Tag 6: available memory (free plus what the guest can reclaim), bytes. The policy's main
    /// input: without it the VM is frozen.
    pub available_memory: Option<u64>,
    /// Tag 7: disk caches, bytes.
    pub disk_caches: Option<u64>,
    /// Tag 10 (Linux 6.12): OOM kills (cumulative).
    pub oom_kill: Option<u64>,
    /// Tag 11 (Linux 6.12): allocations that stalled in direct reclaim (cumulative).
    pub alloc_stall: Option<u64>,
    /// Tag 12 (Linux 6.12): pages scanned by kswapd (cumulative).
    pub async_scan: Option<u64>,
    /// Tag 13 (Linux 6.12): pages scanned in direct reclaim (cumulative).
    pub direct_scan: Option<u64>,
    /// Tag 14 (Linux 6.12): pages reclaimed by kswapd (cumulative).
    pub async_reclaim: Option<u64>,
    /// Tag 15 (Linux 6.12): pages reclaimed in direct reclaim (cumulative).
    pub direct_reclaim: Option<u64>,
    /// Memory the guest counts in `total_memory` but cannot use, bytes, at the time of the report:
    /// the balloon's pages when deflate-on-OOM is on (Linux then keeps ballooned pages in its
    /// total, as used), 0 when it is off (they leave the total). With it the working set is read
    /// from the guest's own report alone (total - available - this), whatever the balloon and
    /// virtio-mem did since; without it (`None`) the policy estimates the guest's size at the
    /// report from the sizes it saw.
    pub ballooned_in_total: Option<u64>,
    /// Age of this report in milliseconds when the caller read it. `None` (no report yet) or older
    /// than [`crate::Params::stale_after_ms`] means the statistics are unknown.
    pub age_ms: Option<u64>,
}

/// One VM as the caller sees it this tick.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmObservation {
    /// The caller's name for the VM; decisions carry it back, and [`crate::PolicyState`] keys its
    /// memory of the VM by it.
    pub id: String,
    /// The VM's memory limits.
    pub limits: VmLimits,
    /// The target the caller last asked the VMM for (`PUT /vm/resize` `desired_mib`). For a VM
    /// never resized, its boot size.
    pub target_mib: u64,
    /// What the guest can use now (`GET /vm/resize` `current_mib`: boot RAM minus balloon plus
    /// plugged memory). Lags `target_mib` while the balloon or virtio-mem moves.
    pub current_mib: u64,
    /// The latest statistics report; `None` when the VM has no balloon driver or statistics off.
    pub stats: Option<GuestStats>,
    /// Host memory the VMM holds for guest RAM, MiB, if the caller measures it (shown, not used for
    /// decisions: free page reporting makes it lag the guest's view).
    pub rss_mib: Option<u64>,
    /// Times the guest took balloon pages back by itself (deflate-on-OOM), cumulative, if the
    /// caller can tell (the balloon's actual size fell while its target did not change).
    pub deflate_on_oom_events: Option<u64>,
}

/// The host as the caller sees it this tick. This version enforces the budget only: the host's
/// MemAvailable and PSI are carried so decisions can be shown beside them, and are the inputs for
/// a later host-pressure rule (README.md, "Not yet").
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HostObservation {
    /// The memory the VMs' targets may add up to, MiB (default in the daemon: host memory minus a
    /// reserve).
    pub budget_mib: u64,
    /// The host's MemAvailable, MiB, if known.
    pub mem_available_mib: Option<u64>,
    /// /proc/pressure/memory `some avg10` (percent), if known.
    pub psi_some_avg10: Option<f64>,
    /// /proc/pressure/memory `full avg10` (percent), if known.
    pub psi_full_avg10: Option<f64>,
}
