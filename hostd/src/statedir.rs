//! The state directory: everything a restarted daemon needs to find its VMs again, and what a
//! user looks at when one dies.
//!
//! ```text
//! STATE/                    mode 0700
//!   hostd.lock              held (flock) by the running daemon: one daemon per directory
//!   hostd.sock              the daemon's API (default --socket)
//!   host.json               budget, tick and policy parameters set by PUT /host/memory
//!   vms/ID/
//!     spec.json             the VM as created, limits as last PATCHed
//!     vmm.json              the VMM's and its monitor's PID + start time, the API socket path
//!     api.sock              the VMM's own API socket
//!     console.log           the guest's serial output (vmm --serial)
//!     console.in            a FIFO: the guest's serial input (write to it to type)
//!     vmm.log               the VMM's stderr
//!     monitor.log           the monitor's own messages
//!     exit.json             how the VMM ended, written by its monitor
//!     stopping              present once DELETE asked the VM to stop
//! ```
//!
//! Files are replaced atomically (write a temporary file, then rename), so a daemon killed
//! mid-write leaves the old or the new version, never half of one.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::procfs::ProcessId;
use crate::spec::VmSpec;

/// The daemon's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

/// The running daemon's hold on the directory; released when dropped (or when it dies).
#[derive(Debug)]
pub struct DirLock(#[allow(dead_code)] File);

impl StateDir {
    /// Creates the directory (0700) and its `vms/` if missing.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root.join("vms"))?;
        Ok(Self { root })
    }

    /// The state directory's path.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes the directory for this daemon; fails if another daemon holds it.
    pub fn lock(&self) -> io::Result<DirLock> {
        let path = self.root.join("hostd.lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)?;
        // SAFETY: flock(2) on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "{} is held by another hostd ({e}); one daemon per state directory",
                    path.display()
                ),
            ));
        }
        Ok(DirLock(f))
    }

    /// `host.json`: the host settings `PUT /host/memory` saved.
    pub fn host_settings(&self) -> PathBuf {
        self.root.join("host.json")
    }

    /// The directory of VM `id` (it may not exist).
    pub fn vm(&self, id: &str) -> VmDir {
        VmDir {
            path: self.root.join("vms").join(id),
        }
    }

    /// Ids of every VM directory, sorted.
    pub fn vm_ids(&self) -> io::Result<Vec<String>> {
        let mut ids: Vec<String> = std::fs::read_dir(self.root.join("vms"))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        ids.sort();
        Ok(ids)
    }
}

/// What the monitor records once the VMM runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmRecord {
    /// The VMM process.
    pub vmm: ProcessId,
    /// Its monitor process (this binary, which waits for the VMM).
    pub monitor: ProcessId,
    /// The VMM's API socket.
    pub api_socket: PathBuf,
    /// When the VMM started.
    pub started_at_unix_ms: u64,
}

/// How the VMM ended, as its monitor saw it (`waitpid`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// Exit code, when it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// Signal, when a signal killed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Why it could not be started at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it ended (or the start failed).
    pub at_unix_ms: u64,
}

/// One VM's directory.
#[derive(Debug, Clone)]
pub struct VmDir {
    /// The directory's path.
    pub path: PathBuf,
}

impl VmDir {
    /// `spec.json`: the VM as created.
    pub fn spec_file(&self) -> PathBuf {
        self.path.join("spec.json")
    }
    /// `api.sock`: the VMM's API socket.
    pub fn api_socket(&self) -> PathBuf {
        self.path.join("api.sock")
    }
    /// `console.log`: the guest's serial output.
    pub fn console_log(&self) -> PathBuf {
        self.path.join("console.log")
    }
    /// `console.in`: a FIFO typed into the guest's serial console.
    pub fn console_in(&self) -> PathBuf {
        self.path.join("console.in")
    }
    /// `vmm.log`: the VMM's stderr.
    pub fn vmm_log(&self) -> PathBuf {
        self.path.join("vmm.log")
    }
    /// `monitor.log`: the monitor's own messages.
    pub fn monitor_log(&self) -> PathBuf {
        self.path.join("monitor.log")
    }
    fn vmm_file(&self) -> PathBuf {
        self.path.join("vmm.json")
    }
    fn exit_file(&self) -> PathBuf {
        self.path.join("exit.json")
    }
    fn stopping_file(&self) -> PathBuf {
        self.path.join("stopping")
    }

