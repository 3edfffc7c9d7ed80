//! The per-VM monitor: a small process between the daemon and each VMM, so VMs outlive the
//! daemon and their end is always recorded.
//!
//! The daemon starts `hostd __monitor VMDIR VMM ARGS...` in a new session (its own process
//! group, no terminal), with stdin from /dev/null and its output in `monitor.log`: nothing ties
//! it to the daemon's lifetime, its pipes or its terminal signals. The monitor starts the VMM
//! with the console FIFO as stdin (opened read-write, so the VMM never sees end-of-file when no
//! one is typing) and `vmm.log` as stdout/stderr, records both PIDs with their start times in
//! `vmm.json`, waits for the VMM, and records how it ended in `exit.json`. A daemon that was
//! down meanwhile reads that record when it comes back.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::procfs::ProcessId;
use crate::statedir::{unix_ms, ExitRecord, VmDir, VmmRecord};

/// The hidden first argument that makes `hostd` run as a monitor.
pub const MONITOR_ARG: &str = "__monitor";

/// How every VMM is contained (`hostd --vmm-uid --vmm-gid [--vmm-jail]`); unset, VMMs keep
/// the daemon's user.
static VMM_USER: OnceLock<VmmUser> = OnceLock::new();

/// The user every VMM drops to once it has opened its files, and whether it first moves into
/// an empty root of its own (`vmm --jail`).
#[derive(Debug, Clone, Copy)]
pub struct VmmUser {
    /// `vmm --uid`.
    pub uid: u32,
    /// `vmm --gid`.
    pub gid: u32,
    /// `vmm --jail`.
    pub jail: bool,
}

/// Makes every VMM started from now on run as `user` (`vmm --uid --gid`: it opens /dev/kvm,
/// its kernel, initramfs, console and socket first). Set once, at start-up.
pub fn set_vmm_user(user: VmmUser) {
    let _ = VMM_USER.set(user);
}

/// Starts the monitor of the VM in `dir`, which starts `vmm ARGS`. Returns once the monitor has
/// recorded the VMM (or its failure to start), within `timeout`.
pub fn start(
    hostd: &Path,
    dir: &VmDir,
    vmm: &Path,
    args: &[String],
    timeout: Duration,
) -> io::Result<VmmRecord> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.monitor_log())?;
    let mut cmd = Command::new(hostd);
    cmd.arg(MONITOR_ARG).arg(&dir.path).arg(vmm).args(args);
    if let Some(u) = VMM_USER.get() {
        cmd.args(["--uid", &u.uid.to_string(), "--gid", &u.gid.to_string()]);
        if u.jail {
            cmd.arg("--jail");
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid(2) is async-signal-safe and touches no memory of ours; between fork and
    // exec nothing else runs in the child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    reap_in_background(child);
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(r) = dir.read_vmm()? {
            return Ok(r);
        }
        if let Some(e) = dir.read_exit()? {
            return Err(io::Error::other(
                e.error
                    .unwrap_or_else(|| "the VMM ended before it was recorded".into()),
            ));
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the monitor did not record the VMM within {timeout:?}; see {}",
                    dir.monitor_log().display()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The daemon is the monitor's parent while it runs: reap it when it ends, so no zombie stays.
/// (A monitor outliving a restarted daemon is reaped by init.)
fn reap_in_background(mut child: Child) {
    let spawned = std::thread::Builder::new()
        .name("hostd-reaper".into())
        .spawn(move || {
            let _ = child.wait();
        });
    if let Err(e) = spawned {
        log::warn!("cannot start a thread to reap a monitor (it stays a zombie): {e}");
    }
}

/// The monitor's `main`: `args` are what follows [`MONITOR_ARG`]. Returns the exit code.
pub fn run(args: Vec<OsString>) -> i32 {
    let mut args = args.into_iter();
    let (Some(dir), Some(vmm)) = (args.next(), args.next()) else {
        eprintln!(
            "hostd {MONITOR_ARG}: usage: VMDIR VMM [ARGS...] (started by hostd, not by hand)"
        );
        return 2;
    };
    let dir = VmDir {
        path: PathBuf::from(dir),
    };
    let vmm_args: Vec<OsString> = args.collect();
    match supervise(&dir, Path::new(&vmm), &vmm_args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("hostd monitor: {}: {e}", dir.path.display());
            let record = ExitRecord {
                code: None,
                signal: None,
                error: Some(format!("cannot start {}: {e}", vmm.to_string_lossy())),
                at_unix_ms: unix_ms(),
            };
            if let Err(e) = dir.write_exit(&record) {
                eprintln!("hostd monitor: cannot record the failure: {e}");
            }
            1
        }
    }
}

/// Starts the VMM, records it, waits for it, records its end.
fn supervise(dir: &VmDir, vmm: &Path, args: &[OsString]) -> io::Result<()> {
    // Read-write: the VMM itself then holds a writer, so reads never see end-of-file.
    let console_in = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.console_in())?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.vmm_log())?;
    let mut child = Command::new(vmm)
        .args(args)
        .stdin(console_in)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    // The VMM has exec'd with default signal dispositions; from now on the monitor itself
    // ignores the signals a stray `kill` of its process group would send, so it lives to
    // record the end.
    ignore_signals();
    let pid = child.id() as i32;
    let me = std::process::id() as i32;
    let record = match (ProcessId::of(pid), ProcessId::of(me)) {
        (Some(vmm), Some(monitor)) => VmmRecord {
            vmm,
            monitor,
            api_socket: dir.api_socket(),
            started_at_unix_ms: unix_ms(),
        },
        _ => {
            let _ = child.kill();
            return Err(io::Error::other("cannot read the new VMM's /proc entry"));
        }
    };
    dir.write_vmm(&record)?;
    eprintln!("hostd monitor: VMM pid {pid} started");
    let status = child.wait()?;
    // A VMM running as another user cannot remove its socket from this directory (it may not
    // write here); remove it for it, before the end is recorded and a new VMM may start here.
    let socket = dir.api_socket();
    if std::fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(&socket);
    }
    let exit = ExitRecord {
        code: status.code(),
        signal: status.signal(),
        error: None,
        at_unix_ms: unix_ms(),
    };
    dir.write_exit(&exit)?;
    eprintln!("hostd monitor: VMM pid {pid} ended: {status}");
    Ok(())
}

fn ignore_signals() {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGPIPE] {
        // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code.
        unsafe {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
}
