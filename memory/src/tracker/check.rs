//! `Tracker::check_invariants`: the tree's internal bookkeeping checked against itself, for
//! tests (only with `cfg(test)` or the `testing` feature).

use super::node::{ChildRef, Node};
use super::{slot_shift, span_shift, Marks, Tracker, SLOT_EMPTY, SLOT_FULL, SLOT_SPARSE};

impl Tracker {
    /// Checks the structure's internal bookkeeping: every node's slot bytes against its
    /// `present`/`full` bits and child vectors, children of the right kind for their level,
    /// every slot's mark summary against the marks below it, each leaf's count against its
    /// bits and its mixed flag against its mark bitmaps, each sparse leaf's entries, and the
    /// stored root shift and index limit.
    ///
    /// Returns `Err` naming what is wrong and where. Cost: a walk of the whole tree, O(heap);
    /// the property tests call it after every operation, so release builds check it too.
    pub fn check_invariants(&self) -> Result<(), String> {
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
            Some(root) => check_node(root, self.height, 0),
        }
    }
}

/// Checks `node` (at `level`, covering pages from `base`) and everything below it.
fn check_node(node: &Node, level: u32, base: u64) -> Result<(), String> {
    let child_slots = node.present & !node.full;
    if child_count(node) != child_slots.count_ones() as usize {
        return Err(format!(
            "node 0x{base:x} (level {level}): {} children for {} child slots",
            child_count(node),
            child_slots.count_ones()
        ));
    }
    if (level == 1 && !node.nodes.is_empty())
        || (level > 1 && (!node.leaves.is_empty() || node.sparse.is_some()))
        || node.sparse.as_ref().is_some_and(|s| s.leaves.is_empty())
    {
        return Err(format!(
            "node 0x{base:x} (level {level}): {} node, {} leaf and {:?} sparse children",
            node.nodes.len(),
            node.leaves.len(),
            node.sparse.as_ref().map(|s| s.leaves.len())
        ));
    }
    for i in 0..64u32 {
        check_slot(node, level, base, i)?;
    }
    Ok(())
}

/// Checks slot `i` of `node`: its byte, its mark summary, and the child it holds.
fn check_slot(node: &Node, level: u32, base: u64, i: u32) -> Result<(), String> {
    let sparse = node.sparse_slots() >> i & 1 != 0;
    let want = if node.present >> i & 1 == 0 {
        SLOT_EMPTY
    } else if node.full >> i & 1 != 0 {
        SLOT_FULL
    } else if sparse {
        SLOT_SPARSE + node.sparse_below(i) as u8
    } else {
        node.children_below(i) as u8
    };
    if sparse && (node.present >> i & 1 == 0 || node.full >> i & 1 != 0) {
        return Err(format!(
            "node 0x{base:x} slot {i}: sparse flag on a non-child"
        ));
    }
    if node.slot_bytes[i as usize] != want {
        return Err(format!(
            "node 0x{base:x} (level {level}) slot {i}: byte {} should be {want}",
            node.slot_bytes[i as usize]
        ));
    }
    let slot_base = base + (u64::from(i) << slot_shift(level));
    // A child's summary bits are exactly the marks carried below it; an empty slot has none.
    let summary = node.slot_marks(i);
    let below = match want {
        SLOT_FULL => summary,
        SLOT_EMPTY => Marks::NONE,
        byte if byte >= SLOT_SPARSE => {
            let leaf = &node.sparse_leaves()[usize::from(byte - SLOT_SPARSE)];
            leaf.check()
                .map_err(|e| format!("sparse leaf 0x{slot_base:x}: {e}"))?;
            leaf.marks()
        }
        idx => match node.child(usize::from(idx)) {
            ChildRef::Leaf(leaf) => leaf.any_marks(),
            ChildRef::Node(child) => child.any_marks(),
        },
    };
    if summary != below {
        return Err(format!(
            "node 0x{base:x} (level {level}) slot {i}: summary {summary:?}, marks below {below:?}"
        ));
    }
    if want < 64 {
        match node.child(usize::from(want)) {
            ChildRef::Leaf(leaf) => leaf
                .check()
                .map_err(|e| format!("leaf 0x{slot_base:x}: {e}"))?,
            ChildRef::Node(child) => check_node(child, level - 1, slot_base)?,
        }
    }
    Ok(())
}

/// Number of children of `node`, of all three kinds.
fn child_count(node: &Node) -> usize {
    node.nodes.len() + node.leaves.len() + node.sparse_leaves().len()
}
