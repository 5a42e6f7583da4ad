//! Leases bound to their creator's AppArmor label, for real: processes of one uid under two
//! profiles (as libvirt runs each VM's QEMU under its own `libvirt-UUID` profile) cannot open
//! each other's leases. Boots the project's VM (tests/vm/run-in-vm: Debian's kernel, AppArmor
//! its default LSM) and runs itself inside as root; profiles are loaded with Debian's
//! apparmor package (`apparmor_parser`, `aa-exec`), which the VM takes from the host's root.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use membroker_client::ErrorCode;
use membroker_tests::{Helper, TestBroker, bin_path, in_dax_vm};

const A: &str = "membroker-test-a";
const B: &str = "membroker-test-b";
/// The uid both profiles' processes run as.
const UID: u32 = 65534;

/// Two profiles that differ only in name: the helper may use files (its binary, libraries,
/// `/proc`, the socket) and Unix sockets. `attach_disconnected`: the VM's root is a chroot.
fn profiles() -> String {
    [A, B]
        .iter()
        .map(|name| {
            format!(
                "profile {name} flags=(attach_disconnected) {{\n  file,\n  network unix,\n  unix,\n  signal,\n}}\n"
            )
        })
        .collect()
}

fn load_profiles() {
    let enabled = std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .expect("AppArmor is not in the VM's kernel");
    assert_eq!(
        enabled.trim(),
        "Y",
        "AppArmor is not enabled in the VM's kernel"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("membroker-test");
    std::fs::write(&path, profiles()).unwrap();
    let out = Command::new("apparmor_parser")
        .args(["--replace", "--skip-cache"])
        .arg(&path)
        .output()
        .expect("apparmor_parser (Debian package apparmor) is not installed on the host");
    assert!(
        out.status.success(),
        "apparmor_parser failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let loaded = std::fs::read_to_string("/sys/kernel/security/apparmor/profiles").unwrap();
    for name in [A, B] {
        assert!(loaded.contains(&format!("{name} (enforce)")), "{loaded}");
    }
}

/// `mb-holder ARGS` as uid `UID`, under `profile` (None: unconfined).
fn holder(broker: &TestBroker, profile: Option<&str>, args: &[&str]) -> Helper {
    let mut cmd = match profile {
        Some(profile) => {
            let mut cmd = Command::new("aa-exec");
            cmd.args(["-p", profile, "--"]).arg(bin_path("mb-holder"));
            cmd
        }
        None => Command::new(bin_path("mb-holder")),
    };
    cmd.arg(broker.socket())
        .args(args)
        .uid(UID)
        .gid(UID)
        .stderr(Stdio::piped());
    Helper::spawn(cmd)
}

#[test]
#[cfg_attr(
    not(feature = "devdax"),
    ignore = "boots the dax VM: run with --features devdax (scripts/test does)"
)]
fn same_uid_processes_under_two_apparmor_profiles_open_only_their_own_leases() {
    if !in_dax_vm(
        "same_uid_processes_under_two_apparmor_profiles_open_only_their_own_leases",
        &["--no-dax"],
    ) {
        return;
    }
    load_profiles();
    let broker = TestBroker::start(&["--pool", "memfd:t:64M", "--socket-group", "65534"]);
    let mut vm_a = holder(
        &broker,
        Some(A),
        &["create", "vm-a/ram0", "4K", "persistent"],
    );
    assert_eq!(vm_a.line(), "ready", "log:\n{}", broker.log());
    let mut vm_b = holder(
        &broker,
        Some(B),
        &["create", "vm-b/ram0", "4K", "persistent"],
    );
    assert_eq!(vm_b.line(), "ready", "log:\n{}", broker.log());

    // Root sees each lease bound to its creator's profile, the mode suffix dropped.
    let mut root = broker.client();
    for (name, label) in [("vm-a/ram0", A), ("vm-b/ram0", B)] {
        let info = root.stat(name).unwrap();
        assert_eq!(
            (info.uid, info.label.as_deref()),
            (UID, Some(label)),
            "{name}"
        );
    }

    // Each opens its own (a re-attach, as after a VMM restart)...
    for (profile, own) in [(A, "vm-a/ram0"), (B, "vm-b/ram0")] {
        let mut h = holder(&broker, Some(profile), &["open", own, "rw"]);
        assert_eq!(h.line(), "ok", "{profile} opens {own}");
    }
    // ...and neither the other's, though uid and mode allow it; nor an unconfined process of
    // the same uid.
    for (profile, other, label) in [
        (Some(A), "vm-b/ram0", B),
        (Some(B), "vm-a/ram0", A),
        (None, "vm-a/ram0", A),
    ] {
        let mut h = holder(&broker, profile, &["open", other, "ro"]);
        let line = h.line();
        assert!(
            line.starts_with(&format!("error {:?}:", Some(ErrorCode::PermissionDenied)))
                && line.contains(&format!("security label \"{label}\"")),
            "{profile:?} opening {other}: {line}"
        );
    }

    // Root opens both.
    for name in ["vm-a/ram0", "vm-b/ram0"] {
        root.open(name, true)
            .unwrap_or_else(|e| panic!("root opens {name}: {e}"));
    }
    drop((vm_a, vm_b));
}
