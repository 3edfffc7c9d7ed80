//! Shared test harness: a fake VMM thread behind a real server on a Unix socket in a temp dir.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use api::client::{Client, Reply};
use api::fake::{FakeVmm, FakeVmmConfig};
use api::{spawn_server, ServerConfig, ServerHandle};
use hyper::Method;
use serde_json::Value;

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
    // Field order matters: the server stops before the fake VMM and the directory go.
    pub server: Option<ServerHandle>,
    pub fake: FakeVmm,
    pub socket: PathBuf,
    pub dir: TempDir,
}

impl Harness {
    pub fn start() -> Self {
        Self::start_with(|_| {}, FakeVmmConfig::default())
    }

    pub fn start_with(tweak: impl FnOnce(&mut ServerConfig), fake_cfg: FakeVmmConfig) -> Self {
        let dir = TempDir::new();
        let socket = dir.path().join("api.sock");
        let fake = FakeVmm::spawn(fake_cfg);
        let mut cfg = ServerConfig::new(&socket);
        tweak(&mut cfg);
        let server = spawn_server(cfg, fake.sender(), fake.wake_fn()).unwrap();
        Self {
            server: Some(server),
            fake,
            socket,
            dir,
        }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.socket)
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
    let (got, v) = req(c, method, path, body).await;
    assert_eq!(got, status, "{method} {path} {body:?} -> {v}");
    let msg = v["fault_message"]
        .as_str()
        .unwrap_or_else(|| panic!("no fault_message in {v}"));
    for n in needles {
        assert!(msg.contains(n), "{method} {path}: {msg:?} lacks {n:?}");
    }
}

/// Polls `path` until `done` holds or the deadline passes.
pub async fn wait_for(
    c: &mut Client,
    path: &str,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let (status, v) = req(c, "GET", path, None).await;
        assert_eq!(status, 200, "GET {path} -> {v}");
        if done(&v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting on {path}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Configures and boots the fake VM: 1024 MiB, a balloon with stats, 2048 MiB hot-add.
pub async fn boot(c: &mut Client) {
    for (method, path, body) in [
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
    ] {
        let (status, v) = req(c, method, path, Some(body)).await;
        assert_eq!(status, 204, "{method} {path} -> {v}");
    }
}
