//! The host daemon end to end: hostd launches three Debian guests whose maximums together exceed
//! its budget. Idle, their resident memory falls; one guest then allocates and touches 700 MiB
//! and gets it, with no OOM kill anywhere, while the others give memory back and the targets stay
//! within the budget. Checksummed data in every guest stays intact throughout; a SIGKILLed VMM
//! is reported with its cause and leaves the others running; a restarted daemon keeps all three
//! (two running, one dead) without disturbing them.
//!
//! The guests' consoles are files in hostd's state directory (console.log, and the console.in
//! FIFO to type into), reached with commands run where hostd runs. Figures are printed with an
//! `e2e-hostd:` prefix:
//!
//! ```console
//! $ cargo test --release -p e2e --test hostd -- --nocapture --test-threads=1
//! ```

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const BOOT_MIB: u64 = 512;
const MIN_MIB: u64 = 256;
const MAX_MIB: u64 = 1024;
/// The three maximums (3 GiB) exceed it; the three boot sizes fill it.
const BUDGET_MIB: u64 = 1536;
const ALLOC_MIB: u64 = 700;
const PATTERN_MIB: u64 = 64;
/// Memory each guest touches and frees before going idle (free page reporting's work).
const TOUCH_MIB: u64 = 200;
const IDS: [&str; 3] = ["a", "b", "c"];
/// The resident-size bound: the VMMs' RSS added up stays within the budget plus this. Each VMM
/// holds ~5 MiB of its own, and virtio-mem's hot-added memory costs the guest ~16 MiB of struct
/// pages per GiB that the host backs as soon as the guest writes them; a shrinking guest's
/// balloon lags its target by up to one inflate batch while the growing guest already touches
/// its new memory. 3 x 5 + 16 + 64 (two 32 MiB in-flight shrink steps) = 95, rounded up.
const RSS_SLACK_MIB: u64 = 96;

/// `hostd` where the VMMs run (built here first unless E2E_NO_BUILD, as the harness builds the
/// VMM; testhost.sh adds it to the nested test host when it sits beside the VMM).
fn hostd_binary(host: &e2e::TestHost) -> String {
    match host.mode() {
        e2e::Mode::Nested => "/bin/hostd".into(),
        e2e::Mode::Direct => e2e::repo_root()
            .join("target/release/hostd")
            .display()
            .to_string(),
    }
}

fn build_hostd() {
    if std::env::var_os("E2E_NO_BUILD").is_some() {
        return;
    }
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "-p", "hostd", "-p", "vmm"])
        .current_dir(e2e::repo_root())
        .stdout(Stdio::null())
        .status()
        .expect("run cargo");
    assert!(st.success(), "cargo build --release -p hostd -p vmm failed");
}

/// Where the daemon runs as root (always in the test host) its VMMs run contained, as in
/// production: as nobody, with no capabilities, each in an empty root of its own
/// (docs/security.md).
fn contained(host: &e2e::TestHost) -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    host.mode() == e2e::Mode::Nested || unsafe { libc::geteuid() } == 0
}

/// Each running VMM, seen from the host: nobody, no capabilities, filtered, and one mount (its
/// empty root) in its view.
fn assert_contained(host: &e2e::TestHost, pids: &[i64]) {
    for pid in pids {
        let read = |file: &str| {
            host.exec(
                &["cat", &format!("/proc/{pid}/{file}")],
                Duration::from_secs(60),
            )
            .map(|(_, out)| out)
            .unwrap_or_default()
        };
        let status = read("status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}:")))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("VMM {pid}: no {name} in its status: {status}"))
        };
        assert!(
            field("Uid").split_whitespace().all(|u| u == "65534"),
            "VMM {pid}: {status}"
        );
        assert_eq!(field("CapEff"), "0000000000000000", "VMM {pid}: {status}");
        assert_eq!(field("Seccomp"), "2", "VMM {pid}: {status}");
        let mounts = read("mountinfo");
        assert_eq!(
            mounts.lines().count(),
            1,
            "VMM {pid} sees more than its empty root: {mounts}"
        );
    }
}

