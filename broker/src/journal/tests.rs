use super::*;
use membroker_client::PageSize;
use membroker_client::proto::{Extent, PoisonInfo};
use proptest::prelude::*;

fn lease(id: u64) -> Record {
    Record::Lease(LeaseRecord {
        id,
        name: format!("vm{id}/ram0"),
        pool: "default".into(),
        size: 2 << 20,
        page_size: PageSize::Huge2M,
        uid: 1000,
        gid: 1000,
        mode: 0o600,
        persistent: id.is_multiple_of(2),
        created: 1_700_000_000 + id,
        extents: vec![Extent {
            start: id << 30,
            len: 2 << 20,
        }],
        device: Some(format!("dax0.{id}")),
        label: None,
    })
}

fn write_all(dir: &Path, records: &[Record]) -> Vec<u8> {
    let (journal, _) = Journal::open(dir, true).unwrap();
    for r in records {
        journal.append(r).unwrap();
    }
    std::fs::read(dir.join("journal")).unwrap()
}

/// Writes records as they are, without the checks `append` makes (a journal from elsewhere).
fn write_raw(dir: &Path, records: &[Record]) {
    let bytes: Vec<u8> = records.iter().flat_map(replay::encode).collect();
    std::fs::write(dir.join("journal"), bytes).unwrap();
}

#[test]
fn round_trip() {
    let dir = tempfile::tempdir().unwrap();
    write_all(
        dir.path(),
        &[
            lease(1),
            lease(2),
            Record::Poison {
                id: 2,
                offset: 0,
                len: 2 << 20,
            },
            Record::Unnamed { id: 2 },
            lease(3),
            Record::Scrub { id: 3 },
            Record::Quarantine {
                pool: "dax".into(),
                start: 0x1_0000_0000,
                len: 2 << 20,
            },
            Record::Freed { id: 1 },
        ],
    );
    let (_, state) = Journal::open(dir.path(), true).unwrap();
    assert_eq!(state.leases.keys().copied().collect::<Vec<_>>(), [2, 3]);
    assert!(!state.leases[&2].named);
    assert_eq!(
        state.leases[&2].poison,
        vec![PoisonInfo {
            offset: 0,
            len: 2 << 20
        }]
    );
    assert!(state.leases[&3].scrubbing);
    assert_eq!(
        state.quarantine,
        vec![(
            "dax".to_string(),
            Extent {
                start: 0x1_0000_0000,
                len: 2 << 20
            }
        )]
    );
    assert_eq!(state.next_id, 4);
    assert!(!state.dropped_tail);
}

#[test]
fn torn_or_flipped_last_record_is_dropped_and_the_file_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_all(dir.path(), &[lease(1), lease(2)]);
    let first_len = data.iter().position(|&b| b == b'\n').unwrap() + 1;
    for damage in ["torn", "flipped"] {
        let mut bad = data.clone();
        match damage {
            "torn" => bad.truncate(data.len() - 7),
            _ => bad[first_len + 20] ^= 0x04,
        }
        std::fs::write(dir.path().join("journal"), &bad).unwrap();
        let (journal, state) = Journal::open(dir.path(), true).unwrap();
        assert!(state.dropped_tail, "{damage}");
        assert_eq!(
            state.leases.keys().copied().collect::<Vec<_>>(),
            [1],
            "{damage}"
        );
        assert_eq!(
            std::fs::metadata(journal.path()).unwrap().len() as usize,
            first_len,
            "{damage}: file cut back"
        );
        journal.append(&lease(5)).unwrap();
        drop(journal);
        let (_, state) = Journal::open(dir.path(), true).unwrap();
        assert_eq!(
            state.leases.keys().copied().collect::<Vec<_>>(),
            [1, 5],
            "{damage}: appends after repair"
        );
        write_all(dir.path(), &[]);
        std::fs::write(dir.path().join("journal"), &data).unwrap();
    }
}

#[test]
fn damage_in_the_middle_stops_the_start_with_instructions() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = write_all(dir.path(), &[lease(1), lease(2), lease(3)]);
    data[30] ^= 0x01;
    std::fs::write(dir.path().join("journal"), &data).unwrap();
    let err = Journal::open(dir.path(), true).unwrap_err().to_string();
    assert!(err.contains("is damaged at line 1 (byte 0) of 3"), "{err}");
    assert!(
        err.contains("restore the journal from a backup, or move it aside"),
        "{err}"
    );
}

