//! The lease namespace between tenants, from outside: directories with owners and modes,
//! names another uid cannot claim, supplementary groups, and metadata on a need-to-know basis.
//! Other uids are real processes (root switches to them with `setpriv`), so most tests need
//! root (feature `privileged`).

use std::process::{Command, Output, Stdio};

use membroker_client::CreateLease;
use membroker_tests::{Helper, TestBroker, bin_path, stderr_err, stdout_ok};

#[path = "../shim/support.rs"]
mod support;
use support::{MIB, shim_path};

/// The squatter: `nobody`, in no other group.
const NOBODY: u32 = 65534;
/// A tenant uid (needs no passwd entry); it reaches the socket through group 65534.
const TENANT: u32 = 4000;

/// `program args…` as `uid:gid` with these supplementary groups (none: cleared).
fn as_user(uid: u32, gid: u32, groups: &[u32], program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"));
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        let groups: Vec<String> = groups.iter().map(u32::to_string).collect();
        cmd.arg(format!("--groups={}", groups.join(",")));
    }
    cmd.arg("--").arg(program).args(args);
    cmd
}

/// The CLI against `broker` as a user.
fn cli_as(broker: &TestBroker, uid: u32, groups: &[u32], args: &[&str]) -> Output {
    let socket = broker.socket().to_str().expect("utf-8 socket path");
    let bin = bin_path("membroker");
    let mut all = vec!["--socket", socket];
    all.extend_from_slice(args);
    as_user(uid, uid, groups, bin.to_str().unwrap(), &all)
        .output()
        .expect("run the CLI as another user")
}

fn nobody(broker: &TestBroker, args: &[&str]) -> Output {
    cli_as(broker, NOBODY, &[], args)
}

fn tenant(broker: &TestBroker, args: &[&str]) -> Output {
    cli_as(broker, TENANT, &[NOBODY], args)
}

fn require_root() {
    assert!(
        rustix::process::getuid().is_root(),
        "this test must run as root (it switches to other uids)"
    );
}

fn broker(extra: &[&str]) -> TestBroker {
    require_root();
    let mut args = vec!["--pool", "memfd:t:512M", "--socket-group", "65534"];
    args.extend_from_slice(extra);
    TestBroker::start(&args)
}

