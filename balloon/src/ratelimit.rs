//! Logging of guest mistakes: the first of each kind is logged, then at most one line per
//! interval saying how many were suppressed. A hostile guest cannot flood the host's log.

use std::time::{Duration, Instant};

/// How often a kind of guest mistake may be logged again.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, Default, Clone)]
pub struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    /// Records one occurrence. Returns `Some(suppressed since the last line)` if this one should be
    /// logged.
    pub fn hit(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < LOG_INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// One rate limiter per kind of mistake, indexed by the kind's number.
#[derive(Debug, Clone)]
pub struct FaultLog<const N: usize> {
    kinds: [RateLimitedLog; N],
    device: &'static str,
}

impl<const N: usize> FaultLog<N> {
    pub fn new(device: &'static str) -> Self {
        Self {
            kinds: std::array::from_fn(|_| RateLimitedLog::default()),
            device,
        }
    }

    /// Logs `fault` (kind `kind`) unless its kind was logged recently.
    pub fn note(&mut self, kind: usize, fault: &dyn std::fmt::Display) {
        if let Some(slot) = self.kinds.get_mut(kind) {
            if let Some(suppressed) = slot.hit() {
                if suppressed > 0 {
                    log::warn!(
                        "{}: guest error: {fault} ({suppressed} similar suppressed)",
                        self.device
                    );
                } else {
                    log::warn!("{}: guest error: {fault}", self.device);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_logged_then_suppressed() {
        let mut l = RateLimitedLog::default();
        assert_eq!(l.hit(), Some(0));
        assert_eq!(l.hit(), None);
        assert_eq!(l.hit(), None);
        l.last = Some(Instant::now() - LOG_INTERVAL);
        assert_eq!(l.hit(), Some(2));
    }
}
