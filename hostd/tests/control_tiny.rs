//! The control loop against the real `vmm` on this machine's /dev/kvm, with a tiny hand-made
//! guest that just sleeps (cli; hlt): it has no balloon driver, so it never sends statistics,
//! and the policy must freeze it at its size (no target sent, reason `frozen_no_stats`) while
//! the daemon still reads its VMM (reachable, resident size). A daemon killed with SIGKILL finds
//! the VMM again, and DELETE stops the real VMM with SIGTERM (before the SIGKILL timeout).

mod common;
use common::*;

use std::path::PathBuf;
use std::time::Duration;

/// `cli; hlt; jmp hlt`: the vCPU sleeps in KVM for good.
const SLEEP: [u8; 4] = [0xfa, 0xf4, 0xeb, 0xfd];
const LOAD: u64 = 0x10_0000;

/// A minimal ELF64 executable with one PT_LOAD segment holding `code` at `LOAD` (the same
/// hand-made kernel as vmm/tests/common).
fn tiny_elf(code: &[u8]) -> Vec<u8> {
    let phoff = 64u64;
    let code_off = phoff + 56;
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[2, 1, 1, 0]);
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&LOAD.to_le_bytes()); // e_entry
    f.extend_from_slice(&phoff.to_le_bytes());
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // flags
    f.extend_from_slice(&64u16.to_le_bytes()); // ehsize
    f.extend_from_slice(&56u16.to_le_bytes()); // phentsize
    f.extend_from_slice(&1u16.to_le_bytes()); // phnum
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // R+X
    f.extend_from_slice(&code_off.to_le_bytes());
    f.extend_from_slice(&LOAD.to_le_bytes());
    f.extend_from_slice(&LOAD.to_le_bytes());
    f.extend_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(&0x1000u64.to_le_bytes());
    f.extend_from_slice(code);
    f
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The `vmm` of this build (target/PROFILE/vmm beside this test's deps/), built if missing.
fn vmm_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let vmm = profile_dir.join("vmm");
    if !vmm.is_file() {
        let mut cmd = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()));
        cmd.args(["build", "-p", "vmm", "--bin", "vmm"]);
        if profile_dir.ends_with("release") {
            cmd.arg("--release");
        }
        assert!(cmd.status().unwrap().success(), "cargo build -p vmm failed");
    }
    vmm
}

