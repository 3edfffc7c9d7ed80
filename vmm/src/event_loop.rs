//! The VMM thread's own event sources: the exit request from vCPUs and devices, SIGTERM/SIGINT
//! (through a signalfd, so they are handled in the loop rather than in a signal handler), and
//! console input from stdin into the guest's serial port.

use std::collections::VecDeque;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::{info, warn};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use crate::devices::power::{ExitHandle, ExitReason};
use crate::devices::serial::SerialConsole;

const STDIN: RawFd = 0;

/// Block SIGTERM and SIGINT in this thread (and every thread spawned after) and return a
/// signalfd that reports them.
pub fn block_exit_signals() -> std::io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data initialised by sigemptyset before use; the calls only read
    // and write that local set and the thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Read one pending signal number from a signalfd.
fn read_signal(fd: &OwnedFd) -> Option<i32> {
    let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
    // SAFETY: reading into a local buffer of exactly the size the kernel writes per signal.
    let n = unsafe { libc::read(fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
    (n == info.len() as isize)
        .then(|| u32::from_ne_bytes([info[0], info[1], info[2], info[3]]) as i32)
}

/// Event-loop subscriber for exit, signals and console input.
pub struct Control {
    exit: Arc<ExitHandle>,
    serial: Arc<Mutex<SerialConsole>>,
    signals: Option<OwnedFd>,
    pending_input: VecDeque<u8>,
    /// Retries input when the guest's receive FIFO was full.
    retry: TimerFd,
    stdin_registered: bool,
}

impl Control {
    pub fn new(
        exit: Arc<ExitHandle>,
        serial: Arc<Mutex<SerialConsole>>,
        signals: Option<OwnedFd>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            exit,
            serial,
            signals,
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
        if let Some(fd) = &self.signals {
            if let Err(e) = ops.add(Events::new_raw(fd.as_raw_fd(), EventSet::IN)) {
                warn!("cannot watch signals: {e:?}");
            }
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
        } else if Some(fd) == self.signals.as_ref().map(|s| s.as_raw_fd()) {
            if let Some(sig) = self.signals.as_ref().and_then(read_signal) {
                info!("signal {sig} received: stopping the VM");
                self.exit.request(ExitReason::Signal(sig));
            }
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
