//! `vmm`: boot a Linux guest on KVM. See `vmm --help`.
//!
//! Start-up: parse flags (and `--config`), start the REST API if asked, wait for the API to
//! configure and start the VM when no kernel was given on the command line, then build the VM,
//! start it, and serve devices, API and signals until it stops. The exit code says why it
//! stopped: 0 guest power off, 2 guest reset, 128+N signal N, 1 error.

use std::io::IsTerminal;
use std::sync::{mpsc, Arc};

use api::ApiResponse;
use clap::Parser;
use vmm::api_bridge::{configure_until_start, ApiHandler, RunningVm, StartDecision};
use vmm::config::{Cli, PartialConfig, VmConfig};
use vmm::event_loop::block_exit_signals;
use vmm::vm::Vm;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::terminal::Terminal;

fn main() {
    let _ = vmm::vcpu::PROCESS_START.set(std::time::Instant::now());
    let cli = Cli::parse();
    env_logger_init(cli.log_level);
    let server_cfg = cli.api.server_config();
    let has_kernel = cli.kernel.is_some() || cli.config.is_some();
    let api_only = server_cfg.is_some() && !has_kernel;
    let partial = match PartialConfig::from_cli(cli) {
        Ok(p) => p,
        Err(e) => fail(&e.to_string()),
    };
    // Before any thread exists, so every thread inherits the blocked mask.
    let signals = block_exit_signals()
        .unwrap_or_else(|e| fail(&format!("cannot set up signal handling: {e}")));

    let (tx, rx) = mpsc::channel();
    let wake = EventFd::new(EFD_NONBLOCK).unwrap_or_else(|e| fail(&format!("eventfd: {e}")));
    let server = match server_cfg {
        Some(cfg) => {
            let w = wake
                .try_clone()
                .unwrap_or_else(|e| fail(&format!("eventfd: {e}")));
            let wake_fn: api::WakeFn = Arc::new(move || {
                let _ = w.write(1);
            });
            match api::spawn_server(cfg, tx, wake_fn) {
                Ok(h) => Some(h),
                Err(e) => fail(&format!("cannot start the API server: {e}")),
            }
        }
        None => {
            drop(tx);
            None
        }
    };

    let (vm, reply) = if api_only {
        boot_from_api(&rx, partial)
    } else {
        let config = VmConfig::from_partial(partial).unwrap_or_else(|e| fail(&e.to_string()));
        let mut vm = Vm::new(config).unwrap_or_else(|e| fail(&e.to_string()));
        if let Err(e) = vm.start() {
            fail(&e.to_string());
        }
        (vm, None)
    };
    let mut vm = vm;
    vm.watch_signals(signals);
    let running = RunningVm {
        boot_mib: vm.config().memory_mib,
        hotplug: vm.config().hotplug,
        balloon: vm.balloon(),
        virtio_mem: vm.virtio_mem(),
        manager: vm.memory_manager(),
    };
    let handler = ApiHandler::new(rx, wake, running)
        .unwrap_or_else(|e| fail(&format!("cannot set up the API handler: {e}")));
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
    let result = vm.run_until_exit();
    if raw {
        let _ = stdin.lock().set_canon_mode();
    }
    match result {
        Ok(reason) => {
            log::info!("VM stopped: {reason:?}");
            std::process::exit(reason.exit_code());
        }
        Err(e) => fail(&e.to_string()),
    }
}

/// Configure through the API until a start succeeds; a failed start is answered and waited out.
fn boot_from_api(
    rx: &mpsc::Receiver<api::ApiMessage>,
    mut partial: PartialConfig,
) -> (Vm, Option<api::bridge::Responder>) {
    eprintln!("vmm: waiting for the API to configure and start the VM");
    loop {
        match configure_until_start(rx, &mut partial) {
            StartDecision::ChannelClosed => fail("the API server stopped before the VM started"),
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

fn fail(msg: &str) -> ! {
    eprintln!("vmm: error: {msg}");
    std::process::exit(1);
}

/// Log to stderr at `--log-level`, else the level named by `VMM_LOG` (default warn).
fn env_logger_init(level: Option<log::LevelFilter>) {
    let mut b = env_logger::Builder::from_env(env_logger::Env::new().filter_or("VMM_LOG", "warn"));
    if let Some(l) = level {
        b.filter_level(l);
    }
    b.format_timestamp_millis().init();
}
