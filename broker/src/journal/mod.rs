//! The state journal: append-only, checksummed records in `--state-dir`.
//!
//! One record per line: `CRC32 JSON\n`, the CRC (hex) over the JSON bytes. Every record that a
//! reply depends on is on disk (fdatasync) before the reply. At start the journal is replayed;
//! a torn or corrupt *last* record (a crash mid-write) is dropped with a warning, damage
//! followed by intact records stops the start with instructions. Compaction writes the live
//! state to `journal.new`, syncs it and renames it over `journal`.

mod record;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use membroker_client::proto::{Extent, PoisonInfo};
use parking_lot::Mutex;

pub use record::{LeaseRecord, Record, ReplayedLease};

/// Journal failures.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {}: {what}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "journal {} is damaged at line {line} (byte {offset}) of {lines}: records after it are \
         intact, so this is not a torn write from a crash. membroker will not guess what was lost: \
         restore the journal from a backup, or move it aside to start with no leases (running VMs \
         keep their memory, but the broker forgets every lease and device-dax regions must be \
         cleared by hand)",
        path.display()
    )]
    Damaged {
        path: PathBuf,
        line: usize,
        offset: usize,
        lines: usize,
    },
    #[error("journal {}: line {line} contradicts earlier records: {problem}", path.display())]
    Inconsistent {
        path: PathBuf,
        line: usize,
        problem: String,
    },
}

/// Lease ids stay below this (2^62): far beyond any real history, and `id + 1` never overflows.
pub const MAX_ID: u64 = 1 << 62;

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, JournalError>;

/// What replaying the journal found.
#[derive(Debug, Default)]
pub struct Replayed {
    pub leases: BTreeMap<u64, ReplayedLease>,
    /// Per pool name, the quarantined physical ranges.
    pub quarantine: Vec<(String, Extent)>,
    pub next_id: u64,
    /// Records read.
    pub records: u64,
    /// A torn or corrupt last record was dropped.
    pub dropped_tail: bool,
    /// Device creations that started and were never resolved (pool, extents).
    pub creating: Vec<(String, Vec<Extent>)>,
}

/// The open journal.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    dir: PathBuf,
    sync: bool,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    file: File,
    records: u64,
    /// Scrubs started and not finished: the lease records they need after a crash. Carried
    /// over by compaction, which only sees the namespace's live leases.
    scrubbing: BTreeMap<u64, LeaseRecord>,
    /// Device creations started and not resolved, also carried over by compaction.
    creating: Vec<(String, Vec<Extent>)>,
}

impl Inner {
    /// Keeps the in-flight sets in step with a record being written.
    fn track(&mut self, record: &Record) {
        match record {
            Record::Freed { id } => {
                self.scrubbing.remove(id);
            }
            Record::Creating { pool, extents } => {
                self.creating.push((pool.clone(), extents.clone()))
            }
            Record::Abandoned { pool, extents } => resolve(&mut self.creating, pool, extents),
            Record::Lease(l) => resolve(&mut self.creating, &l.pool, &l.extents),
            _ => {}
        }
    }
}

/// Drops the creation of `extents` in `pool` from `creating`.
fn resolve(creating: &mut Vec<(String, Vec<Extent>)>, pool: &str, extents: &[Extent]) {
    if let Some(i) = creating.iter().position(|(p, e)| p == pool && e == extents) {
        creating.remove(i);
    }
}