/// A guest console in hostd's state directory.
struct Console<'h> {
    host: &'h e2e::TestHost,
    id: &'static str,
    log: String,
    fifo: String,
    seq: Mutex<u64>,
}

impl Console<'_> {
    /// The whole console log so far.
    fn text(&self) -> String {
        self.host
            .exec(&["cat", &self.log], Duration::from_secs(60))
            .map(|(_, out)| out)
            .unwrap_or_default()
    }

    fn type_line(&self, line: &str) {
        let (exit, out) = self
            .host
            .exec(
                &[
                    "sh",
                    "-c",
                    "printf '%s\\n' \"$1\" > \"$2\"",
                    "sh",
                    line,
                    &self.fifo,
                ],
                Duration::from_secs(60),
            )
            .expect("write the console FIFO");
        assert_eq!(exit.as_status(), 0, "writing {}: {out}", self.fifo);
    }

    /// Waits for a console line containing `needle` after byte `from`; returns the text after
    /// `from` up to and including that line. `alive` runs at every poll and fails the test at
    /// once when the guest can no longer print it.
    fn wait_for(&self, needle: &str, from: usize, timeout: Duration, alive: impl Fn()) -> String {
        let t0 = Instant::now();
        loop {
            let text = self.text();
            let tail = text.get(from..).unwrap_or("");
            if let Some(i) = tail.find(needle) {
                let end = tail[i..].find('\n').map_or(tail.len(), |e| i + e);
                return tail[..end].to_string();
            }
            alive();
            assert!(
                t0.elapsed() < timeout,
                "guest {}: no {needle:?} within {timeout:?}; console tail:\n{}",
                self.id,
                last_lines(&text, 30)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Types `cmd` followed by a marker with its status; returns what `finish` needs.
    fn start(&self, cmd: &str) -> (u64, usize) {
        let n = {
            let mut s = self.seq.lock().unwrap();
            *s += 1;
            *s
        };
        let from = self.text().len();
        // The quotes keep the echoed command line from matching the marker.
        self.type_line(&format!("{cmd}; echo HD-DO''NE-{n} $?"));
        (n, from)
    }

    /// Waits for the command `start` typed; returns its status and output.
    fn finish(&self, (n, from): (u64, usize), timeout: Duration) -> (i32, String) {
        let out = self.wait_for(&format!("HD-DONE-{n} "), from, timeout, || {});
        let status = out
            .rsplit(&format!("HD-DONE-{n} "))
            .next()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(-1);
        (status, out)
    }

    /// Runs `cmd` in the guest's shell; returns its status and output.
    fn run(&self, cmd: &str, timeout: Duration) -> (i32, String) {
        let started = self.start(cmd);
        self.finish(started, timeout)
    }

    fn run_ok(&self, cmd: &str, timeout: Duration) -> String {
        let (status, out) = self.run(cmd, timeout);
        assert_eq!(status, 0, "guest {}: {cmd} failed:\n{out}", self.id);
        out
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The daemon's API through the harness.
fn call(d: &e2e::Vm, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let (status, text) = d
        .api(method, path, body.as_deref())
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn get(d: &e2e::Vm, path: &str) -> Value {
    let (status, v) = call(d, "GET", path, None);
    assert_eq!(status, 200, "GET {path}: {v}");
    v
}

/// VmRSS of each PID, MiB, read where the VMMs run.
fn rss_mib(host: &e2e::TestHost, pids: &[i64]) -> Vec<u64> {
    pids.iter()
        .map(|p| {
            let (_, out) = host
                .exec(
                    &["cat", &format!("/proc/{p}/status")],
                    Duration::from_secs(60),
                )
                .expect("read /proc");
            out.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(0, |k| k / 1024)
        })
        .collect()
}

fn alive(host: &e2e::TestHost, pid: i64) -> bool {
    host.exec(&["kill", "-0", &pid.to_string()], Duration::from_secs(30))
        .is_ok_and(|(exit, _)| exit.as_status() == 0)
}

/// Kills the VMMs when the test ends, however it ends (they outlive hostd by design).
struct KillOnDrop<'h>(&'h e2e::TestHost, Vec<i64>);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        for p in &self.1 {
            let _ = self
                .0
                .exec(&["kill", "-9", &p.to_string()], Duration::from_secs(30));
        }
    }
}

fn start_hostd(host: &e2e::TestHost, state: &str, socket: &str) -> e2e::Vm {
    let vmm = match host.mode() {
        e2e::Mode::Nested => "/bin/vmm".to_string(),
        e2e::Mode::Direct => e2e::repo_root()
            .join("target/release/vmm")
            .display()
            .to_string(),
    };
    let budget = BUDGET_MIB.to_string();
    let log = format!("{state}.log");
    let hostd = hostd_binary(host);
    // Its log in a file beside the state directory (both daemons append), read with `cat`.
    let mut argv = vec![
        "sh",
        "-c",
        "exec \"$@\" 2>>\"$0\"",
        &log,
        &hostd,
        "--state-dir",
        state,
        "--socket",
        socket,
        "--vmm",
        &vmm,
        "--budget-mib",
        &budget,
    ];
    if contained(host) {
        argv.extend(["--vmm-uid", "65534", "--vmm-gid", "65534", "--vmm-jail"]);
    }
    let d = host.start_process(&argv).expect("start hostd");
    d.set_api_socket(socket);
    let t0 = Instant::now();
    while !matches!(d.api("GET", "/", None), Ok((200, _))) {
        assert!(
            t0.elapsed() < Duration::from_secs(60) && d.exit_status().is_none(),
            "hostd did not answer: {}",
            hostd_log(host, state)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    d
}

/// What the daemons logged (their stderr, in a file beside the state directory).
fn hostd_log(host: &e2e::TestHost, state: &str) -> String {
    host.exec(&["cat", &format!("{state}.log")], Duration::from_secs(60))
        .map(|(_, out)| out)
        .unwrap_or_default()
}

/// On a failure, shows what the daemon said and saw.
struct DumpOnPanic<'a>(&'a e2e::TestHost, &'a str, &'a e2e::Vm);

impl Drop for DumpOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- hostd log, tail ---\n{}",
                last_lines(&hostd_log(self.0, self.1), 120)
            );
            if let Ok((_, v)) = self.2.api("GET", "/host/memory", None) {
                eprintln!("--- GET /host/memory ---\n{v}");
            }
        }
    }
}

