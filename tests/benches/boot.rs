//! Boot benchmark (not a test): `cargo bench -p e2e --bench boot`.
//!
//! Boots the Debian guest five times (256 MiB, 1 vCPU) where the VMM runs (directly, or in the
//! nested test host) and reports, as medians and ranges:
//! - VMM start-up: process start to the first vCPU entry (the VMM's `boot:` log line);
//! - guest boot: the guest's own uptime when it prints its ready marker;
//! - VMM memory overhead: the VMM's RSS minus the host-resident guest memory, both from
//!   `GET /vm/memory` once the guest is up.
//!
//! Nested-host figures compare only with runs made in the same host.

use std::time::Duration;

const RUNS: usize = 5;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let Some(host) = e2e::host() else { return };
    let (mut startup, mut uptime, mut overhead, mut guest_rss) = (vec![], vec![], vec![], vec![]);
    for i in 0..RUNS {
        let sock = host.socket_path("bench");
        let kernel = host.guest_kernel();
        let initrd = host.guest_initramfs();
        let vm = host
            .start_vm(&[
                "--kernel",
                &kernel,
                "--initramfs",
                &initrd,
                "--memory-mib",
                "256",
                "--cmdline",
                e2e::GUEST_CMDLINE,
                "--api-socket",
                &sock,
                "--log-level",
                "info",
            ])
            .expect("VMM starts");
        vm.wait_for(e2e::READY, Duration::from_secs(300))
            .expect("guest boots");
        let up: f64 = vm
            .console_value("GUEST-UPTIME")
            .and_then(|v| v.parse().ok())
            .expect("guest prints its uptime");
        let first = vm.stderr().lines().find_map(|l| {
            let rest = l.split("first vCPU entry ").nth(1)?;
            rest.split(" ms").next()?.parse::<f64>().ok()
        });
        let (status, body) = vm.api("GET", "/vm/memory", None).expect("API answers");
        assert_eq!(status, 200, "{body}");
        let m: serde_json::Value = serde_json::from_str(&body).unwrap();
        let rss = m["host"]["process_rss_bytes"].as_u64().unwrap_or(0) as f64;
        let g = m["host"]["guest_rss_bytes"].as_u64().unwrap_or(0) as f64;
        eprintln!(
            "run {i}: start-up {first:?} ms, guest uptime {up:.2} s, VMM RSS {:.1} MiB, guest resident {:.1} MiB",
            rss / 1048576.0,
            g / 1048576.0
        );
        if let Some(f) = first {
            startup.push(f);
        }
        uptime.push(up);
        overhead.push((rss - g) / 1048576.0);
        guest_rss.push(g / 1048576.0);
        vm.signal(15);
        let _ = vm.wait_exit(Duration::from_secs(30));
    }
    let range = |v: &[f64]| {
        let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        format!("{lo:.2}..{hi:.2}")
    };
    println!("mode: {}", host.mode());
    if !startup.is_empty() {
        println!(
            "VMM start-up to first vCPU entry: median {:.2} ms (range {}) over {} runs",
            median(&mut startup.clone()),
            range(&startup),
            startup.len()
        );
    }
    println!(
        "guest uptime at ready marker: median {:.2} s (range {})",
        median(&mut uptime.clone()),
        range(&uptime)
    );
    println!(
        "VMM overhead (RSS - guest resident): median {:.1} MiB (range {}); guest resident median {:.1} MiB",
        median(&mut overhead.clone()),
        range(&overhead),
        median(&mut guest_rss.clone())
    );
}
