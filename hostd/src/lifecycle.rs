//! A VM's life as the daemon runs it: created (admission, state directory, monitor, VMM),
//! watched (a VMM that ends is reported with its cause), stopped (SIGTERM, then SIGKILL), and
//! found again by a restarted daemon.
//!
//! All of it is bookkeeping on the registry plus /proc reads and small files: no request to a
//! VMM is made here (the control loop does those), so nothing here can hang on a guest.

use std::path::Path;
use std::time::{Duration, Instant};

use axum::http::StatusCode;

use crate::daemon::{bad_request, conflict, internal, not_found, Daemon, Fault};
use crate::monitor;
use crate::procfs::Liveness;
use crate::registry::{ExitInfo, HostSettings, VmEntry, VmInfo, VmState};
use crate::spec::{MemoryPatch, PatchError, VmSpec};
use crate::statedir::{write_json, VmDir};

/// Unix socket paths hold at most 107 bytes (`sun_path` is 108 with the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// How long a VMM may be gone without its monitor recording how it ended before the daemon
/// reports it as ended with an unknown status.
const EXIT_RECORD_GRACE: Duration = Duration::from_secs(2);
/// Lines of the VMM's stderr kept with its exit.
const STDERR_TAIL: usize = 10;

/// The `vmm` command line for a VM.
pub fn vmm_args(spec: &VmSpec, dir: &VmDir, log_level: &str) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    let mut a = vec!["--kernel".to_string(), path(&spec.kernel)];
    if let Some(i) = &spec.initramfs {
        a.extend(["--initramfs".into(), path(i)]);
    }
    if let Some(c) = &spec.cmdline {
        a.extend(["--cmdline".into(), c.clone()]);
    }
    let b = spec.balloon;
    a.extend([
        "--vcpus".into(),
        spec.vcpus.to_string(),
        "--memory-mib".into(),
        spec.memory.boot_mib.to_string(),
        "--serial".into(),
        path(&dir.console_log()),
        "--balloon".into(),
        format!(
            "deflate_on_oom={},free_page_reporting={},stats_interval_s={}",
            b.deflate_on_oom, b.free_page_reporting, b.stats_interval_s
        ),
    ]);
    if spec.region_mib() > 0 {
        a.extend([
            "--hotplug".into(),
            format!(
                "total_mib={},block_mib={}",
                spec.region_mib(),
                spec.hotplug.block()
            ),
        ]);
    }
    a.extend([
        "--api-socket".into(),
        path(&dir.api_socket()),
        "--log-level".into(),
        log_level.into(),
    ]);
    a
}

