//! `vmm`: boot a Linux guest on KVM. See `vmm --help`.

use std::io::IsTerminal;

use clap::Parser;
use vmm::config::{Cli, VmConfig};
use vmm::event_loop::{block_exit_signals, SIGNAL_FD};
use vmm::vm::Vm;
use vmm_sys_util::terminal::Terminal;

fn main() {
    env_logger_init();
    let cli = Cli::parse();
    let config = match VmConfig::from_cli(cli) {
        Ok(c) => c,
        Err(e) => fail(&e.to_string()),
    };
    // Before any thread exists, so every thread inherits the blocked mask.
    match block_exit_signals() {
        Ok(fd) => *SIGNAL_FD.lock().unwrap_or_else(|p| p.into_inner()) = Some(fd),
        Err(e) => fail(&format!("cannot set up signal handling: {e}")),
    }
    let vm = match Vm::new(config) {
        Ok(vm) => vm,
        Err(e) => fail(&e.to_string()),
    };
    let stdin = std::io::stdin();
    let raw = stdin.is_terminal() && stdin.lock().set_raw_mode().is_ok();
    let result = vm.run();
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

fn fail(msg: &str) -> ! {
    eprintln!("vmm: error: {msg}");
    std::process::exit(1);
}

/// Log to stderr at the level named by `VMM_LOG` (error, warn, info, debug, trace; default warn).
fn env_logger_init() {
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("VMM_LOG", "warn"))
        .format_timestamp_millis()
        .init();
}
