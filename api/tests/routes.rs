//! Every route through the real server and the VMM's real handler and devices (no KVM): success,
//! each error code, state rules, body limits. Faults the VMM writes are compared in full, so a
//! changed message fails here.

mod common;

use common::{boot, expect_fault, fault, get, raw, req, Harness};
use serde_json::json;

#[tokio::test]
async fn instance_info_before_and_after_start() {
    let h = Harness::start();
    let mut c = h.client();
    let v = get(&mut c, "/").await;
    assert_eq!(v["state"], "Not started");
    assert_eq!(v["app_name"], "vmm");
    assert_eq!(v["vmm_version"], env!("CARGO_PKG_VERSION"));
    boot(&mut c).await;
    assert_eq!(get(&mut c, "/").await["state"], "Running");
}

#[tokio::test]
async fn configuration_is_refused_after_start() {
    let h = Harness::start();
    let mut c = h.client();
    boot(&mut c).await;
    for (path, body, name) in [
        (
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 512}"#,
            "PUT /machine-config",
        ),
        (
            "/boot-source",
            r#"{"kernel_image_path": "/other"}"#,
            "PUT /boot-source",
        ),
        (
            "/balloon",
            r#"{"amount_mib": 0, "deflate_on_oom": false}"#,
            "PUT /balloon",
        ),
        (
            "/hotplug/memory",
            r#"{"total_size_mib": 1024}"#,
            "PUT /hotplug/memory",
        ),
        (
            "/actions",
            r#"{"action_type": "InstanceStart"}"#,
            "InstanceStart",
        ),
    ] {
        let msg = fault(&mut c, "PUT", path, Some(body), 409).await;
        assert_eq!(
            msg,
            format!("{name} is only allowed before the VM starts; it is running")
        );
    }
}

#[tokio::test]
async fn start_without_boot_source_is_400_and_changes_nothing() {
    let h = Harness::start();
    let mut c = h.client();
    let msg = fault(
        &mut c,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        400,
    )
    .await;
    assert_eq!(
        msg,
        r#"kernel_image_path: no boot source: PUT /boot-source {"kernel_image_path": ...} first"#
    );
    assert_eq!(get(&mut c, "/").await["state"], "Not started");
}

