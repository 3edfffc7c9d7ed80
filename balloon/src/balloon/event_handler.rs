//! The balloon on the VMM's event loop.
//!
//! `init` registers the activation event and the stats timer. `activate` (on a vCPU thread)
//! triggers the activation event; its handler here adds the queue eventfds (and removes those
//! of a previous activation). Queue eventfds carry `QUEUE_BASE + index` as their data.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::error;

use super::device::Balloon;

pub(crate) const TOKEN_ACTIVATE: u32 = 0;
pub(crate) const TOKEN_STATS_TIMER: u32 = 1;
pub(crate) const TOKEN_QUEUE_BASE: u32 = 16;

impl Balloon {
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        let current = self.active.as_mut().map(|a| {
            let queues = a
                .queues
                .iter()
                .map(|q| (&q.notify, TOKEN_QUEUE_BASE + q.index as u32));
            (&mut a.registered, queues)
        });
        virtio::sync_queue_events(ops, "virtio-balloon", &mut self.stale_fds, current);
    }
}

impl MutEventSubscriber for Balloon {
    fn init(&mut self, ops: &mut EventOps) {
        self.activation_evt
            .watch(ops, TOKEN_ACTIVATE, "virtio-balloon");
        let timer = Events::with_data(&self.stats_timer, TOKEN_STATS_TIMER, EventSet::IN);
        if let Err(e) = ops.add(timer) {
            error!("virtio-balloon: cannot watch the stats timer: {e:?}");
        }
        // Activation may have happened before registration.
        self.sync_registrations(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => {
                self.activation_evt.consume();
                self.sync_registrations(ops);
                self.process_all_queues();
            }
            TOKEN_STATS_TIMER => {
                // Non-blocking: a disarmed timer just reads EAGAIN.
                let _ = self.stats_timer.wait();
                self.request_stats();
            }
            token if token >= TOKEN_QUEUE_BASE => {
                let index = (token - TOKEN_QUEUE_BASE) as usize;
                let known = self
                    .active
                    .as_ref()
                    .and_then(|a| a.queues.iter().find(|q| q.index == index))
                    .map(|q| {
                        let _ = q.notify.read();
                    })
                    .is_some();
                if known {
                    self.process_queue(index);
                } else {
                    // An eventfd of a reset device: drop it from the loop.
                    self.sync_registrations(ops);
                }
            }
            other => error!("virtio-balloon: unexpected event data {other}"),
        }
    }
}
