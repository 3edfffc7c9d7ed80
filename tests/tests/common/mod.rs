//! Shared helpers of the memory end-to-end tests (balloon.rs, hotplug.rs, api_e2e.rs), built only
//! on the public harness API (`e2e::TestHost`, `e2e::Vm`): boot a guest to its shell, read its
//! /proc/meminfo, read stable host RSS figures, call the REST API as JSON, poll until a
//! condition holds, and run `vmmctl` against a VM wherever it runs.
//!
//! Conventions: sizes from the guest are KiB (as /proc/meminfo prints them), sizes from the API
//! are what the field name says (`_mib`, `_pages`, `_bytes`); `MIB_KIB` converts.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// KiB in a MiB.
pub const MIB_KIB: u64 = 1024;
/// A guest shell command that should answer promptly (the nested host is slow).
pub const CMD: Duration = Duration::from_secs(60);
/// Boot to VMM-GUEST-READY; ~45 s in the nested host when idle, more under load.
pub const BOOT: Duration = Duration::from_secs(300);

/// The kernel command line of these tests: the harness's, plus `pci=off` (the VMM has no PCI;
/// probing for it only costs boot time), plus the scenario.
pub fn cmdline(scenario: &str) -> String {
    let mut c = e2e::GUEST_CMDLINE.to_string();
    if !c.contains("pci=off") {
        c.push_str(" pci=off");
    }
    c.push_str(" scenario=");
    c.push_str(scenario);
    c
}

/// Starts `vmm --kernel .. --initramfs .. --cmdline .. --vcpus 1 --memory-mib MIB EXTRA..` and
/// waits for the guest's shell. Prints the boot time.
pub fn boot(host: &e2e::TestHost, memory_mib: u64, extra: &[&str]) -> e2e::Vm {
    boot_with_cmdline(host, memory_mib, "", extra)
}

/// [`boot`] with `kernel_args` added to the guest's command line.
pub fn boot_with_cmdline(
    host: &e2e::TestHost,
    memory_mib: u64,
    kernel_args: &str,
    extra: &[&str],
) -> e2e::Vm {
    let kernel = host.guest_kernel();
    let initramfs = host.guest_initramfs();
    let mut cmdline = cmdline("stay");
    if !kernel_args.is_empty() {
        cmdline = format!("{cmdline} {kernel_args}");
    }
    let mem = memory_mib.to_string();
    let mut args = vec![
        "--kernel",
        &kernel,
        "--initramfs",
        &initramfs,
        "--cmdline",
        &cmdline,
        "--vcpus",
        "1",
        "--memory-mib",
        &mem,
    ];
    args.extend_from_slice(extra);
    let t0 = Instant::now();
    let vm = host.start_vm(&args).expect("start the VMM");
    wait_ready(&vm, t0);
    vm
}

/// Waits for VMM-GUEST-READY and prints how long the boot took.
pub fn wait_ready(vm: &e2e::Vm, t0: Instant) {
    vm.wait_for(e2e::READY, BOOT)
        .expect("the guest boots to its shell");
    eprintln!(
        "e2e-mem: guest ready after {:.1} s (guest uptime {} s, MemTotal {} KiB, drivers: {})",
        t0.elapsed().as_secs_f64(),
        vm.console_value("GUEST-UPTIME").unwrap_or_default(),
        vm.console_value("GUEST-MEMTOTAL-KIB").unwrap_or_default(),
        vm.console()
            .lines()
            .filter_map(|l| l.strip_prefix("GUEST-VIRTIO-DRIVER "))
            .collect::<Vec<_>>()
            .join("; "),
    );
}

/// Fails the test unless the guest bound `driver` (virtio_balloon, virtio_mem) to a device.
pub fn assert_driver_bound(vm: &e2e::Vm, driver: &str) {
    let prefix = format!("GUEST-VIRTIO-DRIVER {driver} ");
    assert!(
        vm.find_line(&prefix).is_some(),
        "the guest did not bind {driver} to any device; console:\n{}",
        vm.console()
    );
}

