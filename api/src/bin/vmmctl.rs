//! `vmmctl`: command-line client of the VMM's API socket.
//!
//! Exit status: 0 success, 1 the API refused or could not be reached, 2 usage error, 3 `--wait`
//! timed out before the target was reached.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use api::client::{Client, ClientError};
use api::{
    ActionRequest, ActionType, BalloonState, BalloonStats, BalloonUpdate, HotplugMemoryState,
    HotplugMemoryUpdate, InstanceInfo, MemoryMap, ResizeRequest, ResizeState, ResizeStatus,
};
use clap::{Parser, Subcommand};
use hyper::Method;

/// The host daemon's commands (`vms`, `host`).
#[path = "vmmctl/host.rs"]
mod host;

#[derive(Parser, Debug)]
#[command(
    name = "vmmctl",
    version,
    about = "Drive a running VMM through its API socket"
)]
struct Cli {
    /// The VMM's API socket.
    #[arg(long, short = 's', env = "VMM_API_SOCKET")]
    socket: PathBuf,
    /// Print the API's JSON instead of a summary.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Debug, Clone, Copy)]
struct WaitArgs {
    /// Wait until the guest reaches the target, showing progress.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this many seconds (exit status 3).
    #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
    timeout: f64,
    /// How often to poll while waiting, in milliseconds.
    #[arg(long, default_value_t = 100, value_name = "MS")]
    interval_ms: u64,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Instance id, state and VMM version (GET /).
    Info,
    /// Boot the configured VM (PUT /actions InstanceStart).
    Start,
    /// Balloon: shrink the guest by taking memory back.
    #[command(subcommand)]
    Balloon(BalloonCmd),
    /// Hot-plug memory (virtio-mem).
    #[command(subcommand)]
    Hotplug(HotplugCmd),
    /// Make the guest MIB in size (PUT /vm/resize); without MIB, show resize progress.
    Resize {
        mib: Option<u64>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// The guest memory map: regions, totals, host RSS, offline runs, counters.
    Memory {
        /// Only runs of this reason (ballooned, unplugged, discarded).
        #[arg(long)]
        reason: Option<String>,
        /// First PFN of the runs to list.
        #[arg(long, default_value_t = 0)]
        pfn_start: u64,
        /// End PFN (exclusive) of the runs to list.
        #[arg(long)]
        pfn_end: Option<u64>,
        /// Most runs per reason.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Prometheus metrics (GET /metrics).
    Metrics,
    /// The host daemon's VMs: list, get, create, delete, memory (`--socket` names hostd's socket).
    #[command(subcommand)]
    Vms(host::VmsCmd),
    /// The host daemon's memory: budget, guarantees, targets, policy (`--socket`: hostd's socket).
    #[command(subcommand)]
    Host(host::HostCmd),
    /// Any request: `vmmctl raw PUT /machine-config '{"vcpu_count": 2, "mem_size_mib": 1024}'`.
    Raw {
        method: String,
        path: String,
        body: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum BalloonCmd {
    /// Set the balloon target to MIB (PATCH /balloon).
    Set {
        mib: u64,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Show the balloon (GET /balloon).
    Get,
    /// Show the guest's memory statistics (GET /balloon/statistics).
    Stats,
}

#[derive(Subcommand, Debug)]
enum HotplugCmd {
    /// Ask the guest to have MIB of hot-add memory plugged (PATCH /hotplug/memory).
    Set {
        mib: u64,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Show the virtio-mem sizes (GET /hotplug/memory).
    Get,
}

#[derive(Debug)]
enum Failure {
    Api(ClientError),
    Timeout(String),
    Usage(String),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Api(e)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vmmctl: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Api(e)) => {
            eprintln!("vmmctl: {e}");
            ExitCode::from(1)
        }
        Err(Failure::Usage(msg)) => {
            eprintln!("vmmctl: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Timeout(msg)) => {
            eprintln!("vmmctl: {msg}");
            ExitCode::from(3)
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("<unprintable: {e}>"))
    );
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let mut c = Client::new(&cli.socket);
    let json = cli.json;
    match cli.cmd {
        Cmd::Info => {
            let info: InstanceInfo = c.get("/").await?;
            if json {
                print_json(&info);
            } else {
                let state = serde_json::to_value(info.state).unwrap_or_default();
                println!("id:       {}", info.id);
                println!("state:    {}", state.as_str().unwrap_or("?"));
                println!("vmm:      {} {}", info.app_name, info.vmm_version);
            }
        }
        Cmd::Start => {
            let body = ActionRequest {
                action_type: ActionType::InstanceStart,
            };
            c.send(Method::PUT, "/actions", &body).await?;
            println!("started");
        }
        Cmd::Balloon(cmd) => balloon(&mut c, cmd, json).await?,
        Cmd::Hotplug(cmd) => hotplug(&mut c, cmd, json).await?,
        Cmd::Resize { mib: None, .. } => {
            let r: ResizeStatus = c.get("/vm/resize").await?;
            if json {
                print_json(&r);
            } else {
                print_resize(&r);
            }
        }
        Cmd::Resize {
            mib: Some(mib),
            wait,
        } => {
            c.send(
                Method::PUT,
                "/vm/resize",
                &ResizeRequest { desired_mib: mib },
            )
            .await?;
            if wait.wait {
                wait_resize(&mut c, mib, wait).await?;
            } else {
                println!("resize to {mib} MiB started");
            }
        }
        Cmd::Memory {
            reason,
            pfn_start,
            pfn_end,
            limit,
        } => {
            let mut path = format!("/vm/memory?pfn_start={pfn_start}&limit={limit}");
            if let Some(r) = reason {
                path.push_str(&format!("&reason={r}"));
            }
            if let Some(e) = pfn_end {
                path.push_str(&format!("&pfn_end={e}"));
            }
            let m: MemoryMap = c.get(&path).await?;
            if json {
                print_json(&m);
            } else {
                print!("{}", memory_table(&m));
            }
        }
        Cmd::Metrics => print!("{}", c.get_text("/metrics").await?),
        Cmd::Vms(cmd) => host::vms(&mut c, cmd, json).await?,
        Cmd::Host(cmd) => host::host(&mut c, cmd, json).await?,
        Cmd::Raw { method, path, body } => {
            let method = Method::from_bytes(method.to_uppercase().as_bytes())
                .map_err(|_| Failure::Usage(format!("not an HTTP method: {method}")))?;
            let reply = c.call(method, &path, body.map(String::into_bytes)).await?;
            let text = String::from_utf8_lossy(&reply.body);
            match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(v) => print_json(&v),
                Err(_) if text.is_empty() => println!("{}", reply.status),
                Err(_) => print!("{text}"),
            }
        }
    }
    Ok(())
}

/// `vmmctl balloon ...`: set the target (and wait for it), or show the device or its statistics.
async fn balloon(c: &mut Client, cmd: BalloonCmd, json: bool) -> Result<(), Failure> {
    match cmd {
        BalloonCmd::Set { mib, wait } => {
            c.send(
                Method::PATCH,
                "/balloon",
                &BalloonUpdate { amount_mib: mib },
            )
            .await?;
            if wait.wait {
                wait_balloon(c, mib, wait).await?;
            } else {
                println!("balloon target set to {mib} MiB");
            }
        }
        BalloonCmd::Get => {
            let b: BalloonState = c.get("/balloon").await?;
            if json {
                print_json(&b);
            } else {
                println!(
                    "target:               {} MiB ({} pages)",
                    b.amount_mib, b.target_pages
                );
                println!(
                    "actual:               {} MiB ({} pages)",
                    b.actual_mib, b.actual_pages
                );
                println!("deflate_on_oom:       {}", b.deflate_on_oom);
                println!("stats interval:       {} s", b.stats_polling_interval_s);
                println!("free page reporting:  {}", b.free_page_reporting);
            }
        }
        BalloonCmd::Stats => {
            let s: BalloonStats = c.get("/balloon/statistics").await?;
            if json {
                print_json(&s);
            } else {
                print_stats(&s);
            }
        }
    }
    Ok(())
}

/// `vmmctl hotplug ...`: set the requested size (and wait for it), or show the device.
async fn hotplug(c: &mut Client, cmd: HotplugCmd, json: bool) -> Result<(), Failure> {
    match cmd {
        HotplugCmd::Set { mib, wait } => {
            let body = HotplugMemoryUpdate {
                requested_size_mib: mib,
            };
            c.send(Method::PATCH, "/hotplug/memory", &body).await?;
            if wait.wait {
                wait_hotplug(c, mib, wait).await?;
            } else {
                println!("hot-plug request set to {mib} MiB");
            }
        }
        HotplugCmd::Get => {
            let h: HotplugMemoryState = c.get("/hotplug/memory").await?;
            if json {
                print_json(&h);
            } else {
                println!(
                    "region:     {} MiB in {} MiB blocks",
                    h.total_size_mib, h.block_size_mib
                );
                println!("requested:  {} MiB", h.requested_size_mib);
                println!("plugged:    {} MiB", h.plugged_size_mib);
                println!("usable:     {} MiB", h.usable_region_size_mib);
            }
        }
    }
    Ok(())
}

fn print_stats(s: &BalloonStats) {
    println!(
        "balloon target:      {} MiB ({} pages)",
        s.target_mib, s.target_pages
    );
    println!(
        "balloon actual:      {} MiB ({} pages)",
        s.actual_mib, s.actual_pages
    );
    let rows: [(&str, Option<u64>, bool); 18] = [
        ("swap_in", s.swap_in, true),
        ("swap_out", s.swap_out, true),
        ("major_faults", s.major_faults, false),
        ("minor_faults", s.minor_faults, false),
        ("free_memory", s.free_memory, true),
        ("total_memory", s.total_memory, true),
        ("available_memory", s.available_memory, true),
        ("disk_caches", s.disk_caches, true),
        ("hugetlb_allocations", s.hugetlb_allocations, false),
        ("hugetlb_failures", s.hugetlb_failures, false),
        ("oom_kill", s.oom_kill, false),
        ("alloc_stall", s.alloc_stall, false),
        ("async_scan", s.async_scan, false),
        ("direct_scan", s.direct_scan, false),
        ("async_reclaim", s.async_reclaim, false),
        ("direct_reclaim", s.direct_reclaim, false),
        ("age_ms", s.age_ms, false),
        ("actual_pages_at_report", s.actual_pages_at_report, false),
    ];
    for (name, value, bytes) in rows {
        match value {
            Some(v) if bytes => println!("{name:<20} {}", human_bytes(v)),
            Some(v) => println!("{name:<20} {v}"),
            None => println!("{name:<20} -"),
        }
    }
}

fn print_resize(r: &ResizeStatus) {
    let v = serde_json::to_value(r).unwrap_or_default();
    println!("desired:    {} MiB", r.desired_mib);
    println!("current:    {} MiB", r.current_mib);
    println!("mechanism:  {}", v["mechanism"].as_str().unwrap_or("?"));
    println!("state:      {}", v["state"].as_str().unwrap_or("?"));
}

/// `1.5 GiB`, `512 MiB`, `4 KiB`, `17 B`.
fn human_bytes(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if n >= size {
            let v = n as f64 / size as f64;
            return if n & (size - 1) == 0 {
                format!("{} {unit}", n / size)
            } else {
                format!("{v:.1} {unit}")
            };
        }
    }
    format!("{n} B")
}

fn memory_table(m: &MemoryMap) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let page = m.page_size;
    let _ = writeln!(
        out,
        "{:<9} {:<16} {:>9} {:>9} {:>9}",
        "REGION", "GUEST ADDRESS", "SIZE", "OFFLINE", "RESIDENT"
    );
    for r in &m.regions {
        let kind = serde_json::to_value(r.kind).unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<9} {:<16} {:>9} {:>9} {:>9}",
            kind.as_str().unwrap_or("?"),
            format!("{:#014x}", r.guest_phys_addr),
            human_bytes(r.size_bytes),
            human_bytes(r.offline_pages * page),
            human_bytes(r.resident_bytes),
        );
    }
    let t = &m.totals;
    let _ = writeln!(out);
    let _ = writeln!(out, "TOTALS");
    for (name, v) in [
        ("guest physical", t.guest_phys_bytes),
        ("online", t.online_bytes),
        ("offline", t.offline_bytes),
        ("ballooned", t.ballooned_bytes),
        ("unplugged", t.unplugged_bytes),
        ("discarded", t.discarded_bytes),
        ("host guest RSS", m.host.guest_rss_bytes),
    ] {
        let _ = writeln!(out, "  {name:<14} {:>11}", human_bytes(v));
    }
    if let Some(rss) = m.host.process_rss_bytes {
        let _ = writeln!(out, "  {:<14} {:>11}", "host VMM RSS", human_bytes(rss));
    }
    for o in &m.offline {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "OFFLINE {:<10} {} pages ({}) in range",
            o.reason.as_str(),
            o.pages_in_range,
            human_bytes(o.pages_in_range * page)
        );
        if !o.runs.is_empty() {
            let _ = writeln!(
                out,
                "  {:<14} {:<14} {:>10} {:>11}",
                "START PFN", "END PFN", "PAGES", "SIZE"
            );
        }
        for r in &o.runs {
            let _ = writeln!(
                out,
                "  {:<14} {:<14} {:>10} {:>11}",
                format!("{:#x}", r.start_pfn),
                format!("{:#x}", r.start_pfn + r.pages),
                r.pages,
                human_bytes(r.pages * page)
            );
        }
        if let Some(next) = o.next_pfn {
            let _ = writeln!(
                out,
                "  ... more: vmmctl memory --reason {} --pfn-start {next}",
                o.reason.as_str()
            );
        }
    }
    if !m.counters.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "COUNTERS");
        for (k, v) in &m.counters {
            let _ = writeln!(out, "  {k:<32} {v}");
        }
    }
    out
}