/// Samples of the three VMMs' RSS and the daemon's view, one per `every`, for `how_long`.
struct Sample {
    t: f64,
    rss: Vec<u64>,
    targets: Vec<u64>,
    total_target: u64,
}

fn sample(host: &e2e::TestHost, d: &e2e::Vm, pids: &[i64], t0: Instant) -> Sample {
    let view = get(d, "/host/memory");
    let targets = IDS
        .iter()
        .map(|id| {
            view["vms"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["id"] == *id)
                .and_then(|v| v["target_mib"].as_u64())
                .unwrap_or(0)
        })
        .collect();
    Sample {
        t: t0.elapsed().as_secs_f64(),
        rss: rss_mib(host, pids),
        targets,
        total_target: view["last_tick"]["total_target_mib"].as_u64().unwrap_or(0),
    }
}

fn print_sample(what: &str, s: &Sample) {
    eprintln!(
        "e2e-hostd: {what} t={:5.1}s rss {:?} (sum {}) MiB, targets {:?} (sum {}) MiB",
        s.t,
        s.rss,
        s.rss.iter().sum::<u64>(),
        s.targets,
        s.total_target
    );
}

/// The three guests, as the phases of the test see them.
struct Guests<'h> {
    host: &'h e2e::TestHost,
    pids: Vec<i64>,
    consoles: Vec<Console<'h>>,
    /// The checksum of each guest's pattern data.
    sums: Vec<String>,
    /// The VMMs' RSS added up at its highest while the guests worked, MiB.
    work_peak_rss: u64,
    /// hostd's state directory where it runs.
    state: String,
}

