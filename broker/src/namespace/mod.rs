//! The lease namespace: names, owners, modes, holders and pool accounting.
//!
//! Pure bookkeeping behind one lock; it never makes memory or does I/O. Creating a lease is
//! two-phase so the (slow) allocation runs outside the lock: [`Namespace::reserve`] checks
//! the request and charges the pool (admission control), then [`Namespace::commit`] or
//! [`Namespace::abort`].
//!
//! Every change it makes that a restart must remember becomes a journal [`JournalRecord`]:
//! a create is three steps, `prepare` (the lease gets its id and records, still invisible),
//! then `commit` once the owner has the records on disk (or `abort_prepared`); the other
//! changes queue their records, which the owner takes with [`Namespace::take_records`] and
//! journals before it lets go of the lock (so the journal's order is the namespace's order).

mod access;
mod dir;
mod name;
mod poison;
pub mod quota;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use membroker_client::PageSize;

use crate::error::WireError;
use crate::journal::{LeaseRecord, Record as JournalRecord, ReplayedLease};
use crate::pool::Allocation;
use membroker_client::proto::{
    BindLabel, CreateLease, ErrorCode, HolderInfo, LeaseInfo, LeaseState, LeaseTotals, MAX_LISTED,
    PoisonInfo, PoolInfo, PoolKind,
};
use membroker_client::size::format_size;
use quota::Quotas;

pub use access::{Access, MAX_LABEL, Peer, parse_label};
pub use dir::{DEFAULT_ROOT_MODE, STICKY};
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
    #[error(
        "lease {name}: permission denied to {op}: it is bound to the security label {label:?}, \
         and only processes with that label (or root and the admin group) may"
    )]
    LabelDenied {
        name: String,
        op: &'static str,
        label: String,
    },
    #[error(
        "directory {dir}: permission denied to {op} (owner uid {uid}, mode {mode:04o}); ask its owner or an admin"
    )]
    DirDenied {
        dir: String,
        op: String,
        uid: u32,
        mode: u32,
    },
    #[error(
        "{name}: permission denied: the top-level {top}/ is reserved for uid {uid} (and root and the admin group)"
    )]
    Reserved { name: String, top: String, uid: u32 },
    /// A change only the object's owner (or root, or the admin group) may make.
    #[error("{0}")]
    NotYours(String),
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
    /// A quota refused a create; the text names the quota, the usage and the ask.
    #[error("{0}")]
    Quota(String),
    /// A limit on poison reports (per lease or per uid).
    #[error("{0}")]
    PoisonLimit(String),
}

