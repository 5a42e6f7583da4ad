//! The lease namespace: names, owners, modes, holders and pool accounting.
//!
//! Pure bookkeeping behind one lock; it never makes memory or does I/O. Creating a lease is
//! two-phase so the (slow) allocation runs outside the lock: [`Namespace::reserve`] checks
//! the request and charges the pool (admission control), then [`Namespace::commit`] or
//! [`Namespace::abort`].

mod access;
mod name;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use membroker_client::PageSize;

use crate::journal::{self, Journal, LeaseRecord, Record as JournalRecord, ReplayedLease};
use crate::pool::Allocation;
use membroker_client::proto::{
    CreateLease, ErrorCode, Extent, HolderInfo, LeaseInfo, LeaseState, PoisonInfo, PoolInfo,
    PoolKind,
};
use membroker_client::size::format_size;

pub use access::{Access, Peer};
pub use name::{check_name, is_under};

/// Why a namespace operation was refused. Messages are for the person at the CLI.
#[derive(Debug, thiserror::Error)]
pub enum NsError {
    #[error("lease {0}: no such lease")]
    NotFound(String),
    #[error("lease {0}: already exists")]
    Exists(String),
    #[error("lease {name}: {other} is a lease, so it cannot also be a directory of leases")]
    NameConflict { name: String, other: String },
    #[error(
        "lease {name}: permission denied to {op} (owner uid {uid}, mode {mode:04o}); ask the owner or an admin"
    )]
    Denied {
        name: String,
        op: &'static str,
        uid: u32,
        mode: u32,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("lease {name}: pool {pool} has {free} free, {asked} asked")]
    NoSpace {
        name: String,
        pool: String,
        free: String,
        asked: String,
    },
    #[error("lease {0}: this connection does not hold it")]
    NotHeld(String),
    #[error("lease {name}: the state journal refused the change, nothing was done: {problem}")]
    Journal { name: String, problem: String },
}

impl NsError {
    /// The wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            NsError::NotFound(_) | NsError::NotHeld(_) => ErrorCode::NotFound,
            NsError::Exists(_) | NsError::NameConflict { .. } => ErrorCode::Exists,
            NsError::Denied { .. } => ErrorCode::PermissionDenied,
            NsError::Invalid(_) => ErrorCode::InvalidArgument,
            NsError::NoSpace { .. } => ErrorCode::NoSpace,
            NsError::Journal { .. } => ErrorCode::Internal,
        }
    }
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, NsError>;

/// A pool as the namespace accounts for it.
#[derive(Debug, Clone)]
pub struct PoolAccount {
    pub name: String,
    pub kind: PoolKind,
    pub page_size: PageSize,
    pub size: u64,
    pub used: u64,
    pub leases: u64,
}

/// A create that passed admission control; finish it with `commit` or `abort`.
#[derive(Debug)]
#[must_use]
pub struct Reservation {
    pub pool: usize,
    pub name: String,
    pub size: u64,
    pub page_size: PageSize,
    uid: u32,
    gid: u32,
    mode: u32,
    persistent: bool,
}

#[derive(Debug)]
struct Record {
    name: String,
    pool: usize,
    size: u64,
    page_size: PageSize,
    uid: u32,
    gid: u32,
    mode: u32,
    persistent: bool,
    created: u64,
    memory: Arc<Allocation>,
    holders: BTreeMap<u64, HolderInfo>,
    poison: Vec<PoisonInfo>,
    removed: bool,
    /// Restored after a broker restart without its holders: a non-persistent lease waits for
    /// them to re-attach until [`Namespace::expire_orphans`].
    orphan: bool,
}

/// Where leases removed while held are kept after a restart (see [`Namespace::restore`]).
pub const REMOVED_PREFIX: &str = ".removed/";

/// A committed lease: its id, its description, its memory.
pub type Committed = (u64, LeaseInfo, Arc<Allocation>);

/// A lease the namespace let go of.
#[derive(Debug)]
pub struct FreedLease {
    pub pool: usize,
    pub id: u64,
    pub memory: Arc<Allocation>,
}

