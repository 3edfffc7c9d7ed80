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
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
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
    cpuid::configure(&mut c, id, count);
    vcpu.set_cpuid2(&c).map_err(|source| regs::RegsError::Kvm {
        what: "set cpuid",
        source,
    })?;
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

/// Start the KVM_RUN loop of one vCPU on its own thread.
pub fn spawn(id: u8, mut vcpu: VcpuFd, ctx: Arc<VcpuContext>) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || {
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
                info!("vCPU {id}: guest shut down (triple fault or reset)");
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
            Err(e) => {
                error!("vCPU {id}: KVM_RUN failed: {e}");
                return ExitReason::Error;
            }
        }
    }
}
