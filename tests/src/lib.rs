//! Test-host harness for end-to-end tests: boot real Linux guests under our VMM, read their
//! console, type into it, signal the VMM, read its RSS and reach its REST API.
//!
//! Two modes behind one interface ([`TestHost`] and [`Vm`]):
//! - [`Mode::Direct`]: this machine's KVM runs stock kernels (vmx or svm in /proc/cpuinfo and
//!   /dev/kvm); the VMM runs here as a child process.
//! - [`Mode::Nested`]: otherwise (e.g. a software KVM that cannot boot stock kernels). A test
//!   host (QEMU TCG with SVM, Debian's kernel with kvm_amd; see resources/testhost.sh) is booted
//!   once per test binary and the VMM runs inside it, driven through `testhost-agent`.
//!
//! Environment: `E2E_MODE=direct|nested` forces a mode; `VMM_BIN` names the VMM binary
//! (default target/release/vmm, built with `cargo build --release -p vmm` unless
//! `E2E_NO_BUILD=1`); `E2E_REQUIRE=1` turns "no way to run" into a failure instead of a skip;
//! `E2E_VMM_BASELINE` names a second VMM binary to compare with, side by side in the same test
//! host ([`TestHost::baseline_vmm`]; the boot benchmark uses it).
//!
//! Conventions in this file: "console" is the VMM's stdout (the guest's serial port), "stderr"
//! is the VMM's own log; lines are stored without line endings and terminal escape sequences.

pub mod http;
pub mod proto;
pub mod rundir;
pub mod supervisor;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

pub use proto::Exit;
use proto::{Event, Reply, Request};
use supervisor::Proc;

/// The ready marker the guest init prints (resources/guest/init).
pub const READY: &str = "VMM-GUEST-READY";
/// The kernel command line the tests boot the guest with, before any scenario.
pub const GUEST_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// How many console lines an error message shows.
const TAIL_LINES: usize = 40;
/// Lines kept per stream; older ones are dropped (a chatty guest must not eat the test's RAM).
const MAX_LINES: usize = 100_000;
/// Budget for the nested test host to boot and report /dev/kvm.
const TESTHOST_BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// Why a harness call failed; each carries what the test needs to see why.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing matched before the deadline.
    #[error("timed out after {waited:?} waiting for {what}\n{tail}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        waited: Duration,
        /// The last lines of the VMM's output.
        tail: String,
    },
    /// The VMM exited while the harness waited for something.
    #[error("the VMM ended ({exit}) while waiting for {what}\n{tail}")]
    Exited {
        /// What was awaited.
        what: String,
        /// How the VMM ended.
        exit: Exit,
        /// The last lines of its output.
        tail: String,
    },
    /// A command in the guest exited non-zero.
    #[error("guest command {cmd:?} failed with status {status}; output:\n{output}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: i32,
        /// What it printed.
        output: String,
    },
    /// The test host agent refused a request or answered something unexpected.
    #[error("test host agent: {0}")]
    Agent(String),
    /// A local I/O error (sockets, files, processes).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The test host could not be started or reached; tests skip unless `E2E_REQUIRE=1`.
    #[error("test host unavailable: {0}")]
    Unavailable(String),
}