/// Shows progress toward a target: a bar redrawn in place on a terminal, a line per change
/// otherwise (logs, CI).
struct Progress {
    what: &'static str,
    tty: bool,
    last: Option<(u64, u64)>,
}

impl Progress {
    fn new(what: &'static str) -> Self {
        Self {
            what,
            tty: std::io::stderr().is_terminal(),
            last: None,
        }
    }

    /// `done` of `total` steps toward the target; `now`/`target` in MiB for the label.
    fn show(&mut self, from: u64, now: u64, target: u64) {
        if self.last == Some((now, target)) {
            return;
        }
        self.last = Some((now, target));
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(progress_line(self.what, self.tty, from, now, target).as_bytes());
        let _ = err.flush();
    }

    fn finish(&self) {
        if self.tty && self.last.is_some() {
            eprintln!();
        }
    }
}

/// How far `now` has come from `from` toward `target`, in percent. Moving away from the target
/// (a guest deflating on OOM) lowers it.
fn percent_done(from: u64, now: u64, target: u64) -> u64 {
    let total = from.abs_diff(target);
    let left = now.abs_diff(target).min(total);
    ((total - left) * 100).checked_div(total).unwrap_or(100)
}

/// One progress update: a bar redrawn in place on a terminal, a line otherwise.
fn progress_line(what: &str, tty: bool, from: u64, now: u64, target: u64) -> String {
    let pct = percent_done(from, now, target);
    if tty {
        const WIDTH: usize = 30;
        let filled = pct as usize * WIDTH / 100;
        let bar = format!("{}{}", "#".repeat(filled), "-".repeat(WIDTH - filled));
        format!("\r{what}: [{bar}] {now}/{target} MiB {pct:>3}%\x1b[K")
    } else {
        format!("{what}: {now} MiB (target {target} MiB, {pct}%)\n")
    }
}

