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
    /// Its working set is growing, or the guest's own counters show pressure: its buffer is
    /// served before the buffers of VMs that are not (idle guests give first).
    pub(crate) busy: bool,
}

/// Cuts the proposals down until they add up to `budget`: every VM keeps its floor (its minimum;
/// all of a frozen VM's proposal); then working sets are served, then busy VMs' buffers, then
/// the other buffers, then idle memory, each tier shared by weight. Returns how far the floors
/// alone exceed the budget.
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
    type Tier = fn(&Assessment) -> (u64, u64);
    let tiers: [Tier; 4] = [
        |a| (a.lo, a.need),
        |a| {
            if a.busy {
                (a.need, a.comfort)
            } else {
                (a.need, a.need)
            }
        },
        |a| {
            if a.busy {
                (a.comfort, a.comfort)
            } else {
                (a.need, a.comfort)
            }
        },
        |a| (a.comfort, a.proposed),
    ];
    for tier in tiers {
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
        let weights: Vec<u64> = assessed.iter().map(|a| a.weight).collect();
        let shares = water_fill(&sizes, &weights, room);
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

/// Shares `room` among claims of `sizes` in proportion to `weights`: each gets
/// `min(size, lambda * weight)` with one `lambda` for all, rounded down (so the shares never add
/// up to more than `room`). A larger own size never gives a smaller share.
fn water_fill(sizes: &[u64], weights: &[u64], room: u64) -> Vec<u64> {
    let mut order: Vec<usize> = (0..sizes.len()).filter(|&i| sizes[i] > 0).collect();
    // Ascending size per weight: the claims that are satisfied first.
    order.sort_unstable_by(|&i, &j| {
        (u128::from(sizes[i]) * u128::from(weights[j]))
            .cmp(&(u128::from(sizes[j]) * u128::from(weights[i])))
    });
    let mut shares = vec![0u64; sizes.len()];
    let mut room = u128::from(room);
    let mut weight_left: u128 = order.iter().map(|&i| u128::from(weights[i])).sum();
    let mut rest = order.as_slice();
    while let Some((&i, tail)) = rest.split_first() {
        let (size, weight) = (u128::from(sizes[i]), u128::from(weights[i]));
        if size * weight_left > room * weight {
            break;
        }
        shares[i] = sizes[i];
        room -= size;
        weight_left -= weight;
        rest = tail;
    }
    // Everyone left is limited by lambda = room / weight_left.
    for &i in rest {
        shares[i] = (room * u128::from(weights[i]) / weight_left) as u64;
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::water_fill;

    #[test]
    fn water_fill_shares_by_weight_and_caps_by_size() {
        assert_eq!(water_fill(&[100, 100], &[1, 1], 100), vec![50, 50]);
        assert_eq!(water_fill(&[100, 100], &[3, 1], 100), vec![75, 25]);
        assert_eq!(water_fill(&[10, 100], &[1, 1], 100), vec![10, 90]);
        assert_eq!(water_fill(&[0, 100], &[1, 1], 50), vec![0, 50]);
        assert_eq!(water_fill(&[7, 7, 7], &[1, 1, 1], 10), vec![3, 3, 3]);
    }
}
