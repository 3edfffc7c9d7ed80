//! The allowed system calls of each thread kind, each with why the thread needs it.
//!
//! A call is allowed outright (`allow`) or only with the arguments listed (`allow_if`: any one
//! rule matching allows it; all conditions of a rule must hold). Everything else traps.

use std::collections::BTreeMap;

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_userspace_memory_region, KVMIO};
use seccompiler::{BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr};

use super::ThreadKind;

ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_userspace_memory_region
);

type Rules = BTreeMap<i64, Vec<SeccompRule>>;
type Result<T> = std::result::Result<T, BackendError>;

/// The rules of `kind`'s filter: system call number to the argument rules that allow it (an
/// empty list allows any arguments).
pub fn rules(kind: ThreadKind) -> Result<Rules> {
    let mut r = Rules::new();
    common(&mut r)?;
    match kind {
        ThreadKind::Vcpu => vcpu(&mut r)?,
        ThreadKind::Vmm => vmm(&mut r)?,
        ThreadKind::Api => api(&mut r)?,
        ThreadKind::Signals => signals(&mut r)?,
    }
    Ok(r)
}

fn allow(r: &mut Rules, nr: i64) {
    r.insert(nr, Vec::new());
}

/// Allows `nr` when argument `arg` is one of `values` (compared as 32 bits: ioctl requests,
/// advice values, flags).
fn allow_arg_in(r: &mut Rules, nr: i64, arg: u8, values: &[u64]) -> Result<()> {
    let list = r.entry(nr).or_default();
    for &v in values {
        list.push(SeccompRule::new(vec![SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            v,
        )?])?);
    }
    Ok(())
}

/// Allows `nr` when the bits `mask` of argument `arg` are all clear.
fn allow_bits_clear(r: &mut Rules, nr: i64, arg: u8, mask: u64) -> Result<()> {
    r.entry(nr)
        .or_default()
        .push(SeccompRule::new(vec![SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(mask),
            0,
        )?])?);
    Ok(())
}

/// What every thread needs: locks, memory allocation, logging, and ending.
fn common(r: &mut Rules) -> Result<()> {
    // Debug builds only: the standard library checks that a descriptor is open before it
    // closes or adopts one (fcntl(F_GETFD), under debug assertions). Release builds, which
    // users run and the counts in the README are of, never make this call.
    if cfg!(debug_assertions) {
        allow_arg_in(r, libc::SYS_fcntl, 1, &[libc::F_GETFD as u64])?;
    }
    // Mutexes, condition variables, channels, thread joins.
    allow(r, libc::SYS_futex);
    // Log lines to stderr (the `log` crate), and the SIGSYS handler's own message.
    allow(r, libc::SYS_write);
    // The allocator: large blocks and per-thread arenas are mapped, never executable.
    allow_bits_clear(r, libc::SYS_mmap, 2, libc::PROT_EXEC as u64)?;
    // The allocator grows arenas in place (read/write only, never executable).
    allow_bits_clear(r, libc::SYS_mprotect, 2, libc::PROT_EXEC as u64)?;
    // Freeing large blocks, thread stacks and the alternate signal stack.
    allow(r, libc::SYS_munmap);
    // The main arena (brk heap) grows and shrinks.
    allow(r, libc::SYS_brk);
    // The allocator returns freed arena pages (MADV_DONTNEED) and a thread's stack on exit.
    allow_arg_in(r, libc::SYS_madvise, 2, &[libc::MADV_DONTNEED as u64])?;
    // Descriptors dropped (eventfds, files, connections, the vCPU's fd).
    allow(r, libc::SYS_close);
    // Time, where the vDSO falls back to the system call (some clock sources).
    allow(r, libc::SYS_clock_gettime);
    // Spinning locks yield.
    allow(r, libc::SYS_sched_yield);
    // Signal masks around thread exit and in the C library's own critical sections.
    allow(r, libc::SYS_rt_sigprocmask);
    // Returning from a signal handler: the vCPU kick and the SIGSYS handler in log mode.
    allow(r, libc::SYS_rt_sigreturn);
    // A Rust thread removes its alternate signal stack when it ends.
    allow(r, libc::SYS_sigaltstack);
    // A thread ends; the process ends (also from the SIGSYS handler).
    allow(r, libc::SYS_exit);
    allow(r, libc::SYS_exit_group);
    Ok(())
}

/// A vCPU thread: runs the guest and serves its port I/O and MMIO exits (serial, power,
/// virtio-mmio registers).
fn vcpu(r: &mut Rules) -> Result<()> {
    // Run the guest; read its registers for the message on a shutdown exit.
    allow_arg_in(
        r,
        libc::SYS_ioctl,
        1,
        &[KVM_RUN(), KVM_GET_REGS(), KVM_GET_SREGS()],
    )?;
    // A guest's register writes activate and reset virtio devices here: the transport clones
    // the queue eventfds (F_DUPFD_CLOEXEC), the balloon makes them non-blocking (F_GETFL,
    // F_SETFL) and arms or disarms its statistics timer.
    allow_arg_in(
        r,
        libc::SYS_fcntl,
        1,
        &[
            libc::F_DUPFD_CLOEXEC as u64,
            libc::F_GETFL as u64,
            libc::F_SETFL as u64,
        ],
    )?;
    allow(r, libc::SYS_timerfd_settime);
    Ok(())
}