/// The whole scenario, run in CI: launch and admission, checksummed data, idle guests shrink,
/// one allocates 700 MiB and gets it with no OOM kill within the budget, a SIGKILLed VMM is
/// reported, a restarted daemon adopts the others.
#[test]
fn three_guests_share_a_budget_idle_ones_shrink_and_a_busy_one_gets_700_mib() {
    build_hostd();
    let Some(host) = e2e::host() else { return };
    let t_test = Instant::now();
    let socket = host.socket_path("hostd");
    let state = format!(
        "{}/hostd-state-{}",
        PathBuf::from(&socket).parent().unwrap().display(),
        std::process::id()
    );
    let d = start_hostd(host, &state, &socket);
    let dump = DumpOnPanic(host, &state, &d);
    let mut g = launch(host, &d, &state);
    let _cleanup = KillOnDrop(host, g.pids.clone());
    if contained(host) {
        assert_contained(host, &g.pids);
    }
    write_and_touch(&d, &mut g);
    idle(&d, &g);
    allocate(&d, &g);
    kill_one(&d, &g);
    drop(dump);
    let d = restart(d, &state, &socket, &g);
    let _dump = DumpOnPanic(host, &state, &d);

    // Clean up through the API.
    for id in ["a", "c"] {
        let (status, v) = call(&d, "DELETE", &format!("/vms/{id}"), None);
        assert_eq!(status, 202, "{v}");
    }
    assert_eq!(call(&d, "DELETE", "/vms/b", None).0, 200);
    let t_del = Instant::now();
    while get(&d, "/vms")["vms"]
        .as_array()
        .is_some_and(|v| !v.is_empty())
    {
        assert!(
            t_del.elapsed() < Duration::from_secs(60),
            "{}",
            get(&d, "/vms")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!(
        "e2e-hostd: deleted in {:.1} s; whole test {:.0} s",
        t_del.elapsed().as_secs_f64(),
        t_test.elapsed().as_secs_f64()
    );
}

/// Three guests whose maximums (3 GiB) exceed the budget (1.5 GiB); a fourth whose minimum does
/// not fit is refused. Waits until all three are at their shell.
fn launch<'h>(host: &'h e2e::TestHost, d: &e2e::Vm, state: &str) -> Guests<'h> {
    let kernel = host.guest_kernel();
    let initrd = host.guest_initramfs();
    let mut pids = Vec::new();
    for id in IDS {
        let spec = json!({
            "id": id, "kernel": kernel, "initramfs": initrd, "cmdline": cmdline("stay"),
            "vcpus": 1,
            "memory": { "boot_mib": BOOT_MIB, "min_mib": MIN_MIB, "max_mib": MAX_MIB },
        });
        let (status, v) = call(d, "POST", "/vms", Some(spec));
        assert_eq!(status, 201, "POST /vms {id}: {v}");
        pids.push(v["pid"].as_i64().expect("a pid"));
    }
    let big =
        json!({ "id": "d", "kernel": kernel, "memory": { "boot_mib": 1024, "min_mib": 1024 } });
    let (status, v) = call(d, "POST", "/vms", Some(big));
    assert_eq!(status, 409, "{v}");
    assert!(
        v["fault_message"]
            .as_str()
            .unwrap()
            .contains("256 MiB missing"),
        "{v}"
    );
    let consoles: Vec<Console> = IDS
        .iter()
        .map(|id| {
            let v = get(d, &format!("/vms/{id}"));
            Console {
                host,
                id,
                log: v["console_log"].as_str().unwrap().into(),
                fifo: v["console_in"].as_str().unwrap().into(),
                seq: Mutex::new(0),
            }
        })
        .collect();
    let t_boot = Instant::now();
    for c in &consoles {
        // A VMM that ended while its guest booted fails the test at once, with its cause.
        c.wait_for(e2e::READY, 0, BOOT, || {
            let v = get(d, &format!("/vms/{}", c.id));
            assert_ne!(
                v["state"], "exited",
                "guest {} ended before it was ready: {v}",
                c.id
            );
        });
    }
    eprintln!(
        "e2e-hostd: three guests ready {:.1} s after POST",
        t_boot.elapsed().as_secs_f64()
    );
    Guests {
        host,
        pids,
        consoles,
        sums: Vec::new(),
        work_peak_rss: 0,
        state: state.to_string(),
    }
}

