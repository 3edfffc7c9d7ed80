//! What an update will allocate (`Need`), and the spares allocated for it before the tree
//! changes (`Pool`).

use super::fbox::{AllocError, FBox};
use super::leaf::{Leaf, MarkMaps};
use super::node::Node;
use super::slot_shift;

/// Allocations for updates: what one update will take from the pool.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Need {
    /// Interior nodes (a node is 160 bytes, plus its child vectors).
    pub nodes: usize,
    /// Bitmap leaves (528 bytes each).
    pub leaves: usize,
    /// Per-mark bitmaps of leaves whose pages carry different marks (1.5 KiB each).
    pub maps: usize,
}

impl Need {
    /// The larger of each count.
    #[inline]
    pub(super) fn max_each(self, other: Need) -> Need {
        Need {
            nodes: self.nodes.max(other.nodes),
            leaves: self.leaves.max(other.leaves),
            maps: self.maps.max(other.maps),
        }
    }

    /// Each count less `other`'s (which must be smaller).
    pub(super) fn minus(self, other: Need) -> Need {
        Need {
            nodes: self.nodes - other.nodes,
            leaves: self.leaves - other.leaves,
            maps: self.maps - other.maps,
        }
    }

    /// A new subtree at `level` (0 = leaf) materialised for the partial range `lo..hi`: one node
    /// per level along each edge of the range, and a leaf at the bottom of each.
    pub(super) fn new_subtree(&mut self, level: u32, lo: u64, hi: u64, maps: bool) {
        if level == 0 {
            self.leaves += 1;
            if maps {
                self.maps += 1;
            }
            return;
        }
        self.nodes += 1;
        self.edge_subtrees(level, lo, hi, maps);
    }

    /// The new subtrees for the partially covered edge slots of `lo..hi` in a node at `level`.
    pub(super) fn edge_subtrees(&mut self, level: u32, lo: u64, hi: u64, maps: bool) {
        let sshift = slot_shift(level);
        let sspan = 1u64 << sshift;
        let first = lo >> sshift;
        let last = (hi - 1) >> sshift;
        let edges = if first == last { 1 } else { 2 };
        for i in [first, last].into_iter().take(edges) {
            let base = i << sshift;
            let s_lo = lo.max(base) - base;
            let s_hi = hi.min(base + sspan) - base;
            if !(s_lo == 0 && s_hi == sspan) {
                self.new_subtree(level - 1, s_lo, s_hi, maps);
            }
        }
    }
}

/// Nodes, leaves and mark bitmaps allocated ahead of the changes that use them.
#[derive(Debug, Default)]
pub(super) struct Pool {
    nodes: Vec<FBox<Node>>,
    leaves: Vec<FBox<Leaf>>,
    maps: Vec<FBox<MarkMaps>>,
}

impl Pool {
    /// The spares held.
    #[inline]
    pub(super) fn spares(&self) -> Need {
        Need {
            nodes: self.nodes.len(),
            leaves: self.leaves.len(),
            maps: self.maps.len(),
        }
    }

    /// Allocates spares until there are at least `need` of each kind; on failure the spares
    /// allocated so far stay.
    pub(super) fn reserve(&mut self, need: Need) -> Result<(), AllocError> {
        if self.nodes.len() < need.nodes {
            self.nodes
                .try_reserve(need.nodes - self.nodes.len())
                .map_err(|_| AllocError {
                    bytes: need.nodes * 8,
                })?;
        }
        while self.nodes.len() < need.nodes {
            let mut node = FBox::try_new(Node::empty())?;
            // Room for the children a new node gets within one operation: two partial edges,
            // plus the old root when it becomes the top of a taller tree. Its level is not
            // known yet: room in both vectors, and `take_node` frees the one it will not use.
            node.nodes.try_reserve_exact(3).map_err(|_| AllocError {
                bytes: 3 * std::mem::size_of::<FBox<Node>>(),
            })?;
            node.leaves.try_reserve_exact(2).map_err(|_| AllocError {
                bytes: 2 * std::mem::size_of::<FBox<Leaf>>(),
            })?;
            self.nodes.push(node);
        }
        if self.leaves.len() < need.leaves {
            self.leaves
                .try_reserve(need.leaves - self.leaves.len())
                .map_err(|_| AllocError {
                    bytes: need.leaves * 8,
                })?;
        }
        while self.leaves.len() < need.leaves {
            self.leaves.push(FBox::try_new_with(Leaf::empty)?);
        }
        if self.maps.len() < need.maps {
            self.maps
                .try_reserve(need.maps - self.maps.len())
                .map_err(|_| AllocError {
                    bytes: need.maps * 8,
                })?;
        }
        while self.maps.len() < need.maps {
            self.maps.push(FBox::try_new(MarkMaps::EMPTY)?);
        }
        Ok(())
    }

    /// Frees the spare lists' own storage once they are empty.
    #[inline]
    pub(super) fn release_empty(&mut self) {
        if self.nodes.is_empty() && self.nodes.capacity() != 0 {
            self.nodes = Vec::new();
        }
        if self.leaves.is_empty() && self.leaves.capacity() != 0 {
            self.leaves = Vec::new();
        }
        if self.maps.is_empty() && self.maps.capacity() != 0 {
            self.maps = Vec::new();
        }
    }

    /// A spare node for `level` (its other child vector freed).
    #[inline]
    pub(super) fn take_node(&mut self, level: u32) -> FBox<Node> {
        match self.nodes.pop() {
            Some(mut node) => {
                if level == 1 {
                    node.nodes = Vec::new();
                } else {
                    node.leaves = Vec::new();
                }
                node
            }
            None => panic!("tracker pool ran out of nodes: reservation miscounted"),
        }
    }

    /// A spare leaf, emptied.
    #[inline]
    pub(super) fn take_leaf(&mut self) -> FBox<Leaf> {
        match self.leaves.pop() {
            Some(mut leaf) => {
                leaf.set_empty();
                leaf
            }
            None => panic!("tracker pool ran out of leaves: reservation miscounted"),
        }
    }

    /// A spare set of mark bitmaps (the taker overwrites them).
    #[inline]
    pub(super) fn take_maps(&mut self) -> FBox<MarkMaps> {
        match self.maps.pop() {
            Some(maps) => maps,
            None => panic!("tracker pool ran out of mark bitmaps: reservation miscounted"),
        }
    }

    /// Heap bytes of the spares and of the lists holding them.
    pub(super) fn heap_bytes(&self) -> usize {
        self.nodes.capacity() * 8
            + self.leaves.capacity() * 8
            + self.maps.capacity() * 8
            + self
                .nodes
                .iter()
                .map(|node| {
                    std::mem::size_of::<Node>()
                        + node.nodes.capacity() * std::mem::size_of::<FBox<Node>>()
                        + node.leaves.capacity() * std::mem::size_of::<FBox<Leaf>>()
                })
                .sum::<usize>()
            + self.leaves.len() * std::mem::size_of::<Leaf>()
            + self.maps.len() * std::mem::size_of::<MarkMaps>()
    }
}