/// Leases to give back to their pools outside the lock (closing or scrubbing may take long).
pub type Freed = Vec<FreedLease>;

/// All leases and pool accounting.
#[derive(Debug)]
pub struct Namespace {
    pools: Vec<PoolAccount>,
    default_pool: usize,
    records: HashMap<u64, Record>,
    names: BTreeMap<String, u64>,
    pending: BTreeSet<String>,
    held: HashMap<u64, BTreeSet<u64>>,
    next_id: u64,
    journal: Option<Arc<Journal>>,
    /// Every quarantined range, per pool name (kept for journal compaction).
    quarantine: Vec<(String, Extent)>,
}

impl Namespace {
    /// A namespace over `pools`; the first is the default.
    pub fn new(pools: Vec<PoolAccount>) -> Namespace {
        Namespace {
            pools,
            default_pool: 0,
            records: HashMap::new(),
            names: BTreeMap::new(),
            pending: BTreeSet::new(),
            held: HashMap::new(),
            next_id: 1,
            journal: None,
            quarantine: Vec::new(),
        }
    }

    /// Journals every change from now on in `journal`.
    pub fn set_journal(&mut self, journal: Arc<Journal>) {
        self.journal = Some(journal);
    }

    /// Appends a record whose loss the caller can tolerate (it is logged).
    fn log(&self, record: &JournalRecord) {
        if let Some(journal) = &self.journal {
            if let Err(e) = journal.append(record) {
                tracing::error!(error = %crate::server::error_chain(&e), ?record, "journal append failed");
            }
        }
        self.maybe_compact();
    }

    fn maybe_compact(&self) {
        let Some(journal) = &self.journal else { return };
        let live = self.records.len() as u64 + self.quarantine.len() as u64;
        if journal.records() > 2 * live + 4096 {
            if let Err(e) = journal.compact(&self.snapshot()) {
                tracing::error!(error = %crate::server::error_chain(&e), "journal compaction failed");
            }
        }
    }

    /// The journal records that rebuild the current state.
    pub fn snapshot(&self) -> Vec<JournalRecord> {
        let mut ids: Vec<&u64> = self.records.keys().collect();
        ids.sort();
        let leases: Vec<ReplayedLease> = ids
            .into_iter()
            .map(|id| {
                let r = &self.records[id];
                ReplayedLease {
                    lease: self.lease_record(*id, r),
                    named: !r.removed,
                    poison: r.poison.clone(),
                    scrubbing: false,
                }
            })
            .collect();
        journal::snapshot(leases.iter(), &self.quarantine)
    }

    fn lease_record(&self, id: u64, r: &Record) -> LeaseRecord {
        LeaseRecord {
            id,
            name: r.name.clone(),
            pool: self.pools[r.pool].name.clone(),
            size: r.size,
            page_size: r.page_size,
            uid: r.uid,
            gid: r.gid,
            mode: r.mode,
            persistent: r.persistent,
            created: r.created,
            extents: r.memory.extents.clone(),
            device: r.memory.device.clone(),
        }
    }

    /// Puts back a lease from the journal, with its memory, held by nobody.
    pub fn restore(
        &mut self,
        replayed: &ReplayedLease,
        memory: Allocation,
    ) -> std::result::Result<(), String> {
        let l = &replayed.lease;
        let pool = self
            .pools
            .iter()
            .position(|p| p.name == l.pool)
            .ok_or_else(|| format!("pool {} is not configured", l.pool))?;
        // A lease removed while held: its holder cannot re-attach by name, yet may still map it
        // (a running guest), so it is never released behind its back. It is kept, persistent,
        // under a reserved name until an operator removes it.
        let name = if replayed.named {
            l.name.clone()
        } else {
            format!("{REMOVED_PREFIX}{}", l.id)
        };
        if self.names.contains_key(&name) {
            return Err(format!("name {name} is taken twice"));
        }
        if !replayed.named {
            tracing::warn!(
                lease = %l.name,
                kept_as = %name,
                "a lease removed while held survived the restart; its holder may still use it: \
                 kept until `membroker rm {name}`"
            );
        }
        let record = Record {
            name: name.clone(),
            pool,
            size: l.size,
            page_size: l.page_size,
            uid: l.uid,
            gid: l.gid,
            mode: l.mode,
            persistent: l.persistent || !replayed.named,
            created: l.created,
            memory: Arc::new(memory),
            holders: BTreeMap::new(),
            poison: replayed.poison.clone(),
            removed: false,
            orphan: true,
        };
        self.pools[pool].used += l.size;
        self.pools[pool].leases += 1;
        self.names.insert(name, l.id);
        self.records.insert(l.id, record);
        self.next_id = self.next_id.max(l.id + 1);
        Ok(())
    }

