use super::poison::{MAX_POISON_PAGES_PER_UID, MAX_POISON_RANGES};
use super::*;
use proptest::prelude::*;

fn pools() -> Vec<PoolAccount> {
    let pool = |name: &str, page_size, size| PoolAccount {
        name: name.into(),
        kind: PoolKind::Memfd,
        page_size,
        size,
        used: 0,
        leases: 0,
        node: None,
    };
    vec![
        pool("default", PageSize::Base4K, 64 << 20),
        pool("huge", PageSize::Huge2M, 64 << 20),
    ]
}

fn peer(conn: u64, uid: u32) -> Peer {
    Peer {
        conn,
        pid: 100 + conn as u32,
        uid,
        gid: uid,
        groups: Arc::from([]),
        admin: uid == 0,
        label: None,
    }
}

/// An admin connection that looks without holding anything.
fn admin() -> Peer {
    peer(999, 0)
}

fn memory() -> Allocation {
    let fd = rustix::fs::open(
        "/dev/null",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    Allocation {
        fd,
        extents: vec![],
        device: None,
    }
}

fn create(ns: &mut Namespace, peer: &Peer, req: CreateLease) -> Result<LeaseInfo> {
    let res = ns.reserve(peer, &req)?;
    let prepared = ns.prepare(peer, res, memory()).map_err(|b| b.0)?;
    Ok(ns.commit(peer, prepared).1)
}

fn used(ns: &Namespace, pool: usize) -> u64 {
    ns.df()[pool].used
}

#[test]
fn admission_names_the_pool_and_sizes() {
    let mut ns = Namespace::new(pools(), 1);
    let alice = peer(1, 1000);
    let err = create(&mut ns, &alice, CreateLease::new("big", 128 << 20)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "lease big: pool default has 64 MiB free, 128 MiB asked"
    );
    assert_eq!(err.code(), ErrorCode::NoSpace);
    create(&mut ns, &alice, CreateLease::new("a", 48 << 20)).unwrap();
    assert!(matches!(
        create(&mut ns, &alice, CreateLease::new("b", 32 << 20)),
        Err(NsError::NoSpace { .. })
    ));
    ns.disconnect(alice.conn);
    assert_eq!(
        used(&ns, 0),
        0,
        "non-persistent lease freed when its holder left"
    );
    create(&mut ns, &alice, CreateLease::new("b", 32 << 20)).unwrap();
}

#[test]
fn page_size_picks_the_pool() {
    let mut ns = Namespace::new(pools(), 1);
    let p = peer(1, 1000);
    let info = create(
        &mut ns,
        &p,
        CreateLease::new("h", 4 << 20).page_size(PageSize::Huge2M),
    )
    .unwrap();
    assert_eq!(info.pool, "huge");
    let err = create(
        &mut ns,
        &p,
        CreateLease::new("x", 3 << 20).page_size(PageSize::Huge2M),
    )
    .unwrap_err();
    assert!(err.to_string().contains("not a non-zero multiple"), "{err}");
    let err = create(
        &mut ns,
        &p,
        CreateLease::new("y", 1 << 30).page_size(PageSize::Huge1G),
    )
    .unwrap_err();
    assert!(err.to_string().contains("no pool serves 1G pages"), "{err}");
    let err = create(
        &mut ns,
        &p,
        CreateLease::new("z", 4 << 20)
            .pool("huge")
            .page_size(PageSize::Base4K),
    )
    .unwrap_err();
    assert!(err.to_string().contains("serves 2M pages"), "{err}");
}

#[test]
fn node_picks_the_pool() {
    let mut with_nodes = pools();
    with_nodes[1].node = Some(1);
    with_nodes.push(PoolAccount {
        name: "near".into(),
        node: Some(1),
        page_size: PageSize::Base4K,
        ..with_nodes[0].clone()
    });
    let mut ns = Namespace::new(with_nodes, 1);
    let p = peer(1, 1000);
    let info = create(&mut ns, &p, CreateLease::new("a", 4 << 20).node(1)).unwrap();
    assert_eq!(info.pool, "huge", "the first pool on node 1");
    let req = CreateLease::new("b", 4 << 20)
        .node(1)
        .page_size(PageSize::Base4K);
    assert_eq!(create(&mut ns, &p, req).unwrap().pool, "near");
    let err = create(&mut ns, &p, CreateLease::new("c", 4 << 20).node(0)).unwrap_err();
    assert!(err.to_string().contains("no pool on NUMA node 0"), "{err}");
    assert!(err.to_string().contains("huge (2M pages, node 1)"), "{err}");
    let req = CreateLease::new("d", 4 << 20).node(1).pool("default");
    let err = create(&mut ns, &p, req).unwrap_err();
    assert!(err.to_string().contains("not on NUMA node 1"), "{err}");
    let nodes: Vec<Option<u32>> = ns.df().iter().map(|p| p.node).collect();
    assert_eq!(nodes, [None, Some(1), Some(1)]);
}

#[test]
fn names_are_files_and_directories() {
    let mut ns = Namespace::new(pools(), 1);
    let p = peer(1, 1000);
    create(
        &mut ns,
        &p,
        CreateLease::new("t/vm1/ram0", 4096).persistent(true),
    )
    .unwrap();
    assert!(matches!(
        create(&mut ns, &p, CreateLease::new("t/vm1/ram0", 4096)),
        Err(NsError::Exists(_))
    ));
    assert!(
        matches!(
            create(&mut ns, &p, CreateLease::new("t/vm1", 4096)),
            Err(NsError::Exists(_))
        ),
        "t/vm1 is a directory"
    );
    assert!(matches!(
        create(&mut ns, &p, CreateLease::new("t/vm1/ram0/x", 4096)),
        Err(NsError::NameConflict { .. })
    ));
    create(
        &mut ns,
        &p,
        CreateLease::new("t/vm1-b", 4096).persistent(true),
    )
    .unwrap();
    create(
        &mut ns,
        &p,
        CreateLease::new("t/vm10/ram0", 4096).persistent(true),
    )
    .unwrap();
    let names = |prefix: &str| {
        ns.list(&admin(), prefix, None, |_| true)
            .0
            .into_iter()
            .map(|l| l.name)
            .collect::<Vec<_>>()
    };
    assert_eq!(names("t/vm1"), ["t/vm1/ram0"]);
    assert_eq!(names("t/vm1/"), ["t/vm1/ram0"]);
    assert_eq!(names(""), ["t/vm1-b", "t/vm1/ram0", "t/vm10/ram0"]);
    let (page, more) = ns.list(&admin(), "", None, |_| false);
    assert_eq!((page.len(), more), (1, true));
    let (rest, more) = ns.list(&admin(), "", Some("t/vm1-b"), |_| true);
    assert_eq!((rest.len(), more), (2, false));
}

#[test]
fn permissions() {
    let mut ns = Namespace::new(pools(), 1);
    let alice = peer(1, 1000);
    let bob = peer(2, 65534);
    let root = peer(3, 0);
    create(
        &mut ns,
        &alice,
        CreateLease::new("private", 4096).persistent(true),
    )
    .unwrap();
    create(
        &mut ns,
        &alice,
        CreateLease::new("shared", 4096)
            .persistent(true)
            .mode(0o644),
    )
    .unwrap();
    assert!(matches!(
        ns.open(&bob, "private", false),
        Err(NsError::Denied { .. })
    ));
    assert!(matches!(
        ns.remove(&bob, "private"),
        Err(NsError::Denied { .. })
    ));
    assert!(ns.open(&bob, "shared", false).is_ok());
    assert!(matches!(
        ns.open(&bob, "shared", true),
        Err(NsError::Denied { .. })
    ));
    assert!(matches!(
        ns.remove(&bob, "shared"),
        Err(NsError::Denied { .. })
    ));
    assert!(ns.open(&root, "private", true).is_ok());
    let err = create(&mut ns, &alice, CreateLease::new("gift", 4096).owner(65534)).unwrap_err();
    assert_eq!(err.code(), ErrorCode::PermissionDenied);
    let gift = create(&mut ns, &root, CreateLease::new("gift", 4096).owner(65534)).unwrap();
    assert_eq!(gift.uid, 65534);
}

#[test]
fn remove_while_held_keeps_the_charge_until_the_holder_goes() {
    let mut ns = Namespace::new(pools(), 1);
    let alice = peer(1, 1000);
    let info = create(
        &mut ns,
        &alice,
        CreateLease::new("l", 8 << 20).persistent(true),
    )
    .unwrap();
    assert_eq!(info.state, LeaseState::Held);
    assert!(ns.remove(&alice, "l").unwrap().is_empty());
    assert!(matches!(ns.stat(&admin(), "l"), Err(NsError::NotFound(_))));
    assert_eq!(used(&ns, 0), 8 << 20);
    create(&mut ns, &alice, CreateLease::new("l", 4096)).unwrap();
    assert_eq!(ns.disconnect(alice.conn).len(), 2);
    assert_eq!(used(&ns, 0), 0);
}

#[test]
fn persistent_lease_outlives_its_holder_and_release() {
    let mut ns = Namespace::new(pools(), 1);
    let alice = peer(1, 1000);
    create(
        &mut ns,
        &alice,
        CreateLease::new("p", 4096).persistent(true),
    )
    .unwrap();
    assert!(ns.release(&alice, "p").unwrap().is_empty());
    assert!(matches!(ns.release(&alice, "p"), Err(NsError::NotHeld(_))));
    assert_eq!(ns.stat(&admin(), "p").unwrap().state, LeaseState::Idle);
    let again = peer(2, 1000);
    ns.open(&again, "p", true).unwrap();
    assert_eq!(
        ns.stat(&admin(), "p").unwrap().holders,
        vec![HolderInfo {
            pid: 102,
            uid: 1000
        }]
    );
    ns.disconnect(again.conn);
    assert_eq!(ns.remove(&alice, "p").unwrap().len(), 1);
    assert_eq!(used(&ns, 0), 0);
}

#[test]
fn lease_states_count_each_lease_once_per_pool() {
    let mut ns = Namespace::new(pools(), 1);
    let (alice, bob) = (peer(1, 1000), peer(2, 1000));
    create(&mut ns, &alice, CreateLease::new("held", 4096)).unwrap();
    let idle = CreateLease::new("idle", 4096).persistent(true);
    create(&mut ns, &alice, idle).unwrap();
    ns.release(&alice, "idle").unwrap();
    let gone = CreateLease::new("gone", 2 << 20)
        .persistent(true)
        .pool("huge");
    create(&mut ns, &bob, gone).unwrap();
    ns.remove(&bob, "gone").unwrap();
    let states = ns.lease_states();
    let expect = |held, idle, removed| LeaseStates {
        held,
        idle,
        removed,
        orphaned: 0,
    };
    assert_eq!(states, [expect(1, 1, 0), expect(0, 0, 1)]);
    ns.disconnect(bob.conn);
    assert_eq!(ns.lease_states()[1], expect(0, 0, 0));
}

#[test]
fn poison_reports_are_checked_and_recorded() {
    let mut ns = Namespace::new(pools(), 1);
    let alice = peer(1, 1000);
    create(
        &mut ns,
        &alice,
        CreateLease::new("p", 1 << 20).persistent(true),
    )
    .unwrap();
    assert!(ns.report_poison(&alice, "p", 1 << 20, 4096).is_err());
    assert!(ns.report_poison(&peer(2, 65534), "p", 0, 4096).is_err());
    ns.report_poison(&alice, "p", 8192, 4096).unwrap();
    ns.report_poison(&alice, "p", 8192, 4096).unwrap();
    assert_eq!(
        ns.stat(&admin(), "p").unwrap().poison,
        vec![PoisonInfo {
            offset: 8192,
            len: 4096
        }]
    );
}

#[test]
fn poison_needs_a_writable_holder_the_owner_or_an_admin() {
    let mut ns = Namespace::new(pools(), 1);
    let alice = peer(1, 1000);
    create(
        &mut ns,
        &alice,
        CreateLease::new("p", 1 << 20).persistent(true).mode(0o666),
    )
    .unwrap();
    let (reader, writer) = (peer(2, 2000), peer(3, 3000));
    ns.open(&reader, "p", false).unwrap();
    let err = ns.report_poison(&reader, "p", 0, 1).unwrap_err();
    assert!(
        err.to_string().contains("a read-only holder may not"),
        "{err}"
    );
    ns.open(&writer, "p", true).unwrap();
    ns.report_poison(&writer, "p", 0, 1).unwrap();
    ns.report_poison(&peer(4, 0), "p", 8192, 1).unwrap();
    ns.disconnect(writer.conn);
    assert!(
        ns.report_poison(&writer, "p", 0, 1).is_err(),
        "no longer a holder"
    );
}

#[test]
fn poison_is_widened_to_pages_merged_and_capped() {
    let mut ns = Namespace::new(pools(), 1);
    let alice = peer(1, 1000);
    create(
        &mut ns,
        &alice,
        CreateLease::new("p", 4 << 20).persistent(true),
    )
    .unwrap();
    create(
        &mut ns,
        &alice,
        CreateLease::new("h", 4 << 20)
            .persistent(true)
            .page_size(PageSize::Huge2M),
    )
    .unwrap();
    let r = ns.report_poison(&alice, "p", 4097, 1).unwrap();
    assert_eq!((r.offset, r.len, r.new), (4096, 4096, true));
    assert!(
        !ns.report_poison(&alice, "p", 5000, 10).unwrap().new,
        "covered"
    );
    // Touching neighbours merge into one range.
    ns.report_poison(&alice, "p", 8192, 1).unwrap();
    ns.report_poison(&alice, "p", 0, 1).unwrap();
    let poison = |ns: &Namespace, name| ns.stat(&admin(), name).unwrap().poison;
    assert_eq!(
        poison(&ns, "p"),
        vec![PoisonInfo {
            offset: 0,
            len: 3 * 4096
        }]
    );
    // A 2 MiB pool's lease widens to 2 MiB pages.
    let r = ns.report_poison(&alice, "h", (2 << 20) + 5, 1).unwrap();
    assert_eq!((r.offset, r.len), (2 << 20, 2 << 20));
    // Distinct ranges per lease are capped; a range covering them all is still taken.
    let admin = peer(9, 0);
    for i in 1..MAX_POISON_RANGES as u64 {
        ns.report_poison(&admin, "p", (2 * i + 8) * 4096, 1)
            .unwrap();
    }
    let err = ns.report_poison(&admin, "p", 1 << 21, 1).unwrap_err();
    assert_eq!(err.code(), ErrorCode::NoSpace);
    assert!(err.to_string().contains("at most 64"), "{err}");
    assert!(poison(&ns, "p").len() <= MAX_POISON_RANGES);
    ns.report_poison(&admin, "p", 0, 4 << 20).unwrap();
    assert_eq!(poison(&ns, "p").len(), 1);
    // The replayed journal merges the same way.
    let records = ns.take_records();
    let mut merged = Vec::new();
    for r in records {
        if let JournalRecord::Poison { id: 1, offset, len } = r {
            crate::journal::add_poison(&mut merged, PoisonInfo { offset, len });
        }
    }
    assert_eq!(merged, poison(&ns, "p"));
}

#[test]
fn poison_pages_per_uid_are_limited() {
    let mut ns = Namespace::new(pools(), 1);
    let alice = peer(1, 1000);
    create(
        &mut ns,
        &alice,
        CreateLease::new("p", 1 << 20).persistent(true),
    )
    .unwrap();
    ns.report_poison(&alice, "p", 0, MAX_POISON_PAGES_PER_UID * 4096)
        .unwrap();
    let err = ns.report_poison(&alice, "p", 1 << 19, 4096).unwrap_err();
    assert!(err.to_string().contains("uid 1000 reported 64"), "{err}");
    ns.report_poison(&alice, "p", 0, 4096).unwrap();
    ns.report_poison(&peer(2, 0), "p", 1 << 19, 4096).unwrap();
}

#[test]
fn quotas_refuse_creates_and_count_until_free() {
    use quota::{Limit, Quotas, Subject};
    let mut ns = Namespace::new(pools(), 1);
    let limit = Limit {
        bytes: Some(8 << 20),
        leases: Some(2),
    };
    ns.set_quotas(Quotas::new(
        vec![(Subject::Uid(1000), limit)],
        HashMap::new(),
    ));
    let alice = peer(1, 1000);
    create(&mut ns, &alice, CreateLease::new("a", 6 << 20)).unwrap();
    let err = create(&mut ns, &alice, CreateLease::new("b", 4 << 20)).unwrap_err();
    assert_eq!(err.code(), ErrorCode::NoSpace);
    assert_eq!(
        err.to_string(),
        "lease b: quota of uid 1000 is 8 MiB, 6 MiB used, 4 MiB asked"
    );
    create(&mut ns, &alice, CreateLease::new("b", 1 << 20)).unwrap();
    let err = create(&mut ns, &alice, CreateLease::new("c", 4096)).unwrap_err();
    assert!(err.to_string().contains("is 2 leases, 2 used"), "{err}");
    let mine = ns.quotas(&alice);
    assert_eq!((mine[0].bytes_used, mine[0].leases_used), (7 << 20, 2));
    ns.disconnect(alice.conn);
    assert_eq!(
        ns.quotas(&alice)[0].leases_used,
        0,
        "freed leases no longer count"
    );
}

#[derive(Debug, Clone)]
enum Op {
    Create {
        conn: u64,
        name: u8,
        pages: u64,
        persistent: bool,
    },
    Open {
        conn: u64,
        name: u8,
    },
    Release {
        conn: u64,
        name: u8,
    },
    Remove {
        conn: u64,
        name: u8,
    },
    Disconnect {
        conn: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..4u64, 0..8u8, 1..6000u64, any::<bool>()).prop_map(|(conn, name, pages, persistent)| {
            Op::Create {
                conn,
                name,
                pages,
                persistent,
            }
        }),
        (0..4u64, 0..8u8).prop_map(|(conn, name)| Op::Open { conn, name }),
        (0..4u64, 0..8u8).prop_map(|(conn, name)| Op::Release { conn, name }),
        (0..4u64, 0..8u8).prop_map(|(conn, name)| Op::Remove { conn, name }),
        (0..4u64).prop_map(|conn| Op::Disconnect { conn }),
    ]
}