/// Where VMMs under test run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The VMM runs on this machine.
    Direct,
    /// The VMM runs in the nested test host (QEMU TCG + kvm_amd).
    Nested,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::Direct => write!(f, "direct (this machine's KVM)"),
            Mode::Nested => write!(f, "nested (QEMU TCG + kvm_amd)"),
        }
    }
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The mode this machine supports and why, or why none does.
pub fn detect_mode() -> Result<(Mode, String), String> {
    match std::env::var("E2E_MODE").as_deref() {
        Ok("direct") => return Ok((Mode::Direct, "E2E_MODE=direct".into())),
        Ok("nested") => return Ok((Mode::Nested, "E2E_MODE=nested".into())),
        _ => {}
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let kvm = Path::new("/dev/kvm").exists();
    if hw && kvm {
        return Ok((
            Mode::Direct,
            "vmx/svm in /proc/cpuinfo and /dev/kvm present".into(),
        ));
    }
    let why = if kvm {
        "/dev/kvm exists but the CPU shows no vmx/svm (a software KVM that cannot boot stock kernels)"
    } else {
        "no /dev/kvm"
    };
    if which("qemu-system-x86_64") || which("apt-get") {
        Ok((Mode::Nested, format!("{why}; using QEMU")))
    } else {
        Err(format!(
            "{why}, and no qemu-system-x86_64 (nor apt-get to install it)"
        ))
    }
}

/// Prints straight to stderr, past the test harness's output capture: which mode ran, skips and
/// test-host progress must show even when the tests pass.
fn loud(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

fn which(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
}

/// Where the VMMs run.
pub struct TestHost {
    mode: Mode,
    /// The VMM where it runs, or why there is none (the harness itself still works).
    vmm: Result<String, String>,
    /// `E2E_VMM_BASELINE`'s VMM where it runs.
    baseline: Option<String>,
    guest_dir: String,
    scratch: String,
    agent: Option<SocketAddr>,
    /// Nested mode: the test host's console log and QEMU monitor, for [`HostFiles::report`].
    files: Option<Arc<HostFiles>>,
    next_vm: AtomicU64,
    /// Nested mode: seconds from starting QEMU until the agent reported /dev/kvm.
    boot_secs: f64,
}

/// Where to look at a nested test host from outside when it stops answering.
#[derive(Debug)]
struct HostFiles {
    console: PathBuf,
    monitor: PathBuf,
    /// The test host kernel's text symbols, taken at boot (Debian ships no System.map, and
    /// KASLR moves the kernel at each boot), to name the functions the vCPUs' RIPs are in.
    kallsyms: PathBuf,
    /// The directory holding them, locked while this test host lives (see [`rundir`]).
    _dir: Option<rundir::HostDir>,
}

impl HostFiles {
    /// What the test host's kernel printed last (the console shows warnings and worse, e.g. soft
    /// lockups and RCU stalls with their stacks) and where QEMU's vCPUs are, from the monitor.
    fn report(&self) -> String {
        let console = std::fs::read_to_string(&self.console).unwrap_or_default();
        let since_ready = console
            .find("TESTHOST-READY")
            .map_or(console.as_str(), |i| &console[i..]);
        let tail = last_lines(since_ready, 3 * TAIL_LINES);
        let symbols = std::fs::read_to_string(&self.kallsyms).unwrap_or_default();
        let regs = monitor_command(&self.monitor, "info registers -a")
            .map(|out| {
                out.lines()
                    .map(|l| l.trim())
                    .filter(|l| {
                        ["CPU#", "RIP=", "CR0=", "EFER="]
                            .iter()
                            .any(|p| l.starts_with(p))
                    })
                    .map(|l| {
                        // A RIP in the nested guest (the VMM's) finds no symbol or a wrong one.
                        let sym = l
                            .strip_prefix("RIP=")
                            .and_then(|r| u64::from_str_radix(r.get(..16)?, 16).ok())
                            .and_then(|rip| kernel_symbol(&symbols, rip));
                        match sym {
                            Some(sym) => format!("{l}  [test host kernel: {sym}?]"),
                            None => l.to_string(),
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_else(|e| format!("(no answer from {}: {e})", self.monitor.display()));
        format!(
            "--- test host console ({}) since TESTHOST-READY, tail ---\n{tail}\n\
             --- test host vCPUs (QEMU monitor) ---\n{regs}",
            self.console.display()
        )
    }
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `addr` as `function+0xoffset [module]` from /proc/kallsyms lines ("ADDR t NAME [MODULE]"),
/// if a text symbol starts at most 64 KiB below it.
fn kernel_symbol(kallsyms: &str, addr: u64) -> Option<String> {
    let mut best: Option<(u64, &str)> = None;
    for line in kallsyms.lines() {
        let mut f = line.splitn(3, ' ');
        let (Some(a), Some(kind), Some(name)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let Ok(a) = u64::from_str_radix(a, 16) else {
            continue;
        };
        if matches!(kind, "t" | "T") && a <= addr && best.is_none_or(|(b, _)| a > b) {
            best = Some((a, name));
        }
    }
    let (start, name) = best.filter(|(start, _)| addr - start < 0x10000)?;
    let (func, module) = match name.split_once(char::is_whitespace) {
        Some((f, m)) => (f, format!(" {}", m.trim())),
        None => (name, String::new()),
    };
    Some(format!("{func}+{:#x}{module}", addr - start))
}

/// One command on QEMU's human monitor at `socket`; returns its output.
fn monitor_command(socket: &Path, command: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let read_prompt = |s: &mut std::os::unix::net::UnixStream| -> std::io::Result<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while !out.ends_with(b"(qemu) ") {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    };
    read_prompt(&mut s)?;
    s.write_all(format!("{command}\n").as_bytes())?;
    read_prompt(&mut s)
}

/// Why there is no test host: nothing on this machine can run a VMM (tests skip), or starting
/// one failed (tests fail).
#[derive(Debug, Clone)]
enum NoHost {
    Unavailable(String),
    Failed(String),
}

static SHARED: OnceLock<Result<TestHost, NoHost>> = OnceLock::new();

/// The shared test host, or `None` after printing SKIPPED when this machine can run no VMM
/// (and `E2E_REQUIRE` is unset). Use as `let Some(host) = e2e::host() else { return };`.
pub fn host() -> Option<&'static TestHost> {
    match TestHost::get() {
        Ok(h) => Some(h),
        Err(Some(why)) if std::env::var_os("E2E_REQUIRE").is_none() => {
            loud(&format!("\n*** e2e: SKIPPED: {why} ***\n"));
            println!("e2e: SKIPPED: {why}");
            None
        }
        Err(Some(why)) => panic!("e2e: E2E_REQUIRE is set but no test host is possible: {why}"),
        Err(None) => panic!("e2e: the test host failed to start (see above)"),
    }
}

impl TestHost {
    /// The test host of this test binary, started on first use. Panics when it cannot start.
    pub fn shared() -> &'static TestHost {
        match Self::get() {
            Ok(h) => h,
            Err(Some(why)) => panic!("e2e: no test host possible: {why}"),
            Err(None) => panic!("e2e: the test host failed to start (see above)"),
        }
    }

    /// The shared host; `Err(Some(why))` when none is possible here, `Err(None)` when starting
    /// it failed (the reason is printed once, when it happened).
    fn get() -> Result<&'static TestHost, Option<String>> {
        let r = SHARED.get_or_init(|| {
            let r = Self::start();
            match &r {
                Ok(h) => {
                    let line = match h.mode {
                        Mode::Direct => "e2e: mode=direct (this machine's KVM)".to_string(),
                        Mode::Nested => format!(
                            "e2e: mode=nested (QEMU TCG + kvm_amd), test host up with /dev/kvm \
                             {:.1} s after QEMU started",
                            h.boot_secs
                        ),
                    };
                    loud(&format!("\n*** {line} ***\n"));
                }
                Err(NoHost::Failed(e)) => {
                    loud(&format!("\n*** e2e: the test host failed: {e} ***\n"))
                }
                Err(NoHost::Unavailable(_)) => {}
            }
            r
        });
        match r {
            Ok(h) => {
                println!("e2e: mode={}", h.mode);
                Ok(h)
            }
            Err(NoHost::Unavailable(why)) => Err(Some(why.clone())),
            Err(NoHost::Failed(_)) => Err(None),
        }
    }

    fn start() -> Result<TestHost, NoHost> {
        let (mode, why) = detect_mode().map_err(NoHost::Unavailable)?;
        Self::start_in(mode, &why).map_err(NoHost::Failed)
    }

    fn start_in(mode: Mode, why: &str) -> Result<TestHost, String> {
        loud(&format!("e2e: mode {mode}: {why}"));
        let root = repo_root();
        run_script(&root.join("resources/build-guest.sh"), &[])?;
        let vmm = vmm_binary(&root);
        if let Err(e) = &vmm {
            loud(&format!(
                "e2e: WARNING: no VMM binary, VMs cannot start: {e}"
            ));
        }
        let baseline = match std::env::var_os("E2E_VMM_BASELINE").map(PathBuf::from) {
            Some(p) if !p.is_file() => {
                return Err(format!("E2E_VMM_BASELINE={} is not a file", p.display()))
            }
            p => p,
        };
        let build = root.join("build");
        match mode {
            Mode::Direct => {
                let scratch = build.join(format!("e2e-{}", std::process::id()));
                std::fs::create_dir_all(&scratch).map_err(|e| format!("{scratch:?}: {e}"))?;
                Ok(TestHost {
                    mode,
                    vmm: vmm.map(|p| p.display().to_string()),
                    baseline: baseline.map(|p| p.display().to_string()),
                    guest_dir: build.join("guest").display().to_string(),
                    scratch: scratch.display().to_string(),
                    agent: None,
                    files: None,
                    next_vm: AtomicU64::new(0),
                    boot_secs: 0.0,
                })
            }
            Mode::Nested => {
                let agent_bin = agent_binary()?;
                let t = Instant::now();
                let (addr, files) =
                    boot_testhost(&root, vmm.as_deref().ok(), baseline.as_deref(), &agent_bin)?;
                let boot_secs = t.elapsed().as_secs_f64();
                Ok(TestHost {
                    mode,
                    vmm: vmm.map(|_| "/bin/vmm".to_string()),
                    baseline: baseline.map(|_| "/bin/vmm-baseline".to_string()),
                    guest_dir: "/guest".into(),
                    scratch: "/tmp".into(),
                    agent: Some(addr),
                    files: Some(Arc::new(files)),
                    next_vm: AtomicU64::new(0),
                    boot_secs,
                })
            }
        }
    }

    /// Whether this host runs VMMs directly or in the nested test host.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The `E2E_VMM_BASELINE` VMM as a path where the VMMs run, to start with
    /// [`TestHost::start_process`] beside the VMM under test.
    pub fn baseline_vmm(&self) -> Option<&str> {
        self.baseline.as_deref()
    }

    /// The guest bzImage, as a path where the VMM runs.
    pub fn guest_kernel(&self) -> String {
        format!("{}/bzImage", self.guest_dir)
    }

    /// The guest's ELF vmlinux (extracted from the same bzImage), as a path where the VMM runs.
    pub fn guest_vmlinux(&self) -> String {
        format!("{}/vmlinux", self.guest_dir)
    }

    /// The guest initramfs, as a path where the VMM runs.
    pub fn guest_initramfs(&self) -> String {
        format!("{}/initramfs.cpio.gz", self.guest_dir)
    }

    /// A fresh path for a Unix socket (the VMM's API) where the VMM runs.
    pub fn socket_path(&self, name: &str) -> String {
        let n = self.next_vm.fetch_add(1, Ordering::SeqCst);
        format!("{}/{name}-{}-{n}.sock", self.scratch, std::process::id())
    }

    /// Runs a command where the VMM runs (e.g. `dmesg`); returns its exit and output.
    pub fn exec(&self, argv: &[&str], timeout: Duration) -> Result<(Exit, String), Error> {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        match self.agent {
            None => Ok(supervisor::exec(&argv, timeout)?),
            Some(addr) => {
                let r = agent_call(
                    addr,
                    &Request::Exec {
                        argv,
                        timeout_ms: timeout.as_millis() as u64,
                    },
                )?;
                Ok((
                    r.exit.unwrap_or(Exit::Code(-1)),
                    r.stdout.unwrap_or_default(),
                ))
            }
        }
    }

    /// Starts `vmm VMM_ARGS...`. The VMM's API socket, if any, is taken from `--api-sock PATH`
    /// (or `--api-socket PATH`) in the arguments.
    pub fn start_vm(&self, vmm_args: &[&str]) -> Result<Vm, Error> {
        let vmm = self.vmm.clone().map_err(Error::Unavailable)?;
        let mut argv = vec![vmm.as_str()];
        argv.extend(vmm_args);
        self.start_process(&argv)
    }

    /// Starts any program where the VMM runs, as a [`Vm`] (stdout is its "console"). The
    /// harness's own tests use it with a shell.
    pub fn start_process(&self, argv: &[&str]) -> Result<Vm, Error> {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let api_socket = argv
            .windows(2)
            .find(|w| w[0] == "--api-sock" || w[0] == "--api-socket")
            .map(|w| w[1].to_string());
        let shared = Arc::new(Shared::default());
        let backend = match self.agent {
            None => {
                let sink = shared.clone();
                Backend::Local(Proc::spawn(&argv, move |ev| sink.push(ev))?)
            }
            Some(addr) => {
                let (id, conn) = agent_spawn(addr, &argv, shared.clone()).inspect_err(|e| {
                    // A test host that stops answering is gone for the rest of the binary: say
                    // what its kernel and QEMU show where the failure is reported.
                    if let Some(f) = &self.files {
                        eprintln!(
                            "e2e: the test host's agent failed ({e}); its state:\n{}",
                            f.report()
                        );
                    }
                })?;
                Backend::Remote { addr, id, conn }
            }
        };
        eprintln!("e2e: started {}", argv.join(" "));
        Ok(Vm {
            shared,
            backend,
            api_socket: Mutex::new(api_socket),
            cursor: Mutex::new(0),
            run_seq: AtomicU64::new(0),
            argv,
            host: self.files.clone(),
        })
    }
}

/// One VMM process and its guest. Dropping it kills the VMM.
pub struct Vm {
    shared: Arc<Shared>,
    backend: Backend,
    api_socket: Mutex<Option<String>>,
    /// Index (in all console lines ever seen) after the last line `wait_for` matched.
    cursor: Mutex<u64>,
    run_seq: AtomicU64,
    argv: Vec<String>,
    /// Nested mode: the test host, to report on when the VMM does not die.
    host: Option<Arc<HostFiles>>,
}

enum Backend {
    Local(Arc<Proc>),
    Remote {
        addr: SocketAddr,
        id: u64,
        /// The event stream; closing it makes the agent kill the VMM.
        conn: TcpStream,
    },
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    console: VecDeque<String>,
    /// Console lines dropped from the front of `console`.
    dropped: u64,
    stderr: VecDeque<String>,
    exit: Option<Exit>,
    /// Why events stopped without an exit (the test host went away).
    lost: Option<String>,
}

impl Shared {
    fn push(&self, ev: Event) {
        let mut s = self.state.lock().unwrap();
        match ev {
            Event::Out { line } => {
                if s.console.len() >= MAX_LINES {
                    s.console.pop_front();
                    s.dropped += 1;
                }
                s.console.push_back(clean_line(&line));
            }
            Event::Err { line } => {
                if s.stderr.len() >= MAX_LINES {
                    s.stderr.pop_front();
                }
                s.stderr.push_back(clean_line(&line));
            }
            Event::Exit { exit } => s.exit = Some(exit),
        }
        drop(s);
        self.changed.notify_all();
    }

    fn lost(&self, why: String) {
        let mut s = self.state.lock().unwrap();
        if s.exit.is_none() {
            s.lost = Some(why);
        }
        drop(s);
        self.changed.notify_all();
    }
}

impl State {
    fn tail(&self) -> String {
        let mut t = String::from("--- console tail ---\n");
        let skip = self.console.len().saturating_sub(TAIL_LINES);
        for l in self.console.iter().skip(skip) {
            t.push_str(l);
            t.push('\n');
        }
        t.push_str("--- VMM stderr tail ---\n");
        let skip = self.stderr.len().saturating_sub(TAIL_LINES);
        for l in self.stderr.iter().skip(skip) {
            t.push_str(l);
            t.push('\n');
        }
        if let Some(why) = &self.lost {
            t.push_str(&format!(
                "--- connection to the test host lost: {why} ---\n"
            ));
        }
        t
    }
}

/// Removes terminal escape sequences (busybox's shell asks for the cursor position) and CRs.
fn clean_line(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    // Parameters and intermediates, then one final byte in '@'..='~'.
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

impl Vm {
    /// Waits for a console line containing `needle`, looking only at lines after the previous
    /// match (like `expect`), and returns it. The error shows the console and VMM stderr tails.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String, Error> {
        let mut cursor = self.cursor.lock().unwrap();
        let (line, at) = self.wait_line(*cursor, timeout, needle, |l| l.contains(needle))?;
        *cursor = at + 1;
        Ok(line)
    }

    /// Waits for a line after index `from` satisfying `pred`; returns it and its index.
    fn wait_line(
        &self,
        from: u64,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(String, u64), Error> {
        let deadline = Instant::now() + timeout;
        let mut s = self.shared.state.lock().unwrap();
        let mut next = from;
        loop {
            let first = s.dropped;
            next = next.max(first);
            while next < first + s.console.len() as u64 {
                let l = &s.console[(next - first) as usize];
                if pred(l) {
                    return Ok((l.clone(), next));
                }
                next += 1;
            }
            if let Some(exit) = s.exit {
                return Err(Error::Exited {
                    what: format!("{what:?}"),
                    exit,
                    tail: s.tail(),
                });
            }
            let now = Instant::now();
            if now >= deadline || s.lost.is_some() {
                return Err(Error::Timeout {
                    what: format!("{what:?} on the console of `{}`", self.argv.join(" ")),
                    waited: timeout,
                    tail: s.tail(),
                });
            }
            s = self
                .shared
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// The whole console so far (oldest lines may have been dropped past 100 000).
    pub fn console(&self) -> String {
        let s = self.shared.state.lock().unwrap();
        let mut out = String::new();
        for l in &s.console {
            out.push_str(l);
            out.push('\n');
        }
        out
    }

    /// The VMM's own stderr so far.
    pub fn stderr(&self) -> String {
        let s = self.shared.state.lock().unwrap();
        s.stderr.iter().map(|l| format!("{l}\n")).collect()
    }

    /// The first console line starting with `prefix`, anywhere in the console so far.
    pub fn find_line(&self, prefix: &str) -> Option<String> {
        let s = self.shared.state.lock().unwrap();
        s.console.iter().find(|l| l.starts_with(prefix)).cloned()
    }

    /// The value of the first `KEY=value` console line (the guest prints GUEST-NPROC=2 etc.).
    pub fn console_value(&self, key: &str) -> Option<String> {
        self.find_line(&format!("{key}="))
            .map(|l| l[key.len() + 1..].trim().to_string())
    }

    /// Types `text` on the guest's serial console (the VMM's stdin).
    pub fn send_console(&self, text: &str) {
        let r = match &self.backend {
            Backend::Local(p) => p.write_stdin(text.as_bytes()).map_err(Error::from),
            Backend::Remote { addr, id, .. } => agent_call(
                *addr,
                &Request::Stdin {
                    id: *id,
                    data: text.to_string(),
                },
            )
            .map(|_| ()),
        };
        if let Err(e) = r {
            eprintln!("e2e: cannot write to the console: {e}");
        }
    }

    /// Runs `cmd` in the guest's shell and returns its output (the lines between two markers
    /// the shell echoes; the typed command itself is not part of it). Fails when the command's
    /// status is not 0. Needs the guest at its shell (after VMM-GUEST-READY).
    pub fn run(&self, cmd: &str, timeout: Duration) -> Result<String, Error> {
        let (status, output) = self.run_status(cmd, timeout)?;
        if status != 0 {
            return Err(Error::Command {
                cmd: cmd.to_string(),
                status,
                output,
            });
        }
        Ok(output)
    }

    /// Like [`Vm::run`], but returns the status with the output instead of failing.
    pub fn run_status(&self, cmd: &str, timeout: Duration) -> Result<(i32, String), Error> {
        let n = self.run_seq.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}-{n}", std::process::id());
        let begin = format!("E2E-BEGIN-{tag}");
        let end = format!("E2E-END-{tag} ");
        // The empty quotes keep the echoed command line from matching the markers.
        let start = {
            let s = self.shared.state.lock().unwrap();
            s.dropped + s.console.len() as u64
        };
        self.send_console(&format!(
            "echo E2E-BEG''IN-{tag}; {cmd}\necho E2E-EN''D-{tag} $?\n"
        ));
        let (_, b) = self.wait_line(start, timeout, &begin, |l| l.ends_with(&begin))?;
        let (end_line, e) = self.wait_line(b + 1, timeout, &end, |l| l.starts_with(&end))?;
        let status = end_line[end.len()..].trim().parse().unwrap_or(-1);
        let s = self.shared.state.lock().unwrap();
        let first = s.dropped;
        let mut out = String::new();
        for i in (b + 1).max(first)..e {
            let l = &s.console[(i - first) as usize];
            // The echo of the second typed line, when the terminal shows it.
            if l.contains(&format!("E2E-EN''D-{tag}")) {
                continue;
            }
            out.push_str(l);
            out.push('\n');
        }
        drop(s);
        let mut cursor = self.cursor.lock().unwrap();
        *cursor = (*cursor).max(e + 1);
        Ok((status, out))
    }

    /// The VMM process's resident set size (VmRSS), in KiB.
    pub fn rss_kib(&self) -> Result<u64, Error> {
        match &self.backend {
            Backend::Local(p) => Ok(p.rss_kib()?),
            Backend::Remote { addr, id, .. } => agent_call(*addr, &Request::Rss { id: *id })?
                .kib
                .ok_or_else(|| Error::Agent("no kib in reply".into())),
        }
    }

    /// Sends signal `sig` (e.g. `libc::SIGTERM`) to the VMM.
    pub fn signal(&self, sig: i32) {
        let r = match &self.backend {
            Backend::Local(p) => p.signal(sig).map_err(Error::from),
            Backend::Remote { addr, id, .. } => {
                agent_call(*addr, &Request::Signal { id: *id, sig }).map(|_| ())
            }
        };
        if let Err(e) = r {
            eprintln!("e2e: cannot send signal {sig}: {e}");
        }
    }

    /// Waits for the VMM to end; returns its exit code, or 128 + the signal that killed it.
    pub fn wait_exit(&self, timeout: Duration) -> Result<i32, Error> {
        self.wait_exit_status(timeout).map(Exit::as_status)
    }

    /// Waits for the VMM to end; returns how it ended.
    pub fn wait_exit_status(&self, timeout: Duration) -> Result<Exit, Error> {
        let deadline = Instant::now() + timeout;
        let mut s = self.shared.state.lock().unwrap();
        loop {
            if let Some(exit) = s.exit {
                return Ok(exit);
            }
            let now = Instant::now();
            if now >= deadline || s.lost.is_some() {
                return Err(Error::Timeout {
                    what: format!("`{}` to exit", self.argv.join(" ")),
                    waited: timeout,
                    tail: s.tail(),
                });
            }
            s = self
                .shared
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Has the VMM ended?
    pub fn exit_status(&self) -> Option<Exit> {
        self.shared.state.lock().unwrap().exit
    }

    /// Uses `path` (where the VMM runs) as the API socket for [`Vm::api`].
    pub fn set_api_socket(&self, path: &str) {
        *self.api_socket.lock().unwrap() = Some(path.to_string());
    }

    /// One HTTP request to the VMM's REST API; returns the status code and body.
    pub fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String), Error> {
        let socket = self.api_socket.lock().unwrap().clone().ok_or_else(|| {
            Error::Agent("no API socket: pass --api-sock PATH or call set_api_socket".into())
        })?;
        match &self.backend {
            Backend::Local(_) => Ok(http::request(
                &socket,
                method,
                path,
                body,
                Duration::from_secs(60),
            )?),
            Backend::Remote { addr, .. } => {
                let r = agent_call(
                    *addr,
                    &Request::Http {
                        socket,
                        method: method.into(),
                        path: path.into(),
                        body: body.map(str::to_string),
                    },
                )?;
                Ok((r.status.unwrap_or(0), r.body.unwrap_or_default()))
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.exit_status().is_none() {
            self.signal(libc::SIGKILL);
            if self.wait_exit_status(Duration::from_secs(10)).is_err() {
                // The next test's VMM would fail to start on a wedged test host; this is where
                // the wedge began.
                if let Some(h) = &self.host {
                    eprintln!(
                        "e2e: the VMM had not ended 10 s after SIGKILL; the test host's state:\n{}",
                        h.report()
                    );
                }
            }
        }
        if let Backend::Remote { conn, .. } = &self.backend {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    }
}

// ---- nested mode: the agent client and the test host ----

/// Connects to the agent. QEMU's user-mode network listens for the forwarded port with a
/// backlog of one, so concurrent connections are refused now and then: retry those briefly.
fn agent_connect(addr: SocketAddr) -> Result<TcpStream, Error> {
    let mut tries = 0;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
            Ok(c) => return Ok(c),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && tries < 40 => {
                tries += 1;
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(Error::Agent(format!("connect {addr}: {e}"))),
        }
    }
}

fn agent_call(addr: SocketAddr, req: &Request) -> Result<Reply, Error> {
    let mut conn = agent_connect(addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut line = serde_json::to_string(req).expect("requests serialize");
    line.push('\n');
    conn.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(conn).read_line(&mut reply)?;
    let r: Reply = serde_json::from_str(&reply)
        .map_err(|e| Error::Agent(format!("bad reply {reply:?}: {e}")))?;
    if !r.ok {
        return Err(Error::Agent(r.error.unwrap_or_default()));
    }
    Ok(r)
}

/// Starts a process through the agent; a thread feeds its events to `sink`.
fn agent_spawn(
    addr: SocketAddr,
    argv: &[String],
    sink: Arc<Shared>,
) -> Result<(u64, TcpStream), Error> {
    let mut conn = agent_connect(addr)?;
    let mut line = serde_json::to_string(&Request::Spawn {
        argv: argv.to_vec(),
    })
    .expect("requests serialize");
    line.push('\n');
    conn.write_all(line.as_bytes())?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut reply = String::new();
    reader.read_line(&mut reply)?;
    let r: Reply = serde_json::from_str(&reply)
        .map_err(|e| Error::Agent(format!("bad reply {reply:?}: {e}")))?;
    let id = match (r.ok, r.id) {
        (true, Some(id)) => id,
        _ => return Err(Error::Agent(r.error.unwrap_or_else(|| reply.clone()))),
    };
    thread::spawn(move || {
        let mut line = String::new();
        let mut exited = false;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => match serde_json::from_str::<Event>(&line) {
                    Ok(ev) => {
                        exited |= matches!(ev, Event::Exit { .. });
                        sink.push(ev);
                    }
                    Err(e) => eprintln!("e2e: bad event {line:?}: {e}"),
                },
            }
        }
        if !exited {
            sink.lost("the agent's event stream closed before the VMM exited".into());
        }
    });
    Ok((id, conn))
}

/// Saves the test host kernel's text symbols (about 2 MB, under 2 s) for [`HostFiles::report`].
fn save_kallsyms(addr: SocketAddr, path: &Path) {
    let req = Request::Exec {
        argv: vec![
            "grep".into(),
            "-E".into(),
            "^[0-9a-f]+ [tT] ".into(),
            "/proc/kallsyms".into(),
        ],
        timeout_ms: 30_000,
    };
    let saved = agent_call(addr, &req)
        .map_err(|e| e.to_string())
        .and_then(|r| {
            std::fs::write(path, r.stdout.unwrap_or_default()).map_err(|e| e.to_string())
        });
    if let Err(e) = saved {
        eprintln!("e2e: no test host symbols in {}: {e}", path.display());
    }
}

fn run_script(script: &Path, env: &[(&str, &str)]) -> Result<(), String> {
    let st = Command::new(script)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !st.success() {
        return Err(format!("{} failed ({st})", script.display()));
    }
    Ok(())
}

/// The VMM binary on this machine: $VMM_BIN, or target/release/vmm (built first unless
/// E2E_NO_BUILD is set, so the tests never run a stale VMM).
fn vmm_binary(root: &Path) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("VMM_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("VMM_BIN={} is not a file", p.display()))
        };
    }
    let p = root.join("target/release/vmm");
    if std::env::var_os("E2E_NO_BUILD").is_none() {
        loud("e2e: cargo build --release -p vmm");
        let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "-p", "vmm"])
            .current_dir(root)
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !st.success() {
            return Err("cargo build --release -p vmm failed".into());
        }
    }
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "no VMM at {}: run `cargo build --release -p vmm`",
            p.display()
        ))
    }
}

/// The agent built with this test binary (cargo builds the package's binaries for its
/// integration tests): target/<profile>/testhost-agent next to target/<profile>/deps/.
fn agent_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("E2E_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut dir = exe.parent();
    while let Some(d) = dir {
        let candidate = d.join("testhost-agent");
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent();
    }
    Err(format!(
        "no testhost-agent near {}: run `cargo build -p e2e --bin testhost-agent`",
        exe.display()
    ))
}

/// Boots the test host (resources/testhost.sh) and waits until its agent reports /dev/kvm.
/// QEMU dies with this process: it is started from a thread that lives as long as it does,
/// with PR_SET_PDEATHSIG.
fn boot_testhost(
    root: &Path,
    vmm: Option<&Path>,
    baseline: Option<&Path>,
    agent: &Path,
) -> Result<(SocketAddr, HostFiles), String> {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    // This run's files, in a directory of their own; earlier runs' files go (see [`rundir`]).
    let dir = rundir::HostDir::create(
        &root.join("build/testhost/runs"),
        &rundir::run_id(),
        &rundir::host_name(),
    )
    .map_err(|e| format!("no directory for the test host's files: {e}"))?;
    let log = dir.path().join("console.log");
    let monitor = dir.path().join("monitor.sock");
    let kallsyms = dir.path().join("kallsyms.txt");
    let mut cmd = Command::new(root.join("resources/testhost.sh"));
    cmd.arg("--port")
        .arg(port.to_string())
        .arg("--log")
        .arg(&log);
    // A Unix socket path has room for 107 bytes; QEMU refuses to start with a longer one.
    if monitor.as_os_str().len() < 108 {
        cmd.arg("--monitor").arg(&monitor);
    } else {
        loud(&format!(
            "e2e: no QEMU monitor for the test host: {} is too long for a socket",
            monitor.display()
        ));
    }
    if let Some(b) = baseline {
        cmd.arg("--vmm-baseline").arg(b);
    }
    cmd.arg("--vmm")
        .arg(vmm.unwrap_or(Path::new("none")))
        .arg("--agent")
        .arg(agent)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of ours.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            Ok(())
        });
    }
    loud(&format!(
        "e2e: booting the nested test host (agent on {addr}, console in {})",
        log.display()
    ));
    let (tx, rx) = std::sync::mpsc::channel();
    thread::Builder::new()
        .name("testhost-qemu".into())
        .spawn(move || match cmd.spawn() {
            Ok(mut child) => {
                let st = child.wait();
                let _ = tx.send(format!("the test host exited ({st:?})"));
            }
            Err(e) => {
                let _ = tx.send(format!("cannot start resources/testhost.sh: {e}"));
            }
        })
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let tail = |log: &Path| {
        last_lines(
            &std::fs::read_to_string(log).unwrap_or_default(),
            TAIL_LINES,
        )
    };
    loop {
        if let Ok(why) = rx.try_recv() {
            return Err(format!("{why}; console tail:\n{}", tail(&log)));
        }
        if started.elapsed() > TESTHOST_BOOT_TIMEOUT {
            return Err(format!(
                "the test host's agent did not answer within {TESTHOST_BOOT_TIMEOUT:?}; console tail:\n{}",
                tail(&log)
            ));
        }
        match agent_call(addr, &Request::Ping) {
            Ok(r) if r.kvm == Some(true) => {
                save_kallsyms(addr, &kallsyms);
                return Ok((
                    addr,
                    HostFiles {
                        console: log,
                        monitor,
                        kallsyms,
                        _dir: Some(dir),
                    },
                ));
            }
            Ok(_) => {
                return Err(format!(
                    "the test host has no /dev/kvm (kvm_amd did not load); console tail:\n{}",
                    tail(&log)
                ))
            }
            Err(_) => thread::sleep(Duration::from_millis(500)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_line_drops_escapes_and_carriage_returns() {
        assert_eq!(
            clean_line("guest# \u{1b}[6nGUEST-NPROC=2\r"),
            "guest# GUEST-NPROC=2"
        );
        assert_eq!(clean_line("\u{1b}[1m\u{1b}[31mERROR\u{1b}[0m x"), "ERROR x");
        assert_eq!(clean_line("plain"), "plain");
    }

    #[test]
    fn protocol_lines_round_trip() {
        let ev = Event::Exit {
            exit: Exit::Signal(15),
        };
        let line = serde_json::to_string(&ev).unwrap();
        assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), ev);
        let req = Request::Spawn {
            argv: vec!["vmm".into(), "--balloon".into(), String::new()],
        };
        let line = serde_json::to_string(&req).unwrap();
        assert!(line.starts_with(r#"{"op":"spawn""#), "{line}");
        match serde_json::from_str::<Request>(&line).unwrap() {
            Request::Spawn { argv } => assert_eq!(argv[2], ""),
            other => panic!("{other:?}"),
        }
        assert_eq!(Exit::Signal(15).as_status(), 143);
        assert_eq!(Exit::Code(0).as_status(), 0);
    }

    #[test]
    fn host_report_shows_the_console_since_ready_and_the_vcpus() {
        use std::io::Read;
        let dir = std::env::temp_dir().join(format!("e2e-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let console = dir.join("console.log");
        std::fs::write(
            &console,
            "boot noise\nTESTHOST-READY uptime=4\n[ 81.1] watchdog: BUG: soft lockup - CPU#1\n",
        )
        .unwrap();
        // A stand-in for QEMU's monitor: a banner and prompt, then one answer per command.
        let monitor = dir.join("monitor.sock");
        let _ = std::fs::remove_file(&monitor);
        let listener = std::os::unix::net::UnixListener::bind(&monitor).unwrap();
        let server = thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            c.write_all(b"QEMU 7.2 monitor\r\n(qemu) ").unwrap();
            let mut cmd = [0u8; 64];
            let n = c.read(&mut cmd).unwrap();
            assert_eq!(&cmd[..n], b"info registers -a\n");
            c.write_all(b"info registers -a\r\n\r\nCPU#0\r\nRAX=0 RBX=0\r\nRIP=ffffffff81000000 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0\r\nCR0=80050033 CR2=0 CR3=1000 CR4=350ef0\r\n(qemu) ")
                .unwrap();
        });
        let kallsyms = dir.join("kallsyms.txt");
        std::fs::write(
            &kallsyms,
            "ffffffff80ff0000 T _text\nffffffff81000000 t native_safe_halt\n",
        )
        .unwrap();
        let files = HostFiles {
            console,
            monitor: monitor.clone(),
            kallsyms,
            _dir: None,
        };
        let r = files.report();
        server.join().unwrap();
        assert!(
            r.contains("soft lockup - CPU#1") && !r.contains("boot noise"),
            "{r}"
        );
        assert!(
            r.contains("CPU#0\nRIP=ffffffff81000000") && r.contains("CR0=80050033"),
            "{r}"
        );
        assert!(
            r.contains("[test host kernel: native_safe_halt+0x0?]"),
            "{r}"
        );
        assert!(!r.contains("RAX="), "{r}");
        // Without a monitor the report still has the console and says why the rest is missing.
        std::fs::remove_file(&monitor).unwrap();
        let r = files.report();
        assert!(
            r.contains("soft lockup") && r.contains("no answer from"),
            "{r}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kernel_symbols_name_the_function_and_module() {
        let k = "ffffffff81000000 T _text\n\
                 ffffffff81000100 t native_safe_halt\n\
                 ffffffff81000200 D some_data\n\
                 ffffffffc0400000 t svm_vcpu_run\t[kvm_amd]\n";
        assert_eq!(
            kernel_symbol(k, 0xffffffff8100010b).as_deref(),
            Some("native_safe_halt+0xb")
        );
        // Data symbols do not count; the text symbol below still does.
        assert_eq!(
            kernel_symbol(k, 0xffffffff81000210).as_deref(),
            Some("native_safe_halt+0x110")
        );
        assert_eq!(
            kernel_symbol(k, 0xffffffffc0400020).as_deref(),
            Some("svm_vcpu_run+0x20 [kvm_amd]")
        );
        assert_eq!(kernel_symbol(k, 0xffffffff80000000), None);
        assert_eq!(
            kernel_symbol(k, 0xffffffffc0500000),
            None,
            "too far from any symbol"
        );
    }

    #[test]
    fn wait_for_consumes_and_reports_the_tail() {
        let vm_shared = Arc::new(Shared::default());
        for l in ["a", "MARK 1", "b", "MARK 2"] {
            vm_shared.push(Event::Out { line: l.into() });
        }
        let vm = Vm {
            shared: vm_shared.clone(),
            backend: Backend::Local(Proc::spawn(&["true".to_string()], |_| {}).unwrap()),
            api_socket: Mutex::new(None),
            cursor: Mutex::new(0),
            run_seq: AtomicU64::new(0),
            argv: vec!["fake".into()],
            host: None,
        };
        let t = Duration::from_millis(50);
        assert_eq!(vm.wait_for("MARK", t).unwrap(), "MARK 1");
        assert_eq!(vm.wait_for("MARK", t).unwrap(), "MARK 2");
        let err = vm.wait_for("MARK", t).unwrap_err().to_string();
        assert!(err.contains("timed out") && err.contains("MARK 2"), "{err}");
        assert_eq!(vm.console_value("MARK 1"), None);
        vm_shared.push(Event::Out {
            line: "GUEST-NPROC=2".into(),
        });
        assert_eq!(vm.console_value("GUEST-NPROC").as_deref(), Some("2"));
        vm_shared.push(Event::Exit {
            exit: Exit::Code(0),
        });
        assert!(matches!(vm.wait_for("x", t), Err(Error::Exited { .. })));
    }
}
