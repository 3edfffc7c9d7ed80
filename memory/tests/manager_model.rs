//! Property test of the manager on real mappings against a model of page states: random
//! offline/online/free-report/plug/unplug/flush/tick requests, with both discard policies. After every
//! request: the outcome, the stats and the offline runs match the model, and every page that was
//! online before and after the request still holds what was written to it (the host never
//! discarded an online page).
//!
//! Cases: 24 by default (`PROPTEST_CASES` for more).

mod common;

use common::*;
use std::sync::Arc;
use std::time::Duration;

use memory::{Backing, ManualClock, MemoryManager, Outcome, PageRange, Reason};
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};

// Boot RAM: pages 0..9216 (36 MiB: two whole tracker leaves, which `compact` may turn sparse,
// and part of a third), private anonymous (4 KiB or huge pages).
const BOOT: u64 = 9216;
const HOT_START: u64 = BOOT + 512; // a 2 MiB hole, then 8 MiB of hot-add memory on a memfd
const BLOCK: u64 = 512; // 2 MiB blocks
const HOT_END: u64 = HOT_START + 4 * BLOCK;
const SPACE: u64 = HOT_END + 256; // requests also name pages past the end

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Online,
    Ballooned,
    Unplugged,
}

#[derive(Debug, Clone)]
enum Req {
    /// Balloon inflate.
    Offline(Vec<(u64, u64)>),
    /// Balloon deflate.
    Online(Vec<(u64, u64)>),
    Free(Vec<(u64, u64)>),
    Plug(u64, u64),
    Unplug(u64, u64),
    /// `flush_discards`: every queued release at once.
    Flush,
    /// `compact`: leaves of few offline pages become sparse; nothing observable changes.
    Compact,
    /// Time passes (ms) and the manager's timer fires: deferred releases and compaction happen
    /// when due; nothing observable changes.
    Tick(u64),
}

fn ranges() -> impl Strategy<Value = Vec<(u64, u64)>> {
    prop::collection::vec((0..SPACE, 1u64..600), 1..4)
}

/// Many short runs (a fragmented guest's inflate): deferred flushes of them take the batched
/// paths (one tracker walk, `process_madvise`).
fn scattered() -> impl Strategy<Value = Vec<(u64, u64)>> {
    prop::collection::vec((0..SPACE, 1u64..3), 1..150)
}

fn req() -> impl Strategy<Value = Req> {
    let block_range = (0u64..6, 1u64..3, 0u64..2)
        .prop_map(|(b, n, skew)| (HOT_START + b * BLOCK - BLOCK + skew * 7, n * BLOCK));
    prop_oneof![
        4 => ranges().prop_map(Req::Offline),
        4 => ranges().prop_map(Req::Online),
        2 => scattered().prop_map(Req::Offline),
        // A few single pages: leaves that `compact` turns into sparse leaves.
        2 => prop::collection::vec((0..SPACE, 1u64..2), 1..12)
            .prop_map(Req::Offline),
        1 => scattered().prop_map(Req::Online),
        2 => ranges().prop_map(Req::Free),
        2 => block_range.clone().prop_map(|(a, n)| Req::Plug(a, n)),
        2 => block_range.prop_map(|(a, n)| Req::Unplug(a, n)),
        2 => Just(Req::Flush),
        2 => Just(Req::Compact),
        2 => prop_oneof![Just(1u64), Just(2), Just(1000), Just(1500)].prop_map(Req::Tick),
    ]
}

struct Model {
    st: Vec<Option<St>>, // None: not guest RAM
    plugged: [bool; 4],
}