/// Checksummed data in every guest, then memory touched and freed: all three at once.
fn write_and_touch(d: &e2e::Vm, g: &mut Guests) {
    let t_work = Instant::now();
    let cmd = format!("pattern write {PATTERN_MIB} && alloc {TOUCH_MIB} && alloc-free");
    let started: Vec<_> = g.consoles.iter().map(|c| c.start(&cmd)).collect();
    let mut peak = 0u64;
    for (c, st) in g.consoles.iter().zip(started) {
        let (status, out) = c.finish(st, Duration::from_secs(600));
        assert_eq!(status, 0, "guest {}: {cmd}:\n{out}", c.id);
        g.sums.push(pattern_sum(&out, "GUEST-PATTERN-WRITTEN"));
        let s = sample(g.host, d, &g.pids, t_work);
        print_sample("work", &s);
        peak = peak.max(s.rss.iter().sum());
    }
    g.work_peak_rss = peak;
    eprintln!(
        "e2e-hostd: pattern + touch/free in all three took {:.1} s; VMM RSS sum peaked at {peak} MiB",
        t_work.elapsed().as_secs_f64()
    );
}

/// Idle: the guests' resident memory falls, and their targets go below the boot size. Watches
/// until the targets have not moved for 15 s (at most 90 s).
fn idle(d: &e2e::Vm, g: &Guests) {
    let t_idle = Instant::now();
    let first = sample(g.host, d, &g.pids, t_idle);
    print_sample("idle", &first);
    let start_sum: u64 = first.rss.iter().sum();
    let mut sums_at = vec![(first.t, start_sum)];
    let mut last = first;
    let mut stable_since = Instant::now();
    while t_idle.elapsed() < Duration::from_secs(90) {
        std::thread::sleep(Duration::from_secs(3));
        let s = sample(g.host, d, &g.pids, t_idle);
        print_sample("idle", &s);
        sums_at.push((s.t, s.rss.iter().sum()));
        if s.targets != last.targets {
            stable_since = Instant::now();
        }
        last = s;
        if stable_since.elapsed() > Duration::from_secs(15) {
            break;
        }
    }
    let idle_sum: u64 = last.rss.iter().sum();
    let fell = start_sum.saturating_sub(idle_sum);
    let reached = |share: u64| {
        sums_at
            .iter()
            .find(|(_, sum)| start_sum.saturating_sub(*sum) * 100 >= fell * share)
            .map_or(f64::NAN, |(t, _)| *t)
    };
    eprintln!(
        "e2e-hostd: idle: VMM RSS sum {start_sum} -> {idle_sum} MiB (-{fell} MiB) over {:.1} s; \
         half of that by {:.1} s, 90% by {:.1} s; {} MiB below the peak while working; targets {:?}",
        last.t,
        reached(50),
        reached(90),
        g.work_peak_rss.saturating_sub(idle_sum),
        last.targets
    );
    assert!(
        idle_sum + 100 <= g.work_peak_rss,
        "idle guests' resident memory did not fall: peak {} -> {idle_sum} MiB",
        g.work_peak_rss
    );
    assert!(
        last.targets.iter().all(|t| *t < BOOT_MIB),
        "idle guests were not shrunk: targets {:?}",
        last.targets
    );
}

