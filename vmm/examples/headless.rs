//! The VMM's API without KVM: the real request handler, devices and memory manager behind the
//! real server, and a simulated guest that moves the balloon and the plugged size at a steady
//! pace. For trying the API and `vmmctl` without a guest image, and for `api-bench`.
//!
//! ```console
//! $ cargo run --release -p vmm --features testing --example headless -- --socket /tmp/vmm.sock
//! ```
//!
//! Stops on Ctrl-C or SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use vmm::testing::{GuestPace, HeadlessOptions, HeadlessVmm};

#[derive(Parser, Debug)]
#[command(about = "Serve the VMM's API with real devices and no KVM")]
struct Args {
    /// Where to serve the API.
    #[arg(long)]
    socket: PathBuf,
    /// MiB the simulated guest moves its balloon per 20 ms.
    #[arg(long, default_value_t = 16)]
    balloon_mib_per_tick: u64,
    /// MiB the simulated guest plugs or unplugs per 20 ms.
    #[arg(long, default_value_t = 64)]
    hotplug_mib_per_tick: u64,
}

fn main() {
    let args = Args::parse();
    let opts = HeadlessOptions {
        guest: GuestPace::Steady {
            every: Duration::from_millis(20),
            balloon_mib: args.balloon_mib_per_tick,
            hotplug_mib: args.hotplug_mib_per_tick,
        },
        ..HeadlessOptions::default()
    };
    // Blocked before any thread exists, so every thread inherits the mask and only the wait
    // below takes them.
    let stop = block_stop_signals();
    let (server, vmm) = match HeadlessVmm::serve(api::ServerConfig::new(&args.socket), opts) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("headless: cannot serve on {}: {e}", args.socket.display());
            std::process::exit(1);
        }
    };
    eprintln!(
        "headless: serving the VMM's API on {}",
        args.socket.display()
    );
    let mut sig = 0;
    // SAFETY: `stop` is an initialised signal set and `sig` a valid place for the answer.
    unsafe { libc::sigwait(&stop, &mut sig) };
    let _ = server.shutdown();
    drop(vmm);
}

/// Blocks SIGINT and SIGTERM in this thread (and the threads it starts); returns the set.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: a zeroed sigset_t is valid input for sigemptyset, which initialises it; the calls
    // change only this local set and the calling thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}