/// The main thread while the VM runs: the event loop (virtio queues, serial input, timers, API
/// requests), memory release and hot-add, and stopping the vCPUs at the end.
fn vmm(r: &mut Rules) -> Result<()> {
    // The event loop waits on its epoll set and changes it as devices start and stop.
    allow(r, libc::SYS_epoll_wait);
    allow(r, libc::SYS_epoll_ctl);
    // Eventfds, timerfds, the serial input (stdin).
    allow(r, libc::SYS_read);
    // Timers: the manager's deadlines and the event loop's retry timer.
    allow(r, libc::SYS_timerfd_settime);
    // Plugging and unplugging hot-add blocks (each its own memory slot).
    allow_arg_in(r, libc::SYS_ioctl, 1, &[KVM_SET_USER_MEMORY_REGION()])?;
    // The terminal's mode restored on exit (tcgetattr, tcsetattr).
    allow_arg_in(
        r,
        libc::SYS_ioctl,
        1,
        &[libc::TCGETS, libc::TCSETS, libc::TCSETSW, libc::TCSETSF],
    )?;
    // Releasing guest memory: MADV_DONTNEED for private anonymous memory (also in `common`),
    // MADV_REMOVE for shared memory.
    allow_arg_in(r, libc::SYS_madvise, 2, &[libc::MADV_REMOVE as u64])?;
    // Releasing many runs in one call (MADV_DONTNEED only).
    allow_arg_in(
        r,
        libc::SYS_process_madvise,
        3,
        &[libc::MADV_DONTNEED as u64],
    )?;
    // Releasing memfd-backed memory: a hole punched, the size kept.
    allow_arg_in(
        r,
        libc::SYS_fallocate,
        1,
        &[(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u64],
    )?;
    // Resident pages of guest memory for GET /vm/memory.
    allow(r, libc::SYS_mincore);
    // The VMM's own resident set for the metrics: /proc/self/statm, opened before the filter,
    // read in place.
    allow(r, libc::SYS_pread64);
    // Stopping the vCPUs: a signal to each thread (tgkill with the process id), a short sleep
    // between rounds.
    allow(r, libc::SYS_tgkill);
    allow(r, libc::SYS_getpid);
    allow(r, libc::SYS_clock_nanosleep);
    // Removing the API socket on exit: check it is still ours, then unlink it.
    socket_removal(r);
    // Per-thread hash map keys (std's RandomState) for maps made while running.
    allow(r, libc::SYS_getrandom);
    Ok(())
}

/// The API thread: a single-threaded tokio runtime serving HTTP on the listening sockets that
/// were bound before it started.
fn api(r: &mut Rules) -> Result<()> {
    // Debug builds only: tokio checks that a listener it adopts is non-blocking (F_GETFL).
    if cfg!(debug_assertions) {
        allow_arg_in(r, libc::SYS_fcntl, 1, &[libc::F_GETFL as u64])?;
    }
    // tokio's reactor.
    allow(r, libc::SYS_epoll_wait);
    allow(r, libc::SYS_epoll_ctl);
    // New connections on the bound listeners.
    allow(r, libc::SYS_accept4);
    // Requests in, answers out; the VMM thread's eventfd written to wake it.
    allow(r, libc::SYS_read);
    allow(r, libc::SYS_recvfrom);
    allow(r, libc::SYS_writev);
    allow(r, libc::SYS_sendto);
    // Closing a connection's write side.
    allow(r, libc::SYS_shutdown);
    // Per-thread hash map keys (std's RandomState).
    allow(r, libc::SYS_getrandom);
    // The instance id (`GET /` names the VMM by its process id).
    allow(r, libc::SYS_getpid);
    // Removing the socket file when the server stops.
    socket_removal(r);
    Ok(())
}

/// The signal thread: reads the exit signals, asks the event loop to stop, or ends the process
/// after removing the API socket and restoring the terminal.
fn signals(r: &mut Rules) -> Result<()> {
    // The signalfd.
    allow(r, libc::SYS_read);
    // The terminal's mode restored on exit.
    allow_arg_in(
        r,
        libc::SYS_ioctl,
        1,
        &[libc::TCGETS, libc::TCSETS, libc::TCSETSW, libc::TCSETSF],
    )?;
    socket_removal(r);
    Ok(())
}

/// Removing the API socket if it is still the file this process created: a stat of its name
/// (inode check), then unlink, both relative to the socket's directory held open since it was
/// bound (`api::SocketFile`).
fn socket_removal(r: &mut Rules) {
    allow(r, libc::SYS_newfstatat);
    allow(r, libc::SYS_unlinkat);
}
