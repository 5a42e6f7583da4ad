//! Protocol messages exchanged over the broker socket.
//!
//! Every message is a fixed [`Header`](crate::codec::Header) followed by one of these types
//! encoded by [`crate::codec`]. Requests never carry file descriptors; the only reply that
//! carries one is [`Response::Lease`], with exactly one fd.

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

/// Oldest protocol version this build speaks.
pub const PROTOCOL_MIN: u16 = 1;
/// Newest protocol version this build speaks. Version 2 added `node` to
/// [`CreateLease`] and [`PoolInfo`], and the paged admin listings ([`Request::QuotaPage`],
/// [`Request::QuarantinePage`]); the codec speaks version 1's layout to older peers.
pub const PROTOCOL_MAX: u16 = 2;

/// Page size backing a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PageSize {
    /// 4 KiB base pages (shmem).
    #[serde(rename = "4K")]
    Base4K,
    /// 2 MiB huge pages (hugetlb or device align).
    #[serde(rename = "2M")]
    Huge2M,
    /// 1 GiB huge pages (hugetlb or device align).
    #[serde(rename = "1G")]
    Huge1G,
}

impl PageSize {
    /// Size of one page in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Base4K => 4 << 10,
            PageSize::Huge2M => 2 << 20,
            PageSize::Huge1G => 1 << 30,
        }
    }

    /// The page size of exactly `bytes`, if it is one we support.
    pub const fn from_bytes(bytes: u64) -> Option<PageSize> {
        match bytes {
            0x1000 => Some(PageSize::Base4K),
            0x20_0000 => Some(PageSize::Huge2M),
            0x4000_0000 => Some(PageSize::Huge1G),
            _ => None,
        }
    }

    /// Short human name: `4K`, `2M`, `1G`.
    pub const fn name(self) -> &'static str {
        match self {
            PageSize::Base4K => "4K",
            PageSize::Huge2M => "2M",
            PageSize::Huge1G => "1G",
        }
    }
}

impl std::fmt::Display for PageSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for PageSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = crate::size::parse_size(s).map_err(|e| e.to_string())?;
        PageSize::from_bytes(bytes).ok_or_else(|| format!("page size {s:?}: use 4K, 2M or 1G"))
    }
}

/// A request from a client to the broker.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Request {
    /// First message on every connection: the protocol versions the client speaks.
    Hello {
        min_version: u16,
        max_version: u16,
        client: String,
    },
    /// Create a new lease and deliver its fd (the connection becomes a holder).
    Create(CreateLease),
    /// Deliver an fd to an existing lease (re-attach); the connection becomes a holder.
    Open { name: String, writable: bool },
    /// Stop holding a lease on this connection.
    Release { name: String },
    /// Remove a lease's name; its memory returns to the pool once nobody holds it.
    Remove { name: String },
    /// Describe one lease.
    Stat { name: String },
    /// Describe the leases whose names start with `prefix` (component-wise), in name order,
    /// starting after `after`; the reply says whether more follow (pagination keeps every
    /// message under [`crate::codec::MAX_MSG_SIZE`]).
    List {
        prefix: String,
        after: Option<String>,
    },
    /// Describe the pools.
    Df,
    /// A holder saw a memory error at `[offset, offset + len)` of a lease.
    ReportPoison { name: String, offset: u64, len: u64 },
    /// Re-execute the broker binary in place, keeping every lease (root or admin group).
    /// The broker answers `Ok`, then either closes the connection (the new broker took over)
    /// or sends an `Error` (the exec failed; the old broker goes on serving).
    Upgrade,
    /// Make a directory of the lease namespace (see [`Mkdir`]).
    Mkdir(Mkdir),
    /// Change the permission bits of a lease (`0o777`) or a directory (`0o1777`, with the
    /// sticky bit). Its owner, root and the admin group may.
    Chmod { name: String, mode: u32 },
    /// Change the owner and/or group of a lease or directory. Only root and the admin group
    /// give an object to another uid; its owner may change its group to one of their own.
    Chown {
        name: String,
        uid: Option<u32>,
        gid: Option<u32>,
    },
    /// Describe the directories at or under `prefix`, in path order, after `after`; paged
    /// like [`Request::List`].
    Dirs {
        prefix: String,
        after: Option<String>,
    },
    /// Describe the quotas and their usage (an admin sees all, anybody else their own), in
    /// one reply. Kept for older clients: a listing too long for one message fails ("reply
    /// does not encode"); [`Request::QuotaPage`] pages it.
    Quota,
    /// Describe quarantined memory: per pool, the quarantined physical ranges (root and the
    /// admin group only) and the leases with reported poison (those the peer may see, as in
    /// [`Request::List`]), in one reply. Kept for older clients: a listing too long for one
    /// message fails ("reply does not encode"); [`Request::QuarantinePage`] pages it.
    Quarantine,
    /// Return a quarantined physical range of a device-dax pool to its free memory (root or
    /// admin group): a report turned out false.
    ClearQuarantine { pool: String, start: u64, len: u64 },
    /// Describe one lease like [`Request::Stat`], and say how many holders and extents it
    /// has: a description lists at most [`MAX_LISTED`] of each.
    Describe { name: String },
    /// Describe the quotas like [`Request::Quota`], in `(scope, id)` order (uids by uid, then
    /// groups by gid, then the default rule), starting after the quota whose `(scope, id)` is
    /// `after`; the reply says whether more follow. Protocol version 2.
    QuotaPage { after: Option<(String, u32)> },
    /// Describe quarantined memory like [`Request::Quarantine`], starting after `after`; the
    /// reply says whether more follows. Protocol version 2.
    QuarantinePage { after: Option<QuarantineAfter> },
}

