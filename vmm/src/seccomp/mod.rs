//! Seccomp filters, one per kind of thread, and what happens when a thread breaks its filter.
//!
//! Each thread installs its own filter (no TSYNC) before it handles guest or client input:
//! - `vcpu`: each vCPU thread, before its first `KVM_RUN` ([`crate::vcpu`]);
//! - `vmm`: the main thread once the VM is built, before the event loop's first turn
//!   ([`crate::vm::Vm::run_until_exit`]);
//! - `api`: the API server's thread, before it accepts a connection (`api::spawn_server`'s
//!   thread hook);
//! - `signals`: the signal thread, before it reads its first signal ([`crate::lifecycle`]).
//!
//! A call outside the filter raises SIGSYS (`SECCOMP_RET_TRAP`). The handler here writes one line
//! naming the thread and the system call, then, by [`SeccompMode`]:
//! - `on` (the default): ends the process with [`EXIT_SECCOMP`];
//! - `log`: lets the call fail with `ENOSYS` and the thread go on (for finding a missing call).
//!
//! Nothing is installed unless the binary calls [`configure`]: the in-process test paths
//! (`vmm::testing`, the api crate's tests) run unfiltered.
//!
//! The allowed calls and why each is needed are listed in `filters.rs` and in docs/security.md.

mod filters;
mod names;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

pub use filters::rules;

/// Exit status after a system call outside the calling thread's filter (`on` mode). Distinct
/// from 0 (power off), 1 (error), 2 (reset), 64 (usage) and 128+N (signal N).
pub const EXIT_SECCOMP: i32 = 70;

/// The environment variable that makes one kind of thread make a forbidden system call right
/// after its filter is installed: for the tests only (`vcpu`, `vmm`, `api` or `signals`).
pub const SELFTEST_ENV: &str = "VMM_SECCOMP_SELFTEST";

/// The system call the self-test makes: one no thread may make (a network socket).
const SELFTEST_SYSCALL: libc::c_long = libc::SYS_socket;

/// What `--seccomp` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SeccompMode {
    /// Filters installed; a forbidden call ends the process (exit status 70).
    #[default]
    On,
    /// Filters installed; a forbidden call is logged to stderr and fails with ENOSYS.
    Log,
    /// No filters (debugging only).
    Off,
}

/// The kinds of thread, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// A vCPU thread: `KVM_RUN` and the port I/O and MMIO exits it serves.
    Vcpu,
    /// The main thread once the VM runs: the event loop (devices, API requests, memory).
    Vmm,
    /// The API server's thread: HTTP on the Unix socket (and TCP if asked).
    Api,
    /// The signal thread: reads the exit signals and ends the process or asks the VM to stop.
    Signals,
}

impl ThreadKind {
    /// Every kind, in the order the docs list them.
    pub const ALL: [ThreadKind; 4] = [Self::Vcpu, Self::Vmm, Self::Api, Self::Signals];

    /// The kind's name, as in messages and [`SELFTEST_ENV`].
    pub fn name(self) -> &'static str {
        match self {
            Self::Vcpu => "vcpu",
            Self::Vmm => "vmm",
            Self::Api => "api",
            Self::Signals => "signals",
        }
    }
}

/// Why the filters could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A filter did not compile (a bug in the rules).
    #[error("the {kind} seccomp filter does not compile: {detail}")]
    Compile {
        /// The thread kind.
        kind: &'static str,
        /// seccompiler's error.
        detail: String,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    /// The kernel refused the filter.
    #[error(
        "cannot install the {kind} seccomp filter: {detail} (is seccomp enabled in this kernel?)"
    )]
    Install {
        /// The thread kind.
        kind: &'static str,
        /// seccompiler's error.
        detail: String,
    },
    /// [`configure`] was called twice.
    #[error("seccomp filters configured twice")]
    Twice,
}