// One VMM's whole life under the daemon (frozen, daemon killed, re-adopted, stopped): the
// steps depend on each other's state, so they stay one test.
#[test]
fn a_guest_without_statistics_is_frozen_and_a_real_vmm_is_stopped_and_adopted() {
    if !kvm_usable() {
        eprintln!("\n*** SKIPPED: control_tiny: no usable /dev/kvm ***\n");
        return;
    }
    let s = Scratch::new("tiny");
    let kernel = s.path.join("tiny.elf");
    std::fs::write(&kernel, tiny_elf(&SLEEP)).unwrap();
    let vmm = vmm_binary();
    let args = [
        "--budget-mib",
        "1024",
        "--tick-ms",
        "200",
        "--stop-timeout-s",
        "5",
    ];
    let h = Hostd::start(&s.state(), &vmm, &args);
    let vm = h.expect(
        "POST",
        "/vms",
        Some(&vm_json("t", &kernel, 64, 32, 192)),
        201,
    );
    let pid = vm["pid"].as_i64().unwrap();
    assert_eq!(vm["spec"]["hotplug"]["region_mib"], 128);

    let v = h.wait_vm("t", "running and decided", Duration::from_secs(30), |v| {
        v["state"] == "running" && !v["last_decision"].is_null()
    });
    // Several ticks later: still frozen at its boot size, nothing sent.
    std::thread::sleep(Duration::from_millis(1500));
    let v2 = h.expect("GET", "/vms/t", None, 200);
    for v in [&v, &v2] {
        let d = &v["last_decision"];
        assert_eq!(d["reason"], "frozen_no_stats", "{v}");
        assert_eq!(d["flags"]["frozen"], true, "{v}");
        assert_eq!(d["target_mib"], 64, "{v}");
        assert!(d["last_change"].is_null(), "no target was sent: {v}");
        assert_eq!(
            v["memory"]["target_mib"], 64,
            "the VMM's own desired_mib: {v}"
        );
        assert_eq!(v["memory"]["current_mib"], 64, "{v}");
        assert_eq!(v["memory"]["plugged_mib"], 0, "{v}");
        assert_eq!(v["memory"]["reachable"], true, "{v}");
        assert!(
            v["memory"]["stats_age_ms"].is_null(),
            "no report from a driverless guest: {v}"
        );
        assert!(v["memory"]["rss_mib"].as_u64().unwrap() > 0, "{v}");
    }
    let host = h.expect("GET", "/host/memory", None, 200);
    assert_eq!(host["last_tick"]["total_target_mib"], 64, "{host}");
    assert_eq!(host["last_tick"]["over_budget_mib"], 0, "{host}");

    // A new minimum above its size is applied at the next tick: the daemon sends the VMM the
    // new target (virtio-mem plugs; this guest has no driver, so it never gets there).
    h.expect("PATCH", "/vms/t/memory", Some(r#"{"min_mib": 96}"#), 200);
    let v = h.wait_vm(
        "t",
        "raised to its new minimum",
        Duration::from_secs(10),
        |v| v["memory"]["target_mib"] == 96,
    );
    let change = &v["last_decision"]["last_change"];
    assert_eq!(
        (change["from_mib"].as_u64(), change["to_mib"].as_u64()),
        (Some(64), Some(96)),
        "{v}"
    );
    assert!(change["error"].is_null(), "{v}");

    // SIGKILL the daemon: the next one finds the same VMM and reads it again.
    h.kill();
    let h = Hostd::start(&s.state(), &vmm, &args);
    let v = h.wait_vm(
        "t",
        "re-adopted and running",
        Duration::from_secs(30),
        |v| v["state"] == "running" && v["memory"]["reachable"] == true,
    );
    assert_eq!(v["pid"], pid);

    // DELETE: the real VMM stops on SIGTERM (exit code 143) and the VM goes away.
    let t0 = std::time::Instant::now();
    h.expect("DELETE", "/vms/t", None, 202);
    let log = s.state().join("vms/t/vmm.log");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while h.call("GET", "/vms/t", None).0 != 404 {
        assert!(
            std::time::Instant::now() < deadline,
            "not stopped: {:?}",
            std::fs::read_to_string(&log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "the VMM did not stop on SIGTERM (SIGKILL comes after 5 s): {:?}",
        t0.elapsed()
    );
    assert!(!std::path::Path::new(&format!("/proc/{pid}/exe")).exists());
}

/// A VMM whose API accepts connections but never answers (hung) must not stall the loop for the
/// others: the healthy VM is still read and decided on at every tick, each tick stays within
/// the request timeout, and the hung one is counted unreachable and frozen at its size.
#[test]
fn a_hung_vmm_does_not_stall_the_loop_for_the_others() {
    if !kvm_usable() {
        eprintln!("\n*** SKIPPED: control_tiny: no usable /dev/kvm ***\n");
        return;
    }
    let s = Scratch::new("hung");
    let kernel = s.path.join("tiny.elf");
    std::fs::write(&kernel, tiny_elf(&SLEEP)).unwrap();
    let hung_kernel = s.kernel("hung.sh", "");
    // The real VMM, except for the VM whose kernel is hung.sh: that one just sleeps, and this
    // test holds its API socket without ever answering.
    let wrapper = s.path.join("vmm-or-hung");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \" $* \" in *\" --kernel {} \"*) exec sleep 1000 ;; esac\nexec {} \"$@\"\n",
            hung_kernel.display(),
            vmm_binary().display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let args = [
        "--budget-mib",
        "1024",
        "--tick-ms",
        "200",
        "--request-timeout-ms",
        "300",
    ];
    let h = Hostd::start(&s.state(), &wrapper, &args);
    h.expect(
        "POST",
        "/vms",
        Some(&vm_json("ok", &kernel, 64, 32, 64)),
        201,
    );
    h.expect(
        "POST",
        "/vms",
        Some(&vm_json("hung", &hung_kernel, 64, 64, 64)),
        201,
    );
    let _hung_api =
        std::os::unix::net::UnixListener::bind(s.state().join("vms/hung/api.sock")).unwrap();

    h.wait_vm("ok", "running", Duration::from_secs(30), |v| {
        v["state"] == "running"
    });
    let at = |v: &serde_json::Value| v["last_decision"]["at_unix_ms"].as_u64().unwrap_or(0);
    let mut seen = Vec::new();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(400));
        let ok = h.expect("GET", "/vms/ok", None, 200);
        assert_eq!(ok["memory"]["reachable"], true, "{ok}");
        seen.push(at(&ok));
        let host = h.expect("GET", "/host/memory", None, 200);
        let took = host["last_tick"]["duration_ms"].as_f64().unwrap();
        assert!(
            took < 300.0 + 150.0,
            "a tick took {took} ms with a 300 ms request timeout"
        );
    }
    seen.dedup();
    assert!(
        seen.len() >= 5,
        "the healthy VM was decided on at only {} of 8 looks: {seen:?}",
        seen.len()
    );
    let hung = h.expect("GET", "/vms/hung", None, 200);
    assert_eq!(hung["memory"]["reachable"], false, "{hung}");
    assert_eq!(hung["state"], "starting", "its API never answered: {hung}");
    assert_eq!(hung["last_decision"]["flags"]["frozen"], true, "{hung}");
    let text = request(&h.socket, "GET", "/metrics", None).unwrap().1;
    assert!(!text.contains("hostd_vmm_unreachable_total 0\n"), "{text}");
}

/// `--vmm-uid/--vmm-gid --vmm-jail`: each VMM the daemon starts runs as that user with no
/// capabilities, under its seccomp filters, in an empty root of its own, and is still read and
/// stopped by the daemon; its socket is gone after it ends (the monitor removes it: the VMM may
/// not write in its state directory).
#[test]
fn vmms_run_as_the_configured_user_with_no_capabilities() {
    // SAFETY: geteuid has no arguments and cannot fail.
    if !kvm_usable() || unsafe { libc::geteuid() } != 0 {
        eprintln!("\n*** SKIPPED: control_tiny: needs /dev/kvm and root ***\n");
        return;
    }
    let s = Scratch::new("contained");
    let kernel = s.path.join("tiny.elf");
    std::fs::write(&kernel, tiny_elf(&SLEEP)).unwrap();
    let vmm = vmm_binary();
    let args = [
        "--budget-mib",
        "1024",
        "--tick-ms",
        "200",
        "--vmm-uid",
        "65534",
        "--vmm-gid",
        "65534",
        "--vmm-jail",
    ];
    let h = Hostd::start(&s.state(), &vmm, &args);
    let vm = h.expect(
        "POST",
        "/vms",
        Some(&vm_json("c", &kernel, 64, 32, 192)),
        201,
    );
    let pid = vm["pid"].as_i64().unwrap();
    let v = h.wait_vm("c", "running and read", Duration::from_secs(30), |v| {
        v["state"] == "running" && v["memory"]["reachable"] == true
    });
    assert!(v["memory"]["rss_mib"].as_u64().unwrap() > 0, "{v}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name}: {status}"))
            .trim()
            .to_string()
    };
    assert!(
        field("Uid").split_whitespace().all(|u| u == "65534"),
        "{status}"
    );
    assert!(
        field("Gid").split_whitespace().all(|g| g == "65534"),
        "{status}"
    );
    for cap in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(field(cap), "0000000000000000", "{cap}: {status}");
    }
    assert_eq!(field("Seccomp"), "2", "{status}");
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    assert_eq!(
        mounts.lines().count(),
        1,
        "the VMM sees more than its empty root: {mounts}"
    );

    h.expect("DELETE", "/vms/c", None, 202);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while h.call("GET", "/vms/c", None).0 != 404 {
        assert!(std::time::Instant::now() < deadline, "not stopped");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A guest that resets itself at once (keyboard controller: out 0x64, 0xfe): its VMM ends
    // on its own, its directory stays, and its socket is gone.
    let reset = s.path.join("reset.elf");
    std::fs::write(&reset, tiny_elf(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4])).unwrap();
    h.expect(
        "POST",
        "/vms",
        Some(&vm_json("r", &reset, 64, 32, 192)),
        201,
    );
    let v = h.wait_vm("r", "exited", Duration::from_secs(30), |v| {
        v["state"] == "exited"
    });
    assert_eq!(v["exit"]["code"], 2, "a guest reset: {v}");
    let socket = s.state().join("vms/r/api.sock");
    assert!(s.state().join("vms/r").is_dir());
    assert!(!socket.exists(), "the VMM's socket was left behind: {v}");
}
