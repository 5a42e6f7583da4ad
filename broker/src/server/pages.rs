//! Listings that may outgrow one message, cut into pages by their encoded size. Leases and
//! directories are paged by the namespace, quotas by their rules' keeper, the quarantine
//! listing here; all with [`page_fits`].

use membroker_client::codec::{MAX_PAYLOAD, encoded_len};
use membroker_client::proto::{Extent, PoisonedLease, PoolKind, QuarantineAfter, QuarantineInfo};

/// Whether the next item still fits a page of a listing. Both the wire size and the count
/// are bounded, so a page always decodes within the client's allocation budget
/// (codec::MAX_DECODED).
pub fn page_fits<T>(encoded_len: fn(&T) -> usize) -> impl FnMut(&T) -> bool {
    const MAX_PAGE: usize = 256;
    let budget = MAX_PAYLOAD - 1024;
    let (mut used, mut count) = (0usize, 0usize);
    move |item: &T| {
        used = used.saturating_add(encoded_len(item));
        count += 1;
        used <= budget && count <= MAX_PAGE
    }
}

/// A pool's own quarantine: its name, kind, and quarantined ranges in start order.
#[derive(Debug)]
pub struct PoolQuarantine {
    pub name: String,
    pub kind: PoolKind,
    pub ranges: Vec<Extent>,
}

/// Bytes a pool takes in a page besides its ranges and leases: its name, its kind and the
/// lengths of its two lists (varints of at most 3 bytes below 65 536).
fn pool_len(name: &str) -> usize {
    encoded_len(&name) + 1 + 3 + 3
}

/// A page of the quarantine listing: `pools` in the broker's order, each with its ranges and
/// then its leases in `poisoned` (by pool index, in name order), starting after `after`; and
/// whether more follows. One item — a range or a lease — always fits a page: a lease has at
/// most 64 poison ranges and a 255-byte name. A pool with nothing is listed too.
pub fn quarantine_page(
    pools: Vec<PoolQuarantine>,
    poisoned: Vec<(usize, PoisonedLease)>,
    after: Option<&QuarantineAfter>,
) -> Result<(Vec<QuarantineInfo>, bool), String> {
    let first = match after {
        None => 0,
        Some(a) => pools
            .iter()
            .position(|p| p.name == a.pool)
            .ok_or_else(|| format!("no pool named {:?}", a.pool))?,
    };
    let mut leases: Vec<Vec<PoisonedLease>> = pools.iter().map(|_| Vec::new()).collect();
    for (pool, lease) in poisoned {
        leases[pool].push(lease);
    }
    let mut fits = page_fits::<usize>(|len| *len);
    let (mut out, mut given) = (Vec::new(), 0usize);
    for (i, (pool, mut leases)) in pools.into_iter().zip(leases).enumerate().skip(first) {
        let mut ranges = pool.ranges;
        if i == first
            && let Some(after) = after
        {
            skip_given(&mut ranges, &mut leases, after);
        }
        if !fits(&pool_len(&pool.name)) {
            return Ok((out, true));
        }
        let mut info = QuarantineInfo {
            pool: pool.name,
            kind: pool.kind,
            ranges: Vec::new(),
            leases: Vec::new(),
        };
        for range in ranges {
            if !fits(&encoded_len(&range)) && given > 0 {
                out.extend(Some(info).filter(|p| !p.ranges.is_empty()));
                return Ok((out, true));
            }
            info.ranges.push(range);
            given += 1;
        }
        for lease in leases {
            if !fits(&encoded_len(&lease)) && given > 0 {
                out.extend(Some(info).filter(|p| !p.ranges.is_empty() || !p.leases.is_empty()));
                return Ok((out, true));
            }
            info.leases.push(lease);
            given += 1;
        }
        out.push(info);
    }
    Ok((out, false))
}

