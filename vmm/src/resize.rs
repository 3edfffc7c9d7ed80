//! What `PUT /vm/resize` does, as a pure function: from the VM's shape, what its devices report
//! and what was asked, to what the devices are told. No locks, no devices, no clock: the API
//! handler ([`crate::api_bridge`]) reads the devices, calls [`decide`] and applies the [`Plan`].
//! The host memory manager drives VMs through `PUT /vm/resize`, so this is the behaviour it
//! relies on.
//!
//! The policy (Kata's): below the boot size the balloon shrinks the guest, above it virtio-mem
//! plugs hot-add memory, and the other device is released, so the two never pull against each
//! other. Going down across the boot size the balloon's new target is held back until
//! virtio-mem reports that the guest has unplugged down to its new requested size: a balloon
//! inflating while Linux unplugs makes Linux migrate balloon pages out of the blocks it is
//! emptying (measured in the nested test host: 32-298 s instead of 3 s).
//!
//! Units: sizes the client gives and the plan sets are MiB; what the devices report is bytes.

use api::rules::{self, Reach, RuleError};
use api::{ResizeMechanism, ResizeState, ResizeStatus};

/// The VM's fixed shape: what it was started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Boot memory, MiB.
    pub boot_mib: u64,
    /// Whether the VM has a balloon.
    pub has_balloon: bool,
    /// The hot-add region, when the VM has virtio-mem.
    pub hotplug: Option<Region>,
}

/// The hot-add region of virtio-mem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Size of the region, MiB.
    pub total_mib: u64,
    /// virtio-mem block size, MiB.
    pub block_mib: u64,
}

impl Shape {
    fn reach(&self) -> Reach {
        Reach {
            boot_mib: self.boot_mib,
            has_balloon: self.has_balloon,
            hotplug_mib: self.hotplug.map(|h| h.total_mib),
        }
    }
}

/// What the devices report now, in bytes (`None` for a device the VM does not have).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Devices {
    /// The balloon's state, if the VM has one.
    pub balloon: Option<BalloonNow>,
    /// virtio-mem's state, if the VM has it.
    pub virtio_mem: Option<VirtioMemNow>,
}

/// The balloon's state for a decision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonNow {
    /// The target the device gives the guest.
    pub target_bytes: u64,
    /// What the driver reports it holds.
    pub actual_bytes: u64,
}

/// virtio-mem's state for a decision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VirtioMemNow {
    /// What the device asks the guest to have plugged.
    pub requested_bytes: u64,
    /// What the guest has plugged.
    pub plugged_bytes: u64,
}

/// What the last resize asked for, kept between events. `Intent::default()` is "no resize".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Intent {
    /// The size the last resize asked for; `None` when there is none.
    pub desired_mib: Option<u64>,
    /// The resize crosses the boot size: both devices have work to do.
    pub crossing: bool,
    /// A balloon target held back until virtio-mem has unplugged down to its requested size.
    pub pending_balloon_mib: Option<u64>,
}

/// Something that changes what the devices should be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// `PUT /vm/resize {"desired_mib": N}`.
    Resize {
        /// The size asked for, MiB.
        desired_mib: u64,
    },
    /// virtio-mem's plugged size changed (the guest plugged or unplugged blocks).
    PluggedChanged,
    /// The user set a device directly (`PATCH /balloon`, `PATCH /hotplug/memory`): the resize
    /// in progress ends, and nothing it held back is applied later.
    DirectChange,
}

/// What to tell the devices (`None`: leave it), and the intent to keep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Plan {
    /// virtio-mem's new requested size, MiB.
    pub requested_mib: Option<u64>,
    /// The balloon's new target, MiB.
    pub balloon_mib: Option<u64>,
    /// What to remember for the next event.
    pub intent: Intent,
}

/// The decision. An `Err` (a size out of the VM's reach) changes nothing.
pub fn decide(
    shape: &Shape,
    now: &Devices,
    intent: Intent,
    event: Event,
) -> Result<Plan, RuleError> {
    match event {
        Event::Resize { desired_mib } => resize(shape, now, desired_mib),
        Event::PluggedChanged => Ok(plugged_changed(now, intent)),
        Event::DirectChange => Ok(Plan::default()),
    }
}

