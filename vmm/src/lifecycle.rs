//! The process's lifecycle: exit signals in every state, and one way out that cleans up.
//!
//! SIGTERM, SIGINT and SIGHUP are blocked in every thread (before any thread is spawned) and read
//! by one thread, `vmm-signals`, from a signalfd, so no signal handler runs and no signal waits
//! unread. What a signal does depends on the [`Phase`]:
//! - `Configuring` (waiting for the API, building or starting the VM, after a failed start):
//!   exit at once with 128+N; nothing is started after it;
//! - `Running`: ask the event loop to stop the VM; the VMM then exits with 128+N;
//! - `Stopping` (the VM is stopping or the process shuts down), or a second signal: exit at once.
//!
//! Every exit the process controls goes through [`Process::exit`], which removes the API socket
//! (if it is still the one this process created) and restores the terminal.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use log::{info, warn};
use vmm_sys_util::terminal::Terminal;

use crate::devices::power::{ExitHandle, ExitReason};

/// The signals that stop the VMM cleanly. SIGHUP too: a closed terminal must not leave the
/// socket behind.
const EXIT_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Exit status for a command line (or `--config` file) that was refused before anything started
/// (`EX_USAGE` of sysexits.h). 1 stays for failures while running, 2 for a guest reset.
pub const EXIT_USAGE: i32 = 64;

/// What a signal does now.
enum Phase {
    /// No VM runs yet (or a start failed): a signal ends the process at once.
    Configuring,
    /// The VM runs: a signal asks its event loop to stop it.
    Running(Arc<ExitHandle>),
    /// The VM stops or the process shuts down: a signal ends the process at once.
    Stopping,
}

/// What [`Process::exit`] undoes.
#[derive(Default)]
struct Cleanup {
    socket: Option<api::SocketFile>,
    raw_terminal: bool,
}

struct Inner {
    phase: Mutex<Phase>,
    /// Held from the first exit on, so a second thread exiting at the same time waits for the
    /// first (libc's `exit` must not run twice at once).
    cleanup: Mutex<Cleanup>,
    /// The exit signals' signalfd until the signal thread takes it.
    signalfd: Mutex<Option<OwnedFd>>,
}

/// The process-wide state the signal thread and the main thread share. Cheap to clone.
#[derive(Clone)]
pub struct Process {
    inner: Arc<Inner>,
}

impl Process {
    /// Blocks the exit signals in this thread and every thread spawned after it, and starts the
    /// thread that reads them. Call it before any other thread exists.
    pub fn start() -> std::io::Result<Self> {
        let process = Self::new()?;
        process.spawn_signal_thread()?;
        Ok(process)
    }

    /// Blocks the exit signals in this thread and every thread spawned after it, without
    /// starting the thread that reads them yet ([`Process::spawn_signal_thread`]): a signal
    /// that arrives meanwhile waits, and is acted on as soon as that thread runs. Call it before
    /// any other thread exists.
    pub fn new() -> std::io::Result<Self> {
        let fd = block_exit_signals()?;
        Ok(Self {
            inner: Arc::new(Inner {
                phase: Mutex::new(Phase::Configuring),
                cleanup: Mutex::new(Cleanup::default()),
                signalfd: Mutex::new(Some(fd)),
            }),
        })
    }

    /// Starts the signal thread (`vmm-signals`); it installs its seccomp filter before it reads
    /// the first signal. Once only: later calls do nothing.
    pub fn spawn_signal_thread(&self) -> std::io::Result<()> {
        let Some(fd) = self
            .inner
            .signalfd
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return Ok(());
        };
        let p = self.clone();
        std::thread::Builder::new()
            .name("vmm-signals".into())
            .spawn(move || {
                if let Err(e) = crate::seccomp::enter(crate::seccomp::ThreadKind::Signals) {
                    p.fail(&e.to_string());
                }
                p.watch_signals(fd)
            })?;
        Ok(())
    }

    /// The API socket to remove on exit.
    pub fn remove_on_exit(&self, socket: api::SocketFile) {
        self.cleanup().socket = Some(socket);
    }

    /// Whether stdin was put in raw mode (restored on exit).
    pub fn set_raw_terminal(&self, raw: bool) {
        self.cleanup().raw_terminal = raw;
    }

    /// The VM runs: from now on a signal stops it through its event loop.
    pub fn running(&self, exit: Arc<ExitHandle>) {
        *self.phase() = Phase::Running(exit);
    }

    /// The VM stopped (or is stopping): from now on a signal ends the process at once.
    pub fn stopping(&self) {
        *self.phase() = Phase::Stopping;
    }

    /// Removes the API socket, restores the terminal and exits with `code`.
    pub fn exit(&self, code: i32) -> ! {
        let mut cleanup = self.cleanup();
        if let Some(socket) = cleanup.socket.take() {
            socket.remove();
        }
        if std::mem::take(&mut cleanup.raw_terminal) {
            let _ = std::io::stdin().lock().set_canon_mode();
        }
        // The guard stays held: another thread exiting now blocks here until the process is gone.
        std::process::exit(code)
    }

    /// Prints `vmm: error: msg` and exits with 1.
    pub fn fail(&self, msg: &str) -> ! {
        eprintln!("vmm: error: {msg}");
        self.exit(1)
    }

    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.inner.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cleanup(&self) -> std::sync::MutexGuard<'_, Cleanup> {
        self.inner.cleanup.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The signal thread: reads the signalfd for good and acts on each signal by phase.
    fn watch_signals(self, fd: OwnedFd) {
        loop {
            let sig = match read_signal(&fd) {
                Ok(sig) => sig,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Cannot happen with a valid signalfd; do not spin on it.
                    log::error!("cannot read exit signals any more: {e}");
                    return;
                }
            };
            let name = signal_name(sig);
            let mut phase = self.phase();
            match &*phase {
                Phase::Running(exit) if exit.reason().is_none() => {
                    info!("{name} received: stopping the VM");
                    exit.request(ExitReason::Signal(sig));
                    *phase = Phase::Stopping;
                }
                Phase::Configuring => {
                    drop(phase);
                    info!("{name} received before the VM ran: exiting");
                    self.exit(128 + sig);
                }
                Phase::Running(_) | Phase::Stopping => {
                    drop(phase);
                    warn!("{name} received while stopping: exiting now");
                    self.exit(128 + sig);
                }
            }
        }
    }
}

/// Blocks the exit signals in this thread (and so in every thread spawned after) and returns a
/// blocking signalfd that reports them.
fn block_exit_signals() -> std::io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data initialised by sigemptyset before use; the calls only read
    // and write that local set and the thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in EXIT_SIGNALS {
            libc::sigaddset(&mut set, sig);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Waits for one signal on a blocking signalfd and returns its number.
fn read_signal(fd: &OwnedFd) -> std::io::Result<i32> {
    let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
    // SAFETY: reading into a local buffer of exactly the size the kernel writes per signal.
    let n = unsafe { libc::read(fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
    if n != info.len() as isize {
        return Err(std::io::Error::last_os_error());
    }
    // ssi_signo is the first field.
    Ok(u32::from_ne_bytes([info[0], info[1], info[2], info[3]]) as i32)
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGHUP => "SIGHUP".into(),
        n => format!("signal {n}"),
    }
}
