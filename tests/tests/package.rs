//! The Debian package (`cargo deb -p membroker`, built by `scripts/test` before the tests):
//! installed with the real dpkg into a throwaway root (its postinst runs there, `DPKG_ROOT`
//! set), its files checked, the installed broker run, then purged. Feature `deb`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use membroker_tests::{stdout_ok, wait_until};

/// The newest `membroker_*.deb` in the target directory's `debian/`.
fn built_deb() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe
        .ancestors()
        .map(|d| d.join("debian"))
        .find(|d| d.is_dir())
        .expect("no target/debian: build the package first (`cargo deb -p membroker`; scripts/test does)");
    let mut debs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("membroker_") && name.ends_with(".deb")
        })
        .map(|p| (std::fs::metadata(&p).unwrap().modified().unwrap(), p))
        .collect();
    debs.sort();
    debs.pop().expect("no membroker_*.deb in target/debian").1
}

/// Runs `cmd`, which must succeed; its stdout.
fn run(cmd: &mut Command) -> String {
    stdout_ok(&cmd.output().expect("run"))
}

/// dpkg acting on the throwaway root, maintainer scripts run outside a chroot with
/// `DPKG_ROOT` (the root has no shell of its own).
fn dpkg(root: &Path) -> Command {
    let mut cmd = Command::new("dpkg");
    cmd.arg(format!("--root={}", root.display()))
        .arg("--force-script-chrootless")
        .arg("--force-depends")
        .arg("--log=/dev/null");
    cmd
}

fn contrib(file: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../contrib")
            .join(file),
    )
    .unwrap()
}

#[test]
#[cfg_attr(
    not(feature = "deb"),
    ignore = "needs the .deb built by cargo-deb and dpkg: --features membroker-tests/deb (scripts/test)"
)]
fn deb_installs_the_broker_shim_units_and_group_and_purges_clean() {
    let deb = built_deb();
    let fields = run(Command::new("dpkg-deb").args(["--field"]).arg(&deb).args([
        "Package",
        "Architecture",
        "Depends",
    ]));
    assert!(fields.contains("Package: membroker\n"), "{fields}");
    assert!(fields.contains("Architecture: amd64\n"), "{fields}");
    assert!(
        fields.contains("libc6") && fields.contains("passwd"),
        "{fields}"
    );

    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    for dir in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "etc"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    std::fs::write(root.join("etc/gshadow"), "root:*::\n").unwrap();
    run(dpkg(root).arg("--install").arg(&deb));

    let status = run(dpkg(root).args(["--status", "membroker"]));
    assert!(status.contains("Status: install ok installed"), "{status}");
    // The files, where Debian wants them.
    let bin = root.join("usr/bin/membroker");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&bin).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o755);
    let shim = std::fs::read(root.join("usr/lib/x86_64-linux-gnu/libmembroker_preload.so"))
        .expect("the shim in the multiarch library directory");
    assert_eq!(&shim[..4], b"\x7fELF");
    assert_eq!(
        std::fs::read(root.join("lib/systemd/system/membroker.socket")).unwrap(),
        contrib("membroker.socket")
    );
    assert_eq!(
        std::fs::read(root.join("lib/systemd/system/membroker.service")).unwrap(),
        contrib("membroker.service")
    );
    assert!(root.join("usr/share/doc/membroker/README.md").is_file());
    // The libvirt kit: the hook where libvirt runs it next to an operator's own, the AppArmor
    // snippet where libvirt's QEMU abstraction includes it, the example domain.
    let hook = root.join("etc/libvirt/hooks/qemu.d/membroker");
    assert_eq!(std::fs::read(&hook).unwrap(), contrib("libvirt/qemu"));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&hook).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o755);
    assert_eq!(
        std::fs::read(root.join("etc/apparmor.d/abstractions/libvirt-qemu.d/membroker")).unwrap(),
        contrib("libvirt/apparmor/membroker")
    );
    assert!(
        root.join("usr/share/doc/membroker/examples/domain.xml")
            .is_file()
    );
    assert!(
        root.join("usr/share/doc/membroker/examples/preserve-fd-store.conf")
            .is_file()
    );
    // The postinst made the socket's group (in the throwaway root only).
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap();
    assert!(
        group.lines().any(|l| l.starts_with("membroker:")),
        "{group}"
    );

    // The installed broker serves and its CLI talks to it.
    let sock = root.join("broker.sock");
    let mut broker = Command::new(&bin)
        .args([
            "serve",
            "--no-sync",
            "--pool",
            "memfd:default:16M",
            "--socket",
        ])
        .arg(&sock)
        .arg("--state-dir")
        .arg(root.join("state"))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the installed broker's socket",
        || sock.exists(),
    );
    let df = Command::new(&bin)
        .arg("--socket")
        .arg(&sock)
        .arg("df")
        .output()
        .unwrap();
    let _ = broker.kill();
    let _ = broker.wait();
    assert!(stdout_ok(&df).contains("default"));

    run(dpkg(root).args(["--purge", "membroker"]));
    assert!(!bin.exists());
    assert!(!root.join("lib/systemd/system/membroker.socket").exists());
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap();
    assert!(
        !group.contains("membroker:"),
        "purge removes the group: {group}"
    );
}
