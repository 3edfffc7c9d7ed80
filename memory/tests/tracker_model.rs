//! Property tests: random sequences of every tracker operation against a `BTreeMap<u64, Marks>`
//! model, comparing every observable result (return values, lookups, counts, runs, neighbours).
//!
//! Cases: 96 by default; set `PROPTEST_CASES` for more (e.g. `PROPTEST_CASES=5000`).

use std::collections::BTreeMap;

use memory::tracker::{Mark, Marks, Tracker, MAX_INDEX};
use proptest::prelude::*;

const MARKS: [Mark; 3] = [Mark::Ballooned, Mark::Unplugged, Mark::Discarded];

#[derive(Debug, Clone)]
enum Op {
    Insert(u64, u64, u8),
    Remove(u64, u64),
    SetMark(u64, u64, usize),
    ClearMark(u64, u64, usize),
    Get(u64),
    Next(u64, Option<usize>),
    Prev(u64, Option<usize>),
    Runs(Option<usize>, Option<(u64, u64)>),
    MarkedRuns(Option<(u64, u64)>),
    ContainsRange(u64, u64),
    /// Single-page inserts at `a`, `a + stride`, ... (`n` of them, through `insert` and its
    /// fast paths): leaves filled page by page, to hundreds of pages, with mixed marks.
    Sprinkle(u64, u64, u64, u8),
    /// Single-page removals at `a`, `a + stride`, ...: leaves emptied page by page.
    Pluck(u64, u64, u64),
    /// Runs of `len` pages every `len + gap` pages (`n` of them) inserted or (`None`) removed:
    /// the balloon's shape, short ranges creating, filling, emptying and dropping leaves,
    /// some across a leaf boundary; with `true`, inserted runs are then removed, last first.
    Stripes(u64, u64, u64, u64, Option<u8>, bool),
    /// `compact` over a range (leaves of few pages become sparse; nothing observable changes),
    /// then single pages at `a`, `a + stride`, ... (`n` of them, with marks `m`), so sparse
    /// leaves grow, fill and turn back into bitmaps.
    Compact(u64, u64, u64, u64, u8),
}

/// Page numbers clustered around the interesting places: 0, leaf and node boundaries at every
/// level, and the top of the trackable range.
fn index() -> impl Strategy<Value = u64> {
    let anchors = prop_oneof![
        Just(0u64),
        Just(1u64 << 12),
        Just(3u64 << 12),
        Just(1u64 << 18),
        Just(5u64 << 18),
        Just(1u64 << 24),
        Just(1u64 << 30),
        Just(1u64 << 42),
        Just(1u64 << 48),
        Just(MAX_INDEX - 6000),
    ];
    (anchors, -3000i64..9000).prop_map(|(a, d)| (a as i64 + d).clamp(0, MAX_INDEX as i64) as u64)
}

fn count() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => Just(1u64),
        4 => 1u64..4,
        4 => 1u64..200,
        2 => 1u64..9000,
        1 => Just(4096u64),
        1 => Just(8192u64),
    ]
}

fn stride() -> impl Strategy<Value = u64> {
    // Up to 16: leaves filled page by page; beyond: a few pages in each of many leaves
    // (sparse leaves created, grown, given other marks, emptied).
    prop_oneof![Just(1u64), 1u64..4, 1u64..16, 17u64..1500]
}

