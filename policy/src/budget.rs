//! The budget pass: when the VMs' proposals add up to more than the budget, cut them down by
//! tiers (idle memory first, then the buffers of VMs that are not busy, then busy VMs' buffers,
//! then working sets), each tier shared by weight.

use crate::decision::{Flags, Reason};

/// One VM's proposal before the budget pass.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Assessment {
    /// The observation's target (where the VM stands).
    pub(crate) target: u64,
    pub(crate) lo: u64,
    pub(crate) weight: u64,
    pub(crate) proposed: u64,
    pub(crate) reason: Reason,
    pub(crate) flags: Flags,
    pub(crate) wanted: Option<u64>,
    /// What the budget pass gives first: the working set (below it the guest would OOM or
    /// swap), within `lo..=proposed`. For a frozen VM, its whole proposal.
    pub(crate) need: u64,
    /// What it gives next: `wanted` within `need..=proposed`. Above it is idle memory, cut first.
    pub(crate) comfort: u64,
    /// Headroom the VM has below `need` already: how far its minimum lies above its working set.
    /// Buffers are shared counting it, so an idle guest held at its minimum, with room to spare,
    /// does not take a buffer from a guest that is at its working set.
    pub(crate) spare: u64,
    /// Its working set is growing, or the guest's own counters show pressure: its buffer is
    /// served before the buffers of VMs that are not (idle guests give first).
    pub(crate) busy: bool,
}

/// Cuts the proposals down until they add up to `budget`: every VM keeps its floor (its minimum;
/// all of a frozen VM's proposal); then working sets are served, then busy VMs' buffers, then
/// the other buffers, then idle memory, each tier shared by weight. A buffer tier counts the
/// headroom a VM's minimum already gives it above its working set (`spare`) as buffer it has.
/// Returns how far the floors alone exceed the budget.
///
/// A share that lands less than `2 * granule` above the VM's current target is rounded down to
/// the target, and one less than `granule` below it to `granule` below it: without this, noise in
/// one guest's statistics moves every squeezed VM by a few MiB each tick; the slack a rounded cut
/// leaves absorbs the next small rises, and a VM cut that way is not raised back for the slack.
/// Rounding only ever goes down (the budget holds) and keeps a larger share larger (more pressure
/// still never gives less memory).
pub(crate) fn fit_budget(budget: u64, granule: u64, assessed: &mut [Assessment]) -> u64 {
    let total: u64 = assessed.iter().map(|a| a.proposed).sum();
    if total <= budget {
        return 0;
    }
    let floor = |a: &Assessment| if a.flags.frozen { a.proposed } else { a.lo };
    let floors: u64 = assessed.iter().map(floor).sum();
    let mut room = budget.saturating_sub(floors);
    let mut grant: Vec<u64> = assessed.iter().map(floor).collect();
    /// One tier: each VM's claim `from..to`, and whether its `spare` counts as already given.
    type Tier = (fn(&Assessment) -> (u64, u64), bool);
    let tiers: [Tier; 4] = [
        (|a| (a.lo, a.need), false),
        (
            |a| {
                if a.busy {
                    (a.need, a.comfort)
                } else {
                    (a.need, a.need)
                }
            },
            true,
        ),
        (
            |a| {
                if a.busy {
                    (a.comfort, a.comfort)
                } else {
                    (a.need, a.comfort)
                }
            },
            true,
        ),
        (|a| (a.comfort, a.proposed), false),
    ];
    for (tier, counts_spare) in tiers {
        let sizes: Vec<u64> = assessed
            .iter()
            .map(|a| {
                let (from, to) = tier(a);
                if a.flags.frozen {
                    0
                } else {
                    to.saturating_sub(from)
                }
            })
            .collect();
        let wanted: u64 = sizes.iter().sum();
        if wanted <= room {
            grant.iter_mut().zip(&sizes).for_each(|(g, s)| *g += s);
            room -= wanted;
            continue;
        }
        let claims: Vec<Claim> = assessed
            .iter()
            .zip(&sizes)
            .map(|(a, &size)| Claim {
                size,
                weight: a.weight,
                had: if counts_spare { a.spare } else { 0 },
            })
            .collect();
        let shares = water_fill(&claims, room);
        grant.iter_mut().zip(&shares).for_each(|(g, s)| *g += s);
        break;
    }
    for (a, g) in assessed.iter_mut().zip(grant) {
        let floor = floor(a);
        let g = if g > a.target && g < a.target.saturating_add(2 * granule) {
            a.target
        } else if g < a.target && g > a.target.saturating_sub(granule) {
            a.target.saturating_sub(granule)
        } else {
            g
        }
        .max(floor);
        if g < a.proposed {
            a.proposed = g;
            a.reason = Reason::BudgetSqueeze;
            a.flags.squeezed = true;
        }
    }
    floors.saturating_sub(budget)
}

/// One VM's claim on a tier: `size` MiB at `weight`, of which it counts `had` as given already.
#[derive(Debug, Clone, Copy)]
struct Claim {
    size: u64,
    weight: u64,
    had: u64,
}

