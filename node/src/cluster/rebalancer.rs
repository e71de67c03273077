//! The rebalancer: a balanced target assignment with minimal movement.
//!
//! Primaries: every eligible member gets `floor(P/n)` or `ceil(P/n)`
//! partitions (max - min <= 1); the members that already hold the most keep
//! the larger quotas. A current primary keeps its partition while under
//! quota; an orphaned partition goes first to one of its current backups
//! (which holds the data), else to the least loaded member. Backups are
//! assigned the same way, never on the partition's primary.

use std::collections::HashMap;

/// Target owners (primary first) for every partition.
pub fn assign(
    partition_count: u32,
    backup_count: u32,
    eligible: &[String],
    current: &[Vec<String>],
) -> Vec<Vec<String>> {
    let p_count = partition_count as usize;
    let n = eligible.len();
    if n == 0 {
        return vec![Vec::new(); p_count];
    }
    let is_eligible = |m: &str| eligible.iter().any(|e| e == m);
    let cur = |p: usize| current.get(p).map_or(&[][..], |v| v.as_slice());

    // --- primaries
    let pquotas = quotas(p_count, eligible, |m| {
        (0..p_count)
            .filter(|&p| cur(p).first().map(String::as_str) == Some(m))
            .count()
    });
    let mut load: HashMap<&str, usize> = eligible.iter().map(|m| (m.as_str(), 0)).collect();
    let mut primary: Vec<Option<String>> = vec![None; p_count];
    for (p, slot) in primary.iter_mut().enumerate() {
        if let Some(m) = cur(p).first().filter(|m| is_eligible(m))
            && load[m.as_str()] < pquotas[m.as_str()]
        {
            *load.get_mut(m.as_str()).expect("eligible") += 1;
            *slot = Some(m.clone());
        }
    }
    for (p, slot) in primary.iter_mut().enumerate() {
        if slot.is_some() {
            continue;
        }
        let from_backups = cur(p)
            .iter()
            .skip(1)
            .find(|m| is_eligible(m) && load[m.as_str()] < pquotas[m.as_str()]);
        let pick = match from_backups {
            Some(m) => m.clone(),
            None => {
                least(eligible, &load, &pquotas, |_| true).unwrap_or_else(|| eligible[0].clone())
            }
        };
        *load.get_mut(pick.as_str()).expect("eligible") += 1;
        *slot = Some(pick);
    }
    let primary: Vec<String> = primary.into_iter().map(|p| p.unwrap_or_default()).collect();

    // --- backups
    let r = (backup_count as usize).min(n - 1);
    let mut owners: Vec<Vec<String>> = primary.iter().map(|p| vec![p.clone()]).collect();
    if r == 0 {
        return owners;
    }
    let bquotas = quotas(p_count * r, eligible, |m| {
        (0..p_count)
            .filter(|&p| cur(p).iter().skip(1).any(|b| b == m))
            .count()
    });
    let mut bload: HashMap<&str, usize> = eligible.iter().map(|m| (m.as_str(), 0)).collect();
    for (p, o) in owners.iter_mut().enumerate() {
        for m in cur(p).iter() {
            if o.len() > r {
                break;
            }
            if is_eligible(m) && !o.contains(m) && bload[m.as_str()] < bquotas[m.as_str()] {
                *bload.get_mut(m.as_str()).expect("eligible") += 1;
                o.push(m.clone());
            }
        }
    }
    for o in owners.iter_mut() {
        while o.len() <= r {
            let pick =
                least(eligible, &bload, &bquotas, |m| !o.iter().any(|x| x == m)).or_else(|| {
                    // Every member with room is already a replica: take the
                    // least loaded member that is not.
                    eligible
                        .iter()
                        .filter(|m| !o.contains(m))
                        .min_by_key(|m| (bload[m.as_str()], m.as_str()))
                        .cloned()
                });
            let Some(pick) = pick else { break };
            *bload.get_mut(pick.as_str()).expect("eligible") += 1;
            o.push(pick);
        }
    }
    // Fix-up: move backup slots from the most to the least loaded member
    // until the spread is at most one.
    for _ in 0..p_count * r {
        let Some((hi, &hi_n)) = bload
            .iter()
            .max_by_key(|(m, n)| (**n, std::cmp::Reverse(**m)))
        else {
            break;
        };
        let Some((lo, &lo_n)) = bload.iter().min_by_key(|(m, n)| (**n, **m)) else {
            break;
        };
        if hi_n <= lo_n + 1 {
            break;
        }
        let (hi, lo) = (hi.to_string(), lo.to_string());
        let Some(o) = owners
            .iter_mut()
            .find(|o| o[1..].contains(&hi) && !o.contains(&lo))
        else {
            break;
        };
        if let Some(slot) = o[1..].iter_mut().find(|m| **m == hi) {
            *slot = lo.clone();
        }
        *bload.get_mut(hi.as_str()).expect("eligible") -= 1;
        *bload.get_mut(lo.as_str()).expect("eligible") += 1;
    }
    owners
}

