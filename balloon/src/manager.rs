//! The real backends: memory/'s [`MemoryManager`] behind a `Mutex`, as the VMM shares it
//! (`Arc<Mutex<MemoryManager>>` coerces to `Arc<dyn BalloonBackend>` and `Arc<dyn MemBackend>`).
//!
//! Inflate is `offline`, deflate `online`, free page reporting `discard_free`, reset
//! `online_all`, virtio-mem PLUG/UNPLUG the manager's `plug`/`unplug`. Nothing comes back from
//! the manager into the devices: it releases deferred discards on its own timer.

use std::sync::{Mutex, MutexGuard};

use memory::MemoryManager;

use crate::backend::{BackendError, BalloonBackend, MemBackend, Outcome, PageRange, PageRanges};

fn manager_error(e: memory::Error) -> BackendError {
    BackendError::Manager(e.to_string())
}

fn lock(m: &Mutex<MemoryManager>) -> MutexGuard<'_, MemoryManager> {
    // A panic elsewhere while holding the lock must not take the devices down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl BalloonBackend for Mutex<MemoryManager> {
    fn inflate(&self, ranges: &PageRanges) -> Result<Outcome, BackendError> {
        lock(self).offline(ranges).map_err(manager_error)
    }

    fn deflate(&self, ranges: &PageRanges) -> Result<Outcome, BackendError> {
        lock(self).online(ranges).map_err(manager_error)
    }

    fn report_free(&self, ranges: &PageRanges) -> Result<Outcome, BackendError> {
        lock(self).discard_free(ranges).map_err(manager_error)
    }

    fn deflate_all(&self) -> Result<Outcome, BackendError> {
        lock(self).online_all().map_err(manager_error)
    }
}

impl MemBackend for Mutex<MemoryManager> {
    fn plug(&self, range: PageRange) -> Result<(), BackendError> {
        let o = lock(self).plug(range).map_err(manager_error)?;
        if o.refused > 0 {
            return Err(BackendError::Manager(format!(
                "plug of {range}: {} pages refused",
                o.refused
            )));
        }
        Ok(())
    }

    fn unplug(&self, range: PageRange) -> Result<(), BackendError> {
        let o = lock(self).unplug(range).map_err(manager_error)?;
        if o.refused > 0 {
            return Err(BackendError::Manager(format!(
                "unplug of {range}: {} pages refused",
                o.refused
            )));
        }
        Ok(())
    }

    fn plugged_runs(&self, range: PageRange) -> Vec<PageRange> {
        lock(self).plugged_runs(range)
    }
}
