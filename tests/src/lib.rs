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
//! Conventions in this crate: "console" is the VMM's stdout (the guest's serial port), "stderr"
//! is the VMM's own log; lines are stored without line endings and terminal escape sequences.

mod agent;
mod host;
mod hostfiles;
pub mod http;
pub mod proto;
pub mod rundir;
pub mod supervisor;
mod vm;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use host::{host, TestHost};
pub use proto::Exit;
pub use vm::Vm;

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
