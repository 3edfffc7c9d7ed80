//! `vmmctl vms ...` and `vmmctl host ...` against the real daemon (a fake `vmm` behind each VM):
//! what a user types and reads, and the exit statuses.

mod common;
use common::*;

use std::path::PathBuf;
use std::process::{Command, Output};

/// The `vmmctl` of this build (target/PROFILE/vmmctl beside this test's deps/), built if missing.
fn vmmctl_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let bin = profile_dir.join("vmmctl");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or("cargo".into()));
    cmd.args(["build", "-p", "api", "--bin", "vmmctl"]);
    if profile_dir.ends_with("release") {
        cmd.arg("--release");
    }
    assert!(
        cmd.status().unwrap().success(),
        "cargo build -p api --bin vmmctl failed"
    );
    bin
}

fn run(bin: &PathBuf, h: &Hostd, args: &[&str]) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(bin)
        .arg("--socket")
        .arg(&h.socket)
        .args(args)
        .output()
        .unwrap();
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

// One scenario, each command in the order a user runs them (create, list, show, host view,
// delete): splitting it would start a daemon per step.
#[test]
fn vms_and_host_commands() {
    let bin = vmmctl_binary();
    let s = Scratch::new("ctl");
    let kernel = s.kernel("k", "exec sleep 1000\n");
    let h = Hostd::start(
        &s.state(),
        &s.fake_vmm(),
        &["--budget-mib", "2048", "--stop-timeout-s", "1"],
    );
    let k = kernel.to_str().unwrap();

    let (code, out, err) = run(
        &bin,
        &h,
        &[
            "vms",
            "create",
            "--id",
            "a",
            "--kernel",
            k,
            "--boot-mib",
            "512",
            "--min-mib",
            "256",
            "--max-mib",
            "1024",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("vm a created (pid "), "{out}");
    // Refused: the message is the daemon's, the status 1.
    let (code, _, err) = run(
        &bin,
        &h,
        &[
            "vms",
            "create",
            "--id",
            "b",
            "--kernel",
            k,
            "--boot-mib",
            "2048",
        ],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("HTTP 409") && err.contains("256 MiB missing"),
        "{err}"
    );
    let (code, out, _) = run(&bin, &h, &["vms", "list"]);
    assert_eq!(code, 0);
    let line = out
        .lines()
        .find(|l| l.starts_with("a "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("starting") && line.contains(" 256 ") && line.contains(" 1024 "),
        "{line}"
    );
    let (code, out, _) = run(&bin, &h, &["vms", "memory", "a", "--weight", "300"]);
    assert_eq!(
        (code, out.as_str()),
        (0, "vm a: min 256 MiB, max 1024 MiB, weight 300\n")
    );

    let (code, out, _) = run(
        &bin,
        &h,
        &[
            "host",
            "set",
            "--budget-mib",
            "1800",
            "--param",
            "buffer_pct=25",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("budget 1800 MiB, guaranteed 256 MiB"),
        "{out}"
    );
    let (_, out, _) = run(&bin, &h, &["--json", "host", "memory"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["budget_mib"].as_u64(), v["params"]["buffer_pct"].as_u64()),
        (Some(1800), Some(25))
    );
    let (code, _, err) = run(&bin, &h, &["host", "set", "--param", "buffer_pct"]);
    assert_eq!(code, 2, "usage error: {err}");

    let (code, out, err) = run(
        &bin,
        &h,
        &["vms", "delete", "a", "--wait", "--timeout", "20"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out, "vm a stopped and removed\n");
    assert!(err.contains("vm a: stopping"), "{err}");
    let (code, _, err) = run(&bin, &h, &["vms", "get", "a"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("HTTP 404") && err.contains("no VM with id \"a\""),
        "{err}"
    );
}
