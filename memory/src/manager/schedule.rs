//! When the manager releases its deferred discards and compacts its tracker.
//!
//! A pure state machine over the instants it is given: the manager feeds it what requests did
//! and when ([`Schedule::queued`], [`Schedule::changed`]), asks it what is due at a given instant
//! ([`Schedule::due`]) and when to wake next ([`Schedule::next_deadline`]). No clock is read
//! here, so the tests step time exactly.
//!
//! The rules:
//! - deferred discards are released once [`RELEASE_BATCH_PAGES`] have been queued (on the next
//!   turn of the event loop, after the ack that queued the last of them), or once nothing was
//!   queued for [`RELEASE_IDLE_DELAY`];
//! - a failed release is tried again [`RELEASE_RETRY_DELAY`] later, or at the next queueing;
//! - after a full batch the timer stays armed [`RELEASE_IDLE_DELAY`] ahead (a burst is likely
//!   going on), so the next queued page finds it armed early enough: arming a timer is a system
//!   call that reprograms the host's timer, and it would otherwise land on the guest's ack path;
//! - the tracker is compacted once nothing changed it for [`COMPACT_IDLE_DELAY`] (and nothing
//!   waits to be released).

#[cfg(any(test, feature = "testing"))]
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::units::PAGES_PER_MIB;

/// Queued pages that make a release due at once (16 MiB: 64 of Linux's 256-PFN inflate buffers).
pub const RELEASE_BATCH_PAGES: u64 = 16 * PAGES_PER_MIB;
/// Nothing queued for this long releases whatever is queued.
pub const RELEASE_IDLE_DELAY: Duration = Duration::from_millis(2);
/// After a failed release, try again this much later.
pub const RELEASE_RETRY_DELAY: Duration = Duration::from_secs(1);
/// How long the tracker must be left alone before it is compacted: long enough that a stream of
/// requests never waits for it, short enough that a settled guest soon costs the host little.
pub const COMPACT_IDLE_DELAY: Duration = Duration::from_secs(1);

/// Where the manager reads the time. The VMM uses [`SystemClock`]; tests step a
/// `ManualClock` (feature `testing`).
pub trait Clock: Send + Sync {
    /// The current time, monotonic; deadlines for releases and compaction are computed from it.
    fn now(&self) -> Instant;
}

/// The monotonic clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told to (tests; feature `testing`).
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<Instant>>);

#[cfg(any(test, feature = "testing"))]
impl ManualClock {
    /// A clock standing at the current time.
    pub fn new() -> ManualClock {
        ManualClock(Arc::new(Mutex::new(Instant::now())))
    }
    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) += by;
    }
}

#[cfg(any(test, feature = "testing"))]
impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new()
    }
}

