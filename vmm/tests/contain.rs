//! Containment, as an operator sees it: each kind of thread runs under its own seccomp filter (a
//! forbidden call made on purpose on that thread ends the VMM with status 70 and a message that
//! names the thread and the call), `--seccomp=log` reports and goes on, `--seccomp=off` filters
//! nothing, and a VMM started as root with `--uid`/`--gid` runs with no capabilities as that
//! user. Tiny guests on /dev/kvm (SKIPPED without it); the privilege tests need root.

mod common;
use common::{kvm_usable, scratch, tiny_elf, Vmm, SLEEP};

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The documented exit status of a seccomp violation.
const EXIT_SECCOMP: i32 = 70;

/// A user and group that exist on every Debian system and own nothing (nobody, nogroup).
const NOBODY: u32 = 65534;

impl Vmm {
    /// Starts `vmm --kernel tiny --api-socket DIR/api.sock ARGS` with `env`.
    fn spawn(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Vmm {
        let kernel = dir.join("tiny.elf");
        std::fs::write(&kernel, tiny_elf(&SLEEP)).unwrap();
        let socket = dir.join("api.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_vmm"))
            .args(["--kernel", kernel.to_str().unwrap(), "--memory-mib", "32"])
            .args(["--api-socket", socket.to_str().unwrap()])
            .args(["--serial", dir.join("serial.out").to_str().unwrap()])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Vmm { child, socket }
    }

