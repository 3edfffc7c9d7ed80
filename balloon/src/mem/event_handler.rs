//! virtio-mem on the VMM's event loop: the activation event, then the request queue's eventfd.

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::error;

use super::device::VirtioMem;

const TOKEN_ACTIVATE: u32 = 0;
const TOKEN_QUEUE: u32 = 16;

impl VirtioMem {
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        let current = self
            .active
            .as_mut()
            .map(|a| (&mut a.registered, [(&a.notify, TOKEN_QUEUE)]));
        virtio::sync_queue_events(ops, "virtio-mem", &mut self.stale_fds, current);
    }
}

impl MutEventSubscriber for VirtioMem {
    fn init(&mut self, ops: &mut EventOps) {
        self.activation_evt.watch(ops, TOKEN_ACTIVATE, "virtio-mem");
        self.sync_registrations(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_ACTIVATE => {
                self.activation_evt.consume();
                self.sync_registrations(ops);
                self.process_queue();
            }
            TOKEN_QUEUE => {
                let consumed = self.active.as_ref().map(|a| {
                    let _ = a.notify.read();
                });
                if consumed.is_some() {
                    self.process_queue();
                } else {
                    self.sync_registrations(ops);
                }
            }
            other => error!("virtio-mem: unexpected event data {other}"),
        }
    }
}