/// `mb-shim-helper` under the shim as the tenant, with extra environment; returns the
/// helper after its `ready` line.
fn shim_as_tenant(broker: &TestBroker, env: &[(&str, &str)]) -> Helper {
    let helper = bin_path("mb-shim-helper");
    let mut cmd = as_user(TENANT, TENANT, &[NOBODY], helper.to_str().unwrap(), &[]);
    cmd.env("LD_PRELOAD", shim_path())
        .env("MEMBROKER_SOCKET", broker.socket())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut h = Helper::spawn(cmd);
    let ready = h.line();
    assert!(ready.starts_with("ready "), "helper said {ready:?}");
    h
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root: run with --features privileged (scripts/test does)"
)]
fn a_squatted_lease_is_not_handed_to_another_uids_shim() {
    let broker = broker(&[]);
    // The squatter pre-creates the victim's first RAM block, world-writable, the right size.
    stdout_ok(&nobody(
        &broker,
        &[
            "create",
            "victim/vm/ram0",
            "--size",
            "64M",
            "--mode",
            "0666",
        ],
    ));
    let mut qemu = shim_as_tenant(&broker, &[("MEMBROKER_LEASE_PREFIX", "victim/vm")]);
    let reply = qemu.send(&format!("alloc {}", 64 * MIB));
    assert!(
        reply.starts_with("err"),
        "the shim put guest RAM on a lease another uid owns: {reply}"
    );
    let err = qemu.finish();
    assert!(
        err.contains("lease victim/vm/ram0 belongs to uid 65534, not to this process's uid 4000"),
        "{err}"
    );
    let info = broker.client().stat("victim/vm/ram0").unwrap();
    assert!(info.holders.is_empty(), "{:?}", info.holders);
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root: run with --features privileged (scripts/test does)"
)]
fn the_shims_default_prefix_is_the_callers_own() {
    let broker = broker(&[]);
    let err = stderr_err(&nobody(
        &broker,
        &["create", "uid-4000/qemu-1/ram0", "--size", "64M"],
    ));
    assert!(err.contains("reserved for uid 4000"), "{err}");
    stderr_err(&nobody(&broker, &["mkdir", "uid-4000"]));

    let mut qemu = shim_as_tenant(&broker, &[]);
    let reply = qemu.send(&format!("alloc {}", 64 * MIB));
    assert!(reply.starts_with("ok"), "{reply}");
    let leases = broker.client().list("uid-4000").unwrap();
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert!(leases[0].name.starts_with("uid-4000/qemu-"), "{leases:?}");
    assert_eq!(leases[0].uid, TENANT);
    let dirs = broker.client().dirs("").unwrap();
    assert_eq!(dirs[0].path, "uid-4000");
    assert_eq!((dirs[0].uid, dirs[0].mode), (TENANT, 0o700));
    qemu.finish();
    membroker_tests::wait_until(
        std::time::Duration::from_secs(5),
        "the lease and its directories to go",
        || broker.client().dirs("").unwrap().is_empty(),
    );
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root: run with --features privileged (scripts/test does)"
)]
fn a_subtree_belongs_to_its_owner_across_restarts() {
    let mut broker = broker(&["--root-mode", "0755"]);
    let err = stderr_err(&nobody(&broker, &["create", "x", "--size", "4M"]));
    assert!(
        err.contains("directory /: permission denied to create x in it"),
        "{err}"
    );
    stdout_ok(&broker.run_cli(&["mkdir", "--owner", "4000", "tenant"]));
    stdout_ok(&tenant(
        &broker,
        &["create", "tenant/vm1/ram0", "--size", "4M"],
    ));
    let err = stderr_err(&nobody(
        &broker,
        &["create", "tenant/vm2/ram0", "--size", "4M"],
    ));
    assert!(err.contains("directory tenant: permission denied"), "{err}");
    let err = stderr_err(&nobody(&broker, &["chmod", "0777", "tenant"]));
    assert!(err.contains("permission denied to chmod it"), "{err}");
    let err = stderr_err(&tenant(&broker, &["chown", "65534", "tenant"]));
    assert!(err.contains("only root and the admin group"), "{err}");
    stdout_ok(&tenant(&broker, &["chmod", "1777", "tenant"]));
    stdout_ok(&nobody(
        &broker,
        &["create", "tenant/guest", "--size", "4M", "--mode", "0666"],
    ));
    // Sticky: the tenant's own lease is safe from a writer of the directory.
    let err = stderr_err(&nobody(&broker, &["rm", "tenant/vm1/ram0"]));
    assert!(err.contains("permission denied to remove it"), "{err}");
    // Need to know: nobody sees the directory and its own lease, not the tenant's.
    let seen = stdout_ok(&nobody(&broker, &["ls", "-d"]));
    assert_eq!(seen, "tenant/\ntenant/guest\n");

    broker.kill9();
    broker.restart();
    let out = stdout_ok(&broker.run_cli(&["stat", "tenant"]));
    assert!(out.contains("owner:      4000"), "{out}");
    assert!(out.contains("mode:       1777 (drwxrwxrwt)"), "{out}");
    let err = stderr_err(&nobody(&broker, &["create", "y", "--size", "4M"]));
    assert!(err.contains("permission denied"), "{err}");
    // The memfd leases did not survive a kill without a hand-over; their automatic
    // directories went with them, the explicit one stays until its owner removes it.
    assert_eq!(stdout_ok(&broker.run_cli(&["ls", "-d"])), "tenant/\n");
    stdout_ok(&tenant(&broker, &["rm", "tenant"]));
    assert_eq!(stdout_ok(&broker.run_cli(&["ls", "-d"])), "");
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root: run with --features privileged (scripts/test does)"
)]
fn others_see_no_holders_extents_or_private_leases() {
    let broker = broker(&[]);
    let mut root = broker.client();
    let _private = root
        .create(CreateLease::new("private", 4 * MIB).persistent(true))
        .unwrap();
    let _shared = root
        .create(
            CreateLease::new("shared", 4 * MIB)
                .persistent(true)
                .mode(0o644),
        )
        .unwrap();
    assert_eq!(stdout_ok(&nobody(&broker, &["ls"])), "shared\n");
    let err = stderr_err(&nobody(&broker, &["stat", "private"]));
    assert!(err.contains("permission denied to see it"), "{err}");
    let seen: serde_json::Value =
        serde_json::from_str(&stdout_ok(&nobody(&broker, &["stat", "--json", "shared"]))).unwrap();
    assert_eq!(seen["holders"], serde_json::json!([]), "{seen}");
    assert_eq!(seen["extents"], serde_json::json!([]), "{seen}");
    let all: serde_json::Value =
        serde_json::from_str(&stdout_ok(&broker.run_cli(&["stat", "--json", "shared"]))).unwrap();
    assert_eq!(all["holders"].as_array().unwrap().len(), 1, "{all}");
    assert!(!all["extents"].as_array().unwrap().is_empty(), "{all}");
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root: run with --features privileged (scripts/test does)"
)]
fn supplementary_groups_count_for_modes_and_the_admin_group() {
    let broker = broker(&["--admin-group", "4343"]);
    stdout_ok(&broker.run_cli(&["create", "grp", "--size", "4M", "--mode", "0640"]));
    stdout_ok(&broker.run_cli(&["chown", ":4242", "grp"]));
    let open = |groups: &[u32]| {
        let holder = bin_path("mb-holder");
        let socket = broker.socket().to_str().unwrap();
        let mut cmd = as_user(
            4001,
            4001,
            groups,
            holder.to_str().unwrap(),
            &[socket, "open", "grp", "ro"],
        );
        cmd.stderr(Stdio::piped());
        Helper::spawn(cmd).line()
    };
    assert!(open(&[NOBODY]).contains("permission denied"));
    assert_eq!(open(&[NOBODY, 4242]), "ok-but-pattern-differs");
    let err = stderr_err(&cli_as(&broker, 4002, &[NOBODY], &["rm", "grp"]));
    assert!(err.contains("permission denied"), "{err}");
    stdout_ok(&cli_as(&broker, 4002, &[NOBODY, 4343], &["rm", "grp"]));
}

#[test]
fn a_holder_releases_a_lease_removed_under_it() {
    let broker = TestBroker::start(&["--pool", "memfd:t:64M"]);
    let mut holder = broker.client();
    let _lease = holder.create(CreateLease::new("l", 8 * MIB)).unwrap();
    stdout_ok(&broker.run_cli(&["rm", "l"]));
    holder.release("l").unwrap();
    let pools = broker.client().df().unwrap();
    assert_eq!(pools[0].used, 0, "the removed lease went back to its pool");
}