/// Drops from a pool's `ranges` and `leases` (in name order) what a client was given.
fn skip_given(ranges: &mut Vec<Extent>, leases: &mut Vec<PoisonedLease>, after: &QuarantineAfter) {
    match &after.lease {
        Some((name, count)) => {
            ranges.clear();
            let before = leases.partition_point(|l| l.name < *name);
            let same = leases[before..]
                .iter()
                .take_while(|l| l.name == *name)
                .count()
                .min(*count as usize);
            leases.drain(..before + same);
        }
        None => {
            if let Some(start) = after.range {
                ranges.retain(|r| r.start > start);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use membroker_client::proto::{PoisonInfo, Response, extend_quarantine};

    fn pools(ranges: usize) -> Vec<PoolQuarantine> {
        let pool = |name: &str, kind, n: usize| PoolQuarantine {
            name: name.into(),
            kind,
            ranges: (0..n as u64)
                .map(|i| Extent {
                    start: 0x1_0000_0000 + i * (4 << 20),
                    len: 2 << 20,
                })
                .collect(),
        };
        vec![
            pool("dax", PoolKind::Devdax, ranges),
            pool("empty", PoolKind::Memfd, 0),
            pool("mem", PoolKind::Memfd, 0),
        ]
    }

    fn poisoned(per_pool: usize) -> Vec<(usize, PoisonedLease)> {
        let lease = |i: usize| PoisonedLease {
            // Pairs share a name, like leases removed while held.
            name: format!("tenant-{:03}/{}", i / 2, "x".repeat(200)),
            poison: (0..64)
                .map(|p| PoisonInfo {
                    offset: p * (8 << 20),
                    len: 2 << 20,
                })
                .collect(),
        };
        [0, 2]
            .into_iter()
            .flat_map(|pool| (0..per_pool).map(move |i| (pool, lease(i))))
            .collect()
    }

    /// Every page, as a client asks for them, merged like the client merges them.
    fn all_pages(ranges: usize, per_pool: usize) -> (Vec<QuarantineInfo>, usize) {
        let (mut all, mut pages) = (Vec::<QuarantineInfo>::new(), 0);
        loop {
            let after = all.last().map(QuarantineAfter::after);
            let (page, more) =
                quarantine_page(pools(ranges), poisoned(per_pool), after.as_ref()).unwrap();
            let reply = Response::QuarantinePage {
                pools: page.clone(),
                more,
            };
            assert!(encoded_len(&reply) <= MAX_PAYLOAD);
            assert!(!page.is_empty());
            pages += 1;
            extend_quarantine(&mut all, page);
            if !more {
                return (all, pages);
            }
        }
    }

    #[test]
    fn a_small_listing_is_one_page_with_every_pool() {
        let (all, pages) = all_pages(3, 2);
        assert_eq!(pages, 1);
        let names: Vec<&str> = all.iter().map(|p| p.pool.as_str()).collect();
        assert_eq!(names, ["dax", "empty", "mem"]);
        assert_eq!((all[0].ranges.len(), all[0].leases.len()), (3, 2));
        assert!(all[1].ranges.is_empty() && all[1].leases.is_empty());
    }

    #[test]
    fn a_long_listing_comes_whole_in_pages() {
        let (ranges, per_pool) = (5_000, 300);
        let (all, pages) = all_pages(ranges, per_pool);
        assert!(pages > 10, "{pages} pages");
        let whole: Vec<QuarantineInfo> = {
            let mut leases: Vec<Vec<PoisonedLease>> = vec![Vec::new(); 3];
            for (pool, lease) in poisoned(per_pool) {
                leases[pool].push(lease);
            }
            pools(ranges)
                .into_iter()
                .zip(leases)
                .map(|(p, leases)| QuarantineInfo {
                    pool: p.name,
                    kind: p.kind,
                    ranges: p.ranges,
                    leases,
                })
                .collect()
        };
        assert_eq!(all, whole);
    }

    #[test]
    fn an_unknown_pool_is_refused() {
        let after = QuarantineAfter {
            pool: "gone".into(),
            range: None,
            lease: None,
        };
        let err = quarantine_page(pools(1), Vec::new(), Some(&after)).unwrap_err();
        assert_eq!(err, "no pool named \"gone\"");
    }
}
