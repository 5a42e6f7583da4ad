//! The journal's state machine: the line format, replaying a file, applying one record, and
//! the records that rebuild a state (what compaction writes).
//!
//! The same [`apply`] runs at start (replay) and after every append (the live model the
//! journal compacts from), so a compacted journal replays to exactly the state it replaced.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use membroker_client::proto::{Extent, PoisonInfo};

use super::record::add_poison;
use super::{DirRecord, JournalError, MAX_ID, Record, ReplayedLease, Result};

/// What the journal records amount to: the leases, quarantine and work in flight.
#[derive(Debug, Default, Clone)]
pub struct Replayed {
    pub leases: BTreeMap<u64, ReplayedLease>,
    /// Per pool name, the quarantined physical ranges.
    pub quarantine: Vec<(String, Extent)>,
    /// Above every lease id the journal ever recorded (including leases still being
    /// scrubbed, which the namespace no longer lists): new leases count on from here.
    pub next_id: u64,
    /// Records read.
    pub records: u64,
    /// A torn or corrupt last record was dropped.
    pub dropped_tail: bool,
    /// Device creations that started and were never resolved (pool, extents).
    pub creating: Vec<(String, Vec<Extent>)>,
    /// The namespace's directories, by path.
    pub dirs: BTreeMap<String, DirRecord>,
}

impl Replayed {
    /// An empty state.
    pub fn new() -> Replayed {
        Replayed {
            next_id: 1,
            ..Replayed::default()
        }
    }

    /// The records that rebuild this state, in an order replay accepts: directories and
    /// quarantine, then each lease followed by what happened to it, then device creations in
    /// flight.
    pub fn snapshot(&self) -> Vec<Record> {
        let mut out: Vec<Record> = self.dirs.values().cloned().map(Record::Dir).collect();
        for (pool, e) in &self.quarantine {
            out.push(Record::Quarantine {
                pool: pool.clone(),
                start: e.start,
                len: e.len,
            });
        }
        for l in self.leases.values() {
            out.push(Record::Lease(l.lease.clone()));
            let id = l.lease.id;
            if !l.named {
                out.push(Record::Unnamed { id });
            }
            for p in &l.poison {
                out.push(Record::Poison {
                    id,
                    offset: p.offset,
                    len: p.len,
                });
            }
            if l.scrubbing {
                out.push(Record::Scrub { id });
            }
        }
        for (pool, extents) in &self.creating {
            out.push(Record::Creating {
                pool: pool.clone(),
                extents: extents.clone(),
            });
        }
        out
    }
}

/// One line: `CRC32HEX JSON\n`, the CRC over the JSON bytes.
pub(super) fn encode(record: &Record) -> Vec<u8> {
    let json = serde_json::to_vec(record).expect("journal records always serialize");
    let mut line = format!("{:08x} ", crc32fast::hash(&json)).into_bytes();
    line.extend_from_slice(&json);
    line.push(b'\n');
    line
}

fn decode(line: &[u8]) -> Option<Record> {
    let (crc, json) = (line.get(..8)?, line.get(9..)?);
    if line.get(8) != Some(&b' ') {
        return None;
    }
    let crc = u32::from_str_radix(std::str::from_utf8(crc).ok()?, 16).ok()?;
    if crc32fast::hash(json) != crc {
        return None;
    }
    serde_json::from_slice(json).ok()
}

/// Replays `data`; returns the state and the length of the intact prefix.
pub(super) fn replay(path: &Path, data: &[u8]) -> Result<(Replayed, usize)> {
    let mut state = Replayed::new();
    let lines = data.split_inclusive(|&b| b == b'\n').count();
    let mut offset = 0;
    for (i, line) in data.split_inclusive(|&b| b == b'\n').enumerate() {
        let last = offset + line.len() == data.len();
        let record = line.strip_suffix(b"\n").and_then(decode);
        let Some(record) = record else {
            if last {
                tracing::warn!(journal = %path.display(), line = i + 1, offset, "dropping a torn or corrupt last record (a crash mid-write)");
                state.dropped_tail = true;
                return Ok((state, offset));
            }
            return Err(JournalError::Damaged {
                path: path.to_path_buf(),
                line: i + 1,
                offset,
                lines,
            });
        };
        apply(&mut state, record).map_err(|problem| JournalError::Inconsistent {
            path: path.to_path_buf(),
            line: i + 1,
            problem,
        })?;
        state.records += 1;
        offset += line.len();
    }
    Ok((state, offset))
}

