//! `Tracker::check_invariants`, for tests.

use super::node::{ChildRef, Node};
use super::{slot_shift, span_shift, Marks, Tracker, SLOT_EMPTY, SLOT_FULL, SLOT_SPARSE};

impl Tracker {
    /// Checks the structure's internal bookkeeping: every node's slot bytes against its
    /// `present`/`full` bits and child vector, children of the right kind for their level, the
    /// stored root shift. For tests only (`cfg(test)` or the `testing` feature; the property
    /// test calls it after every operation, so release builds check it too); `Err` names what
    /// is wrong.
    #[cfg(any(test, feature = "testing"))]
    pub fn check_invariants(&self) -> Result<(), String> {
        fn node(n: &Node, level: u32, base: u64) -> Result<(), String> {
            let kids = n.present & !n.full;
            if n.child_count() != kids.count_ones() as usize {
                return Err(format!(
                    "node 0x{base:x} (level {level}): {} children for {} child slots",
                    n.child_count(),
                    kids.count_ones()
                ));
            }
            if (level == 1 && !n.nodes.is_empty())
                || (level > 1 && (!n.leaves.is_empty() || n.sparse.is_some()))
                || n.sparse.as_ref().is_some_and(|k| k.leaves.is_empty())
            {
                return Err(format!(
                    "node 0x{base:x} (level {level}): {} node, {} leaf and {:?} sparse children",
                    n.nodes.len(),
                    n.leaves.len(),
                    n.sparse.as_ref().map(|k| k.leaves.len())
                ));
            }
            for i in 0..64u32 {
                let want = if n.present >> i & 1 == 0 {
                    SLOT_EMPTY
                } else if n.full >> i & 1 != 0 {
                    SLOT_FULL
                } else if n.sparse_slots() >> i & 1 != 0 {
                    SLOT_SPARSE + n.sparse_below(i) as u8
                } else {
                    n.children_below(i) as u8
                };
                if n.sparse_slots() >> i & 1 != 0
                    && (n.present >> i & 1 == 0 || n.full >> i & 1 != 0)
                {
                    return Err(format!(
                        "node 0x{base:x} slot {i}: sparse flag on a non-child"
                    ));
                }
                if n.slot_bytes[i as usize] != want {
                    return Err(format!(
                        "node 0x{base:x} (level {level}) slot {i}: byte {} should be {want}",
                        n.slot_bytes[i as usize]
                    ));
                }
                // A child's summary bits are exactly the marks carried below it; an empty
                // slot has none.
                let summary = n.slot_marks(i);
                let below = match want {
                    SLOT_FULL => summary,
                    SLOT_EMPTY => Marks::NONE,
                    c if c >= SLOT_SPARSE => {
                        let s = &n.sparse_leaves()[usize::from(c - SLOT_SPARSE)];
                        let sbase = base + (u64::from(i) << slot_shift(level));
                        s.check()
                            .map_err(|e| format!("sparse leaf 0x{sbase:x}: {e}"))?;
                        s.marks()
                    }
                    c => match n.child(usize::from(c)) {
                        ChildRef::Leaf(l) => l.any_marks(),
                        ChildRef::Node(c) => c.any_marks(),
                    },
                };
                if summary != below {
                    return Err(format!(
                        "node 0x{base:x} (level {level}) slot {i}: summary {summary:?}, marks below {below:?}"
                    ));
                }
                if want < 64 {
                    let sbase = base + (u64::from(i) << slot_shift(level));
                    match n.child(usize::from(want)) {
                        ChildRef::Leaf(l) => {
                            l.check().map_err(|e| format!("leaf 0x{sbase:x}: {e}"))?
                        }
                        ChildRef::Node(c) => node(c, level - 1, sbase)?,
                    }
                }
            }
            Ok(())
        }
        match &self.root {
            None if self.height != 0 => Err(format!("no root at height {}", self.height)),
            None if self.index_limit != 0 => {
                Err(format!("limit {} without a root", self.index_limit))
            }
            None => Ok(()),
            Some(_) if self.index_limit != 1 << span_shift(self.height) => Err(format!(
                "limit {} at height {}",
                self.index_limit, self.height
            )),
            Some(_) if self.root_shift != slot_shift(self.height) => Err(format!(
                "root shift {} at height {}",
                self.root_shift, self.height
            )),
            Some(r) => node(r, self.height, 0),
        }
    }
}
