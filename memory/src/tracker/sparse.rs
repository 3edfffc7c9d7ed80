//! Sparse leaves: up to [`SPARSE_MAX`] page offsets of one leaf-sized block, unordered, all with
//! the same marks, in a small allocation that grows [`STEP`] entries at a time. A leaf with few pages
//! (random single pages at low density: ~41 per leaf at 1%) costs 2 bytes a page plus a 2-byte
//! header instead of a 528-byte bitmap. It becomes a bitmap leaf when it would pass
//! `SPARSE_MAX` pages, when its pages would get different marks, or when the general path
//! needs a bitmap to work on; bitmap leaves never turn back into sparse ones.
//!
//! The offsets are unordered: an insert is a branch-free compare of the whole capacity (which
//! LLVM vectorises, 16 entries at a time) and a store at the end, no search and no memmove;
//! the in-order walks sort a copy.

use super::fbox::AllocError;
use super::leaf::Leaf;
use super::Marks;

/// Most pages a sparse leaf holds.
pub const SPARSE_MAX: usize = 64;
/// Capacity steps (entries).
pub const STEP: usize = 16;
/// Unused entries: above every page offset (< 4096), so a scan over the whole capacity counts
/// only the used ones.
const UNUSED: u16 = 0xffff;
const LEN_MASK: u16 = 0xff;
const MARKS_SHIFT: u32 = 8;

/// `0`: the header (page count in bits 0..8, marks in bits 8..11); `1..=cap`: the page offsets,
/// then [`UNUSED`].
#[derive(Debug)]
pub struct Sparse(Box<[u16]>);

fn alloc(cap: usize) -> Result<Vec<u16>, AllocError> {
    let mut v = Vec::new();
    v.try_reserve_exact(cap + 1).map_err(|_| AllocError {
        bytes: 2 * (cap + 1),
    })?;
    Ok(v)
}

/// Capacity for `n` pages.
#[inline]
pub fn cap_for(n: usize) -> usize {
    n.div_ceil(STEP).max(1) * STEP
}

impl Sparse {
    /// An empty sparse leaf with room for `cap` pages, carrying `marks`.
    pub fn try_new(cap: usize, marks: Marks) -> Result<Sparse, AllocError> {
        debug_assert!(cap <= SPARSE_MAX);
        let mut v = alloc(cap)?;
        v.push(u16::from(marks.0) << MARKS_SHIFT);
        v.resize(cap + 1, UNUSED);
        Ok(Sparse(v.into_boxed_slice()))
    }

    #[inline(always)]
    pub fn len(&self) -> usize {
        usize::from(self.0[0] & LEN_MASK)
    }

    #[inline(always)]
    pub fn cap(&self) -> usize {
        self.0.len() - 1
    }

    #[inline(always)]
    pub fn marks(&self) -> Marks {
        Marks((self.0[0] >> MARKS_SHIFT) as u8)
    }

    pub fn set_marks(&mut self, m: Marks) {
        self.0[0] = (self.0[0] & LEN_MASK) | u16::from(m.0) << MARKS_SHIFT;
    }

    /// The page offsets, unordered.
    #[inline]
    pub fn pages(&self) -> &[u16] {
        &self.0[1..=self.len()]
    }