/// One guest allocates and touches 700 MiB: it succeeds, no guest OOM-kills, the targets stay
/// within the budget and the VMMs' RSS within the budget plus the slack; the data is intact.
fn allocate(d: &e2e::Vm, g: &Guests) {
    let a = &g.consoles[0];
    // One 700 MiB mapping is more than the guest's RAM (512 MiB boot): Linux's default
    // heuristic overcommit refuses it at mmap time, before any page is touched. The guest
    // allows overcommit, as a workload that maps more than it has needs; the pages still have
    // to exist when they are touched.
    a.run_ok("echo 1 > /proc/sys/vm/overcommit_memory", CMD);
    let from = a.text().len();
    a.type_line(&format!("alloc {ALLOC_MIB}"));
    let t_alloc = Instant::now();
    let mut worst_rss = 0u64;
    let mut worst_target = 0u64;
    let done = loop {
        let s = sample(g.host, d, &g.pids, t_alloc);
        print_sample("alloc", &s);
        worst_rss = worst_rss.max(s.rss.iter().sum());
        worst_target = worst_target.max(s.total_target);
        let text = a.text();
        let tail = text.get(from..).unwrap_or("");
        if tail.contains("GUEST-ALLOC-DONE") || tail.contains("GUEST-ALLOC-FAILED") {
            break tail.to_string();
        }
        assert!(
            t_alloc.elapsed() < Duration::from_secs(900),
            "alloc {ALLOC_MIB} did not finish in 900 s:\n{}",
            last_lines(&text, 30)
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    let alloc_secs = t_alloc.elapsed().as_secs_f64();
    assert!(
        done.contains("GUEST-ALLOC-DONE"),
        "the allocation failed:\n{done}"
    );
    // Let the others' balloons finish, checking the bound all along.
    let mut last = sample(g.host, d, &g.pids, t_alloc);
    for _ in 0..10 {
        std::thread::sleep(Duration::from_secs(2));
        last = sample(g.host, d, &g.pids, t_alloc);
        print_sample("after", &last);
        worst_rss = worst_rss.max(last.rss.iter().sum());
        worst_target = worst_target.max(last.total_target);
    }
    eprintln!(
        "e2e-hostd: alloc {ALLOC_MIB} MiB done in {alloc_secs:.1} s (sampled each ~1 s); \
         targets now {:?}; worst sum of targets {worst_target} MiB, worst VMM RSS sum \
         {worst_rss} MiB, budget {BUDGET_MIB} MiB",
        last.targets
    );
    let log = hostd_log(g.host, &g.state);
    eprintln!(
        "e2e-hostd: hostd log: {} lines; last ones:\n{}",
        log.lines().count(),
        last_lines(&log, 8)
    );
    let changes: Vec<String> = log
        .lines()
        .filter(|l| l.contains("target") && l.contains(" -> "))
        .map(str::to_string)
        .collect();
    eprintln!(
        "e2e-hostd: the daemon's last target changes:\n{}",
        changes[changes.len().saturating_sub(25)..].join("\n")
    );
    assert!(
        worst_target <= BUDGET_MIB,
        "targets exceeded the budget: {worst_target}"
    );
    assert!(
        worst_rss <= BUDGET_MIB + RSS_SLACK_MIB,
        "VMM RSS sum {worst_rss} MiB above budget {BUDGET_MIB} + {RSS_SLACK_MIB} MiB"
    );
    assert!(
        last.targets[0] >= ALLOC_MIB,
        "the allocating guest: {:?}",
        last.targets
    );
    verify_guests(g);
}

/// Every guest's console is clean since it became ready, its kernel counted no OOM kill, and its
/// checksummed data is intact.
fn verify_guests(g: &Guests) {
    for (c, sum) in g.consoles.iter().zip(&g.sums) {
        assert_console_clean(c);
        // The console shows OOM kills only at the kernel's log level; the counter always counts.
        let out = c.run_ok("grep '^oom_kill ' /proc/vmstat", CMD);
        assert!(
            out.lines().any(|l| l.trim() == "oom_kill 0"),
            "guest {}: the kernel OOM-killed: {out}",
            c.id
        );
        let out = c.run_ok("pattern verify", CMD);
        assert_eq!(
            &pattern_sum(&out, "GUEST-PATTERN-OK"),
            sum,
            "guest {}",
            c.id
        );
    }
}

/// Nothing on the guest's console since it became ready says its kernel OOM-killed or fell
/// over (the boot itself prints a warning with a backtrace: see README "Known limits").
fn assert_console_clean(c: &Console) {
    let text = c.text();
    let since_ready = text.find(e2e::READY).map_or(text.as_str(), |i| &text[i..]);
    for bad in [
        "Out of memory",
        "oom-kill",
        "Killed process",
        "Kernel panic",
        "BUG:",
        "Oops",
        "soft lockup",
    ] {
        if let Some(at) = since_ready.find(bad) {
            let from = since_ready[..at].rfind('\n').map_or(0, |n| n + 1);
            let context: String = since_ready[from..]
                .lines()
                .take(30)
                .collect::<Vec<_>>()
                .join("\n");
            panic!(
                "guest {}: {bad:?} on its console after it became ready:\n{context}",
                c.id
            );
        }
    }
}

/// SIGKILL of b's VMM: reported with its cause; a and c run on.
fn kill_one(d: &e2e::Vm, g: &Guests) {
    assert!(g
        .host
        .exec(
            &["kill", "-9", &g.pids[1].to_string()],
            Duration::from_secs(30)
        )
        .is_ok());
    let t_kill = Instant::now();
    let b = loop {
        let v = get(d, "/vms/b");
        if v["state"] == "exited" {
            break v;
        }
        assert!(
            t_kill.elapsed() < Duration::from_secs(30),
            "b not reported: {v}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    eprintln!(
        "e2e-hostd: SIGKILL of b's VMM reported after {:.2} s: {}",
        t_kill.elapsed().as_secs_f64(),
        b["exit"]["cause"]
    );
    assert_eq!(b["exit"]["signal"], 9, "{b}");
    assert_eq!(
        b["exit"]["cause"],
        "the VMM was killed by signal 9 (SIGKILL)"
    );
    for (i, id) in [(0, "a"), (2, "c")] {
        assert_eq!(get(d, &format!("/vms/{id}"))["state"], "running");
        assert!(alive(g.host, g.pids[i]));
    }
}

/// SIGTERM to the daemon, a new one on the same state directory: a and c are adopted (same
/// PIDs, running, managed again), b stays reported; the guests did not notice (uptime goes on,
/// data intact).
fn restart<'h>(d: e2e::Vm, state: &str, socket: &str, g: &Guests<'h>) -> e2e::Vm {
    let uptime = |c: &Console| -> f64 {
        let out = c.run_ok("cut -d' ' -f1 /proc/uptime", CMD);
        out.lines()
            .rev()
            .find_map(|l| l.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let before = [uptime(&g.consoles[0]), uptime(&g.consoles[2])];
    d.signal(libc::SIGTERM);
    let code = d.wait_exit(Duration::from_secs(30)).expect("hostd exits");
    assert_eq!(code, 0, "hostd on SIGTERM: {}", hostd_log(g.host, state));
    assert!(alive(g.host, g.pids[0]) && alive(g.host, g.pids[2]));
    let t_restart = Instant::now();
    let d = start_hostd(g.host, state, socket);
    for (i, id) in [(0, "a"), (2, "c")] {
        loop {
            let v = get(&d, &format!("/vms/{id}"));
            assert_eq!(v["pid"], g.pids[i], "{id} re-adopted, not restarted: {v}");
            if v["state"] == "running" && !v["last_decision"].is_null() {
                break;
            }
            assert!(t_restart.elapsed() < Duration::from_secs(30), "{v}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    let b = get(&d, "/vms/b");
    assert_eq!(b["state"], "exited");
    assert_eq!(
        b["exit"]["cause"],
        "the VMM was killed by signal 9 (SIGKILL)"
    );
    eprintln!(
        "e2e-hostd: restarted daemon re-adopted a and c in {:.1} s",
        t_restart.elapsed().as_secs_f64()
    );
    for (j, i) in [0usize, 2].into_iter().enumerate() {
        let now = uptime(&g.consoles[i]);
        assert!(
            now > before[j],
            "guest {} rebooted? uptime {now} < {}",
            IDS[i],
            before[j]
        );
        let out = g.consoles[i].run_ok("pattern verify", CMD);
        assert_eq!(pattern_sum(&out, "GUEST-PATTERN-OK"), g.sums[i]);
    }
    d
}