    /// Makes the directory for a new VM: spec and console FIFO. Fails if it exists.
    pub fn create(&self, spec: &VmSpec) -> io::Result<()> {
        std::fs::DirBuilder::new().mode(0o700).create(&self.path)?;
        let made = mkfifo(&self.console_in()).and_then(|()| self.write_spec(spec));
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
        made
    }

    /// Saves the VM's spec.
    pub fn write_spec(&self, spec: &VmSpec) -> io::Result<()> {
        write_json(&self.spec_file(), spec)
    }
    /// Reads the VM's spec.
    pub fn read_spec(&self) -> io::Result<VmSpec> {
        read_json(&self.spec_file())
    }
    /// Saves the running VMM's record (the monitor does).
    pub fn write_vmm(&self, r: &VmmRecord) -> io::Result<()> {
        write_json(&self.vmm_file(), r)
    }
    /// `Ok(None)` when the monitor has not written it (yet).
    pub fn read_vmm(&self) -> io::Result<Option<VmmRecord>> {
        optional(read_json(&self.vmm_file()))
    }
    /// Saves how the VMM ended (the monitor does).
    pub fn write_exit(&self, r: &ExitRecord) -> io::Result<()> {
        write_json(&self.exit_file(), r)
    }
    /// How the VMM ended; `Ok(None)` before it has.
    pub fn read_exit(&self) -> io::Result<Option<ExitRecord>> {
        optional(read_json(&self.exit_file()))
    }
    /// Marks the VM as being deleted, so a restarted daemon finishes the stop.
    pub fn mark_stopping(&self) -> io::Result<()> {
        File::create(self.stopping_file()).map(|_| ())
    }
    /// Whether a stop was asked for.
    pub fn is_stopping(&self) -> bool {
        self.stopping_file().exists()
    }
    /// Deletes the VM's directory and everything in it.
    pub fn remove(&self) -> io::Result<()> {
        std::fs::remove_dir_all(&self.path)
    }

    /// The last `n` lines of the VMM's stderr (read from at most its last 16 KiB).
    pub fn vmm_log_tail(&self, n: usize) -> Vec<String> {
        tail_lines(&self.vmm_log(), n, 16 * 1024).unwrap_or_default()
    }
}

/// The last `n` lines of a file, reading at most its last `max_bytes`.
fn tail_lines(path: &Path, n: usize, max_bytes: u64) -> io::Result<Vec<String>> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max_bytes)))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    Ok(lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect())
}

fn optional<T>(r: io::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `value` as JSON to `path` atomically: a temporary file beside it, synced, renamed.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other("no file name"))?;
    let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    serde_json::to_writer_pretty(&mut f, value).map_err(io::Error::other)?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Reads and parses a JSON file; a parse error is an `InvalidData` error naming the file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> io::Result<T> {
    let text = std::fs::read(path)?;
    serde_json::from_slice(&text).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })
}

fn mkfifo(path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Milliseconds since the Unix epoch, for records a person reads.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hostd-statedir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn one_daemon_per_directory() {
        let dir = StateDir::open(scratch("lock")).unwrap();
        let held = dir.lock().unwrap();
        let e = dir.lock().unwrap_err().to_string();
        assert!(e.contains("held by another hostd"), "{e}");
        drop(held);
        dir.lock().unwrap();
        std::fs::remove_dir_all(dir.root()).unwrap();
    }

    #[test]
    fn tail_returns_the_last_lines() {
        let root = scratch("tail");
        std::fs::create_dir_all(&root).unwrap();
        let f = root.join("log");
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&f, text).unwrap();
        assert_eq!(
            tail_lines(&f, 2, 1 << 20).unwrap(),
            vec!["line 98", "line 99"]
        );
        // A window that cuts a line keeps only whole lines at the end.
        assert_eq!(tail_lines(&f, 1, 9).unwrap(), vec!["line 99"]);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