fn resize(shape: &Shape, now: &Devices, desired: u64) -> Result<Plan, RuleError> {
    rules::desired_mib(desired, Some(shape.reach()))?;
    let boot = shape.boot_mib;
    let plug_mib = shape.hotplug.map_or(0, |h| {
        desired.saturating_sub(boot).div_ceil(h.block_mib) * h.block_mib
    });
    let balloon_mib = boot.saturating_sub(desired);
    let plugged = now.virtio_mem.map_or(0, |m| m.plugged_bytes);
    let (target, ballooned) = now
        .balloon
        .map_or((0, 0), |b| (b.target_bytes, b.actual_bytes));
    // Raising the balloon while the guest still has more plugged than it is to keep would make
    // it inflate into the blocks being emptied: hold the raise back. Lowering it never competes.
    let hold = now.balloon.is_some() && balloon_mib << 20 > target && plugged > plug_mib << 20;
    Ok(Plan {
        requested_mib: shape.hotplug.map(|_| plug_mib),
        balloon_mib: (now.balloon.is_some() && !hold).then_some(balloon_mib),
        intent: Intent {
            desired_mib: Some(desired),
            // Both devices move: memory plugged now must go, or memory ballooned now must
            // come back (what the guest holds, not targets, so asking twice reads the same).
            crossing: (balloon_mib > 0 && plugged > 0) || (plug_mib > 0 && ballooned > 0),
            pending_balloon_mib: hold.then_some(balloon_mib),
        },
    })
}

fn plugged_changed(now: &Devices, intent: Intent) -> Plan {
    let unchanged = Plan {
        intent,
        ..Plan::default()
    };
    let Some(mib) = intent.pending_balloon_mib else {
        return unchanged;
    };
    let unplugged = now
        .virtio_mem
        .is_none_or(|m| m.plugged_bytes <= m.requested_bytes);
    if !unplugged {
        return unchanged;
    }
    Plan {
        requested_mib: None,
        balloon_mib: Some(mib),
        intent: Intent {
            pending_balloon_mib: None,
            ..intent
        },
    }
}

