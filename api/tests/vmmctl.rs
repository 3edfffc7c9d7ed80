//! `vmmctl` against the real server and the VMM's real handler and devices (no KVM), the way an
//! operator runs it. The simulated guest follows the devices at a steady pace, so `--wait` has
//! progress to show.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::Harness;
use vmm::testing::{GuestPace, HeadlessOptions};

/// A guest that moves `balloon_mib` of balloon and 64 MiB of plugging every `every_ms`.
fn guest(balloon_mib: u64, every_ms: u64) -> HeadlessOptions {
    HeadlessOptions {
        guest: GuestPace::Steady {
            every: Duration::from_millis(every_ms),
            balloon_mib,
            hotplug_mib: 64,
        },
        ..HeadlessOptions::default()
    }
}

fn vmmctl(h: &Harness, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmmctl"))
        .arg("--socket")
        .arg(&h.socket)
        .args(args)
        .output()
        .expect("run vmmctl")
}

fn ok(h: &Harness, args: &[&str]) -> (String, String) {
    let out = vmmctl(h, args);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "vmmctl {args:?} failed: {stderr}");
    (stdout, stderr)
}

fn booted(opts: HeadlessOptions) -> Harness {
    let h = Harness::start_with(|_| {}, opts);
    // Configure through vmmctl raw, like a user without another client would.
    ok(
        &h,
        &[
            "raw",
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/k"}"#,
        ],
    );
    ok(
        &h,
        &[
            "raw",
            "put",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 1024}"#,
        ],
    );
    ok(
        &h,
        &[
            "raw",
            "PUT",
            "/balloon",
            r#"{"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 1}"#,
        ],
    );
    ok(
        &h,
        &[
            "raw",
            "PUT",
            "/hotplug/memory",
            r#"{"total_size_mib": 2048}"#,
        ],
    );
    let (out, _) = ok(&h, &["start"]);
    assert_eq!(out, "started\n");
    h
}

