//! Guest page ranges as the manager takes them, normalised once where guest input enters.
//!
//! A [`PageRanges`] can only be filled by its normaliser: its runs are sorted, disjoint,
//! non-adjacent and inside the [`RamMap`] they were checked against, and it says how many pages
//! it dropped (named twice, or outside guest RAM). The devices build one per guest buffer; the
//! manager walks it as it is, without sorting, merging or checking it again.

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::types::PageRange;
use crate::units::{PAGE_SHIFT, PAGE_SIZE};

/// Guest RAM as sorted, disjoint, non-adjacent spans of whole pages `[start, end)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RamMap {
    spans: Vec<(u64, u64)>,
}

impl RamMap {
    /// RAM made of `ranges`, in any order; overlapping or touching ranges merge.
    pub fn new(ranges: impl IntoIterator<Item = PageRange>) -> RamMap {
        let mut spans: Vec<(u64, u64)> = ranges
            .into_iter()
            .filter(|r| !r.is_empty())
            .map(|r| (r.start.0, r.end()))
            .collect();
        spans.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
        for (a, b) in spans {
            match out.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => out.push((a, b)),
            }
        }
        RamMap { spans: out }
    }

    /// The whole pages of every region of `mem` (a region's partial first or last page is not
    /// RAM for a page request).
    pub fn from_guest_memory<M: GuestMemoryBackend>(mem: &M) -> RamMap {
        RamMap::new(mem.iter().filter_map(|r| {
            let start = r.start_addr().0.div_ceil(PAGE_SIZE);
            let end = r.start_addr().0.saturating_add(r.len()) >> PAGE_SHIFT;
            (start < end).then(|| PageRange::new(start, end - start))
        }))
    }

    /// The spans, in address order.
    pub fn spans(&self) -> impl Iterator<Item = PageRange> + '_ {
        self.spans.iter().map(|&(a, b)| PageRange::new(a, b - a))
    }

    /// Whether page `pfn` is RAM.
    pub fn contains(&self, pfn: u64) -> bool {
        let i = self.spans.partition_point(|s| s.1 <= pfn);
        self.spans.get(i).is_some_and(|s| s.0 <= pfn)
    }
}

/// Sorted, disjoint, non-adjacent page runs inside guest RAM, with what normalising dropped.
///
/// Reuse one across requests ([`PageRanges::set_pfns`], [`PageRanges::set_ranges`] keep its
/// allocation): the balloon's ack path does not allocate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageRanges {
    runs: Vec<PageRange>,
    duplicates: u64,
    outside_ram: u64,
    first_outside: Option<u64>,
}

impl PageRanges {
    /// No pages.
    pub fn new() -> PageRanges {
        PageRanges::default()
    }

    /// No pages, with room for `runs` runs.
    pub fn with_capacity(runs: usize) -> PageRanges {
        PageRanges {
            runs: Vec::with_capacity(runs),
            ..PageRanges::default()
        }
    }

    /// The pages of `ranges` (any order, overlaps allowed) that lie in `ram`.
    pub fn from_ranges(ranges: &[PageRange], ram: &RamMap) -> PageRanges {
        let mut scratch = ranges.to_vec();
        let mut out = PageRanges::with_capacity(ranges.len());
        out.set_ranges(&mut scratch, ram);
        out
    }

    /// Replaces the contents with the pages named in `pfns` (a balloon buffer; sorted in place)
    /// that lie in `ram`.
    pub fn set_pfns(&mut self, pfns: &mut [u32], ram: &RamMap) {
        self.clear();
        pfns.sort_unstable();
        let mut clip = Clipper::new(ram);
        let mut run: Option<(u64, u64)> = None;
        let mut last: Option<u32> = None;
        for &pfn in pfns.iter() {
            if last == Some(pfn) {
                self.duplicates += 1;
                continue;
            }
            last = Some(pfn);
            let p = u64::from(pfn);
            match run.as_mut() {
                Some(r) if r.1 == p => r.1 += 1,
                _ => {
                    if let Some((a, b)) = run.replace((p, p + 1)) {
                        clip.push(self, a, b);
                    }
                }
            }
        }
        if let Some((a, b)) = run {
            clip.push(self, a, b);
        }
    }

    /// Replaces the contents with the pages of `ranges` (any order, overlaps allowed; sorted
    /// in place) that lie in `ram`. Pages named by more than one range count as duplicates;
    /// pages past the end of the 64-bit PFN space as outside RAM.
    pub fn set_ranges(&mut self, ranges: &mut [PageRange], ram: &RamMap) {
        self.clear();
        if !ranges.is_sorted_by_key(|r| r.start) {
            ranges.sort_unstable_by_key(|r| r.start);
        }
        let mut clip = Clipper::new(ram);
        let mut run: Option<(u64, u64)> = None;
        // Pages past u64::MAX: (count, first), added once the runs are in.
        let mut beyond = (0u64, None::<u64>);
        for r in ranges.iter() {
            let (a, b) = (r.start.0, r.end());
            if r.count > b - a {
                beyond.0 += r.count - (b - a);
                beyond.1.get_or_insert(b);
            }
            if a == b {
                continue;
            }
            match run.as_mut() {
                Some(cur) if a <= cur.1 => {
                    self.duplicates += cur.1.min(b) - a;
                    cur.1 = cur.1.max(b);
                }
                _ => {
                    if let Some((x, y)) = run.replace((a, b)) {
                        clip.push(self, x, y);
                    }
                }
            }
        }
        if let Some((x, y)) = run {
            clip.push(self, x, y);
        }
        if let Some(first) = beyond.1 {
            self.outside_ram += beyond.0;
            self.first_outside = Some(self.first_outside.map_or(first, |f| f.min(first)));
        }
    }