#[cfg(any(test, feature = "testing"))]
impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What is due at an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Due {
    pub release: bool,
    pub compact: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Schedule {
    /// Pages queued since the last release.
    queued_pages: u64,
    /// When pages were last queued (`None`: nothing queued).
    last_queued: Option<Instant>,
    /// A release failed: the next try, unless more pages are queued first.
    retry_at: Option<Instant>,
    /// When the tracker last changed, while a compaction is due.
    changed_at: Option<Instant>,
    /// After a full batch's release: wake up this soon even with nothing queued.
    burst_until: Option<Instant>,
}

impl Schedule {
    /// `pages` were queued for a deferred discard at `now`.
    pub fn queued(&mut self, pages: u64, now: Instant) {
        if pages > 0 {
            self.queued_pages += pages;
            self.last_queued = Some(now);
            self.retry_at = None;
        }
    }

    /// The tracker changed at `now` (a request, a release).
    pub fn changed(&mut self, now: Instant) {
        self.changed_at = Some(now);
    }

    /// Everything queued was released at `now`.
    pub fn released(&mut self, now: Instant) {
        if self.last_queued.take().is_some() {
            self.changed_at = Some(now);
        }
        self.burst_until =
            (self.queued_pages >= RELEASE_BATCH_PAGES).then(|| now + RELEASE_IDLE_DELAY);
        self.queued_pages = 0;
        self.retry_at = None;
    }

    /// A release failed at `now`; what it could not do stays queued.
    pub fn release_failed(&mut self, now: Instant) {
        self.retry_at = Some(now + RELEASE_RETRY_DELAY);
    }

    /// The tracker was compacted.
    pub fn compacted(&mut self) {
        self.changed_at = None;
    }

    fn release_deadline(&self) -> Option<Instant> {
        let last = self.last_queued?;
        Some(match self.retry_at {
            Some(retry) => retry,
            None if self.queued_pages >= RELEASE_BATCH_PAGES => last,
            None => last + RELEASE_IDLE_DELAY,
        })
    }

    fn compact_deadline(&self) -> Option<Instant> {
        match self.last_queued {
            // The release comes first, and counts as a change.
            Some(_) => None,
            None => self.changed_at.map(|t| t + COMPACT_IDLE_DELAY),
        }
    }

    /// When the timer should next fire, if anything is pending.
    pub fn next_deadline(&self) -> Option<Instant> {
        [
            self.release_deadline(),
            self.compact_deadline(),
            self.burst_until,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// What is due at `now`; a passed burst wake-up is forgotten.
    pub fn due(&mut self, now: Instant) -> Due {
        if self.burst_until.is_some_and(|b| b <= now) {
            self.burst_until = None;
        }
        Due {
            release: self.release_deadline().is_some_and(|d| d <= now),
            compact: self.compact_deadline().is_some_and(|d| d <= now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn small_queue_waits_for_the_idle_delay_after_the_last_page() {
        let t0 = Instant::now();
        let mut s = Schedule::default();
        assert_eq!(s.next_deadline(), None, "nothing pending");
        s.queued(256, t0);
        s.queued(256, t0 + MS);
        assert_eq!(s.next_deadline(), Some(t0 + MS + RELEASE_IDLE_DELAY));
        assert!(
            !s.due(t0 + RELEASE_IDLE_DELAY).release,
            "queue not idle yet"
        );
        assert!(s.due(t0 + MS + RELEASE_IDLE_DELAY).release);
        assert!(
            !s.due(t0 + MS + RELEASE_IDLE_DELAY).compact,
            "release first"
        );
    }

    #[test]
    fn a_full_batch_is_due_at_once() {
        let t0 = Instant::now();
        let mut s = Schedule::default();
        s.queued(RELEASE_BATCH_PAGES - 1, t0);
        assert!(!s.due(t0).release);
        s.queued(1, t0 + MS);
        assert_eq!(s.next_deadline(), Some(t0 + MS));
        assert!(s.due(t0 + MS).release);
    }

    #[test]
    fn compaction_follows_quiet_after_the_release() {
        let t0 = Instant::now();
        let mut s = Schedule::default();
        s.queued(10, t0);
        let rel = t0 + RELEASE_IDLE_DELAY;
        s.released(rel);
        assert_eq!(s.next_deadline(), Some(rel + COMPACT_IDLE_DELAY));
        // A deflate half-way through restarts the wait.
        s.changed(rel + 500 * MS);
        assert!(!s.due(rel + COMPACT_IDLE_DELAY).compact);
        assert!(s.due(rel + 500 * MS + COMPACT_IDLE_DELAY).compact);
        s.compacted();
        assert_eq!(s.next_deadline(), None);
    }

    #[test]
    fn after_a_full_batch_the_timer_stays_armed_for_the_burst() {
        let t0 = Instant::now();
        let mut s = Schedule::default();
        s.queued(RELEASE_BATCH_PAGES, t0);
        s.released(t0);
        // Nothing queued, yet the next wake-up is the idle delay away, not the compaction.
        assert_eq!(s.next_deadline(), Some(t0 + RELEASE_IDLE_DELAY));
        // The burst goes on: pages queued 1 ms later need a later wake-up than the armed one.
        s.queued(256, t0 + MS);
        assert_eq!(s.next_deadline(), Some(t0 + RELEASE_IDLE_DELAY));
        assert_eq!(
            s.due(t0 + RELEASE_IDLE_DELAY),
            Due::default(),
            "not idle yet"
        );
        assert_eq!(s.next_deadline(), Some(t0 + MS + RELEASE_IDLE_DELAY));
        // A small release does not keep the timer armed.
        s.released(t0 + MS + RELEASE_IDLE_DELAY);
        assert_eq!(
            s.next_deadline(),
            Some(t0 + MS + RELEASE_IDLE_DELAY + COMPACT_IDLE_DELAY)
        );
    }

    #[test]
    fn a_failed_release_retries_later_or_on_new_pages() {
        let t0 = Instant::now();
        let mut s = Schedule::default();
        s.queued(RELEASE_BATCH_PAGES, t0);
        s.release_failed(t0);
        assert!(!s.due(t0 + MS).release, "no busy retry");
        assert_eq!(s.next_deadline(), Some(t0 + RELEASE_RETRY_DELAY));
        s.queued(1, t0 + 2 * MS);
        assert!(s.due(t0 + 2 * MS).release, "still a full batch: at once");
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new();
        let t = c.now();
        assert_eq!(c.now(), t);
        c.advance(RELEASE_IDLE_DELAY);
        assert_eq!(c.now(), t + RELEASE_IDLE_DELAY);
    }
}
