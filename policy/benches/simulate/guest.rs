//! The synthetic guest: a Linux-like memory model honest enough for the policy's choices to
//! matter. All sizes MiB, one step per simulated second.
//!
//! The guest's memory (`size`, what it can use) is kernel + anonymous + page cache + free. The
//! host holds (`resident`) what the guest touched and has not given back: free pages stay
//! resident after a program frees them until free page reporting returns them; ballooned pages
//! are returned at once; pages added by deflate or virtio-mem cost nothing until touched.

use policy::{GuestStats, VmLimits};

use crate::trace::Demand;

/// The guest kernel's own memory (code, struct pages, slabs): never reclaimable.
pub const KERNEL_MIB: f64 = 64.0;
/// Deflating the balloon or plugging virtio-mem memory, MiB/s (deflate is cheap: no zeroing).
pub const GROW_RATE: f64 = 1024.0;
/// Inflating the balloon, MiB/s: the guest allocates and zeroes each page, 256 per request.
pub const INFLATE_RATE: f64 = 128.0;
/// How fast programs allocate and touch memory, MiB/s.
pub const ALLOC_RATE: f64 = 100.0;
/// Deflate-on-OOM: the guest takes balloon pages back by itself, 1 MiB per OOM notification.
pub const DOOM_RATE: f64 = 256.0;
/// Free page reporting returns free, resident memory at this rate, MiB/s (measured in the
/// nested host: 93% of 600 MiB in 8.4 s).
pub const FPR_RATE: f64 = 70.0;
/// Re-reading evicted hot cache: refill rate, MiB/s (each MiB is 256 major faults).
pub const REFAULT_RATE: f64 = 20.0;
/// The guest reports statistics this often, seconds.
pub const STATS_PERIOD: u64 = 2;

pub struct Guest {
    pub limits: VmLimits,
    /// Has a balloon and virtio-mem (and so free page reporting); static guests have neither.
    managed: bool,
    pub size: f64,
    pub target: u64,
    anon: f64,
    cache: f64,
    /// Free pages still backed by host memory.
    free_resident: f64,
    major_faults: u64,
    oom_kill: u64,
    alloc_stall: u64,
    pub doom_events: u64,
    /// The latest statistics report and the second it was made.
    pub report: GuestStats,
    pub report_at: u64,
    unmet: bool,
    /// Episodes of demand above what the guest could use (OOM risk, or a stall).
    pub oom_risk_events: u64,
    /// Seconds in which the working set (programs, kernel, hot cache) did not fit, or programs
    /// waited for memory.
    pub pressure_seconds: u64,
}

impl Guest {
    pub fn new(limits: VmLimits, managed: bool, first: &Demand) -> Self {
        let size = limits.boot_mib as f64;
        let anon = first.anon.min(size - KERNEL_MIB);
        Guest {
            limits,
            managed,
            size,
            target: limits.boot_mib,
            anon,
            cache: 0.0,
            free_resident: 0.0,
            major_faults: 0,
            oom_kill: 0,
            alloc_stall: 0,
            doom_events: 0,
            report: GuestStats::default(),
            report_at: 0,
            unmet: false,
            oom_risk_events: 0,
            pressure_seconds: 0,
        }
    }

    fn free(&self) -> f64 {
        (self.size - KERNEL_MIB - self.anon - self.cache).max(0.0)
    }

    /// Host memory this guest holds, MiB.
    pub fn resident(&self) -> f64 {
        KERNEL_MIB + self.anon + self.cache + self.free_resident
    }

    /// Takes `mib` of free memory for new use; the part that was not resident becomes resident.
    fn touch_free(&mut self, mib: f64) {
        // Recently freed (resident) pages are reused first.
        let reused = mib.min(self.free_resident);
        self.free_resident -= reused;
    }

