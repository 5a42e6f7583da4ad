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
        admin: uid == 0,
    }
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
    let prepared = ns.prepare(res, memory());
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
    assert!(matches!(
        create(&mut ns, &p, CreateLease::new("t/vm1", 4096)),
        Err(NsError::NameConflict { .. })
    ));
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
        ns.list(prefix, None, |_| true)
            .0
            .into_iter()
            .map(|l| l.name)
            .collect::<Vec<_>>()
    };
    assert_eq!(names("t/vm1"), ["t/vm1/ram0"]);
    assert_eq!(names("t/vm1/"), ["t/vm1/ram0"]);
    assert_eq!(names(""), ["t/vm1-b", "t/vm1/ram0", "t/vm10/ram0"]);
    let (page, more) = ns.list("", None, |_| false);
    assert_eq!((page.len(), more), (1, true));
    let (rest, more) = ns.list("", Some("t/vm1-b"), |_| true);
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
    assert!(matches!(ns.stat("l"), Err(NsError::NotFound(_))));
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
    assert_eq!(ns.stat("p").unwrap().state, LeaseState::Idle);
    let again = peer(2, 1000);
    ns.open(&again, "p", true).unwrap();
    assert_eq!(
        ns.stat("p").unwrap().holders,
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
        ns.stat("p").unwrap().poison,
        vec![PoisonInfo {
            offset: 8192,
            len: 4096
        }]
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
