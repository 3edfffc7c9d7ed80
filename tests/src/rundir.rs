//! Where a test binary's test host keeps its files (console log, QEMU monitor socket, kernel
//! symbols), and how the files of earlier runs go.
//!
//! Layout: `BASE/RUN/HOST/`, where RUN names one run of the suite and HOST one test binary's
//! test host (`boot-12345`: the binary's name and process ID). A run is what `E2E_RUN` names
//! (resources/test-all.sh sets it once for all its test binaries); without it, the `cargo test`
//! process that started the binary (its parent), so every binary of one `cargo test` shares a
//! run. A new run removes the directories of every other run, so build/testhost/ keeps the
//! last run's files only: a failed binary's evidence survives the binaries after it in the same
//! run, and goes when the next run starts.
//!
//! A host directory is never removed while its test host may run: its owner holds an exclusive
//! `flock` on `HOST/lock` for as long as it lives (the test host's QEMU dies with it), and a
//! directory whose lock is held is left alone.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The name of the lock file in each host directory.
const LOCK: &str = "lock";

/// One test host's directory, locked while this value lives.
#[derive(Debug)]
pub struct HostDir {
    path: PathBuf,
    /// Holds the lock; closing it releases the lock.
    _lock: File,
}

impl HostDir {
    /// Creates and locks `base/run/host/` after removing the directories of every other run
    /// under `base` that no living process holds. Removal failures are reported on stderr and
    /// do not stop the test host.
    pub fn create(base: &Path, run: &str, host: &str) -> io::Result<HostDir> {
        remove_other_runs(base, run);
        let path = base.join(run).join(host);
        std::fs::create_dir_all(&path)?;
        let lock = File::create(path.join(LOCK))?;
        if !try_lock(&lock)? {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} is locked by another test host", path.display()),
            ));
        }
        Ok(HostDir { path, _lock: lock })
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The run this process belongs to: `E2E_RUN`, or `ppid-N` for the process that started it.
pub fn run_id() -> String {
    match std::env::var("E2E_RUN") {
        Ok(r) if is_plain_name(&r) => r,
        _ => {
            // SAFETY: getppid has no preconditions and cannot fail.
            let ppid = unsafe { libc::getppid() };
            format!("ppid-{ppid}")
        }
    }
}

/// `name-PID` for this test binary: its file name without cargo's hash suffix.
pub fn host_name() -> String {
    let exe = std::env::current_exe().ok();
    let stem = exe
        .as_deref()
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
        .unwrap_or("e2e");
    let name = match stem.rsplit_once('-') {
        Some((name, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            name
        }
        _ => stem,
    };
    format!("{name}-{}", std::process::id())
}

/// A run name safe as one path component.
fn is_plain_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Takes the exclusive lock without waiting; false when another open file holds it.
fn try_lock(f: &File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor this File owns; no memory is passed.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        _ => Err(e),
    }
}

/// Whether a living process holds `dir`'s lock (a directory without one is not in use).
fn in_use(dir: &Path) -> bool {
    match File::open(dir.join(LOCK)) {
        Ok(f) => !matches!(try_lock(&f), Ok(true)),
        Err(e) => e.kind() != io::ErrorKind::NotFound,
    }
}

fn remove_other_runs(base: &Path, run: &str) {
    let Ok(runs) = std::fs::read_dir(base) else {
        return;
    };
    for r in runs.flatten() {
        if r.file_name() == run || !r.path().is_dir() {
            continue;
        }
        let hosts: Vec<PathBuf> = match std::fs::read_dir(r.path()) {
            Ok(h) => h.flatten().map(|h| h.path()).collect(),
            Err(_) => continue,
        };
        for host in hosts {
            if host.is_dir() && !in_use(&host) {
                if let Err(e) = std::fs::remove_dir_all(&host) {
                    eprintln!("e2e: cannot remove {}: {e}", host.display());
                }
            }
        }
        // Succeeds only once every host directory of that run is gone.
        let _ = std::fs::remove_dir(r.path());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("e2e-rundir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
    }

    #[test]
    fn a_new_run_keeps_its_own_files_and_removes_earlier_runs() {
        let base = scratch("runs");
        // An earlier run whose test hosts are gone: a console log and a stale socket name.
        touch(&base.join("old/boot-1/console.log"));
        touch(&base.join("old/boot-1/kallsyms.txt"));
        touch(&base.join("old/boot-1/lock"));
        touch(&base.join("old/balloon-2/console.log"));
        // The first binary of this run, failed and ended: its evidence must stay for the run.
        touch(&base.join("now/boot-3/console.log"));
        touch(&base.join("now/boot-3/lock"));
        let h = HostDir::create(&base, "now", "balloon-4").unwrap();
        assert_eq!(h.path(), base.join("now/balloon-4"));
        assert!(
            !base.join("old").exists(),
            "the earlier run's files are gone"
        );
        assert!(base.join("now/boot-3/console.log").exists());
        // The next run removes this run's ended hosts but not a living one (h holds its lock).
        let next = HostDir::create(&base, "next", "boot-5").unwrap();
        assert!(!base.join("now/boot-3").exists());
        assert!(
            base.join("now/balloon-4/lock").exists(),
            "a living host is kept"
        );
        drop(h);
        // A child another test forks at this moment holds a copy of h's lock descriptor until it
        // execs (the lock is the open file's, not the process's): give that a moment to pass.
        let mut _after = Vec::new();
        for i in 0..40 {
            _after.push(HostDir::create(&base, &format!("after{i}"), "boot-6").unwrap());
            if !base.join("now").exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(!base.join("now").exists(), "an ended host's run is removed");
        assert!(base.join("next/boot-5").exists(), "locked by `next`");
        drop(next);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_locked_host_directory_cannot_be_taken_twice() {
        let base = scratch("twice");
        let _a = HostDir::create(&base, "r", "boot-1").unwrap();
        let err = HostDir::create(&base, "r", "boot-1").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn run_and_host_names_are_single_path_components() {
        assert!(is_plain_name("20261126-0812-4242"));
        for bad in ["", ".", "..", "a/b", "a b"] {
            assert!(!is_plain_name(bad), "{bad:?}");
        }
        let h = host_name();
        assert!(h.ends_with(&format!("-{}", std::process::id())), "{h}");
        assert!(!h.contains('/'), "{h}");
    }
}
