//! Every route through a real server and a fake VMM: success, each error code, state rules,
//! body limits.

mod common;

use std::time::Duration;

use common::{boot, expect_fault, raw, req, wait_for, Harness};
use serde_json::json;

const SHORT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn instance_info_before_and_after_start() {
    let h = Harness::start();
    let mut c = h.client();
    let (s, v) = req(&mut c, "GET", "/", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["state"], "Not started");
    assert_eq!(v["vmm_version"], env!("CARGO_PKG_VERSION"));
    boot(&mut c).await;
    let (_, v) = req(&mut c, "GET", "/", None).await;
    assert_eq!(v["state"], "Running");
}

#[tokio::test]
async fn configuration_is_refused_after_start() {
    let h = Harness::start();
    let mut c = h.client();
    boot(&mut c).await;
    for (path, body) in [
        (
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 512}"#,
        ),
        ("/boot-source", r#"{"kernel_image_path": "/other"}"#),
        ("/balloon", r#"{"amount_mib": 0, "deflate_on_oom": false}"#),
        ("/hotplug/memory", r#"{"total_size_mib": 1024}"#),
        ("/actions", r#"{"action_type": "InstanceStart"}"#),
    ] {
        expect_fault(
            &mut c,
            "PUT",
            path,
            Some(body),
            409,
            &["before InstanceStart"],
        )
        .await;
    }
}

#[tokio::test]
async fn start_without_boot_source_is_400_and_changes_nothing() {
    let h = Harness::start();
    let mut c = h.client();
    expect_fault(
        &mut c,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        400,
        &["boot source"],
    )
    .await;
    let (_, v) = req(&mut c, "GET", "/", None).await;
    assert_eq!(v["state"], "Not started");
}

#[tokio::test]
async fn bad_bodies_name_the_field() {
    let h = Harness::start();
    let mut c = h.client();
    // Unknown field.
    expect_fault(
        &mut c,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 128, "smt": true}"#),
        400,
        &["unknown field `smt`"],
    )
    .await;
    // Wrong type: the path names the field.
    expect_fault(
        &mut c,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": "two", "mem_size_mib": 128}"#),
        400,
        &["vcpu_count", "invalid type"],
    )
    .await;
    // Out of the type's range.
    expect_fault(
        &mut c,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 300, "mem_size_mib": 128}"#),
        400,
        &["vcpu_count"],
    )
    .await;
    // Out of the allowed range: field, value and range.
    expect_fault(
        &mut c,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 0, "mem_size_mib": 128}"#),
        400,
        &["vcpu_count: 0 is out of range 1..=254"],
    )
    .await;
    expect_fault(
        &mut c,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 8}"#),
        400,
        &["mem_size_mib: 8 is out of range 16..=1048576"],
    )
    .await;
    // Missing field.
    expect_fault(
        &mut c,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1}"#),
        400,
        &["missing field `mem_size_mib`"],
    )
    .await;
    // Empty body, not JSON, trailing garbage, not an object.
    expect_fault(&mut c, "PUT", "/balloon", Some(""), 400, &["body is empty"]).await;
    expect_fault(
        &mut c,
        "PUT",
        "/balloon",
        Some("amount=1"),
        400,
        &["invalid body"],
    )
    .await;
    expect_fault(
        &mut c,
        "PATCH",
        "/balloon",
        Some(r#"{"amount_mib": 1} x"#),
        400,
        &["trailing"],
    )
    .await;
    expect_fault(
        &mut c,
        "PATCH",
        "/balloon",
        Some("[1]"),
        400,
        &["invalid body"],
    )
    .await;
    // Unknown action.
    expect_fault(
        &mut c,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "Reboot"}"#),
        400,
        &["action_type", "unknown variant"],
    )
    .await;
    // Ranges of the other bodies.
    expect_fault(
        &mut c,
        "PUT",
        "/hotplug/memory",
        Some(r#"{"total_size_mib": 1000}"#),
        400,
        &["total_size_mib: 1000 is not a multiple of 128"],
    )
    .await;
    expect_fault(
        &mut c,
        "PUT",
        "/hotplug/memory",
        Some(r#"{"total_size_mib": 1024, "block_size_mib": 3}"#),
        400,
        &["block_size_mib"],
    )
    .await;
    expect_fault(
        &mut c,
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 4000}"#),
        400,
        &["stats_polling_interval_s: 4000 is out of range 0..=3600"],
    )
    .await;
    expect_fault(
        &mut c,
        "PUT",
        "/vm/resize",
        Some(r#"{"desired_mib": 1}"#),
        400,
        &["desired_mib: 1 is out of range 16..=1048576"],
    )
    .await;
    expect_fault(
        &mut c,
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": ""}"#),
        400,
        &["kernel_image_path"],
    )
    .await;
    let long = format!(
        r#"{{"kernel_image_path": "/k", "boot_args": "{}"}}"#,
        "a".repeat(3000)
    );
    expect_fault(
        &mut c,
        "PUT",
        "/boot-source",
        Some(&long),
        400,
        &["boot_args: 3000 bytes is out of range 0..=2047"],
    )
    .await;
    // None of these reached the VMM.
    assert_eq!(h.fake.handled(), 0);
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
async fn devices_not_configured_are_404() {
    let h = Harness::start();
    let mut c = h.client();
    expect_fault(&mut c, "GET", "/balloon", None, 404, &["PUT /balloon"]).await;
    expect_fault(
        &mut c,
        "PATCH",
        "/balloon",
        Some(r#"{"amount_mib": 1}"#),
        404,
        &[],
    )
    .await;
    expect_fault(&mut c, "GET", "/balloon/statistics", None, 404, &[]).await;
    expect_fault(
        &mut c,
        "GET",
        "/hotplug/memory",
        None,
        404,
        &["PUT /hotplug/memory"],
    )
    .await;
    expect_fault(
        &mut c,
        "PATCH",
        "/hotplug/memory",
        Some(r#"{"requested_size_mib": 2}"#),
        404,
        &[],
    )
    .await;
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
async fn balloon_put_patch_get_reaches_target() {
    let h = Harness::start();
    let mut c = h.client();
    boot(&mut c).await;
    let (s, _) = req(&mut c, "PATCH", "/balloon", Some(r#"{"amount_mib": 256}"#)).await;
    assert_eq!(s, 204);
    let v = wait_for(&mut c, "/balloon", SHORT, |v| {
        v["actual_pages"] == v["target_pages"]
    })
    .await;
    assert_eq!(v["amount_mib"], 256);
    assert_eq!(v["target_pages"], 256 * 256);
    assert_eq!(v["actual_mib"], 256);
    assert_eq!(v["deflate_on_oom"], true);
    // Above the memory size: 400 from the VMM, and the target stays.
    expect_fault(
        &mut c,
        "PATCH",
        "/balloon",
        Some(r#"{"amount_mib": 4096}"#),
        400,
        &["amount_mib: 4096 is out of range 0..=1024"],
    )
    .await;
    let (_, v) = req(&mut c, "GET", "/balloon", None).await;
    assert_eq!(v["amount_mib"], 256);
}

#[tokio::test]
async fn balloon_statistics_get_and_patch() {
    let h = Harness::start();
    let mut c = h.client();
    boot(&mut c).await;
    let (s, v) = req(&mut c, "GET", "/balloon/statistics", None).await;
    assert_eq!(s, 200, "{v}");
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
    ] {
        assert!(v.get(field).is_some(), "{field} missing from {v}");
    }
    let (s, _) = req(
        &mut c,
        "PATCH",
        "/balloon/statistics",
        Some(r#"{"stats_polling_interval_s": 5}"#),
    )
    .await;
    assert_eq!(s, 204);
    expect_fault(
        &mut c,
        "PATCH",
        "/balloon/statistics",
        Some(r#"{"stats_polling_interval_s": 0}"#),
        400,
        &["stats_polling_interval_s"],
    )
    .await;
}

#[tokio::test]
async fn hotplug_patch_and_get() {
    let h = Harness::start();
    let mut c = h.client();
    boot(&mut c).await;
    let (s, _) = req(
        &mut c,
        "PATCH",
        "/hotplug/memory",
        Some(r#"{"requested_size_mib": 512}"#),
    )
    .await;
    assert_eq!(s, 204);
    let v = wait_for(&mut c, "/hotplug/memory", SHORT, |v| {
        v["plugged_size_mib"] == 512
    })
    .await;
    assert_eq!(
        v,
        json!({"total_size_mib": 2048, "block_size_mib": 2, "plugged_size_mib": 512, "requested_size_mib": 512, "usable_region_size_mib": 512})
    );
    expect_fault(
        &mut c,
        "PATCH",
        "/hotplug/memory",
        Some(r#"{"requested_size_mib": 4096}"#),
        400,
        &["requested_size_mib: 4096 is out of range 0..=2048"],
    )
    .await;
    expect_fault(
        &mut c,
        "PATCH",
        "/hotplug/memory",
        Some(r#"{"requested_size_mib": 3}"#),
        400,
        &["multiple of block_size_mib"],
    )
    .await;
}

#[tokio::test]
async fn resize_both_ways() {
    let h = Harness::start();
    let mut c = h.client();
    expect_fault(
        &mut c,
        "PUT",
        "/vm/resize",
        Some(r#"{"desired_mib": 2048}"#),
        409,
        &["InstanceStart"],
    )
    .await;
    let (s, v) = req(&mut c, "GET", "/vm/resize", None).await;
    assert_eq!((s, &v["state"]), (200, &json!("idle")));
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
    let v = wait_for(&mut c, "/vm/resize", SHORT, |v| v["state"] == "reached").await;
    assert_eq!(
        v,
        json!({"desired_mib": 2048, "current_mib": 2048, "mechanism": "virtio_mem", "state": "reached"})
    );
    // Down below the boot size: unplug, then balloon.
    let (s, _) = req(&mut c, "PUT", "/vm/resize", Some(r#"{"desired_mib": 512}"#)).await;
    assert_eq!(s, 204);
    let v = wait_for(&mut c, "/vm/resize", SHORT, |v| v["state"] == "reached").await;
    assert_eq!(
        v,
        json!({"desired_mib": 512, "current_mib": 512, "mechanism": "both", "state": "reached"})
    );
    let (_, b) = req(&mut c, "GET", "/balloon", None).await;
    assert_eq!(b["amount_mib"], 512);
    // Beyond what the devices reach.
    expect_fault(
        &mut c,
        "PUT",
        "/vm/resize",
        Some(r#"{"desired_mib": 8192}"#),
        400,
        &["desired_mib: 8192 is out of range 16..=3072"],
    )
    .await;
}

#[tokio::test]
async fn memory_map_pages_through_runs() {
    let h = Harness::start();
    let mut c = h.client();
    boot(&mut c).await;
    req(&mut c, "PATCH", "/balloon", Some(r#"{"amount_mib": 100}"#)).await;
    wait_for(&mut c, "/balloon", SHORT, |v| v["actual_mib"] == 100).await;

    let (s, v) = req(&mut c, "GET", "/vm/memory", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["page_size"], 4096);
    assert_eq!(v["regions"].as_array().unwrap().len(), 2);
    assert_eq!(v["totals"]["ballooned_bytes"], 100u64 << 20);
    assert_eq!(v["totals"]["unplugged_bytes"], 2048u64 << 20);
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
        let (s, v) = req(
            &mut c,
            "GET",
            &format!("/vm/memory?reason=ballooned&limit=7&pfn_start={pfn}"),
            None,
        )
        .await;
        assert_eq!(s, 200, "{v}");
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
    let (_, v) = req(
        &mut c,
        "GET",
        "/vm/memory?reason=unplugged&pfn_start=1048576&pfn_end=1048577",
        None,
    )
    .await;
    assert_eq!(v["offline"][0]["pages_in_range"], 1);

    // Bad queries.
    expect_fault(
        &mut c,
        "GET",
        "/vm/memory?limit=0",
        None,
        400,
        &["limit: 0 is out of range 1..=4096"],
    )
    .await;
    expect_fault(
        &mut c,
        "GET",
        "/vm/memory?reason=lost",
        None,
        400,
        &["unknown variant"],
    )
    .await;
    expect_fault(
        &mut c,
        "GET",
        "/vm/memory?color=red",
        None,
        400,
        &["unknown field `color`"],
    )
    .await;
    expect_fault(
        &mut c,
        "GET",
        "/vm/memory?pfn_start=10&pfn_end=10",
        None,
        400,
        &["pfn_end"],
    )
    .await;
    expect_fault(
        &mut c,
        "GET",
        "/vm/memory?pfn_start=x",
        None,
        400,
        &["pfn_start"],
    )
    .await;
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let h = Harness::start();
    let mut c = h.client();
    req(&mut c, "GET", "/", None).await;
    req(&mut c, "GET", "/nope", None).await;
    let (s, _) = req(
        &mut c,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
    )
    .await;
    assert_eq!(s, 204);
    let reply = raw(&mut c, "GET", "/metrics", None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.content_type.as_deref(),
        Some(api::metrics::PROMETHEUS_CONTENT_TYPE)
    );
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    assert!(
        text.contains("# TYPE vmm_metrics_flushes_total counter\nvmm_metrics_flushes_total 1\n"),
        "{text}"
    );
    assert!(
        text.contains(r#"vmm_api_requests_total{method="GET",route="/",status="200"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"vmm_api_requests_total{method="GET",route="unmatched",status="404"} 1"#),
        "{text}"
    );
    // Every non-comment line is `name{labels} value`.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "bad sample line {line:?}");
    }
}

#[tokio::test]
async fn ctrl_alt_del_exits_and_then_changes_are_409() {
    let h = Harness::start();
    let mut c = h.client();
    expect_fault(
        &mut c,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
        409,
        &["running VM"],
    )
    .await;
    boot(&mut c).await;
    let (s, _) = req(
        &mut c,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    )
    .await;
    assert_eq!(s, 204);
    let (_, v) = req(&mut c, "GET", "/", None).await;
    assert_eq!(v["state"], "Exited");
    expect_fault(
        &mut c,
        "PATCH",
        "/balloon",
        Some(r#"{"amount_mib": 1}"#),
        409,
        &["exited"],
    )
    .await;
    expect_fault(
        &mut c,
        "PUT",
        "/vm/resize",
        Some(r#"{"desired_mib": 512}"#),
        409,
        &["exited"],
    )
    .await;
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
    assert_eq!(h.fake.wakes(), 5);
    assert_eq!(h.fake.handled(), 5);
}

/// A tour that gets a 2xx from every route the router has, checked through the server's own
/// request counters, so a route added later without a success test fails here.
#[tokio::test]
async fn every_route_answers_2xx_in_a_tour() {
    let h = Harness::start();
    let mut c = h.client();
    req(&mut c, "GET", "/", None).await;
    boot(&mut c).await;
    for (method, path, body) in [
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
        ("PUT", "/vm/resize", Some(r#"{"desired_mib": 1024}"#)),
        ("GET", "/vm/resize", None),
        ("GET", "/vm/memory", None),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type": "FlushMetrics"}"#),
        ),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type": "SendCtrlAltDel"}"#),
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
        // /metrics itself is counted after its answer is rendered: it is the request above.
        assert!(
            ok || *path == "/metrics",
            "no 2xx for {method} {path} in:\n{text}"
        );
    }
}

#[tokio::test]
async fn statistics_disabled_report_only_sizes() {
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
    let (s, v) = req(&mut c, "GET", "/balloon/statistics", None).await;
    assert_eq!(s, 200);
    assert_eq!(
        v,
        json!({"target_pages": 0, "actual_pages": 0, "target_mib": 0, "actual_mib": 0})
    );
}
