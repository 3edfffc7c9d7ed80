//! virtio-mem on the VMM's event loop: the activation event, then the request queue's eventfd.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::error;

use super::device::VirtioMem;

const TOKEN_ACTIVATE: u32 = 0;
const TOKEN_QUEUE: u32 = 16;

impl VirtioMem {
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        for fd in self.stale_fds.drain(..) {
            let _ = ops.remove(Events::empty(&fd));
        }
        if let Some(a) = self.active.as_mut() {
            if !a.registered {
                if let Err(e) = ops.add(Events::with_data(&a.notify, TOKEN_QUEUE, EventSet::IN)) {
                    error!("virtio-mem: cannot watch the request queue: {e:?}");
                }
                a.registered = true;
            }
        }
    }
}

impl MutEventSubscriber for VirtioMem {
    fn init(&mut self, ops: &mut EventOps) {
        let ev = Events::with_data(self.activation_evt.fd(), TOKEN_ACTIVATE, EventSet::IN);
        if let Err(e) = ops.add(ev) {
            error!("virtio-mem: cannot watch the activation event: {e:?}");
        }
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
