//! Fake backends that record every call and panic if a device ever passes a range outside
//! guest RAM or in the wrong shape.

use std::collections::BTreeSet;
use std::sync::Mutex;

use virtio::GuestMemoryMmap;

use crate::backend::{BackendError, BalloonBackend, MemBackend, Outcome, PageRange, PageRanges};

/// One call a fake backend received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    /// Balloon inflate with its ranges.
    Inflate(Vec<PageRange>),
    /// Balloon deflate with its ranges.
    Deflate(Vec<PageRange>),
    /// Free page report with its ranges.
    ReportFree(Vec<PageRange>),
    /// Every ballooned page back (a device reset).
    DeflateAll,
    /// virtio-mem plug.
    Plug(PageRange),
    /// virtio-mem unplug.
    Unplug(PageRange),
}

fn check_shape(ram: &[PageRange], ranges: &[PageRange]) {
    for w in ranges.windows(2) {
        assert!(
            w[0].end() < w[1].start.0,
            "ranges not sorted/coalesced: {ranges:?}"
        );
    }
    for r in ranges {
        assert!(r.count > 0, "empty range passed: {ranges:?}");
        assert!(
            ram.iter()
                .any(|m| m.start.0 <= r.start.0 && r.end() <= m.end())
                || inside_union(ram, *r),
            "device passed {r} outside guest RAM {ram:?}"
        );
    }
}

fn inside_union(ram: &[PageRange], r: PageRange) -> bool {
    let mut cur = r.start.0;
    while cur < r.end() {
        match ram.iter().find(|m| m.contains(cur)) {
            Some(m) => cur = m.end(),
            None => return false,
        }
    }
    true
}

#[derive(Debug, Default)]
struct FakeBalloonState {
    ballooned: BTreeSet<u64>,
    reported: BTreeSet<u64>,
    calls: Vec<Call>,
    fail_next: bool,
}

/// A [`BalloonBackend`] that keeps ballooned pages in a set, records calls and panics when given
/// ranges outside guest RAM or not sorted and coalesced.
#[derive(Debug)]
pub struct FakeBalloonBackend {
    ram: Vec<PageRange>,
    state: Mutex<FakeBalloonState>,
}

impl FakeBalloonBackend {
    /// `ram`: the guest RAM the device may name.
    pub fn new(ram: Vec<PageRange>) -> Self {
        FakeBalloonBackend {
            ram,
            state: Mutex::default(),
        }
    }
    /// A fake over the RAM regions of `mem`.
    pub fn from_memory(mem: &GuestMemoryMmap) -> Self {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        Self::new(
            mem.iter()
                .map(|r| PageRange::new(r.start_addr().0 >> 12, r.len() >> 12))
                .collect(),
        )
    }
    fn state(&self) -> std::sync::MutexGuard<'_, FakeBalloonState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Ballooned PFNs, sorted.
    pub fn ballooned(&self) -> Vec<u64> {
        self.state().ballooned.iter().copied().collect()
    }
    /// PFNs reported free so far, sorted.
    pub fn reported(&self) -> Vec<u64> {
        self.state().reported.iter().copied().collect()
    }
    /// Every call received, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }
    /// Makes the next call fail as a host error would.
    pub fn fail_next(&self) {
        self.state().fail_next = true;
    }
    fn apply(
        &self,
        ranges: &PageRanges,
        call: fn(Vec<PageRange>) -> Call,
        f: impl Fn(&mut FakeBalloonState, u64) -> bool,
    ) -> Result<Outcome, BackendError> {
        check_shape(&self.ram, ranges.as_slice());
        let mut s = self.state();
        s.calls.push(call(ranges.as_slice().to_vec()));
        if std::mem::take(&mut s.fail_next) {
            return Err(BackendError::Manager("injected failure".into()));
        }
        let mut o = Outcome {
            refused: ranges.outside_ram(),
            ..Outcome::default()
        };
        for r in ranges.as_slice() {
            for p in r.start.0..r.end() {
                if f(&mut s, p) {
                    o.changed += 1;
                } else {
                    o.unchanged += 1;
                }
            }
        }
        Ok(o)
    }
}