/// A configuration that breaks a rule tying two fields together is refused at InstanceStart,
/// in the API's words (the command line's flags were named here before).
#[tokio::test]
async fn start_failures_name_the_api_fields() {
    let h = Harness::start();
    let mut c = h.client();
    for (method, path, body) in [
        ("PUT", "/boot-source", r#"{"kernel_image_path": "/k"}"#),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 512}"#,
        ),
        (
            "PUT",
            "/balloon",
            r#"{"amount_mib": 512, "deflate_on_oom": false}"#,
        ),
    ] {
        assert_eq!(req(&mut c, method, path, Some(body)).await.0, 204);
    }
    let start = Some(r#"{"action_type": "InstanceStart"}"#);
    let msg = fault(&mut c, "PUT", "/actions", start, 400).await;
    assert_eq!(
        msg,
        "amount_mib: 512 MiB is out of range: allowed 0 to 496 MiB (the boot memory, 512 MiB, \
         less the 16 MiB a guest keeps)"
    );
    // Fixed through the API, the same configuration starts.
    let (s, _) = req(&mut c, "PATCH", "/balloon", Some(r#"{"amount_mib": 496}"#)).await;
    assert_eq!(s, 204);
    assert_eq!(req(&mut c, "PUT", "/actions", start).await.0, 204);
    assert_eq!(get(&mut c, "/balloon").await["amount_mib"], 496);
}

// Long: a table of 23 refused bodies with the exact message each must get.
#[tokio::test]
async fn bad_bodies_name_the_field_and_what_it_takes() {
    let h = Harness::start();
    let mut c = h.client();
    let cases: [(&str, &str, &str, &str); 23] = [
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 128, "smp": true}"#,
            "invalid body: unknown field `smp`, expected one of `vcpu_count`, `mem_size_mib`, \
             `smt`, `track_dirty_pages`, `huge_pages`, `cpu_template`",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": "two", "mem_size_mib": 128}"#,
            "vcpu_count: invalid type: string \"two\"; expected an integer from 1 to 254",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 300, "mem_size_mib": 128}"#,
            "vcpu_count: invalid value: integer `300`; expected an integer from 1 to 254",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 0, "mem_size_mib": 128}"#,
            "vcpu_count: 0 vCPUs is out of range: allowed 1 to 254 vCPUs",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 8}"#,
            "mem_size_mib: 8 MiB is out of range: allowed 16 to 1048576 MiB",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1}"#,
            "missing field `mem_size_mib`: an integer number of MiB from 16 to 1048576",
        ),
        (
            "PUT",
            "/balloon",
            "",
            "the request body is empty; this route expects a JSON object",
        ),
        (
            "PUT",
            "/balloon",
            "amount=1",
            "invalid body: this route expects a JSON object",
        ),
        (
            "PATCH",
            "/balloon",
            r#"{"amount_mib": 1} x"#,
            "invalid body: trailing characters",
        ),
        (
            "PATCH",
            "/balloon",
            "[1]",
            "invalid body: this route expects a JSON object",
        ),
        (
            "PUT",
            "/balloon",
            "{not json",
            "invalid body: not valid JSON: key must be a string at line 1 column 2",
        ),
        (
            "PUT",
            "/balloon",
            r#"{"amount_mib": 1"#,
            "invalid body: not valid JSON: EOF while parsing an object at line 1 column 16",
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "Reboot"}"#,
            "action_type: unknown variant `Reboot`; expected \"InstanceStart\", \
             \"SendCtrlAltDel\" or \"FlushMetrics\"",
        ),
        (
            "PUT",
            "/hotplug/memory",
            r#"{"total_size_mib": 1000}"#,
            "total_size_mib: 1000 MiB is not a multiple of 128 MiB (the Linux memory block): \
             allowed 128 to 1048576 MiB in steps of 128 MiB",
        ),
        (
            "PUT",
            "/hotplug/memory",
            r#"{"total_size_mib": 1024, "block_size_mib": 3}"#,
            "block_size_mib: 3 MiB is not allowed: a power of two from 2 to 1024 MiB (2, 4, 8, \
             ..., 1024)",
        ),
        (
            "PUT",
            "/balloon",
            r#"{"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 4000}"#,
            "stats_polling_interval_s: 4000 s is out of range: allowed 0 to 3600 s",
        ),
        (
            "PUT",
            "/balloon",
            r#"{"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 70000}"#,
            "stats_polling_interval_s: invalid value: integer `70000`; expected an integer \
             number of seconds from 0 to 3600",
        ),
        (
            "PUT",
            "/balloon",
            r#"{"amount_mib": -1, "deflate_on_oom": true}"#,
            "amount_mib: invalid value: integer `-1`; expected an integer number of MiB from 0 \
             to 1048576",
        ),
        (
            "PUT",
            "/vm/resize",
            r#"{"desired_mib": 1}"#,
            "desired_mib: 1 MiB is out of range: allowed 16 to 2097152 MiB",
        ),
        (
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": ""}"#,
            "kernel_image_path: is empty; give the host path of the file",
        ),
        (
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": null}"#,
            "kernel_image_path: invalid type: null; expected a non-empty host path",
        ),
        (
            "PATCH",
            "/hotplug/memory",
            r#"{"requested_size_mib": 2000000}"#,
            "requested_size_mib: 2000000 MiB is out of range: allowed 0 to 1048576 MiB",
        ),
        (
            "PUT",
            "/boot-source",
            &format!(
                r#"{{"kernel_image_path": "/k", "boot_args": "{}"}}"#,
                "a".repeat(3000)
            ),
            "boot_args: 3000 bytes is too long: allowed up to 2047 bytes (Linux's command line)",
        ),
    ];
    for (method, path, body, want) in cases {
        let msg = fault(&mut c, method, path, Some(body), 400).await;
        assert_eq!(msg, want, "{method} {path} {body}");
    }
    // None of these reached the VMM.
    assert_eq!(h.vmm.wakes(), 0);
}

#[tokio::test]
async fn unknown_paths_are_404_and_wrong_methods_405() {
    let h = Harness::start();
    let mut c = h.client();
    expect_fault(&mut c, "GET", "/nope", None, 404, &["/nope"]).await;
    expect_fault(&mut c, "GET", "/balloon/", None, 404, &[]).await;
    expect_fault(
        &mut c,
        "DELETE",
        "/balloon",
        None,
        405,
        &["DELETE", "/balloon"],
    )
    .await;
    expect_fault(&mut c, "POST", "/actions", Some("{}"), 405, &[]).await;
    expect_fault(&mut c, "GET", "/actions", None, 405, &[]).await;
    expect_fault(&mut c, "PATCH", "/machine-config", Some("{}"), 405, &[]).await;
    let reply = raw(&mut c, "DELETE", "/hotplug/memory", None).await;
    assert_eq!(reply.content_type.as_deref(), Some("application/json"));
    let allow = reply
        .headers
        .get("allow")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(allow.as_deref(), Some("PUT,PATCH,GET,HEAD"));
}