/// `GET /vm/resize`: progress toward the last resize. Memory the guest can use now is boot
/// memory less what the balloon holds plus what is plugged.
pub fn status(shape: &Shape, now: &Devices, intent: &Intent) -> ResizeStatus {
    let boot = shape.boot_mib;
    let ballooned = now.balloon.map_or(0, |b| b.actual_bytes >> 20);
    let plugged = now.virtio_mem.map_or(0, |m| m.plugged_bytes >> 20);
    let current = boot - ballooned.min(boot) + plugged;
    let Some(desired) = intent.desired_mib else {
        return ResizeStatus {
            desired_mib: current,
            current_mib: current,
            mechanism: ResizeMechanism::None,
            state: ResizeState::Idle,
        };
    };
    let mechanism = match desired.cmp(&boot) {
        _ if intent.crossing => ResizeMechanism::Both,
        std::cmp::Ordering::Less => ResizeMechanism::Balloon,
        std::cmp::Ordering::Greater => ResizeMechanism::VirtioMem,
        std::cmp::Ordering::Equal => ResizeMechanism::None,
    };
    // Reached when both devices report their targets; plugging rounds up to whole blocks.
    let balloon_done = now.balloon.is_none_or(|b| b.actual_bytes == b.target_bytes);
    let mem_done = now
        .virtio_mem
        .is_none_or(|m| m.plugged_bytes == m.requested_bytes);
    let reached = balloon_done && mem_done && intent.pending_balloon_mib.is_none();
    ResizeStatus {
        desired_mib: desired,
        current_mib: current,
        mechanism,
        state: if reached {
            ResizeState::Reached
        } else {
            ResizeState::InProgress
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    /// Devices and a guest that moves them, for the model: the guest moves `actual` toward
    /// `target` and `plugged` toward `requested` by whole MiB / blocks, a step at a time.
    #[derive(Debug, Clone, Copy)]
    struct Model {
        shape: Shape,
        now: Devices,
        intent: Intent,
    }

    impl Model {
        fn new(shape: Shape) -> Self {
            Self {
                shape,
                now: Devices {
                    balloon: shape.has_balloon.then(BalloonNow::default),
                    virtio_mem: shape.hotplug.map(|_| VirtioMemNow::default()),
                },
                intent: Intent::default(),
            }
        }

        fn apply(&mut self, plan: Plan) {
            if let (Some(mib), Some(m)) = (plan.requested_mib, self.now.virtio_mem.as_mut()) {
                m.requested_bytes = mib * MIB;
            }
            if let (Some(mib), Some(b)) = (plan.balloon_mib, self.now.balloon.as_mut()) {
                b.target_bytes = mib * MIB;
            }
            self.intent = plan.intent;
        }

        fn event(&mut self, event: Event) -> Result<Plan, RuleError> {
            let plan = decide(&self.shape, &self.now, self.intent, event)?;
            self.apply(plan);
            Ok(plan)
        }

        /// The guest moves the balloon `mib` MiB toward its target.
        fn balloon_step(&mut self, mib: u64) {
            if let Some(b) = self.now.balloon.as_mut() {
                let step = mib * MIB;
                b.actual_bytes = if b.actual_bytes < b.target_bytes {
                    (b.actual_bytes + step).min(b.target_bytes)
                } else {
                    b.actual_bytes.saturating_sub(step).max(b.target_bytes)
                };
            }
        }

        /// The guest plugs or unplugs `blocks` blocks toward the requested size, and virtio-mem
        /// reports the change.
        fn mem_step(&mut self, blocks: u64) {
            let (Some(m), Some(h)) = (self.now.virtio_mem.as_mut(), self.shape.hotplug) else {
                return;
            };
            let step = blocks * h.block_mib * MIB;
            let before = m.plugged_bytes;
            m.plugged_bytes = if m.plugged_bytes < m.requested_bytes {
                (m.plugged_bytes + step).min(m.requested_bytes)
            } else {
                m.plugged_bytes.saturating_sub(step).max(m.requested_bytes)
            };
            if m.plugged_bytes != before {
                self.event(Event::PluggedChanged).unwrap();
            }
        }

        /// The guest completes everything asked of it.
        fn settle(&mut self) {
            for _ in 0..4 {
                self.mem_step(u64::MAX / (4 << 40));
                self.balloon_step(u64::MAX / (4 << 40));
            }
        }

        fn inflating(&self) -> bool {
            self.now
                .balloon
                .is_some_and(|b| b.target_bytes > b.actual_bytes)
        }

        fn unplugging(&self) -> bool {
            self.now
                .virtio_mem
                .is_some_and(|m| m.plugged_bytes > m.requested_bytes)
        }

        /// Memory the targets give the guest, once the held-back target is applied.
        fn combined_target_mib(&self) -> u64 {
            let balloon = self
                .intent
                .pending_balloon_mib
                .or(self.now.balloon.map(|b| b.target_bytes / MIB))
                .unwrap_or(0);
            let requested = self.now.virtio_mem.map_or(0, |m| m.requested_bytes / MIB);
            self.shape.boot_mib - balloon + requested
        }
    }

    fn full() -> Shape {
        Shape {
            boot_mib: 1024,
            has_balloon: true,
            hotplug: Some(Region {
                total_mib: 2048,
                block_mib: 2,
            }),
        }
    }

    #[test]
    fn up_plugs_and_down_inflates_after_the_unplug() {
        let mut m = Model::new(full());
        m.event(Event::Resize { desired_mib: 2048 }).unwrap();
        assert_eq!(m.now.virtio_mem.unwrap().requested_bytes, 1024 * MIB);
        assert_eq!(m.now.balloon.unwrap().target_bytes, 0);
        let st = status(&m.shape, &m.now, &m.intent);
        assert_eq!(
            (st.mechanism, st.state),
            (ResizeMechanism::VirtioMem, ResizeState::InProgress)
        );
        m.settle();
        let st = status(&m.shape, &m.now, &m.intent);
        assert_eq!((st.current_mib, st.state), (2048, ResizeState::Reached));

        // Down across the boot size: unplug first, the balloon's 512 MiB held back.
        let plan = m.event(Event::Resize { desired_mib: 512 }).unwrap();
        assert_eq!(plan.requested_mib, Some(0));
        assert_eq!(plan.balloon_mib, None);
        assert_eq!(m.intent.pending_balloon_mib, Some(512));
        assert_eq!(
            status(&m.shape, &m.now, &m.intent).mechanism,
            ResizeMechanism::Both
        );
        m.mem_step(100);
        assert_eq!(
            m.now.balloon.unwrap().target_bytes,
            0,
            "held while unplugging"
        );
        m.mem_step(10_000);
        assert_eq!(
            m.now.balloon.unwrap().target_bytes,
            512 * MIB,
            "applied once unplugged"
        );
        m.settle();
        let st = status(&m.shape, &m.now, &m.intent);
        assert_eq!(
            (st.desired_mib, st.current_mib, st.state),
            (512, 512, ResizeState::Reached)
        );
    }

    #[test]
    fn out_of_reach_is_refused_with_the_rules_message_and_changes_nothing() {
        let m = Model::new(full());
        let e = decide(
            &m.shape,
            &m.now,
            m.intent,
            Event::Resize { desired_mib: 8192 },
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            rules::desired_mib(8192, Some(m.shape.reach()))
                .unwrap_err()
                .to_string()
        );
        let bare = Shape {
            boot_mib: 512,
            has_balloon: false,
            hotplug: None,
        };
        assert!(decide(
            &bare,
            &Devices::default(),
            Intent::default(),
            Event::Resize { desired_mib: 256 }
        )
        .is_err());
        let plan = decide(
            &bare,
            &Devices::default(),
            Intent::default(),
            Event::Resize { desired_mib: 512 },
        )
        .unwrap();
        assert_eq!((plan.requested_mib, plan.balloon_mib), (None, None));
    }

    #[test]
    fn a_direct_change_cancels_the_held_back_target() {
        let mut m = Model::new(full());
        m.event(Event::Resize { desired_mib: 2048 }).unwrap();
        m.settle();
        m.event(Event::Resize { desired_mib: 512 }).unwrap();
        assert!(m.intent.pending_balloon_mib.is_some());
        m.event(Event::DirectChange).unwrap();
        m.settle();
        assert_eq!(
            m.now.balloon.unwrap().target_bytes,
            0,
            "nothing applied after a cancel"
        );
        assert_eq!(status(&m.shape, &m.now, &m.intent).state, ResizeState::Idle);
    }

    fn shapes() -> impl Strategy<Value = Shape> {
        (
            16u64..4096,
            any::<bool>(),
            prop::option::of((1u64..16, 1u32..9)),
        )
            .prop_map(|(boot, has_balloon, hot)| Shape {
                boot_mib: boot,
                has_balloon,
                // Whole Linux memory blocks and whole virtio-mem blocks, as the rules demand.
                hotplug: hot.map(|(blocks, shift)| Region {
                    total_mib: blocks * 128u64.max(1 << shift),
                    block_mib: 1 << shift,
                }),
            })
    }

    #[derive(Debug, Clone)]
    enum Op {
        Resize(u64),
        Balloon(u64),
        Mem(u64),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                (0u64..8192).prop_map(Op::Resize),
                (1u64..600).prop_map(Op::Balloon),
                (1u64..300).prop_map(Op::Mem),
            ],
            1..40,
        )
    }

    proptest! {
        /// Driven by resizes and a guest that follows at any pace: the balloon never inflates
        /// while virtio-mem unplugs, the two devices are never both asked to give (or take)
        /// memory the other way, and once the guest has done its part the guest is the size
        /// asked for (rounded up to a block above the boot size).
        #[test]
        fn resizes_never_pull_against_each_other(shape in shapes(), ops in ops()) {
            let mut m = Model::new(shape);
            for op in ops {
                match op {
                    Op::Resize(d) => {
                        let reach = shape.reach();
                        let before = m;
                        match m.event(Event::Resize { desired_mib: d }) {
                            Err(_) => {
                                prop_assert!(d < reach.min_mib() || d > reach.max_mib());
                                prop_assert_eq!(m.now, before.now);
                                prop_assert_eq!(m.intent, before.intent);
                                continue;
                            }
                            Ok(_) => {
                                let want = match shape.hotplug {
                                    Some(h) if d > shape.boot_mib => {
                                        shape.boot_mib
                                            + (d - shape.boot_mib).div_ceil(h.block_mib) * h.block_mib
                                    }
                                    _ => d,
                                };
                                prop_assert_eq!(m.combined_target_mib(), want);
                                let b = m.now.balloon.map_or(0, |b| b.target_bytes);
                                let r = m.now.virtio_mem.map_or(0, |v| v.requested_bytes);
                                prop_assert!(b == 0 || r == 0, "balloon {} and virtio-mem {} both set", b, r);
                            }
                        }
                    }
                    Op::Balloon(n) => m.balloon_step(n),
                    Op::Mem(n) => m.mem_step(n),
                }
                prop_assert!(!(m.inflating() && m.unplugging()), "inflating while unplugging: {:?}", m);
            }
            let target = m.combined_target_mib();
            m.settle();
            let st = status(&m.shape, &m.now, &m.intent);
            if m.intent.desired_mib.is_some() {
                prop_assert_eq!(st.state, ResizeState::Reached);
                prop_assert_eq!(st.current_mib, target);
            } else {
                prop_assert_eq!(st.state, ResizeState::Idle);
            }
        }

        /// The same request twice asks the devices for the same thing; a larger request never
        /// gives the guest less.
        #[test]
        fn idempotent_and_monotone(shape in shapes(), warmup in ops(), a in 0u64..8192, b in 0u64..8192) {
            let mut m = Model::new(shape);
            for op in warmup {
                match op {
                    Op::Resize(d) => { let _ = m.event(Event::Resize { desired_mib: d }); }
                    Op::Balloon(n) => m.balloon_step(n),
                    Op::Mem(n) => m.mem_step(n),
                }
            }
            let (lo, hi) = (a.min(b), a.max(b));
            let mut once = m;
            if once.event(Event::Resize { desired_mib: lo }).is_ok() {
                let mut twice = once;
                twice.event(Event::Resize { desired_mib: lo }).unwrap();
                prop_assert_eq!(twice.now, once.now);
                prop_assert_eq!(twice.intent, once.intent);
                let mut bigger = m;
                if bigger.event(Event::Resize { desired_mib: hi }).is_ok() {
                    prop_assert!(bigger.combined_target_mib() >= once.combined_target_mib());
                }
            }
        }
    }
}
