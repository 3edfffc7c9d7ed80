//! Supervision with real processes (a fake `vmm` shell script that sleeps, exits or is killed as
//! each test says): a VMM that dies is reported with its cause and the others run on; DELETE
//! stops with SIGTERM then SIGKILL; the daemon restarts (SIGTERM or SIGKILL) without losing or
//! disturbing a VM, and reports the ones that died while it was down; a stale or reused PID in
//! the state directory is never mistaken for a VM's VMM.

mod common;
use common::*;

use std::time::{Duration, Instant};

use hostd::procfs::ProcessId;
use hostd::spec::{BalloonSpec, HotplugSpec, MemorySpec, VmSpec};
use hostd::statedir::{StateDir, VmmRecord};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);

fn kill(pid: i64, sig: i32) {
    // SAFETY: kill(2) with plain integers; the PID is a VMM this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

fn exited(v: &Value) -> bool {
    v["state"] == "exited"
}

#[test]
fn a_vmm_that_dies_is_reported_and_the_others_run_on() {
    let s = Scratch::new("death");
    let sleeper = s.kernel("sleep", "exec sleep 1000\n");
    let failing = s.kernel(
        "fail",
        "echo 'vmm: error: cannot open /dev/kvm: boom' >&2\nexit 1\n",
    );
    let h = Hostd::start(&s.state(), &s.fake_vmm(), &["--budget-mib", "4096"]);
    h.expect(
        "POST",
        "/vms",
        Some(&vm_json("a", &sleeper, 256, 256, 256)),
        201,
    );
    let b = h.expect(
        "POST",
        "/vms",
        Some(&vm_json("b", &sleeper, 256, 256, 256)),
        201,
    );
    h.expect(
        "POST",
        "/vms",
        Some(&vm_json("c", &failing, 256, 256, 256)),
        201,
    );

    let c = h.wait_vm("c", "exited", WAIT, exited);
    assert_eq!(c["exit"]["code"], 1, "{c}");
    assert_eq!(
        c["exit"]["cause"],
        "the VMM failed (exit code 1): vmm: error: cannot open /dev/kvm: boom"
    );
    assert!(c["exit"]["stderr_tail"].to_string().contains("boom"), "{c}");

    kill(b["pid"].as_i64().unwrap(), libc::SIGKILL);
    let b = h.wait_vm("b", "exited", WAIT, exited);
    assert_eq!(b["exit"]["signal"], 9, "{b}");
    assert_eq!(
        b["exit"]["cause"],
        "the VMM was killed by signal 9 (SIGKILL)"
    );

    // The others run on, untouched.
    assert!(vmm_alive(&s.state(), "a"));
    assert_eq!(h.expect("GET", "/vms/a", None, 200)["state"], "starting");
    // An ended VM holds nothing: its minimum no longer counts.
    assert_eq!(
        h.expect("GET", "/host/memory", None, 200)["guaranteed_mib"],
        256
    );
    // DELETE of an ended VM removes it at once, with its last record.
    let gone = h.expect("DELETE", "/vms/b", None, 200);
    assert_eq!(gone["exit"]["signal"], 9);
    h.expect("GET", "/vms/b", None, 404);
    assert!(!s.state().join("vms/b").exists());
}

#[test]
fn delete_stops_with_sigterm_then_sigkill() {
    let s = Scratch::new("delete");
    let polite = s.kernel("polite", "exec sleep 1000\n");
    let stubborn = s.kernel("stubborn", "trap '' TERM\nwhile :; do sleep 0.1; done\n");
    let h = Hostd::start(
        &s.state(),
        &s.fake_vmm(),
        &["--budget-mib", "4096", "--stop-timeout-s", "1"],
    );
    h.expect(
        "POST",
        "/vms",
        Some(&vm_json("p", &polite, 256, 256, 256)),
        201,
    );
    let st = h.expect(
        "POST",
        "/vms",
        Some(&vm_json("s", &stubborn, 256, 256, 256)),
        201,
    );
    let t0 = Instant::now();
    assert_eq!(h.expect("DELETE", "/vms/p", None, 202)["state"], "stopping");
    assert_eq!(h.expect("DELETE", "/vms/s", None, 202)["state"], "stopping");
    // A second DELETE while stopping is the same answer.
    h.expect("DELETE", "/vms/s", None, 202);
    for id in ["p", "s"] {
        while h.call("GET", &format!("/vms/{id}"), None).0 != 404 {
            assert!(t0.elapsed() < WAIT, "VM {id} never went away");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // The stubborn one needed SIGKILL after the 1 s stop timeout.
    assert!(t0.elapsed() >= Duration::from_secs(1), "{:?}", t0.elapsed());
    let pid = st["pid"].as_i64().unwrap() as i32;
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists() || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.contains(") Z")
        }
    );
    assert!(!s.state().join("vms/s").exists());
    assert_eq!(
        h.expect("GET", "/vms", None, 200)["vms"],
        Value::Array(vec![])
    );
}

#[test]
fn restarts_keep_every_vm_and_report_deaths_while_down() {
    let s = Scratch::new("restart");
    let sleeper = s.kernel("sleep", "exec sleep 1000\n");
    let vmm = s.fake_vmm();
    let h = Hostd::start(&s.state(), &vmm, &["--budget-mib", "4096"]);
    let a = h.expect(
        "POST",
        "/vms",
        Some(&vm_json("a", &sleeper, 256, 256, 256)),
        201,
    );
    let b = h.expect(
        "POST",
        "/vms",
        Some(&vm_json("b", &sleeper, 256, 256, 256)),
        201,
    );
    h.expect(
        "PUT",
        "/host/memory",
        Some(r#"{"params": {"buffer_pct": 33}}"#),
        200,
    );

    // SIGTERM: the daemon exits 0 and removes its socket; the VMs run on.
    let status = h.stop();
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(!s.state().join("hostd.sock").exists());
    assert!(vmm_alive(&s.state(), "a") && vmm_alive(&s.state(), "b"));

    // b dies while no daemon runs.
    kill(b["pid"].as_i64().unwrap(), libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(300));

    let h = Hostd::start(&s.state(), &vmm, &[]);
    let a2 = h.expect("GET", "/vms/a", None, 200);
    assert_eq!(a2["pid"], a["pid"], "the same VMM, adopted");
    assert_eq!(a2["state"], "starting");
    let b2 = h.wait_vm("b", "reported", WAIT, exited);
    assert_eq!(
        b2["exit"]["cause"],
        "the VMM was killed by signal 9 (SIGKILL)"
    );
    // The budget and parameters survived (no flag given this time).
    let host = h.expect("GET", "/host/memory", None, 200);
    assert_eq!(
        (
            host["budget_mib"].as_u64(),
            host["params"]["buffer_pct"].as_u64()
        ),
        (Some(4096), Some(33))
    );

    // SIGKILL of the daemon: the VM is not disturbed, the next daemon finds it.
    h.kill();
    assert!(vmm_alive(&s.state(), "a"));
    let h = Hostd::start(&s.state(), &vmm, &["--budget-mib", "2048"]);
    assert_eq!(h.expect("GET", "/vms/a", None, 200)["pid"], a["pid"]);
    assert_eq!(
        h.expect("GET", "/host/memory", None, 200)["budget_mib"],
        2048,
        "a flag wins"
    );
    // One daemon per state directory.
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_hostd"))
        .arg("--state-dir")
        .arg(s.state())
        .arg("--socket")
        .arg(s.path.join("other.sock"))
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("held by another hostd"), "{err}");
}

fn spec(id: &str) -> VmSpec {
    VmSpec {
        id: id.into(),
        kernel: "/k".into(),
        initramfs: None,
        cmdline: None,
        vcpus: 1,
        memory: MemorySpec {
            boot_mib: 256,
            min_mib: None,
            max_mib: None,
            weight: None,
        },
        balloon: BalloonSpec::default(),
        hotplug: HotplugSpec::default(),
    }
    .resolved()
}

#[test]
fn a_stale_or_reused_pid_is_not_taken_for_a_vmm() {
    let s = Scratch::new("pids");
    let state = StateDir::open(s.state()).unwrap();
    let me = ProcessId::of(std::process::id() as i32).unwrap();
    let gone = ProcessId {
        pid: i32::MAX - 1,
        start_ticks: 1,
        boot_id: me.boot_id.clone(),
    };
    // "stale": its PID is free now. "reused": its PID belongs to another process (this test),
    // started at another time. Neither has an exit record.
    for (id, vmm) in [
        ("stale", gone.clone()),
        (
            "reused",
            ProcessId {
                start_ticks: me.start_ticks + 7,
                ..me.clone()
            },
        ),
    ] {
        let dir = state.vm(id);
        dir.create(&spec(id)).unwrap();
        dir.write_vmm(&VmmRecord {
            vmm,
            monitor: gone.clone(),
            api_socket: dir.api_socket(),
            started_at_unix_ms: 0,
        })
        .unwrap();
    }
    let h = Hostd::start(&s.state(), &s.fake_vmm(), &["--budget-mib", "4096"]);
    for id in ["stale", "reused"] {
        let v = h.expect("GET", &format!("/vms/{id}"), None, 200);
        assert_eq!(v["state"], "exited", "{v}");
        assert!(
            v["exit"]["cause"]
                .as_str()
                .unwrap()
                .contains("recorded no status"),
            "{v}"
        );
    }
    // DELETE removes it and signals no one (this test process would die of it).
    h.expect("DELETE", "/vms/reused", None, 200);
    assert_eq!(
        h.expect("GET", "/host/memory", None, 200)["guaranteed_mib"],
        0
    );
}

#[test]
fn a_vms_file_starts_what_is_missing_once() {
    let s = Scratch::new("file");
    let sleeper = s.kernel("sleep", "exec sleep 1000\n");
    let file = s.path.join("vms.json");
    std::fs::write(
        &file,
        format!(
            r#"{{"vms": [{}, {}]}}"#,
            vm_json("a", &sleeper, 256, 128, 256),
            vm_json("b", &sleeper, 256, 128, 512)
        ),
    )
    .unwrap();
    let vmm = s.fake_vmm();
    let args = ["--budget-mib", "4096", "--vms", file.to_str().unwrap()];
    let h = Hostd::start(&s.state(), &vmm, &args);
    let pids = |h: &Hostd| -> Vec<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let vms = h.expect("GET", "/vms", None, 200)["vms"]
                .as_array()
                .unwrap()
                .clone();
            if vms.len() == 2 && vms.iter().all(|v| v["pid"].is_i64()) {
                return vms.iter().map(|v| v["pid"].clone()).collect();
            }
            assert!(Instant::now() < deadline, "{vms:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let first = pids(&h);
    assert_eq!(h.stop().code(), Some(0));
    let h = Hostd::start(&s.state(), &vmm, &args);
    assert_eq!(pids(&h), first, "the same VMs, not new ones");

    // A bad file is refused before anything starts, naming the VM and field.
    std::fs::write(
        &file,
        format!(r#"{{"vms": [{}]}}"#, vm_json("x", &sleeper, 256, 300, 256)),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hostd"))
        .arg("--state-dir")
        .arg(s.path.join("other-state"))
        .args(["--vms", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("vms[0] (\"x\"): memory.min_mib: 300 MiB is out of range"),
        "{err}"
    );
}