/// One reading of the guest's /proc/meminfo (the figures the `meminfo` helper prints), in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemInfo {
    pub total: u64,
    pub free: u64,
    pub available: u64,
    pub cached: u64,
    pub anon: u64,
    pub shmem: u64,
}

impl std::fmt::Display for MemInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MemTotal {} KiB, MemFree {} KiB, MemAvailable {} KiB, Cached {} KiB, AnonPages {} KiB, Shmem {} KiB",
            self.total, self.free, self.available, self.cached, self.anon, self.shmem
        )
    }
}

/// The guest's /proc/meminfo now.
pub fn meminfo(vm: &e2e::Vm) -> MemInfo {
    let out = vm.run("meminfo", CMD).expect("meminfo in the guest");
    let line = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("GUEST-MEMINFO"))
        .unwrap_or_else(|| panic!("no GUEST-MEMINFO line in {out:?}"));
    let fields: BTreeMap<&str, u64> = line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
        .collect();
    let get = |k: &str| {
        *fields
            .get(k)
            .unwrap_or_else(|| panic!("no {k} in the guest's meminfo line {line:?}"))
    };
    MemInfo {
        total: get("MemTotal"),
        free: get("MemFree"),
        available: get("MemAvailable"),
        cached: get("Cached"),
        anon: get("AnonPages"),
        shmem: get("Shmem"),
    }
}

/// The guest's meminfo once MemTotal is steady and MemAvailable moves by less than 2 MiB
/// between two readings a second apart (background work after a change settles first).
pub fn stable_meminfo(vm: &e2e::Vm) -> MemInfo {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = meminfo(vm);
    loop {
        thread::sleep(Duration::from_secs(1));
        let now = meminfo(vm);
        if now.total == last.total && now.available.abs_diff(last.available) < 2 * MIB_KIB {
            return now;
        }
        if Instant::now() > deadline {
            eprintln!("e2e-mem: WARNING: guest meminfo not stable after 60 s: {last} -> {now}");
            return now;
        }
        last = now;
    }
}

/// The VMM's RSS (KiB) once it stops moving: three readings a second apart within 1 MiB
/// (Firecracker's habit: never assert on a figure that is still settling). Returns the last.
pub fn stable_rss(vm: &e2e::Vm) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut window: Vec<u64> = Vec::new();
    loop {
        let r = vm.rss_kib().expect("VMM RSS");
        window.push(r);
        if window.len() > 3 {
            window.remove(0);
        }
        let (lo, hi) = (*window.iter().min().unwrap(), *window.iter().max().unwrap());
        if window.len() == 3 && hi - lo <= MIB_KIB {
            return r;
        }
        if Instant::now() > deadline {
            eprintln!(
                "e2e-mem: WARNING: VMM RSS not stable after 60 s: last readings {window:?} KiB"
            );
            return r;
        }
        thread::sleep(Duration::from_secs(1));
    }
}

/// Calls the REST API and returns the JSON answer (Null for 204); fails the test on any status
/// but 2xx, showing the VMM's `fault_message`.
pub fn api(vm: &e2e::Vm, method: &str, path: &str, body: Option<Value>) -> Value {
    let body = body.map(|b| b.to_string());
    let (status, text) = vm
        .api(method, path, body.as_deref())
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    assert!(
        (200..300).contains(&status),
        "{method} {path} {}: HTTP {status}: {text}",
        body.unwrap_or_default()
    );
    if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: answer is not JSON ({e}): {text}"))
    }
}

/// A u64 field of a JSON object, or a failure naming it.
pub fn u(v: &Value, field: &str) -> u64 {
    v.pointer(field)
        .or_else(|| v.get(field))
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no number at {field} in {v}"))
}

