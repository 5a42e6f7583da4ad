//! Directories, sticky removal, reserved `uid-N`, chmod/chown and need-to-know listings.

use super::*;
use membroker_client::proto::Mkdir;

fn mkdir(path: &str, mode: u32, owner: Option<u32>, parents: bool) -> Mkdir {
    Mkdir {
        path: path.into(),
        mode,
        owner,
        group: None,
        parents,
    }
}

fn lease(name: &str) -> CreateLease {
    CreateLease::new(name, 4096).persistent(true)
}

#[test]
fn a_sticky_root_lets_anyone_create_but_only_the_owner_remove() {
    let mut ns = Namespace::new(pools(), 1);
    let (alice, bob) = (peer(1, 1000), peer(2, 1001));
    create(&mut ns, &alice, lease("top").mode(0o666)).unwrap();
    let err = ns.remove(&bob, "top").unwrap_err();
    assert!(matches!(err, NsError::Denied { .. }), "{err}");
    create(&mut ns, &alice, lease("a/x").mode(0o666)).unwrap();
    let err = create(&mut ns, &bob, lease("a/y")).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("directory a: permission denied to create a/y in it"),
        "{err}"
    );
    // Not sticky, and the lease is writable by others: like before directories existed.
    ns.remove(&bob, "a/x").unwrap();
    assert!(ns.remove(&alice, "top").is_ok());
}

#[test]
fn a_0755_root_leaves_top_level_names_to_admins_and_uid_directories() {
    let mut ns = Namespace::new(pools(), 1);
    ns.set_root_mode(0o755);
    let (alice, bob, root) = (peer(1, 1000), peer(2, 1001), admin());
    let err = create(&mut ns, &bob, lease("x")).unwrap_err();
    assert_eq!(err.code(), ErrorCode::PermissionDenied);
    let err = create(&mut ns, &alice, lease("uid-1001/vm/ram0")).unwrap_err();
    assert!(matches!(err, NsError::Reserved { uid: 1001, .. }), "{err}");
    create(&mut ns, &bob, lease("uid-1001/vm/ram0")).unwrap();
    let err = create(&mut ns, &alice, lease("uid-1001/vm/ram1")).unwrap_err();
    assert!(matches!(err, NsError::DirDenied { .. }), "{err}");
    // A subtree handed out by an admin.
    ns.mkdir(&root, &mkdir("tenant", 0o755, Some(1000), false))
        .unwrap();
    create(&mut ns, &alice, lease("tenant/vm1/ram0")).unwrap();
    assert!(create(&mut ns, &bob, lease("tenant/vm2/ram0")).is_err());
    ns.chmod(&alice, "tenant", 0o777).unwrap();
    create(&mut ns, &bob, lease("tenant/vm2/ram0")).unwrap();
    let err = ns.chmod(&bob, "tenant", 0o700).unwrap_err();
    assert_eq!(err.code(), ErrorCode::PermissionDenied);
    let err = ns.chown(&alice, "tenant", Some(1001), None).unwrap_err();
    assert_eq!(err.code(), ErrorCode::PermissionDenied);
    ns.chown(&root, "tenant", Some(1001), None).unwrap();
    let (dirs, _) = ns.dirs(&root, "tenant", None, |_| true);
    assert_eq!(
        dirs.iter()
            .map(|d| (d.path.as_str(), d.uid, d.auto))
            .collect::<Vec<_>>(),
        [
            ("tenant", 1001, false),
            ("tenant/vm1", 1000, true),
            ("tenant/vm2", 1001, true),
        ]
    );
}

#[test]
fn mkdir_needs_parents_or_p_and_is_journaled() {
    let mut ns = Namespace::new(pools(), 1);
    let alice = peer(1, 1000);
    ns.take_records();
    let err = ns
        .mkdir(&alice, &mkdir("a/b", 0o750, None, false))
        .unwrap_err();
    assert!(err.to_string().contains("use mkdir -p"), "{err}");
    ns.mkdir(&alice, &mkdir("a/b", 0o1750, None, true)).unwrap();
    ns.mkdir(&alice, &mkdir("a/b", 0o750, None, true)).unwrap();
    assert!(matches!(
        ns.mkdir(&alice, &mkdir("a/b", 0o750, None, false)),
        Err(NsError::Exists(_))
    ));
    let err = ns
        .mkdir(&alice, &mkdir("c", 0o755, Some(0), false))
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::PermissionDenied);
    let records = ns.take_records();
    assert_eq!(records.len(), 2, "{records:?}");
    assert!(
        matches!(&records[1], JournalRecord::Dir(d) if d.path == "a/b" && d.mode == 0o1750 && !d.auto)
    );
    create(&mut ns, &alice, lease("a/b/l")).unwrap();
    assert!(matches!(
        create(&mut ns, &alice, lease("a/b")),
        Err(NsError::Exists(_))
    ));
    assert!(matches!(
        ns.mkdir(&alice, &mkdir("a/b/l", 0o755, None, false)),
        Err(NsError::Exists(_))
    ));
}

