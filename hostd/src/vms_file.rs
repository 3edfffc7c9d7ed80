//! `hostd --vms FILE`: a set of VMs to have running, started when the daemon starts. Idempotent
//! with the state directory: a VM whose id the daemon already has is left as it is.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::daemon::Daemon;
use crate::spec::VmSpec;

/// The file: `{"vms": [VM, ...]}` with each VM as in `POST /vms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmsFile {
    /// The VMs to start if missing, each as in `POST /vms`.
    pub vms: Vec<VmSpec>,
}

/// Reads and checks the whole file before anything starts; the error names the VM and field.
pub fn load(path: &Path) -> Result<VmsFile, String> {
    let text = std::fs::read(path).map_err(|e| format!("--vms {}: {e}", path.display()))?;
    let mut de = serde_json::Deserializer::from_slice(&text);
    let file: VmsFile = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| format!("--vms {}: {}: {}", path.display(), e.path(), e.inner()))?;
    let mut seen = std::collections::HashSet::new();
    for (i, vm) in file.vms.iter().enumerate() {
        let bad = |m: String| format!("--vms {}: vms[{i}] ({:?}): {m}", path.display(), vm.id);
        vm.validate().map_err(|e| bad(e.0))?;
        vm.check_files().map_err(|e| bad(e.0))?;
        if !seen.insert(vm.id.as_str()) {
            return Err(bad("the id appears twice in the file".into()));
        }
    }
    Ok(file)
}

/// Creates the file's VMs that the daemon does not have yet. Failures (admission, a VMM that
/// cannot start) are logged; the others still start.
pub async fn start(d: &Arc<Daemon>, file: VmsFile) {
    for spec in file.vms {
        let existing = d.registry().vms.get(&spec.id).map(|v| v.spec.clone());
        if let Some(old) = existing {
            if old.memory.boot_mib != spec.memory.boot_mib || old.kernel != spec.kernel {
                log::warn!(
                    "--vms: VM {} exists with a different spec; left as it is (DELETE it and \
                     restart to apply the file)",
                    spec.id
                );
            } else {
                log::info!("--vms: VM {} exists already", spec.id);
            }
            continue;
        }
        let d2 = d.clone();
        let id = spec.id.clone();
        match tokio::task::spawn_blocking(move || d2.create_vm(spec)).await {
            Ok(Ok(_)) => {}
            Ok(Err(f)) => log::error!("--vms: VM {id}: {}", f.message),
            Err(e) => log::error!("--vms: VM {id}: {e}"),
        }
    }
}