#[test]
fn contradictions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_raw(
        dir.path(),
        &[
            lease(1),
            Record::Poison {
                id: 2,
                offset: 0,
                len: 1,
            },
        ],
    );
    let err = Journal::open(dir.path(), true).unwrap_err().to_string();
    assert!(
        err.contains("line 2 contradicts earlier records: lease 2 is not known"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let Record::Lease(mut huge) = lease(1) else {
        unreachable!()
    };
    huge.id = u64::MAX;
    write_raw(dir.path(), &[Record::Lease(huge)]);
    let err = Journal::open(dir.path(), true).unwrap_err().to_string();
    assert!(
        err.contains(
            "line 1 contradicts earlier records: lease id 18446744073709551615 is out of range"
        ),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    write_raw(dir.path(), &[lease(1), lease(1)]);
    let err = Journal::open(dir.path(), true).unwrap_err().to_string();
    assert!(err.contains("lease 1 recorded twice"), "{err}");
}

#[test]
fn appends_that_contradict_the_journal_are_refused_unwritten() {
    let dir = tempfile::tempdir().unwrap();
    let before = write_all(dir.path(), &[lease(1)]);
    let (journal, _) = Journal::open(dir.path(), true).unwrap();
    let poison = Record::Poison {
        id: 2,
        offset: 0,
        len: 1,
    };
    for batch in [
        vec![poison],
        vec![lease(3), lease(1)],
        vec![lease(2), lease(2)],
    ] {
        let err = journal.append_all(&batch).unwrap_err().to_string();
        assert!(
            err.contains("refused a record that contradicts it"),
            "{err}"
        );
        assert_eq!(
            std::fs::read(journal.path()).unwrap(),
            before,
            "nothing written"
        );
    }
    // A lease and what happens to it in one batch is fine.
    journal
        .append_all(&[lease(2), Record::Unnamed { id: 2 }, Record::Scrub { id: 2 }])
        .unwrap();
    drop(journal);
    let (_, state) = Journal::open(dir.path(), true).unwrap();
    assert!(!state.leases[&2].named && state.leases[&2].scrubbing);
}

#[test]
fn compaction_keeps_the_state_and_shrinks_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut records = Vec::new();
    for id in 1..200 {
        records.push(lease(id));
        if id % 3 != 0 {
            records.push(Record::Freed { id });
        }
    }
    records.push(Record::Poison {
        id: 3,
        offset: 4096,
        len: 4096,
    });
    records.push(Record::Quarantine {
        pool: "dax".into(),
        start: 0,
        len: 4096,
    });
    let before = write_all(dir.path(), &records).len();
    let (journal, state) = Journal::open(dir.path(), true).unwrap();
    journal.compact().unwrap();
    journal.append(&lease(500)).unwrap();
    drop(journal);
    let after = std::fs::metadata(dir.path().join("journal")).unwrap().len() as usize;
    assert!(after < before / 2, "{after} vs {before}");
    let (_, again) = Journal::open(dir.path(), true).unwrap();
    let mut expected = state.leases.clone();
    let Record::Lease(l) = lease(500) else {
        unreachable!()
    };
    expected.insert(
        500,
        ReplayedLease {
            lease: l,
            named: true,
            poison: vec![],
            scrubbing: false,
        },
    );
    assert_eq!(again.leases, expected);
    assert_eq!(again.quarantine, state.quarantine);
    assert!(!dir.path().join("journal.new").exists());
}

#[test]
fn compaction_keeps_work_in_flight_once() {
    let dir = tempfile::tempdir().unwrap();
    let creating = Record::Creating {
        pool: "default".into(),
        extents: vec![Extent {
            start: 0,
            len: 2 << 20,
        }],
    };
    write_all(
        dir.path(),
        &[
            lease(1),
            lease(2),
            Record::Scrub { id: 2 },
            creating.clone(),
        ],
    );
    let (journal, state) = Journal::open(dir.path(), true).unwrap();
    assert!(state.leases[&2].scrubbing);
    assert_eq!(state.creating.len(), 1);
    // Compacting twice: work in flight is written once each time, never twice.
    for _ in 0..2 {
        journal.compact().unwrap();
        let (_, again) = Journal::open(dir.path(), true).expect("reopens: nothing recorded twice");
        assert_eq!(again.leases, state.leases);
        assert_eq!(again.creating, state.creating);
    }
    // The scrub finishes: its lease is no longer carried over.
    journal.append(&Record::Freed { id: 2 }).unwrap();
    journal.compact().unwrap();
    let (_, done) = Journal::open(dir.path(), true).unwrap();
    assert_eq!(done.leases.keys().copied().collect::<Vec<_>>(), [1]);
}

proptest! {
    /// A crash at any byte of the journal recovers exactly the records written before it.
    #[test]
    fn crash_at_any_byte_recovers_a_prefix(n in 1usize..12, cut in any::<prop::sample::Index>()) {
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<Record> = (1..=n as u64)
            .flat_map(|id| if id % 2 == 0 { vec![lease(id), Record::Freed { id: id - 1 }] } else { vec![lease(id)] })
            .collect();
        let data = write_all(dir.path(), &records);
        let cut = cut.index(data.len() + 1);
        std::fs::write(dir.path().join("journal"), &data[..cut]).unwrap();
        let whole_lines = data[..cut].iter().filter(|&&b| b == b'\n').count();
        let (_, state) = Journal::open(dir.path(), true).unwrap();
        let mut expected = Replayed::new();
        for r in &records[..whole_lines] {
            apply(&mut expected, r.clone()).unwrap();
        }
        prop_assert_eq!(state.leases, expected.leases);
        prop_assert_eq!(state.dropped_tail, cut > 0 && data[cut - 1] != b'\n');
    }
}

#[test]
fn directories_and_owners_survive_replay_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let d = |path: &str, uid, mode| {
        Record::Dir(DirRecord {
            path: path.into(),
            uid,
            gid: uid,
            mode,
            auto: false,
        })
    };
    let records = vec![
        d("tenant", 0, 0o755),
        d("tenant/a", 1000, 0o750),
        d("gone", 1000, 0o700),
        lease(1),
        Record::Meta {
            id: 1,
            uid: 1001,
            gid: 50,
            mode: 0o640,
        },
        d("tenant", 1000, 0o1777),
        Record::Rmdir {
            path: "gone".into(),
        },
    ];
    write_all(dir.path(), &records);
    let check = |state: &Replayed| {
        let dirs: Vec<_> = state
            .dirs
            .values()
            .map(|d| (d.path.as_str(), d.uid, d.mode))
            .collect();
        assert_eq!(dirs, [("tenant", 1000, 0o1777), ("tenant/a", 1000, 0o750)]);
        let l = &state.leases[&1].lease;
        assert_eq!((l.uid, l.gid, l.mode), (1001, 50, 0o640));
    };
    let (journal, state) = Journal::open(dir.path(), true).unwrap();
    check(&state);
    journal.compact().unwrap();
    drop(journal);
    let (_, again) = Journal::open(dir.path(), true).unwrap();
    check(&again);
    let (journal, _) = Journal::open(dir.path(), true).unwrap();
    let err = journal
        .append(&Record::Meta {
            id: 9,
            uid: 0,
            gid: 0,
            mode: 0,
        })
        .unwrap_err();
    assert!(err.to_string().contains("lease 9 is not known"), "{err}");
}

