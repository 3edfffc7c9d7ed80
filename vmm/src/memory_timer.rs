//! The memory manager's wake-ups on the VMM's event loop. `MemoryManager::tick` releases
//! deferred discards and compacts the tracker as its schedule says
//! (memory/src/manager/schedule.rs); it runs here in two cases:
//! - the manager's timerfd fired (a deadline ahead: an idle queue, compaction when quiet);
//! - after every turn of the event loop, [`MemoryTimer::after_turn`] finds work due now (an
//!   inflate filled a release batch). Asking costs a lock and a clock read; signalling it from
//!   the inflate itself would put a system call on the guest's ack path.
//!
//! The manager arms its timer itself; nothing in the devices knows when host memory is
//! released.

use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{error, warn};
use memory::MemoryManager;

/// Event-loop subscriber for the manager's timerfd, and the after-turn check.
pub struct MemoryTimer {
    manager: Arc<Mutex<MemoryManager>>,
    /// The timerfd could not be watched: every turn releases whatever is queued.
    unwatched: bool,
    /// Failed ticks since the last one logged (a failing release retries every second).
    suppressed: u64,
}

impl MemoryTimer {
    /// A timer for `manager`, registered with the event loop by the subscriber's `init`.
    pub fn new(manager: Arc<Mutex<MemoryManager>>) -> Self {
        Self {
            manager,
            unwatched: false,
            suppressed: 0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryManager> {
        self.manager.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by the VMM after every turn of its event loop (after the devices' acks): runs the
    /// manager's tick if something is due now.
    pub fn after_turn(&mut self) {
        let res = {
            let mut m = self.lock();
            if self.unwatched && m.queued_discards() > 0 {
                // Without the timer an idle queue would wait for the next event: release now
                // (still after the acks this turn sent).
                m.flush_discards().map(|_| ())
            } else if m.tick_due() {
                m.tick().map(|_| ())
            } else {
                Ok(())
            }
        };
        self.note(res);
    }

    fn note(&mut self, res: Result<(), memory::Error>) {
        if let Err(e) = res {
            // Logged once, then once per 60 failures (the manager retries a failed release
            // every second and counts it in `release_errors`).
            if self.suppressed.is_multiple_of(60) {
                error!(
                    "memory: releasing deferred discards failed: {e} ({} similar suppressed)",
                    self.suppressed
                );
            }
            self.suppressed += 1;
        }
    }
}

impl MutEventSubscriber for MemoryTimer {
    fn init(&mut self, ops: &mut EventOps) {
        let fd = self.lock().wake_fd();
        if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
            warn!("memory: cannot watch the discard timer: {e:?}; releasing after every turn");
            self.unwatched = true;
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let res = self.lock().tick().map(|_| ());
        self.note(res);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::{EventManager, SubscriberOps};
    use memory::{Backing, PageRange, RegionKind, RegionSpec};

    struct NoSlots;
    impl memory::SlotMapper for NoSlots {
        unsafe fn map(&mut self, _: u32, _: u64, _: u64, _: *mut u8) -> Result<(), String> {
            Ok(())
        }
        fn unmap(&mut self, _: u32, _: u64, _: u64) -> Result<(), String> {
            Ok(())
        }
    }

    fn manager() -> Arc<Mutex<MemoryManager>> {
        let spec = RegionSpec {
            guest_addr: 0,
            size: 32 << 20,
            backing: Backing::PrivateAnonymous,
            kind: RegionKind::BootRam,
        };
        Arc::new(Mutex::new(
            MemoryManager::new(&[spec], Box::new(NoSlots)).unwrap(),
        ))
    }

    /// A full batch of deferred discards is released right after the turn that queued it,
    /// by the after-turn check.
    #[test]
    fn a_full_batch_is_released_after_the_turn_that_filled_it() {
        let mm = manager();
        let mut timer = MemoryTimer::new(mm.clone());
        {
            let mut m = mm.lock().unwrap();
            let batch = m.page_ranges(&[PageRange::new(0, memory::RELEASE_BATCH_PAGES)]);
            m.offline(&batch).unwrap();
            assert!(m.queued_discards() > 0);
            assert!(m.tick_due(), "a full batch is due at once");
        }
        timer.after_turn();
        let s = mm.lock().unwrap().stats();
        assert_eq!(s.released_pages, memory::RELEASE_BATCH_PAGES);
        assert_eq!(s.pending_discard_bytes, 0);
    }

    /// A small queue is released by the manager's timer on the event loop, once the queue has
    /// been idle for the release delay.
    #[test]
    fn an_idle_queue_is_released_by_the_timer() {
        let mm = manager();
        let mut em: EventManager<Arc<Mutex<MemoryTimer>>> = EventManager::new().unwrap();
        em.add_subscriber(Arc::new(Mutex::new(MemoryTimer::new(mm.clone()))));
        {
            let mut m = mm.lock().unwrap();
            let pages = m.page_ranges(&[PageRange::new(0, 256)]);
            m.offline(&pages).unwrap();
            assert!(!m.tick_due(), "not due before the idle delay");
        }
        // The timer fires RELEASE_IDLE_DELAY (2 ms) later; bounded wait.
        for _ in 0..100 {
            em.run_with_timeout(50).unwrap();
            if mm.lock().unwrap().queued_discards() == 0 {
                break;
            }
        }
        assert_eq!(mm.lock().unwrap().stats().released_pages, 256);
    }
}