fn window() -> impl Strategy<Value = Option<(u64, u64)>> {
    prop_oneof![
        Just(None),
        (index(), 0u64..20000).prop_map(|(a, n)| Some((a, a + n))),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let filt = prop_oneof![Just(None), (0usize..3).prop_map(Some)];
    prop_oneof![
        6 => (index(), count(), 0u8..8).prop_map(|(a, n, m)| Op::Insert(a, n, m)),
        // A whole leaf (over a sparse leaf of the same marks: a full slot).
        1 => (index(), 0u8..3).prop_map(|(a, m)| Op::Insert(a & !4095, 4096, m)),
        4 => (index(), count()).prop_map(|(a, n)| Op::Remove(a, n)),
        2 => (index(), count(), 0usize..3).prop_map(|(a, n, k)| Op::SetMark(a, n, k)),
        2 => (index(), count(), 0usize..3).prop_map(|(a, n, k)| Op::ClearMark(a, n, k)),
        2 => index().prop_map(Op::Get),
        2 => (index(), filt.clone()).prop_map(|(a, f)| Op::Next(a, f)),
        2 => (index(), filt.clone()).prop_map(|(a, f)| Op::Prev(a, f)),
        1 => (filt, window()).prop_map(|(f, w)| Op::Runs(f, w)),
        1 => window().prop_map(Op::MarkedRuns),
        1 => (index(), count()).prop_map(|(a, n)| Op::ContainsRange(a, n)),
        2 => (index(), 1u64..330, stride(), 0u8..3)
            .prop_map(|(a, n, s, m)| Op::Sprinkle(a, n, s, m)),
        2 => (index(), 1u64..330, stride()).prop_map(|(a, n, s)| Op::Pluck(a, n, s)),
        3 => (
            (index(), 1u64..700, 0u64..300, 1u64..24),
            prop_oneof![Just(None), (0u8..3).prop_map(Some)],
            any::<bool>()
        )
            .prop_map(|((a, len, gap, n), m, undo)| Op::Stripes(a, len, gap, n, m, undo)),
        3 => (
            prop_oneof![(index(), 1u64..40000), Just((0u64, u64::MAX))],
            (1u64..300, 0u64..90, 0u8..3)
        )
            .prop_map(|((a, n), (s, k, m))| Op::Compact(a, n, s, k, m)),
    ]
}

fn clip(start: u64, n: u64) -> u64 {
    n.min(MAX_INDEX + 1 - start)
}

fn model_runs(
    m: &BTreeMap<u64, Marks>,
    filter: Option<usize>,
    w: Option<(u64, u64)>,
    by_marks: bool,
) -> Vec<(u64, u64, Marks)> {
    let (lo, hi) = w.unwrap_or((0, u64::MAX));
    let mut out: Vec<(u64, u64, Marks)> = Vec::new();
    for (&p, &mk) in m.range(lo..hi) {
        if let Some(k) = filter {
            if !mk.has(k) {
                continue;
            }
        }
        if let Some(last) = out.last_mut() {
            if last.0 + last.1 == p && (!by_marks || last.2 == mk) {
                last.1 += 1;
                continue;
            }
        }
        out.push((p, 1, mk));
    }
    out
}

fn check_counts(t: &Tracker, m: &BTreeMap<u64, Marks>) -> Result<(), TestCaseError> {
    if let Err(e) = t.check_invariants() {
        return Err(TestCaseError::fail(e));
    }
    prop_assert_eq!(t.len(), m.len() as u64);
    for (k, mark) in MARKS.iter().enumerate() {
        let want = m.values().filter(|v| v.has(k)).count() as u64;
        prop_assert_eq!(t.count_marked(*mark), want, "count of {:?}", mark);
    }
    Ok(())
}

// Long by design: one match arm per tracker operation, each checked against the model in place.
fn run_ops(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut t = Tracker::new();
    let mut m: BTreeMap<u64, Marks> = BTreeMap::new();
    for op in ops {
        match op {
            Op::Insert(a, n, mk) => {
                let n = clip(a, n);
                // Single pages go through the one-page entry points (and their fast paths).
                let got = if n == 1 {
                    u64::from(t.insert(a, Marks::from_bits_truncate(mk)).unwrap())
                } else {
                    t.insert_range(a, n, Marks::from_bits_truncate(mk)).unwrap()
                };
                let mut want = 0;
                for p in a..a + n {
                    if let std::collections::btree_map::Entry::Vacant(e) = m.entry(p) {
                        e.insert(Marks::from_bits_truncate(mk));
                        want += 1;
                    }
                }
                prop_assert_eq!(got, want, "insert 0x{:x}+{}", a, n);
            }
            Op::Remove(a, n) => {
                let n = clip(a, n);
                let got = if n == 1 {
                    u64::from(t.remove(a).unwrap())
                } else {
                    t.remove_range(a, n).unwrap()
                };
                let keys: Vec<u64> = m.range(a..a + n).map(|(&k, _)| k).collect();
                for k in &keys {
                    m.remove(k);
                }
                prop_assert_eq!(got, keys.len() as u64, "remove 0x{:x}+{}", a, n);
            }
            Op::SetMark(a, n, k) | Op::ClearMark(a, n, k) => {
                let set = matches!(op, Op::SetMark(..));
                let n = clip(a, n);
                let got = if set {
                    t.set_mark(a, n, MARKS[k]).unwrap()
                } else {
                    t.clear_mark(a, n, MARKS[k]).unwrap()
                };
                let mut want = 0;
                for (_, v) in m.range_mut(a..a + n) {
                    if v.has(k) != set {
                        *v = if set { v.with(k) } else { v.without(k) };
                        want += 1;
                    }
                }
                prop_assert_eq!(got, want, "{:?}", op);
            }
            Op::Get(a) => {
                prop_assert_eq!(t.get(a), m.get(&a).copied());
                prop_assert_eq!(t.contains(a), m.contains_key(&a));
                // The cursor, on pages around `a` in both directions.
                let mut c = t.lookup_cursor();
                for p in (a.saturating_sub(70)..a.saturating_add(5000))
                    .step_by(37)
                    .chain([a, 0])
                {
                    prop_assert_eq!(c.contains(p), m.contains_key(&p), "cursor 0x{:x}", p);
                    prop_assert_eq!(t.contains(p), m.contains_key(&p), "contains 0x{:x}", p);
                }
            }
            Op::Next(a, f) => {
                let want = m
                    .range(a..)
                    .find(|(_, v)| f.is_none_or(|k| v.has(k)))
                    .map(|(&k, _)| k);
                prop_assert_eq!(t.next(a, f.map(|k| MARKS[k])), want, "next 0x{:x}", a);
            }
            Op::Prev(a, f) => {
                let want = m
                    .range(..=a)
                    .rev()
                    .find(|(_, v)| f.is_none_or(|k| v.has(k)))
                    .map(|(&k, _)| k);
                prop_assert_eq!(t.prev(a, f.map(|k| MARKS[k])), want, "prev 0x{:x}", a);
            }
            Op::Runs(f, w) => {
                let got: Vec<(u64, u64)> = t
                    .runs(f.map(|k| MARKS[k]), w)
                    .map(|r| (r.start, r.len))
                    .collect();
                let want: Vec<(u64, u64)> = model_runs(&m, f, w, false)
                    .into_iter()
                    .map(|r| (r.0, r.1))
                    .collect();
                prop_assert_eq!(&got, &want);
                let mut each = Vec::new();
                t.for_each_run(f.map(|k| MARKS[k]), w, |a, n| each.push((a, n)));
                prop_assert_eq!(each, want, "for_each_run");
            }
            Op::MarkedRuns(w) => {
                let got: Vec<(u64, u64, Marks)> = t
                    .marked_runs(w)
                    .map(|c| (c.start, c.len, c.marks))
                    .collect();
                prop_assert_eq!(got, model_runs(&m, None, w, true));
            }
            Op::Compact(a, n, stride, k, mk) => {
                let before = t.heap_bytes();
                let turned = t.compact(a, n);
                prop_assert!(
                    turned == 0 || t.heap_bytes() < before,
                    "compact grew the tree"
                );
                check_counts(&t, &m)?;
                let a = a.min(MAX_INDEX);
                for p in (0..k).map(|j| a + j * stride).filter(|&p| p <= MAX_INDEX) {
                    let want = !m.contains_key(&p);
                    if want {
                        m.insert(p, Marks::from_bits_truncate(mk));
                    }
                    prop_assert_eq!(
                        t.insert(p, Marks::from_bits_truncate(mk)).unwrap(),
                        want,
                        "insert 0x{:x}",
                        p
                    );
                }
            }
            Op::Sprinkle(a, n, stride, mk) => {
                for p in (0..n).map(|j| a + j * stride).filter(|&p| p <= MAX_INDEX) {
                    let want = !m.contains_key(&p);
                    if want {
                        m.insert(p, Marks::from_bits_truncate(mk));
                    }
                    prop_assert_eq!(
                        t.insert(p, Marks::from_bits_truncate(mk)).unwrap(),
                        want,
                        "insert 0x{:x}",
                        p
                    );
                }
            }
            Op::Pluck(a, n, stride) => {
                for p in (0..n).map(|j| a + j * stride).filter(|&p| p <= MAX_INDEX) {
                    let want = m.remove(&p).is_some();
                    prop_assert_eq!(t.remove(p).unwrap(), want, "remove 0x{:x}", p);
                }
            }
            Op::Stripes(a, len, gap, n, mk, undo) => {
                let stripes: Vec<(u64, u64)> = (0..n)
                    .map(|j| a + j * (len + gap))
                    .filter(|&s| s <= MAX_INDEX)
                    .map(|s| (s, clip(s, len)))
                    .collect();
                let undo = if mk.is_some() && undo {
                    stripes.len()
                } else {
                    0
                };
                let steps = stripes.iter().map(|&s| (s, mk));
                let back = stripes.iter().rev().take(undo).map(|&s| (s, None));
                for ((s, len), mk) in steps.chain(back) {
                    let (got, want) = if let Some(mk) = mk {
                        let mut want = 0;
                        for p in s..s + len {
                            if let std::collections::btree_map::Entry::Vacant(e) = m.entry(p) {
                                e.insert(Marks::from_bits_truncate(mk));
                                want += 1;
                            }
                        }
                        (
                            t.insert_range(s, len, Marks::from_bits_truncate(mk))
                                .unwrap(),
                            want,
                        )
                    } else {
                        let keys: Vec<u64> = m.range(s..s + len).map(|(&k, _)| k).collect();
                        for k in &keys {
                            m.remove(k);
                        }
                        (t.remove_range(s, len).unwrap(), keys.len() as u64)
                    };
                    prop_assert_eq!(got, want, "stripe 0x{:x}+{} {:?}", s, len, mk);
                    check_counts(&t, &m)?;
                }
            }
            Op::ContainsRange(a, n) => {
                let n = clip(a, n);
                let want = (a..a + n).all(|p| m.contains_key(&p));
                prop_assert_eq!(t.contains_range(a, n), want);
            }
        }
        check_counts(&t, &m)?;
    }
    // Everything, at the end: all runs by marks, and emptying the tree frees all memory.
    let got: Vec<(u64, u64, Marks)> = t
        .marked_runs(None)
        .map(|c| (c.start, c.len, c.marks))
        .collect();
    prop_assert_eq!(got, model_runs(&m, None, None, true));
    let removed = t.remove_range(0, MAX_INDEX + 1).unwrap();
    prop_assert_eq!(removed, m.len() as u64);
    prop_assert_eq!(t.heap_bytes(), 0);
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(96)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn tracker_matches_btreemap_model(ops in prop::collection::vec(op(), 1..60)) {
        run_ops(ops)?;
    }
}
