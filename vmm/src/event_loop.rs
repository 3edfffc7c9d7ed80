//! The VMM thread's own event sources: the exit request from vCPUs, devices and the signal
//! thread (`lifecycle`), and console input from stdin into the guest's serial port.

use std::collections::VecDeque;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::warn;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use crate::devices::power::ExitHandle;
use crate::devices::serial::SerialConsole;

const STDIN: RawFd = 0;

/// Event-loop subscriber for exit requests and console input.
pub struct Control {
    exit: Arc<ExitHandle>,
    serial: Arc<Mutex<SerialConsole>>,
    pending_input: VecDeque<u8>,
    /// Retries input when the guest's receive FIFO was full.
    retry: TimerFd,
    stdin_registered: bool,
}

impl Control {
    /// The event loop's control subscriber: exit requests from `exit`, console input to
    /// `serial`.
    pub fn new(exit: Arc<ExitHandle>, serial: Arc<Mutex<SerialConsole>>) -> std::io::Result<Self> {
        Ok(Self {
            exit,
            serial,
            pending_input: VecDeque::new(),
            retry: TimerFd::new()?,
            stdin_registered: false,
        })
    }

    fn push_input(&mut self) {
        let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        while !self.pending_input.is_empty() {
            let (a, _) = self.pending_input.as_slices();
            let n = serial.enqueue_input(a);
            if n == 0 {
                break;
            }
            self.pending_input.drain(..n);
        }
    }

    fn on_stdin(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; 256];
        // SAFETY: fd 0 stays open for the process's lifetime; ManuallyDrop keeps us from closing it.
        let mut stdin = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(STDIN) });
        match stdin.read(&mut buf) {
            Ok(0) | Err(_) => {
                // EOF or error: stop watching stdin; the guest keeps running.
                let _ = ops.remove(Events::new_raw(STDIN, EventSet::IN));
                self.stdin_registered = false;
            }
            Ok(n) => {
                self.pending_input.extend(&buf[..n]);
                self.push_input();
                if !self.pending_input.is_empty() {
                    // Guest FIFO full: stop reading stdin until it drains.
                    let _ = ops.remove(Events::new_raw(STDIN, EventSet::IN));
                    self.stdin_registered = false;
                    let _ = self.retry.reset(std::time::Duration::from_millis(5), None);
                }
            }
        }
    }
}

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.exit.eventfd(), EventSet::IN)) {
            warn!("cannot watch exit requests: {e:?}");
        }
        if let Err(e) = ops.add(Events::new(&self.retry, EventSet::IN)) {
            warn!("cannot watch the input retry timer: {e:?}");
        }
        // stdin may be /dev/null or a regular file, which epoll refuses: then no console input.
        self.stdin_registered = ops.add(Events::new_raw(STDIN, EventSet::IN)).is_ok();
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.exit.eventfd().as_raw_fd() {
            let _ = self.exit.eventfd().read();
        } else if fd == self.retry.as_raw_fd() {
            let _ = self.retry.wait();
            self.push_input();
            if self.pending_input.is_empty() {
                if !self.stdin_registered {
                    self.stdin_registered = ops.add(Events::new_raw(STDIN, EventSet::IN)).is_ok();
                }
            } else {
                let _ = self.retry.reset(std::time::Duration::from_millis(5), None);
            }
        } else if fd == STDIN {
            if events.event_set().contains(EventSet::HANG_UP)
                && !events.event_set().contains(EventSet::IN)
            {
                let _ = ops.remove(Events::new_raw(STDIN, EventSet::IN));
                self.stdin_registered = false;
                return;
            }
            self.on_stdin(ops);
        }
    }
}