/// Where a [`Request::QuarantinePage`] goes on: after the last range and the last lease a
/// client was given of pool `pool`. A pool's ranges come in start order, then its leases in
/// name order (leases removed while held keep their name, so several may share one: `lease`
/// says how many of that name were given). With neither, the pool is listed again from its
/// start (the client merges what a page adds to the pool it ended with).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct QuarantineAfter {
    pub pool: String,
    /// The start of the last range given; `None` if none was.
    pub range: Option<u64>,
    /// The name of the last lease given and how many leases of that name were given; `None`
    /// if none was (all the pool's ranges were given before any lease).
    pub lease: Option<(String, u32)>,
}

/// Adds a page of a quarantine listing to what came before: a pool the last page ended with
/// goes on in this one, under the same name.
pub fn extend_quarantine(all: &mut Vec<QuarantineInfo>, page: Vec<QuarantineInfo>) {
    for pool in page {
        match all.last_mut() {
            Some(last) if last.pool == pool.pool => {
                last.ranges.extend(pool.ranges);
                last.leases.extend(pool.leases);
            }
            _ => all.push(pool),
        }
    }
}

impl QuarantineAfter {
    /// Where a listing that so far ends with `last` goes on.
    pub fn after(last: &QuarantineInfo) -> QuarantineAfter {
        let lease = last.leases.last().map(|l| {
            let same = last.leases.iter().rev().take_while(|o| o.name == l.name);
            (l.name.clone(), same.count() as u32)
        });
        QuarantineAfter {
            pool: last.pool.clone(),
            range: last
                .ranges
                .last()
                .filter(|_| lease.is_none())
                .map(|r| r.start),
            lease,
        }
    }
}

/// Parameters of [`Request::Mkdir`].
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Mkdir {
    pub path: String,
    /// Permission bits and the sticky bit (`0o1777`).
    pub mode: u32,
    /// Owner uid; only root or the admin group may give a directory to someone else.
    pub owner: Option<u32>,
    /// Owner group; others than root and the admin group name one of their own groups.
    pub group: Option<u32>,
    /// Make missing parents too, and succeed if the directory exists (`mkdir -p`).
    pub parents: bool,
}

/// Parameters of [`Request::Create`].
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct CreateLease {
    pub name: String,
    pub size: u64,
    /// `None`: the pool's page size.
    pub page_size: Option<PageSize>,
    /// `None`: the broker's default pool.
    pub pool: Option<String>,
    pub persistent: bool,
    /// Permission bits, like a file's (only `0o777` is meaningful).
    pub mode: u32,
    /// Owner uid; only root or the admin group may give a lease to someone else.
    pub owner: Option<u32>,
    /// `Some(n)`: take the memory from a pool bound to NUMA node `n` (with `pool`, that pool
    /// must be on node `n`).
    pub node: Option<u32>,
    /// Which security label the lease is bound to; anything but [`BindLabel::Creator`] is for
    /// root and the admin group only (protocol version 2).
    pub label: BindLabel,
}