    /// Waits until the VM runs (the API says so), failing if the VMM exits first.
    fn wait_running(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("vmm exited {st:?} before its VM ran: {}", self.stderr());
            }
            if UnixStream::connect(&self.socket).is_ok()
                && self.call("GET", "/", None).1.contains("Running")
            {
                return;
            }
            assert!(Instant::now() < deadline, "the VM never ran");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A field of /proc/PID/status (or of one of its threads' with `task`).
    fn status(&self, task: Option<&str>, field: &str) -> String {
        let pid = self.child.id();
        let path = match task {
            Some(t) => format!("/proc/{pid}/task/{t}/status"),
            None => format!("/proc/{pid}/status"),
        };
        let text = std::fs::read_to_string(path).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
            .trim()
            .to_string()
    }

    /// (name, Seccomp field) of every thread of ours once they all show filter mode (2), or as
    /// they are after 5 s. The main thread installs its filter just before the event loop's
    /// first turn, a moment after the API already says the VM runs.
    fn threads_filtered(&self) -> Vec<(String, String)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let t = self.threads_seccomp();
            if t.iter().all(|(_, s)| s == "2") || Instant::now() > deadline {
                return t;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// (name, Seccomp field) of every thread of ours (not KVM's kernel threads, which the task
    /// list shows too).
    fn threads_seccomp(&self) -> Vec<(String, String)> {
        let pid = self.child.id();
        let mut out = Vec::new();
        for e in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let tid = e.unwrap().file_name().into_string().unwrap();
            let name = self.status(Some(&tid), "Name");
            if name.starts_with("kvm") {
                continue;
            }
            out.push((name, self.status(Some(&tid), "Seccomp")));
        }
        out.sort();
        out
    }
}

/// A forbidden call made on purpose on `kind`'s thread (named `thread`) ends the VMM with 70 and
/// the documented message.
fn violation_ends_the_vmm(kind: &str, thread: &str) {
    if !kvm_usable() {
        eprintln!("SKIPPED: seccomp self-test on the {kind} thread: no /dev/kvm");
        return;
    }
    let dir = scratch(&format!("seccomp-{kind}"));
    let mut vmm = Vmm::spawn(&dir, &[], &[("VMM_SECCOMP_SELFTEST", kind)]);
    let status = vmm.wait(Duration::from_secs(20), "its end").0;
    let stderr = vmm.stderr();
    assert_eq!(status.code(), Some(EXIT_SECCOMP), "{status:?}: {stderr}");
    let want = format!(
        "vmm: seccomp: thread '{thread}' ({kind} filter) made a forbidden system call: 41 \
         (socket); exiting with status 70"
    );
    assert!(stderr.contains(&want), "want {want:?} in:\n{stderr}");
}

#[test]
fn a_forbidden_call_on_a_vcpu_thread_ends_the_vmm() {
    violation_ends_the_vmm("vcpu", "vcpu0");
}

#[test]
fn a_forbidden_call_on_the_event_loop_thread_ends_the_vmm() {
    violation_ends_the_vmm("vmm", "main");
}

#[test]
fn a_forbidden_call_on_the_api_thread_ends_the_vmm() {
    violation_ends_the_vmm("api", "vmm-api");
}

#[test]
fn a_forbidden_call_on_the_signal_thread_ends_the_vmm() {
    violation_ends_the_vmm("signals", "vmm-signals");
}

#[test]
fn every_thread_runs_filtered_and_a_working_run_logs_nothing() {
    if !kvm_usable() {
        eprintln!("SKIPPED: every_thread_runs_filtered: no /dev/kvm");
        return;
    }
    let dir = scratch("seccomp-log-clean");
    let mut vmm = Vmm::spawn(
        &dir,
        &["--seccomp=log", "--balloon", "stats_interval_s=1"],
        &[],
    );
    vmm.wait_running();
    // Seccomp 2: filter mode, on every thread (the kernel's own view). The main thread's name
    // in /proc is the process's, "vmm"; KVM's own kernel thread for the VM is listed too.
    let threads = vmm.threads_filtered();
    for name in ["vmm", "vcpu0", "vmm-api", "vmm-signals"] {
        assert!(
            threads.iter().any(|(n, _)| n == name),
            "no thread {name}: {threads:?}"
        );
    }
    assert!(threads.iter().all(|(_, s)| s == "2"), "{threads:?}");
    for path in [
        "/",
        "/vm/memory",
        "/metrics",
        "/balloon",
        "/balloon/statistics",
    ] {
        assert_eq!(vmm.call("GET", path, None).0, 200, "{path}");
    }
    vmm.signal(libc::SIGTERM);
    let status = vmm.wait(Duration::from_secs(10), "its end").0;
    let stderr = vmm.stderr();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert!(!stderr.contains("seccomp"), "{stderr}");
    assert!(!vmm.socket.exists(), "the API socket was left behind");
}

#[test]
fn log_mode_reports_a_forbidden_call_and_goes_on() {
    if !kvm_usable() {
        eprintln!("SKIPPED: log_mode_reports_a_forbidden_call_and_goes_on: no /dev/kvm");
        return;
    }
    let dir = scratch("seccomp-log");
    let mut vmm = Vmm::spawn(&dir, &["--seccomp=log"], &[("VMM_SECCOMP_SELFTEST", "api")]);
    vmm.wait_running();
    vmm.signal(libc::SIGTERM);
    let status = vmm.wait(Duration::from_secs(10), "its end").0;
    let stderr = vmm.stderr();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    // socket(AF_INET, SOCK_STREAM, 0); the fourth register is whatever was there.
    let want = "vmm: seccomp (log mode): thread 'vmm-api' (api filter) made a forbidden system \
                call: 41 (socket, args 0x2 0x1 0x0 0x";
    let line = stderr.lines().find(|l| l.starts_with(want));
    assert!(
        line.is_some_and(|l| l.ends_with("; it fails with ENOSYS")),
        "want {want:?}... in:\n{stderr}"
    );
}

#[test]
fn seccomp_off_filters_nothing_and_says_so() {
    if !kvm_usable() {
        eprintln!("SKIPPED: seccomp_off_filters_nothing_and_says_so: no /dev/kvm");
        return;
    }
    let dir = scratch("seccomp-off");
    let mut vmm = Vmm::spawn(
        &dir,
        &["--seccomp=off"],
        &[("VMM_SECCOMP_SELFTEST", "vcpu")],
    );
    vmm.wait_running();
    let threads = vmm.threads_seccomp();
    assert!(threads.iter().all(|(_, s)| s == "0"), "{threads:?}");
    vmm.signal(libc::SIGTERM);
    let status = vmm.wait(Duration::from_secs(10), "its end").0;
    let stderr = vmm.stderr();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert!(
        stderr.contains("vmm: warning: seccomp filters are off (--seccomp=off)"),
        "{stderr}"
    );
}

impl Vmm {
    /// Runs as nobody: that uid and gid, no groups, no capabilities in any set, no_new_privs,
    /// and every thread filtered.
    fn assert_dropped_to_nobody(&self) {
        let id = NOBODY.to_string();
        for field in ["Uid", "Gid"] {
            let v = self.status(None, field);
            assert!(v.split_whitespace().all(|x| x == id), "{field} {v}");
        }
        assert_eq!(self.status(None, "Groups"), "");
        for cap in ["CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"] {
            assert_eq!(self.status(None, cap), "0000000000000000", "{cap}");
        }
        assert_eq!(self.status(None, "NoNewPrivs"), "1");
        let threads = self.threads_filtered();
        assert!(threads.iter().all(|(_, s)| s == "2"), "{threads:?}");
    }

