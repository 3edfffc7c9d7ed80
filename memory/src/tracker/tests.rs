//! Edge cases: index 0, the top of the index space, every level boundary, multi-index costs.

use super::*;

const B: Marks = Marks(1);
const U: Marks = Marks(2);

fn runs(t: &Tracker) -> Vec<(u64, u64)> {
    t.runs(None, None).map(|r| (r.start, r.len)).collect()
}

#[test]
fn zero_and_top_of_index_space() {
    let mut t = Tracker::new();
    assert!(t.insert(0, B).unwrap());
    assert!(t.insert(MAX_INDEX, B).unwrap());
    assert!(
        !t.insert(MAX_INDEX, U).unwrap(),
        "already present keeps its marks"
    );
    assert_eq!(t.get(MAX_INDEX), Some(B));
    assert_eq!(t.height, MAX_HEIGHT);
    assert_eq!(runs(&t), vec![(0, 1), (MAX_INDEX, 1)]);
    assert_eq!(t.next(1, None), Some(MAX_INDEX));
    assert_eq!(t.prev(MAX_INDEX - 1, None), Some(0));
    assert_eq!(t.prev(u64::MAX, None), Some(MAX_INDEX));
    assert_eq!(t.next(u64::MAX, None), None);
    assert!(!t.contains(MAX_INDEX + 1));
    assert!(!t.contains(u64::MAX));
    assert_eq!(
        t.insert(MAX_INDEX + 1, B),
        Err(TrackerError::OutOfRange {
            start: MAX_INDEX + 1,
            count: 1,
            max: MAX_INDEX
        })
    );
    assert!(matches!(
        t.insert_range(MAX_INDEX, 2, B),
        Err(TrackerError::OutOfRange { .. })
    ));
    assert!(matches!(
        t.remove_range(u64::MAX, 2),
        Err(TrackerError::OutOfRange { .. })
    ));
    // The whole index space in one call.
    assert_eq!(t.insert_range(0, MAX_INDEX + 1, U).unwrap(), MAX_INDEX - 1);
    assert_eq!(t.len(), MAX_INDEX + 1);
    assert_eq!(t.count_marked(Mark::Unplugged), MAX_INDEX - 1);
    assert!(t.remove(MAX_INDEX).unwrap());
    assert_eq!(t.remove_range(0, MAX_INDEX + 1).unwrap(), MAX_INDEX);
    assert!(t.is_empty());
    assert_eq!(t.heap_bytes(), 0);
    assert_eq!(t.insert_range(5, 0, B).unwrap(), 0);
}

#[test]
fn every_level_boundary() {
    for level in 0..MAX_HEIGHT {
        let edge = 1u64 << span_shift(level);
        let mut t = Tracker::new();
        assert_eq!(t.insert_range(edge - 2, 4, B).unwrap(), 4, "level {level}");
        assert_eq!(runs(&t), vec![(edge - 2, 4)]);
        assert!(t.remove(edge).unwrap());
        assert_eq!(runs(&t), vec![(edge - 2, 2), (edge + 1, 1)]);
        assert_eq!(t.next(edge, None), Some(edge + 1));
        assert_eq!(t.prev(edge, None), Some(edge - 1));
        t.set_mark(edge - 1, 2, Mark::Discarded).unwrap();
        assert_eq!(t.next(0, Some(Mark::Discarded)), Some(edge - 1));
        assert_eq!(t.prev(u64::MAX, Some(Mark::Discarded)), Some(edge - 1));
        assert_eq!(t.count_marked(Mark::Discarded), 1);
        assert!(t.contains_range(edge - 2, 2));
        assert!(!t.contains_range(edge - 2, 3));
    }
}

#[test]
fn aligned_ranges_cost_one_entry() {
    // A fully offline 1 GiB range, and a 64 GiB hot-add region at 4 GiB (not 64 GiB aligned).
    let mut t = Tracker::new();
    t.insert_range(1 << 20, 1 << 18, U).unwrap();
    let one_gib = t.heap_bytes();
    assert!(one_gib < 1024, "1 GiB range: {one_gib} bytes");
    let mut t = Tracker::new();
    t.insert_range(1 << 20, 1 << 24, U).unwrap();
    let region = t.heap_bytes();
    assert!(region < 1024, "64 GiB region: {region} bytes");
    eprintln!("heap: 1 GiB range {one_gib} B, 64 GiB region at 4 GiB {region} B");
    // Removing one page costs one chain of nodes and one leaf, and putting it back merges all.
    t.remove((1 << 20) + 777_777).unwrap();
    assert!(t.heap_bytes() < region + 2048);
    t.insert((1 << 20) + 777_777, U).unwrap();
    assert_eq!(t.heap_bytes(), region, "merged back into full slots");
    // A 2 MiB huge page in a leaf, and a whole 16 MiB leaf collapsing into a full slot.
    let mut t = Tracker::new();
    t.insert_range(4096 * 5, 4096, B).unwrap();
    let leaf_full = t.heap_bytes();
    assert_eq!(leaf_full, std::mem::size_of::<Node>(), "only the root node");
}

#[test]
fn marks_follow_parents_and_filtered_walks_skip() {
    let mut t = Tracker::new();
    t.insert_range(0, 1 << 24, U).unwrap();
    t.insert(1 << 30, B).unwrap();
    t.insert((1 << 36) + 5, B).unwrap();
    let b: Vec<u64> = t
        .runs(Some(Mark::Ballooned), None)
        .map(|r| r.start)
        .collect();
    assert_eq!(b, vec![1 << 30, (1 << 36) + 5]);
    assert_eq!(t.next(0, Some(Mark::Ballooned)), Some(1 << 30));
    assert_eq!(t.prev(1 << 35, Some(Mark::Unplugged)), Some((1 << 24) - 1));
    t.clear_mark(0, 1 << 40, Mark::Unplugged).unwrap();
    assert_eq!(t.count_marked(Mark::Unplugged), 0);
    assert_eq!(t.next(0, Some(Mark::Unplugged)), None);
}

#[test]
fn height_shrinks_after_removal() {
    let mut t = Tracker::new();
    t.insert(3, B).unwrap();
    t.insert(1 << 40, B).unwrap();
    assert_eq!(t.height, 5);
    t.remove(1 << 40).unwrap();
    assert_eq!(t.height, 1);
    t.remove(3).unwrap();
    assert!(t.root.is_none());
}

#[test]
fn marks_hold_only_the_three_marks() {
    // Bits past the three marks used to be kept as given in a leaf's marks but not in a
    // node's summary bits, so a page read back with other marks depending on the path that
    // stored it (0b1111_1001 in a leaf, 0b1 in a full slot).
    let stray = Marks::from_bits_truncate(0b1111_1001);
    assert_eq!(stray, B);
    assert_eq!(B.with(5), B);
    assert_eq!(B.without(7), B);
    assert!(!Marks::ALL.has(9));
    assert_eq!(Marks::ALL.bits(), 0b111);
    let mut t = Tracker::new();
    t.insert(5, stray).unwrap();
    t.insert_range(4096, 4096, stray).unwrap();
    assert_eq!(t.get(4096), Some(B), "full slot");
    assert_eq!(t.get(5), Some(B), "leaf");
    let runs: Vec<Marks> = t.marked_runs(None).map(|c| c.marks).collect();
    assert_eq!(runs, vec![B, B]);
}