/// The security label (AppArmor profile, SELinux context) a new lease is bound to: only
/// processes with that label (and root and the admin group) may open, see or remove it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode)]
pub enum BindLabel {
    /// The creator's own label, as `serve --bind-labels` says (the default).
    #[default]
    Creator,
    /// No label: owner and mode alone protect the lease.
    Unbound,
    /// This label: how an admin tool (libvirt's hook) makes a lease for a confined process
    /// that starts later, such as a domain's QEMU under its `libvirt-UUID` profile.
    Named(String),
}

/// A reply from the broker.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Response {
    Hello {
        version: u16,
        server: String,
    },
    /// Carries exactly one fd: the lease memory.
    Lease(LeaseInfo),
    Ok,
    Stat(LeaseInfo),
    List {
        leases: Vec<LeaseInfo>,
        more: bool,
    },
    Df(Vec<PoolInfo>),
    Error {
        code: ErrorCode,
        message: String,
    },
    Dirs {
        dirs: Vec<DirInfo>,
        more: bool,
    },
    Quota(Vec<QuotaInfo>),
    Quarantine(Vec<QuarantineInfo>),
    /// The answer to [`Request::Describe`].
    Described {
        info: LeaseInfo,
        totals: LeaseTotals,
    },
    /// A page of [`Request::QuotaPage`].
    QuotaPage {
        quotas: Vec<QuotaInfo>,
        more: bool,
    },
    /// A page of [`Request::QuarantinePage`]: pools in the broker's order, each with the next
    /// of its ranges and leases (a pool may go on in the next page, under the same name).
    QuarantinePage {
        pools: Vec<QuarantineInfo>,
        more: bool,
    },
}

/// Most holders, and most extents, a [`LeaseInfo`] lists (poison ranges are fewer anyway):
/// however many a lease has, its description fits a message.
pub const MAX_LISTED: usize = 256;

/// How many holders, extents and poison ranges a lease has, of which its [`LeaseInfo`] lists
/// at most [`MAX_LISTED`] (the first, in the broker's order); 0 where the viewer may not see
/// them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct LeaseTotals {
    pub holders: u64,
    pub extents: u64,
    pub poison: u64,
}

impl Request {
    /// Wire discriminant (header `kind`), never 0.
    pub fn kind(&self) -> u16 {
        match self {
            Request::Hello { .. } => 1,
            Request::Create(_) => 2,
            Request::Open { .. } => 3,
            Request::Release { .. } => 4,
            Request::Remove { .. } => 5,
            Request::Stat { .. } => 6,
            Request::List { .. } => 7,
            Request::Df => 8,
            Request::ReportPoison { .. } => 9,
            Request::Upgrade => 10,
            Request::Mkdir(_) => 11,
            Request::Chmod { .. } => 12,
            Request::Chown { .. } => 13,
            Request::Dirs { .. } => 14,
            Request::Quota => 15,
            Request::Quarantine => 16,
            Request::ClearQuarantine { .. } => 17,
            Request::Describe { .. } => 18,
            Request::QuotaPage { .. } => 19,
            Request::QuarantinePage { .. } => 20,
        }
    }
}

impl Response {
    /// Wire discriminant (header `kind`), never 0; replies have the high bit set.
    pub fn kind(&self) -> u16 {
        0x8000
            | match self {
                Response::Hello { .. } => 1,
                Response::Lease(_) => 2,
                Response::Ok => 3,
                Response::Stat(_) => 4,
                Response::List { .. } => 5,
                Response::Df(_) => 6,
                Response::Error { .. } => 7,
                Response::Dirs { .. } => 8,
                Response::Quota(_) => 9,
                Response::Quarantine(_) => 10,
                Response::Described { .. } => 11,
                Response::QuotaPage { .. } => 12,
                Response::QuarantinePage { .. } => 13,
            }
    }

