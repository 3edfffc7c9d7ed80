//! The host memory policy: the brain of the host daemon that runs many VMs (one `vmm` process
//! each) and moves memory between them inside a budget.
//!
//! It is a pure function, [`decide`]: the daemon observes each VM (limits, last target, usable
//! size, balloon statistics with their age) and the host (budget, available memory), passes the
//! [`PolicyState`] the previous tick left, and gets back a [`Plan`]: one target per VM, each with the
//! [`Reason`] that set it. No I/O, no threads, no clock: the caller's `now` is the only time, so
//! every decision can be replayed, tested exactly and simulated at scale (`benches/simulate/`).
//! [`decide_into`] is the same decision written into the previous tick's plan, reusing its
//! allocations.
//!
//! What it does, in order of priority (README.md explains why):
//! - every target within the VM's `min..=max`; the sum within the budget whenever the minimums
//!   (and frozen VMs' current sizes) allow it;
//! - a VM without fresh statistics is frozen: its target never falls below its current size;
//! - a guest under pressure gets memory now (the VMM deflates first, then plugs up to max);
//! - idle memory (above working set + buffer + a third of the reclaimable page cache) is taken
//!   back step by step, with hysteresis, and not from a guest that showed pressure right after
//!   an earlier shrink (back-off);
//! - when memory is short, idle memory goes first, then buffers and cache shares, then working
//!   sets, by weight.

mod budget;
mod decide;
mod decision;
mod observation;
mod params;
mod state;

pub use decide::{decide, decide_into};
pub use decision::{Decision, Flags, Plan, Reason};
pub use observation::{GuestStats, HostObservation, VmLimits, VmObservation};
pub use params::{Params, ParamsError};
pub use state::PolicyState;