/// Shares `room` among the claims by weight, counting what each had: each gets
/// `clamp(lambda * weight - had, 0, size)` with one `lambda` for all (the largest that fits),
/// rounded down, so the shares never add up to more than `room`. A larger own size, or less
/// had, never gives a smaller share.
fn water_fill(claims: &[Claim], room: u64) -> Vec<u64> {
    let mut shares = vec![0u64; claims.len()];
    let live: Vec<usize> = (0..claims.len())
        .filter(|&i| claims[i].size > 0 && claims[i].weight > 0)
        .collect();
    if room == 0 || live.is_empty() {
        return shares;
    }
    // The sum of shares is piecewise linear in lambda, bending where a claim starts to receive
    // (lambda = had / weight) and where it is full ((had + size) / weight). Walk the bends in
    // order; lambda lies in the segment where the sum reaches `room`.
    struct Bend {
        at: (u128, u128), // lambda as a fraction
        claim: usize,
        starts: bool,
    }
    let mut bends: Vec<Bend> = Vec::with_capacity(2 * live.len());
    for &i in &live {
        let c = claims[i];
        let w = u128::from(c.weight);
        bends.push(Bend {
            at: (u128::from(c.had), w),
            claim: i,
            starts: true,
        });
        bends.push(Bend {
            at: (u128::from(c.had) + u128::from(c.size), w),
            claim: i,
            starts: false,
        });
    }
    // By value, starts before ends at the same value (an empty segment is harmless either way).
    bends.sort_unstable_by(|x, y| {
        (x.at.0 * y.at.1)
            .cmp(&(y.at.0 * x.at.1))
            .then(y.starts.cmp(&x.starts))
    });
    let (mut full, mut active_w, mut active_had) = (0u128, 0u128, 0u128);
    let room = u128::from(room);
    let mut lambda = None;
    for b in &bends {
        // Does the sum reach `room` by this bend (full + lambda * active_w - active_had, on the
        // segment that ends here)? Then lambda is on that segment, where active_w > 0 (a flat
        // segment's sum is the previous bend's, which was short of `room`).
        let (p, q) = b.at;
        if full * q + p * active_w >= (room + active_had) * q {
            lambda = Some((room + active_had - full, active_w));
            break;
        }
        let c = claims[b.claim];
        if b.starts {
            active_w += u128::from(c.weight);
            active_had += u128::from(c.had);
        } else {
            active_w -= u128::from(c.weight);
            active_had -= u128::from(c.had);
            full += u128::from(c.size);
        }
    }
    // Past every bend the sum is the sum of sizes, which the caller knows exceeds `room`, so
    // lambda was found; without it every claim fits whole.
    let Some((num, den)) = lambda else {
        for &i in &live {
            shares[i] = claims[i].size;
        }
        return shares;
    };
    for &i in &live {
        let c = claims[i];
        let reach = num * u128::from(c.weight) / den;
        shares[i] = reach
            .saturating_sub(u128::from(c.had))
            .min(u128::from(c.size)) as u64;
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::{water_fill, Claim};

    fn fill(sizes: &[u64], weights: &[u64], had: &[u64], room: u64) -> Vec<u64> {
        let claims: Vec<Claim> = (0..sizes.len())
            .map(|i| Claim {
                size: sizes[i],
                weight: weights[i],
                had: had[i],
            })
            .collect();
        water_fill(&claims, room)
    }

    #[test]
    fn water_fill_shares_by_weight_and_caps_by_size() {
        let none = [0, 0, 0];
        assert_eq!(fill(&[100, 100], &[1, 1], &none[..2], 100), vec![50, 50]);
        assert_eq!(fill(&[100, 100], &[3, 1], &none[..2], 100), vec![75, 25]);
        assert_eq!(fill(&[10, 100], &[1, 1], &none[..2], 100), vec![10, 90]);
        assert_eq!(fill(&[0, 100], &[1, 1], &none[..2], 50), vec![0, 50]);
        assert_eq!(fill(&[7, 7, 7], &[1, 1, 1], &none, 10), vec![3, 3, 3]);
    }

    #[test]
    fn water_fill_counts_what_a_claim_had() {
        // Two idle guests held at their minimum with 165 MiB of headroom each, one at its working
        // set with none: 244 MiB of room goes mostly to the one that has no headroom.
        let shares = fill(&[244, 93, 93], &[1, 1, 1], &[0, 165, 165], 244);
        assert_eq!(
            shares,
            vec![191, 26, 26],
            "(244 + 2 * 165) / 3 = 191.3 each, rounded down"
        );
        // Equal headroom: equal shares, as without it.
        assert_eq!(fill(&[100, 100], &[1, 1], &[40, 40], 100), vec![50, 50]);
        // Headroom beyond the whole tier: nothing more until the others reach it.
        assert_eq!(fill(&[100, 100], &[1, 1], &[0, 500], 100), vec![100, 0]);
    }
}
