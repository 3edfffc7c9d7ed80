//! `hostd`: the host daemon. See `hostd --help` and hostd/README.md.
//!
//! Start-up: take the state directory (one daemon per directory), settle the host settings
//! (flags over `host.json` over defaults), find the VMs of an earlier run again, serve the API,
//! run the supervision and control loops, start the VMs of `--vms FILE` that are missing, and
//! on SIGTERM or SIGINT stop serving and exit 0, leaving every VM running for the next daemon.
//! Exit status: 0 stopped by a signal, 1 error (with a message), 2 usage.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use hostd::daemon::{Daemon, DaemonConfig};
use hostd::host::{default_reserve_mib, HostUpdate, DEFAULT_TICK_MS};
use hostd::monitor::{self, MONITOR_ARG};
use hostd::procfs::HostReading;
use hostd::registry::HostSettings;
use hostd::statedir::{read_json, StateDir};
use hostd::{control, routes, server, vms_file};
use tokio::sync::watch;

/// How often supervision looks for VMMs that ended and stops to escalate.
const SUPERVISE_EVERY: Duration = Duration::from_millis(250);

#[derive(Parser, Debug)]
#[command(
    name = "hostd",
    version,
    about = "The host daemon: runs VMs (one vmm process each) and moves memory between them inside a budget"
)]
struct Cli {
    /// State directory: VM records, consoles, sockets. One daemon per directory.
    #[arg(
        long,
        value_name = "DIR",
        env = "HOSTD_STATE_DIR",
        default_value = "/var/lib/hostd"
    )]
    state_dir: PathBuf,
    /// The daemon's API socket [default: STATE_DIR/hostd.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The vmm binary [default: `vmm` beside this binary].
    #[arg(long, value_name = "PATH")]
    vmm: Option<PathBuf>,
    /// What the VMs' memory targets may add up to, MiB [default: saved by PUT /host/memory,
    /// else the host's MemTotal minus --reserve-mib].
    #[arg(long, value_name = "MIB")]
    budget_mib: Option<u64>,
    /// Memory kept for the host itself when the budget is not given, MiB [default: 10% of
    /// MemTotal, at least 512].
    #[arg(long, value_name = "MIB")]
    reserve_mib: Option<u64>,
    /// Control loop period, ms (100..=60000) [default: saved, else 1000].
    #[arg(long, value_name = "MS")]
    tick_ms: Option<u64>,
    /// DELETE: seconds a VMM has after SIGTERM before SIGKILL.
    #[arg(long, value_name = "S", default_value_t = 10)]
    stop_timeout_s: u64,
    /// The most a tick waits for one VMM's answers, ms.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    request_timeout_ms: u64,
    /// JSON file `{"vms": [...]}` (each VM as in POST /vms) to start at start-up; VMs the state
    /// directory already has are left as they are.
    #[arg(long, value_name = "FILE")]
    vms: Option<PathBuf>,
    /// Log level on stderr: error, warn, info, debug or trace [default: $HOSTD_LOG, else info].
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<log::LevelFilter>,
    /// Run every VMM as this user: started as root, it opens /dev/kvm, its kernel, initramfs,
    /// console and API socket, then drops to this uid with no capabilities (`vmm --uid`).
    /// Needs --vmm-gid.
    #[arg(long, value_name = "UID", requires = "vmm_gid")]
    vmm_uid: Option<u32>,
    /// The group for --vmm-uid (`vmm --gid`).
    #[arg(long, value_name = "GID", requires = "vmm_uid")]
    vmm_gid: Option<u32>,
    /// With --vmm-uid: every VMM also moves into a mount namespace of its own with an empty,
    /// read-only root before it drops root, so it can open no host file (`vmm --jail`).
    #[arg(long, requires = "vmm_uid")]
    vmm_jail: bool,
    /// The VMMs' log level (their stderr goes to STATE_DIR/vms/ID/vmm.log).
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    vmm_log_level: log::LevelFilter,
}

fn main() -> ExitCode {
    if std::env::args_os().nth(1).as_deref() == Some(OsStr::new(MONITOR_ARG)) {
        let code = monitor::run(std::env::args_os().skip(2).collect());
        return ExitCode::from(code as u8);
    }
    let cli = Cli::parse();
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::new().filter_or("HOSTD_LOG", "info"));
    if let Some(l) = cli.log_level {
        logger.filter_level(l);
    }
    logger.format_timestamp_millis().init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hostd: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `vmm` beside this binary, else the name alone (looked up in PATH by the monitor).
fn default_vmm(exe: &Path) -> PathBuf {
    let beside = exe.with_file_name("vmm");
    if beside.is_file() {
        beside
    } else {
        PathBuf::from("vmm")
    }
}

