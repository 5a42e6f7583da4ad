//! Leases bound to their creator's security label: same uid, different labels.

use super::*;

fn labelled(conn: u64, uid: u32, label: Option<&str>) -> Peer {
    Peer {
        label: label.map(Into::into),
        ..peer(conn, uid)
    }
}

fn lease(name: &str) -> CreateLease {
    CreateLease::new(name, 4096).persistent(true)
}

fn label_denied(result: Result<impl std::fmt::Debug>, label: &str) {
    match result {
        Err(e @ NsError::LabelDenied { .. }) => {
            assert_eq!(e.code(), ErrorCode::PermissionDenied);
            assert!(e.to_string().contains(label), "{e}");
        }
        other => panic!("expected a label refusal naming {label}, got {other:?}"),
    }
}

#[test]
fn a_lease_is_bound_to_its_creators_label() {
    let mut ns = Namespace::new(pools(), 1);
    let a = labelled(1, 1000, Some("vm-a"));
    let b = labelled(2, 1000, Some("vm-b"));
    let unconfined = labelled(3, 1000, None);
    let res = ns.reserve(&a, &lease("a/ram0")).unwrap();
    let prepared = ns.prepare(&a, res, memory()).unwrap();
    match ns.take_records().last() {
        Some(JournalRecord::Lease(l)) => {
            assert_eq!(l.label.as_deref(), Some("vm-a"), "journaled with the label");
        }
        other => panic!("the lease record comes last, got {other:?}"),
    }
    ns.commit(&a, prepared);
    create(&mut ns, &b, lease("b/ram0").mode(0o666)).unwrap();

    // Each opens its own; neither the other's, whatever the mode says.
    ns.open(&a, "a/ram0", true).unwrap();
    ns.open(&b, "b/ram0", true).unwrap();
    label_denied(ns.open(&a, "b/ram0", false), "vm-b");
    label_denied(ns.open(&b, "a/ram0", false), "vm-a");
    label_denied(ns.open(&unconfined, "a/ram0", false), "vm-a");
    label_denied(ns.stat(&a, "b/ram0"), "vm-b");
    label_denied(ns.remove(&a, "b/ram0"), "vm-b");
    label_denied(ns.chmod(&a, "b/ram0", 0o600), "vm-b");
    label_denied(ns.chown(&a, "b/ram0", None, Some(1000)), "vm-b");
    label_denied(ns.report_poison(&a, "b/ram0", 0, 4096), "vm-b");
    let (listed, _) = ns.list(&a, "", None, |_| true);
    let names: Vec<_> = listed.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["a/ram0"], "ls shows only the peer's own label");
    let own = ns.stat(&a, "a/ram0").unwrap();
    assert_eq!(own.label.as_deref(), Some("vm-a"), "stat shows the label");

    // Root and the admin group are not bound.
    let root = labelled(9, 0, Some("vm-c"));
    ns.open(&root, "a/ram0", true).unwrap();
    ns.open(&root, "b/ram0", true).unwrap();
    assert_eq!(ns.list(&root, "", None, |_| true).0.len(), 2);
}

#[test]
fn unlabelled_creators_and_bind_off_make_unbound_leases() {
    let mut ns = Namespace::new(pools(), 1);
    let a = labelled(1, 1000, Some("vm-a"));
    let unconfined = labelled(2, 1000, None);
    create(&mut ns, &unconfined, lease("plain")).unwrap();
    ns.open(&a, "plain", true).unwrap();
    assert_eq!(ns.stat(&a, "plain").unwrap().label, None);

    ns.set_bind_labels(false);
    create(&mut ns, &a, lease("unbound")).unwrap();
    ns.open(&unconfined, "unbound", true).unwrap();
    assert_eq!(ns.stat(&unconfined, "unbound").unwrap().label, None);
}

#[test]
fn others_do_not_see_the_label() {
    let mut ns = Namespace::new(pools(), 1);
    let a = labelled(1, 1000, Some("vm-a"));
    create(&mut ns, &a, lease("shared").mode(0o644)).unwrap();
    let reader = labelled(2, 1001, Some("vm-a"));
    let info = ns.stat(&reader, "shared").unwrap();
    assert_eq!(info.label, None, "a reader of another uid sees no label");
    ns.open(&reader, "shared", false).unwrap();
}

#[test]
fn an_admin_binds_a_lease_to_a_label_it_names_for_a_process_that_starts_later() {
    let mut ns = Namespace::new(pools(), 1);
    // libvirt's hook: an admin, itself confined (libvirtd's profile), makes a domain's lease.
    let hook = Peer {
        admin: true,
        ..labelled(1, 0, Some("libvirtd"))
    };
    let named = lease("d/ram0")
        .owner(1000)
        .label(BindLabel::Named("libvirt-1234".into()));
    create(&mut ns, &hook, named).unwrap();
    let qemu = labelled(2, 1000, Some("libvirt-1234"));
    let other_qemu = labelled(3, 1000, Some("libvirt-5678"));
    ns.open(&qemu, "d/ram0", true).unwrap();
    label_denied(ns.open(&other_qemu, "d/ram0", false), "libvirt-1234");
    // Unbound: owner and mode alone, whatever the creator's label.
    create(
        &mut ns,
        &hook,
        lease("d/ram1").owner(1000).label(BindLabel::Unbound),
    )
    .unwrap();
    ns.open(&other_qemu, "d/ram1", true).unwrap();
    // Only root and the admin group choose a label, and it must be one.
    for label in [BindLabel::Unbound, BindLabel::Named("libvirt-1234".into())] {
        let err = create(&mut ns, &qemu, lease("mine").label(label)).unwrap_err();
        assert_eq!(err.code(), ErrorCode::PermissionDenied, "{err}");
    }
    let err = create(
        &mut ns,
        &hook,
        lease("e").label(BindLabel::Named(String::new())),
    );
    assert_eq!(err.unwrap_err().code(), ErrorCode::InvalidArgument);
}