/// Polls `probe` every `every` until it returns `Ok`; fails the test after `timeout` with the
/// last `Err` (which says where things stand) and the tails of the guest console and the VMM's
/// stderr. Returns the value and the time it took.
pub fn wait_until<T>(
    vm: &e2e::Vm,
    what: &str,
    timeout: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> (T, Duration) {
    let t0 = Instant::now();
    loop {
        match probe() {
            Ok(v) => return (v, t0.elapsed()),
            Err(now) if t0.elapsed() > timeout => panic!(
                "timed out after {timeout:?} waiting for {what}; last: {now}\n{}",
                tails(vm)
            ),
            Err(_) => thread::sleep(every),
        }
    }
}

/// The last lines of the guest console and of the VMM's stderr, for failure messages.
pub fn tails(vm: &e2e::Vm) -> String {
    let tail = |s: String| {
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    format!(
        "--- console tail ---\n{}\n--- VMM stderr tail ---\n{}",
        tail(vm.console()),
        tail(vm.stderr())
    )
}

/// GET /balloon until `actual_pages == target_pages`; returns the answer and the time it took.
pub fn wait_balloon_reached(vm: &e2e::Vm, timeout: Duration) -> (Value, Duration) {
    wait_until(
        vm,
        "the balloon's actual to reach its target",
        timeout,
        Duration::from_millis(100),
        || {
            let b = api(vm, "GET", "/balloon", None);
            if u(&b, "actual_pages") == u(&b, "target_pages") {
                Ok(b)
            } else {
                Err(b.to_string())
            }
        },
    )
}

/// Sets the balloon target and waits until the guest reaches it; returns the time it took.
pub fn balloon_to(vm: &e2e::Vm, amount_mib: u64, timeout: Duration) -> Duration {
    api(
        vm,
        "PATCH",
        "/balloon",
        Some(serde_json::json!({ "amount_mib": amount_mib })),
    );
    let (b, took) = wait_balloon_reached(vm, timeout);
    assert_eq!(u(&b, "target_pages"), amount_mib * 256, "{b}");
    took
}

/// Asserts that the guest is alive and that nothing it printed since it became ready says its
/// kernel fell over. (The boot itself may show a WARNING; the init lowers the console log level to
/// errors once it runs, so what appears afterwards is an error, an oops or a panic.)
pub fn assert_guest_healthy(vm: &e2e::Vm) {
    let console = vm.console();
    let since_ready = console
        .find(e2e::READY)
        .map_or(console.as_str(), |i| &console[i..]);
    for bad in [
        "Kernel panic",
        "BUG:",
        "Oops",
        "general protection fault",
        "soft lockup",
        "hung_task",
        "detected stalls",
    ] {
        assert!(
            !since_ready.contains(bad),
            "the guest console shows {bad:?} after it became ready:\n{since_ready}"
        );
    }
    assert!(
        vm.exit_status().is_none(),
        "the VMM exited: {:?}\n{}",
        vm.exit_status(),
        tails(vm)
    );
    let out = vm.run("echo alive", CMD).expect("the guest shell answers");
    assert!(out.contains("alive"), "{out}");
}

/// The checksum from a GUEST-PATTERN-WRITTEN / GUEST-PATTERN-OK line of `pattern`.
pub fn pattern_sum(out: &str, marker: &str) -> String {
    out.lines()
        .find(|l| l.contains(marker))
        .and_then(|l| l.split("sum=").nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| panic!("no {marker} line with a sum in {out:?}"))
}

/// `a - b` for KiB figures that may move either way, as a signed number.
pub fn delta(a: u64, b: u64) -> i64 {
    a as i64 - b as i64
}

// ---- vmmctl, wherever the VMM runs ----

static NEXT_PROXY: AtomicU64 = AtomicU64::new(0);

/// The `vmmctl` binary on this machine (target/release/vmmctl, built first unless E2E_NO_BUILD
/// is set, as the harness does for the VMM).
pub fn vmmctl_binary() -> PathBuf {
    let root = e2e::repo_root();
    if std::env::var_os("E2E_NO_BUILD").is_none() {
        let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "-p", "api", "--bin", "vmmctl"])
            .current_dir(&root)
            .stdout(Stdio::null())
            .status()
            .expect("run cargo");
        assert!(
            st.success(),
            "cargo build --release -p api --bin vmmctl failed"
        );
    }
    let p = root.join("target/release/vmmctl");
    assert!(p.is_file(), "no vmmctl at {}", p.display());
    p
}