impl Daemon {
    /// `POST /vms`. Blocks until the monitor has started the VMM (a few milliseconds; at most
    /// `start_timeout`): call it off the async runtime.
    pub fn create_vm(&self, spec: VmSpec) -> Result<VmInfo, Fault> {
        spec.validate().map_err(|e| bad_request(e.0))?;
        spec.check_files().map_err(|e| bad_request(e.0))?;
        let spec = spec.resolved();
        let id = spec.id.clone();
        let dir = self.config.state.vm(&id);
        let socket_len = dir.api_socket().as_os_str().len();
        if socket_len > MAX_SOCKET_PATH {
            return Err(bad_request(format!(
                "id: {id:?} is too long for this state directory: the VMM's socket {} would be \
                 {socket_len} bytes, and Unix sockets allow {MAX_SOCKET_PATH}",
                dir.api_socket().display()
            )));
        }
        {
            let mut reg = self.registry();
            if let Some(old) = reg.vms.get(&id) {
                return Err(conflict(format!(
                    "a VM with id {id:?} exists already (state {:?}); DELETE it first or choose \
                     another id",
                    old.state
                )));
            }
            let budget = reg.host.budget_mib;
            reg.admit(&id, spec.memory.min(), budget).map_err(|n| {
                conflict(format!(
                    "memory.min_mib {} MiB does not fit: the budget is {} MiB and {} MiB of it \
                     is guaranteed to other VMs; {} MiB missing (lower min_mib, raise the \
                     budget with PUT /host/memory, or delete a VM)",
                    spec.memory.min(),
                    n.budget_mib,
                    n.guaranteed_mib,
                    n.missing_mib
                ))
            })?;
            dir.create(&spec).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    conflict(format!(
                        "{} exists but holds no VM this daemon knows (unreadable spec?); \
                         remove it by hand",
                        dir.path.display()
                    ))
                } else {
                    internal(format!("cannot create {}: {e}", dir.path.display()))
                }
            })?;
            reg.vms
                .insert(id.clone(), VmEntry::new(spec.clone(), dir.clone()));
        }
        let args = vmm_args(&spec, &dir, &self.config.vmm_log_level);
        let started = monitor::start(
            &self.config.exe,
            &dir,
            &self.config.vmm,
            &args,
            self.config.start_timeout,
        );
        let mut reg = self.registry();
        match started {
            Ok(record) => {
                log::info!(
                    "vm {id}: VMM pid {} started ({} MiB boot, {}..={} MiB, weight {})",
                    record.vmm.pid,
                    spec.memory.boot_mib,
                    spec.memory.min(),
                    spec.memory.max(),
                    spec.memory.weight()
                );
                let entry = reg
                    .vms
                    .get_mut(&id)
                    .ok_or_else(|| internal("VM vanished"))?;
                entry.record = Some(record);
                Ok(entry.info())
            }
            Err(e) => {
                reg.vms.remove(&id);
                let tail = dir.vmm_log_tail(STDERR_TAIL).join("\n");
                let _ = dir.remove();
                log::error!("vm {id}: cannot start the VMM: {e}");
                Err(internal(format!(
                    "cannot start the VMM: {e}{}",
                    suffix(&tail)
                )))
            }
        }
    }

    /// `DELETE /vms/{id}`: 202 while the VMM stops (SIGTERM, then SIGKILL after the stop
    /// timeout; the VM disappears once it has ended), 200 when it had ended already and is gone.
    pub fn delete_vm(&self, id: &str) -> Result<(StatusCode, VmInfo), Fault> {
        let mut reg = self.registry();
        let entry = reg.vms.get_mut(id).ok_or_else(|| no_vm(id))?;
        match entry.state {
            VmState::Exited => {
                let info = entry.info();
                let dir = entry.dir.clone();
                reg.vms.remove(id);
                dir.remove()
                    .map_err(|e| internal(format!("cannot remove {}: {e}", dir.path.display())))?;
                log::info!("vm {id}: removed");
                Ok((StatusCode::OK, info))
            }
            VmState::Stopping => Ok((StatusCode::ACCEPTED, entry.info())),
            VmState::Starting | VmState::Running => {
                let Some(record) = entry.record.clone() else {
                    return Err(conflict(format!(
                        "VM {id:?} is being created; retry in a moment"
                    )));
                };
                entry
                    .dir
                    .mark_stopping()
                    .map_err(|e| internal(e.to_string()))?;
                entry.state = VmState::Stopping;
                entry.kill_at = Some(Instant::now() + self.config.stop_timeout);
                if let Err(e) = record.vmm.signal(libc::SIGTERM) {
                    log::warn!("vm {id}: SIGTERM to pid {}: {e}", record.vmm.pid);
                }
                log::info!(
                    "vm {id}: stopping (SIGTERM to pid {}; SIGKILL after {:?})",
                    record.vmm.pid,
                    self.config.stop_timeout
                );
                Ok((StatusCode::ACCEPTED, entry.info()))
            }
        }
    }

    /// `PATCH /vms/{id}/memory`.
    pub fn patch_memory(&self, id: &str, patch: MemoryPatch) -> Result<VmInfo, Fault> {
        let mut reg = self.registry();
        let budget = reg.host.budget_mib;
        let entry = reg.vms.get(id).ok_or_else(|| no_vm(id))?;
        if !entry.is_live() {
            return Err(conflict(format!(
                "VM {id:?} has ended; its limits no longer apply"
            )));
        }
        let memory = patch.apply(&entry.spec).map_err(|e| match e {
            PatchError::Invalid(m) => bad_request(m),
            PatchError::Conflict(m) => conflict(m),
        })?;
        reg.admit(id, memory.min(), budget).map_err(|n| {
            conflict(format!(
                "min_mib {} MiB does not fit: the budget is {} MiB and {} MiB of it is \
                 guaranteed to other VMs; {} MiB missing",
                memory.min(),
                n.budget_mib,
                n.guaranteed_mib,
                n.missing_mib
            ))
        })?;
        let entry = reg.vms.get_mut(id).ok_or_else(|| no_vm(id))?;
        let mut spec = entry.spec.clone();
        spec.memory = memory;
        entry
            .dir
            .write_spec(&spec)
            .map_err(|e| internal(format!("cannot save the new limits: {e}")))?;
        log::info!(
            "vm {id}: limits now {}..={} MiB, weight {}",
            memory.min(),
            memory.max(),
            memory.weight()
        );
        entry.spec = spec;
        Ok(entry.info())
    }

    /// Saves new host settings (already validated by the caller).
    pub fn save_host_settings(&self, s: HostSettings) -> Result<(), Fault> {
        write_json(&self.config.state.host_settings(), &s)
            .map_err(|e| internal(format!("cannot save the host settings: {e}")))
    }

    /// Finds the VMs of the state directory again after a (re)start: a VMM still running (the
    /// same PID and start time) is adopted; one that ended meanwhile is reported with what its
    /// monitor recorded; a DELETE that was in progress is finished.
    pub fn recover(&self) -> std::io::Result<()> {
        let state = &self.config.state;
        for id in state.vm_ids()? {
            let dir = state.vm(&id);
            let spec = match dir.read_spec() {
                Ok(s) if s.id == id => s,
                Ok(s) => {
                    log::error!("{}: holds VM {:?}; skipped", dir.path.display(), s.id);
                    continue;
                }
                Err(e) => {
                    log::error!("{}: unreadable, skipped: {e}", dir.spec_file().display());
                    continue;
                }
            };
            let mut entry = VmEntry::new(spec, dir.clone());
            entry.record = dir.read_vmm().unwrap_or_else(|e| {
                log::warn!("vm {id}: {e}");
                None
            });
            let alive = entry
                .record
                .as_ref()
                .is_some_and(|r| r.vmm.liveness() != Liveness::Gone);
            let stopping = dir.is_stopping();
            if alive {
                let pid = entry.record.as_ref().map_or(0, |r| r.vmm.pid);
                log::info!("vm {id}: VMM pid {pid} still runs; adopted");
                if stopping {
                    entry.state = VmState::Stopping;
                    entry.kill_at = Some(Instant::now() + self.config.stop_timeout);
                }
            } else if stopping {
                log::info!("vm {id}: was being deleted and its VMM has ended; removed");
                let _ = dir.remove();
                continue;
            } else {
                self.mark_exited(&mut entry);
            }
            self.registry().vms.insert(id, entry);
        }
        Ok(())
    }

    /// Records how the VM's VMM ended, from its monitor's record.
    fn mark_exited(&self, entry: &mut VmEntry) {
        let record = entry.dir.read_exit().unwrap_or_else(|e| {
            log::warn!("vm {}: {e}", entry.spec.id);
            None
        });
        let exit = ExitInfo::from_record(record.as_ref(), entry.dir.vmm_log_tail(STDERR_TAIL));
        log::warn!(
            "vm {}: VMM pid {} ended: {}",
            entry.spec.id,
            entry.record.as_ref().map_or(0, |r| r.vmm.pid),
            exit.cause
        );
        entry.exit = Some(exit);
        entry.state = VmState::Exited;
        entry.kill_at = None;
        entry.readings.reachable = false;
        self.metrics.vm_exited();
    }

    /// One pass of supervision (every quarter second): notices VMMs that ended, escalates stops
    /// to SIGKILL, removes deleted VMs once their VMM is gone.
    pub fn supervise(&self) {
        let now = Instant::now();
        let mut reg = self.registry();
        let mut removed = Vec::new();
        for (id, entry) in reg.vms.iter_mut() {
            if entry.state == VmState::Exited {
                continue;
            }
            let Some(record) = entry.record.clone() else {
                continue; // being created
            };
            if !self.vmm_ended(entry, &record, now) {
                if let Some(at) = entry.kill_at.filter(|at| now >= *at) {
                    log::warn!(
                        "vm {id}: VMM pid {} still runs {:?} after SIGTERM; SIGKILL",
                        record.vmm.pid,
                        self.config.stop_timeout + now.duration_since(at)
                    );
                    let _ = record.vmm.signal(libc::SIGKILL);
                    entry.kill_at = None;
                }
                continue;
            }
            let deleting = entry.state == VmState::Stopping;
            self.mark_exited(entry);
            if deleting {
                removed.push(id.clone());
            }
        }
        for id in removed {
            if let Some(entry) = reg.vms.remove(&id) {
                if let Err(e) = entry.dir.remove() {
                    log::error!("vm {id}: cannot remove {}: {e}", entry.dir.path.display());
                }
                log::info!("vm {id}: deleted");
            }
        }
    }

    /// Whether the VMM has ended: its monitor recorded the end, or the VMM is gone and its
    /// monitor too (or it stayed silent past a grace period).
    fn vmm_ended(
        &self,
        entry: &mut VmEntry,
        record: &crate::statedir::VmmRecord,
        now: Instant,
    ) -> bool {
        if record.vmm.liveness() == Liveness::Alive {
            entry.gone_since = None;
            return false;
        }
        if matches!(entry.dir.read_exit(), Ok(Some(_))) {
            return true;
        }
        let since = *entry.gone_since.get_or_insert(now);
        record.monitor.liveness() == Liveness::Gone || now.duration_since(since) > EXIT_RECORD_GRACE
    }

    /// The info of VM `id`.
    pub fn vm_info(&self, id: &str) -> Result<VmInfo, Fault> {
        self.registry()
            .vms
            .get(id)
            .map(VmEntry::info)
            .ok_or_else(|| no_vm(id))
    }
}

fn no_vm(id: &str) -> Fault {
    not_found(format!("no VM with id {id:?}"))
}

fn suffix(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; the VMM said:\n{tail}")
    }
}
