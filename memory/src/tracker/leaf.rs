//! Bitmap leaves: 64 slots of 64 pages each, one bit per page (4096 pages, 16 MiB of guest RAM).
//!
//! Marks cost nothing while every page in the leaf carries the same marks (`uniform`); only a leaf
//! whose pages carry different marks gets a `MarkMaps` box with one bitmap per mark.

use super::fbox::FBox;
use super::general::{Delta, Op};
use super::pool::Pool;
use super::{Marks, MARK_COUNT};

/// Pages per leaf (log2).
pub const LEAF_SHIFT: u32 = 12;
pub const LEAF_PAGES: u64 = 1 << LEAF_SHIFT;
pub const WORDS: usize = 64;

/// The marks of a leaf whose pages carry different marks.
#[derive(Debug, Clone)]
pub struct MarkMaps {
    /// One bitmap per mark, each a subset of the leaf's presence bits.
    pub bits: [[u64; WORDS]; MARK_COUNT],
    /// How many pages carry each mark (kept here, not in the leaf, so a leaf with uniform
    /// marks is 8 bytes smaller).
    pub counts: [u16; MARK_COUNT],
}

impl MarkMaps {
    /// No page carries any mark.
    pub const EMPTY: MarkMaps = MarkMaps {
        bits: [[0; WORDS]; MARK_COUNT],
        counts: [0; MARK_COUNT],
    };
}

#[derive(Debug)]
pub struct Leaf {
    pub bits: [u64; WORDS],
    /// In one word, so that the single-page fast paths test it with one compare: the number
    /// of present pages (bits 0..16; pages carrying each mark are in `mixed`, the only case
    /// where they are not the count or 0), the marks of every present page while `mixed` is
    /// `None` (bits 16..24), and [`STATE_MIXED`] while `mixed` is `Some`.
    state: u32,
    pub mixed: Option<FBox<MarkMaps>>,
}

/// `Leaf::state` of a leaf with per-mark bitmaps.
const STATE_MIXED: u32 = 1 << 31;
const STATE_COUNT: u32 = 0xffff;
const MARKS_SHIFT: u32 = 16;

