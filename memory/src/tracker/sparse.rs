//! SparseLeaf leaves: up to [`SPARSE_MAX`] page offsets of one leaf-sized block, unordered, all with
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

/// Capacity steps (entries): one chunk of 16 `u16`s, the first of which holds the header.
pub const STEP: usize = 16;
/// Most pages a sparse leaf holds: four chunks, less the header.
pub const SPARSE_MAX: usize = 4 * STEP - 1;
/// Unused entries: equal to no page offset (< 4096).
const UNUSED: u16 = 0xffff;
/// The header: [`HEADER`] (so it equals no page offset either), the page count in bits 0..8,
/// the marks in bits 8..11.
const HEADER: u16 = 0x8000;
const LEN_MASK: u16 = 0xff;
const MARKS_SHIFT: u32 = 8;

/// Chunks of 16 entries: entry 0 is the header, then the page offsets (unordered), then
/// [`UNUSED`]. A lookup compares every entry of every chunk with the offset, 16 at a time.
#[derive(Debug)]
pub struct SparseLeaf(Box<[[u16; STEP]]>);

fn alloc(chunks: usize) -> Result<Vec<[u16; STEP]>, AllocError> {
    let mut v = Vec::new();
    v.try_reserve_exact(chunks).map_err(|_| AllocError {
        bytes: 2 * STEP * chunks,
    })?;
    Ok(v)
}

/// Chunks for `n` pages.
#[inline]
pub fn chunks_for(n: usize) -> usize {
    (n + 1).div_ceil(STEP)
}

impl SparseLeaf {
    /// An empty sparse leaf of `chunks` chunks, carrying `marks`.
    pub fn try_new(chunks: usize, marks: Marks) -> Result<SparseLeaf, AllocError> {
        debug_assert!((1..=4).contains(&chunks));
        let mut v = alloc(chunks)?;
        v.resize(chunks, [UNUSED; STEP]);
        v[0][0] = HEADER | u16::from(marks.0) << MARKS_SHIFT;
        Ok(SparseLeaf(v.into_boxed_slice()))
    }

    #[inline(always)]
    fn header(&self) -> u16 {
        self.0[0][0]
    }

    #[inline(always)]
    pub fn len(&self) -> usize {
        usize::from(self.header() & LEN_MASK)
    }

    /// Most pages it holds without growing.
    #[inline(always)]
    pub fn cap(&self) -> usize {
        self.0.len() * STEP - 1
    }

    #[inline(always)]
    pub fn marks(&self) -> Marks {
        Marks(((self.header() >> MARKS_SHIFT) & 7) as u8)
    }

    pub fn set_marks(&mut self, m: Marks) {
        self.0[0][0] = HEADER | (self.header() & LEN_MASK) | u16::from(m.0) << MARKS_SHIFT;
    }

    #[inline(always)]
    fn flat(&self) -> &[u16] {
        self.0.as_flattened()
    }

    #[inline(always)]
    fn flat_mut(&mut self) -> &mut [u16] {
        self.0.as_flattened_mut()
    }

    /// The page offsets, unordered.
    #[inline]
    pub fn pages(&self) -> &[u16] {
        &self.flat()[1..=self.len()]
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
        2 * STEP * self.0.len()
    }

    /// Whether page `off` is present: every entry compared with it, without branches (the
    /// header and the unused entries match no offset). One arm per number of chunks, so LLVM
    /// vectorises within the chunks (two compares each); a loop over the chunks was
    /// vectorised across them instead (gathers), three times slower.
    #[inline(always)]
    pub fn contains(&self, off: u64) -> bool {
        let x = off as u16;
        let hits = |c: &[u16; STEP]| c.iter().fold(0u16, |a, &e| a | u16::from(e == x));
        let any = match &*self.0 {
            [a] => hits(a),
            [a, b] => hits(a) | hits(b),
            [a, b, c] => hits(a) | hits(b) | hits(c),
            [a, b, c, d] => hits(a) | hits(b) | hits(c) | hits(d),
            _ => self.0.iter().fold(0, |acc, c| acc | hits(c)),
        };
        any != 0
    }

    /// Adds page `off`: `Some(true)` if added, `Some(false)` if present, `None` if it is absent
    /// and there is no room.
    #[inline(always)]
    pub fn insert(&mut self, off: u64) -> Option<bool> {
        if self.contains(off) {
            return Some(false);
        }
        let len = self.len();
        let e = self.flat_mut().get_mut(len + 1)?;
        *e = off as u16;
        self.0[0][0] += 1;
        Some(true)
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
        let f = self.flat_mut();
        let mut w = 1;
        for r in 1..=len {
            let e = f[r];
            if !(lo..hi).contains(&u64::from(e)) {
                f[w] = e;
                w += 1;
            }
        }
        let gone = len + 1 - w;
        for e in &mut f[w..=len] {
            *e = UNUSED;
        }
        f[0] -= gone as u16;
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

    /// Grows to `chunks` chunks (more than now), reallocated; nothing changes if that fails.
    pub fn try_grow(&mut self, chunks: usize) -> Result<(), AllocError> {
        debug_assert!(chunks > self.0.len() && chunks <= 4);
        let mut v = std::mem::take(&mut self.0).into_vec();
        let r = v.try_reserve_exact(chunks - v.len());
        if r.is_ok() {
            v.resize(chunks, [UNUSED; STEP]);
        }
        // Exact capacity either way: no reallocation here.
        self.0 = v.into_boxed_slice();
        r.map_err(|_| AllocError {
            bytes: 2 * STEP * chunks,
        })
    }

    /// Writes the pages and marks into an empty bitmap leaf.
    pub fn fill(&self, leaf: &mut Leaf) {
        for &e in self.pages() {
            leaf.bits[usize::from(e >> 6) & 63] |= 1 << (e & 63);
        }
        leaf.add_count(self.len() as u32);
        leaf.set_uniform(self.marks());
    }

    /// For `check_invariants`: a count within the capacity, no offset twice, all inside the
    /// leaf, unused entries marked, the header's spare bits clear.
    #[cfg(any(test, feature = "testing"))]
    pub fn check(&self) -> Result<(), String> {
        let len = self.len();
        if len == 0 || len > self.cap() || self.cap() > SPARSE_MAX {
            return Err(format!(
                "sparse leaf of {len} pages, capacity {}",
                self.cap()
            ));
        }
        if self.header() & !(HEADER | LEN_MASK | 7 << MARKS_SHIFT) != 0
            || self.header() & HEADER == 0
        {
            return Err(format!("sparse header 0x{:x}", self.header()));
        }
        let mut buf = [0; SPARSE_MAX];
        let p = self.sorted(&mut buf);
        if p.windows(2).any(|w| w[0] >= w[1]) || p[len - 1] >= 4096 {
            return Err(format!("sparse pages repeated or out of range: {p:?}"));
        }
        if self.flat()[len + 1..].iter().any(|&e| e != UNUSED) {
            return Err("sparse leaf: an unused entry is not marked unused".into());
        }
        Ok(())
    }
}
