//! vCPU threads: set up the boot state, then run KVM_RUN and route exits to the buses.

use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{
    CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use log::{error, info, warn};
use vm_memory::GuestMemoryMmap;

use crate::arch::{cpuid, regs};
use crate::bus::Bus;
use crate::devices::power::{ExitHandle, ExitReason};

/// What every vCPU thread shares.
pub struct VcpuContext {
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Where a vCPU reports a power-off, reset or fatal error.
    pub exit: Arc<ExitHandle>,
}

/// Configure vCPU `id` of `count` for the boot entry `entry`.
pub fn configure(
    vcpu: &VcpuFd,
    id: u8,
    count: u8,
    supported_cpuid: &CpuId,
    mem: &GuestMemoryMmap,
    entry: regs::EntryMode,
) -> Result<(), regs::RegsError> {
    let mut c = supported_cpuid.clone();
    let xcr0 = cpuid::configure(&mut c, id, count);
    vcpu.set_cpuid2(&c).map_err(|source| regs::RegsError::Kvm {
        what: "set cpuid",
        source,
    })?;
    if let Some(xcr0) = xcr0 {
        regs::setup_xcr0(vcpu, xcr0);
    }
    let msrs = regs::setup_msrs(vcpu);
    log::debug!(
        "vCPU {id}: {msrs} of {} boot MSRs set",
        regs::boot_msrs().len()
    );
    regs::setup_lapic(vcpu)?;
    regs::setup_fpu(vcpu)?;
    if id == 0 {
        regs::setup_sregs(vcpu, mem, entry)?;
        regs::setup_regs(vcpu, entry)?;
    }
    // Application processors wait for INIT/SIPI from the boot processor, which the in-kernel
    // LAPIC handles; their state is set by the guest.
    Ok(())
}

/// The signal that kicks a vCPU thread out of KVM_RUN (KVM_RUN returns EINTR).
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Install the (empty) kick handler; without one the signal would kill the process.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Stop every vCPU thread: the exit has been requested, so each returns at its next exit from
/// KVM_RUN; signal them until they do. Returns false if some did not stop within `timeout`
/// (then guest memory must not be unmapped: a vCPU may still be running).
pub fn stop_all(threads: Vec<JoinHandle<()>>, timeout: std::time::Duration) -> bool {
    use std::os::unix::thread::JoinHandleExt;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let running: Vec<&JoinHandle<()>> = threads.iter().filter(|t| !t.is_finished()).collect();
        if running.is_empty() {
            break;
        }
        if std::time::Instant::now() > deadline {
            warn!("{} vCPU thread(s) did not stop", running.len());
            return false;
        }
        for t in running {
            // SAFETY: the pthread_t belongs to a thread we spawned and have not joined; the
            // handler for this signal is installed and does nothing.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    for t in threads {
        let _ = t.join();
    }
    true
}

/// Start the KVM_RUN loop of one vCPU on its own thread.
pub fn spawn(id: u8, mut vcpu: VcpuFd, ctx: Arc<VcpuContext>) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || {
            // The filter goes on before the guest runs: every exit it serves is filtered.
            if let Err(e) = crate::seccomp::enter(crate::seccomp::ThreadKind::Vcpu) {
                error!("vCPU {id}: {e}");
                ctx.exit.request(ExitReason::Error);
                return;
            }
            let reason = run(id, &mut vcpu, &ctx);
            ctx.exit.request(reason);
        })
}

/// When the process started, for the boot-time figure (set by `main`).
pub static PROCESS_START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

fn run(id: u8, vcpu: &mut VcpuFd, ctx: &VcpuContext) -> ExitReason {
    if id == 0 {
        if let Some(t0) = PROCESS_START.get() {
            info!(
                "boot: first vCPU entry {:.3} ms after process start",
                t0.elapsed().as_secs_f64() * 1e3
            );
        }
    }
    loop {
        // Once the VM is stopping, never re-enter the guest.
        if let Some(r) = ctx.exit.reason() {
            return r;
        }
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                ctx.pio.read(port as u64, data);
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                ctx.pio.write(port as u64, data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                ctx.mmio.read(addr, data);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ctx.mmio.write(addr, data);
            }
            Ok(VcpuExit::Hlt) => {
                info!("vCPU {id} halted with interrupts off: treating as power off");
                return ExitReason::PowerOff;
            }
            Ok(VcpuExit::Shutdown) => {
                // A triple fault, or a reset through a path KVM handles itself. Say where the
                // vCPU was: this is the only trace a guest crash before its console leaves.
                // KVM on AMD re-initializes the vCPU (INIT) when it takes the shutdown exit,
                // so there the registers read back are the reset values, not the fault's.
                let where_ = match (vcpu.get_regs(), vcpu.get_sregs()) {
                    (Ok(r), Ok(s)) => format!(
                        "rip={:#x} rsp={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}{}",
                        r.rip,
                        r.rsp,
                        s.cr0,
                        s.cr3,
                        s.cr4,
                        s.efer,
                        if r.rip == 0xfff0 && s.cs.base == 0xffff_0000 {
                            " (the reset state: KVM re-initialized the vCPU, as it does on \
                             AMD, so where it faulted is lost)"
                        } else {
                            ""
                        }
                    ),
                    _ => "registers unavailable".to_string(),
                };
                warn!("vCPU {id}: guest shutdown exit (triple fault or reset): {where_}");
                return ExitReason::Reset;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                    KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                    KVM_SYSTEM_EVENT_CRASH => {
                        error!("vCPU {id}: guest crashed");
                        ExitReason::Error
                    }
                    other => {
                        warn!("vCPU {id}: system event {other}: stopping");
                        ExitReason::Error
                    }
                };
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                error!("vCPU {id}: KVM failed to enter the guest (reason {reason:#x}, cpu {cpu})");
                return ExitReason::Error;
            }
            Ok(VcpuExit::InternalError) => {
                error!("vCPU {id}: KVM internal error");
                return ExitReason::Error;
            }
            Ok(other) => {
                error!("vCPU {id}: unexpected exit {other:?}");
                return ExitReason::Error;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(_) if ctx.exit.reason().is_some() => return ExitReason::Error,
            Err(e) => {
                error!("vCPU {id}: KVM_RUN failed: {e}");
                return ExitReason::Error;
            }
        }
    }
}