    /// How many fds travel with this reply.
    pub fn fd_count(&self) -> usize {
        usize::from(matches!(self, Response::Lease(_)))
    }
}

/// Why a request failed; stable numbers on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The message could not be decoded or broke the protocol; the broker disconnects.
    Protocol,
    /// No version both sides speak.
    Version,
    NotFound,
    Exists,
    PermissionDenied,
    InvalidArgument,
    /// The pool has not enough free memory (admission control).
    NoSpace,
    /// The kernel refused memory (e.g. no free huge pages).
    OutOfMemory,
    Internal,
}

/// State of a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseState {
    /// Has at least one holder.
    Held,
    /// Persistent, nobody holds it now.
    Idle,
    /// Removed by name; memory returns to the pool when the last holder goes.
    Removed,
}

/// A connected client that holds a lease.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct HolderInfo {
    pub pid: u32,
    pub uid: u32,
}

/// A `[offset, offset + len)` range within a pool (physical for device-dax, logical for memfd).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct Extent {
    pub start: u64,
    pub len: u64,
}

/// A reported memory error within a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct PoisonInfo {
    pub offset: u64,
    pub len: u64,
}

/// Everything the broker tells about a lease.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct LeaseInfo {
    pub name: String,
    pub size: u64,
    pub page_size: PageSize,
    pub pool: String,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub persistent: bool,
    pub state: LeaseState,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub extents: Vec<Extent>,
    pub holders: Vec<HolderInfo>,
    pub poison: Vec<PoisonInfo>,
    /// Whether the fd that came with this reply is writable.
    pub writable: bool,
    /// The device-dax device behind the lease (`dax0.3`), if any.
    pub device: Option<String>,
    /// The security label (AppArmor profile, SELinux context) the lease is bound to: only
    /// peers with that label, root and the admin group may open or change it. Shown only to
    /// those who see everything about the lease.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// Everything the broker tells about a directory of the lease namespace.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct DirInfo {
    pub path: String,
    pub uid: u32,
    pub gid: u32,
    /// Permission bits and the sticky bit (`0o1777`).
    pub mode: u32,
    /// Made on the way to a lease, and removed with its last entry (not by `mkdir`).
    pub auto: bool,
}

/// Kind of memory a pool hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolKind {
    Memfd,
    Devdax,
}

/// Everything the broker tells about a pool.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct PoolInfo {
    pub name: String,
    pub kind: PoolKind,
    pub page_size: PageSize,
    pub size: u64,
    pub used: u64,
    pub free: u64,
    pub scrubbing: u64,
    pub quarantined: u64,
    pub leases: u64,
    pub default: bool,
    /// The NUMA node every page of the pool's leases is on, if the pool is bound to one.
    pub node: Option<u32>,
    /// Estimated kernel memory (bytes) spent on the pool's memory: its `struct page`s and the
    /// tables mapping them (device-dax: only memory in leases has any).
    pub kernel_overhead: u64,
    /// Estimated memory (bytes) the broker keeps for the pool's leases and ranges.
    pub broker_metadata: u64,
}

/// A quota and what counts against it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct QuotaInfo {
    /// `uid`, `gid` or `default` (the default rule itself, before any uid uses it).
    pub scope: String,
    pub id: u32,
    /// For people: `uid 1000`, `group kvm (gid 100)`.
    pub label: String,
    /// The uid is limited by the default rule, not one of its own.
    pub default: bool,
    pub bytes_limit: Option<u64>,
    pub leases_limit: Option<u64>,
    pub bytes_used: u64,
    pub leases_used: u64,
}

/// A lease with reported memory errors.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct PoisonedLease {
    pub name: String,
    pub poison: Vec<PoisonInfo>,
}

/// A pool's quarantined memory.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct QuarantineInfo {
    pub pool: String,
    pub kind: PoolKind,
    /// Physical ranges out of use for good (device-dax), until cleared.
    pub ranges: Vec<Extent>,
    /// Leases with reported poison (their device-dax memory goes to quarantine on release).
    pub leases: Vec<PoisonedLease>,
}