#[test]
fn unquarantine_cuts_ranges_and_compaction_keeps_the_rest() {
    let q = |pool: &str, start: u64, len: u64| Record::Quarantine {
        pool: pool.into(),
        start,
        len,
    };
    let mut state = Replayed::new();
    for r in [
        q("dax", 0, 8 << 20),
        q("other", 0, 8 << 20),
        Record::Unquarantine {
            pool: "dax".into(),
            start: 2 << 20,
            len: 2 << 20,
        },
    ] {
        apply(&mut state, r).unwrap();
    }
    let zero = Record::Unquarantine {
        pool: "dax".into(),
        start: 0,
        len: 0,
    };
    assert!(apply(&mut state, zero).is_err());
    let ext = |start, len| Extent { start, len };
    let expected = vec![
        ("other".to_string(), ext(0, 8 << 20)),
        ("dax".to_string(), ext(0, 2 << 20)),
        ("dax".to_string(), ext(4 << 20, 4 << 20)),
    ];
    let mut got = state.quarantine.clone();
    got.sort_by_key(|(p, e)| (p != "other", e.start));
    assert_eq!(got, expected);
    let mut again = Replayed::new();
    for r in state.snapshot() {
        apply(&mut again, r).unwrap();
    }
    assert_eq!(
        again.quarantine, state.quarantine,
        "carried through compaction"
    );
}

