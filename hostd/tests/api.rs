//! The daemon's REST API as a client sees it: real routes, real validation, admission control,
//! with a fake `vmm` (a sleeping shell script) behind each VM.

mod common;
use common::*;

use serde_json::Value;

fn msg(v: &Value) -> &str {
    v["fault_message"]
        .as_str()
        .unwrap_or_else(|| panic!("no fault_message in {v}"))
}

#[test]
fn bad_requests_are_refused_with_the_field_and_what_is_allowed() {
    let s = Scratch::new("bad");
    let kernel = s.kernel("k", "exec sleep 1000\n");
    let h = Hostd::start(&s.state(), &s.fake_vmm(), &["--budget-mib", "4096"]);
    let post = |body: &str| h.call("POST", "/vms", Some(body));

    let (st, v) = post(&vm_json("../etc", &kernel, 512, 256, 1024));
    assert_eq!(st, 400);
    assert!(
        msg(&v).starts_with("id: \"../etc\" is not allowed: 1 to 48 letters"),
        "{v}"
    );
    let (st, v) = post(&vm_json("a", &kernel, 512, 600, 1024));
    assert_eq!(
        (st, msg(&v)),
        (
            400,
            "memory.min_mib: 600 MiB is out of range 16..=512 MiB (at most boot_mib)"
        )
    );
    let (st, v) = post(&vm_json("a", &kernel, 512, 256, 300));
    assert_eq!(st, 400);
    assert!(
        msg(&v).starts_with("memory.max_mib: 300 MiB is below boot_mib (512 MiB)"),
        "{v}"
    );
    let (st, v) = post(&vm_json("a", &s.path.join("nope"), 512, 256, 1024));
    assert_eq!(st, 400);
    assert!(msg(&v).starts_with("kernel: cannot read"), "{v}");
    let (st, v) = post(r#"{"id":"a","kernel":"/k","memory":{"boot":512}}"#);
    assert_eq!(st, 400);
    assert!(
        msg(&v).starts_with("memory.boot: unknown field `boot`"),
        "{v}"
    );
    let (st, v) = post(r#"{"id":"a","kernel":"/k","memory":{"boot_mib":"lots"}}"#);
    assert_eq!(st, 400);
    assert!(
        msg(&v).starts_with("memory.boot_mib: invalid type: string"),
        "{v}"
    );
    let (st, v) = post("[1]");
    assert_eq!(
        (st, msg(&v)),
        (400, "invalid body: this route expects a JSON object")
    );
    let (st, v) = post("");
    assert_eq!(st, 400, "{v}");

    let (st, v) = h.call("GET", "/nope", None);
    assert_eq!((st, msg(&v)), (404, "no such resource: /nope"));
    let (st, v) = h.call("DELETE", "/host/memory", None);
    assert_eq!(
        (st, msg(&v)),
        (405, "method DELETE is not allowed on /host/memory")
    );
    let (st, v) = h.call("GET", "/vms/ghost", None);
    assert_eq!((st, msg(&v)), (404, "no VM with id \"ghost\""));
    let (st, v) = h.call("PUT", "/host/memory", Some(r#"{"tick_ms": 5}"#));
    assert_eq!(
        (st, msg(&v)),
        (400, "tick_ms: 5 ms is out of range 100..=60000 ms")
    );
    let (st, v) = h.call(
        "PUT",
        "/host/memory",
        Some(r#"{"params": {"shrink_step_pct": 500}}"#),
    );
    assert_eq!(
        (st, msg(&v)),
        (
            400,
            "params.shrink_step_pct: 500 % is out of range 1..=100 %"
        )
    );
    // Nothing was created by any of it.
    assert_eq!(
        h.expect("GET", "/vms", None, 200)["vms"],
        Value::Array(vec![])
    );
}

#[test]
fn admission_control_says_how_much_is_missing() {
    let s = Scratch::new("admit");
    let kernel = s.kernel("k", "exec sleep 1000\n");
    let h = Hostd::start(&s.state(), &s.fake_vmm(), &["--budget-mib", "1000"]);
    h.expect(
        "POST",
        "/vms",
        Some(&vm_json("a", &kernel, 768, 600, 768)),
        201,
    );
    let (st, v) = h.call("POST", "/vms", Some(&vm_json("b", &kernel, 512, 500, 512)));
    assert_eq!(st, 409);
    assert_eq!(
        msg(&v),
        "memory.min_mib 500 MiB does not fit: the budget is 1000 MiB and 600 MiB of it is \
         guaranteed to other VMs; 100 MiB missing (lower min_mib, raise the budget with PUT \
         /host/memory, or delete a VM)"
    );
    assert!(
        !s.state().join("vms/b").exists(),
        "a refused VM leaves nothing behind"
    );
    // Raising a running VM's minimum passes the same rule.
    let (st, v) = h.call("PATCH", "/vms/a/memory", Some(r#"{"min_mib": 1100}"#));
    assert_eq!(st, 400, "min above max is a bad value first: {v}");
    h.expect("PATCH", "/vms/a/memory", Some(r#"{"weight": 300}"#), 200);
    let (st, v) = h.call("PUT", "/host/memory", Some(r#"{"budget_mib": 500}"#));
    assert_eq!(st, 409);
    assert!(msg(&v).contains("below the 600 MiB guaranteed"), "{v}");
    // A bigger budget lets b in.
    let host = h.expect("PUT", "/host/memory", Some(r#"{"budget_mib": 1100}"#), 200);
    assert_eq!(
        (host["budget_mib"].as_u64(), host["guaranteed_mib"].as_u64()),
        (Some(1100), Some(600))
    );
    h.expect(
        "POST",
        "/vms",
        Some(&vm_json("b", &kernel, 512, 500, 512)),
        201,
    );
    let host = h.expect("GET", "/host/memory", None, 200);
    assert_eq!(host["guaranteed_mib"], 1100);
    assert_eq!(host["vms"].as_array().unwrap().len(), 2);
}

#[test]
fn ids_are_unique_and_limits_change_within_the_hot_add_region() {
    let s = Scratch::new("patch");
    let kernel = s.kernel("k", "exec sleep 1000\n");
    let h = Hostd::start(&s.state(), &s.fake_vmm(), &["--budget-mib", "4096"]);
    let vm = h.expect(
        "POST",
        "/vms",
        Some(&vm_json("a", &kernel, 512, 256, 1000)),
        201,
    );
    assert_eq!(
        vm["spec"]["hotplug"]["region_mib"], 512,
        "max rounded up to memory blocks: {vm}"
    );
    let (st, v) = h.call("POST", "/vms", Some(&vm_json("a", &kernel, 512, 256, 1000)));
    assert_eq!(st, 409);
    assert!(
        msg(&v).starts_with("a VM with id \"a\" exists already"),
        "{v}"
    );

    let (st, v) = h.call("PATCH", "/vms/a/memory", Some(r#"{"max_mib": 2048}"#));
    assert_eq!(st, 409);
    assert_eq!(
        msg(&v),
        "max_mib: 2048 MiB is above what this VM can reach: 1024 MiB (boot_mib 512 MiB plus \
         its hot-add region of 512 MiB, fixed when it was created)"
    );
    let (st, v) = h.call("PATCH", "/vms/a/memory", Some("{}"));
    assert_eq!(st, 400, "{v}");
    let vm = h.expect(
        "PATCH",
        "/vms/a/memory",
        Some(r#"{"max_mib": 1024, "min_mib": 300}"#),
        200,
    );
    assert_eq!(
        (
            vm["memory"]["min_mib"].as_u64(),
            vm["memory"]["max_mib"].as_u64()
        ),
        (Some(300), Some(1024))
    );
    // Saved: the spec file holds the new limits.
    let saved: Value =
        serde_json::from_slice(&std::fs::read(s.state().join("vms/a/spec.json")).unwrap()).unwrap();
    assert_eq!(saved["memory"]["min_mib"], 300);
}

#[test]
fn each_vmm_gets_its_own_socket_console_balloon_and_hot_add_region() {
    let s = Scratch::new("args");
    let kernel = s.kernel("k", "exec sleep 1000\n");
    let h = Hostd::start(&s.state(), &s.fake_vmm(), &["--budget-mib", "4096"]);
    let body = format!(
        r#"{{"id":"a","kernel":"{}","cmdline":"console=ttyS0 quiet","vcpus":2,
            "memory":{{"boot_mib":512,"min_mib":256,"max_mib":1024,"weight":7}},
            "balloon":{{"free_page_reporting":false}},"hotplug":{{"block_mib":4}}}}"#,
        kernel.display()
    );
    let vm = h.expect("POST", "/vms", Some(&body), 201);
    let dir = s.state().join("vms/a");
    assert_eq!(vm["api_socket"], dir.join("api.sock").display().to_string());
    assert!(vm["pid"].as_i64().unwrap() > 0, "{vm}");
    let log = std::fs::read_to_string(dir.join("vmm.log")).unwrap();
    let args = log
        .lines()
        .find(|l| l.starts_with("fake-vmm args: "))
        .unwrap();
    for want in [
        format!("--kernel {}", kernel.display()),
        "--cmdline console=ttyS0 quiet".into(),
        "--vcpus 2 --memory-mib 512".into(),
        format!("--serial {}", dir.join("console.log").display()),
        "--balloon deflate_on_oom=true,free_page_reporting=false,stats_interval_s=1".into(),
        "--hotplug total_mib=512,block_mib=4".into(),
        format!("--api-socket {}", dir.join("api.sock").display()),
    ] {
        assert!(args.contains(&want), "{want:?} not in {args:?}");
    }
    // The console input is a FIFO.
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata(dir.join("console.in"))
        .unwrap()
        .file_type()
        .is_fifo());
    // A fixed-size VM gets no hot-add region.
    h.expect(
        "POST",
        "/vms",
        Some(&vm_json("fixed", &kernel, 256, 256, 256)),
        201,
    );
    let log = std::fs::read_to_string(s.state().join("vms/fixed/vmm.log")).unwrap();
    assert!(!log.contains("--hotplug"), "{log}");
}

#[test]
fn metrics_show_every_vm_and_the_budget() {
    let s = Scratch::new("metrics");
    let kernel = s.kernel("k", "exec sleep 1000\n");
    let h = Hostd::start(
        &s.state(),
        &s.fake_vmm(),
        &["--budget-mib", "2048", "--tick-ms", "100"],
    );
    h.expect(
        "POST",
        "/vms",
        Some(&vm_json("a", &kernel, 512, 256, 512)),
        201,
    );
    // A VM whose VMM has no API (this fake) is frozen at its size by the policy.
    let vm = h.wait_vm("a", "decided on", std::time::Duration::from_secs(10), |v| {
        !v["last_decision"].is_null()
    });
    assert_eq!(vm["last_decision"]["reason"], "frozen_no_stats", "{vm}");
    assert_eq!(vm["last_decision"]["target_mib"], 512);
    let text = request(&h.socket, "GET", "/metrics", None).unwrap().1;
    for want in [
        "hostd_budget_bytes 2147483648\n",
        "hostd_guaranteed_bytes 268435456\n",
        "hostd_vm_up{vm=\"a\"} 1\n",
        "hostd_vm_min_bytes{vm=\"a\"} 268435456\n",
        "hostd_decisions_total{reason=\"frozen_no_stats\"} ",
        "hostd_api_requests_total{method=\"POST\",route=\"/vms\",status=\"201\"} 1\n",
        "# TYPE hostd_ticks_total counter\n",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
}
