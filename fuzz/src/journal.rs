//! `journal_replay`: `Journal::open` on an arbitrary journal file.
//!
//! Replay must return `Ok` or `Err`, never panic. When it returns `Ok`, the journal must be
//! usable: an appended record survives a reopen next to the replayed state, and compacting that
//! state and reopening gives it back.
//!
//! Input format, so that the fuzzer gets past the CRCs: the first byte picks a mode.
//! - even: the rest is the journal file, byte for byte.
//! - odd: the rest is lines of JSON; each gets its correct `CRC32HEX ` prefixed, except lines
//!   starting with `!`, which are written as they are (without the `!`). A last line without
//!   `\n` stays without it (a torn write).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use membroker::journal::{Journal, LeaseRecord, Record, ReplayedLease};
use membroker_client::PageSize;
use membroker_client::proto::Extent;

/// Turns fuzz input into journal file contents (see the module documentation).
pub fn file_contents(data: &[u8]) -> Vec<u8> {
    let Some((&mode, rest)) = data.split_first() else {
        return Vec::new();
    };
    if mode & 1 == 0 {
        return rest.to_vec();
    }
    let mut out = Vec::with_capacity(rest.len() + rest.len() / 8);
    for line in rest.split_inclusive(|&b| b == b'\n') {
        if let Some(raw) = line.strip_prefix(b"!") {
            out.extend_from_slice(raw);
            continue;
        }
        let (body, newline) = match line.strip_suffix(b"\n") {
            Some(body) => (body, true),
            None => (line, false),
        };
        out.extend_from_slice(format!("{:08x} ", crc32fast::hash(body)).as_bytes());
        out.extend_from_slice(body);
        if newline {
            out.push(b'\n');
        }
    }
    out
}

/// The inverse of [`file_contents`] for a well-formed journal: lines of JSON, mode byte 1.
pub fn encode_input(records: &[Record]) -> Vec<u8> {
    let mut out = vec![1u8];
    for r in records {
        out.extend_from_slice(&serde_json_line(r));
    }
    out
}

fn serde_json_line(record: &Record) -> Vec<u8> {
    let mut line = serde_json::to_vec(record).expect("records serialize");
    line.push(b'\n');
    line
}

/// A folder for this process's journals, on tmpfs when there is one (fast, no disk wear).
fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let builder = tempfile::Builder::new()
            .prefix("membroker-fuzz-")
            .tempdir_in(shm);
        builder
            .or_else(|_| tempfile::Builder::new().prefix("membroker-fuzz-").tempdir())
            .expect("cannot create a scratch folder")
    })
    .path()
}

/// The state folder, emptied of what an earlier run left (only `journal` and `journal.new`).
fn fresh_state_dir() -> PathBuf {
    let dir = scratch_dir().join("state");
    std::fs::create_dir_all(&dir).expect("cannot create the state folder");
    for name in ["journal", "journal.new"] {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("cannot clear {}: {e}", dir.display()),
        }
    }
    dir
}

/// A new lease record with id `id`.
fn new_lease(id: u64) -> LeaseRecord {
    LeaseRecord {
        id,
        name: format!("fuzz/{id}"),
        pool: "default".into(),
        size: 2 << 20,
        page_size: PageSize::Huge2M,
        uid: 1000,
        gid: 1000,
        mode: 0o600,
        persistent: true,
        created: 1_700_000_000,
        extents: vec![Extent {
            start: 0,
            len: 2 << 20,
        }],
        device: None,
        label: None,
    }
}

/// Fuzz target `journal_replay`. Returns whether the journal opened.
pub fn replay(data: &[u8]) -> bool {
    let contents = file_contents(data);
    let dir = fresh_state_dir();
    let path = dir.join("journal");
    std::fs::write(&path, &contents).expect("cannot write the journal");

    let Ok((journal, first)) = Journal::open(&dir, false) else {
        // Refused, and left alone: a damaged journal is for a person to look at.
        assert_eq!(std::fs::read(&path).expect("journal still there"), contents);
        return false;
    };
    // What is left on disk is the intact prefix: whole lines, at least one per record.
    let kept = std::fs::read(&path).expect("journal still there");
    assert!(
        contents.starts_with(&kept),
        "replay changed the records it kept"
    );
    assert_eq!(first.dropped_tail, kept.len() < contents.len());
    assert!(kept.is_empty() || kept.ends_with(b"\n"));
    let lines = kept.iter().filter(|&&b| b == b'\n').count() as u64;
    assert_eq!(first.records, lines);
    assert_eq!(journal.records(), first.records);
    assert!(first.next_id >= 1);
    for (&id, lease) in &first.leases {
        assert_eq!(lease.lease.id, id);
        assert!(
            id < first.next_id,
            "lease {id} not below next_id {}",
            first.next_id
        );
    }

    // Appending works and reopening keeps everything.
    let id = first.next_id;
    let record = new_lease(id);
    journal
        .append(&Record::Lease(record.clone()))
        .expect("append");
    drop(journal);
    let (journal, second) = Journal::open(&dir, false)
        .unwrap_or_else(|e| panic!("journal does not reopen after an append: {e}"));
    let mut expect: BTreeMap<u64, ReplayedLease> = first.leases.clone();
    expect.insert(
        id,
        ReplayedLease {
            lease: record,
            named: true,
            poison: Vec::new(),
            scrubbing: false,
        },
    );
    assert_eq!(second.leases, expect, "reopen changed the leases");
    assert_eq!(second.quarantine, first.quarantine);
    assert_eq!(second.records, first.records + 1);
    assert_eq!(second.next_id, id + 1);
    assert!(!second.dropped_tail);

    // Compacting the replayed state and reopening gives the same state back, with device
    // creations in flight carried over once each.
    let snap = second.snapshot();
    journal.compact().expect("compact");
    assert_eq!(journal.records(), snap.len() as u64);
    drop(journal);
    let (_, third) = Journal::open(&dir, false)
        .unwrap_or_else(|e| panic!("journal does not reopen after compaction: {e}"));
    assert_eq!(third.leases, second.leases, "compaction changed the leases");
    assert_eq!(third.quarantine, second.quarantine);
    assert_eq!(third.records, snap.len() as u64);
    assert_eq!(third.creating, second.creating);
    assert!(!third.dropped_tail);
    true
}
