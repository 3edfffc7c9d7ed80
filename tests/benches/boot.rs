//! Boot benchmark (not a test): `cargo bench -p e2e --bench boot`.
//!
//! Boots the Debian guest five times (`BOOT_BENCH_RUNS`; 256 MiB, 1 vCPU) where the VMM runs (directly, or in the
//! nested test host) and reports, as medians and ranges:
//! - VMM start-up: process start to the first vCPU entry (the VMM's `boot:` log line);
//! - guest boot: the guest's own uptime when it prints its ready marker;
//! - VMM memory overhead: the VMM's RSS minus the host-resident guest memory, both from
//!   `GET /vm/memory` once the guest is up.
//!
//! `BOOT_BENCH_PROBE=1` prints, after each boot, guest RAM's mapping in the VMM (smaps) and KVM's
//! nested-paging counters ([`probe`]).
//!
//! Nested-host figures compare only with runs made in the same host. To compare two builds,
//! name the other VMM binary in `E2E_VMM_BASELINE`: each run then boots it and the VMM under
//! test one after the other in the same test host, and both series are reported.

use std::time::Duration;

/// Boots per VMM; `BOOT_BENCH_RUNS` overrides it.
const RUNS: usize = 5;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// One boot's figures.
struct Run {
    /// VMM start-up to the first vCPU entry, ms (when the log line is there).
    startup: Option<f64>,
    /// The guest's uptime at its ready marker, s.
    uptime: f64,
    /// VMM RSS and the guest memory resident in it, MiB.
    rss: f64,
    guest: f64,
}

/// Boots the guest once under the VMM under test, or under `vmm` (a path where it runs).
fn boot_once(host: &e2e::TestHost, vmm: Option<&str>) -> Result<Run, String> {
    let sock = host.socket_path("bench");
    let kernel = host.guest_kernel();
    let initrd = host.guest_initramfs();
    let args = [
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
    ];
    let vm = match vmm {
        Some(vmm) => host.start_process(&[&[vmm][..], &args[..]].concat()),
        None => host.start_vm(&args),
    }
    .map_err(|e| format!("the VMM did not start: {e}"))?;
    vm.wait_for(e2e::READY, Duration::from_secs(300))
        .map_err(|e| format!("the guest did not boot: {e}"))?;
    if std::env::var_os("BOOT_BENCH_PROBE").is_some() {
        probe(host);
    }
    let uptime: f64 = vm
        .console_value("GUEST-UPTIME")
        .and_then(|v| v.parse().ok())
        .ok_or("the guest printed no GUEST-UPTIME")?;
    let startup = vm.stderr().lines().find_map(|l| {
        let rest = l.split("first vCPU entry ").nth(1)?;
        rest.split(" ms").next()?.parse::<f64>().ok()
    });
    let (status, body) = vm
        .api("GET", "/vm/memory", None)
        .map_err(|e| format!("the API did not answer: {e}"))?;
    if status != 200 {
        return Err(format!("GET /vm/memory answered {status}: {body}"));
    }
    let m: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    let mib = |v: &serde_json::Value| v.as_u64().unwrap_or(0) as f64 / 1048576.0;
    let run = Run {
        startup,
        uptime,
        rss: mib(&m["host"]["process_rss_bytes"]),
        guest: mib(&m["host"]["guest_rss_bytes"]),
    };
    vm.signal(15);
    let _ = vm.wait_exit(Duration::from_secs(30));
    Ok(run)
}