impl WireError for NsError {
    fn code(&self) -> ErrorCode {
        match self {
            NsError::NotFound(_) | NsError::NotHeld(_) => ErrorCode::NotFound,
            NsError::Exists(_) | NsError::NameConflict { .. } => ErrorCode::Exists,
            NsError::Denied { .. }
            | NsError::LabelDenied { .. }
            | NsError::DirDenied { .. }
            | NsError::Reserved { .. }
            | NsError::NotYours(_) => ErrorCode::PermissionDenied,
            NsError::Invalid(_) => ErrorCode::InvalidArgument,
            NsError::NoSpace { .. } | NsError::Quota(_) | NsError::PoisonLimit(_) => {
                ErrorCode::NoSpace
            }
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
    /// The NUMA node the pool's memory is on, if it is bound to one.
    pub node: Option<u32>,
}

impl PoolAccount {
    /// The account of a configured pool, nothing used yet.
    pub fn of(pool: &crate::pool::Pool) -> PoolAccount {
        PoolAccount {
            name: pool.name.clone(),
            kind: pool.kind,
            page_size: pool.page_size,
            size: pool.size,
            used: 0,
            leases: 0,
            node: pool.node,
        }
    }
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
    label: Option<String>,
}

impl Reservation {
    /// The lease-to-be's owner uid, gid and mode.
    pub fn owner(&self) -> (u32, u32, u32) {
        (self.uid, self.gid, self.mode)
    }
}

/// A lease as the namespace keeps it: what the journal records, and what only lives as long
/// as this process (its memory, holders, state).
#[derive(Debug)]
struct Entry {
    lease: LeaseRecord,
    /// Index of its pool.
    pool: usize,
    memory: Arc<Allocation>,
    holders: BTreeMap<u64, HolderInfo>,
    /// Holders whose fd is writable (they may report poison).
    writers: BTreeSet<u64>,
    poison: Vec<PoisonInfo>,
    removed: bool,
    /// Restored after a broker restart without its holders: a non-persistent lease waits for
    /// them to re-attach until [`Namespace::expire_orphans`].
    orphan: bool,
}

/// Where leases removed while held are kept after a restart (see [`Namespace::restore`]).
pub const REMOVED_PREFIX: &str = ".removed/";

/// A lease's owner uid, group and mode.
pub type Ownership = (u32, u32, u32);

/// A lease made and given its id, not yet visible (see [`Namespace::prepare`]).
#[derive(Debug)]
#[must_use]
pub struct Prepared {
    res: Reservation,
    /// The lease's record, queued with the directories made on its way.
    lease: LeaseRecord,
    memory: Allocation,
}

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
    leases: HashMap<u64, Entry>,
    names: BTreeMap<String, u64>,
    pending: BTreeSet<String>,
    held: HashMap<u64, BTreeSet<u64>>,
    next_id: u64,
    dirs: dir::Dirs,
    /// Records of changes made since the owner last took them (see [`Namespace::take_records`]).
    unjournaled: Vec<JournalRecord>,
    quotas: Quotas,
    /// Pages of poison each uid reported since the broker started (see [`poison`]).
    poison_reported: HashMap<u32, u64>,
    /// Whether a new lease is bound to its creator's security label (`serve --bind-labels`).
    bind_labels: bool,
}

impl Namespace {
    /// A namespace over `pools`; the first is the default. Lease ids start at `next_id`
    /// (the journal's: above every id it ever recorded).
    pub fn new(pools: Vec<PoolAccount>, next_id: u64) -> Namespace {
        Namespace {
            pools,
            default_pool: 0,
            leases: HashMap::new(),
            names: BTreeMap::new(),
            pending: BTreeSet::new(),
            held: HashMap::new(),
            next_id: next_id.max(1),
            dirs: dir::Dirs::new(DEFAULT_ROOT_MODE),
            unjournaled: Vec::new(),
            quotas: Quotas::default(),
            poison_reported: HashMap::new(),
            bind_labels: true,
        }
    }

    /// Whether new leases are bound to their creator's security label (the default); leases
    /// bound before keep their label either way.
    pub fn set_bind_labels(&mut self, bind: bool) {
        self.bind_labels = bind;
    }

    /// Sets the root directory's mode (`serve --root-mode`): `0o755` lets only root and the
    /// admin group make top-level names (besides each uid's own `uid-N`).
    pub fn set_root_mode(&mut self, mode: u32) {
        self.dirs.set_root_mode(mode);
    }

    /// The operator's quota rules; usage already counted (restored leases) is kept.
    pub fn set_quotas(&mut self, quotas: Quotas) {
        self.quotas.set_rules(quotas);
    }

    /// Quotas and their usage: every one for an admin, else those that limit `peer`.
    pub fn quotas(&self, peer: &Peer) -> Vec<membroker_client::proto::QuotaInfo> {
        self.quotas.view(peer.uid, peer.gid, peer.admin)
    }

    /// A page of the quotas `peer` sees (see [`quota::Quotas::page`]).
    pub fn quota_page(
        &self,
        peer: &Peer,
        after: Option<&(String, u32)>,
        fits: impl FnMut(&membroker_client::proto::QuotaInfo) -> bool,
    ) -> (Vec<membroker_client::proto::QuotaInfo>, bool) {
        self.quotas
            .page(peer.uid, peer.gid, peer.admin, after, fits)
    }

    /// The journal records of the changes made since the last call, in order. The owner
    /// journals them before it lets go of the namespace lock.
    pub fn take_records(&mut self) -> Vec<JournalRecord> {
        std::mem::take(&mut self.unjournaled)
    }

