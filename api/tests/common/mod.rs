//! Shared test harness: the real server on a Unix socket in a temp dir, and behind it the VMM's
//! real request handler, devices and memory manager without KVM (`vmm::testing`), with a
//! simulated guest that moves the balloon and the plugged size when the test says
//! [`Harness::settle`]. Every answer is the VMM's own.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use api::client::{Client, Reply};
use api::{ServerConfig, ServerHandle};
use hyper::Method;
use serde_json::Value;
use vmm::testing::{HeadlessOptions, HeadlessVmm};

/// A private temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "api-t{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Harness {
    // Field order matters: the server stops before the VMM and the directory go.
    pub server: Option<ServerHandle>,
    pub vmm: HeadlessVmm,
    pub socket: PathBuf,
    pub dir: TempDir,
}

impl Harness {
    pub fn start() -> Self {
        Self::start_with(|_| {}, HeadlessOptions::default())
    }

    pub fn start_with(tweak: impl FnOnce(&mut ServerConfig), opts: HeadlessOptions) -> Self {
        let dir = TempDir::new();
        let socket = dir.path().join("api.sock");
        let mut cfg = ServerConfig::new(&socket);
        tweak(&mut cfg);
        let (server, vmm) = HeadlessVmm::serve(cfg, opts).unwrap();
        Self {
            server: Some(server),
            vmm,
            socket,
            dir,
        }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.socket)
    }

    /// The guest does what the devices ask, and the VMM reacts, until nothing moves.
    pub fn settle(&self) {
        self.vmm.settle();
    }
}

/// Sends a request and returns the status and the body as JSON (Null when empty or not JSON).
pub async fn req(c: &mut Client, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let reply = raw(c, method, path, body).await;
    let v = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
    (reply.status.as_u16(), v)
}

pub async fn raw(c: &mut Client, method: &str, path: &str, body: Option<&str>) -> Reply {
    let method = Method::from_bytes(method.as_bytes()).unwrap();
    c.raw(method, path, body.map(|b| b.as_bytes().to_vec()))
        .await
        .unwrap()
}

/// Asserts an error answer: status and a fault_message containing every needle.
pub async fn expect_fault(
    c: &mut Client,
    method: &str,
    path: &str,
    body: Option<&str>,
    status: u16,
    needles: &[&str],
) {
    let msg = fault(c, method, path, body, status).await;
    for n in needles {
        assert!(msg.contains(n), "{method} {path}: {msg:?} lacks {n:?}");
    }
}

/// The fault_message of an error answer with `status`.
pub async fn fault(
    c: &mut Client,
    method: &str,
    path: &str,
    body: Option<&str>,
    status: u16,
) -> String {
    let (got, v) = req(c, method, path, body).await;
    assert_eq!(got, status, "{method} {path} {body:?} -> {v}");
    v["fault_message"]
        .as_str()
        .unwrap_or_else(|| panic!("no fault_message in {v}"))
        .to_owned()
}

/// GET `path`, expecting 200.
pub async fn get(c: &mut Client, path: &str) -> Value {
    let (status, v) = req(c, "GET", path, None).await;
    assert_eq!(status, 200, "GET {path} -> {v}");
    v
}

/// The configuration [`boot`] gives: 1024 MiB, a balloon with statistics, 2048 MiB hot-add.
pub const BOOT_REQUESTS: [(&str, &str, &str); 5] = [
    (
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0"}"#,
    ),
    (
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 1024}"#,
    ),
    (
        "PUT",
        "/balloon",
        r#"{"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 1}"#,
    ),
    (
        "PUT",
        "/hotplug/memory",
        r#"{"total_size_mib": 2048, "block_size_mib": 2}"#,
    ),
    ("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
];

/// Configures and starts the VM (see [`BOOT_REQUESTS`]).
pub async fn boot(c: &mut Client) {
    for (method, path, body) in BOOT_REQUESTS {
        let (status, v) = req(c, method, path, Some(body)).await;
        assert_eq!(status, 204, "{method} {path} -> {v}");
    }
}
