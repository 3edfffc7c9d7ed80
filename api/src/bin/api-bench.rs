//! `api-bench`: API latency under concurrent clients, against any VMM's API socket: the real
//! `vmm`, or the headless VMM (the real handler and devices without KVM) that
//! `cargo run --release -p vmm --features testing --example headless -- --socket S` serves.
//!
//! ```text
//! api-bench run --socket /tmp/vmm.sock --setup --clients 50 --seconds 10
//! ```
//!
//! Each client keeps one connection and alternates `GET /balloon` and `PATCH /balloon`, timing
//! each request from send to the last byte of the answer.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::client::Client;
use clap::{Parser, Subcommand};
use hyper::Method;

#[derive(Parser, Debug)]
#[command(name = "api-bench", about = "API latency benchmark")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the load and report latency percentiles.
    Run {
        /// API socket of a running VMM (or of the headless VMM).
        #[arg(long)]
        socket: PathBuf,
        /// Configure and boot the VM first: boot source, 1024 MiB, a balloon, start.
        #[arg(long)]
        setup: bool,
        #[arg(long, default_value_t = 50)]
        clients: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Client runtime worker threads.
        #[arg(long, default_value_t = 1)]
        client_threads: usize,
        /// Upper balloon target the PATCH requests alternate with 0 (MiB).
        #[arg(long, default_value_t = 64)]
        patch_mib: u64,
        /// Path of the GET requests (e.g. /vm/memory; /nope measures the server alone, no VMM).
        #[arg(long, default_value = "/balloon")]
        get_path: String,
        /// Requests per second per client (paced, open loop); 0 sends the next request as soon
        /// as the answer arrives (closed loop: measures saturation, latency = clients/throughput).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// One more client, sending `PUT /actions {"action_type": "FlushMetrics"}` at this rate
        /// (req/s; 0 = none): a request with no effect that only the VMM thread answers, so its
        /// latency is how long the VMM thread's event loop takes to turn round a wake-up, the
        /// same path a device's queue notification takes.
        #[arg(long, default_value_t = 0.0)]
        probe_rate: f64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run {
            socket,
            setup,
            clients,
            seconds,
            client_threads,
            patch_mib,
            get_path,
            rate,
            probe_rate,
        } => run(RunArgs {
            get_path,
            rate,
            probe_rate,
            socket,
            setup,
            clients,
            seconds,
            client_threads,
            patch_mib,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("api-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

struct RunArgs {
    socket: PathBuf,
    setup: bool,
    clients: usize,
    seconds: f64,
    client_threads: usize,
    patch_mib: u64,
    get_path: String,
    rate: f64,
    probe_rate: f64,
}

/// Latencies of one kind of request, in nanoseconds.
#[derive(Default)]
struct Samples {
    ns: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

impl Samples {
    fn merge(&mut self, other: Samples) {
        self.ns.extend(other.ns);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    /// One request's outcome: timed when answered, and an error unless 2xx; a transport error
    /// also replaces the connection.
    fn record(
        &mut self,
        ns: u64,
        path: &str,
        r: Result<api::client::Reply, api::client::ClientError>,
        c: &mut Client,
        socket: &std::path::Path,
    ) {
        match r {
            Ok(reply) => {
                self.ns.push(ns);
                if !reply.status.is_success() {
                    self.errors += 1;
                    self.first_error.get_or_insert_with(|| {
                        format!(
                            "{path}: {} {}",
                            reply.status,
                            reply.fault_message().unwrap_or_default()
                        )
                    });
                }
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| e.to_string());
                *c = Client::new(socket);
            }
        }
    }

    fn percentile(sorted: &[u64], p: f64) -> u64 {
        if sorted.is_empty() {
            return 0;
        }
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    }
}

fn us(ns: u64) -> String {
    format!("{:.0}", ns as f64 / 1000.0)
}

fn run(args: RunArgs) -> Result<(), String> {
    if args.clients == 0 || !(args.seconds > 0.0 && args.seconds.is_finite()) {
        return Err("--clients and --seconds must be positive".into());
    }
    if !(args.rate >= 0.0 && args.rate.is_finite()) {
        return Err("--rate must be a non-negative number".into());
    }
    if !(args.probe_rate >= 0.0 && args.probe_rate.is_finite()) {
        return Err("--probe-rate must be a non-negative number".into());
    }
    let period = (args.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / args.rate));
    let probe_period =
        (args.probe_rate > 0.0).then(|| Duration::from_secs_f64(1.0 / args.probe_rate));
    let socket = args.socket;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let duration = Duration::from_secs_f64(args.seconds);
    let (get, patch, probe, elapsed) = rt.block_on(async {
        if args.setup {
            setup(&socket).await?;
        }
        // Check the target answers before loading it.
        let mut probe = Client::new(&socket);
        probe
            .call(Method::GET, "/balloon", None)
            .await
            .map_err(|e| format!("GET /balloon before the run: {e}"))?;

        let start = Arc::new(tokio::sync::Barrier::new(
            args.clients + 1 + usize::from(probe_period.is_some()),
        ));
        let probe_task = probe_period
            .map(|p| tokio::spawn(probe_loop(socket.clone(), start.clone(), duration, p)));
        let mut tasks = Vec::new();
        for id in 0..args.clients {
            tasks.push(tokio::spawn(client_loop(
                ClientLoad {
                    socket: socket.clone(),
                    get_path: args.get_path.clone(),
                    patch_mib: args.patch_mib,
                    period,
                    duration,
                    id,
                    clients: args.clients,
                },
                start.clone(),
            )));
        }
        start.wait().await;
        let t0 = Instant::now();
        let mut get = Samples::default();
        let mut patch = Samples::default();
        for t in tasks {
            let (g, p) = t.await.map_err(|e| e.to_string())?;
            get.merge(g);
            patch.merge(p);
        }
        let probe = match probe_task {
            Some(t) => Some(t.await.map_err(|e| e.to_string())?),
            None => None,
        };
        Ok::<_, String>((get, patch, probe, t0.elapsed()))
    })?;

    let pacing = match period {
        Some(_) => format!("{} req/s per client", args.rate),
        None => "closed loop".to_owned(),
    };
    println!(
        "{} clients ({pacing}), {:.1} s, socket {}",
        args.clients,
        elapsed.as_secs_f64(),
        socket.display(),
    );
    let get_name = format!("GET {}", args.get_path);
    let mut rows = vec![(get_name.as_str(), get), ("PATCH /balloon", patch)];
    if let Some(p) = probe {
        rows.push(("probe FlushMetrics", p));
    }
    print_table(rows, elapsed);
    Ok(())
}

/// One row per kind of request: count, errors, rate and latency percentiles.
fn print_table(rows: Vec<(&str, Samples)>, elapsed: Duration) {
    println!(
        "{:<16} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "request", "count", "errors", "req/s", "p50 us", "p90 us", "p99 us", "max us"
    );
    for (name, mut s) in rows {
        s.ns.sort_unstable();
        println!(
            "{:<16} {:>9} {:>7} {:>9.0} {:>9} {:>9} {:>9} {:>9}",
            name,
            s.ns.len(),
            s.errors,
            s.ns.len() as f64 / elapsed.as_secs_f64(),
            us(Samples::percentile(&s.ns, 50.0)),
            us(Samples::percentile(&s.ns, 90.0)),
            us(Samples::percentile(&s.ns, 99.0)),
            us(s.ns.last().copied().unwrap_or(0)),
        );
        if let Some(e) = s.first_error {
            println!("  first error: {e}");
        }
    }
}

/// The probe: `PUT /actions FlushMetrics` every `period`, which only the VMM thread answers.
async fn probe_loop(
    socket: std::path::PathBuf,
    start: Arc<tokio::sync::Barrier>,
    duration: Duration,
    period: Duration,
) -> Samples {
    let mut c = Client::new(&socket);
    let mut samples = Samples::default();
    start.wait().await;
    let t0 = Instant::now();
    let mut next = tokio::time::Instant::now();
    while t0.elapsed() < duration {
        tokio::time::sleep_until(next).await;
        next += period;
        let body = br#"{"action_type": "FlushMetrics"}"#.to_vec();
        let t = Instant::now();
        let r = c.raw(Method::PUT, "/actions", Some(body)).await;
        samples.record(
            t.elapsed().as_nanos() as u64,
            "/actions",
            r,
            &mut c,
            &socket,
        );
    }
    samples
}

/// What one load client does.
struct ClientLoad {
    socket: std::path::PathBuf,
    get_path: String,
    patch_mib: u64,
    /// Paced: one request per period; closed loop: `None`.
    period: Option<Duration>,
    duration: Duration,
    id: usize,
    clients: usize,
}

/// One client: alternates a GET and a PATCH /balloon (between `patch_mib` and 0) for the
/// duration; returns the GET and PATCH samples.
async fn client_loop(load: ClientLoad, start: Arc<tokio::sync::Barrier>) -> (Samples, Samples) {
    let mut c = Client::new(&load.socket);
    let mut get = Samples::default();
    let mut patch = Samples::default();
    start.wait().await;
    let t0 = Instant::now();
    let mut i = load.id as u64;
    // Paced clients start spread over one period, not all at once.
    let mut next = load
        .period
        .map(|p| tokio::time::Instant::now() + p.mul_f64(load.id as f64 / load.clients as f64));
    while t0.elapsed() < load.duration {
        if let (Some(n), Some(p)) = (next.as_mut(), load.period) {
            tokio::time::sleep_until(*n).await;
            *n += p;
        }
        let is_get = i & 1 == 0;
        let (method, path, body) = if is_get {
            (Method::GET, load.get_path.as_str(), None)
        } else {
            let mib = if (i >> 1) & 1 == 0 { load.patch_mib } else { 0 };
            let body = format!("{{\"amount_mib\": {mib}}}").into_bytes();
            (Method::PATCH, "/balloon", Some(body))
        };
        let t = Instant::now();
        let r = c.raw(method, path, body).await;
        let ns = t.elapsed().as_nanos() as u64;
        let s = if is_get { &mut get } else { &mut patch };
        s.record(ns, path, r, &mut c, &load.socket);
        i += 1;
    }
    (get, patch)
}

/// Configures and boots a VM with a balloon; steps the VM refuses as already done (409) are fine.
async fn setup(socket: &std::path::Path) -> Result<(), String> {
    let mut c = Client::new(socket);
    for (method, path, body) in [
        (
            Method::PUT,
            "/boot-source",
            r#"{"kernel_image_path": "/bench/vmlinuz"}"#,
        ),
        (
            Method::PUT,
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 1024}"#,
        ),
        (
            Method::PUT,
            "/balloon",
            r#"{"amount_mib": 0, "deflate_on_oom": true}"#,
        ),
        (
            Method::PUT,
            "/actions",
            r#"{"action_type": "InstanceStart"}"#,
        ),
    ] {
        let reply = c
            .raw(method.clone(), path, Some(body.as_bytes().to_vec()))
            .await
            .map_err(|e| e.to_string())?;
        if !reply.status.is_success() && reply.status.as_u16() != 409 {
            return Err(format!(
                "setup {method} {path}: {} {}",
                reply.status,
                reply.fault_message().unwrap_or_default()
            ));
        }
    }
    Ok(())
}