    /// Puts back a lease from the journal, with its memory, held by nobody.
    pub fn restore(
        &mut self,
        replayed: &ReplayedLease,
        memory: Allocation,
    ) -> std::result::Result<(), String> {
        let mut lease = replayed.lease.clone();
        let pool = self
            .pools
            .iter()
            .position(|p| p.name == lease.pool)
            .ok_or_else(|| format!("pool {} is not configured", lease.pool))?;
        // A lease removed while held: its holder cannot re-attach by name, yet may still map it
        // (a running guest), so it is never released behind its back. It is kept, persistent,
        // under a reserved name until an operator removes it.
        if !replayed.named {
            let kept_as = format!("{REMOVED_PREFIX}{}", lease.id);
            tracing::warn!(
                lease = %lease.name,
                kept_as = %kept_as,
                "a lease removed while held survived the restart; its holder may still use it: \
                 kept until `membroker rm {kept_as}`"
            );
            lease.name = kept_as;
            lease.persistent = true;
        }
        if self.names.contains_key(&lease.name) {
            return Err(format!("name {} is taken twice", lease.name));
        }
        let id = lease.id;
        // Journals from before directories were objects name none: make them.
        let dirs = self.missing_dirs(&lease.name, lease.uid, lease.gid, lease.mode);
        self.add_dirs(&dirs);
        self.unjournaled.extend(dirs);
        self.pools[pool].used += lease.size;
        self.pools[pool].leases += 1;
        self.quotas.charge(lease.uid, lease.gid, lease.size);
        self.names.insert(lease.name.clone(), id);
        self.next_id = self.next_id.max(id + 1);
        self.leases.insert(
            id,
            Entry {
                lease,
                pool,
                memory: Arc::new(memory),
                holders: BTreeMap::new(),
                writers: BTreeSet::new(),
                poison: replayed.poison.clone(),
                removed: false,
                orphan: true,
            },
        );
        Ok(())
    }

    /// Ends the grace period after a restart: restored leases nobody re-attached to are
    /// released unless persistent (and still named).
    pub fn expire_orphans(&mut self) -> Freed {
        let orphans: Vec<u64> = self
            .leases
            .iter()
            .filter(|(_, e)| e.orphan)
            .map(|(id, _)| *id)
            .collect();
        let mut freed = Vec::new();
        for id in orphans {
            if let Some(e) = self.leases.get_mut(&id) {
                e.orphan = false;
            }
            freed.extend(self.free_if_unused(id));
        }
        freed
    }

