//! Pure helpers that turn what the guest sent into ranges the backend can take.
//!
//! [`coalesce_pfns`] sorts a buffer of PFNs, drops duplicates and merges runs;
//! [`clip_to_ram`] cuts a range to the parts that lie in guest RAM. Both are property-tested
//! against plain models below.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::backend::{PageRange, PAGE_SHIFT};

/// Sorts `pfns` in place and appends the coalesced runs to `out`. Returns how many entries were
/// duplicates of an earlier one (they are dropped, not passed on).
pub fn coalesce_pfns(pfns: &mut [u32], out: &mut Vec<PageRange>) -> u64 {
    pfns.sort_unstable();
    let mut duplicates = 0;
    let mut run: Option<PageRange> = None;
    let mut last: Option<u32> = None;
    for &pfn in pfns.iter() {
        if last == Some(pfn) {
            duplicates += 1;
            continue;
        }
        last = Some(pfn);
        let pfn = u64::from(pfn);
        match run.as_mut() {
            Some(r) if r.end() == pfn => r.count += 1,
            _ => {
                if let Some(r) = run.take() {
                    out.push(r);
                }
                run = Some(PageRange::new(pfn, 1));
            }
        }
    }
    if let Some(r) = run {
        out.push(r);
    }
    duplicates
}

/// Appends the parts of `range` that lie in guest RAM to `out` (split where regions are not
/// contiguous) and returns how many of its pages lie outside.
pub fn clip_to_ram<M: GuestMemoryBackend>(
    mem: &M,
    range: PageRange,
    out: &mut Vec<PageRange>,
) -> u64 {
    let mut refused = 0u64;
    let mut cur = range.start.0;
    let end = range.end();
    while cur < end {
        let addr = match cur.checked_shl(PAGE_SHIFT) {
            Some(a) if a >> PAGE_SHIFT == cur => GuestAddress(a),
            _ => {
                refused += end - cur;
                break;
            }
        };
        if let Some(region) = mem.find_region(addr) {
            // Pages wholly inside this region.
            let region_end_pfn = (region.start_addr().0.saturating_add(region.len())) >> PAGE_SHIFT;
            let stop = end.min(region_end_pfn);
            if stop <= cur {
                // A region not page aligned at its end: the partial page is not RAM for us.
                refused += 1;
                cur += 1;
                continue;
            }
            push_merged(out, PageRange::new(cur, stop - cur));
            cur = stop;
        } else {
            // Skip to the next region start, if any lies inside the range.
            let next = mem
                .iter()
                .map(|r| r.start_addr().0)
                .filter(|&s| s > addr.0)
                .min()
                .map(|s| s.div_ceil(1 << PAGE_SHIFT))
                .unwrap_or(u64::MAX);
            let stop = end.min(next);
            refused += stop - cur;
            cur = stop;
        }
    }
    refused
}

fn push_merged(out: &mut Vec<PageRange>, r: PageRange) {
    if let Some(last) = out.last_mut() {
        if last.end() == r.start.0 {
            last.count += r.count;
            return;
        }
    }
    out.push(r);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;
    use vm_memory::GuestMemoryMmap;

    use super::*;

    fn expand(ranges: &[PageRange]) -> Vec<u64> {
        ranges.iter().flat_map(|r| r.start.0..r.end()).collect()
    }

    proptest! {
        #[test]
        fn coalesce_matches_btreeset(mut pfns in proptest::collection::vec(0u32..600, 0..300)) {
            let model: BTreeSet<u64> = pfns.iter().map(|&p| u64::from(p)).collect();
            let mut out = Vec::new();
            let dups = coalesce_pfns(&mut pfns, &mut out);
            prop_assert_eq!(dups as usize, pfns.len() - model.len());
            prop_assert_eq!(expand(&out), model.into_iter().collect::<Vec<_>>());
            // Maximal runs: no two adjacent ranges touch.
            for w in out.windows(2) {
                prop_assert!(w[0].end() < w[1].start.0);
            }
        }

        #[test]
        fn clip_matches_per_page_check(start in 0u64..0x500, count in 0u64..0x400) {
            // RAM at pages 0x100..0x200 and 0x300..0x380.
            let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0x100 << 12), 0x100 << 12),
                (GuestAddress(0x300 << 12), 0x80 << 12),
            ]).unwrap();
            let mut out = Vec::new();
            let refused = clip_to_ram(&mem, PageRange::new(start, count), &mut out);
            let inside: Vec<u64> = (start..start + count)
                .filter(|p| (0x100..0x200).contains(p) || (0x300..0x380).contains(p))
                .collect();
            prop_assert_eq!(refused, count - inside.len() as u64);
            prop_assert_eq!(expand(&out), inside);
        }
    }

    #[test]
    fn clip_handles_absurd_pfns() {
        let mem: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut out = Vec::new();
        assert_eq!(
            clip_to_ram(&mem, PageRange::new(u64::MAX - 5, 5), &mut out),
            5
        );
        assert!(out.is_empty());
    }
}