/// The deadline and pace of a `--wait`.
struct Waiter {
    t0: Instant,
    deadline: Instant,
    interval: Duration,
    timeout_s: f64,
}

impl Waiter {
    fn new(wait: WaitArgs) -> Result<Self, Failure> {
        if !(wait.timeout.is_finite() && (0.0..=1e9).contains(&wait.timeout)) {
            return Err(Failure::Usage(format!(
                "--timeout {} is not a number of seconds",
                wait.timeout
            )));
        }
        let t0 = Instant::now();
        Ok(Self {
            t0,
            deadline: t0 + Duration::from_secs_f64(wait.timeout),
            interval: Duration::from_millis(wait.interval_ms.max(1)),
            timeout_s: wait.timeout,
        })
    }

    /// Not there yet: fail if the time is up (saying where it stands), else sleep a little.
    async fn not_yet(&self, state: impl FnOnce() -> String) -> Result<(), Failure> {
        if Instant::now() >= self.deadline {
            return Err(Failure::Timeout(format!(
                "timed out after {:.1} s: {}",
                self.timeout_s,
                state()
            )));
        }
        tokio::time::sleep(self.interval).await;
        Ok(())
    }
}

async fn wait_balloon(c: &mut Client, mib: u64, wait: WaitArgs) -> Result<(), Failure> {
    let waiter = Waiter::new(wait)?;
    let mut progress = Progress::new("balloon");
    let result: Result<(), Failure> = async {
        let mut from = None;
        loop {
            let b: BalloonState = c.get("/balloon").await?;
            let from = *from.get_or_insert(b.actual_mib);
            progress.show(from, b.actual_mib, b.amount_mib);
            if b.actual_pages == b.target_pages {
                return Ok(());
            }
            waiter
                .not_yet(|| {
                    format!(
                        "the balloon is at {} MiB ({} pages), target {} MiB ({} pages)",
                        b.actual_mib, b.actual_pages, b.amount_mib, b.target_pages
                    )
                })
                .await?;
        }
    }
    .await;
    progress.finish();
    result?;
    println!(
        "balloon reached {mib} MiB in {:.1} s",
        waiter.t0.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn wait_hotplug(c: &mut Client, mib: u64, wait: WaitArgs) -> Result<(), Failure> {
    let waiter = Waiter::new(wait)?;
    let mut progress = Progress::new("hotplug");
    let result: Result<(), Failure> = async {
        let mut from = None;
        loop {
            let h: HotplugMemoryState = c.get("/hotplug/memory").await?;
            let from = *from.get_or_insert(h.plugged_size_mib);
            progress.show(from, h.plugged_size_mib, h.requested_size_mib);
            if h.plugged_size_mib == h.requested_size_mib {
                return Ok(());
            }
            waiter
                .not_yet(|| {
                    format!(
                        "{} MiB plugged, {} MiB requested",
                        h.plugged_size_mib, h.requested_size_mib
                    )
                })
                .await?;
        }
    }
    .await;
    progress.finish();
    result?;
    println!(
        "hot-plugged memory reached {mib} MiB in {:.1} s",
        waiter.t0.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn wait_resize(c: &mut Client, mib: u64, wait: WaitArgs) -> Result<(), Failure> {
    let waiter = Waiter::new(wait)?;
    let mut progress = Progress::new("resize");
    let result: Result<(), Failure> = async {
        let mut from = None;
        loop {
            let r: ResizeStatus = c.get("/vm/resize").await?;
            let from = *from.get_or_insert(r.current_mib);
            progress.show(from, r.current_mib, r.desired_mib);
            if r.state == ResizeState::Reached {
                return Ok(());
            }
            waiter
                .not_yet(|| {
                    format!(
                        "the guest has {} MiB, target {} MiB",
                        r.current_mib, r.desired_mib
                    )
                })
                .await?;
        }
    }
    .await;
    progress.finish();
    result?;
    println!(
        "guest reached {mib} MiB in {:.1} s",
        waiter.t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_counts_toward_the_target_either_way() {
        assert_eq!(percent_done(0, 0, 256), 0);
        assert_eq!(percent_done(0, 64, 256), 25);
        assert_eq!(percent_done(0, 256, 256), 100);
        // Shrinking the balloon: 512 -> 0.
        assert_eq!(percent_done(512, 128, 0), 75);
        // Moving away from the target does not count as progress.
        assert_eq!(percent_done(100, 50, 200), 0);
        assert_eq!(percent_done(7, 7, 7), 100);
    }

    #[test]
    fn terminal_bar_and_plain_line() {
        assert_eq!(
            progress_line("balloon", true, 0, 128, 256),
            "\rballoon: [###############---------------] 128/256 MiB  50%\x1b[K"
        );
        assert_eq!(
            progress_line("balloon", false, 0, 128, 256),
            "balloon: 128 MiB (target 256 MiB, 50%)\n"
        );
        assert!(progress_line("resize", true, 2048, 768, 768)
            .contains("[##############################] 768/768 MiB 100%"));
    }

    #[test]
    fn sizes_read_like_free_does() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(4096), "4 KiB");
        assert_eq!(human_bytes(256 << 20), "256 MiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }
}
