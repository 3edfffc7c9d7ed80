//! What the policy remembers between ticks. The caller owns it and passes it to every
//! [`crate::decide`] call, so the function stays pure: the same observations, state and time give
//! the same plan. A fresh (default) state is always safe: rates and back-offs start over.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The policy's memory of every VM it has seen, by id. VMs absent from a tick's observations are
/// forgotten at that tick.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyState {
    pub(crate) vms: HashMap<String, VmMemory, BuildHasherDefault<IdHasher>>,
}

/// FNV-1a, for the map of VM ids: a tick looks up every VM, and the default SipHash was 18% of
/// a tick's instructions at 1,500 VMs (callgrind). Its resistance to chosen keys is not needed
/// here: the ids are the operator's names for its VMs, not input from guests.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl Default for IdHasher {
    fn default() -> Self {
        IdHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl PolicyState {
    /// A state that remembers nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many VMs the state remembers.
    pub fn len(&self) -> usize {
        self.vms.len()
    }

    /// True when the state remembers no VM.
    pub fn is_empty(&self) -> bool {
        self.vms.is_empty()
    }

    /// Until when the VM `id` is in a back-off (not shrunk), if it is in one at `now`.
    pub fn backoff_until(&self, id: &str, now: Duration) -> Option<Duration> {
        self.vms
            .get(id)
            .and_then(|m| m.backoff_until)
            .filter(|until| *until > now)
    }
}

/// Cumulative counters of one statistics report, and when the guest made it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Report {
    /// `now - age` at the tick that saw this report.
    pub at: Duration,
    pub major_faults: Option<u64>,
    pub swap_in: Option<u64>,
    pub alloc_stall: Option<u64>,
    pub oom_kill: Option<u64>,
    /// The guest's working set (its size when it reported, minus available), MiB.
    pub used_mib: u64,
    /// Its reclaimable page cache, MiB.
    pub cache_mib: u64,
}

/// What the policy keeps about one VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct VmMemory {
    /// The last statistics report seen (its counters give rates at the next report).
    pub report: Option<Report>,
    /// Pressure read from the counters at the last new report; kept until the next one, so a tick
    /// between two reports sees the same signals.
    pub counter_pressure: bool,
    /// Growth of the working set, MiB per second, smoothed over reports; never negative.
    pub trend_mib_per_s: f64,
    /// The growth measured between the last two reports, MiB per second (may be negative): a
    /// rise is believed only when the next report rises too, so one noisy pair of reports does
    /// not project hundreds of MiB of growth.
    pub last_growth_mib_per_s: f64,
    /// The VM's size (`current_mib`) at the previous tick, and that tick's time: with this tick's
    /// size it gives the size the guest had when it made its report (see `size_at`).
    pub size_seen: Option<(Duration, u64)>,
    /// Deflate-on-OOM count at the last tick.
    pub deflate_on_oom_events: Option<u64>,
    /// When the policy last lowered this VM's target to take idle memory (a back-off's trigger).
    pub last_shrink_at: Option<Duration>,
    /// When the policy last lowered this VM's target for any reason: its balloon inflates right
    /// after, and allocation stalls in a report that spans that are the balloon's doing.
    pub lowered_at: Option<Duration>,
    /// No idle reclaim before this time.
    pub backoff_until: Option<Duration>,
    /// Back-offs in a row (each doubles the next, up to 16x); reset after a quiet spell.
    pub backoffs: u32,
    /// The tick that last observed this VM (VMs not seen at a tick are forgotten).
    pub seen_at: Option<Duration>,
}