/// Flags over `host.json` over defaults.
fn host_settings(cli: &Cli, state: &StateDir) -> Result<HostSettings, String> {
    let saved: Option<HostSettings> = match read_json(&state.host_settings()) {
        Ok(s) => Some(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("cannot read the saved host settings: {e}")),
    };
    let total = HostReading::read()
        .mem_total_mib
        .ok_or("cannot read MemTotal from /proc/meminfo")?;
    let base = saved.unwrap_or(HostSettings {
        budget_mib: total.saturating_sub(cli.reserve_mib.unwrap_or(default_reserve_mib(total))),
        tick_ms: DEFAULT_TICK_MS,
        params: policy::Params::default(),
    });
    let budget_mib = match (cli.budget_mib, cli.reserve_mib) {
        (Some(b), _) => Some(b),
        (None, Some(r)) => Some(total.saturating_sub(r)),
        (None, None) => None,
    };
    let flags = HostUpdate {
        budget_mib,
        tick_ms: cli.tick_ms,
        params: None,
    };
    // The guarantees are checked against the VMs once they are found again (a warning then).
    flags.apply(&base, 0).map_err(|e| match e {
        hostd::host::UpdateError::Invalid(m) | hostd::host::UpdateError::Conflict(m) => {
            format!("--{}", m.replacen('_', "-", 1))
        }
    })
}

fn run(cli: Cli) -> Result<(), String> {
    if let (Some(uid), Some(gid)) = (cli.vmm_uid, cli.vmm_gid) {
        if uid == 0 || gid == 0 {
            return Err("--vmm-uid/--vmm-gid: 0 is root; name an unprivileged user".into());
        }
        monitor::set_vmm_user(monitor::VmmUser {
            uid,
            gid,
            jail: cli.vmm_jail,
        });
    }
    let state = StateDir::open(&cli.state_dir).map_err(|e| {
        format!(
            "cannot use the state directory {}: {e}",
            cli.state_dir.display()
        )
    })?;
    let _lock = state.lock().map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let vmm = cli.vmm.clone().unwrap_or_else(|| default_vmm(&exe));
    if vmm.components().count() > 1 && !vmm.is_file() {
        return Err(format!("--vmm {}: no such file", vmm.display()));
    }
    let settings = host_settings(&cli, &state)?;
    let file = cli.vms.as_deref().map(vms_file::load).transpose()?;
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(|| state.root().join("hostd.sock"));
    let config = DaemonConfig {
        state,
        socket: socket.clone(),
        vmm,
        exe,
        stop_timeout: Duration::from_secs(cli.stop_timeout_s),
        request_timeout: Duration::from_millis(cli.request_timeout_ms.max(1)),
        start_timeout: Duration::from_secs(10),
        vmm_log_level: cli.vmm_log_level.to_string().to_lowercase(),
    };
    let d = Arc::new(Daemon::new(config, settings));
    d.save_host_settings(settings).map_err(|f| f.message)?;
    d.recover()
        .map_err(|e| format!("cannot read the VMs of the state directory: {e}"))?;
    let guaranteed = d.registry().guaranteed_mib(None);
    if guaranteed > settings.budget_mib {
        log::warn!(
            "the budget ({} MiB) is below the VMs' minimums added up ({guaranteed} MiB): the \
             policy keeps every VM at its minimum and reports the excess",
            settings.budget_mib
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(serve(d, socket, file))
}

async fn serve(
    d: Arc<Daemon>,
    socket: PathBuf,
    file: Option<vms_file::VmsFile>,
) -> Result<(), String> {
    let listener = server::bind(&socket)
        .map_err(|e| format!("cannot serve the API on {}: {e}", socket.display()))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let app = routes::router(d.clone());
    let server = tokio::spawn(server::serve(listener, socket.clone(), app, stop_rx));
    let sup = d.clone();
    tokio::spawn(async move {
        loop {
            sup.supervise();
            tokio::time::sleep(SUPERVISE_EVERY).await;
        }
    });
    tokio::spawn(control::run(d.clone()));
    let (n, budget) = {
        let reg = d.registry();
        (reg.vms.len(), reg.host.budget_mib)
    };
    log::info!(
        "hostd: API on {}; state in {}; budget {budget} MiB; {n} VMs found",
        socket.display(),
        d.config.state.root().display()
    );
    if let Some(file) = file {
        vms_file::start(&d, file).await;
    }
    let signal = wait_for_signal().await?;
    let _ = stop_tx.send(true);
    let _ = server.await;
    let running = d.registry().vms.values().filter(|v| v.is_live()).count();
    log::info!("hostd: {signal}; exiting, {running} VMs keep running");
    Ok(())
}

async fn wait_for_signal() -> Result<&'static str, String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
