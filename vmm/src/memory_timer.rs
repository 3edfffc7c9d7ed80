//! The memory manager's timer on the VMM's event loop: when one of the manager's wake-up fds
//! (a timerfd, and an eventfd for work due at once) is readable,
//! `MemoryManager::tick` releases deferred discards and compacts the tracker as its schedule
//! says (memory/src/manager/schedule.rs). The manager arms them itself; this only watches
//! them, so nothing in the devices knows when host memory is released.

use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{error, warn};
use memory::{DiscardPolicy, MemoryManager};

/// Event-loop subscriber for the manager's timerfd.
pub struct MemoryTimer {
    manager: Arc<Mutex<MemoryManager>>,
    /// Failed ticks since the last one logged (a failing release retries every second).
    suppressed: u64,
}

impl MemoryTimer {
    pub fn new(manager: Arc<Mutex<MemoryManager>>) -> Self {
        Self {
            manager,
            suppressed: 0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryManager> {
        self.manager.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl MutEventSubscriber for MemoryTimer {
    fn init(&mut self, ops: &mut EventOps) {
        let fds = self.lock().wake_fds();
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                // Without its wake-ups nothing would release deferred discards: release inline.
                warn!("memory: cannot watch the discard timer: {e:?}; releasing before each ack");
                if let Err(e) = self.lock().set_discard_policy(DiscardPolicy::Immediate) {
                    error!("memory: releasing the discard queue: {e}");
                }
                return;
            }
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let res = self.lock().tick();
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

    /// A full batch of deferred discards makes the manager's timer fire on the event loop's
    /// next turn, and the subscriber's tick releases it.
    #[test]
    fn a_full_batch_is_released_on_the_next_event_loop_turn() {
        let spec = RegionSpec {
            guest_addr: 0,
            size: 32 << 20,
            backing: Backing::PrivateAnonymous,
            kind: RegionKind::BootRam,
        };
        let mut mm = MemoryManager::new(&[spec], Box::new(NoSlots)).unwrap();
        mm.set_discard_policy(DiscardPolicy::Deferred).unwrap();
        let mm = Arc::new(Mutex::new(mm));
        let mut em: EventManager<Arc<Mutex<MemoryTimer>>> = EventManager::new().unwrap();
        em.add_subscriber(Arc::new(Mutex::new(MemoryTimer::new(mm.clone()))));
        {
            let mut m = mm.lock().unwrap();
            let batch = m.page_ranges(&[PageRange::new(0, memory::RELEASE_BATCH_PAGES)]);
            m.offline(&batch).unwrap();
            assert!(m.queued_discards() > 0);
        }
        // Due at once: the next turn (bounded wait) runs the tick.
        for _ in 0..100 {
            em.run_with_timeout(50).unwrap();
            if mm.lock().unwrap().queued_discards() == 0 {
                break;
            }
        }
        let s = mm.lock().unwrap().stats();
        assert_eq!(s.released_pages, memory::RELEASE_BATCH_PAGES);
        assert_eq!(s.pending_discard_bytes, 0);
    }
}
