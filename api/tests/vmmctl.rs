//! `vmmctl` against a real server and the fake VMM, the way an operator runs it.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use api::fake::FakeVmmConfig;
use common::Harness;

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

fn booted(fake: FakeVmmConfig) -> Harness {
    let h = Harness::start_with(|_| {}, fake);
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

#[test]
fn info_and_start() {
    let h = Harness::start();
    let (out, _) = ok(&h, &["info"]);
    assert!(out.contains("state:    Not started"), "{out}");
    let out = vmmctl(&h, &["start"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("HTTP 400 Bad Request: cannot start: no boot source"),
        "{err}"
    );
    let h = booted(FakeVmmConfig::default());
    let (out, _) = ok(&h, &["info"]);
    assert!(out.contains("state:    Running"), "{out}");
    let (out, _) = ok(&h, &["--json", "info"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["state"], "Running");
}

#[test]
fn balloon_set_wait_shows_progress_and_reaches_target() {
    let h = booted(FakeVmmConfig {
        balloon_mib_per_tick: 32,
        ..Default::default()
    });
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
    let h = booted(FakeVmmConfig {
        balloon_mib_per_tick: 1,
        tick: Duration::from_millis(50),
        ..Default::default()
    });
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
    let h = booted(FakeVmmConfig::default());
    let out = vmmctl(&h, &["balloon", "set", "5000"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains(
            "PATCH /balloon: HTTP 400 Bad Request: amount_mib: 5000 is out of range 0..=1024"
        ),
        "{err}"
    );
    let out = vmmctl(&h, &["balloon", "set", "-3"]);
    assert_eq!(out.status.code(), Some(2), "usage error");
}

#[test]
fn hotplug_and_resize_wait() {
    let h = booted(FakeVmmConfig::default());
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
    let h = booted(FakeVmmConfig::default());
    ok(
        &h,
        &["balloon", "set", "64", "--wait", "--interval-ms", "10"],
    );
    let (out, _) = ok(&h, &["memory", "--limit", "3"]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("REGION"), "{out}");
    let words = |l: &str| l.split_whitespace().collect::<Vec<_>>().join(" ");
    assert_eq!(words(lines[1]), "ram 0x000000000000 1 GiB 64 MiB", "{out}");
    assert_eq!(
        words(lines[2]),
        "hotplug 0x000100000000 2 GiB 2 GiB",
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
    assert!(out.contains("balloon_inflate_pages"), "{out}");
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
        out.contains("# TYPE vmm_balloon_actual_pages gauge"),
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