/// Bit mask of positions `lo..hi` within one word, `lo < hi <= 64`.
#[inline]
pub fn word_mask(lo: u32, hi: u32) -> u64 {
    let upper = if hi == 64 { u64::MAX } else { (1u64 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

/// Set bits of `x`, where `x` is almost always 0: a test instead of a popcount then.
#[inline(always)]
fn ones_if_any(x: u64) -> u32 {
    if x == 0 {
        0
    } else {
        x.count_ones()
    }
}

/// Calls `f(word, mask)` for each word touched by page offsets `lo..hi` within a leaf.
#[inline]
fn for_words(lo: u64, hi: u64, mut f: impl FnMut(usize, u64)) {
    let first = (lo >> 6) as usize;
    let last = ((hi - 1) >> 6) as usize;
    for w in first..=last {
        let a = if w == first { (lo & 63) as u32 } else { 0 };
        let b = if w == last {
            ((hi - 1) & 63) as u32 + 1
        } else {
            64
        };
        f(w, word_mask(a, b));
    }
}

impl Leaf {
    /// Present pages.
    #[inline(always)]
    pub fn count(&self) -> u16 {
        (self.state & STATE_COUNT) as u16
    }

    /// The marks of every present page (meaningful while `mixed` is `None`).
    #[inline(always)]
    pub fn uniform(&self) -> Marks {
        Marks((self.state >> MARKS_SHIFT) as u8)
    }

    /// Sets the marks of every present page of a leaf without mark bitmaps.
    #[inline]
    pub fn set_uniform(&mut self, m: Marks) {
        debug_assert!(self.mixed.is_none());
        self.state = u32::from(self.count()) | u32::from(m.0) << MARKS_SHIFT;
    }

    /// For `check_invariants`: the count against the bits, the mixed flag against `mixed`.
    #[cfg(any(test, feature = "testing"))]
    pub fn check(&self) -> Result<(), String> {
        let ones: u32 = self.bits.iter().map(|w| w.count_ones()).sum();
        if u32::from(self.count()) != ones {
            return Err(format!("count {} for {ones} bits", self.count()));
        }
        if (self.state & STATE_MIXED != 0) != self.mixed.is_some() {
            return Err(format!(
                "state 0x{:x} with mixed {}",
                self.state,
                self.mixed.is_some()
            ));
        }
        if self.mixed.is_some() && self.state & !(STATE_MIXED | STATE_COUNT) != 0 {
            return Err(format!("state 0x{:x}: marks in a mixed leaf", self.state));
        }
        Ok(())
    }

    /// Whether `n` (<= `LEAF_PAGES`) pages with `marks` can be added without anything above
    /// the leaf changing: no mark bitmaps, every page carries `marks`, and the leaf does not
    /// fill up. One compare: a different set of marks or the mixed flag puts the difference
    /// far above the count, or wraps it.
    #[inline(always)]
    pub fn fast_insert_ok(&self, marks: Marks, n: u32) -> bool {
        self.state.wrapping_sub(u32::from(marks.0) << MARKS_SHIFT) < LEAF_PAGES as u32 - n
    }

    /// Whether `n` pages can be removed without anything above the leaf changing: no mark
    /// bitmaps and more than `n` pages present.
    #[inline(always)]
    pub fn fast_remove_ok(&self, n: u32) -> bool {
        // The mixed flag is the sign bit.
        (self.state & (STATE_MIXED | STATE_COUNT)) as i32 > n as i32
    }

    /// Adds or takes `n` to or from the count of a leaf (fast paths: no carry, no borrow).
    #[inline(always)]
    pub fn add_count(&mut self, n: u32) {
        self.state = self.state.wrapping_add(n);
    }

    pub fn empty() -> Self {
        Leaf {
            bits: [0; WORDS],
            state: 0,
            mixed: None,
        }
    }

    /// Re-initialises a (pooled) leaf as a fully present one with uniform `marks`.
    pub fn set_full(&mut self, marks: Marks) {
        self.bits = [u64::MAX; WORDS];
        self.state = LEAF_PAGES as u32 | u32::from(marks.0) << MARKS_SHIFT;
        self.mixed = None;
    }

    pub fn set_empty(&mut self) {
        self.bits = [0; WORDS];
        self.state = 0;
        self.mixed = None;
    }

    pub fn is_full_uniform(&self) -> Option<Marks> {
        (u64::from(self.count()) == LEAF_PAGES && self.mixed.is_none()).then_some(self.uniform())
    }

    /// Marks carried by at least one page.
    pub fn any_marks(&self) -> Marks {
        let Some(maps) = &self.mixed else {
            return if self.count() > 0 {
                self.uniform()
            } else {
                Marks::NONE
            };
        };
        let mut m = Marks::NONE;
        for k in 0..MARK_COUNT {
            if maps.counts[k] > 0 {
                m = m.with(k);
            }
        }
        m
    }

    #[inline]
    pub fn contains(&self, off: u64) -> bool {
        self.bits[(off >> 6) as usize] & (1 << (off & 63)) != 0
    }

    pub fn marks_at(&self, off: u64) -> Marks {
        match &self.mixed {
            None => self.uniform(),
            Some(maps) => {
                let (w, b) = ((off >> 6) as usize, off & 63);
                let mut m = Marks::NONE;
                for k in 0..MARK_COUNT {
                    if maps.bits[k][w] & (1 << b) != 0 {
                        m = m.with(k);
                    }
                }
                m
            }
        }
    }

    /// Bits of word `w` whose pages carry mark `k`.
    #[inline]
    pub fn mark_word(&self, k: usize, w: usize) -> u64 {
        match &self.mixed {
            None if self.uniform().has(k) => self.bits[w],
            None => 0,
            Some(maps) => maps.bits[k][w],
        }
    }

    /// Bits of word `w` whose pages carry exactly `marks`.
    #[inline]
    pub fn exact_word(&self, marks: Marks, w: usize) -> u64 {
        match &self.mixed {
            None if self.uniform() == marks => self.bits[w],
            None => 0,
            Some(maps) => {
                let mut e = self.bits[w];
                for k in 0..MARK_COUNT {
                    e &= if marks.has(k) {
                        maps.bits[k][w]
                    } else {
                        !maps.bits[k][w]
                    };
                }
                e
            }
        }
    }

    /// Sets the presence bits of `lo..hi` (no mark bookkeeping: for uniform leaves whose marks
    /// the new pages share). Returns how many were clear.
    ///
    /// A balloon rarely names a page twice, so a word is only counted (a popcount, which
    /// baseline x86-64 does in software, a dozen instructions) when some page of it in the
    /// range was already present; the loop is plain stores otherwise.
    #[inline(always)]
    pub fn set_bits(&mut self, lo: u64, hi: u64) -> u32 {
        let (fw, lw, first, last) = word_masks(lo, hi);
        let b = &mut self.bits;
        let mut had = 0u32;
        if fw == lw {
            had += ones_if_any(b[fw] & first & last);
            b[fw] |= first & last;
        } else {
            had += ones_if_any(b[fw] & first) + ones_if_any(b[lw] & last);
            b[fw] |= first;
            b[lw] |= last;
            for w in fw + 1..lw {
                had += ones_if_any(b[w & 63]);
                b[w & 63] = u64::MAX;
            }
        }
        let added = (hi - lo) as u32 - had;
        self.state += added; // below 4096 + 1: no carry out of the count
        added
    }

    /// Clears the presence bits of `lo..hi` (uniform leaves only). Returns how many were set.
    /// As in `set_bits`, only words with a page of the range missing are counted.
    #[inline(always)]
    pub fn clear_bits(&mut self, lo: u64, hi: u64) -> u32 {
        let (fw, lw, first, last) = word_masks(lo, hi);
        let b = &mut self.bits;
        let mut missing = 0u32;
        if fw == lw {
            missing += ones_if_any(!b[fw] & first & last);
            b[fw] &= !(first & last);
        } else {
            missing += ones_if_any(!b[fw] & first) + ones_if_any(!b[lw] & last);
            b[fw] &= !first;
            b[lw] &= !last;
            for w in fw + 1..lw {
                missing += ones_if_any(!b[w & 63]);
                b[w & 63] = 0;
            }
        }
        let gone = (hi - lo) as u32 - missing;
        self.state -= gone; // at most the count
        gone
    }

    /// Present pages of `lo..hi` (a non-empty range inside the leaf).
    pub fn count_in(&self, lo: u64, hi: u64) -> u16 {
        let mut n = 0;
        for_words(lo, hi, |w, mask| n += (self.bits[w] & mask).count_ones());
        n as u16
    }

    /// Would applying `op` to `lo..hi` need a `MarkMaps` box? (Used to reserve ahead.)
    pub fn needs_maps(&self, op: Op, lo: u64, hi: u64) -> bool {
        if self.mixed.is_some() || self.count() == 0 {
            return false;
        }
        match op {
            Op::Insert(m) => {
                if m == self.uniform() || u64::from(self.count()) == LEAF_PAGES {
                    return false;
                }
                let mut absent = 0u32;
                for_words(lo, hi, |w, mask| {
                    absent += (mask & !self.bits[w]).count_ones()
                });
                absent != 0
            }
            Op::Remove => false,
            Op::SetMark(k) | Op::ClearMark(k) => {
                let has = self.uniform().has(k);
                if matches!(op, Op::SetMark(_)) == has {
                    return false;
                }
                let mut sel = 0u32;
                for_words(lo, hi, |w, mask| sel += (self.bits[w] & mask).count_ones());
                sel != 0 && sel != u32::from(self.count())
            }
        }
    }

    fn make_mixed(&mut self, pool: &mut Pool) {
        let mut maps = pool.take_maps();
        for k in 0..MARK_COUNT {
            maps.bits[k] = if self.uniform().has(k) {
                self.bits
            } else {
                [0; WORDS]
            };
        }
        for k in 0..MARK_COUNT {
            maps.counts[k] = if self.uniform().has(k) {
                self.count()
            } else {
                0
            };
        }
        self.mixed = Some(maps);
        self.state = u32::from(self.count()) | STATE_MIXED;
    }

    /// Drops the mark bitmaps once every mark is on all present pages or on none.
    fn normalise(&mut self) {
        let Some(maps) = &self.mixed else {
            return;
        };
        let mut u = Marks::NONE;
        for k in 0..MARK_COUNT {
            if maps.counts[k] == self.count() && self.count() > 0 {
                u = u.with(k);
            } else if maps.counts[k] != 0 {
                return;
            }
        }
        self.state = u32::from(self.count()) | u32::from(u.0) << MARKS_SHIFT;
        self.mixed = None;
    }

    /// Applies `op` to page offsets `lo..hi` (`lo < hi <= LEAF_PAGES`); mark bitmaps, if the
    /// pages' marks stop being uniform, come from `pool`.
    pub fn apply(&mut self, op: Op, lo: u64, hi: u64, pool: &mut Pool) -> Delta {
        match op {
            Op::Insert(m) => self.apply_insert(m, lo, hi, pool),
            Op::Remove => self.apply_remove(lo, hi),
            Op::SetMark(k) => self.apply_mark(k, true, lo, hi, pool),
            Op::ClearMark(k) => self.apply_mark(k, false, lo, hi, pool),
        }
    }

    /// `apply` of an insert with marks `m`.
    fn apply_insert(&mut self, m: Marks, lo: u64, hi: u64, pool: &mut Pool) -> Delta {
        let mut delta = Delta::default();
        let mut new = 0u32;
        for_words(lo, hi, |w, mask| new += (mask & !self.bits[w]).count_ones());
        if new == 0 {
            return delta;
        }
        if self.count() == 0 {
            self.set_uniform(m);
        } else if self.mixed.is_none() && self.uniform() != m {
            self.make_mixed(pool);
        }
        let mixed = &mut self.mixed;
        let bits = &mut self.bits;
        for_words(lo, hi, |w, mask| {
            let add = mask & !bits[w];
            bits[w] |= add;
            if let Some(maps) = mixed {
                for k in 0..MARK_COUNT {
                    if m.has(k) {
                        maps.bits[k][w] |= add;
                    }
                }
            }
        });
        self.state += new;
        delta.present = i64::from(new);
        for k in 0..MARK_COUNT {
            if m.has(k) {
                if let Some(maps) = &mut self.mixed {
                    maps.counts[k] += new as u16;
                }
                delta.marks[k] = i64::from(new);
            }
        }
        self.normalise();
        delta
    }

    /// `apply` of a removal.
    fn apply_remove(&mut self, lo: u64, hi: u64) -> Delta {
        let mut delta = Delta::default();
        let mut gone_marks = [0u32; MARK_COUNT];
        let mut gone_pages = 0u32;
        let uniform = self.uniform();
        let mixed = &mut self.mixed;
        let bits = &mut self.bits;
        for_words(lo, hi, |w, mask| {
            let gone_bits = bits[w] & mask;
            if gone_bits == 0 {
                return;
            }
            bits[w] &= !gone_bits;
            let n = gone_bits.count_ones();
            gone_pages += n;
            match mixed {
                None => {
                    for (k, gone) in gone_marks.iter_mut().enumerate() {
                        if uniform.has(k) {
                            *gone += n;
                        }
                    }
                }
                Some(maps) => {
                    for (k, gone) in gone_marks.iter_mut().enumerate() {
                        *gone += (maps.bits[k][w] & gone_bits).count_ones();
                        maps.bits[k][w] &= !gone_bits;
                    }
                }
            }
        });
        self.state -= gone_pages;
        delta.present = -i64::from(gone_pages);
        for (k, gone) in gone_marks.iter().enumerate() {
            if let Some(maps) = &mut self.mixed {
                maps.counts[k] -= *gone as u16;
            }
            delta.marks[k] = -i64::from(*gone);
        }
        if self.count() == 0 {
            self.set_empty();
        } else {
            self.normalise();
        }
        delta
    }

    /// `apply` of setting (`set`) or clearing mark `k`.
    fn apply_mark(&mut self, k: usize, set: bool, lo: u64, hi: u64, pool: &mut Pool) -> Delta {
        let mut delta = Delta::default();
        if self.mixed.is_none() {
            if self.uniform().has(k) == set {
                return delta;
            }
            let mut selected = 0u32;
            for_words(lo, hi, |w, mask| {
                selected += (self.bits[w] & mask).count_ones()
            });
            if selected == 0 {
                return delta;
            }
            if selected == u32::from(self.count()) {
                self.set_uniform(if set {
                    self.uniform().with(k)
                } else {
                    self.uniform().without(k)
                });
                delta.marks[k] = if set {
                    i64::from(selected)
                } else {
                    -i64::from(selected)
                };
                return delta;
            }
            self.make_mixed(pool);
        }
        let mut changed = 0u32;
        if let Some(maps) = &mut self.mixed {
            let bits = &self.bits;
            let map = &mut maps.bits[k];
            for_words(lo, hi, |w, mask| {
                let selected = bits[w] & mask;
                let before = map[w];
                map[w] = if set {
                    before | selected
                } else {
                    before & !selected
                };
                changed += (before ^ map[w]).count_ones();
            });
            if set {
                maps.counts[k] += changed as u16;
            } else {
                maps.counts[k] -= changed as u16;
            }
        }
        delta.marks[k] = if set {
            i64::from(changed)
        } else {
            -i64::from(changed)
        };
        self.normalise();
        delta
    }
}

/// The words of a leaf that `lo..hi` (a non-empty range inside one leaf) touches, and the masks
/// of its bits in the first and the last of them.
#[inline]
fn word_masks(lo: u64, hi: u64) -> (usize, usize, u64, u64) {
    (
        (lo >> 6) as usize & 63,
        ((hi - 1) >> 6) as usize & 63,
        !0u64 << (lo & 63),
        !0u64 >> (63 - ((hi - 1) & 63)),
    )
}