#[tokio::test]
async fn devices_not_configured_are_404_before_and_after_start() {
    let h = Harness::start();
    let mut c = h.client();
    let no_balloon = "no balloon is configured: PUT /balloon first";
    let no_hotplug = "no hot-add memory is configured: PUT /hotplug/memory first";
    let b = Some(r#"{"amount_mib": 1}"#);
    let s = Some(r#"{"stats_polling_interval_s": 1}"#);
    let r = Some(r#"{"requested_size_mib": 2}"#);
    for (method, path, body, want) in [
        ("GET", "/balloon", None, no_balloon),
        ("PATCH", "/balloon", b, no_balloon),
        ("GET", "/balloon/statistics", None, no_balloon),
        ("PATCH", "/balloon/statistics", s, no_balloon),
        ("GET", "/hotplug/memory", None, no_hotplug),
        ("PATCH", "/hotplug/memory", r, no_hotplug),
    ] {
        assert_eq!(
            fault(&mut c, method, path, body, 404).await,
            want,
            "{method} {path}"
        );
    }
    for (method, path, body) in [
        ("PUT", "/boot-source", r#"{"kernel_image_path": "/k"}"#),
        ("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
    ] {
        assert_eq!(req(&mut c, method, path, Some(body)).await.0, 204);
    }
    let no_balloon = "no balloon: start the VM with one (--balloon or PUT /balloon)";
    let no_hotplug = "no hot-add memory: start the VM with --hotplug or PUT /hotplug/memory";
    for (method, path, body, want) in [
        ("GET", "/balloon", None, no_balloon),
        ("PATCH", "/balloon", b, no_balloon),
        ("GET", "/balloon/statistics", None, no_balloon),
        ("PATCH", "/balloon/statistics", s, no_balloon),
        ("GET", "/hotplug/memory", None, no_hotplug),
        ("PATCH", "/hotplug/memory", r, no_hotplug),
    ] {
        assert_eq!(
            fault(&mut c, method, path, body, 404).await,
            want,
            "{method} {path}"
        );
    }
    // No devices: the guest keeps its boot size.
    let msg = fault(
        &mut c,
        "PUT",
        "/vm/resize",
        Some(r#"{"desired_mib": 512}"#),
        400,
    )
    .await;
    assert_eq!(
        msg,
        "desired_mib: 512 MiB is out of reach: allowed 256 to 256 MiB for this VM (256 MiB of \
         boot memory, no balloon to shrink it, no hot-add memory to grow it)"
    );
}

#[tokio::test]
async fn body_limit_is_413() {
    let h = Harness::start_with(|cfg| cfg.body_limit = 1024, Default::default());
    let mut c = h.client();
    let big = format!(r#"{{"kernel_image_path": "{}"}}"#, "k".repeat(2000));
    expect_fault(
        &mut c,
        "PUT",
        "/boot-source",
        Some(&big),
        413,
        &["limit of 1024 bytes"],
    )
    .await;
    // Just under the limit is parsed normally.
    let ok = format!(r#"{{"kernel_image_path": "{}"}}"#, "k".repeat(900));
    let (s, _) = req(&mut c, "PUT", "/boot-source", Some(&ok)).await;
    assert_eq!(s, 204);
    // The connection still works after a 413 (a fresh one if the server closed it).
    let (s, _) = req(&mut c, "GET", "/", None).await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn balloon_patch_get_reaches_target_and_keeps_the_guest_its_minimum() {
    let h = Harness::start();
    let mut c = h.client();
    boot(&mut c).await;
    let (s, _) = req(&mut c, "PATCH", "/balloon", Some(r#"{"amount_mib": 256}"#)).await;
    assert_eq!(s, 204);
    let v = get(&mut c, "/balloon").await;
    assert_eq!(
        (v["amount_mib"].as_u64(), v["actual_pages"].as_u64()),
        (Some(256), Some(0))
    );
    h.settle();
    let v = get(&mut c, "/balloon").await;
    assert_eq!(
        v,
        json!({"amount_mib": 256, "deflate_on_oom": true, "stats_polling_interval_s": 1,
               "free_page_reporting": false, "target_pages": 65536, "actual_pages": 65536,
               "actual_mib": 256})
    );
    // The guest keeps 16 MiB: the boot size itself is refused, as it is at InstanceStart.
    for amount in [4096, 1024, 1009] {
        let msg = fault(
            &mut c,
            "PATCH",
            "/balloon",
            Some(&format!(r#"{{"amount_mib": {amount}}}"#)),
            400,
        )
        .await;
        assert_eq!(
            msg,
            format!(
                "amount_mib: {amount} MiB is out of range: allowed 0 to 1008 MiB (the boot \
                 memory, 1024 MiB, less the 16 MiB a guest keeps)"
            )
        );
    }
    assert_eq!(get(&mut c, "/balloon").await["amount_mib"], 256);
    let (s, _) = req(&mut c, "PATCH", "/balloon", Some(r#"{"amount_mib": 1008}"#)).await;
    assert_eq!(s, 204);
    h.settle();
    let m = get(&mut c, "/vm/memory?limit=1").await;
    assert_eq!(m["totals"]["ballooned_bytes"], 1008u64 << 20);
}

#[tokio::test]
async fn balloon_statistics_get_and_patch() {
    let h = Harness::start();
    let mut c = h.client();
    // Before the start: the configured sizes, and the interval may switch statistics off.
    for (method, path, body) in &common::BOOT_REQUESTS[..3] {
        assert_eq!(req(&mut c, method, path, Some(body)).await.0, 204);
    }
    assert_eq!(
        get(&mut c, "/balloon/statistics").await,
        json!({"target_pages": 0, "actual_pages": 0, "target_mib": 0, "actual_mib": 0})
    );
    let off = Some(r#"{"stats_polling_interval_s": 0}"#);
    assert_eq!(
        req(&mut c, "PATCH", "/balloon/statistics", off).await.0,
        204
    );
    assert_eq!(get(&mut c, "/balloon").await["stats_polling_interval_s"], 0);
    let on = Some(r#"{"stats_polling_interval_s": 2}"#);
    assert_eq!(req(&mut c, "PATCH", "/balloon/statistics", on).await.0, 204);
    for (method, path, body) in &common::BOOT_REQUESTS[3..] {
        assert_eq!(req(&mut c, method, path, Some(body)).await.0, 204);
    }
    // Running: the guest's report (it gives one when its driver starts).
    let v = get(&mut c, "/balloon/statistics").await;
    for field in [
        "target_pages",
        "actual_pages",
        "target_mib",
        "actual_mib",
        "free_memory",
        "total_memory",
        "oom_kill",
        "direct_reclaim",
        "age_ms",
        "actual_pages_at_report",
    ] {
        assert!(v.get(field).is_some(), "{field} missing from {v}");
    }
    assert_eq!(v["total_memory"], 1024u64 << 20);
    let five = Some(r#"{"stats_polling_interval_s": 5}"#);
    assert_eq!(
        req(&mut c, "PATCH", "/balloon/statistics", five).await.0,
        204
    );
    assert_eq!(get(&mut c, "/balloon").await["stats_polling_interval_s"], 5);
    // Statistics cannot be switched off once running (they could, and the document said not).
    let msg = fault(&mut c, "PATCH", "/balloon/statistics", off, 400).await;
    assert_eq!(
        msg,
        "stats_polling_interval_s: 0 s would switch statistics off, which cannot change once \
         the VM runs (the statistics queue is set up at boot): allowed 1 to 3600 s"
    );
    assert_eq!(get(&mut c, "/balloon").await["stats_polling_interval_s"], 5);
}

#[tokio::test]
async fn statistics_off_at_start_stay_off() {
    let h = Harness::start();
    let mut c = h.client();
    for (method, path, body) in [
        ("PUT", "/boot-source", r#"{"kernel_image_path": "/k"}"#),
        (
            "PUT",
            "/balloon",
            r#"{"amount_mib": 0, "deflate_on_oom": false}"#,
        ),
        ("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
    ] {
        assert_eq!(req(&mut c, method, path, Some(body)).await.0, 204);
    }
    assert_eq!(
        get(&mut c, "/balloon/statistics").await,
        json!({"target_pages": 0, "actual_pages": 0, "target_mib": 0, "actual_mib": 0})
    );
    let msg = fault(
        &mut c,
        "PATCH",
        "/balloon/statistics",
        Some(r#"{"stats_polling_interval_s": 2}"#),
        400,
    )
    .await;
    assert_eq!(
        msg,
        "stats_polling_interval_s: 2 s would switch statistics on, but the VM started with \
         them off and that cannot change once it runs: allowed 0 s"
    );
    let off = Some(r#"{"stats_polling_interval_s": 0}"#);
    assert_eq!(
        req(&mut c, "PATCH", "/balloon/statistics", off).await.0,
        204
    );
}

#[tokio::test]
async fn hotplug_patch_and_get() {
    let h = Harness::start();
    let mut c = h.client();
    for (method, path, body) in &common::BOOT_REQUESTS[..4] {
        assert_eq!(req(&mut c, method, path, Some(body)).await.0, 204);
    }
    // Before the start: the configured region, and the first request (the --hotplug
    // requested_mib of the command line), checked against the region.
    let r = Some(r#"{"requested_size_mib": 256}"#);
    assert_eq!(req(&mut c, "PATCH", "/hotplug/memory", r).await.0, 204);
    assert_eq!(
        get(&mut c, "/hotplug/memory").await,
        json!({"total_size_mib": 2048, "block_size_mib": 2, "plugged_size_mib": 0,
               "requested_size_mib": 256, "usable_region_size_mib": 0})
    );
    let start = Some(r#"{"action_type": "InstanceStart"}"#);
    assert_eq!(req(&mut c, "PUT", "/actions", start).await.0, 204);
    h.settle();
    assert_eq!(
        get(&mut c, "/hotplug/memory").await["plugged_size_mib"],
        256
    );
    let r = Some(r#"{"requested_size_mib": 512}"#);
    assert_eq!(req(&mut c, "PATCH", "/hotplug/memory", r).await.0, 204);
    assert_eq!(
        get(&mut c, "/hotplug/memory").await["plugged_size_mib"],
        256
    );
    h.settle();
    assert_eq!(
        get(&mut c, "/hotplug/memory").await,
        json!({"total_size_mib": 2048, "block_size_mib": 2, "plugged_size_mib": 512,
               "requested_size_mib": 512, "usable_region_size_mib": 512})
    );
    // In MiB with the field's name, as the client wrote it (bytes in hex before).
    for (body, want) in [
        (
            r#"{"requested_size_mib": 4096}"#,
            "requested_size_mib: 4096 MiB is above total_size_mib: allowed 0 to 2048 MiB in \
             steps of 2 MiB",
        ),
        (
            r#"{"requested_size_mib": 3}"#,
            "requested_size_mib: 3 MiB is not a multiple of block_size_mib (2 MiB): allowed 0 \
             to 2048 MiB in steps of 2 MiB",
        ),
    ] {
        let msg = fault(&mut c, "PATCH", "/hotplug/memory", Some(body), 400).await;
        assert_eq!(msg, want);
    }
    assert_eq!(
        get(&mut c, "/hotplug/memory").await["requested_size_mib"],
        512
    );
}

#[tokio::test]
async fn resize_both_ways() {
    let h = Harness::start();
    let mut c = h.client();
    let msg = fault(
        &mut c,
        "PUT",
        "/vm/resize",
        Some(r#"{"desired_mib": 2048}"#),
        409,
    )
    .await;
    assert_eq!(
        msg,
        r#"PUT /vm/resize needs a running VM; configure it and PUT /actions {"action_type": "InstanceStart"} first"#
    );
    // Before the start: idle at the configured size.
    assert_eq!(
        get(&mut c, "/vm/resize").await,
        json!({"desired_mib": 256, "current_mib": 256, "mechanism": "none", "state": "idle"})
    );
    boot(&mut c).await;
    // Up: virtio-mem.
    let (s, _) = req(
        &mut c,
        "PUT",
        "/vm/resize",
        Some(r#"{"desired_mib": 2048}"#),
    )
    .await;
    assert_eq!(s, 204);
    assert_eq!(
        get(&mut c, "/vm/resize").await,
        json!({"desired_mib": 2048, "current_mib": 1024, "mechanism": "virtio_mem", "state": "in_progress"})
    );
    h.settle();
    assert_eq!(
        get(&mut c, "/vm/resize").await,
        json!({"desired_mib": 2048, "current_mib": 2048, "mechanism": "virtio_mem", "state": "reached"})
    );
    // Down below the boot size: unplug first, the balloon's target held back meanwhile.
    let (s, _) = req(&mut c, "PUT", "/vm/resize", Some(r#"{"desired_mib": 512}"#)).await;
    assert_eq!(s, 204);
    assert_eq!(
        get(&mut c, "/hotplug/memory").await["requested_size_mib"],
        0
    );
    assert_eq!(get(&mut c, "/balloon").await["amount_mib"], 0);
    assert_eq!(
        get(&mut c, "/vm/resize").await,
        json!({"desired_mib": 512, "current_mib": 2048, "mechanism": "both", "state": "in_progress"})
    );
    h.settle();
    assert_eq!(
        get(&mut c, "/vm/resize").await,
        json!({"desired_mib": 512, "current_mib": 512, "mechanism": "both", "state": "reached"})
    );
    assert_eq!(get(&mut c, "/balloon").await["amount_mib"], 512);
    assert_eq!(get(&mut c, "/hotplug/memory").await["plugged_size_mib"], 0);
    // A direct PATCH ends the resize.
    let (s, _) = req(&mut c, "PATCH", "/balloon", Some(r#"{"amount_mib": 100}"#)).await;
    assert_eq!(s, 204);
    assert_eq!(get(&mut c, "/vm/resize").await["state"], "idle");
    // Beyond what the devices reach.
    let msg = fault(
        &mut c,
        "PUT",
        "/vm/resize",
        Some(r#"{"desired_mib": 8192}"#),
        400,
    )
    .await;
    assert_eq!(
        msg,
        "desired_mib: 8192 MiB is out of reach: allowed 16 to 3072 MiB for this VM (1024 MiB of \
         boot memory, a balloon to shrink it to 16 MiB, 2048 MiB of hot-add memory to grow it)"
    );
}

// Long: one scenario, each page of runs following from the one before.
#[tokio::test]
async fn memory_map_pages_through_runs() {
    let h = Harness::start();
    let mut c = h.client();
    let msg = fault(&mut c, "GET", "/vm/memory", None, 409).await;
    assert_eq!(
        msg,
        r#"GET /vm/memory needs a running VM; configure it and PUT /actions {"action_type": "InstanceStart"} first"#
    );
    boot(&mut c).await;
    req(&mut c, "PATCH", "/balloon", Some(r#"{"amount_mib": 100}"#)).await;
    h.settle();

    let v = get(&mut c, "/vm/memory").await;
    assert_eq!(v["page_size"], 4096);
    let regions = v["regions"].as_array().unwrap();
    assert_eq!(regions.len(), 2);
    assert_eq!(
        regions[1],
        json!({"kind": "hotplug", "guest_phys_addr": 1u64 << 32, "size_bytes": 2048u64 << 20,
               "offline_pages": 2048 * 256, "resident_bytes": 0})
    );
    assert_eq!(regions[0]["offline_pages"], 100 * 256);
    // The regions' resident bytes make up the guest memory's whole.
    assert_eq!(
        regions[0]["resident_bytes"].as_u64().unwrap(),
        v["host"]["guest_rss_bytes"].as_u64().unwrap()
    );
    assert_eq!(v["totals"]["ballooned_bytes"], 100u64 << 20);
    assert_eq!(v["totals"]["unplugged_bytes"], 2048u64 << 20);
    assert_eq!(v["totals"]["online_bytes"], 924u64 << 20);
    assert!(v["host"]["guest_rss_bytes"].as_u64().unwrap() > 0);
    let reasons: Vec<_> = v["offline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["reason"].clone())
        .collect();
    assert_eq!(
        reasons,
        vec![json!("ballooned"), json!("unplugged"), json!("discarded")]
    );

    // Page through the ballooned runs 7 at a time; they add up to the balloon.
    let mut pfn = 0u64;
    let mut total = 0u64;
    let mut pages = 0;
    loop {
        let v = get(
            &mut c,
            &format!("/vm/memory?reason=ballooned&limit=7&pfn_start={pfn}"),
        )
        .await;
        let o = &v["offline"][0];
        assert_eq!(o["reason"], "ballooned");
        let runs = o["runs"].as_array().unwrap();
        assert!(runs.len() <= 7);
        total += runs
            .iter()
            .map(|r| r["pages"].as_u64().unwrap())
            .sum::<u64>();
        pages += 1;
        match o["next_pfn"].as_u64() {
            Some(next) => pfn = next,
            None => break,
        }
    }
    assert_eq!(total, 100 * 256);
    assert!(pages > 1);

    // A range query clips.
    let v = get(
        &mut c,
        "/vm/memory?reason=unplugged&pfn_start=1048576&pfn_end=1048577",
    )
    .await;
    assert_eq!(v["offline"][0]["pages_in_range"], 1);

    // The very end of the physical address space: a valid, empty range.
    let v = get(&mut c, "/vm/memory?pfn_start=1099511627776").await;
    assert_eq!(v["offline"][0]["pages_in_range"], 0);

    // Discarded runs are listed too (the schema lists the reason; it was a 400): offline pages
    // whose backing is released, as many as the totals say.
    let v = get(&mut c, "/vm/memory?reason=discarded&limit=4096").await;
    let o = &v["offline"][0];
    assert_eq!(o["reason"], "discarded");
    assert_eq!(
        o["pages_in_range"].as_u64().unwrap() * 4096,
        v["totals"]["discarded_bytes"].as_u64().unwrap()
    );
    let listed: u64 = o["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["pages"].as_u64().unwrap())
        .sum();
    assert_eq!(listed, o["pages_in_range"].as_u64().unwrap());
    // The unplugged region is discarded from birth.
    assert!(listed >= 2048 * 256, "{o}");

    // Bad queries: our words, not the query parser's.
    for (query, want) in [
        (
            "limit=0",
            "limit: 0 runs is out of range: allowed 1 to 4096 runs",
        ),
        (
            "reason=lost",
            "reason: `lost` is not allowed: ballooned, unplugged or discarded",
        ),
        (
            "color=red",
            "`color` is not a parameter of GET /vm/memory: allowed reason, pfn_start, pfn_end \
             and limit",
        ),
        (
            "pfn_start=10&pfn_end=10",
            "pfn_end: page 10 is not above pfn_start (page 10): the range is empty",
        ),
        (
            "pfn_start=x",
            "pfn_start: `x` is not allowed: an integer page number from 0 to 1099511627776",
        ),
        (
            "pfn_end=18446744073709551615",
            "pfn_end: page 18446744073709551615 is out of range: allowed 0 to 1099511627776 \
             (page numbers)",
        ),
    ] {
        let msg = fault(&mut c, "GET", &format!("/vm/memory?{query}"), None, 400).await;
        assert_eq!(msg, want, "{query}");
    }
}

#[tokio::test]
async fn metrics_answer_before_and_after_start() {
    let h = Harness::start();
    let mut c = h.client();
    req(&mut c, "GET", "/", None).await;
    req(&mut c, "GET", "/nope", None).await;
    // A scraper that starts before the VM gets the server's own families.
    let reply = raw(&mut c, "GET", "/metrics", None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.content_type.as_deref(),
        Some(api::metrics::PROMETHEUS_CONTENT_TYPE)
    );
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    assert!(
        text.contains(r#"vmm_api_requests_total{method="GET",route="/",status="200"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"vmm_api_requests_total{method="GET",route="unmatched",status="404"} 1"#),
        "{text}"
    );
    boot(&mut c).await;
    let flush = Some(r#"{"action_type": "FlushMetrics"}"#);
    assert_eq!(req(&mut c, "PUT", "/actions", flush).await.0, 204);
    let reply = raw(&mut c, "GET", "/metrics", None).await;
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    assert!(
        text.contains(&format!(
            "# TYPE vmm_guest_memory_bytes gauge\nvmm_guest_memory_bytes {}\n",
            3072u64 << 20
        )),
        "{text}"
    );
    assert!(
        text.contains("vmm_balloon_inflated_pages_total 0\n"),
        "{text}"
    );
    // Every non-comment line is `name{labels} value`.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "bad sample line {line:?}");
    }
}

#[tokio::test]
async fn ctrl_alt_del_is_refused_with_the_reason() {
    let h = Harness::start();
    let mut c = h.client();
    let action = Some(r#"{"action_type": "SendCtrlAltDel"}"#);
    let msg = fault(&mut c, "PUT", "/actions", action, 409).await;
    assert_eq!(
        msg,
        r#"SendCtrlAltDel needs a running VM; configure it and PUT /actions {"action_type": "InstanceStart"} first"#
    );
    boot(&mut c).await;
    let msg = fault(&mut c, "PUT", "/actions", action, 400).await;
    assert_eq!(
        msg,
        "SendCtrlAltDel needs an emulated i8042 keyboard, which this VMM does not have; ask the \
         guest to power off instead"
    );
}

#[tokio::test]
async fn every_request_wakes_the_vmm_once() {
    let h = Harness::start();
    let mut c = h.client();
    for _ in 0..5 {
        req(&mut c, "GET", "/", None).await;
    }
    // Rejected before the VMM: no wake-up.
    req(&mut c, "PUT", "/machine-config", Some("{}")).await;
    req(&mut c, "GET", "/nope", None).await;
    assert_eq!(h.vmm.wakes(), 5);
    // Once running, GETs of device state are answered on the API thread without waking the
    // VMM, unless a device was busy that instant (then they take the hop, and are counted).
    boot(&mut c).await;
    let woken = h.vmm.wakes();
    for path in [
        "/",
        "/balloon",
        "/balloon/statistics",
        "/hotplug/memory",
        "/vm/resize",
    ] {
        get(&mut c, path).await;
    }
    let counters = get(&mut c, "/vm/memory").await["counters"].clone();
    let busy = counters["api_direct_reads_busy"].as_u64().unwrap();
    assert_eq!(
        counters["api_direct_reads"].as_u64().unwrap() + busy,
        5,
        "{counters}"
    );
    assert_eq!(h.vmm.wakes(), woken + busy + 1);
}

/// A tour that gets a 2xx from every route the router has, checked through the server's own
/// request counters, so a route added later without a success test fails here.
#[tokio::test]
async fn every_route_answers_2xx_in_a_tour() {
    let h = Harness::start();
    let mut c = h.client();
    for (method, path, body) in [
        ("GET", "/", None),
        ("GET", "/metrics", None),
        ("GET", "/vm/resize", None),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 512}"#),
        ),
        (
            "PUT",
            "/balloon",
            Some(r#"{"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 1}"#),
        ),
        ("GET", "/balloon/statistics", None),
        ("PUT", "/hotplug/memory", Some(r#"{"total_size_mib": 256}"#)),
        ("GET", "/hotplug/memory", None),
    ] {
        let (s, v) = req(&mut c, method, path, body).await;
        assert!(
            (200..300).contains(&s),
            "before start: {method} {path} -> {s} {v}"
        );
    }
    for (method, path, body) in [
        (
            "PUT",
            "/boot-source",
            Some(r#"{"kernel_image_path": "/k"}"#),
        ),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#),
        ),
        ("PATCH", "/balloon", Some(r#"{"amount_mib": 16}"#)),
        ("GET", "/balloon", None),
        ("GET", "/balloon/statistics", None),
        (
            "PATCH",
            "/balloon/statistics",
            Some(r#"{"stats_polling_interval_s": 2}"#),
        ),
        (
            "PATCH",
            "/hotplug/memory",
            Some(r#"{"requested_size_mib": 128}"#),
        ),
        ("GET", "/hotplug/memory", None),
        ("PUT", "/vm/resize", Some(r#"{"desired_mib": 512}"#)),
        ("GET", "/vm/resize", None),
        ("GET", "/vm/memory", None),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type": "FlushMetrics"}"#),
        ),
    ] {
        let (s, v) = req(&mut c, method, path, body).await;
        assert!((200..300).contains(&s), "{method} {path} -> {s} {v}");
    }
    let reply = raw(&mut c, "GET", "/metrics", None).await;
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    for (method, path) in api::routes() {
        let ok = text.lines().any(|l| {
            l.starts_with(&format!(
                "vmm_api_requests_total{{method=\"{method}\",route=\"{path}\",status=\"2"
            ))
        });
        assert!(ok, "no 2xx for {method} {path} in:\n{text}");
    }
}

/// What Firecracker's clients send (its documented examples, and its optional fields with
/// their default values) is taken; a value this VMM cannot honour is refused, saying why.
#[tokio::test]
async fn firecracker_clients_are_understood() {
    let h = Harness::start();
    let mut c = h.client();
    for (method, path, body) in [
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 1024, "smt": false, "track_dirty_pages": false, "huge_pages": "None", "cpu_template": "None"}"#,
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 1024, "smt": null, "cpu_template": null}"#,
        ),
        (
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/k", "initrd_path": null, "boot_args": null}"#,
        ),
        (
            "PUT",
            "/balloon",
            r#"{"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 1, "free_page_hinting": false, "free_page_reporting": true}"#,
        ),
        (
            "PUT",
            "/hotplug/memory",
            r#"{"total_size_mib": 1024, "block_size_mib": 2, "slot_size_mib": 128}"#,
        ),
    ] {
        let (s, v) = req(&mut c, method, path, Some(body)).await;
        assert_eq!(s, 204, "{method} {path} {body} -> {v}");
    }
    for (method, path, body, want) in [
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 1024, "smt": true}"#,
            "smt: true is not supported: the guest's vCPUs are single-threaded cores; send false \
             or leave it out",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 1024, "track_dirty_pages": true}"#,
            "track_dirty_pages: true is not supported: this VMM takes no snapshots, so it tracks \
             no dirty pages; send false or leave it out",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 1024, "huge_pages": "2M"}"#,
            "huge_pages: \"2M\" (hugetlbfs) is not supported: guest memory is 4 KiB pages \
             (\"None\") or transparent huge pages (\"Transparent\")",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 1024, "cpu_template": "T2"}"#,
            "cpu_template: \"T2\" is not supported: this VMM has no CPU templates (the guest sees \
             the host's CPU model as KVM reports it); send \"None\" or leave it out",
        ),
        (
            "PUT",
            "/balloon",
            r#"{"amount_mib": 0, "deflate_on_oom": true, "free_page_hinting": true}"#,
            "free_page_hinting: true is not supported: this balloon has free page reporting \
             instead (free_page_reporting), which returns free memory without a host-driven \
             hinting run; send false or leave it out",
        ),
        (
            "PUT",
            "/hotplug/memory",
            r#"{"total_size_mib": 1024, "slot_size_mib": 256}"#,
            "slot_size_mib: 256 MiB is not supported: this VMM maps every plugged block as its \
             own KVM memory slot, so the slot size is block_size_mib; send 128 (Firecracker's \
             default) or leave it out",
        ),
    ] {
        let msg = fault(&mut c, method, path, Some(body), 400).await;
        assert_eq!(msg, want, "{body}");
    }
    let start = Some(r#"{"action_type": "InstanceStart"}"#);
    assert_eq!(req(&mut c, "PUT", "/actions", start).await.0, 204);
    // Firecracker's hot-plug example, continued.
    let r = Some(r#"{"requested_size_mib": 512}"#);
    assert_eq!(req(&mut c, "PATCH", "/hotplug/memory", r).await.0, 204);
    h.settle();
    assert_eq!(
        get(&mut c, "/hotplug/memory").await["plugged_size_mib"],
        512
    );
}