    fn pool_names(&self) -> String {
        self.pools
            .iter()
            .map(|p| match p.node {
                Some(node) => format!("{} ({} pages, node {node})", p.name, p.page_size),
                None => format!("{} ({} pages)", p.name, p.page_size),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn choose_pool(&self, req: &CreateLease) -> Result<usize> {
        let Some(node) = req.node else {
            return self.choose_pool_by_page(req);
        };
        let invalid = |m: String| Err(NsError::Invalid(format!("lease {}: {m}", req.name)));
        if req.pool.is_some() {
            let i = self.choose_pool_by_page(req)?;
            return match self.pools[i].node {
                Some(n) if n == node => Ok(i),
                _ => invalid(format!(
                    "pool {} is not on NUMA node {node}; pools: {}",
                    self.pools[i].name,
                    self.pool_names()
                )),
            };
        }
        let fits = |p: &PoolAccount| {
            p.node == Some(node) && req.page_size.is_none_or(|page| page == p.page_size)
        };
        if fits(&self.pools[self.default_pool]) {
            return Ok(self.default_pool);
        }
        match self.pools.iter().position(fits) {
            Some(i) => Ok(i),
            None => invalid(format!(
                "no pool on NUMA node {node}{}; pools: {} (bind one with \
                 --pool memfd:NAME:SIZE[:PAGE]:node={node})",
                req.page_size
                    .map(|page| format!(" serves {page} pages"))
                    .unwrap_or_default(),
                self.pool_names()
            )),
        }
    }

    fn choose_pool_by_page(&self, req: &CreateLease) -> Result<usize> {
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
        if self.dirs.get(name).is_some() {
            return Err(NsError::Exists(format!("{name}/ (a directory)")));
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
        let label = self.bind_label(peer, req)?;
        let pool = self.choose_pool(req)?;
        self.check_name_free(&req.name)?;
        self.may_create(peer, &req.name)?;
        let account = &self.pools[pool];
        let page = account.page_size;
        if req.size == 0 || !req.size.is_multiple_of(page.bytes()) {
            return Err(NsError::Invalid(format!(
                "lease {}: size {} is not a non-zero multiple of pool {}'s {page} pages",
                req.name, req.size, account.name
            )));
        }
        self.quotas
            .admit(&req.name, uid, peer.gid, req.size)
            .map_err(NsError::Quota)?;
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
        self.quotas.charge(uid, peer.gid, req.size);
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
            label,
        })
    }

    /// The security label a create binds its lease to: the creator's (when `--bind-labels`
    /// says so), none, or one an admin names.
    fn bind_label(&self, peer: &Peer, req: &CreateLease) -> Result<Option<String>> {
        match &req.label {
            BindLabel::Creator => Ok(self
                .bind_labels
                .then(|| peer.label.as_deref().map(str::to_string))
                .flatten()),
            _ if !peer.admin => Err(NsError::Denied {
                name: req.name.clone(),
                op: "choose its security label (root and the admin group only)",
                uid: req.owner.unwrap_or(peer.uid),
                mode: req.mode,
            }),
            BindLabel::Unbound => Ok(None),
            BindLabel::Named(label) => {
                if label.is_empty() || label.len() > MAX_LABEL || label.contains('\0') {
                    return Err(NsError::Invalid(format!(
                        "lease {}: security label {label:?} must be 1 to {MAX_LABEL} bytes \
                         without NUL",
                        req.name
                    )));
                }
                Ok(Some(label.clone()))
            }
        }
    }

    /// Gives a failed create's charge back.
    pub fn abort(&mut self, res: Reservation) {
        self.pools[res.pool].used -= res.size;
        self.quotas.credit(res.uid, res.gid, res.size);
        self.pending.remove(&res.name);
    }

    /// Gives the lease made for `res` its id and queues its journal records (the directories
    /// made on its way, then the lease) like any change's; the name stays reserved and the
    /// lease invisible until [`Namespace::commit`] (once the records are on disk) or
    /// [`Namespace::abort_prepared`].
    pub fn prepare(
        &mut self,
        peer: &Peer,
        res: Reservation,
        memory: Allocation,
    ) -> std::result::Result<Prepared, Box<(NsError, Allocation)>> {
        // Another create may have made the directory above meanwhile (its owner's, 0700).
        if let Err(e) = self.may_create(peer, &res.name) {
            self.abort(res);
            return Err(Box::new((e, memory)));
        }
        let id = self.next_id;
        self.next_id += 1;
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let lease = LeaseRecord {
            id,
            name: res.name.clone(),
            pool: self.pools[res.pool].name.clone(),
            size: res.size,
            page_size: res.page_size,
            uid: res.uid,
            gid: res.gid,
            mode: res.mode,
            persistent: res.persistent,
            created,
            extents: memory.extents.clone(),
            device: memory.device.clone(),
            label: res.label.clone(),
        };
        let dirs = self.missing_dirs(&lease.name, lease.uid, lease.gid, lease.mode);
        self.add_dirs(&dirs);
        self.unjournaled.extend(dirs);
        self.unjournaled.push(JournalRecord::Lease(lease.clone()));
        Ok(Prepared { res, lease, memory })
    }

    /// Makes a prepared lease visible; `peer` holds it. Its records must be on disk.
    pub fn commit(&mut self, peer: &Peer, prepared: Prepared) -> Committed {
        let Prepared { res, lease, memory } = prepared;
        self.pending.remove(&res.name);
        let id = lease.id;
        self.pools[res.pool].leases += 1;
        self.names.insert(lease.name.clone(), id);
        self.leases.insert(
            id,
            Entry {
                lease,
                pool: res.pool,
                memory: Arc::new(memory),
                holders: BTreeMap::new(),
                writers: BTreeSet::new(),
                poison: Vec::new(),
                removed: false,
                orphan: false,
            },
        );
        self.hold(peer, id, true);
        let entry = &self.leases[&id];
        (id, self.info(peer, entry, true), entry.memory.clone())
    }

    /// A prepared lease whose records did not reach the disk: gives its charge and name
    /// back, queues its `Freed` (the journal's model may hold it) and the removal of the
    /// directories made for it, and returns its memory for the pool to discard.
    pub fn abort_prepared(&mut self, prepared: Prepared) -> Allocation {
        let Prepared { res, lease, memory } = prepared;
        let name = res.name.clone();
        self.unjournaled.push(JournalRecord::Freed { id: lease.id });
        self.abort(res);
        self.prune_dirs(&name);
        memory
    }

    /// The pool, memory and (uid, gid, mode) of the lease named `name`, if it is one.
    pub fn lease_memory(&self, name: &str) -> Option<(usize, Arc<Allocation>, Ownership)> {
        let entry = &self.leases[self.names.get(name)?];
        let l = &entry.lease;
        Some((entry.pool, entry.memory.clone(), (l.uid, l.gid, l.mode)))
    }

    /// Every lease's id, pool and memory (for the upgrade hand-over).
    pub fn memory(&self) -> Vec<(u64, usize, Arc<Allocation>)> {
        self.leases
            .iter()
            .map(|(id, e)| (*id, e.pool, e.memory.clone()))
            .collect()
    }

    fn hold(&mut self, peer: &Peer, id: u64, writable: bool) {
        if let Some(entry) = self.leases.get_mut(&id) {
            entry.orphan = false;
            if writable {
                entry.writers.insert(peer.conn);
            }
            entry.holders.insert(
                peer.conn,
                HolderInfo {
                    pid: peer.pid,
                    uid: peer.uid,
                },
            );
            self.held.entry(peer.conn).or_default().insert(id);
        }
    }

    fn lookup(&self, name: &str) -> Result<(u64, &Entry)> {
        let id = *self
            .names
            .get(name)
            .ok_or_else(|| NsError::NotFound(name.to_string()))?;
        Ok((id, &self.leases[&id]))
    }

    fn denied(entry: &Entry, op: &'static str) -> NsError {
        NsError::Denied {
            name: entry.lease.name.clone(),
            op,
            uid: entry.lease.uid,
            mode: entry.lease.mode,
        }
    }

    /// Refuses `op` on a lease bound to a security label the peer does not have.
    fn check_label(peer: &Peer, entry: &Entry, op: &'static str) -> Result<()> {
        match &entry.lease.label {
            Some(label) if !peer.label_fits(Some(label)) => Err(NsError::LabelDenied {
                name: entry.lease.name.clone(),
                op,
                label: label.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// Whether `peer` may see everything about a lease and change its owner or mode: its
    /// owner (with the lease's label, if bound), root and the admin group.
    fn sees_all(peer: &Peer, lease: &LeaseRecord) -> bool {
        peer.sees_all_of(lease.uid) && peer.label_fits(lease.label.as_deref())
    }

    fn check(&self, peer: &Peer, entry: &Entry, access: Access, op: &'static str) -> Result<()> {
        Self::check_label(peer, entry, op)?;
        let l = &entry.lease;
        if access::allowed(peer, l.uid, l.gid, l.mode, access) {
            Ok(())
        } else {
            Err(Self::denied(entry, op))
        }
    }

    /// Re-attaches `peer` to an existing lease; returns the memory to deliver.
    pub fn open(
        &mut self,
        peer: &Peer,
        name: &str,
        writable: bool,
    ) -> Result<(LeaseInfo, Arc<Allocation>)> {
        let (id, entry) = self.lookup(name)?;
        self.check(peer, entry, Access::Read, "open it")?;
        if writable {
            self.check(peer, entry, Access::Write, "open it for writing")?;
        }
        self.hold(peer, id, writable);
        let entry = &self.leases[&id];
        Ok((self.info(peer, entry, writable), entry.memory.clone()))
    }

    /// `peer` stops holding a lease: the one of that name it holds, even if the name was
    /// removed since (then its memory goes back to the pool when the last holder lets go).
    pub fn release(&mut self, peer: &Peer, name: &str) -> Result<Freed> {
        let empty = BTreeSet::new();
        let held = self.held.get(&peer.conn).unwrap_or(&empty);
        let named = self.names.get(name).copied().filter(|id| held.contains(id));
        let removed = || {
            held.iter().copied().find(|id| {
                let e = &self.leases[id];
                e.removed && e.lease.name == name
            })
        };
        let Some(id) = named.or_else(removed) else {
            self.lookup(name)?;
            return Err(NsError::NotHeld(name.to_string()));
        };
        if let Some(ids) = self.held.get_mut(&peer.conn) {
            ids.remove(&id);
        }
        Ok(self.drop_holder(peer.conn, id).into_iter().collect())
    }

    /// Removes a lease's name; its memory goes back to the pool when nobody holds it.
    /// An empty directory is removed too.
    pub fn remove(&mut self, peer: &Peer, name: &str) -> Result<Freed> {
        let name = name.trim_end_matches('/');
        if !self.names.contains_key(name) && self.dirs.get(name).is_some() {
            return self.rmdir(peer, name).map(|()| Vec::new());
        }
        let (id, entry) = self.lookup(name)?;
        Self::check_label(peer, entry, "remove it")?;
        let l = &entry.lease;
        let writable = access::allowed(peer, l.uid, l.gid, l.mode, Access::Write);
        if !self.may_remove(peer, name, l.uid, writable) {
            return Err(Self::denied(entry, "remove it"));
        }
        self.names.remove(name);
        self.prune_dirs(name);
        let entry = self.leases.get_mut(&id).expect("named lease exists");
        entry.removed = true;
        let freed: Freed = self.free_if_unused(id).into_iter().collect();
        if freed.is_empty() {
            self.unjournaled.push(JournalRecord::Unnamed { id });
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
        let entry = self.leases.get_mut(&id)?;
        entry.holders.remove(&conn);
        entry.writers.remove(&conn);
        self.free_if_unused(id)
    }

    fn free_if_unused(&mut self, id: u64) -> Option<FreedLease> {
        let entry = self.leases.get(&id)?;
        let kept = entry.lease.persistent || entry.orphan;
        if !entry.holders.is_empty() || (kept && !entry.removed) {
            return None;
        }
        let entry = self.leases.remove(&id)?;
        if !entry.removed {
            self.names.remove(&entry.lease.name);
            self.prune_dirs(&entry.lease.name);
        }
        let pool = &mut self.pools[entry.pool];
        pool.used -= entry.lease.size;
        pool.leases -= 1;
        let l = &entry.lease;
        self.quotas.credit(l.uid, l.gid, l.size);
        // A device lease is scrubbed first; its pool journals `Freed` when that is done.
        self.unjournaled.push(match pool.kind {
            PoolKind::Memfd => JournalRecord::Freed { id },
            PoolKind::Devdax => JournalRecord::Scrub { id },
        });
        Some(FreedLease {
            pool: entry.pool,
            id,
            memory: entry.memory,
        })
    }

    /// A lease's description for `viewer`: holders, physical extents and the device only for
    /// its owner, root and the admin group (others see them empty).
    fn info(&self, viewer: &Peer, entry: &Entry, writable: bool) -> LeaseInfo {
        let state = if entry.removed {
            LeaseState::Removed
        } else if entry.holders.is_empty() {
            LeaseState::Idle
        } else {
            LeaseState::Held
        };
        let l = &entry.lease;
        let mut info = LeaseInfo {
            name: l.name.clone(),
            size: l.size,
            page_size: l.page_size,
            pool: l.pool.clone(),
            uid: l.uid,
            gid: l.gid,
            mode: l.mode,
            persistent: l.persistent,
            state,
            created: l.created,
            // At most MAX_LISTED of each: a description always fits a message
            // (`Namespace::describe` says how many there are).
            extents: l.extents.iter().take(MAX_LISTED).cloned().collect(),
            holders: entry.holders.values().take(MAX_LISTED).cloned().collect(),
            poison: entry.poison.iter().take(MAX_LISTED).cloned().collect(),
            writable,
            device: l.device.clone(),
            label: l.label.clone(),
        };
        if !Self::sees_all(viewer, l) {
            info.extents.clear();
            info.holders.clear();
            info.device = None;
            info.label = None;
        }
        info
    }

    /// Whether `peer` may see that a lease exists: its owner, or whoever may read it (with
    /// the lease's label, if bound).
    fn visible(peer: &Peer, entry: &Entry) -> bool {
        let l = &entry.lease;
        peer.label_fits(l.label.as_deref())
            && (peer.sees_all_of(l.uid)
                || access::allowed(peer, l.uid, l.gid, l.mode, Access::Read))
    }

    /// Describes one lease to a peer that may see it.
    pub fn stat(&self, peer: &Peer, name: &str) -> Result<LeaseInfo> {
        let (_, entry) = self.lookup(name)?;
        Self::check_label(peer, entry, "see it")?;
        if !Self::visible(peer, entry) {
            return Err(Self::denied(entry, "see it"));
        }
        Ok(self.info(peer, entry, false))
    }

    /// [`Namespace::stat`], with how many holders, extents and poison ranges the lease has
    /// (those the description shows at all).
    pub fn describe(&self, peer: &Peer, name: &str) -> Result<(LeaseInfo, LeaseTotals)> {
        let info = self.stat(peer, name)?;
        let (_, entry) = self.lookup(name)?;
        let sees_all = Self::sees_all(peer, &entry.lease);
        let totals = LeaseTotals {
            holders: if sees_all {
                entry.holders.len() as u64
            } else {
                0
            },
            extents: if sees_all {
                entry.lease.extents.len() as u64
            } else {
                0
            },
            poison: entry.poison.len() as u64,
        };
        Ok((info, totals))
    }

    /// Leases under `prefix` after `after` that `peer` may read, in name order, while `fits`
    /// accepts them; says whether more remain.
    pub fn list(
        &self,
        peer: &Peer,
        prefix: &str,
        after: Option<&str>,
        fits: impl FnMut(&LeaseInfo) -> bool,
    ) -> (Vec<LeaseInfo>, bool) {
        let visible = name::range_under(&self.names, prefix, after)
            .map(|(_, id)| &self.leases[id])
            .filter(|entry| Self::visible(peer, entry))
            .map(|entry| self.info(peer, entry, false));
        name::page(visible, fits)
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
                node: p.node,
                kernel_overhead: 0,
                broker_metadata: 0,
            })
            .collect()
    }

    /// Per pool (in pool order), how many of its leases are in each state.
    pub fn lease_states(&self) -> Vec<LeaseStates> {
        let mut out = vec![LeaseStates::default(); self.pools.len()];
        for entry in self.leases.values() {
            let states = &mut out[entry.pool];
            match entry {
                e if e.removed => states.removed += 1,
                e if e.orphan && !e.lease.persistent => states.orphaned += 1,
                e if e.holders.is_empty() => states.idle += 1,
                _ => states.held += 1,
            }
        }
        out
    }
}

/// A pool's leases by state, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaseStates {
    /// Held by at least one connection.
    pub held: u64,
    /// Persistent, held by nobody.
    pub idle: u64,
    /// Removed by name, memory kept until its last holder goes.
    pub removed: u64,
    /// Not persistent, restored after a restart, its holders not back yet (released after
    /// `--reattach-grace`).
    pub orphaned: u64,
}

#[cfg(test)]
mod tests;
