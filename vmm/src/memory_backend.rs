//! The devices' host side, served by the memory manager: an inflate becomes
//! `offline(.., Ballooned)`, a virtio-mem PLUG becomes `plug`, and so on. The manager validates
//! every page again (defence in depth), tracks the reason, and releases backing.

use std::sync::{Arc, Mutex, MutexGuard};

use balloon::{BackendError, BalloonBackend, MemBackend, Outcome};
use memory::{MemoryManager, PageRange, Reason};

/// Shares the VMM's memory manager with both devices.
#[derive(Clone)]
pub struct ManagerBackend(pub Arc<Mutex<MemoryManager>>);

impl ManagerBackend {
    fn lock(&self) -> MutexGuard<'_, MemoryManager> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn ranges(r: &[balloon::PageRange]) -> Vec<PageRange> {
    r.iter()
        .map(|r| PageRange::new(r.start.0, r.count))
        .collect()
}

fn outcome(o: memory::Outcome) -> Outcome {
    Outcome {
        changed: o.changed,
        refused: o.refused,
        unchanged: o.unchanged,
    }
}

fn manager_err(e: memory::Error) -> BackendError {
    BackendError::Manager(e.to_string())
}

impl BalloonBackend for ManagerBackend {
    fn inflate(&self, r: &[balloon::PageRange]) -> Result<Outcome, BackendError> {
        self.lock()
            .offline(&ranges(r), Reason::Ballooned)
            .map(outcome)
            .map_err(manager_err)
    }

    fn deflate(&self, r: &[balloon::PageRange]) -> Result<Outcome, BackendError> {
        self.lock()
            .online(&ranges(r), Reason::Ballooned)
            .map(outcome)
            .map_err(manager_err)
    }

    fn report_free(&self, r: &[balloon::PageRange]) -> Result<Outcome, BackendError> {
        self.lock()
            .discard_free(&ranges(r))
            .map(outcome)
            .map_err(manager_err)
    }

    fn deflate_all(&self) -> Result<Outcome, BackendError> {
        let mut m = self.lock();
        let runs: Vec<PageRange> = m
            .offline_runs(Some(Reason::Ballooned), None, usize::MAX)
            .into_iter()
            .map(|(r, _)| r)
            .collect();
        m.online(&runs, Reason::Ballooned)
            .map(outcome)
            .map_err(manager_err)
    }
}

impl MemBackend for ManagerBackend {
    fn plug(&self, r: balloon::PageRange) -> Result<(), BackendError> {
        self.lock()
            .plug(PageRange::new(r.start.0, r.count))
            .map(|_| ())
            .map_err(manager_err)
    }

    fn unplug(&self, r: balloon::PageRange) -> Result<(), BackendError> {
        self.lock()
            .unplug(PageRange::new(r.start.0, r.count))
            .map(|_| ())
            .map_err(manager_err)
    }
}