impl Model {
    fn new() -> Model {
        let st = (0..SPACE)
            .map(|p| {
                if p < BOOT {
                    Some(St::Online)
                } else if (HOT_START..HOT_END).contains(&p) {
                    Some(St::Unplugged)
                } else {
                    None
                }
            })
            .collect();
        Model {
            st,
            plugged: [false; 4],
        }
    }
    fn hot(p: u64) -> bool {
        (HOT_START..HOT_END).contains(&p)
    }
    fn block(p: u64) -> usize {
        ((p - HOT_START) / BLOCK) as usize
    }
    fn pages(rs: &[(u64, u64)]) -> std::collections::BTreeSet<u64> {
        rs.iter().flat_map(|&(a, n)| a..a + n).collect()
    }
    fn apply(&mut self, r: &Req) -> Outcome {
        let mut o = Outcome::default();
        match r {
            Req::Offline(rs) => {
                for p in Self::pages(rs) {
                    match self.st.get(p as usize).copied().flatten() {
                        Some(St::Online) => {
                            o.changed += 1;
                            self.st[p as usize] = Some(St::Ballooned);
                        }
                        Some(St::Ballooned) => o.unchanged += 1,
                        None | Some(St::Unplugged) => o.refused += 1,
                    }
                }
            }
            Req::Online(rs) => {
                for p in Self::pages(rs) {
                    match self.st.get(p as usize).copied().flatten() {
                        Some(St::Ballooned) => {
                            o.changed += 1;
                            self.st[p as usize] = Some(St::Online);
                        }
                        Some(St::Online) => o.unchanged += 1,
                        None | Some(St::Unplugged) => o.refused += 1,
                    }
                }
            }
            Req::Free(rs) => {
                for p in Self::pages(rs) {
                    match self.st.get(p as usize).copied().flatten() {
                        None | Some(St::Unplugged) => o.refused += 1,
                        Some(St::Ballooned) => o.unchanged += 1,
                        Some(St::Online) => o.changed += 1,
                    }
                }
            }
            Req::Plug(a, n) | Req::Unplug(a, n) => {
                let plug = matches!(r, Req::Plug(..));
                for p in *a..a + n {
                    if !Self::hot(p) {
                        o.refused += 1;
                        continue;
                    }
                    let b = Self::block(p);
                    let (bs, be) = (
                        HOT_START + b as u64 * BLOCK,
                        HOT_START + (b as u64 + 1) * BLOCK,
                    );
                    if bs < *a || be > a + n {
                        o.refused += 1;
                    } else if self.plugged[b] == plug {
                        o.unchanged += 1;
                    } else {
                        o.changed += 1;
                        if p == be - 1 {
                            self.plugged[b] = plug;
                        }
                        self.st[p as usize] = Some(if plug { St::Online } else { St::Unplugged });
                    }
                }
            }
            Req::Flush | Req::Compact | Req::Tick(_) => {}
        }
        o
    }
    fn online(&self, p: u64) -> bool {
        self.st[p as usize] == Some(St::Online)
    }
}