#[test]
fn replayed_poison_is_merged() {
    let mut state = Replayed::new();
    apply(&mut state, lease(1)).unwrap();
    for (offset, len) in [(0, 4096), (4096, 4096), (0, 8192), (16384, 4096)] {
        apply(&mut state, Record::Poison { id: 1, offset, len }).unwrap();
    }
    assert_eq!(
        state.leases[&1].poison,
        vec![
            PoisonInfo {
                offset: 0,
                len: 8192
            },
            PoisonInfo {
                offset: 16384,
                len: 4096
            }
        ]
    );
}

#[test]
fn ranges_that_are_not_ranges_are_refused() {
    for record in [
        Record::Quarantine {
            pool: "dax".into(),
            start: u64::MAX,
            len: 2,
        },
        Record::Unquarantine {
            pool: "dax".into(),
            start: 0,
            len: 0,
        },
        Record::Poison {
            id: 1,
            offset: u64::MAX - 1,
            len: 4096,
        },
    ] {
        let dir = tempfile::tempdir().unwrap();
        write_raw(dir.path(), &[lease(1), record.clone()]);
        let err = Journal::open(dir.path(), true).unwrap_err().to_string();
        assert!(err.contains("is not a range"), "{record:?}: {err}");
    }
}

#[test]
fn a_lease_label_is_optional_both_ways() {
    // Unbound leases are written as before labels existed, so older brokers read them.
    let plain = serde_json::to_string(&lease(1)).unwrap();
    assert!(!plain.contains("label"), "{plain}");
    // A record from before labels replays unbound.
    let old = plain.replace(r#","device":"dax0.1""#, r#","device":null"#);
    let Record::Lease(l) = serde_json::from_str::<Record>(&old).unwrap() else {
        panic!("a lease record")
    };
    assert_eq!(l.label, None);
    // A bound one keeps its label through replay and compaction.
    let Record::Lease(mut bound) = lease(2) else {
        unreachable!()
    };
    bound.label = Some("libvirt-6f1c0a7e-1b2d-4c3e-9f00-0123456789ab".into());
    let dir = tempfile::tempdir().unwrap();
    write_all(dir.path(), &[lease(1), Record::Lease(bound.clone())]);
    let (journal, state) = Journal::open(dir.path(), true).unwrap();
    assert_eq!(state.leases[&2].lease, bound);
    assert_eq!(state.leases[&1].lease.label, None);
    journal.compact().unwrap();
    drop(journal);
    let (_, state) = Journal::open(dir.path(), true).unwrap();
    assert_eq!(state.leases[&2].lease, bound, "compaction keeps the label");
    // Unknown fields of a lease record are refused, not half-understood: a broker from
    // before labels does not start on a journal with bound leases (nor drops the binding).
    let unknown = plain.replace(r#""id":1"#, r#""id":1,"future":true"#);
    assert!(
        serde_json::from_str::<Record>(&unknown).is_err(),
        "{unknown}"
    );
}

#[test]
fn callbacks_of_concurrent_writers_run_once_their_records_are_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let journal = std::sync::Arc::new(Journal::open(dir.path(), true).unwrap().0);
    let (done, settled) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let (journal, done) = (journal.clone(), done.clone());
            s.spawn(move || {
                for i in 0..50 {
                    let ticket = journal.write(&[lease(1 + t * 100 + i)]).unwrap();
                    let (journal2, done) = (journal.clone(), done.clone());
                    journal.when_durable(ticket, move |durable| {
                        // Whoever runs it: the ticket is covered by a finished sync.
                        assert!(journal2.durability.lock().durable >= ticket.0);
                        done.send(durable.is_ok()).unwrap();
                    });
                }
            });
        }
    });
    drop(done);
    let results: Vec<bool> = settled.iter().collect();
    assert_eq!(results.len(), 400);
    assert!(results.iter().all(|ok| *ok));
    let (_, replayed) = Journal::open(dir.path(), true).unwrap();
    assert_eq!(replayed.records, 400);
}
