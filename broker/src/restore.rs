//! Start-up: from the journal and the inherited fds to pools and a namespace.
//!
//! The one place a restart is put back together, memfd and device-dax pools side by side:
//!
//! 1. every lease in the journal must have its pool configured (leases are never dropped
//!    silently);
//! 2. each pool is opened; a device-dax pool the journal knows keeps its devices;
//! 3. each pool takes its leases back: a memfd lease from the fd the previous broker handed
//!    over (upgrade) or systemd kept (fd store); a device-dax lease from its device in sysfs,
//!    which persists by itself (`pool/devdax/restore.rs`);
//! 4. inherited memfds no lease claims are closed and dropped from systemd's fd store;
//! 5. the namespace gets its directories and the leases back, the leases held by nobody until
//!    their holders re-attach;
//! 6. leases whose memory did not survive are journaled as freed, and the journal is compacted.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::error::error_chain;
use crate::journal::{Journal, Record, Replayed, ReplayedLease};
use crate::namespace::{Namespace, PoolAccount};
use crate::notify::Notifier;
use crate::pool::{Allocation, Pool, PoolSpec, Restored, memfd};

/// Leases named one by one in the log when lost; the rest are counted.
const NAMED_LOSSES: usize = 20;

/// Opens the pools `specs` describes and puts back what `replayed` (the journal) says they
/// held. `fds`: memfds inherited from the previous broker or systemd's fd store, by lease id.
pub fn restore(
    specs: &[PoolSpec],
    replayed: &Replayed,
    mut fds: HashMap<u64, OwnedFd>,
    journal: &Arc<Journal>,
    scrub_workers: usize,
    notifier: Option<&Notifier>,
) -> Result<(Vec<Pool>, Namespace), String> {
    for l in replayed.leases.values() {
        if !specs.iter().any(|s| s.name() == l.lease.pool) {
            return Err(format!(
                "the journal {} has lease {} in pool {}, which is not configured; add the pool \
                 again (leases are never dropped silently)",
                journal.path().display(),
                l.lease.name,
                l.lease.pool
            ));
        }
    }
    let mut pools: Vec<Pool> = Vec::new();
    let (mut memory, mut lost) = (Vec::new(), Vec::new());
    for spec in specs {
        let name = spec.name();
        if let Some(n) = notifier {
            n.step(&format!("restoring pool {name}"));
        }
        if pools.iter().any(|p| p.name == name) {
            return Err(format!("pool {name} is configured twice"));
        }
        let leases: Vec<&ReplayedLease> = replayed
            .leases
            .values()
            .filter(|l| l.lease.pool == name)
            .collect();
        let quarantine: Vec<_> = replayed
            .quarantine
            .iter()
            .filter(|(p, _)| p == name)
            .map(|(_, e)| *e)
            .collect();
        let creating: Vec<_> = replayed
            .creating
            .iter()
            .filter(|(p, _)| p == name)
            .map(|(_, e)| e.clone())
            .collect();
        let known = !leases.is_empty() || !quarantine.is_empty() || !creating.is_empty();
        let pool = Pool::open(spec, scrub_workers, Some(journal.clone()), known)
            .map_err(|e| error_chain(&e))?;
        let restored = match pool.devdax() {
            None => memfd_leases(&leases, &mut fds),
            Some(dax) => dax.restore(&leases, &quarantine, &creating),
        };
        tracing::info!(
            pool = %pool.describe(),
            restored = restored.memory.len(),
            lost = restored.lost.len(),
            rescrubbing = restored.rescrubbing,
            unknown_devices = ?restored.unknown,
            "pool ready"
        );
        memory.extend(restored.memory);
        lost.extend(restored.lost);
        pools.push(pool);
    }
    // Memfds that belong to no lease (freed just before a crash, or a dropped torn record):
    // close them, and drop them from systemd's fd store so their memory is really freed.
    for id in fds.keys() {
        tracing::warn!(
            id,
            "an inherited memfd belongs to no lease in the journal; closed"
        );
        if let Some(n) = notifier {
            n.remove(*id);
        }
    }
    drop(fds);

    let accounts = pools.iter().map(PoolAccount::of).collect();
    let mut ns = Namespace::new(accounts, replayed.next_id);
    for dir in replayed.dirs.values() {
        ns.restore_dir(dir);
    }
    for (id, memory) in memory {
        let lease = &replayed.leases[&id];
        // A memfd's inode keeps its owner and mode; a device rebound after a crash has a
        // fresh node (root, 0600): give the memory its lease's owner again either way.
        let l = &lease.lease;
        if let Some(pool) = pools.iter().find(|p| p.name == l.pool)
            && let Err(e) = pool.set_owner(&memory, l.uid, l.gid, l.mode)
        {
            tracing::warn!(lease = %l.name, error = %error_chain(&e), "cannot give the lease memory its owner back");
        }
        if let Err(why) = ns.restore(lease, memory) {
            lost.push((id, format!("cannot restore it: {why}")));
        }
    }
    for (i, (id, why)) in lost.iter().enumerate() {
        if i < NAMED_LOSSES {
            let lease = &replayed.leases[id];
            tracing::error!(lease = %lease.lease.name, id, why, "lease lost across the restart");
        }
        if let Some(n) = notifier {
            n.remove(*id);
        }
    }
    if lost.len() > NAMED_LOSSES {
        tracing::error!(
            more = lost.len() - NAMED_LOSSES,
            "more leases lost across the restart"
        );
    }
    // Directories the namespace made for leases of an older journal or removed with the
    // leases that were lost, then the losses.
    ns.prune_empty_dirs();
    let mut freed: Vec<Record> = ns.take_records();
    freed.extend(lost.iter().map(|(id, _)| Record::Freed { id: *id }));
    if let Err(e) = journal.append_all(&freed) {
        tracing::error!(error = %error_chain(&e), "cannot journal the lost leases as freed");
    }
    if let Some(n) = notifier {
        n.step("compacting the journal");
    }
    if let Err(e) = journal.compact() {
        tracing::error!(error = %error_chain(&e), "journal compaction at start failed");
    }
    Ok((pools, ns))
}

/// A memfd pool's leases: each from the fd handed over under its id.
fn memfd_leases(leases: &[&ReplayedLease], fds: &mut HashMap<u64, OwnedFd>) -> Restored {
    let mut restored = Restored::default();
    for l in leases {
        let id = l.lease.id;
        match fds.remove(&id) {
            Some(fd) => match memfd::adopt(fd, l.lease.size) {
                Ok(fd) => restored.memory.push((
                    id,
                    Allocation {
                        fd,
                        extents: l.lease.extents.clone(),
                        device: None,
                    },
                )),
                Err(why) => restored.lost.push((id, why)),
            },
            None => restored.lost.push((
                id,
                "its memfd did not survive the broker restart (no `membroker upgrade` hand-over \
                 and no systemd fd store)"
                    .into(),
            )),
        }
    }
    restored
}
