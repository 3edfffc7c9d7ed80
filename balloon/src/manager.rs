//! The real backends: memory/'s [`MemoryManager`] behind a `Mutex`, as the VMM shares it
//! (`Arc<Mutex<MemoryManager>>` coerces to `Arc<dyn BalloonBackend>` and `Arc<dyn MemBackend>`).
//!
//! Inflate is `offline(.., Ballooned)`, deflate `online(.., Ballooned)`, free page reporting
//! `discard_free`, virtio-mem PLUG/UNPLUG the manager's `plug`/`unplug`. With the manager's
//! deferred discard policy, the balloon calls `release_pending` (`flush_discards`) off the ack
//! path, in batches (see [`crate::balloon::RELEASE_BATCH_PAGES`]).

use std::sync::{Mutex, MutexGuard};

use memory::{MemoryManager, Reason};

use crate::backend::{BackendError, BalloonBackend, MemBackend, Outcome, PageRange};

fn manager_error(e: memory::Error) -> BackendError {
    BackendError::Manager(e.to_string())
}

fn lock(m: &Mutex<MemoryManager>) -> MutexGuard<'_, MemoryManager> {
    // A panic elsewhere while holding the lock must not take the devices down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl BalloonBackend for Mutex<MemoryManager> {
    fn inflate(&self, ranges: &[PageRange]) -> Result<Outcome, BackendError> {
        lock(self)
            .offline(ranges, Reason::Ballooned)
            .map_err(manager_error)
    }

    fn deflate(&self, ranges: &[PageRange]) -> Result<Outcome, BackendError> {
        lock(self)
            .online(ranges, Reason::Ballooned)
            .map_err(manager_error)
    }

    fn report_free(&self, ranges: &[PageRange]) -> Result<Outcome, BackendError> {
        lock(self).discard_free(ranges).map_err(manager_error)
    }

    fn deflate_all(&self) -> Result<Outcome, BackendError> {
        let mut mm = lock(self);
        let mut total = Outcome::default();
        loop {
            let runs: Vec<PageRange> = mm
                .offline_runs(Some(Reason::Ballooned), None, 1024)
                .into_iter()
                .map(|(r, _)| r)
                .collect();
            if runs.is_empty() {
                break;
            }
            let o = mm.online(&runs, Reason::Ballooned).map_err(manager_error)?;
            total += o;
            if o.changed == 0 {
                // Nothing moved: stop rather than spin.
                break;
            }
        }
        Ok(total)
    }

    fn release_pending(&self) -> Result<u64, BackendError> {
        let mut mm = lock(self);
        if mm.queued_discards() == 0 {
            return Ok(0);
        }
        mm.flush_discards().map_err(manager_error)
    }

    fn compact(&self) -> u64 {
        lock(self).compact()
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
}