// Long: one vmmctl session through every command, each checking the state the last one left.
#[test]
fn info_and_start() {
    let h = Harness::start();
    let (out, _) = ok(&h, &["info"]);
    assert!(out.contains("state:    Not started"), "{out}");
    let out = vmmctl(&h, &["start"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        err,
        "vmmctl: PUT /actions: HTTP 400 Bad Request: kernel_image_path: no boot source: PUT \
         /boot-source {\"kernel_image_path\": ...} first\n"
    );
    let h = booted(guest(16, 20));
    let (out, _) = ok(&h, &["info"]);
    assert!(out.contains("state:    Running"), "{out}");
    let (out, _) = ok(&h, &["--json", "info"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["state"], "Running");
}

#[test]
fn balloon_set_wait_shows_progress_and_reaches_target() {
    let h = booted(guest(32, 20));
    let (out, err) = ok(
        &h,
        &["balloon", "set", "256", "--wait", "--interval-ms", "10"],
    );
    assert!(out.starts_with("balloon reached 256 MiB in "), "{out}");
    // Not a terminal: plain progress lines, ending at the target.
    assert!(!err.contains('\r'), "{err:?}");
    let lines: Vec<&str> = err.lines().collect();
    assert!(lines.len() >= 2, "expected several progress lines: {err}");
    assert_eq!(
        *lines.last().unwrap(),
        "balloon: 256 MiB (target 256 MiB, 100%)"
    );
    let (out, _) = ok(&h, &["balloon", "get"]);
    assert!(
        out.contains("actual:               256 MiB (65536 pages)"),
        "{out}"
    );
    let (out, _) = ok(&h, &["balloon", "stats"]);
    assert!(out.contains("balloon actual:      256 MiB"), "{out}");
    assert!(out.contains("oom_kill             0"), "{out}");
}

#[test]
fn balloon_wait_times_out_with_a_clear_message() {
    let h = booted(guest(1, 50));
    let t0 = Instant::now();
    let out = vmmctl(
        &h,
        &[
            "balloon",
            "set",
            "512",
            "--wait",
            "--timeout",
            "0.3",
            "--interval-ms",
            "20",
        ],
    );
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8(out.stderr).unwrap();
    let last = err.lines().last().unwrap();
    assert!(
        last.starts_with("vmmctl: timed out after 0.3 s: the balloon is at "),
        "{err}"
    );
    assert!(last.contains("target 512 MiB (131072 pages)"), "{err}");
}

#[test]
fn refused_requests_print_the_fault_and_exit_1() {
    let h = booted(guest(16, 20));
    let out = vmmctl(&h, &["balloon", "set", "5000"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        err,
        "vmmctl: PATCH /balloon: HTTP 400 Bad Request: amount_mib: 5000 MiB is out of range: \
         allowed 0 to 1008 MiB (the boot memory, 1024 MiB, less the 16 MiB a guest keeps)\n"
    );
    let out = vmmctl(&h, &["balloon", "set", "-3"]);
    assert_eq!(out.status.code(), Some(2), "usage error");
}

#[test]
fn hotplug_and_resize_wait() {
    let h = booted(guest(16, 20));
    let (out, _) = ok(
        &h,
        &["hotplug", "set", "512", "--wait", "--interval-ms", "10"],
    );
    assert!(
        out.starts_with("hot-plugged memory reached 512 MiB"),
        "{out}"
    );
    let (out, _) = ok(&h, &["hotplug", "get"]);
    assert!(out.contains("plugged:    512 MiB"), "{out}");
    let (out, _) = ok(&h, &["resize", "2048", "--wait", "--interval-ms", "10"]);
    assert!(out.starts_with("guest reached 2048 MiB"), "{out}");
    let (out, _) = ok(&h, &["resize", "512", "--wait", "--interval-ms", "10"]);
    assert!(out.starts_with("guest reached 512 MiB"), "{out}");
    let (out, _) = ok(&h, &["resize"]);
    assert!(
        out.contains("current:    512 MiB") && out.contains("state:      reached"),
        "{out}"
    );
}

#[test]
fn memory_table_and_metrics() {
    let h = booted(guest(16, 20));
    ok(
        &h,
        &["balloon", "set", "64", "--wait", "--interval-ms", "10"],
    );
    let (out, _) = ok(&h, &["memory", "--limit", "3"]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("REGION"), "{out}");
    let words = |l: &str| l.split_whitespace().collect::<Vec<_>>().join(" ");
    // The RAM's resident figure is whatever the headless VMM touched; the region holds none.
    assert!(
        words(lines[1]).starts_with("ram 0x000000000000 1 GiB 64 MiB "),
        "{out}"
    );
    assert_eq!(
        words(lines[2]),
        "hotplug 0x000100000000 2 GiB 2 GiB 0 B",
        "{out}"
    );
    assert!(
        out.contains("OFFLINE ballooned  16384 pages (64 MiB) in range"),
        "{out}"
    );
    assert!(
        out.contains("... more: vmmctl memory --reason ballooned --pfn-start "),
        "{out}"
    );
    assert!(out.contains("balloon_inflated_pages"), "{out}");
    // The continuation it suggests works.
    let hint = out
        .lines()
        .find(|l| l.contains("--reason ballooned --pfn-start"))
        .unwrap();
    let next = hint.rsplit(' ').next().unwrap();
    let (out, _) = ok(
        &h,
        &[
            "memory",
            "--reason",
            "ballooned",
            "--pfn-start",
            next,
            "--limit",
            "1000",
        ],
    );
    assert!(!out.contains("OFFLINE unplugged"), "{out}");
    assert!(!out.contains("... more"), "{out}");
    let (out, _) = ok(&h, &["metrics"]);
    assert!(
        out.contains(
            "# TYPE vmm_guest_ballooned_bytes gauge\nvmm_guest_ballooned_bytes 67108864\n"
        ),
        "{out}"
    );
}

#[test]
fn missing_socket_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmmctl"))
        .args(["--socket", "/nonexistent/vmm.sock", "info"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("cannot connect to the API socket /nonexistent/vmm.sock"),
        "{err}"
    );
}