impl BalloonBackend for FakeBalloonBackend {
    fn inflate(&self, ranges: &PageRanges) -> Result<Outcome, BackendError> {
        self.apply(ranges, Call::Inflate, |s, p| s.ballooned.insert(p))
    }
    fn deflate(&self, ranges: &PageRanges) -> Result<Outcome, BackendError> {
        self.apply(ranges, Call::Deflate, |s, p| s.ballooned.remove(&p))
    }
    fn report_free(&self, ranges: &PageRanges) -> Result<Outcome, BackendError> {
        self.apply(ranges, Call::ReportFree, |s, p| {
            !s.ballooned.contains(&p) && {
                s.reported.insert(p);
                true
            }
        })
    }
    fn deflate_all(&self) -> Result<Outcome, BackendError> {
        let mut s = self.state();
        s.calls.push(Call::DeflateAll);
        let n = s.ballooned.len() as u64;
        s.ballooned.clear();
        Ok(Outcome {
            changed: n,
            ..Outcome::default()
        })
    }
}

#[derive(Debug, Default)]
struct FakeMemState {
    plugged: BTreeSet<u64>,
    calls: Vec<Call>,
    fail_next: bool,
}

/// A [`MemBackend`] over a region that records calls, tracks plugged pages, and panics if a
/// device plugs what is plugged, unplugs what is not, or leaves the region.
#[derive(Debug)]
pub struct FakeMemBackend {
    region: PageRange,
    state: Mutex<FakeMemState>,
}

impl FakeMemBackend {
    /// A fake over hot-add region `region`, nothing plugged.
    pub fn new(region: PageRange) -> Self {
        FakeMemBackend {
            region,
            state: Mutex::default(),
        }
    }
    fn state(&self) -> std::sync::MutexGuard<'_, FakeMemState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// How many pages are plugged.
    pub fn plugged_pages(&self) -> u64 {
        self.state().plugged.len() as u64
    }
    /// Whether page `pfn` is plugged.
    pub fn is_plugged(&self, pfn: u64) -> bool {
        self.state().plugged.contains(&pfn)
    }
    /// Every call received, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }
    /// Makes the next plug or unplug fail as a host error would.
    pub fn fail_next(&self) {
        self.state().fail_next = true;
    }
    fn check(&self, range: PageRange) {
        assert!(range.count > 0, "empty range");
        assert!(
            self.region.start.0 <= range.start.0 && range.end() <= self.region.end(),
            "device passed {range} outside its region {}",
            self.region
        );
    }
}

impl MemBackend for FakeMemBackend {
    fn plug(&self, range: PageRange) -> Result<(), BackendError> {
        self.check(range);
        let mut s = self.state();
        s.calls.push(Call::Plug(range));
        if std::mem::take(&mut s.fail_next) {
            return Err(BackendError::Manager("injected failure".into()));
        }
        for p in range.start.0..range.end() {
            assert!(s.plugged.insert(p), "page {p:#x} plugged twice");
        }
        Ok(())
    }
    fn unplug(&self, range: PageRange) -> Result<(), BackendError> {
        self.check(range);
        let mut s = self.state();
        s.calls.push(Call::Unplug(range));
        if std::mem::take(&mut s.fail_next) {
            return Err(BackendError::Manager("injected failure".into()));
        }
        for p in range.start.0..range.end() {
            assert!(
                s.plugged.remove(&p),
                "page {p:#x} unplugged while not plugged"
            );
        }
        Ok(())
    }
    fn plugged_runs(&self, range: PageRange) -> Vec<PageRange> {
        let mut out: Vec<PageRange> = Vec::new();
        for &p in self.state().plugged.range(range.start.0..range.end()) {
            match out.last_mut() {
                Some(r) if r.end() == p => r.count += 1,
                _ => out.push(PageRange::new(p, 1)),
            }
        }
        out
    }
}
