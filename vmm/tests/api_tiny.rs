//! The REST API of a running VMM, driven over its Unix socket, with a tiny hand-made guest that
//! just sleeps (cli; hlt). Checks what an operator would: the VM is configured and started
//! through the API alone, state rules give 409, resizing reports what it did, and a signal
//! stops the VM cleanly.

mod common;
use common::{kvm_usable, scratch, tiny_elf, Vmm, SLEEP};

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

impl Vmm {
    fn start(dir: &Path, args: &[&str]) -> Vmm {
        let socket = dir.join("api.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_vmm"))
            .args(["--api-socket", socket.to_str().unwrap()])
            .args(["--serial", dir.join("serial.out").to_str().unwrap()])
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "API socket never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        Vmm { child, socket }
    }

    fn json(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.call("GET", path, None);
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap()
    }
}

// Long: one VM configured and started step by step, each step's refusal checked in order.
#[test]
fn configure_and_start_through_the_api_alone() {
    if !kvm_usable() {
        eprintln!("SKIPPED: configure_and_start_through_the_api_alone: no /dev/kvm");
        return;
    }
    let dir = scratch("start");
    let kernel = dir.join("tiny.elf");
    std::fs::write(&kernel, tiny_elf(&SLEEP)).unwrap();
    let vmm = Vmm::start(&dir, &[]);
    assert_eq!(vmm.json("/")["state"], "Not started");
    // Starting without a kernel is refused and says what to do.
    let (st, body) = vmm.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
    );
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("boot-source"), "{body}");
    // A running-VM request before start is a state conflict.
    let (st, body) = vmm.call("PUT", "/vm/resize", Some(r#"{"desired_mib":64}"#));
    assert_eq!(st, 409, "{body}");
    // GETs answer from the configuration so far; a metrics scraper may start before the VM.
    assert_eq!(vmm.json("/vm/resize")["state"], "idle");
    assert_eq!(vmm.call("GET", "/metrics", None).0, 200);
    assert_eq!(vmm.call("GET", "/balloon/statistics", None).0, 404);
    let src = format!(
        r#"{{"kernel_image_path":"{}","initrd_path":null,"boot_args":null}}"#,
        kernel.display()
    );
    assert_eq!(vmm.call("PUT", "/boot-source", Some(&src)).0, 204);
    // What a Firecracker client sends.
    let mc = r#"{"vcpu_count":1,"mem_size_mib":64,"smt":false,"track_dirty_pages":false,"huge_pages":"None","cpu_template":"None"}"#;
    assert_eq!(vmm.call("PUT", "/machine-config", Some(mc)).0, 204);
    let b = r#"{"amount_mib":0,"deflate_on_oom":true,"stats_polling_interval_s":1}"#;
    assert_eq!(vmm.call("PUT", "/balloon", Some(b)).0, 204);
    let h = r#"{"total_size_mib":256,"block_size_mib":2,"slot_size_mib":128}"#;
    assert_eq!(vmm.call("PUT", "/hotplug/memory", Some(h)).0, 204);
    assert_eq!(vmm.json("/hotplug/memory")["total_size_mib"], 256);
    assert_eq!(vmm.json("/balloon/statistics")["target_mib"], 0);
    let (st, body) = vmm.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
    );
    assert_eq!(st, 204, "{body}");
    assert_eq!(vmm.json("/")["state"], "Running");

    // After start, configuration is a conflict.
    assert_eq!(vmm.call("PUT", "/machine-config", Some(mc)).0, 409);
    // The balloon target is taken (the tiny guest has no driver, so actual stays 0).
    assert_eq!(
        vmm.call("PATCH", "/balloon", Some(r#"{"amount_mib":16}"#))
            .0,
        204
    );
    let bal = vmm.json("/balloon");
    assert_eq!(
        (bal["amount_mib"].as_u64(), bal["actual_pages"].as_u64()),
        (Some(16), Some(0))
    );
    // Too large a target is a 400 naming the limit; so is the whole boot memory.
    let (st, body) = vmm.call("PATCH", "/balloon", Some(r#"{"amount_mib":64}"#));
    assert_eq!(st, 400, "{body}");
    assert_eq!(
        body,
        r#"{"fault_message":"amount_mib: 64 MiB is out of range: allowed 0 to 48 MiB (the boot memory, 64 MiB, less the 16 MiB a guest keeps)"}"#
    );
    // Statistics stay on once the VM runs.
    let (st, body) = vmm.call(
        "PATCH",
        "/balloon/statistics",
        Some(r#"{"stats_polling_interval_s":0}"#),
    );
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("0 s would switch statistics off"), "{body}");
    // Hot-add: the region is born offline, all of it unplugged, none resident.
    let mem = vmm.json("/vm/memory");
    assert_eq!(
        mem["totals"]["unplugged_bytes"].as_u64(),
        Some(256 << 20),
        "{mem}"
    );
    let hot = mem["regions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "hotplug")
        .unwrap();
    assert_eq!(hot["guest_phys_addr"].as_u64(), Some(1 << 32));
    assert_eq!(hot["offline_pages"].as_u64(), Some(256 << 8));
    // Offline pages whose backing is released are listed too.
    let d = vmm.json("/vm/memory?reason=discarded&limit=1");
    assert_eq!(d["offline"][0]["reason"], "discarded", "{d}");
    // Resize up: virtio-mem is asked for the difference and the balloon's 16 MiB target is
    // released; the tiny guest has no balloon driver, so only virtio-mem has work to do.
    assert_eq!(
        vmm.call("PUT", "/vm/resize", Some(r#"{"desired_mib":128}"#))
            .0,
        204
    );
    let hp = vmm.json("/hotplug/memory");
    assert_eq!(hp["requested_size_mib"].as_u64(), Some(64), "{hp}");
    assert_eq!(vmm.json("/balloon")["amount_mib"].as_u64(), Some(0));
    let rs = vmm.json("/vm/resize");
    assert_eq!(
        (rs["mechanism"].as_str(), rs["state"].as_str()),
        (Some("virtio_mem"), Some("in_progress")),
        "{rs}"
    );
    // Beyond boot + hot-add is refused.
    let (st, body) = vmm.call("PUT", "/vm/resize", Some(r#"{"desired_mib":1024}"#));
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("320"), "names the maximum: {body}");
    let metrics = vmm.call("GET", "/metrics", None);
    assert_eq!(metrics.0, 200);
    assert!(
        metrics.1.contains("vmm_guest_unplugged_bytes"),
        "{}",
        metrics.1
    );
    // The GETs above after the start were answered on the API thread, the PATCH/PUTs and the
    // memory map by the VMM thread. No VMM family shadows one of the server's (the renderer
    // drops a repeated name and counts it in vmm_api_metrics_dropped).
    let value = |name: &str| -> f64 {
        let line = metrics
            .1
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")));
        line.and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{}", metrics.1))
    };
    assert!(value("vmm_api_direct_reads_total") >= 5.0, "{}", metrics.1);
    assert!(
        value("vmm_api_vmm_thread_requests_total") >= 5.0,
        "{}",
        metrics.1
    );
    assert_eq!(value("vmm_api_metrics_dropped"), 0.0, "{}", metrics.1);
    assert!(
        metrics
            .1
            .contains("vmm_api_requests_total{method=\"GET\",route=\"/balloon\",status=\"200\"}"),
        "the server's per-route counts: {}",
        metrics.1
    );
}

#[test]
fn sigterm_stops_a_running_vm_with_143() {
    if !kvm_usable() {
        eprintln!("SKIPPED: sigterm_stops_a_running_vm_with_143: no /dev/kvm");
        return;
    }
    let dir = scratch("sigterm");
    let kernel = dir.join("tiny.elf");
    std::fs::write(&kernel, tiny_elf(&SLEEP)).unwrap();
    let mut vmm = Vmm::start(
        &dir,
        &["--kernel", kernel.to_str().unwrap(), "--memory-mib", "32"],
    );
    assert_eq!(vmm.json("/")["state"], "Running");
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(vmm.child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = vmm.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "VMM did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(143));
}
