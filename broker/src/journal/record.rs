//! What the journal records: every change to the set of leases and to quarantine.

use membroker_client::PageSize;
use membroker_client::proto::{Extent, PoisonInfo};
use serde::{Deserialize, Serialize};

/// A lease as the journal keeps it: enough to rebuild it after a restart. Unknown fields are
/// refused, like the record's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRecord {
    pub id: u64,
    pub name: String,
    pub pool: String,
    pub size: u64,
    pub page_size: PageSize,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub persistent: bool,
    pub created: u64,
    pub extents: Vec<Extent>,
    pub device: Option<String>,
    /// The creator's security label the lease is bound to (see `Peer::label_fits`). Absent
    /// from records of unbound leases, so journals from before labels replay unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// A directory of the lease namespace: made by `mkdir`, or on the way to a new lease
/// (`auto`: removed again with its last entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirRecord {
    pub path: String,
    pub uid: u32,
    pub gid: u32,
    /// Permission bits and the sticky bit (`0o1777`).
    pub mode: u32,
    #[serde(default)]
    pub auto: bool,
}

/// One journal entry. Unknown fields are refused, so a record is never half-understood.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Record {
    /// A lease exists.
    Lease(LeaseRecord),
    /// `rm` of a held lease: the name is free, the memory is still in use.
    Unnamed { id: u64 },
    /// A memory error reported at `[offset, offset + len)` of a lease.
    Poison { id: u64, offset: u64, len: u64 },
    /// A device lease nobody holds is being scrubbed; its extents are not free yet.
    Scrub { id: u64 },
    /// The lease's memory is back in its pool.
    Freed { id: u64 },
    /// Physical memory of a pool with memory errors: never leased again.
    Quarantine { pool: String, start: u64, len: u64 },
    /// An operator returned quarantined physical memory to its pool (a false report).
    Unquarantine { pool: String, start: u64, len: u64 },
    /// A device is about to be made on these extents (before any sysfs write). Resolved by the
    /// `Lease` with the same pool and extents, or by `Abandoned`; an unresolved one after a
    /// crash names a half-made device the broker may destroy (it was never delivered).
    Creating { pool: String, extents: Vec<Extent> },
    /// A `Creating` whose device was not delivered and is gone again.
    Abandoned { pool: String, extents: Vec<Extent> },
    /// A directory exists, or its owner or mode changed (the record replaces the last one).
    Dir(DirRecord),
    /// An empty directory was removed.
    Rmdir { path: String },
    /// A lease's owner or mode changed (`chown`, `chmod`).
    Meta {
        id: u64,
        uid: u32,
        gid: u32,
        mode: u32,
    },
}

/// A lease rebuilt from the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayedLease {
    pub lease: LeaseRecord,
    /// False after `rm` while held.
    pub named: bool,
    pub poison: Vec<PoisonInfo>,
    /// Released and being scrubbed when the broker stopped.
    pub scrubbing: bool,
}

/// Adds `report` to a lease's sorted poison ranges, merging it with those it overlaps or
/// touches; returns whether any byte was new. The namespace and replay share it, so a lease's
/// ranges are the same live and after a restart.
pub fn add_poison(ranges: &mut Vec<PoisonInfo>, report: PoisonInfo) -> bool {
    let (mut start, mut end) = (report.offset, report.offset.saturating_add(report.len));
    let covered = ranges
        .iter()
        .any(|r| r.offset <= start && end <= r.offset + r.len);
    if covered || start == end {
        return false;
    }
    ranges.retain(|r| {
        let apart = r.offset + r.len < start || end < r.offset;
        if !apart {
            start = start.min(r.offset);
            end = end.max(r.offset + r.len);
        }
        apart
    });
    let at = ranges.partition_point(|r| r.offset < start);
    ranges.insert(
        at,
        PoisonInfo {
            offset: start,
            len: end - start,
        },
    );
    true
}