    /// One simulated second at time `t`.
    pub fn step(&mut self, t: u64, demand: &Demand) {
        self.move_toward_target();
        self.run_programs(demand);
        // Page cache: new file data fills free memory; evicted hot cache is read back.
        let refill = if self.cache < demand.hot_cache {
            REFAULT_RATE.min(demand.hot_cache - self.cache)
        } else {
            0.0
        };
        let grow = (demand.cache_rate + refill).min(self.free());
        self.touch_free(grow);
        self.cache += grow;
        self.major_faults += (refill.min(grow) * 256.0) as u64;
        if self.managed {
            self.free_resident -= FPR_RATE.min(self.free_resident);
        }
        self.free_resident = self.free_resident.min(self.free());
        if self.unmet || KERNEL_MIB + self.anon + demand.hot_cache > self.size + 0.5 {
            self.pressure_seconds += 1;
            self.alloc_stall += 1;
        }
        if t.is_multiple_of(STATS_PERIOD) {
            self.report = self.stats();
            self.report_at = t;
        }
    }

    /// The balloon and virtio-mem move the guest's size toward the target at finite speed.
    fn move_toward_target(&mut self) {
        if !self.managed {
            return;
        }
        let target = self.target as f64;
        if target > self.size {
            self.size = (self.size + GROW_RATE).min(target);
        } else if target < self.size {
            // The balloon takes free pages, then reclaims cache; never programs' memory.
            let want = (self.size - target).min(INFLATE_RATE);
            let from_free = want.min(self.free());
            let resident_part = if self.free() > 0.0 {
                from_free * self.free_resident / self.free()
            } else {
                0.0
            };
            self.free_resident -= resident_part;
            let from_cache = (want - from_free).min(self.cache);
            self.cache -= from_cache;
            self.size -= from_free + from_cache;
        }
    }

    /// Programs allocate toward their demand (evicting cache, then deflating on OOM) or free.
    fn run_programs(&mut self, demand: &Demand) {
        if demand.anon < self.anon {
            self.free_resident += self.anon - demand.anon;
            self.anon = demand.anon;
        }
        let want = (demand.anon - self.anon).min(ALLOC_RATE);
        if want > self.free() {
            let evict = (want - self.free()).min(self.cache);
            self.cache -= evict;
        }
        let short = want - self.free();
        if short > 0.5 && self.managed && self.size < self.limits.boot_mib as f64 {
            let taken = short
                .min(DOOM_RATE)
                .min(self.limits.boot_mib as f64 - self.size);
            self.size += taken;
            self.doom_events += taken.ceil() as u64;
        }
        let got = want.min(self.free());
        self.touch_free(got);
        self.anon += got;
        // Programs waited for memory this second: the guest would OOM-kill, or stall until a
        // balloon deflates (a failure just the same).
        let unmet = got + 0.5 < want;
        if unmet && !self.unmet {
            self.oom_risk_events += 1;
            if self.size >= self.limits.boot_mib as f64 {
                self.oom_kill += 1;
            }
        }
        self.unmet = unmet;
    }

    /// The guest's state and this second's demand, for `SIM_PRESSURE`.
    pub fn describe(&self, d: &Demand) -> String {
        format!(
            "size={:.0} target={} anon={:.0} want={:.0} cache={:.0} hot={:.0} unmet={} report_at={}",
            self.size, self.target, self.anon, d.anon, self.cache, d.hot_cache, self.unmet, self.report_at
        )
    }

    fn stats(&self) -> GuestStats {
        const MIB: f64 = (1 << 20) as f64;
        GuestStats {
            available_memory: Some(((self.free() + self.cache) * MIB) as u64),
            free_memory: Some((self.free() * MIB) as u64),
            disk_caches: Some((self.cache * MIB) as u64),
            // The simulated guest's total is its size: its balloon leaves the total.
            total_memory: Some((self.size * MIB) as u64),
            ballooned_in_total: Some(0),
            major_faults: Some(self.major_faults),
            swap_in: Some(0),
            oom_kill: Some(self.oom_kill),
            alloc_stall: Some(self.alloc_stall),
            ..GuestStats::default()
        }
    }
}