    /// Empties it (keeping its allocation).
    pub fn clear(&mut self) {
        self.runs.clear();
        self.duplicates = 0;
        self.outside_ram = 0;
        self.first_outside = None;
    }

    /// The runs, sorted, disjoint and non-adjacent.
    pub fn as_slice(&self) -> &[PageRange] {
        &self.runs
    }

    /// Whether no page is left (there may still be dropped ones).
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Pages in the runs.
    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|r| r.count).sum()
    }

    /// Pages named more than once (dropped: each page counts once).
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Pages outside guest RAM (dropped).
    pub fn outside_ram(&self) -> u64 {
        self.outside_ram
    }

    /// The first page outside guest RAM, for a message.
    pub fn first_outside(&self) -> Option<u64> {
        self.first_outside
    }

    fn note_outside(&mut self, first: u64, pages: u64) {
        self.outside_ram += pages;
        self.first_outside.get_or_insert(first);
    }
}

/// Cuts increasing runs to RAM, walking the RAM spans once.
struct Clipper<'a> {
    spans: &'a [(u64, u64)],
    i: usize,
}

impl<'a> Clipper<'a> {
    fn new(ram: &'a RamMap) -> Self {
        Clipper {
            spans: &ram.spans,
            i: 0,
        }
    }

    /// Appends the parts of `a..b` in RAM to `out` and counts the rest as outside. Runs must
    /// come in increasing order.
    fn push(&mut self, out: &mut PageRanges, a: u64, b: u64) {
        let mut pos = a;
        while pos < b {
            while self.i < self.spans.len() && self.spans[self.i].1 <= pos {
                self.i += 1;
            }
            match self.spans.get(self.i) {
                Some(&(s, e)) if s < b => {
                    if pos < s {
                        out.note_outside(pos, s - pos);
                        pos = s;
                    }
                    let end = e.min(b);
                    match out.runs.last_mut() {
                        Some(last) if last.end() == pos => last.count += end - pos,
                        _ => out.runs.push(PageRange::new(pos, end - pos)),
                    }
                    pos = end;
                }
                _ => {
                    out.note_outside(pos, b - pos);
                    pos = b;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;

    fn ram() -> RamMap {
        // Pages 0x100..0x200 and 0x300..0x380.
        RamMap::new([PageRange::new(0x300, 0x80), PageRange::new(0x100, 0x100)])
    }

    fn in_ram(p: u64) -> bool {
        (0x100..0x200).contains(&p) || (0x300..0x380).contains(&p)
    }

    fn expand(r: &PageRanges) -> Vec<u64> {
        r.as_slice()
            .iter()
            .flat_map(|r| r.start.0..r.end())
            .collect()
    }

    fn check_shape(r: &PageRanges) -> Result<(), TestCaseError> {
        for w in r.as_slice().windows(2) {
            prop_assert!(w[0].end() < w[1].start.0, "sorted, disjoint, non-adjacent");
        }
        prop_assert!(r.as_slice().iter().all(|x| x.count > 0));
        Ok(())
    }

    proptest! {
        #[test]
        fn pfns_match_a_set_model(mut pfns in proptest::collection::vec(0u32..0x400, 0..300)) {
            let model: BTreeSet<u64> = pfns.iter().map(|&p| u64::from(p)).collect();
            let mut r = PageRanges::new();
            r.set_pfns(&mut pfns, &ram());
            check_shape(&r)?;
            let inside: Vec<u64> = model.iter().copied().filter(|&p| in_ram(p)).collect();
            prop_assert_eq!(expand(&r), inside.clone());
            prop_assert_eq!(r.duplicates() as usize, pfns.len() - model.len());
            prop_assert_eq!(r.outside_ram() as usize, model.len() - inside.len());
            prop_assert_eq!(r.first_outside(), model.iter().copied().find(|&p| !in_ram(p)));
        }

        #[test]
        fn ranges_match_a_set_model(
            mut ranges in proptest::collection::vec((0u64..0x400, 0u64..0x100), 0..8)
                .prop_map(|v| v.into_iter().map(|(a, n)| PageRange::new(a, n)).collect::<Vec<_>>())
        ) {
            let named: u64 = ranges.iter().map(|r| r.count).sum();
            let model: BTreeSet<u64> = ranges.iter().flat_map(|r| r.start.0..r.end()).collect();
            let mut r = PageRanges::new();
            r.set_ranges(&mut ranges, &ram());
            check_shape(&r)?;
            let inside: Vec<u64> = model.iter().copied().filter(|&p| in_ram(p)).collect();
            prop_assert_eq!(expand(&r), inside.clone());
            prop_assert_eq!(r.duplicates(), named - model.len() as u64);
            prop_assert_eq!(r.outside_ram(), (model.len() - inside.len()) as u64);
        }
    }

    #[test]
    fn absurd_ranges_are_outside_ram() {
        let r = PageRanges::from_ranges(&[PageRange::new(u64::MAX - 5, 10)], &ram());
        assert!(r.is_empty());
        assert_eq!(r.outside_ram(), 10);
        assert_eq!(r.first_outside(), Some(u64::MAX - 5));
    }

    #[test]
    fn ram_map_takes_whole_pages_of_guest_memory() {
        let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x1800),
            (GuestAddress(0x20800), 0x2000),
        ])
        .unwrap();
        let ram = RamMap::from_guest_memory(&mem);
        // 0..0x11 merged (contiguous regions), 0x21 only (0x20800..0x22800 holds one whole page).
        assert_eq!(
            ram.spans().collect::<Vec<_>>(),
            vec![PageRange::new(0, 0x11), PageRange::new(0x21, 1)]
        );
        assert!(ram.contains(0x10) && !ram.contains(0x11) && ram.contains(0x21));
    }
}