/// Runs `f` with the path of a Unix socket on this machine that relays each HTTP request to the
/// VM's API through [`e2e::Vm::api`]. In the nested mode the VMM's socket lives inside the test
/// host, where `vmmctl` is not installed; the relay lets the real client binary run here against
/// the real VMM (keep-alive and all), one request at a time, as it would against the socket.
pub fn with_api_relay<R>(vm: &e2e::Vm, f: impl FnOnce(&Path) -> R) -> R {
    let path = std::env::temp_dir().join(format!(
        "e2e-relay-{}-{}.sock",
        std::process::id(),
        NEXT_PROXY.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind the relay socket");
    listener.set_nonblocking(true).unwrap();
    let stop = AtomicBool::new(false);
    let r = thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let stop = &stop;
                        s.spawn(move || relay_connection(vm, conn, stop));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        // Stop the relay however `f` ends: the scope waits for its threads, also on a panic.
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let _stop = StopOnDrop(&stop);
        f(&path)
    });
    let _ = std::fs::remove_file(&path);
    r
}

/// Serves one keep-alive connection of the relay until the client closes it or the relay stops.
fn relay_connection(vm: &e2e::Vm, conn: UnixStream, stop: &AtomicBool) {
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut writer = conn.try_clone().unwrap();
    let mut reader = BufReader::new(conn);
    loop {
        // Request line and headers.
        let mut head: Vec<String> = Vec::new();
        let mut line = String::new();
        loop {
            match reader.read_line(&mut line) {
                Ok(0) => return,
                Ok(_) => {
                    if line.ends_with('\n') {
                        let l = line.trim_end().to_string();
                        line.clear();
                        if l.is_empty() {
                            if head.is_empty() {
                                continue;
                            }
                            break;
                        }
                        head.push(l);
                    }
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
        let mut parts = head[0].split_whitespace();
        let method = parts.next().unwrap_or("GET").to_string();
        let target = parts.next().unwrap_or("/").to_string();
        let length: usize = head[1..]
            .iter()
            .filter_map(|h| h.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        let mut got = 0;
        while got < length {
            match reader.read(&mut body[got..]) {
                Ok(0) => return,
                Ok(n) => got += n,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return,
            }
        }
        let body = (length > 0).then(|| String::from_utf8_lossy(&body).into_owned());
        let (status, text) = match vm.api(&method, &target, body.as_deref()) {
            Ok(r) => r,
            Err(e) => (
                502,
                serde_json::json!({ "fault_message": format!("relay: {e}") }).to_string(),
            ),
        };
        let reply = if status == 204 {
            "HTTP/1.1 204 X\r\n\r\n".to_string()
        } else if text.is_empty() {
            format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n")
        } else {
            let ctype = if text.trim_start().starts_with(['{', '[']) {
                "application/json"
            } else {
                "text/plain; version=0.0.4"
            };
            format!(
                "HTTP/1.1 {status} X\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n\r\n{text}",
                text.len()
            )
        };
        if writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// Runs `vmmctl --socket SOCKET ARGS..` on this machine; returns its output.
pub fn vmmctl(bin: &Path, socket: &Path, args: &[&str]) -> Output {
    let out = Command::new(bin)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run vmmctl");
    eprintln!(
        "e2e-mem: $ vmmctl {} -> {}\n--- stdout ---\n{}--- stderr ---\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