#[test]
fn automatic_directories_go_with_their_last_entry() {
    let mut ns = Namespace::new(pools(), 1);
    let alice = peer(1, 1000);
    create(&mut ns, &alice, lease("t/vm/ram0")).unwrap();
    create(&mut ns, &alice, lease("t/vm/ram1")).unwrap();
    let dirs = |ns: &Namespace| {
        ns.dirs(&admin(), "", None, |_| true)
            .0
            .into_iter()
            .map(|d| d.path)
            .collect::<Vec<_>>()
    };
    assert_eq!(dirs(&ns), ["t", "t/vm"]);
    ns.remove(&alice, "t/vm/ram0").unwrap();
    assert_eq!(dirs(&ns), ["t", "t/vm"]);
    ns.take_records();
    ns.remove(&alice, "t/vm/ram1").unwrap();
    assert!(dirs(&ns).is_empty());
    let records = ns.take_records();
    assert!(records.contains(&JournalRecord::Rmdir { path: "t".into() }));
    // An explicit directory stays, and `rm` removes it once empty.
    ns.mkdir(&alice, &mkdir("keep", 0o755, None, false))
        .unwrap();
    create(&mut ns, &alice, lease("keep/x")).unwrap();
    let err = ns.remove(&alice, "keep").unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
    ns.remove(&alice, "keep/x").unwrap();
    assert_eq!(dirs(&ns), ["keep"]);
    ns.remove(&alice, "keep").unwrap();
    assert!(dirs(&ns).is_empty());
}

#[test]
fn a_holder_releases_a_lease_removed_under_it() {
    let mut ns = Namespace::new(pools(), 1);
    let (alice, root) = (peer(1, 1000), admin());
    create(&mut ns, &alice, CreateLease::new("l", 8 << 20)).unwrap();
    assert!(ns.remove(&root, "l").unwrap().is_empty(), "still held");
    create(&mut ns, &root, lease("l")).unwrap();
    assert_eq!(ns.release(&alice, "l").unwrap().len(), 1, "the removed one");
    assert_eq!(used(&ns, 0), 4096, "only the new lease");
    assert!(matches!(ns.release(&alice, "l"), Err(NsError::NotHeld(_))));
}

#[test]
fn others_see_only_what_they_may_read_and_no_holders_or_extents() {
    let mut ns = Namespace::new(pools(), 1);
    let (alice, bob) = (peer(1, 1000), peer(2, 1001));
    create(&mut ns, &alice, lease("private")).unwrap();
    create(&mut ns, &alice, lease("shared").mode(0o644)).unwrap();
    let names = |p: &Peer| {
        ns.list(p, "", None, |_| true)
            .0
            .into_iter()
            .map(|l| l.name)
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&alice), ["private", "shared"]);
    assert_eq!(names(&bob), ["shared"]);
    assert!(matches!(
        ns.stat(&bob, "private"),
        Err(NsError::Denied { .. })
    ));
    assert!(ns.stat(&bob, "shared").unwrap().holders.is_empty());
    assert_eq!(ns.stat(&alice, "shared").unwrap().holders.len(), 1);
    assert_eq!(ns.stat(&admin(), "shared").unwrap().holders.len(), 1);
    ns.chmod(&alice, "private", 0o640).unwrap();
    let member = Peer {
        groups: Arc::from([1000]),
        ..bob
    };
    assert!(ns.stat(&member, "private").is_ok(), "a supplementary group");
    ns.chown(&alice, "private", None, Some(4242)).unwrap_err();
    let in_50 = Peer {
        groups: Arc::from([50]),
        ..alice.clone()
    };
    ns.chown(&in_50, "private", None, Some(50)).unwrap();
    assert_eq!(ns.stat(&alice, "private").unwrap().gid, 50);
    let records = ns.take_records();
    assert!(
        records
            .iter()
            .any(|r| matches!(r, JournalRecord::Meta { mode: 0o640, .. }))
    );
}

#[test]
fn a_create_racing_another_into_a_new_directory_is_checked_again() {
    let mut ns = Namespace::new(pools(), 1);
    let (alice, bob) = (peer(1, 1000), peer(2, 1001));
    let res = ns.reserve(&bob, &lease("a/y")).unwrap();
    create(&mut ns, &alice, lease("a/x")).unwrap();
    let failed = ns.prepare(&bob, res, memory()).unwrap_err();
    assert!(
        matches!(failed.0, NsError::DirDenied { .. }),
        "{}",
        failed.0
    );
    assert_eq!(used(&ns, 0), 4096, "bob's charge given back");
}

#[test]
fn an_admin_makes_uid_directories_for_their_uid() {
    let mut ns = Namespace::new(pools(), 1);
    ns.set_root_mode(0o755);
    ns.mkdir(&admin(), &mkdir("uid-1000", 0o700, None, false))
        .unwrap();
    create(&mut ns, &peer(1, 1000), lease("uid-1000/vm/ram0")).unwrap();
    let (dirs, _) = ns.dirs(&admin(), "uid-1000", None, |_| true);
    assert_eq!((dirs[0].uid, dirs[0].auto), (1000, false));
}