proptest! {
    /// Whatever happens, a pool's charge is the sum of the leases that still exist (named or
    /// held), never above its size, and everything is free once nobody holds anything and
    /// every name is removed.
    #[test]
    fn accounting_matches_the_leases(ops in proptest::collection::vec(op(), 1..80)) {
        let mut ns = Namespace::new(pools(), 1);
        for op in ops {
            let _ = match op {
                Op::Create { conn, name, pages, persistent } => {
                    create(&mut ns, &peer(conn, 1000), CreateLease::new(format!("n{name}"), pages * 4096).persistent(persistent)).map(|_| ())
                }
                Op::Open { conn, name } => ns.open(&peer(conn, 1000), &format!("n{name}"), true).map(|_| ()),
                Op::Release { conn, name } => ns.release(&peer(conn, 1000), &format!("n{name}")).map(|_| ()),
                Op::Remove { conn, name } => ns.remove(&peer(conn, 1000), &format!("n{name}")).map(|_| ()),
                Op::Disconnect { conn } => { ns.disconnect(conn); Ok(()) }
            };
            let live: u64 = ns.leases.values().map(|e| e.lease.size).sum();
            prop_assert_eq!(used(&ns, 0), live);
            prop_assert!(used(&ns, 0) <= 64 << 20);
            prop_assert_eq!(ns.df()[0].leases as usize, ns.leases.len());
        }
        for conn in 0..4 { ns.disconnect(conn); }
        let names: Vec<String> = ns.names.keys().cloned().collect();
        for name in names { ns.remove(&peer(9, 1000), &name).unwrap(); }
        prop_assert_eq!(used(&ns, 0), 0);
        prop_assert!(ns.leases.is_empty());
    }
}

#[path = "dir_tests.rs"]
mod dir_tests;

#[path = "label_tests.rs"]
mod label_tests;