    /// The page offsets in increasing order, copied into `buf`.
    pub fn sorted<'b>(&self, buf: &'b mut [u16; SPARSE_MAX]) -> &'b [u16] {
        let n = self.len();
        buf[..n].copy_from_slice(self.pages());
        buf[..n].sort_unstable();
        &buf[..n]
    }

    /// Heap bytes of the entries.
    pub fn bytes(&self) -> usize {
        2 * self.0.len()
    }

    /// Whether page `off` is present: a compare of the whole capacity, `STEP` entries at a
    /// time, without branches (unused entries match no offset).
    #[inline(always)]
    pub fn contains(&self, off: u64) -> bool {
        let x = off as u16;
        let mut acc = [0u16; STEP];
        for c in self.0[1..].chunks_exact(STEP) {
            for j in 0..STEP {
                acc[j] |= u16::from(c[j] == x);
            }
        }
        acc.iter().fold(0, |a, &b| a | b) != 0
    }

    /// Adds page `off`: `Some(true)` if added, `Some(false)` if present, `None` if it is absent
    /// and there is no room.
    #[inline(always)]
    pub fn insert(&mut self, off: u64) -> Option<bool> {
        if self.contains(off) {
            return Some(false);
        }
        let len = self.len();
        let e = self.0.get_mut(len + 1)?;
        *e = off as u16;
        self.0[0] += 1;
        Some(true)
    }

    /// Removes page `off`; returns whether it was present. The last offset takes its place.
    #[inline]
    pub fn remove(&mut self, off: u64) -> bool {
        let x = off as u16;
        let len = self.len();
        let Some(p) = self.0[1..=len].iter().position(|&e| e == x) else {
            return false;
        };
        self.0[p + 1] = self.0[len];
        self.0[len] = UNUSED;
        self.0[0] -= 1;
        true
    }

    /// Present pages of `lo..hi`.
    pub fn count_in(&self, lo: u64, hi: u64) -> usize {
        self.pages()
            .iter()
            .filter(|&&e| (lo..hi).contains(&u64::from(e)))
            .count()
    }

    /// Removes the pages of `lo..hi`; returns how many were present.
    pub fn remove_range(&mut self, lo: u64, hi: u64) -> usize {
        let len = self.len();
        let mut w = 1;
        for r in 1..=len {
            let e = self.0[r];
            if !(lo..hi).contains(&u64::from(e)) {
                self.0[w] = e;
                w += 1;
            }
        }
        let gone = len + 1 - w;
        for e in &mut self.0[w..=len] {
            *e = UNUSED;
        }
        self.0[0] -= gone as u16;
        gone
    }

    /// Adds the pages of `lo..hi`, which must fit (`len() + hi - lo - count_in(lo, hi) <= cap()`);
    /// returns how many were added.
    pub fn insert_range(&mut self, lo: u64, hi: u64) -> usize {
        let mut n = 0;
        for off in lo..hi {
            if self.insert(off) == Some(true) {
                n += 1;
            }
        }
        n
    }

    /// Room for `cap` pages (more than now), reallocated; nothing changes if that fails.
    pub fn try_grow(&mut self, cap: usize) -> Result<(), AllocError> {
        debug_assert!(cap > self.cap() && cap <= SPARSE_MAX);
        let mut v = std::mem::take(&mut self.0).into_vec();
        let r = v.try_reserve_exact(cap + 1 - v.len());
        if r.is_ok() {
            v.resize(cap + 1, UNUSED);
        }
        // Exact capacity either way: no reallocation here.
        self.0 = v.into_boxed_slice();
        r.map_err(|_| AllocError {
            bytes: 2 * (cap + 1),
        })
    }

    /// Writes the pages and marks into an empty bitmap leaf.
    pub fn fill(&self, leaf: &mut Leaf) {
        for &e in self.pages() {
            leaf.bits[usize::from(e >> 6)] |= 1 << (e & 63);
        }
        leaf.add_count(self.len() as u32);
        leaf.set_uniform(self.marks());
    }

    /// For `check_invariants`: a count within the capacity, no offset twice, all inside the
    /// leaf, unused entries marked, the header's spare bits clear.
    pub fn check(&self) -> Result<(), String> {
        let len = self.len();
        if len == 0 || len > self.cap() || self.cap() > SPARSE_MAX {
            return Err(format!(
                "sparse leaf of {len} pages, capacity {}",
                self.cap()
            ));
        }
        if self.0[0] >> (MARKS_SHIFT + 3) != 0 {
            return Err(format!("sparse header 0x{:x}", self.0[0]));
        }
        if self.cap() % STEP != 0 {
            return Err(format!("sparse capacity {}", self.cap()));
        }
        let mut buf = [0; SPARSE_MAX];
        let p = self.sorted(&mut buf);
        if p.windows(2).any(|w| w[0] >= w[1]) || p[len - 1] >= 4096 {
            return Err(format!("sparse pages repeated or out of range: {p:?}"));
        }
        if self.0[len + 1..].iter().any(|&e| e != UNUSED) {
            return Err("sparse leaf: an unused entry is not marked unused".into());
        }
        Ok(())
    }
}
