//! Demand traces: what each synthetic guest's programs ask for, second by second, from a fixed
//! seed so every run of the benchmark replays the same demands.

/// A small, well-known generator (splitmix64), enough for reproducible traces; not for secrets.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The kinds of demand the issue names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A guest that does almost nothing: a small working set, a trickle of log files.
    Idle,
    /// A service with a fixed working set that wobbles a little.
    Steady,
    /// A small base with batch jobs that allocate 0.5-1.2 GiB at 100 MiB/s, hold it for
    /// 1-5 minutes and free it (one every 10 minutes on average).
    Bursty,
    /// A working set that grows without end (a leak), 0.2-0.6 MiB/s.
    Leaky,
    /// A file server: a modest working set and files read at 20 MiB/s, so the page cache fills
    /// whatever memory is free; a part of the cache is hot (re-read).
    CacheHeavy,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Idle,
        Kind::Steady,
        Kind::Bursty,
        Kind::Leaky,
        Kind::CacheHeavy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Idle => "idle",
            Kind::Steady => "steady",
            Kind::Bursty => "bursty",
            Kind::Leaky => "leaky",
            Kind::CacheHeavy => "cache-heavy",
        }
    }
}

/// What a guest asks for in one second.
#[derive(Debug, Clone, Copy)]
pub struct Demand {
    /// Non-reclaimable memory its programs want (anonymous memory), MiB.
    pub anon: f64,
    /// Page cache it re-reads (evicting it costs major faults), MiB.
    pub hot_cache: f64,
    /// New file data read per second (grows the page cache into free memory), MiB/s.
    pub cache_rate: f64,
}

/// One guest's trace generator.
pub struct Trace {
    kind: Kind,
    rng: Rng,
    base: f64,
    hot: f64,
    leak: f64,
    /// Bursty: the current job's size, and seconds left ramping up / holding.
    burst: f64,
    burst_hold: f64,
    level: f64,
}

impl Trace {
    pub fn new(kind: Kind, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let (base, hot) = match kind {
            Kind::Idle => (rng.range(100.0, 200.0), rng.range(10.0, 30.0)),
            Kind::Steady => (rng.range(400.0, 900.0), rng.range(100.0, 200.0)),
            Kind::Bursty => (rng.range(200.0, 400.0), rng.range(30.0, 80.0)),
            Kind::Leaky => (rng.range(300.0, 500.0), rng.range(30.0, 80.0)),
            Kind::CacheHeavy => (rng.range(300.0, 500.0), rng.range(200.0, 400.0)),
        };
        let leak = rng.range(0.2, 0.6);
        Trace {
            kind,
            rng,
            base,
            hot,
            leak,
            burst: 0.0,
            burst_hold: 0.0,
            level: 0.0,
        }
    }

    /// The demand at second `t` (called once per second, in order).
    pub fn next(&mut self, t: f64) -> Demand {
        let wobble = |rng: &mut Rng, base: f64, pct: f64| base * (1.0 + rng.range(-pct, pct));
        let (anon, cache_rate) = match self.kind {
            Kind::Idle => (wobble(&mut self.rng, self.base, 0.02), 0.05),
            Kind::Steady => {
                if (t as u64).is_multiple_of(60) {
                    self.level = wobble(&mut self.rng, self.base, 0.05);
                }
                (self.level, 0.5)
            }
            Kind::Bursty => {
                if self.burst_hold > 0.0 {
                    self.burst_hold -= 1.0;
                } else if self.burst > 0.0 {
                    self.burst = 0.0;
                } else if self.rng.range(0.0, 600.0) < 1.0 {
                    self.burst = self.rng.range(500.0, 1200.0);
                    self.burst_hold = self.rng.range(60.0, 300.0);
                }
                (self.base + self.burst, 0.2)
            }
            Kind::Leaky => (self.base + self.leak * t, 0.2),
            Kind::CacheHeavy => (wobble(&mut self.rng, self.base, 0.03), 20.0),
        };
        Demand {
            anon,
            hot_cache: self.hot,
            cache_rate,
        }
    }
}