/// Splits `total` slots over `members`: (total mod n) members get one more;
/// the members that hold the most now (per `held`) get them.
fn quotas(total: usize, members: &[String], held: impl Fn(&str) -> usize) -> HashMap<&str, usize> {
    let n = members.len();
    let (base, extra) = (total / n, total % n);
    let mut order: Vec<&String> = members.iter().collect();
    order.sort_by_key(|m| (std::cmp::Reverse(held(m)), m.as_str()));
    order
        .into_iter()
        .enumerate()
        .map(|(i, m)| (m.as_str(), base + usize::from(i < extra)))
        .collect()
}

/// The allowed member with room and the lowest load (ties by name).
fn least(
    members: &[String],
    load: &HashMap<&str, usize>,
    quotas: &HashMap<&str, usize>,
    allowed: impl Fn(&str) -> bool,
) -> Option<String> {
    members
        .iter()
        .filter(|m| allowed(m) && load[m.as_str()] < quotas[m.as_str()])
        .min_by_key(|m| (load[m.as_str()], m.as_str()))
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("m{i:04}")).collect()
    }

    fn check_balanced(owners: &[Vec<String>], members: &[String], backups: usize) {
        let r = backups.min(members.len().saturating_sub(1));
        let mut prim: HashMap<&str, usize> = members.iter().map(|m| (m.as_str(), 0)).collect();
        let mut back: HashMap<&str, usize> = members.iter().map(|m| (m.as_str(), 0)).collect();
        for o in owners {
            assert_eq!(o.len(), 1 + r, "replica count {o:?}");
            let mut seen = o.clone();
            seen.sort();
            seen.dedup();
            assert_eq!(seen.len(), o.len(), "a member twice in {o:?}");
            *prim.get_mut(o[0].as_str()).expect("member") += 1;
            for b in &o[1..] {
                *back.get_mut(b.as_str()).expect("member") += 1;
            }
        }
        let spread = |m: &HashMap<&str, usize>| {
            m.values().max().unwrap_or(&0) - m.values().min().unwrap_or(&0)
        };
        assert!(spread(&prim) <= 1, "primaries unbalanced: {prim:?}");
        assert!(spread(&back) <= 1, "backups unbalanced: {back:?}");
    }

    fn moved(a: &[Vec<String>], b: &[Vec<String>]) -> usize {
        a.iter()
            .zip(b)
            .filter(|(x, y)| x.first() != y.first())
            .count()
    }

    proptest! {
        #[test]
        fn balanced_for_any_membership(n in 1usize..40, partitions in 1u32..600, backups in 0u32..3) {
            let members = names(n);
            let owners = assign(partitions, backups, &members, &[]);
            check_balanced(&owners, &members, backups as usize);
        }

        #[test]
        fn join_and_leave_move_the_minimum(n in 2usize..30, backups in 0u32..3, leave in 0usize..30) {
            let partitions = 271u32;
            let members = names(n);
            let before = assign(partitions, backups, &members, &[]);
            // Join: only the newcomer's share of primaries moves.
            let mut joined = members.clone();
            joined.push("zz-new".into());
            let after = assign(partitions, backups, &joined, &before);
            check_balanced(&after, &joined, backups as usize);
            let ideal = partitions as usize / joined.len();
            prop_assert!(moved(&before, &after) <= ideal + 1, "join moved {} (ideal {ideal})", moved(&before, &after));
            // Leave: only the leaver's primaries move.
            let gone = members[leave % n].clone();
            let left: Vec<String> = members.iter().filter(|m| **m != gone).cloned().collect();
            let after = assign(partitions, backups, &left, &before);
            check_balanced(&after, &left, backups as usize);
            let had = before.iter().filter(|o| o[0] == gone).count();
            prop_assert!(moved(&before, &after) <= had, "leave moved {} (had {had})", moved(&before, &after));
        }

        #[test]
        fn stable_when_nothing_changes(n in 1usize..20, backups in 0u32..3) {
            let members = names(n);
            let a = assign(271, backups, &members, &[]);
            let b = assign(271, backups, &members, &a);
            prop_assert_eq!(a, b);
        }
    }

    /// Simulation: grow to 1,000 members in steps, then shrink, checking
    /// balance and that each step moves only the newcomers' (leavers') share.
    #[test]
    fn simulation_up_to_a_thousand_members() {
        let partitions = 1_000u32;
        let mut members: Vec<String> = Vec::new();
        let mut owners: Vec<Vec<String>> = Vec::new();
        let mut next_id = 0;
        for size in [1usize, 2, 3, 5, 8, 13, 30, 60, 125, 250, 500, 1_000] {
            let added = size - members.len();
            while members.len() < size {
                members.push(format!("m{next_id:04}"));
                next_id += 1;
            }
            let next = assign(partitions, 1, &members, &owners);
            check_balanced(&next, &members, 1);
            if !owners.is_empty() {
                let m = moved(&owners, &next);
                let share = (partitions as usize * added).div_ceil(size) + added;
                assert!(
                    m <= share,
                    "growing to {size} moved {m} primaries (share {share})"
                );
            }
            owners = next;
        }
        for size in [900usize, 500, 100, 10, 3, 2, 1] {
            let removed: Vec<String> = members.drain(size..).collect();
            let had = owners.iter().filter(|o| removed.contains(&o[0])).count();
            let next = assign(partitions, 1, &members, &owners);
            check_balanced(&next, &members, 1);
            let m = moved(&owners, &next);
            assert!(
                m <= had + size,
                "shrinking to {size} moved {m} (they had {had})"
            );
            owners = next;
        }
    }
}