    /// SIGTERM ends it with 128 + 15, and its API socket goes with it.
    fn assert_sigterm_ends_it_and_removes_its_socket(&mut self) {
        self.signal(libc::SIGTERM);
        let status = self.wait(Duration::from_secs(10), "its end").0;
        let stderr = self.stderr();
        assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{stderr}");
        assert!(
            !self.socket.exists(),
            "the API socket was left behind: {stderr}"
        );
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn started_as_root_with_uid_it_runs_as_that_user_with_no_capabilities() {
    if !kvm_usable() || !is_root() {
        eprintln!("SKIPPED: privilege drop: needs /dev/kvm and root");
        return;
    }
    let dir = scratch("drop");
    // The VMM's own directory, as hostd gives each VM: writable by its user, so the VMM can
    // remove its socket there after the drop.
    std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
    let id = NOBODY.to_string();
    let mut vmm = Vmm::spawn(&dir, &["--uid", &id, "--gid", &id], &[]);
    vmm.wait_running();
    vmm.assert_dropped_to_nobody();
    // The socket is the VMM's user's, so it can remove it on exit.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&vmm.socket).unwrap().uid(), NOBODY);
    vmm.assert_sigterm_ends_it_and_removes_its_socket();
}

#[test]
fn jailed_it_sees_no_host_file_and_still_serves_its_vm() {
    if !kvm_usable() || !is_root() {
        eprintln!("SKIPPED: jail: needs /dev/kvm and root");
        return;
    }
    let dir = scratch("jail");
    std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
    let id = NOBODY.to_string();
    let mut vmm = Vmm::spawn(&dir, &["--uid", &id, "--gid", &id, "--jail"], &[]);
    vmm.wait_running();
    let pid = vmm.child.id();
    // Its mount namespace is its own and holds one mount: the empty, read-only root.
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
    assert_ne!(
        ns(&pid.to_string()),
        ns("self"),
        "still in the host's mount namespace"
    );
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let lines: Vec<&str> = mounts.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "more than the empty root is mounted: {mounts}"
    );
    let fields: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(fields[4], "/", "{mounts}");
    assert!(
        fields[5].split(',').any(|o| o == "ro"),
        "not read-only: {mounts}"
    );
    assert!(lines[0].contains(" - tmpfs "), "{mounts}");
    let root: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .collect();
    assert!(root.is_empty(), "its root is not empty: {root:?}");
    // Dropped as without the jail, every thread filtered.
    vmm.assert_dropped_to_nobody();
    // What it opened before keeps working: the API, and its own figures from /proc/self/statm.
    let (code, body) = vmm.call("GET", "/vm/memory?limit=1", None);
    assert_eq!(code, 200, "{body}");
    let map: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        map["host"]["process_rss_bytes"].as_u64().unwrap_or(0) > 0,
        "{body}"
    );
    vmm.assert_sigterm_ends_it_and_removes_its_socket();
}

#[test]
fn jail_without_uid_or_a_kernel_is_refused_as_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["--kernel", "/nonexistent", "--jail"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("--uid"), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["--api-socket", "/nonexistent/api.sock"])
        .args(["--uid", "1000", "--gid", "1000", "--jail"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("--jail needs the VM on the command line (--kernel or --config)"),
        "{stderr}"
    );
}

#[test]
fn uid_zero_is_refused_as_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["--kernel", "/nonexistent", "--uid", "0", "--gid", "0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("0 is root"), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["--kernel", "/nonexistent", "--uid", "1000"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("--gid"), "{stderr}");
}

#[test]
fn configured_through_the_api_after_the_drop_it_boots_as_that_user() {
    if !kvm_usable() || !is_root() {
        eprintln!("SKIPPED: privilege drop through the API: needs /dev/kvm and root");
        return;
    }
    let dir = scratch("drop-api");
    std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
    // The kernel is opened after the drop: it must be readable by that user.
    let kernel = dir.join("tiny.elf");
    std::fs::write(&kernel, tiny_elf(&SLEEP)).unwrap();
    let socket = dir.join("api.sock");
    let id = NOBODY.to_string();
    let child = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["--api-socket", socket.to_str().unwrap()])
        .args(["--uid", &id, "--gid", &id])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut vmm = Vmm { child, socket };
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&vmm.socket).is_err() {
        assert!(Instant::now() < deadline, "the API never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
    let put = |path: &str, body: &str| {
        let mut s = UnixStream::connect(&vmm.socket).unwrap();
        write!(
            s,
            "PUT {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        resp
    };
    let src = format!(r#"{{"kernel_image_path":"{}"}}"#, kernel.display());
    assert!(put("/boot-source", &src).starts_with("HTTP/1.1 204"));
    let mc = r#"{"vcpu_count":1,"mem_size_mib":32}"#;
    assert!(put("/machine-config", mc).starts_with("HTTP/1.1 204"));
    let r = put("/actions", r#"{"action_type":"InstanceStart"}"#);
    assert!(r.starts_with("HTTP/1.1 204"), "{r}");
    vmm.wait_running();
    assert!(vmm.status(None, "Uid").split_whitespace().all(|u| u == id));
    assert_eq!(vmm.status(None, "CapEff"), "0000000000000000");
    let threads = vmm.threads_filtered();
    assert!(threads.iter().all(|(_, s)| s == "2"), "{threads:?}");
    vmm.signal(libc::SIGTERM);
    let status = vmm.wait(Duration::from_secs(10), "its end").0;
    let stderr = vmm.stderr();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert!(
        !vmm.socket.exists(),
        "the API socket was left behind: {stderr}"
    );
}