/// With `BOOT_BENCH_PROBE=1`, once the guest is up, what the host says of it: the VMM's largest
/// mapping (guest RAM here) from /proc/PID/smaps (its size, RSS and transparent huge pages, in
/// KiB: a VMA larger than the RAM has a neighbour merged in), and KVM's debugfs counters (4 KiB
/// and 2 MiB nested mappings, faults fixed, exits; summed over live VMs, so this one's alone).
/// Needs root where the VMM runs (always in the test host).
fn probe(host: &e2e::TestHost) {
    let script = r#"p=$(pidof vmm vmm-baseline | cut -d' ' -f1)
awk '/^[0-9a-f]+-/{h=$1} /^Size:/{sz=$2} /^Rss:/{r=$2}
  /^AnonHugePages:/{if (sz>max){max=sz; l=h" size "sz" rss "r" thp "$2}} END{print "guest RAM", l}' /proc/$p/smaps
[ -d /sys/kernel/debug/kvm ] || mount -t debugfs none /sys/kernel/debug 2>/dev/null
for f in pages_4k pages_2m pf_fixed exits; do echo "kvm $f $(cat /sys/kernel/debug/kvm/$f 2>/dev/null)"; done"#;
    match host.exec(&["sh", "-c", script], Duration::from_secs(30)) {
        Ok((_, out)) => println!("probe: {}", out.trim().replace('\n', "; ")),
        Err(e) => println!("probe failed: {e}"),
    }
}

/// The figures of one VMM's boots.
#[derive(Default)]
struct Series {
    startup: Vec<f64>,
    uptime: Vec<f64>,
    overhead: Vec<f64>,
    guest_rss: Vec<f64>,
}

impl Series {
    fn push(&mut self, r: &Run) {
        self.startup.extend(r.startup);
        self.uptime.push(r.uptime);
        self.overhead.push(r.rss - r.guest);
        self.guest_rss.push(r.guest);
    }

    fn report(&self, label: &str) {
        if self.uptime.is_empty() {
            println!("{label}: no boot succeeded");
            return;
        }
        let range = |v: &[f64]| {
            let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            format!("{lo:.2}..{hi:.2}")
        };
        if !self.startup.is_empty() {
            println!(
                "{label}VMM start-up to first vCPU entry: median {:.2} ms (range {}) over {} runs",
                median(&mut self.startup.clone()),
                range(&self.startup),
                self.startup.len()
            );
        }
        println!(
            "{label}guest uptime at ready marker: median {:.2} s (range {}) over {} runs",
            median(&mut self.uptime.clone()),
            range(&self.uptime),
            self.uptime.len()
        );
        println!(
            "{label}VMM overhead (RSS - guest resident): median {:.1} MiB (range {}); guest resident median {:.1} MiB",
            median(&mut self.overhead.clone()),
            range(&self.overhead),
            median(&mut self.guest_rss.clone())
        );
    }
}

fn main() {
    let Some(host) = e2e::host() else { return };
    // With E2E_VMM_BASELINE, each run boots the baseline VMM, then the VMM under test, in the
    // same test host: both see the same load, which here varies more than the figures do.
    let baseline = host.baseline_vmm().map(str::to_string);
    let (mut current, mut base) = (Series::default(), Series::default());
    let runs = std::env::var("BOOT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(RUNS);
    'runs: for i in 0..runs {
        let vmms: Vec<(&str, Option<&str>)> = match &baseline {
            Some(b) => vec![("baseline ", Some(b.as_str())), ("", None)],
            None => vec![("", None)],
        };
        for (label, vmm) in vmms {
            // A failed boot (the nested test host wedges now and then: resources/README.md)
            // ends the series; the runs before it still count and the failure is reported.
            let r = match boot_once(host, vmm) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("run {i}: {label}FAILED, the series ends here: {e}");
                    break 'runs;
                }
            };
            eprintln!(
                "run {i}: {label}start-up {:?} ms, guest uptime {:.2} s, VMM RSS {:.1} MiB, guest resident {:.1} MiB",
                r.startup, r.uptime, r.rss, r.guest
            );
            match vmm {
                Some(_) => base.push(&r),
                None => current.push(&r),
            }
        }
    }
    println!("mode: {}", host.mode());
    if baseline.is_some() {
        base.report("baseline: ");
    }
    current.report("");
    if current.uptime.is_empty() {
        std::process::exit(1);
    }
}