/// Whether `record` may follow `state` (leases created earlier in the same batch count as
/// known): what [`apply`] would refuse, found before anything is written.
pub(super) fn check(
    state: &Replayed,
    batch: &BTreeSet<u64>,
    record: &Record,
) -> std::result::Result<(), String> {
    let known = |id: &u64| state.leases.contains_key(id) || batch.contains(id);
    match record {
        Record::Lease(l) if l.id == 0 || l.id >= MAX_ID => {
            Err(format!("lease id {} is out of range", l.id))
        }
        Record::Lease(l) if known(&l.id) => Err(format!("lease {} recorded twice", l.id)),
        Record::Unnamed { id }
        | Record::Poison { id, .. }
        | Record::Scrub { id }
        | Record::Meta { id, .. }
            if !known(id) =>
        {
            Err(format!("lease {id} is not known"))
        }
        Record::Dir(d) if d.path.is_empty() => Err("a directory with an empty path".into()),
        Record::Quarantine { start, len, .. } | Record::Unquarantine { start, len, .. }
            if *len == 0 || start.checked_add(*len).is_none() =>
        {
            Err(format!("{start:#x}+{len} is not a range"))
        }
        Record::Poison { offset, len, .. } if *len == 0 || offset.checked_add(*len).is_none() => {
            Err(format!("poison at {offset:#x}+{len} is not a range"))
        }
        _ => Ok(()),
    }
}

/// Applies one record to `state`; refuses (changing nothing) what contradicts it.
pub(super) fn apply(state: &mut Replayed, record: Record) -> std::result::Result<(), String> {
    check(state, &BTreeSet::new(), &record)?;
    fn lease(state: &mut Replayed, id: u64) -> &mut ReplayedLease {
        state
            .leases
            .get_mut(&id)
            .expect("checked: the lease is known")
    }
    match record {
        Record::Lease(l) => {
            let id = l.id;
            state.next_id = state.next_id.max(id + 1);
            resolve(&mut state.creating, &l.pool, &l.extents);
            let replayed = ReplayedLease {
                lease: l,
                named: true,
                poison: Vec::new(),
                scrubbing: false,
            };
            state.leases.insert(id, replayed);
        }
        Record::Unnamed { id } => lease(state, id).named = false,
        Record::Poison { id, offset, len } => {
            add_poison(&mut lease(state, id).poison, PoisonInfo { offset, len });
        }
        Record::Scrub { id } => lease(state, id).scrubbing = true,
        // A scrub that ends after a compaction frees a lease the compacted journal no longer
        // lists: freeing is idempotent.
        Record::Freed { id } => {
            state.leases.remove(&id);
        }
        Record::Quarantine { pool, start, len } => {
            state.quarantine.push((pool, Extent { start, len }))
        }
        Record::Unquarantine { pool, start, len } => {
            unquarantine(&mut state.quarantine, &pool, start, start + len)
        }
        Record::Creating { pool, extents } => state.creating.push((pool, extents)),
        Record::Abandoned { pool, extents } => resolve(&mut state.creating, &pool, &extents),
        Record::Dir(d) => {
            state.dirs.insert(d.path.clone(), d);
        }
        // Like `Freed`, idempotent: an automatic directory may go in the batch that made it.
        Record::Rmdir { path } => {
            state.dirs.remove(&path);
        }
        Record::Meta { id, uid, gid, mode } => {
            let l = &mut lease(state, id).lease;
            (l.uid, l.gid, l.mode) = (uid, gid, mode);
        }
    }
    Ok(())
}

/// Cuts `[start, end)` out of `pool`'s quarantined ranges (splitting those it falls inside).
fn unquarantine(quarantine: &mut Vec<(String, Extent)>, pool: &str, start: u64, end: u64) {
    let mut kept = Vec::with_capacity(quarantine.len() + 1);
    for (p, e) in quarantine.drain(..) {
        let e_end = e.start + e.len;
        if p != pool || e_end <= start || end <= e.start {
            kept.push((p, e));
            continue;
        }
        if e.start < start {
            kept.push((
                p.clone(),
                Extent {
                    start: e.start,
                    len: start - e.start,
                },
            ));
        }
        if end < e_end {
            kept.push((
                p,
                Extent {
                    start: end,
                    len: e_end - end,
                },
            ));
        }
    }
    *quarantine = kept;
}

/// Drops the creation of `extents` in `pool` from `creating`.
fn resolve(creating: &mut Vec<(String, Vec<Extent>)>, pool: &str, extents: &[Extent]) {
    if let Some(i) = creating.iter().position(|(p, e)| p == pool && e == extents) {
        creating.remove(i);
    }
}