/// The compiled filters, and which kind of thread should run the self-test.
struct Filters {
    programs: BTreeMap<ThreadKind, BpfProgram>,
    selftest: Option<ThreadKind>,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

const MODE_OFF: u8 = 0;
const MODE_ON: u8 = 1;
const MODE_LOG: u8 = 2;
/// What the SIGSYS handler does (read in the handler: an atomic, nothing else).
static MODE: AtomicU8 = AtomicU8::new(MODE_OFF);

thread_local! {
    /// The thread's kind and name for the violation message, set when its filter is installed.
    /// Const-initialised plain data: reading it in the signal handler allocates nothing.
    static LABEL: Cell<Label> = const { Cell::new(Label::EMPTY) };
}

#[derive(Clone, Copy)]
struct Label {
    kind: &'static str,
    name: [u8; 16],
    name_len: usize,
}

impl Label {
    const EMPTY: Label = Label {
        kind: "unfiltered",
        name: [0; 16],
        name_len: 0,
    };
}

/// Builds every thread kind's filter and installs the SIGSYS handler, for `mode`. Call once, in
/// the main thread, before any filtered thread starts; with [`SeccompMode::Off`] it only warns
/// (loudly) and [`enter`] does nothing.
pub fn configure(mode: SeccompMode) -> Result<(), SeccompError> {
    if mode == SeccompMode::Off {
        log::warn!(
            "SECCOMP FILTERS ARE OFF (--seccomp=off): every thread may make any system call; \
             a guest that exploits a VMM bug gets everything this process may do"
        );
        eprintln!("vmm: warning: seccomp filters are off (--seccomp=off): for debugging only");
        return Ok(());
    }
    let selftest = std::env::var(SELFTEST_ENV)
        .ok()
        .and_then(|v| ThreadKind::ALL.into_iter().find(|k| k.name() == v));
    let mut programs = BTreeMap::new();
    for kind in ThreadKind::ALL {
        programs.insert(kind, compile(kind)?);
    }
    install_sigsys_handler().map_err(SeccompError::Handler)?;
    MODE.store(
        if mode == SeccompMode::Log {
            MODE_LOG
        } else {
            MODE_ON
        },
        Ordering::SeqCst,
    );
    FILTERS
        .set(Filters { programs, selftest })
        .map_err(|_| SeccompError::Twice)
}

/// The BPF program of `kind`'s filter: its rules allowed, anything else trapped.
pub fn compile(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let err = |e: seccompiler::BackendError| SeccompError::Compile {
        kind: kind.name(),
        detail: e.to_string(),
    };
    let rules: BTreeMap<i64, Vec<SeccompRule>> = rules(kind).map_err(err)?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(err)?;
    filter.try_into().map_err(err)
}

/// Installs `kind`'s filter on the calling thread (if [`configure`] was called with filters on).
/// From here on the thread may make only the calls its filter allows.
pub fn enter(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(filters) = FILTERS.get() else {
        return Ok(());
    };
    let mut label = Label {
        kind: kind.name(),
        ..Label::EMPTY
    };
    if let Some(name) = std::thread::current().name() {
        let n = name.len().min(label.name.len());
        label.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        label.name_len = n;
    }
    LABEL.with(|l| l.set(label));
    seccompiler::apply_filter(&filters.programs[&kind]).map_err(|e| SeccompError::Install {
        kind: kind.name(),
        detail: e.to_string(),
    })?;
    if filters.selftest == Some(kind) {
        selftest();
    }
    Ok(())
}

/// Makes the forbidden call of [`SELFTEST_ENV`].
fn selftest() {
    log::warn!("seccomp self-test: making a forbidden system call");
    // SAFETY: socket(2) with constant arguments touches no memory; if it were allowed the
    // descriptor is closed at once.
    let fd = unsafe { libc::syscall(SELFTEST_SYSCALL, libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd >= 0 {
        // SAFETY: closing the descriptor just created.
        unsafe { libc::close(fd as i32) };
    }
}

fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; it is filled before use, and the handler only calls
    // async-signal-safe functions (write, _exit) and reads atomics and const thread-locals.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SIGSYS must reach the handler in every thread (the exit signals are blocked, not it).
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
    Ok(())
}

/// Offset of `si_syscall` in a SIGSYS `siginfo_t` on x86-64: after si_signo, si_errno, si_code,
/// padding and `si_call_addr`.
const SI_SYSCALL_OFFSET: usize = 24;

/// The SIGSYS handler: one line on stderr, then exit ([`EXIT_SECCOMP`]) or let the call fail.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS; si_syscall is an int at this offset.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read()
    };
    let label = LABEL.with(|l| l.get());
    let log_only = MODE.load(Ordering::Relaxed) == MODE_LOG;
    let mut msg = Buf::new();
    if log_only {
        msg.push(b"vmm: seccomp (log mode): thread '");
    } else {
        msg.push(b"vmm: seccomp: thread '");
    }
    msg.push(&label.name[..label.name_len]);
    msg.push(b"' (");
    msg.push(label.kind.as_bytes());
    msg.push(b" filter) made a forbidden system call: ");
    msg.push_num(nr as i64);
    msg.push(b" (");
    msg.push(syscall_name(nr).as_bytes());
    if log_only {
        // The first arguments help tell which use of the call it was (ioctl request, fcntl
        // command, madvise advice...).
        // SAFETY: for a SA_SIGINFO handler the third argument is the interrupted ucontext.
        let gregs = unsafe { (*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
        msg.push(b", args");
        for r in [libc::REG_RDI, libc::REG_RSI, libc::REG_RDX, libc::REG_R10] {
            msg.push(b" ");
            msg.push_hex(gregs[r as usize] as u64);
        }
        msg.push(b"); it fails with ENOSYS\n");
    } else {
        msg.push(b"); exiting with status ");
        msg.push_num(EXIT_SECCOMP as i64);
        msg.push(b"\n");
    }
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is a local array.
    unsafe {
        libc::write(2, msg.bytes.as_ptr().cast(), msg.len);
        if !log_only {
            libc::_exit(EXIT_SECCOMP);
        }
    }
    // Log mode: the call was not made; make sure it returns -ENOSYS to its caller.
    // SAFETY: for a SA_SIGINFO handler the third argument is the interrupted ucontext.
    unsafe {
        let uc = ctx.cast::<libc::ucontext_t>();
        (*uc).uc_mcontext.gregs[libc::REG_RAX as usize] = -(libc::ENOSYS as i64);
    }
}

/// The name of x86-64 system call `nr`, or "unknown".
pub fn syscall_name(nr: i32) -> &'static str {
    match usize::try_from(nr).ok().and_then(|i| names::NAMES.get(i)) {
        Some(n) if !n.is_empty() => n,
        _ => "unknown",
    }
}

/// A fixed buffer for the handler's message (no allocation in a signal handler).
struct Buf {
    bytes: [u8; 256],
    len: usize,
}

impl Buf {
    fn new() -> Self {
        Self {
            bytes: [0; 256],
            len: 0,
        }
    }

    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_hex(&mut self, v: u64) {
        let mut digits = [0u8; 16];
        let mut i = digits.len();
        let mut v = v;
        loop {
            i -= 1;
            digits[i] = b"0123456789abcdef"[(v & 0xf) as usize];
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        self.push(b"0x");
        self.push(&digits[i..]);
    }

    fn push_num(&mut self, v: i64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let neg = v < 0;
        let mut v = v.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if neg {
            self.push(b"-");
        }
        self.push(&digits[i..]);
    }
}

/// Writes each kind's allowed system calls, one line per kind (`kind (count): names...`): the
/// lists and counts in docs/security.md and the README.
pub fn describe(out: &mut impl std::io::Write) -> std::io::Result<()> {
    for kind in ThreadKind::ALL {
        let rules = rules(kind).map_err(std::io::Error::other)?;
        let names: Vec<&str> = rules.keys().map(|&nr| syscall_name(nr as i32)).collect();
        writeln!(
            out,
            "{} ({}): {}",
            kind.name(),
            names.len(),
            names.join(" ")
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles() {
        for kind in ThreadKind::ALL {
            let prog = compile(kind).unwrap();
            assert!(!prog.is_empty(), "{}", kind.name());
        }
    }

    #[test]
    fn names_match_libc_numbers() {
        assert_eq!(syscall_name(libc::SYS_socket as i32), "socket");
        assert_eq!(syscall_name(libc::SYS_ioctl as i32), "ioctl");
        assert_eq!(
            syscall_name(libc::SYS_process_madvise as i32),
            "process_madvise"
        );
        assert_eq!(syscall_name(-1), "unknown");
        assert_eq!(syscall_name(100_000), "unknown");
    }

    #[test]
    fn no_filter_allows_the_selftest_call() {
        for kind in ThreadKind::ALL {
            assert!(
                !rules(kind).unwrap().contains_key(&SELFTEST_SYSCALL),
                "{} allows the self-test's call",
                kind.name()
            );
        }
    }

    #[test]
    fn describe_lists_every_kind_with_its_count() {
        let mut out = Vec::new();
        describe(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        print!("{text}");
        for kind in ThreadKind::ALL {
            let n = rules(kind).unwrap().len();
            assert!(text.contains(&format!("{} ({n}): ", kind.name())), "{text}");
        }
        assert!(!text.contains("unknown"), "{text}");
    }

    #[test]
    fn message_buffer_formats_numbers() {
        let mut b = Buf::new();
        b.push_num(0);
        b.push(b" ");
        b.push_num(-38);
        b.push(b" ");
        b.push_num(450);
        b.push(b" ");
        b.push_hex(0xae80);
        b.push(b" ");
        b.push_hex(0);
        assert_eq!(&b.bytes[..b.len], b"0 -38 450 0xae80 0x0");
    }
}
