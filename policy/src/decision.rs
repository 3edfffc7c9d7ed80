//! What [`crate::decide`] returns: one [`Decision`] per VM, in the order of the observations, each
//! with the reason for its target, so the daemon can log and export every change.

use serde::{Deserialize, Serialize};

/// Why a VM's target is what it is this tick. Exactly one per decision: the one that set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Nothing to do: the target is within the hysteresis band around what the guest wants.
    Hold,
    /// Idle memory taken back: the guest has more than its working set plus buffer (step-limited).
    IdleReclaim,
    /// The working-set estimate (plus buffer, plus a rising trend) is above the target.
    WorkingSetGrow,
    /// The guest shows pressure (little available memory, major faults, swap-in, stalls, OOM kills,
    /// deflate-on-OOM): it gets more memory now.
    PressureGrow,
    /// Memory is short: the sum of targets would exceed the budget, so this VM gets less than it
    /// wants (shares by weight; idle memory first, then buffers, then working sets).
    BudgetSqueeze,
    /// A shrink was wanted but the balloon has not reached the last target yet.
    InProgress,
    /// A shrink was wanted but the guest showed pressure right after an earlier shrink.
    BackOff,
    /// Frozen: the VM has no statistics (no balloon driver, statistics off). Nothing is shrunk.
    FrozenNoStats,
    /// Frozen: the statistics are older than `stale_after_ms` (a hung or busy guest).
    FrozenStaleStats,
    /// The target is held at the VM's minimum.
    AtMin,
    /// The target is held at the VM's maximum.
    AtMax,
}

/// Conditions worth showing beside the reason (several may hold at once).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flags {
    /// The guest showed pressure this tick.
    pub pressure: bool,
    /// The VM is frozen (no or stale statistics): its target never falls below its current size.
    pub frozen: bool,
    /// The VM is in a back-off after pressure that followed a shrink.
    pub backoff: bool,
    /// The budget kept this VM's target below what the policy wanted for it.
    pub squeezed: bool,
    /// The VM's limits were inconsistent (min above max); they were read as `min = max`.
    pub bad_limits: bool,
}

/// The policy's answer for one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The VM's id, as in its observation.
    pub id: String,
    /// The usable size to ask for (`PUT /vm/resize` `desired_mib`); equal to the observation's
    /// `target_mib` when nothing changes.
    pub target_mib: u64,
    /// The observation's `target_mib`, for logging the change.
    pub previous_mib: u64,
    /// Why the target is what it is.
    pub reason: Reason,
    /// Conditions worth showing beside the reason.
    pub flags: Flags,
    /// What the policy would give this VM with memory to spare (working set + buffer + trend,
    /// within its limits), MiB; `None` when frozen.
    pub wanted_mib: Option<u64>,
}

impl Decision {
    /// True when the caller has to send a new target.
    pub fn changed(&self) -> bool {
        self.target_mib != self.previous_mib
    }
}

/// All decisions of one tick, with the host-wide figures the daemon shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// One per observation, in the same order.
    pub decisions: Vec<Decision>,
    /// Sum of the new targets, MiB.
    pub total_target_mib: u64,
    /// How far the VMs' floors (their minimums, or the current size of frozen VMs) exceed the
    /// budget, MiB; 0 when the budget holds. When non-zero the targets are at their floors and
    /// their sum is above the budget: the policy does not shrink below a minimum or shrink blind.
    pub over_budget_mib: u64,
}