    /// Remembers quarantined ranges found in the journal.
    pub fn restore_quarantine(&mut self, ranges: &[(String, Extent)]) {
        self.quarantine.extend(ranges.iter().cloned());
    }

    /// Journals a new quarantined range of `pool`.
    pub fn record_quarantine(&mut self, pool: usize, range: Extent) {
        let name = self.pools[pool].name.clone();
        self.log(&JournalRecord::Quarantine {
            pool: name.clone(),
            start: range.start,
            len: range.len,
        });
        self.quarantine.push((name, range));
    }

    /// Ends the grace period after a restart: restored leases nobody re-attached to are
    /// released unless persistent (and still named).
    pub fn expire_orphans(&mut self) -> Freed {
        let orphans: Vec<u64> = self
            .records
            .iter()
            .filter(|(_, r)| r.orphan)
            .map(|(id, _)| *id)
            .collect();
        let mut freed = Vec::new();
        for id in orphans {
            if let Some(r) = self.records.get_mut(&id) {
                r.orphan = false;
            }
            freed.extend(self.free_if_unused(id));
        }
        freed
    }

    fn pool_names(&self) -> String {
        self.pools
            .iter()
            .map(|p| format!("{} ({} pages)", p.name, p.page_size))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn choose_pool(&self, req: &CreateLease) -> Result<usize> {
        let invalid = |m: String| Err(NsError::Invalid(format!("lease {}: {m}", req.name)));
        match (&req.pool, req.page_size) {
            (Some(name), page) => {
                let Some(i) = self.pools.iter().position(|p| &p.name == name) else {
                    return invalid(format!(
                        "no pool named {name:?}; pools: {}",
                        self.pool_names()
                    ));
                };
                match page {
                    Some(page) if page != self.pools[i].page_size => invalid(format!(
                        "pool {name} serves {} pages, {page} asked; pools: {}",
                        self.pools[i].page_size,
                        self.pool_names()
                    )),
                    _ => Ok(i),
                }
            }
            (None, None) => Ok(self.default_pool),
            (None, Some(page)) if self.pools[self.default_pool].page_size == page => {
                Ok(self.default_pool)
            }
            (None, Some(page)) => match self.pools.iter().position(|p| p.page_size == page) {
                Some(i) => Ok(i),
                None => invalid(format!(
                    "no pool serves {page} pages; pools: {}",
                    self.pool_names()
                )),
            },
        }
    }

    fn check_name_free(&self, name: &str) -> Result<()> {
        if self.names.contains_key(name) || self.pending.contains(name) {
            return Err(NsError::Exists(name.to_string()));
        }
        for ancestor in name::ancestors(name) {
            if self.names.contains_key(ancestor) || self.pending.contains(ancestor) {
                return Err(NsError::NameConflict {
                    name: name.to_string(),
                    other: ancestor.to_string(),
                });
            }
        }
        let dir = format!("{name}/");
        let under = |set: &mut dyn Iterator<Item = &String>| {
            set.next().is_some_and(|n| n.starts_with(&dir))
        };
        if under(&mut self.names.range(dir.clone()..).map(|(n, _)| n))
            || under(&mut self.pending.range(dir.clone()..))
        {
            return Err(NsError::NameConflict {
                name: name.to_string(),
                other: format!("{dir}…"),
            });
        }
        Ok(())
    }

    /// Checks a create request and charges its pool.
    pub fn reserve(&mut self, peer: &Peer, req: &CreateLease) -> Result<Reservation> {
        check_name(&req.name).map_err(NsError::Invalid)?;
        if is_under(&req.name, REMOVED_PREFIX) {
            return Err(NsError::Invalid(format!(
                "lease {}: names under {REMOVED_PREFIX} are reserved for leases removed while held",
                req.name
            )));
        }
        if req.mode & !0o777 != 0 {
            return Err(NsError::Invalid(format!(
                "lease {}: mode {:o} has bits beyond 0777",
                req.name, req.mode
            )));
        }
        let uid = req.owner.unwrap_or(peer.uid);
        if uid != peer.uid && !peer.admin {
            return Err(NsError::Denied {
                name: req.name.clone(),
                op: "give it to another owner",
                uid,
                mode: req.mode,
            });
        }
        let pool = self.choose_pool(req)?;
        let account = &self.pools[pool];
        let page = account.page_size;
        if req.size == 0 || req.size % page.bytes() != 0 {
            return Err(NsError::Invalid(format!(
                "lease {}: size {} is not a non-zero multiple of pool {}'s {page} pages",
                req.name, req.size, account.name
            )));
        }
        self.check_name_free(&req.name)?;
        let free = account.size - account.used;
        if req.size > free {
            return Err(NsError::NoSpace {
                name: req.name.clone(),
                pool: account.name.clone(),
                free: format_size(free),
                asked: format_size(req.size),
            });
        }
        self.pools[pool].used += req.size;
        self.pending.insert(req.name.clone());
        Ok(Reservation {
            pool,
            name: req.name.clone(),
            size: req.size,
            page_size: page,
            uid,
            gid: peer.gid,
            mode: req.mode,
            persistent: req.persistent,
        })
    }

    /// Gives a failed create's charge back.
    pub fn abort(&mut self, res: Reservation) {
        self.pools[res.pool].used -= res.size;
        self.pending.remove(&res.name);
    }

    /// Records the lease made for `res`; `peer` holds it.
    pub fn commit(
        &mut self,
        peer: &Peer,
        res: Reservation,
        memory: Allocation,
    ) -> std::result::Result<Committed, Box<(NsError, Allocation)>> {
        self.pending.remove(&res.name);
        let id = self.next_id;
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let record = Record {
            name: res.name.clone(),
            pool: res.pool,
            size: res.size,
            page_size: res.page_size,
            uid: res.uid,
            gid: res.gid,
            mode: res.mode,
            persistent: res.persistent,
            created,
            memory: Arc::new(memory),
            holders: BTreeMap::new(),
            poison: Vec::new(),
            removed: false,
            orphan: false,
        };
        // Durable before the reply that hands the lease out.
        if let Some(journal) = &self.journal {
            if let Err(e) = journal.append(&JournalRecord::Lease(self.lease_record(id, &record))) {
                self.pools[res.pool].used -= res.size;
                let memory = Arc::try_unwrap(record.memory).expect("not shared yet");
                let problem = crate::server::error_chain(&e);
                let error = NsError::Journal {
                    name: res.name,
                    problem,
                };
                return Err(Box::new((error, memory)));
            }
        }
        self.maybe_compact();
        self.next_id += 1;
        self.pools[res.pool].leases += 1;
        self.names.insert(res.name, id);
        self.records.insert(id, record);
        self.hold(peer, id);
        let record = &self.records[&id];
        Ok((id, self.info(record, true), record.memory.clone()))
    }

    /// Every lease's id, pool and memory (for the upgrade hand-over).
    pub fn memory(&self) -> Vec<(u64, usize, Arc<Allocation>)> {
        self.records
            .iter()
            .map(|(id, r)| (*id, r.pool, r.memory.clone()))
            .collect()
    }

    fn hold(&mut self, peer: &Peer, id: u64) {
        if let Some(record) = self.records.get_mut(&id) {
            record.orphan = false;
            record.holders.insert(
                peer.conn,
                HolderInfo {
                    pid: peer.pid,
                    uid: peer.uid,
                },
            );
            self.held.entry(peer.conn).or_default().insert(id);
        }
    }

    fn lookup(&self, name: &str) -> Result<(u64, &Record)> {
        let id = *self
            .names
            .get(name)
            .ok_or_else(|| NsError::NotFound(name.to_string()))?;
        Ok((id, &self.records[&id]))
    }

    fn check(&self, peer: &Peer, record: &Record, access: Access, op: &'static str) -> Result<()> {
        if access::allowed(peer, record.uid, record.gid, record.mode, access) {
            Ok(())
        } else {
            Err(NsError::Denied {
                name: record.name.clone(),
                op,
                uid: record.uid,
                mode: record.mode,
            })
        }
    }

    /// Re-attaches `peer` to an existing lease; returns the memory to deliver.
    pub fn open(
        &mut self,
        peer: &Peer,
        name: &str,
        writable: bool,
    ) -> Result<(LeaseInfo, Arc<Allocation>)> {
        let (id, record) = self.lookup(name)?;
        self.check(peer, record, Access::Read, "open it")?;
        if writable {
            self.check(peer, record, Access::Write, "open it for writing")?;
        }
        self.hold(peer, id);
        let record = &self.records[&id];
        Ok((self.info(record, writable), record.memory.clone()))
    }

    /// `peer` stops holding a lease.
    pub fn release(&mut self, peer: &Peer, name: &str) -> Result<Freed> {
        let (id, _) = self.lookup(name)?;
        let held = self
            .held
            .get_mut(&peer.conn)
            .is_some_and(|ids| ids.remove(&id));
        if !held {
            return Err(NsError::NotHeld(name.to_string()));
        }
        Ok(self.drop_holder(peer.conn, id).into_iter().collect())
    }

    /// Removes a lease's name; its memory goes back to the pool when nobody holds it.
    pub fn remove(&mut self, peer: &Peer, name: &str) -> Result<Freed> {
        let (id, record) = self.lookup(name)?;
        if !(peer.uid == record.uid
            || access::allowed(peer, record.uid, record.gid, record.mode, Access::Write))
        {
            return Err(NsError::Denied {
                name: name.to_string(),
                op: "remove it",
                uid: record.uid,
                mode: record.mode,
            });
        }
        self.names.remove(name);
        let record = self.records.get_mut(&id).expect("named record exists");
        record.removed = true;
        let freed: Freed = self.free_if_unused(id).into_iter().collect();
        if freed.is_empty() {
            self.log(&JournalRecord::Unnamed { id });
        }
        Ok(freed)
    }

    /// A connection went away: it holds nothing any more.
    pub fn disconnect(&mut self, conn: u64) -> Freed {
        let ids = self.held.remove(&conn).unwrap_or_default();
        ids.into_iter()
            .filter_map(|id| self.drop_holder(conn, id))
            .collect()
    }

    fn drop_holder(&mut self, conn: u64, id: u64) -> Option<FreedLease> {
        self.records.get_mut(&id)?.holders.remove(&conn);
        self.free_if_unused(id)
    }

    fn free_if_unused(&mut self, id: u64) -> Option<FreedLease> {
        let record = self.records.get(&id)?;
        let kept = record.persistent || record.orphan;
        if !record.holders.is_empty() || (kept && !record.removed) {
            return None;
        }
        let record = self.records.remove(&id)?;
        if !record.removed {
            self.names.remove(&record.name);
        }
        let pool = &mut self.pools[record.pool];
        pool.used -= record.size;
        pool.leases -= 1;
        // A device lease is scrubbed first; its pool journals `Freed` when that is done.
        match pool.kind {
            PoolKind::Memfd => self.log(&JournalRecord::Freed { id }),
            PoolKind::Devdax => {
                let lease = self.lease_record(id, &record);
                if let Some(journal) = &self.journal {
                    if let Err(e) = journal.begin_scrub(&lease) {
                        tracing::error!(error = %crate::server::error_chain(&e), id, "journal append failed");
                    }
                }
            }
        }
        Some(FreedLease {
            pool: record.pool,
            id,
            memory: record.memory,
        })
    }

    /// Records a memory error a holder or owner reported; returns the lease's pool and memory
    /// so the pool can quarantine it.
    pub fn report_poison(
        &mut self,
        peer: &Peer,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Result<(usize, Arc<Allocation>)> {
        let (id, record) = self.lookup(name)?;
        let holder = record.holders.contains_key(&peer.conn);
        if !holder && !peer.admin && peer.uid != record.uid {
            return Err(NsError::Denied {
                name: name.to_string(),
                op: "report poison on it",
                uid: record.uid,
                mode: record.mode,
            });
        }
        let end = offset
            .checked_add(len)
            .filter(|&end| len > 0 && end <= record.size);
        if end.is_none() {
            return Err(NsError::Invalid(format!(
                "lease {name}: poison range {offset}+{len} is outside its {} bytes",
                record.size
            )));
        }
        let record = self.records.get_mut(&id).expect("named record exists");
        let report = PoisonInfo { offset, len };
        let new = !record.poison.contains(&report);
        if new {
            record.poison.push(report);
            record.poison.sort_by_key(|p| p.offset);
        }
        let found = (record.pool, record.memory.clone());
        if new {
            self.log(&JournalRecord::Poison { id, offset, len });
        }
        Ok(found)
    }

    fn info(&self, record: &Record, writable: bool) -> LeaseInfo {
        let state = if record.removed {
            LeaseState::Removed
        } else if record.holders.is_empty() {
            LeaseState::Idle
        } else {
            LeaseState::Held
        };
        LeaseInfo {
            name: record.name.clone(),
            size: record.size,
            page_size: record.page_size,
            pool: self.pools[record.pool].name.clone(),
            uid: record.uid,
            gid: record.gid,
            mode: record.mode,
            persistent: record.persistent,
            state,
            created: record.created,
            extents: record.memory.extents.clone(),
            holders: record.holders.values().cloned().collect(),
            poison: record.poison.clone(),
            writable,
            device: record.memory.device.clone(),
        }
    }

    /// Describes one lease.
    pub fn stat(&self, name: &str) -> Result<LeaseInfo> {
        let (_, record) = self.lookup(name)?;
        Ok(self.info(record, false))
    }

    /// Leases under `prefix` after `after`, in name order, while `fits` accepts them; says
    /// whether more remain.
    pub fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        mut fits: impl FnMut(&LeaseInfo) -> bool,
    ) -> (Vec<LeaseInfo>, bool) {
        use std::ops::Bound;
        let base = prefix.trim_end_matches('/');
        let start = match after {
            Some(a) if a >= base => Bound::Excluded(a.to_string()),
            _ => Bound::Included(base.to_string()),
        };
        let mut out = Vec::new();
        for (name, id) in self.names.range((start, Bound::Unbounded)) {
            if !name.starts_with(base) {
                break; // sorted: nothing further can be under the prefix
            }
            if !is_under(name, prefix) {
                continue; // e.g. `a-b` sorts between `a` and `a/b`
            }
            let info = self.info(&self.records[id], false);
            if !fits(&info) {
                if out.is_empty() {
                    // Never return an empty page with more to come: one lease always goes.
                    out.push(info);
                }
                return (out, true);
            }
            out.push(info);
        }
        (out, false)
    }

    /// Pool usage.
    pub fn df(&self) -> Vec<PoolInfo> {
        self.pools
            .iter()
            .enumerate()
            .map(|(i, p)| PoolInfo {
                name: p.name.clone(),
                kind: p.kind,
                page_size: p.page_size,
                size: p.size,
                used: p.used,
                free: p.size - p.used,
                scrubbing: 0,
                quarantined: 0,
                leases: p.leases,
                default: i == self.default_pool,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
