//! `Tracker::compact`: bitmap leaves holding few pages become sparse leaves (`sparse.rs`).

use super::node::Node;
use super::sparse::{self, SparseLeaf, SPARSE_MAX};
use super::{slot_range_mask, slot_shift, span_shift, Tracker};

impl Tracker {
    /// Turns the bitmap leaves in `start..start+count` that hold at most 63 pages, all with
    /// the same marks, into sparse leaves (2 bytes a page instead of a 528-byte bitmap);
    /// returns how many it turned. Observable contents never change.
    ///
    /// Updates never make sparse leaves themselves, so that the single-page paths stay
    /// bitmap flips: the owner calls this on what changed once its users have been quiet for
    /// a while (the memory manager does), as roaring's `run_optimize` is called. Best effort,
    /// no error: a leaf whose sparse copy cannot be allocated stays a bitmap. Cost: a walk of
    /// the range's bitmap leaves (those with more pages are skipped after one load), and an
    /// allocation and a copy for each leaf it turns.
    pub fn compact(&mut self, start: u64, count: u64) -> usize {
        let end = start.saturating_add(count).min(self.index_limit);
        match self.root.as_deref_mut() {
            Some(root) if start < end => root.compact(self.height, 0, start, end),
            _ => 0,
        }
    }
}

impl Node {
    /// `Tracker::compact` below this node (at `level`, covering pages from `base`), for pages
    /// `lo..hi`.
    pub(super) fn compact(&mut self, level: u32, base: u64, lo: u64, hi: u64) -> usize {
        let sshift = slot_shift(level);
        let first = ((lo.max(base) - base) >> sshift) as u32;
        let last = ((hi.min(base + (1u64 << span_shift(level))) - 1 - base) >> sshift) as u32;
        let mut children = self.present & !self.full & slot_range_mask(first, last);
        let mut turned = 0;
        if level == 1 {
            children &= !self.sparse_slots();
            while children != 0 {
                let i = children.trailing_zeros();
                children &= children - 1;
                turned += usize::from(self.compact_leaf(i));
            }
        } else {
            while children != 0 {
                let i = children.trailing_zeros();
                children &= children - 1;
                let idx = self.child_idx(i as usize);
                let sbase = base + (u64::from(i) << sshift);
                turned += self.nodes[idx].compact(level - 1, sbase, lo, hi);
            }
        }
        turned
    }

    /// Turns the bitmap leaf of slot `i` (level 1) into a sparse leaf if it has at most
    /// `SPARSE_MAX` pages with uniform marks and the allocations succeed.
    pub(super) fn compact_leaf(&mut self, i: u32) -> bool {
        let idx = self.child_idx(i as usize);
        let leaf = &self.leaves[idx];
        let n = usize::from(leaf.count());
        if n > SPARSE_MAX || leaf.mixed.is_some() {
            return false;
        }
        let Ok(mut sparse) = SparseLeaf::try_new(sparse::chunks_for(n), leaf.uniform()) else {
            return false;
        };
        for (w, &word) in leaf.bits.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                sparse.insert(((w as u64) << 6) + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        let sparse_idx = self.sparse_below(i);
        let Ok(sparse_leaves) = self.sparse_mut_with_room() else {
            return false;
        };
        sparse_leaves.leaves.insert(sparse_idx, sparse);
        sparse_leaves.slots |= 1 << i;
        self.leaves.remove(idx);
        self.rebuild_slot_bytes();
        self.release_children();
        true
    }
}
