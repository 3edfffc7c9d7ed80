//! The tracker under a failing allocator (deterministic, like xarray's test harness): every
//! allocation an operation makes is made to fail in turn; each failure must leave the tree exactly
//! as it was, and the retry must succeed. The same counting allocator checks that `heap_bytes()` is
//! exact.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use memory::tracker::{Mark, Marks, Tracker, TrackerError, MAX_INDEX};

struct Failing;

thread_local! {
    /// Allocations still allowed on this thread before they start failing (`None`: unlimited).
    static BUDGET: Cell<Option<usize>> = const { Cell::new(None) };
    /// Bytes currently allocated by this thread (through this allocator).
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

fn live() -> isize {
    LIVE.with(|l| l.get())
}

// SAFETY: forwards to the system allocator; the bookkeeping only touches const-initialised
// thread-locals (no allocation), via `try_with` so a thread being torn down is not a problem.
unsafe impl GlobalAlloc for Failing {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let allowed = BUDGET
            .try_with(|b| match b.get() {
                None => true,
                Some(0) => false,
                Some(n) => {
                    b.set(Some(n - 1));
                    true
                }
            })
            .unwrap_or(true);
        if !allowed {
            return std::ptr::null_mut();
        }
        // SAFETY: our caller upholds `GlobalAlloc::alloc`'s contract for `layout` (non-zero
        // size), which is exactly what `System.alloc` requires.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let _ = LIVE.try_with(|l| l.set(l.get() + layout.size() as isize));
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = LIVE.try_with(|l| l.set(l.get() - layout.size() as isize));
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Failing = Failing;

/// Runs `f` with only `n` allocations allowed on this thread.
fn with_budget<T>(n: usize, f: impl FnOnce() -> T) -> T {
    BUDGET.with(|b| b.set(Some(n)));
    let r = f();
    BUDGET.with(|b| b.set(None));
    r
}

type Snapshot = (u64, [u64; 3], Vec<(u64, u64, Marks)>);

fn snapshot(t: &Tracker) -> Snapshot {
    (
        t.len(),
        [
            t.count_marked(Mark::Ballooned),
            t.count_marked(Mark::Unplugged),
            t.count_marked(Mark::Discarded),
        ],
        t.marked_runs(None)
            .map(|c| (c.start, c.len, c.marks))
            .collect(),
    )
}

const BAL: Marks = Marks::from_bits_truncate(1 << Mark::Ballooned as u8);
const UNP: Marks = Marks::from_bits_truncate(1 << Mark::Unplugged as u8);

/// A tree with every kind of slot: full multi-index entries at several levels, uniform and mixed
/// leaves, and pages near the top of the index space.
fn populated() -> Tracker {
    let mut t = Tracker::new();
    t.insert_range(0, 1 << 18, UNP).unwrap(); // a full 1 GiB slot
    t.insert_range(1 << 24, 1 << 24, UNP).unwrap(); // a full 64 GiB slot
    for p in (300_000..340_000).step_by(7) {
        t.insert(p, BAL).unwrap();
    }
    t.insert_range(400_000, 5000, BAL).unwrap();
    t.insert_range(402_000, 10, UNP).unwrap();
    t.insert_range(4096 * 100, 4096 * 2, BAL).unwrap(); // two full leaf slots under a node
    t.set_mark(400_100, 50, Mark::Discarded).unwrap();
    t.insert(MAX_INDEX, BAL).unwrap();
    // Sparse leaves (made by `compact`): one full at two chunks (31 pages), one at the most it
    // holds (63), one of 3 pages.
    for k in 0..31 {
        t.insert(SPARSE_31 + 13 * k, BAL).unwrap();
    }
    for k in 0..63 {
        t.insert(SPARSE_63 + 31 * k, BAL).unwrap();
    }
    for k in 0..3 {
        t.insert(SPARSE_3 + 100 * k, BAL).unwrap();
    }
    assert_eq!(t.compact(SPARSE_31, 3 * 4096), 3);
    t
}

const SPARSE_31: u64 = 4096 * 110;
const SPARSE_63: u64 = 4096 * 111;
const SPARSE_3: u64 = 4096 * 112;

type Operation = fn(&mut Tracker) -> Result<u64, TrackerError>;

/// Every operation that can allocate, on the populated tree.
fn operations() -> Vec<(&'static str, Operation)> {
    vec![
        ("insert one page in a new leaf", |t| {
            t.insert_range(1 << 40, 1, BAL)
        }),
        ("insert a run into a missing leaf under a node", |t| {
            t.insert_range(350_000, 3, BAL)
        }),
        ("insert one page, other marks, into a uniform leaf", |t| {
            t.insert_range(300_001, 1, UNP)
        }),
        ("insert a run across many leaves with other marks", |t| {
            t.insert_range(290_000, 60_000, UNP)
        }),
        ("insert growing the tree from the middle", |t| {
            t.insert_range((1 << 44) - 3, 9000, BAL)
        }),
        ("remove one page from a 64 GiB entry", |t| {
            t.remove_range((1 << 24) + 123_456, 1)
        }),
        ("remove a run from a full leaf under a node", |t| {
            t.remove_range(4096 * 100 + 7, 512)
        }),
        ("remove a run from inside a 1 GiB entry", |t| {
            t.remove_range(5000, 3)
        }),
        ("set a mark on part of a 1 GiB entry", |t| {
            t.set_mark(70_000, 100, Mark::Ballooned)
        }),
        ("clear a mark on part of a 64 GiB entry", |t| {
            t.clear_mark((1 << 24) + 9, 5, Mark::Unplugged)
        }),
        ("set a mark on part of a uniform leaf", |t| {
            t.set_mark(300_007, 1, Mark::Discarded)
        }),
        ("insert one page into a sparse leaf that must grow", |t| {
            t.insert(SPARSE_31 + 1, BAL).map(u64::from)
        }),
        ("insert a run into a sparse leaf that must grow", |t| {
            t.insert_range(SPARSE_31 + 2, 5, BAL)
        }),
        ("insert one page into a sparse leaf at its largest", |t| {
            t.insert(SPARSE_63 + 1, BAL).map(u64::from)
        }),
        ("insert a run past a sparse leaf's largest", |t| {
            t.insert_range(SPARSE_3 + 1, 90, BAL)
        }),
        ("insert one page with other marks into a sparse leaf", |t| {
            t.insert(SPARSE_3 + 1, UNP).map(u64::from)
        }),
        ("insert a run over sparse leaves and others", |t| {
            t.insert_range(4096 * 109 + 5, 4096 * 4, UNP)
        }),
        ("set a mark on part of a sparse leaf", |t| {
            t.set_mark(SPARSE_63, 40, Mark::Discarded)
        }),
        ("remove part of a sparse leaf and a full slot", |t| {
            t.remove_range(4096 * 101 + 7, SPARSE_3 + 150 - (4096 * 101 + 7))
        }),
    ]
}

#[test]
fn failed_updates_leave_the_tree_unchanged_and_retries_succeed() {
    for (name, op) in operations() {
        // What the operation does with memory to spare.
        let mut reference = populated();
        let want = op(&mut reference).unwrap();
        let want_state = snapshot(&reference);

        let mut t = populated();
        let before = snapshot(&t);
        let mut failures = 0;
        for budget in 0.. {
            let r = with_budget(budget, || op(&mut t));
            match r {
                Err(TrackerError::NoMemory { .. }) => {
                    failures += 1;
                    assert_eq!(
                        snapshot(&t),
                        before,
                        "{name}: failure #{budget} changed the tree"
                    );
                }
                Err(e) => panic!("{name}: unexpected {e}"),
                Ok(n) => {
                    assert_eq!(n, want, "{name}: retry result");
                    assert_eq!(snapshot(&t), want_state, "{name}: retry state");
                    break;
                }
            }
            assert!(budget < 1000, "{name}: never succeeded");
        }
        assert!(
            failures > 0,
            "{name}: expected the operation to need memory"
        );
    }
}

/// `compact` is best effort: with any allocation failing, the leaves it could not turn stay
/// bitmaps, the contents never change and `heap_bytes` stays exact; with memory, it turns them.
#[test]
fn compact_under_failing_allocations_changes_nothing_observable() {
    let mut t = populated();
    for k in 0..40 {
        t.insert(4096 * 120 + 97 * k, UNP).unwrap();
        t.insert(4096 * 121 + 89 * k, BAL).unwrap();
    }
    let before = snapshot(&t);
    let base = live() - t.heap_bytes() as isize;
    let mut turned = 0;
    for budget in 0..12 {
        turned += with_budget(budget, || t.compact(0, 1 << 30));
        assert_eq!(snapshot(&t), before, "compact with {budget} allocations");
        assert_eq!(
            live() - base,
            t.heap_bytes() as isize,
            "heap after {budget}"
        );
        t.check_invariants().unwrap();
    }
    assert!(
        turned >= 2,
        "the two 40-page leaves were turned, with enough allocations"
    );
    assert_eq!(t.compact(0, 1 << 30), 0, "nothing left to turn");
    assert_eq!(snapshot(&t), before);
}

#[test]
fn heap_bytes_is_exact() {
    let base = live();
    let mut t = populated();
    assert_eq!(live() - base, t.heap_bytes() as isize, "populated");
    for p in (0..2_000_000u64).step_by(997) {
        t.insert(p * 31, BAL).unwrap();
        if p % 3 == 0 {
            t.remove(p * 29).unwrap();
        }
    }
    t.set_mark(0, 1 << 30, Mark::Discarded).unwrap();
    t.clear_mark(1 << 20, 1 << 22, Mark::Unplugged).unwrap();
    assert_eq!(live() - base, t.heap_bytes() as isize, "after churn");
    t.remove_range(0, MAX_INDEX + 1).unwrap();
    assert_eq!(t.heap_bytes(), 0);
    assert_eq!(live() - base, 0, "emptied tree holds nothing");
    drop(t);
}
