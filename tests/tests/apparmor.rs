//! Leases bound to their creator's AppArmor label, for real: processes of one uid under two
//! profiles (as libvirt runs each VM's QEMU under its own `libvirt-UUID` profile) cannot open
//! each other's leases; and libvirt's QEMU abstraction with `contrib/libvirt/apparmor/membroker`
//! runs a shim client on a lease. Boots the project's VM (tests/vm/run-in-vm: Debian's kernel,
//! AppArmor its default LSM) and runs itself inside as root; profiles are loaded with Debian's
//! apparmor package (`apparmor_parser`, `aa-exec`), which the VM takes from the host's root.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use membroker_client::ErrorCode;
use membroker_tests::{Helper, TestBroker, bin_path, in_dax_vm};

#[path = "../shim/support.rs"]
mod support;

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
    load(&profiles(), &[A, B]);
}

/// Loads the profiles in `text` (apparmor_parser, from Debian's apparmor package) and checks
/// that `names` are now enforced.
fn load(text: &str, names: &[&str]) {
    let enabled = std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .expect("AppArmor is not in the VM's kernel");
    assert_eq!(
        enabled.trim(),
        "Y",
        "AppArmor is not enabled in the VM's kernel"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("membroker-test");
    std::fs::write(&path, text).unwrap();
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
    for name in names {
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

/// A profile made like libvirt's per-domain ones (`/etc/apparmor.d/libvirt/TEMPLATE.qemu`:
/// the `libvirt-qemu` abstraction) that may also run `mb-shim-helper`, which makes QEMU's
/// guest-RAM system calls. `chroot_relative`: the VM's root is a chroot, and the
/// abstractions name files as the chroot sees them.
fn libvirt_like_profile(name: &str) -> String {
    format!(
        "#include <tunables/global>\n\
         profile {name} flags=(attach_disconnected, chroot_relative) {{\n\
         \x20 #include <abstractions/libvirt-qemu>\n\
         \x20 {} rm,\n\
         }}\n",
        bin_path("mb-shim-helper").display()
    )
}

/// `contrib/libvirt/apparmor/membroker`, installed as the README says, compiles into libvirt's
/// `libvirt-qemu` abstraction, and a process confined like libvirt's QEMU loads the shim from
/// the multiarch directory, reaches the broker's socket and puts its guest RAM on the lease a
/// confined admin (libvirt's hook) made for it, bound to its profile; another profile of the
/// same uid is refused that lease.
///
/// Debian 12's kernel (6.1) does not mediate `connect` on a pathname socket, so there the
/// socket rule is not what lets it in; kernels with AppArmor's Unix-socket mediation (Ubuntu's)
/// need it.
#[test]
#[cfg_attr(
    not(feature = "devdax"),
    ignore = "boots the dax VM: run with --features devdax (scripts/test does)"
)]
fn libvirt_qemu_profile_with_the_membroker_abstraction_runs_on_a_lease() {
    const VM: &str = "membroker-test-libvirt-vm";
    const SOCKET: &str = "/run/membroker/broker.sock";
    const SHIM: &str = "/usr/lib/x86_64-linux-gnu/libmembroker_preload.so";
    if !in_dax_vm(
        "libvirt_qemu_profile_with_the_membroker_abstraction_runs_on_a_lease",
        &["--no-dax"],
    ) {
        return;
    }
    // The VM's root is an overlay: what is installed here stays in the VM.
    std::fs::copy(support::shim_path(), SHIM).unwrap();
    let snippet = include_str!("../../contrib/libvirt/apparmor/membroker");
    std::fs::create_dir_all("/etc/apparmor.d/abstractions/libvirt-qemu.d").unwrap();
    std::fs::write(
        "/etc/apparmor.d/abstractions/libvirt-qemu.d/membroker",
        snippet,
    )
    .unwrap();
    let local = "/etc/apparmor.d/local/abstractions/libvirt-qemu";
    let mut text = std::fs::read_to_string(local).unwrap_or_default();
    text.push_str("include if exists <abstractions/libvirt-qemu.d>\n");
    std::fs::write(local, text).unwrap();
    load(&libvirt_like_profile(VM), &[VM]);

    let state = tempfile::tempdir().unwrap();
    std::fs::create_dir_all("/run/membroker").unwrap();
    let mut broker = Command::new(bin_path("membroker"))
        .args(["--socket", SOCKET, "serve", "--pool", "memfd:t:256M"])
        .args(["--socket-group", &UID.to_string(), "--state-dir"])
        .arg(state.path())
        .spawn()
        .unwrap();
    membroker_tests::wait_until(std::time::Duration::from_secs(10), "the broker", || {
        membroker_client::Client::connect(SOCKET).is_ok()
    });

    // libvirt's hook makes the domain's lease before QEMU starts, itself confined (under
    // libvirtd's profile; profile A plays it here): it binds the lease to the profile QEMU
    // will run under, not to its own.
    load_profiles();
    let hook = Command::new("aa-exec")
        .args(["-p", A, "--"])
        .arg(bin_path("membroker"))
        .args(["--socket", SOCKET, "create", &format!("libvirt/{VM}/ram0")])
        .args(["--size", "128M", "--owner", &UID.to_string(), "--label", VM])
        .output()
        .unwrap();
    assert!(hook.status.success(), "{hook:?}");

    let mut cmd = Command::new("aa-exec");
    cmd.args(["-p", VM, "--"])
        .arg(bin_path("mb-shim-helper"))
        .env("LD_PRELOAD", SHIM)
        .env("MEMBROKER_SOCKET", SOCKET)
        .env("MEMBROKER_LEASE_PREFIX", format!("libvirt/{VM}"))
        .uid(UID)
        .gid(UID)
        .stderr(Stdio::piped());
    let mut confined = Helper::spawn(cmd);
    let ready = confined.line();
    let pid = ready.strip_prefix("ready ").expect(&ready);
    let attr = std::fs::read_to_string(format!("/proc/{pid}/attr/current")).unwrap();
    assert_eq!(
        attr.trim_end_matches(['\0', '\n']),
        format!("{VM} (enforce)")
    );
    let reply = confined.send("alloc 134217728");
    assert!(reply.starts_with("ok 0 "), "{reply}");
    let mut root = membroker_client::Client::connect(SOCKET).unwrap();
    let lease = root.stat(&format!("libvirt/{VM}/ram0")).unwrap();
    assert_eq!(
        (lease.size, lease.uid, lease.label.as_deref()),
        (128 << 20, UID, Some(VM))
    );
    assert_eq!(lease.holders.len(), 1, "{lease:?}");
    // Another domain's QEMU (same uid, another profile) cannot open it.
    let other = Command::new("aa-exec")
        .args(["-p", B, "--"])
        .arg(bin_path("membroker"))
        .args(["--socket", SOCKET, "stat", &format!("libvirt/{VM}/ram0")])
        .uid(UID)
        .gid(UID)
        .output()
        .unwrap();
    assert!(!other.status.success(), "{other:?}");
    assert!(
        String::from_utf8_lossy(&other.stderr).contains(VM),
        "{other:?}"
    );

    drop(confined);
    let _ = broker.kill();
    let _ = broker.wait();
}