// Long by design: one match arm per request kind, each checked against the model in place.
fn run(reqs: Vec<Req>, boot_backing: Backing) -> Result<(), TestCaseError> {
    let (mut m, _slots) = manager(&[
        boot(0, BOOT * 4096, boot_backing),
        hotplug(
            HOT_START * 4096,
            4 * BLOCK * 4096,
            Backing::SharedMemfd,
            BLOCK * 4096,
        ),
    ]);
    let clock = ManualClock::new();
    m.set_clock(Arc::new(clock.clone()));
    let mut model = Model::new();
    let mut stamp = 1u64;
    let mut written = vec![0u64; SPACE as usize];
    let mut write_all = |m: &MemoryManager, model: &Model, written: &mut Vec<u64>| {
        for p in 0..SPACE {
            if model.st[p as usize] == Some(St::Online) {
                stamp += 1;
                m.guest_memory()
                    .write_obj(stamp, GuestAddress(p * 4096))
                    .unwrap();
                written[p as usize] = stamp;
            }
        }
    };
    write_all(&m, &model, &mut written);
    for r in reqs {
        let before: Vec<bool> = (0..SPACE).map(|p| model.online(p)).collect();
        let want = model.apply(&r);
        let to_mm = |rs: &Vec<(u64, u64)>| -> Vec<PageRange> {
            rs.iter().map(|&(a, n)| PageRange::new(a, n)).collect()
        };
        let got = match &r {
            Req::Offline(rs) => m.offline(&m.page_ranges(&to_mm(rs))).unwrap(),
            Req::Online(rs) => m.online(&m.page_ranges(&to_mm(rs))).unwrap(),
            Req::Free(rs) => m.discard_free(&m.page_ranges(&to_mm(rs))).unwrap(),
            Req::Plug(a, n) => m.plug(PageRange::new(*a, *n)).unwrap(),
            Req::Unplug(a, n) => m.unplug(PageRange::new(*a, *n)).unwrap(),
            Req::Flush => {
                m.flush_discards().unwrap();
                Outcome::default()
            }
            Req::Tick(ms) => {
                clock.advance(Duration::from_millis(*ms));
                m.tick().unwrap();
                m.tracker().check_invariants().unwrap();
                Outcome::default()
            }
            Req::Compact => {
                m.compact();
                m.tracker().check_invariants().unwrap();
                Outcome::default()
            }
        };
        prop_assert_eq!(got, want, "{:?}", r);
        // Online before and after, and not reported free: contents intact.
        let freed = match &r {
            Req::Free(rs) => Model::pages(rs),
            _ => Default::default(),
        };
        for p in 0..SPACE {
            if before[p as usize] && model.online(p) && !freed.contains(&p) {
                let v: u64 = m.guest_memory().read_obj(GuestAddress(p * 4096)).unwrap();
                prop_assert_eq!(v, written[p as usize], "page 0x{:x} after {:?}", p, r);
            }
        }
        let count = |s: St| model.st.iter().filter(|x| **x == Some(s)).count() as u64 * 4096;
        let st = m.stats();
        prop_assert_eq!(st.ballooned_bytes, count(St::Ballooned));
        prop_assert_eq!(st.unplugged_bytes, count(St::Unplugged));
        prop_assert_eq!(st.online_bytes, count(St::Online));
        prop_assert_eq!(
            st.hotplug_plugged_bytes,
            model.plugged.iter().filter(|&&b| b).count() as u64 * BLOCK * 4096
        );
        let plugged: Vec<u64> = m
            .plugged_runs(PageRange::new(0, SPACE))
            .iter()
            .flat_map(|r| r.start.0..r.end())
            .collect();
        let want_plugged: Vec<u64> = (HOT_START..HOT_END)
            .filter(|&p| model.plugged[Model::block(p)])
            .collect();
        prop_assert_eq!(
            plugged,
            want_plugged,
            "plugged blocks derived from the tracker"
        );
        // Offline runs with their reasons.
        let mut want_runs: Vec<(PageRange, Reason)> = Vec::new();
        for p in 0..SPACE {
            let why = match model.st[p as usize] {
                Some(St::Ballooned) => Reason::Ballooned,
                Some(St::Unplugged) => Reason::Unplugged,
                _ => continue,
            };
            match want_runs.last_mut() {
                Some((r, w)) if *w == why && r.end() == p => r.count += 1,
                _ => want_runs.push((PageRange::new(p, 1), why)),
            }
        }
        prop_assert_eq!(m.offline_runs(None, None, usize::MAX), want_runs);
        write_all(&m, &model, &mut written);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(24)
    ))]

    #[test]
    fn manager_matches_page_state_model(reqs in prop::collection::vec(req(), 1..25)) {
        run(reqs, Backing::PrivateAnonymous)?;
    }

    /// The same on boot RAM backed by transparent huge pages: discards of parts of huge pages
    /// (which split them) and batched flushes never touch an online page either.
    #[test]
    fn manager_on_huge_pages_matches_page_state_model(
        reqs in prop::collection::vec(req(), 1..25)
    ) {
        run(reqs, Backing::PrivateAnonymousHuge)?;
    }
}