fn encode(record: &Record) -> Vec<u8> {
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

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Journal {
    /// Opens (creating) `dir/journal` and replays it. `sync`: fdatasync every append.
    pub fn open(dir: &Path, sync: bool) -> Result<(Journal, Replayed)> {
        let path = dir.join("journal");
        let io = |what| {
            let path = path.clone();
            move |source| JournalError::Io { path, what, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("cannot create the state directory"))?;
        let data = match std::fs::read(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io("cannot read")(e)),
        };
        let (replayed, good_len) = replay(&path, &data)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(io("cannot open"))?;
        if good_len < data.len() {
            file.set_len(good_len as u64)
                .map_err(io("cannot drop the torn last record"))?;
            file.sync_all().map_err(io("cannot sync"))?;
        }
        let journal = Journal {
            dir: dir.to_path_buf(),
            sync,
            inner: Mutex::new(Inner {
                file,
                records: replayed.records,
                scrubbing: replayed
                    .leases
                    .values()
                    .filter(|l| l.scrubbing)
                    .map(|l| (l.lease.id, l.lease.clone()))
                    .collect(),
                creating: replayed.creating.clone(),
            }),
            path,
        };
        Ok((journal, replayed))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record; on return it is on disk (unless syncing is off).
    pub fn append(&self, record: &Record) -> Result<()> {
        let line = encode(record);
        let mut inner = self.inner.lock();
        let io = |what| {
            move |source| JournalError::Io {
                path: self.path.clone(),
                what,
                source,
            }
        };
        inner.file.write_all(&line).map_err(io("cannot append"))?;
        if self.sync {
            inner.file.sync_data().map_err(io("cannot sync"))?;
        }
        inner.records += 1;
        inner.track(record);
        Ok(())
    }

    /// Journals that a device lease nobody holds is being scrubbed, keeping its record until
    /// the scrub's `Freed` (so that a compaction meanwhile does not forget the device).
    pub fn begin_scrub(&self, lease: &LeaseRecord) -> Result<()> {
        self.append(&Record::Scrub { id: lease.id })?;
        self.inner.lock().scrubbing.insert(lease.id, lease.clone());
        Ok(())
    }

    /// Records in the file now.
    pub fn records(&self) -> u64 {
        self.inner.lock().records
    }

    /// Replaces the journal by `snapshot` (the live state): write-new, sync, rename, sync dir.
    pub fn compact(&self, snapshot: &[Record]) -> Result<()> {
        let mut inner = self.inner.lock();
        let new = self.dir.join("journal.new");
        let io = |what| {
            let path = new.clone();
            move |source| JournalError::Io { path, what, source }
        };
        let mut out = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&new)
            .map_err(io("cannot create"))?;
        let mut buf = Vec::new();
        for record in snapshot {
            buf.extend_from_slice(&encode(record));
        }
        // What is in flight outside the namespace: scrubs and device creations, unless the
        // snapshot already has them (a lease recorded twice would stop the next start).
        let mut extra = 0;
        let mut listed = std::collections::BTreeSet::new();
        let mut creating_listed = Vec::new();
        for record in snapshot {
            match record {
                Record::Lease(l) => {
                    listed.insert(l.id);
                }
                Record::Creating { pool, extents } => creating_listed.push((pool, extents)),
                _ => {}
            }
        }
        for lease in inner.scrubbing.values().filter(|l| !listed.contains(&l.id)) {
            buf.extend_from_slice(&encode(&Record::Lease(lease.clone())));
            buf.extend_from_slice(&encode(&Record::Scrub { id: lease.id }));
            extra += 2;
        }
        for (pool, extents) in inner
            .creating
            .iter()
            .filter(|(p, e)| !creating_listed.contains(&(p, e)))
        {
            let record = Record::Creating {
                pool: pool.clone(),
                extents: extents.clone(),
            };
            buf.extend_from_slice(&encode(&record));
            extra += 1;
        }
        out.write_all(&buf).map_err(io("cannot write"))?;
        out.sync_all().map_err(io("cannot sync"))?;
        std::fs::rename(&new, &self.path).map_err(io("cannot rename over the journal"))?;
        sync_dir(&self.dir).map_err(io("cannot sync the state directory"))?;
        inner.file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(io("cannot reopen"))?;
        inner.records = snapshot.len() as u64 + extra;
        Ok(())
    }
}

/// Replays `data`; returns the state and the length of the intact prefix.
fn replay(path: &Path, data: &[u8]) -> Result<(Replayed, usize)> {
    let mut state = Replayed {
        next_id: 1,
        ..Replayed::default()
    };
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

fn apply(state: &mut Replayed, record: Record) -> std::result::Result<(), String> {
    fn lease(state: &mut Replayed, id: u64) -> std::result::Result<&mut ReplayedLease, String> {
        state
            .leases
            .get_mut(&id)
            .ok_or_else(|| format!("lease {id} is not known"))
    }
    match record {
        Record::Lease(l) => {
            let id = l.id;
            // Ids count up from 1; anything near the top of u64 is damage, not history.
            if id == 0 || id >= MAX_ID {
                return Err(format!("lease id {id} is out of range"));
            }
            state.next_id = state.next_id.max(id + 1);
            resolve(&mut state.creating, &l.pool, &l.extents);
            let replayed = ReplayedLease {
                lease: l,
                named: true,
                poison: Vec::new(),
                scrubbing: false,
            };
            if state.leases.insert(id, replayed).is_some() {
                return Err(format!("lease {id} recorded twice"));
            }
        }
        Record::Unnamed { id } => lease(state, id)?.named = false,
        Record::Poison { id, offset, len } => {
            lease(state, id)?.poison.push(PoisonInfo { offset, len })
        }
        Record::Scrub { id } => lease(state, id)?.scrubbing = true,
        // A scrub that ends after a compaction frees a lease the compacted journal no longer
        // lists: freeing is idempotent.
        Record::Freed { id } => {
            state.leases.remove(&id);
        }
        Record::Quarantine { pool, start, len } => {
            state.quarantine.push((pool, Extent { start, len }))
        }
        Record::Creating { pool, extents } => state.creating.push((pool, extents)),
        Record::Abandoned { pool, extents } => resolve(&mut state.creating, &pool, &extents),
    }
    Ok(())
}

/// The records that rebuild `leases` and `quarantine` (a compaction snapshot).
pub fn snapshot<'a>(
    leases: impl Iterator<Item = &'a ReplayedLease>,
    quarantine: &[(String, Extent)],
) -> Vec<Record> {
    let mut out = Vec::new();
    for (pool, e) in quarantine {
        out.push(Record::Quarantine {
            pool: pool.clone(),
            start: e.start,
            len: e.len,
        });
    }
    for l in leases {
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
    out
}

#[cfg(test)]
mod tests;
