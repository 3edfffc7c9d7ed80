//! `vmm`: boot a Linux guest on KVM. See `vmm --help`.
//!
//! Start-up: parse and check flags (and `--config`), start the signal thread and the REST API if
//! asked, wait for the API to configure and start the VM when no kernel was given on the command
//! line, then build the VM, start it, and serve devices and API until it stops. The exit code
//! says why it stopped: 0 guest power off, 2 guest reset, 128+N signal N, 1 error, 64 a command
//! line refused before anything started. Signals work in every phase (`lifecycle`), and every
//! exit path removes the API socket.

use std::io::IsTerminal;
use std::sync::{mpsc, Arc};

use api::ApiResponse;
use clap::Parser;
use vmm::api_bridge::{configure_until_start, ApiHandler, RunningVm, StartDecision};
use vmm::config::{Cli, PartialConfig, VmConfig};
use vmm::lifecycle::{Process, EXIT_USAGE};
use vmm::vm::Vm;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::terminal::Terminal;

fn main() {
    let _ = vmm::vcpu::PROCESS_START.set(std::time::Instant::now());
    let cli = parse_command_line();
    env_logger_init(cli.log_level);
    let server_cfg = cli.api.server_config();
    let has_kernel = cli.kernel.is_some() || cli.config.is_some();
    let api_only = server_cfg.is_some() && !has_kernel;
    let partial = PartialConfig::from_cli(cli).unwrap_or_else(|e| usage_error(&e.to_string()));
    // With a kernel on the command line the whole configuration is checked before anything starts.
    let config = (!api_only).then(|| {
        VmConfig::from_partial(partial.clone()).unwrap_or_else(|e| usage_error(&e.to_string()))
    });
    // Before any other thread exists, so every thread inherits the blocked signal mask.
    let process = Process::start().unwrap_or_else(|e| {
        eprintln!("vmm: error: cannot set up signal handling: {e}");
        std::process::exit(1)
    });

    let (tx, rx) = mpsc::channel();
    let wake =
        EventFd::new(EFD_NONBLOCK).unwrap_or_else(|e| process.fail(&format!("eventfd: {e}")));
    let server = match server_cfg {
        Some(cfg) => {
            let w = wake
                .try_clone()
                .unwrap_or_else(|e| process.fail(&format!("eventfd: {e}")));
            let wake_fn: api::WakeFn = Arc::new(move || {
                let _ = w.write(1);
            });
            match api::spawn_server(cfg, tx, wake_fn) {
                Ok(h) => {
                    process.remove_on_exit(h.socket_file());
                    Some(h)
                }
                Err(e) => process.fail(&format!("cannot start the API server: {e}")),
            }
        }
        None => {
            drop(tx);
            None
        }
    };

    let (mut vm, reply) = match config {
        None => boot_from_api(&process, &rx, partial),
        Some(config) => {
            let mut vm = Vm::new(config).unwrap_or_else(|e| process.fail(&e.to_string()));
            if let Err(e) = vm.start() {
                process.fail(&e.to_string());
            }
            (vm, None)
        }
    };
    process.running(vm.exit_handle());
    let running = RunningVm {
        boot_mib: vm.config().memory_mib,
        hotplug: vm.config().hotplug,
        balloon: vm.balloon(),
        virtio_mem: vm.virtio_mem(),
        manager: vm.memory_manager(),
    };
    let handler = ApiHandler::new(rx, wake, running)
        .unwrap_or_else(|e| process.fail(&format!("cannot set up the API handler: {e}")));
    if let Some(server) = &server {
        // GETs of device state are answered on the API thread from here on (see VmView).
        server.set_direct_reads(handler.view());
    }
    vm.add_subscriber(Arc::new(std::sync::Mutex::new(handler)));
    if let Some(r) = reply {
        r.respond(Ok(ApiResponse::Empty));
    }

    let stdin = std::io::stdin();
    let raw = stdin.is_terminal() && stdin.lock().set_raw_mode().is_ok();
    process.set_raw_terminal(raw);
    let result = vm.run_until_exit();
    // From here a signal ends the process at once (shutdown is bounded, but need not be waited).
    process.stopping();
    let code = match result {
        Ok(reason) => {
            log::info!("VM stopped: {reason:?}");
            reason.exit_code()
        }
        Err(e) => {
            eprintln!("vmm: error: {e}");
            1
        }
    };
    if let Some(server) = server {
        // Answers what is in progress, then closes; the socket file goes first.
        if let Err(e) = server.shutdown() {
            log::warn!("API server shutdown: {e}");
        }
    }
    process.exit(code)
}

/// Configure through the API until a start succeeds; a failed start is answered and waited out.
fn boot_from_api(
    process: &Process,
    rx: &mpsc::Receiver<api::ApiMessage>,
    mut partial: PartialConfig,
) -> (Vm, Option<api::bridge::Responder>) {
    eprintln!("vmm: waiting for the API to configure and start the VM");
    loop {
        match configure_until_start(rx, &mut partial) {
            StartDecision::ChannelClosed => {
                process.fail("the API server stopped before the VM started")
            }
            StartDecision::Start { config, reply } => {
                let started = Vm::new(config).and_then(|mut vm| vm.start().map(|()| vm));
                match started {
                    Ok(vm) => return (vm, reply),
                    Err(e) => {
                        if let Some(r) = reply {
                            r.respond(Err(vmm::api_bridge::start_failed(&e)));
                        }
                    }
                }
            }
        }
    }
}

/// The command line, or exit: 0 after `--help`/`--version`, [`EXIT_USAGE`] after clap's own
/// message for anything it refuses (clap would exit 2, which means "guest reset" here).
fn parse_command_line() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() { EXIT_USAGE } else { 0 })
        }
    }
}

/// A flag or `--config` value refused before anything started.
fn usage_error(msg: &str) -> ! {
    eprintln!("vmm: error: {msg}");
    eprintln!("(see vmm --help)");
    std::process::exit(EXIT_USAGE)
}

/// Log to stderr at `--log-level`, else the level named by `VMM_LOG` (default warn).
fn env_logger_init(level: Option<log::LevelFilter>) {
    let mut b = env_logger::Builder::from_env(env_logger::Env::new().filter_or("VMM_LOG", "warn"));
    if let Some(l) = level {
        b.filter_level(l);
    }
    b.format_timestamp_millis().init();
}
