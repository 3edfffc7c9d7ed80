//! The policy's knobs, with defaults chosen from the systems users know (Hyper-V's 20% buffer,
//! oVirt MOM's 5% per-tick shrink cap) and from the simulation (`benches/simulate/`).
//!
//! `Params` deserializes from a partial JSON object (missing fields keep their defaults, unknown
//! fields are refused) so the daemon's `PUT /host/memory` can set any subset; [`Params::validate`]
//! says which field is out of range, in which unit, and what is allowed.

use serde::{Deserialize, Serialize};

/// A parameter outside its allowed range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {value} {unit} is out of range {min}..={max} {unit}")]
pub struct ParamsError {
    /// The parameter's name.
    pub field: &'static str,
    /// The value given.
    pub value: u64,
    /// Its unit, for the message.
    pub unit: &'static str,
    /// The smallest value allowed.
    pub min: u64,
    /// The largest value allowed.
    pub max: u64,
}

/// The policy's parameters. Percentages are whole percent; times are milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// Headroom above the working set a guest keeps, percent of its working set (Hyper-V's memory
    /// buffer, default 20).
    pub buffer_pct: u64,
    /// The buffer is never smaller than this, MiB (default 256): a small guest still needs room
    /// for its hot page cache and for what it allocates before the next statistics report shows
    /// it (2 s at 100 MiB/s). In the simulation 128 left bursty guests 23x more pressure-seconds.
    pub buffer_min_mib: u64,
    /// Most a target may fall in one tick when memory is taken back from an idle guest, percent of
    /// the target (oVirt MOM's 5%); see `shrink_step_min_mib`. A budget squeeze may go faster.
    pub shrink_step_pct: u64,
    /// The shrink step is never smaller than this, MiB (default 32).
    pub shrink_step_min_mib: u64,
    /// A VM that never needed a back-off sheds half of its idle memory per tick, at most this
    /// percent of its target (default 25); the step above still applies when it is larger.
    pub fast_shrink_pct: u64,
    /// Most a target may rise in one tick, MiB (default 2048). Large on purpose: a guest that
    /// waits for memory is stalled, and deflating a balloon is cheap.
    pub grow_step_max_mib: u64,
    /// A guest under pressure whose estimate does not ask for more still gets at least this much
    /// more than it can use now, MiB (default 128).
    pub pressure_grow_mib: u64,
    /// Idle memory is taken back only when the target is above the wanted size by more than this,
    /// percent of the target (default 10), so small changes in the guest do not move the balloon.
    pub hysteresis_pct: u64,
    /// ... and by more than this, MiB (default 64).
    pub hysteresis_min_mib: u64,
    /// Pressure within this long after a shrink marks that shrink as a mistake (default 60 000).
    pub backoff_window_ms: u64,
    /// After such a mistake the VM is not shrunk for this long (default 300 000); doubled at each
    /// repeat, up to 16 times.
    pub backoff_ms: u64,
    /// Statistics older than this are unknown: the VM is frozen (default 10 000).
    pub stale_after_ms: u64,
    /// Major faults per second above which a guest counts as under pressure (default 200).
    pub major_fault_rate: u64,
    /// Swap-in per second above which a guest counts as under pressure, KiB/s (default 256).
    pub swap_in_kib_rate: u64,
    /// How far ahead a rising working set is projected, ms (default 5 000): a guest that is
    /// allocating gets memory before it runs out, not after.
    pub lookahead_ms: u64,
    /// Share of the guest's reclaimable page cache (available minus free, at most its disk
    /// caches) the policy leaves it, percent (default 33). MemAvailable counts all page cache as
    /// free to take, but the hot part is re-read at once (major faults): ESX likewise taxes idle
    /// memory at 75%, not 100%. In the simulation 0 left cache-heavy guests under pressure
    /// (240 guest-s at 150 VMs), 25 (ESX's share) 2, 33 none, at no cost in VMs that fit. It
    /// is part of `wanted`, so a budget squeeze takes it before working sets.
    pub cache_keep_pct: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            buffer_pct: 20,
            buffer_min_mib: 256,
            shrink_step_pct: 5,
            shrink_step_min_mib: 32,
            fast_shrink_pct: 25,
            grow_step_max_mib: 2048,
            pressure_grow_mib: 128,
            hysteresis_pct: 10,
            hysteresis_min_mib: 64,
            backoff_window_ms: 60_000,
            backoff_ms: 300_000,
            stale_after_ms: 10_000,
            major_fault_rate: 200,
            swap_in_kib_rate: 256,
            lookahead_ms: 5_000,
            cache_keep_pct: 33,
        }
    }
}

const MIB_MAX: u64 = 1 << 30; // 1 PiB in MiB: a bound that only catches nonsense

impl Params {
    /// Checks every field against its allowed range; the error names the first one outside it.
    pub fn validate(&self) -> Result<(), ParamsError> {
        let checks: [(&'static str, u64, &'static str, u64, u64); 16] = [
            ("buffer_pct", self.buffer_pct, "%", 0, 400),
            ("buffer_min_mib", self.buffer_min_mib, "MiB", 0, MIB_MAX),
            ("shrink_step_pct", self.shrink_step_pct, "%", 1, 100),
            ("fast_shrink_pct", self.fast_shrink_pct, "%", 0, 100),
            (
                "shrink_step_min_mib",
                self.shrink_step_min_mib,
                "MiB",
                1,
                MIB_MAX,
            ),
            (
                "grow_step_max_mib",
                self.grow_step_max_mib,
                "MiB",
                1,
                MIB_MAX,
            ),
            (
                "pressure_grow_mib",
                self.pressure_grow_mib,
                "MiB",
                0,
                MIB_MAX,
            ),
            ("hysteresis_pct", self.hysteresis_pct, "%", 0, 100),
            (
                "hysteresis_min_mib",
                self.hysteresis_min_mib,
                "MiB",
                0,
                MIB_MAX,
            ),
            (
                "backoff_window_ms",
                self.backoff_window_ms,
                "ms",
                0,
                86_400_000,
            ),
            ("backoff_ms", self.backoff_ms, "ms", 0, 86_400_000),
            ("stale_after_ms", self.stale_after_ms, "ms", 1, 86_400_000),
            (
                "major_fault_rate",
                self.major_fault_rate,
                "faults/s",
                1,
                u32::MAX as u64,
            ),
            (
                "swap_in_kib_rate",
                self.swap_in_kib_rate,
                "KiB/s",
                1,
                u32::MAX as u64,
            ),
            ("lookahead_ms", self.lookahead_ms, "ms", 0, 600_000),
            ("cache_keep_pct", self.cache_keep_pct, "%", 0, 100),
        ];
        for (field, value, unit, min, max) in checks {
            if value < min || value > max {
                return Err(ParamsError {
                    field,
                    value,
                    unit,
                    min,
                    max,
                });
            }
        }
        Ok(())
    }
}
