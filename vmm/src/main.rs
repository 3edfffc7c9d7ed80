//! `vmm`: boot a Linux guest on KVM. See `vmm --help`.
//!
//! Start-up: parse and check flags (and `--config`); block the exit signals; bind the API
//! socket; with a kernel on the command line build and load the VM (else open /dev/kvm if a drop
//! is asked); drop to `--uid`/`--gid` (with `--jail` into an empty root first) while this is
//! the only thread; then each thread installs its seccomp filter as it starts (signal thread,
//! API thread, vCPUs) and the main thread its own before the event loop's first turn
//! (docs/security.md). Without a kernel on the command
//! line the API configures and starts the VM. The exit code says why it stopped: 0 guest power
//! off, 2 guest reset, 128+N signal N, 1 error, 64 a command line refused before anything
//! started, 70 a system call outside a thread's filter. Signals work in every phase
//! (`lifecycle`), and every exit path but the last removes the API socket.

use std::io::IsTerminal;
use std::sync::{mpsc, Arc};

use api::ApiResponse;
use clap::Parser;
use std::os::unix::fs::OpenOptionsExt;
use vmm::api_bridge::{configure_until_start, ApiHandler, RunningVm, StartDecision};
use vmm::config::{Cli, PartialConfig, VmConfig};
use vmm::lifecycle::{Process, EXIT_USAGE};
use vmm::privileges::Credentials;
use vmm::seccomp::ThreadKind;
use vmm::vm::Vm;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::terminal::Terminal;

fn main() {
    let _ = vmm::vcpu::PROCESS_START.set(std::time::Instant::now());
    let cli = parse_command_line();
    env_logger_init(cli.log_level);
    let seccomp_mode = cli.seccomp;
    let drop_to = cli
        .uid
        .zip(cli.gid)
        .map(|(uid, gid)| Credentials { uid, gid });
    let jail = cli.jail;
    let server_cfg = cli.api.server_config();
    let has_kernel = cli.kernel.is_some() || cli.config.is_some();
    let api_only = server_cfg.is_some() && !has_kernel;
    if jail && !has_kernel {
        usage_error(
            "--jail needs the VM on the command line (--kernel or --config): a jailed VMM \
             cannot open the files an API client names later",
        );
    }
    let partial = PartialConfig::from_cli(cli).unwrap_or_else(|e| usage_error(&e.to_string()));
    // With a kernel on the command line the whole configuration is checked before anything starts.
    let config = (!api_only).then(|| {
        VmConfig::from_partial(partial.clone()).unwrap_or_else(|e| usage_error(&e.to_string()))
    });
    // Before any other thread exists, so every thread inherits the blocked signal mask. The
    // signal thread itself starts once the process is contained (a signal waits until then).
    let process = Process::new().unwrap_or_else(|e| {
        eprintln!("vmm: error: cannot set up signal handling: {e}");
        std::process::exit(1)
    });

    // 1. Open what needs the starting user's rights: the API socket, and /dev/kvm with the
    //    VM's files (a kernel on the command line: the VM is built and loaded now; configured
    //    through the API: /dev/kvm only, the files named later are opened as --uid).
    let (tx, rx) = mpsc::channel();
    let wake =
        EventFd::new(EFD_NONBLOCK).unwrap_or_else(|e| process.fail(&format!("eventfd: {e}")));
    let bound = match server_cfg {
        Some(cfg) => {
            let w = wake
                .try_clone()
                .unwrap_or_else(|e| process.fail(&format!("eventfd: {e}")));
            let wake_fn: api::WakeFn = Arc::new(move || {
                let _ = w.write(1);
            });
            match api::bind_server(cfg, tx, wake_fn) {
                Ok(b) => {
                    process.remove_on_exit(b.socket_file());
                    Some(b)
                }
                Err(e) => process.fail(&format!("cannot start the API server: {e}")),
            }
        }
        None => {
            drop(tx);
            None
        }
    };
    let mut kvm = None;
    let built = match config {
        Some(config) => {
            let mut vm = Vm::new(config).unwrap_or_else(|e| process.fail(&e.to_string()));
            if let Err(e) = vm.load() {
                process.fail(&e.to_string());
            }
            Some(vm)
        }
        None => {
            if drop_to.is_some() {
                kvm = Some(open_kvm().unwrap_or_else(|e| process.fail(&e)));
            }
            None
        }
    };

    if let Err(e) = vmm::api_bridge::open_process_stats() {
        process.fail(&format!("cannot open /proc/self/statm: {e}"));
    }

    // 2. Drop to --uid/--gid while this is the only thread (with --jail, into an empty root
    //    first).
    if let Some(creds) = drop_to {
        if let Some(b) = &bound {
            // The socket's owner, so the VMM may remove it on exit from a sticky directory
            // (/tmp); removing it also needs write access to its directory.
            let path = b.socket_file().path().to_owned();
            if let Err(e) = std::os::unix::fs::chown(&path, Some(creds.uid), Some(creds.gid)) {
                process.fail(&format!(
                    "cannot chown the API socket {}: {e}",
                    path.display()
                ));
            }
        }
        if let Err(e) = vmm::privileges::drop_to(creds, jail) {
            process.fail(&e.to_string());
        }
        log::info!(
            "running as uid {} gid {}, no capabilities{}",
            creds.uid,
            creds.gid,
            if jail { ", in an empty root" } else { "" }
        );
    }

    // 3. Filters: each thread installs its own before it handles input.
    if let Err(e) = vmm::seccomp::configure(seccomp_mode) {
        process.fail(&e.to_string());
    }
    if let Err(e) = process.spawn_signal_thread() {
        process.fail(&format!("cannot start the signal thread: {e}"));
    }
    let server = bound.map(|b| {
        let p = process.clone();
        let filter = Box::new(move || {
            if let Err(e) = vmm::seccomp::enter(ThreadKind::Api) {
                p.fail(&e.to_string());
            }
        });
        b.spawn(filter)
            .unwrap_or_else(|e| process.fail(&format!("cannot start the API server: {e}")))
    });

    // 4. Run the VM.
    let (mut vm, reply) = match built {
        None => boot_from_api(&process, &rx, partial, kvm.as_ref()),
        Some(mut vm) => {
            if let Err(e) = vm.start_vcpus() {
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
    kvm: Option<&std::fs::File>,
) -> (Vm, Option<api::bridge::Responder>) {
    eprintln!("vmm: waiting for the API to configure and start the VM");
    loop {
        match configure_until_start(rx, &mut partial) {
            StartDecision::ChannelClosed => {
                process.fail("the API server stopped before the VM started")
            }
            StartDecision::Start { config, reply } => {
                let vm = match kvm {
                    // Opened before the privilege drop; each attempt gets its own descriptor.
                    Some(f) => f
                        .try_clone()
                        .map_err(vmm::vm::VmError::Io)
                        .and_then(|f| Vm::with_kvm(config, kvm_from_file(f))),
                    None => Vm::new(config),
                };
                let started = vm.and_then(|mut vm| vm.start().map(|()| vm));
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

/// /dev/kvm, opened before the privilege drop for a VM configured later through the API.
fn open_kvm() -> Result<std::fs::File, String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/kvm")
        .map_err(|e| {
            format!("cannot open /dev/kvm: {e} (is KVM available and do you have access to it?)")
        })
}

fn kvm_from_file(f: std::fs::File) -> kvm_ioctls::Kvm {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: the descriptor is an open /dev/kvm that the File gave up; Kvm owns it from here.
    unsafe { kvm_ioctls::Kvm::from_raw_fd(f.into_raw_fd()) }
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
