//! One coordinator step: from the current owners, the rebalancer's target
//! and who is in sync, the owners of the next table.
//!
//! Primaryship only moves to a replica that holds every acknowledged write
//! (the current primary, or a backup in sync); a target member that is not in
//! sync yet is first added as a backup and promoted in a later step, once its
//! snapshot has landed. Old in-sync replicas stay until the target's backups
//! are in sync, so redundancy never drops during a migration.

/// Owners (primary first) of one partition in the next table.
///
/// - `primary`: the current primary if it is still a valid member;
/// - `backups`: current backups that are still valid members;
/// - `target`: the rebalancer's owners for the partition;
/// - `in_sync(m)`: whether member `m` holds every acknowledged write.
pub fn next_owners(
    primary: Option<&str>,
    backups: &[&str],
    target: &[String],
    in_sync: impl Fn(&str) -> bool,
) -> Vec<String> {
    next_owners_keeping(primary, backups, target, &in_sync, &in_sync)
}

/// [`next_owners`], where `holds_copy(m)` says that `m` holds a loaded copy
/// that may be complete even if nobody vouched for it yet (for example the
/// primary died before reporting at the current epoch). Until every new
/// backup is in sync, such replicas are kept too: a replica that may be the
/// only holder of acknowledged writes is never dropped.
pub fn next_owners_keeping(
    primary: Option<&str>,
    backups: &[&str],
    target: &[String],
    in_sync: &dyn Fn(&str) -> bool,
    holds_copy: &dyn Fn(&str) -> bool,
) -> Vec<String> {
    let Some(t_primary) = target.first() else {
        return primary.map(|p| vec![p.to_string()]).unwrap_or_default();
    };
    let new_primary: String = match primary {
        Some(p) if p == t_primary => p.to_string(),
        Some(_) if backups.contains(&t_primary.as_str()) && in_sync(t_primary) => t_primary.clone(),
        Some(p) => p.to_string(),
        None => {
            // Failover: promote the target primary if it is an in-sync backup,
            // else any in-sync backup, else any surviving backup (a replica
            // that missed writes beats none), else start fresh.
            let synced: Vec<&str> = backups.iter().copied().filter(|b| in_sync(b)).collect();
            if synced.contains(&t_primary.as_str()) {
                t_primary.clone()
            } else if let Some(b) = synced.first() {
                (*b).to_string()
            } else if let Some(b) = backups.first() {
                (*b).to_string()
            } else {
                t_primary.clone()
            }
        }
    };
    let mut out = vec![new_primary.clone()];
    let push = |m: &str, out: &mut Vec<String>| {
        if !out.iter().any(|o| o == m) {
            out.push(m.to_string());
        }
    };
    // The target's replicas (the target primary too, while it syncs).
    for m in target {
        push(m, &mut out);
    }
    // Keep old in-sync replicas until every new backup is in sync.
    let all_synced = out[1..].iter().all(|m| in_sync(m));
    if !all_synced {
        if let Some(p) = primary {
            push(p, &mut out);
        }
        for b in backups {
            if in_sync(b) || holds_copy(b) {
                push(b, &mut out);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn replicas_nobody_vouched_for_yet_are_kept_until_the_target_is_in_sync() {
        // b and c hold copies, but the primary has not reported since the
        // last table: the rebalancer's new backups d and e must not replace
        // them before they are in sync themselves.
        let in_sync = |_: &str| false;
        let holds = |m: &str| m == "b" || m == "c";
        let next = next_owners_keeping(
            Some("a"),
            &["b", "c"],
            &t(&["a", "d", "e"]),
            &in_sync,
            &holds,
        );
        assert_eq!(next, t(&["a", "d", "e", "b", "c"]));
        // Once the target is in sync they go.
        let next = next_owners_keeping(
            Some("a"),
            &["d", "e", "b", "c"],
            &t(&["a", "d", "e"]),
            &|_| true,
            &holds,
        );
        assert_eq!(next, t(&["a", "d", "e"]));
    }

    #[test]
    fn steady_state_is_a_fixed_point() {
        let next = next_owners(Some("a"), &["b"], &t(&["a", "b"]), |_| true);
        assert_eq!(next, t(&["a", "b"]));
    }

    #[test]
    fn failover_promotes_an_in_sync_backup() {
        let next = next_owners(None, &["b", "c"], &t(&["c", "b"]), |m| m == "b");
        assert_eq!(next[0], "b", "c is the target but not in sync");
        let next = next_owners(None, &["b", "c"], &t(&["c", "b"]), |_| true);
        assert_eq!(next[0], "c");
    }

    #[test]
    fn migration_adds_then_promotes() {
        // a -> c: c first joins as backup, a stays primary, b stays (in sync).
        let step1 = next_owners(Some("a"), &["b"], &t(&["c", "b"]), |m| m != "c");
        assert_eq!(step1, t(&["a", "c", "b"]));
        // c synced: c becomes primary; a dropped since all target backups in sync.
        let step2 = next_owners(Some("a"), &["c", "b"], &t(&["c", "b"]), |_| true);
        assert_eq!(step2, t(&["c", "b"]));
    }

    #[test]
    fn new_backup_does_not_drop_old_ones_until_synced() {
        let next = next_owners(Some("a"), &["b"], &t(&["a", "c"]), |m| m != "c");
        assert_eq!(next, t(&["a", "c", "b"]));
        let next = next_owners(Some("a"), &["c", "b"], &t(&["a", "c"]), |_| true);
        assert_eq!(next, t(&["a", "c"]));
    }
}
