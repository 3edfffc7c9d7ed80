//! What hostd's integration tests share: the real `hostd` binary started on a scratch state
//! directory, a small blocking HTTP client for its socket, a fake `vmm` (a shell script, so a
//! real process that exits or is killed as a test says), and clean-up of every VMM a test
//! started, even when it fails.

#![allow(dead_code)] // each test binary uses its own subset

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use hostd::procfs::Liveness;
use hostd::statedir::StateDir;
use serde_json::Value;

/// A scratch directory; dropping it kills every VMM (and monitor) recorded in its state
/// directories and removes it.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    /// Short paths: the VMMs' sockets live below and Unix limits their length.
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("hd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self { path }
    }

    pub fn state(&self) -> PathBuf {
        self.path.join("state")
    }

    /// Writes a "kernel" for the fake VMM: a shell script it runs in its place.
    pub fn kernel(&self, name: &str, script: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::write(&p, script).unwrap();
        p
    }

    /// The fake `vmm`: prints its arguments to stderr and runs its `--kernel` as a shell script
    /// (so one test's VMM sleeps, another's exits 3, another ignores SIGTERM).
    pub fn fake_vmm(&self) -> PathBuf {
        let p = self.path.join("fake-vmm");
        std::fs::write(
            &p,
            "#!/bin/sh\necho \"fake-vmm args: $*\" >&2\n\
             while [ $# -gt 0 ]; do case \"$1\" in --kernel) k=$2; shift 2 ;; *) shift ;; esac; done\n\
             exec sh \"$k\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Ok(state) = StateDir::open(self.state()) {
            for id in state.vm_ids().unwrap_or_default() {
                if let Ok(Some(r)) = state.vm(&id).read_vmm() {
                    let _ = r.vmm.signal(libc::SIGKILL);
                    let _ = r.monitor.signal(libc::SIGKILL);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A running `hostd`.
pub struct Hostd {
    child: Option<Child>,
    pub socket: PathBuf,
    pub state: PathBuf,
}

impl Hostd {
    /// `hostd --state-dir STATE --vmm VMM ARGS...`, once its API answers.
    pub fn start(state: &Path, vmm: &Path, args: &[&str]) -> Hostd {
        let socket = state.join("hostd.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_hostd"))
            .arg("--state-dir")
            .arg(state)
            .arg("--vmm")
            .arg(vmm)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut h = Hostd {
            child: Some(child),
            socket,
            state: state.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = request(&h.socket, "GET", "/", None) {
                return h;
            }
            if let Some(st) = h.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("hostd exited at start: {st}");
            }
            assert!(Instant::now() < deadline, "hostd's API never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// One request; (status, JSON body or Null).
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let (status, text) = request(&self.socket, method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A request that must answer `want`; returns the body.
    pub fn expect(&self, method: &str, path: &str, body: Option<&str>, want: u16) -> Value {
        let (status, v) = self.call(method, path, body);
        assert_eq!(status, want, "{method} {path} {body:?}: {v}");
        v
    }

    /// Polls `GET /vms/{id}` until `pred` holds.
    pub fn wait_vm(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, v) = self.call("GET", &format!("/vms/{id}"), None);
            if status == 200 && pred(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for VM {id} to be {what}: {status} {v}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM and wait: how the daemon ended.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().unwrap()
    }

    /// SIGKILL and wait.
    pub fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Hostd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A VM spec for `POST /vms`.
pub fn vm_json(id: &str, kernel: &Path, boot: u64, min: u64, max: u64) -> String {
    format!(
        r#"{{"id":"{id}","kernel":"{}","memory":{{"boot_mib":{boot},"min_mib":{min},"max_mib":{max}}}}}"#,
        kernel.display()
    )
}

/// Whether the process recorded for VM `id` in `state` is alive.
pub fn vmm_alive(state: &Path, id: &str) -> bool {
    let dir = StateDir::open(state).unwrap();
    dir.vm(id)
        .read_vmm()
        .unwrap()
        .is_some_and(|r| r.vmm.liveness() == Liveness::Alive)
}

/// One HTTP/1.1 request over the Unix socket; (status, body).
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad answer {resp:?}")))?;
    let body = resp.split_once("\r\n\r\n").map_or("", |x| x.1).to_string();
    Ok((status, body))
}
