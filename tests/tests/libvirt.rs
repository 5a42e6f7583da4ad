//! `membroker libvirt-hook` run as libvirt runs it (arguments, the domain XML on stdin) against a
//! real broker; then real libvirt (feature `libvirt`): Debian's `libvirtd` and `virtlogd`,
//! started here by hand (no systemd), drive one domain under TCG through its life on broker
//! memory: start, guest reboot, a libvirtd restart, a broker upgrade, managedsave and restore,
//! destroy; a domain the pool cannot hold is refused before its QEMU starts; and a domain with
//! shared memfd RAM serves a virtiofs share through libvirt's virtiofsd. That part runs
//! the files membroker's Debian package installed (`scripts/test` builds it with cargo-deb and
//! installs it with dpkg): the broker `/usr/bin/membroker`, the shim in
//! `/usr/lib/x86_64-linux-gnu/` and the hook in `/etc/libvirt/hooks/qemu.d/`.
//!
//! libvirt's qemu driver keeps its state in fixed system directories (/etc/libvirt,
//! /run/libvirt, /var/lib/libvirt), so this test uses the system's daemons: it fails if a
//! libvirtd is already running, and leaves no domain, daemon or QEMU log behind.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use membroker_client::proto::LeaseInfo;
use membroker_client::{ErrorCode, LeaseState};
use membroker_tests::{Helper, TestBroker, bin_path, stdout_ok, wait_until};

#[path = "../shim/support.rs"]
mod support;
use support::{MIB, initramfs, initramfs_with_modules, kernel};

const URI: &str = "qemu:///system";
/// Where the Debian package installs the hook: libvirt (>= 6.5) runs every script in
/// `hooks/qemu.d/`.
const HOOK: &str = "/etc/libvirt/hooks/qemu.d/membroker";
/// The package's broker and shim.
const INSTALLED_BROKER: &str = "/usr/bin/membroker";
const INSTALLED_SHIM: &str = "/usr/lib/x86_64-linux-gnu/libmembroker_preload.so";
/// QEMU 7.2's virtiofsd, as Debian installs it.
const VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";
/// The domain whose RAM is a shared memfd, serving virtiofs.
const VFS: &str = "membroker-test-vfs";
const VM: &str = "membroker-test-vm";
const BIG: &str = "membroker-test-big";
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// Guest-physical (and so lease) offset of the page the host and the guest talk through,
/// kept from the guest kernel by `memmap=4M$200M`.
const MAILBOX: usize = 200 << 20;

/// The guest: says BOOT, leaves a note at `MAILBOX + 4 KiB`, then ticks once a second and
/// reboots itself when the host writes `REBOOT-NOW` at `MAILBOX`.
const INIT: &str = "echo BOOT\n\
    echo GUEST-WAS-HERE | /bin/busybox dd of=/dev/mem bs=4096 seek=51201 conv=notrunc 2>/dev/null\n\
    i=0\n\
    while true; do\n\
      flag=$(/bin/busybox dd if=/dev/mem bs=4096 skip=51200 count=1 2>/dev/null | /bin/busybox head -c 10)\n\
      if [ \"$flag\" = REBOOT-NOW ]; then\n\
        echo ---------- | /bin/busybox dd of=/dev/mem bs=4096 seek=51200 conv=notrunc 2>/dev/null\n\
        echo REBOOTING; /bin/busybox reboot -f\n\
      fi\n\
      echo TICK $i; i=$((i + 1)); /bin/busybox sleep 1\n\
    done";

fn virsh(args: &[&str]) -> Output {
    Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .output()
        .expect("virsh (Debian package libvirt-clients) is not installed")
}

/// `virsh ARGS`, which must succeed.
fn virsh_ok(args: &[&str]) -> String {
    let out = virsh(args);
    assert!(
        out.status.success(),
        "virsh {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Debian's libvirtd and virtlogd, run in the foreground by this test, and the qemu hook.
struct Libvirt {
    virtlogd: Child,
    libvirtd: Option<Child>,
    log: PathBuf,
}

impl Libvirt {
    fn start(dir: &Path) -> Libvirt {
        assert!(
            !virsh(&["version"]).status.success(),
            "a libvirtd is already running: this test starts its own"
        );
        // The package's hook, as shipped.
        let installed = std::fs::read(HOOK).unwrap_or_else(|e| {
            panic!(
                "{HOOK}: {e}: membroker's Debian package is not installed (scripts/test builds \
                 it with cargo deb and installs target/debian/membroker_*.deb with dpkg -i)"
            )
        });
        assert_eq!(
            installed,
            include_bytes!("../../contrib/libvirt/qemu"),
            "{HOOK} is not contrib/libvirt/qemu: install this build's package"
        );
        let log = dir.join("libvirtd.log");
        let mut virtlogd = Command::new("virtlogd");
        membroker_tests::sys::terminate_with_parent(&mut virtlogd);
        let virtlogd = virtlogd
            .stderr(std::fs::File::create(dir.join("virtlogd.log")).unwrap())
            .spawn()
            .expect("virtlogd (Debian package libvirt-daemon-system) is not installed");
        let mut libvirt = Libvirt {
            virtlogd,
            libvirtd: None,
            log,
        };
        libvirt.start_libvirtd();
        // Domains a killed run of this test left (libvirtd reconnected to them) go first.
        libvirt.remove_domains();
        libvirt
    }

    fn remove_domains(&self) {
        for name in [VM, BIG, VFS] {
            let _ = virsh(&["destroy", name]);
            let _ = virsh(&["undefine", name, "--managed-save"]);
            let _ = std::fs::remove_file(format!("/var/log/libvirt/qemu/{name}.log"));
        }
    }

    fn start_libvirtd(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut child = Command::new("libvirtd");
        membroker_tests::sys::terminate_with_parent(&mut child);
        let child = child
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("libvirtd (Debian package libvirt-daemon-system) is not installed");
        self.libvirtd = Some(child);
        let started = Instant::now();
        while !virsh(&["version"]).status.success() {
            let exited = self.libvirtd.as_mut().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none() && started.elapsed() < Duration::from_secs(60),
                "libvirtd did not come up ({exited:?}):\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop_libvirtd(&mut self) {
        if let Some(mut child) = self.libvirtd.take() {
            membroker_tests::signal(child.id(), rustix::process::Signal::TERM);
            child.wait().unwrap();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        self.remove_domains();
        self.stop_libvirtd();
        membroker_tests::signal(self.virtlogd.id(), rustix::process::Signal::TERM);
        let _ = self.virtlogd.wait();
    }
}

/// A TCG domain of `mib` MiB that boots the installed kernel with `initrd` on broker memory,
/// its serial console in `console`.
fn domain_xml(name: &str, mib: u64, dir: &Path, initrd: &Path, socket: &Path) -> String {
    shared_domain_xml(name, mib, dir, initrd, socket, None)
}

/// [`domain_xml`], with `share` given: its RAM a shared memfd (`<memoryBacking><source
/// type='memfd'/><access mode='shared'/>`) and `share` exported to the guest over virtiofs
/// (tag `share`, Debian's `/usr/lib/qemu/virtiofsd`).
fn shared_domain_xml(
    name: &str,
    mib: u64,
    dir: &Path,
    initrd: &Path,
    socket: &Path,
    share: Option<&Path>,
) -> String {
    let (backing, filesystem) = match share {
        Some(share) => (
            "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"
                .to_string(),
            format!(
                "<filesystem type='mount' accessmode='passthrough'>\
                   <driver type='virtiofs'/><binary path='{VIRTIOFSD}'/>\
                   <source dir='{}'/><target dir='share'/></filesystem>",
                share.display()
            ),
        ),
        None => (String::new(), String::new()),
    };
    format!(
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>{mib}</memory>
  {backing}
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet memmap=4M$200M</cmdline>
  </os>
  <devices>
    <serial type='file'><source path='{console}' append='on'/></serial>
    <memballoon model='none'/>
    {filesystem}
  </devices>
  <qemu:commandline>
    <qemu:env name='LD_PRELOAD' value='{shim}'/>
    <qemu:env name='MEMBROKER_SOCKET' value='{socket}'/>
    <qemu:env name='MEMBROKER_LEASE_PREFIX' value='libvirt/{name}'/>
  </qemu:commandline>
</domain>
",
        kernel = dir.join("vmlinuz").display(),
        initrd = initrd.display(),
        console = dir.join(format!("{name}.console")).display(),
        shim = INSTALLED_SHIM,
        socket = socket.display(),
    )
}

fn define(dir: &Path, name: &str, xml: &str) {
    let path = dir.join(format!("{name}.xml"));
    std::fs::write(&path, xml).unwrap();
    virsh_ok(&["define", path.to_str().unwrap()]);
}

/// The domain's serial console so far.
struct Console(PathBuf);

impl Console {
    fn text(&self) -> String {
        std::fs::read_to_string(&self.0).unwrap_or_default()
    }

    fn count(&self, line: &str) -> usize {
        self.text().lines().filter(|l| l.trim() == line).count()
    }

    /// The guest's last `TICK n`.
    fn tick(&self) -> Option<u64> {
        self.text()
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("TICK ")?.parse().ok())
    }

    /// Waits until `cond` holds of the console text.
    fn wait(&self, what: &str, mut cond: impl FnMut(&Console) -> bool) {
        let started = Instant::now();
        while !cond(self) {
            assert!(
                started.elapsed() < BOOT_TIMEOUT,
                "no {what} on the console after {BOOT_TIMEOUT:?}:\n{}\nQEMU's log:\n{}",
                self.text(),
                std::fs::read_to_string(format!("/var/log/libvirt/qemu/{VM}.log"))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for a tick newer than `after`; returns it.
    fn wait_tick(&self, after: u64) -> u64 {
        self.wait(&format!("TICK after {after}"), |c| {
            c.tick().is_some_and(|t| t > after)
        });
        self.tick().unwrap()
    }
}

fn qemu_pid(name: &str) -> u32 {
    let text = std::fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid")).unwrap();
    text.trim().parse().unwrap()
}

fn leases(broker: &TestBroker, prefix: &str) -> Vec<LeaseInfo> {
    broker.client().list(prefix).unwrap()
}

fn ram0(broker: &TestBroker) -> LeaseInfo {
    broker.client().stat(&format!("libvirt/{VM}/ram0")).unwrap()
}

fn used(broker: &TestBroker) -> u64 {
    broker.client().df().unwrap().iter().map(|p| p.used).sum()
}

fn uid_of(user: &str) -> u32 {
    let out = Command::new("id").args(["-u", user]).output().unwrap();
    stdout_ok(&out).trim().parse().unwrap()
}

/// `membroker libvirt-hook DOMAIN OP SUBOP -` with `xml` on stdin, as libvirt runs the hook.
fn hook(save_dir: &Path, domain: &str, op: &str, xml: &str) -> Output {
    let mut child = Command::new(bin_path("membroker"))
        .args(["--socket", "/nonexistent/the-xml-names-the-socket"])
        .args(["libvirt-hook", domain, op.split(' ').next().unwrap()])
        .args([op.split(' ').nth(1).unwrap(), "-"])
        .arg("--save-dir")
        .arg(save_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(xml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.stdout.is_empty(), "the hook printed a domain XML");
    out
}

/// A domain XML for the hook alone: `cells` NUMA cells of `mib` MiB each (none: `<memory>`),
/// QEMU running as this test's own uid.
fn hook_xml(broker: &TestBroker, name: &str, mib: u64, cells: usize) -> String {
    let uid = rustix::process::getuid().as_raw();
    let numa: String = (0..cells)
        .map(|i| format!("<cell id='{i}' cpus='{i}' memory='{mib}' unit='MiB'/>"))
        .collect();
    format!(
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>{total}</memory>
  <cpu><numa>{numa}</numa></cpu>
  <seclabel type='static' model='dac'><label>+{uid}:+{uid}</label></seclabel>
  <qemu:commandline>
    <qemu:env name='MEMBROKER_SOCKET' value='{socket}'/>
    <qemu:env name='MEMBROKER_LEASE_PREFIX' value='libvirt/{name}'/>
  </qemu:commandline>
</domain>",
        total = mib * cells.max(1) as u64,
        socket = broker.socket().display(),
    )
}

fn names_and_sizes(broker: &TestBroker, prefix: &str) -> Vec<(String, u64)> {
    leases(broker, prefix)
        .into_iter()
        .map(|l| (l.name, l.size))
        .collect()
}

#[test]
fn hook_makes_keeps_and_removes_a_domains_leases() {
    let broker = TestBroker::start(&["--pool", "memfd:t:512M"]);
    let save = tempfile::tempdir().unwrap();
    let uid = rustix::process::getuid().as_raw();
    let ok = |out: Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        )
    };

    // prepare: one lease per NUMA cell, owned by QEMU's user (the DAC label), persistent.
    let two = hook_xml(&broker, "d1", 128, 2);
    ok(hook(save.path(), "d1", "prepare begin", &two));
    assert_eq!(
        names_and_sizes(&broker, "libvirt/d1"),
        [
            ("libvirt/d1/ram0".to_string(), 128 * MIB),
            ("libvirt/d1/ram1".to_string(), 128 * MIB)
        ]
    );
    let made = broker.client().stat("libvirt/d1/ram0").unwrap();
    assert_eq!((made.uid, made.mode, made.persistent), (uid, 0o600, true));

    // Operations other than prepare and release change nothing.
    for op in [
        "start begin",
        "started begin",
        "reconnect begin",
        "stopped end",
    ] {
        ok(hook(save.path(), "d1", op, &two));
    }
    assert_eq!(leases(&broker, "libvirt/d1").len(), 2);

    // prepare again with one bigger cell: ram0 is made again at its new size, ram1 goes.
    let one = hook_xml(&broker, "d1", 256, 1);
    ok(hook(save.path(), "d1", "prepare begin", &one));
    assert_eq!(
        names_and_sizes(&broker, "libvirt/d1"),
        [("libvirt/d1/ram0".to_string(), 256 * MIB)]
    );
    let ram0 = broker.client().stat("libvirt/d1/ram0").unwrap();

    // A lease that fits is kept as it is (a restore after managedsave).
    ok(hook(save.path(), "d1", "prepare begin", &one));
    assert_eq!(
        broker.client().stat("libvirt/d1/ram0").unwrap().extents,
        ram0.extents
    );

    // A held lease that does not fit refuses the start, naming its holder.
    let mut holder = Helper::spawn({
        let mut cmd = Command::new(bin_path("mb-holder"));
        cmd.arg(broker.socket())
            .args(["open", "libvirt/d1/ram0", "rw"]);
        cmd
    });
    assert!(holder.line().starts_with("ok"));
    let out = hook(save.path(), "d1", "prepare begin", &two);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("membroker: domain d1: lease libvirt/d1/ram0 is held by pid")
            && err.contains("is QEMU still running?"),
        "{err}"
    );
    drop(holder);

    // A start the pool cannot hold fails with the broker's reason and leaves nothing made.
    let big = hook_xml(&broker, "d2", 256, 2);
    let out = hook(save.path(), "d2", "prepare begin", &big);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(
            "membroker: domain d2: its guest RAM needs libvirt/d2/ram0 (256 MiB), \
             libvirt/d2/ram1 (256 MiB): lease libvirt/d2/ram1: pool t has"
        ),
        "{err}"
    );
    assert!(leases(&broker, "libvirt/d2").is_empty());

    // release with a managed-save image keeps the leases; without one removes them.
    std::fs::write(save.path().join("d1.save"), b"").unwrap();
    ok(hook(save.path(), "d1", "release end", &one));
    assert_eq!(leases(&broker, "libvirt/d1").len(), 1);
    std::fs::remove_file(save.path().join("d1.save")).unwrap();
    ok(hook(save.path(), "d1", "release end", &one));
    assert!(leases(&broker, "libvirt").is_empty());
    wait_until(Duration::from_secs(5), "the pool to be empty", || {
        used(&broker) == 0
    });

    // A domain without the shim's environment is none of the hook's business.
    let plain = "<domain><name>p</name><memory unit='GiB'>64</memory></domain>";
    ok(hook(save.path(), "p", "prepare begin", plain));
    assert!(leases(&broker, "").is_empty());
}

#[test]
#[cfg_attr(
    not(feature = "libvirt"),
    ignore = "starts libvirtd and boots a domain: run with --features libvirt (scripts/test does)"
)]
fn libvirt_domain_lives_on_broker_memory() {
    let qemu_uid = uid_of("libvirt-qemu");
    let broker = TestBroker::start_binary(
        PathBuf::from(INSTALLED_BROKER),
        &["--pool", "memfd:t:384M", "--socket-group", "libvirt-qemu"],
    );
    let dir = tempfile::tempdir().unwrap();
    // QEMU runs as libvirt-qemu and must reach the kernel, the initramfs and the console.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    // A copy: libvirt gives the kernel to QEMU's user while the domain runs.
    std::fs::copy(kernel(), dir.path().join("vmlinuz")).unwrap();
    let initrd = initramfs(dir.path(), INIT);
    let mut libvirt = Libvirt::start(dir.path());

    // A domain the pool cannot hold is refused by the hook before QEMU starts, saying why.
    define(
        dir.path(),
        BIG,
        &domain_xml(BIG, 512, dir.path(), &initrd, broker.socket()),
    );
    let out = virsh(&["start", BIG]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "domain {BIG}: its guest RAM needs libvirt/{BIG}/ram0 (512 MiB)"
        )) && err.contains("pool t has 384 MiB free, 512 MiB asked"),
        "{err}"
    );
    assert!(leases(&broker, "libvirt").is_empty());
    virsh_ok(&["undefine", BIG]);

    // Start: the hook made ram0 for QEMU's user, QEMU holds it, and it is the guest's RAM.
    define(
        dir.path(),
        VM,
        &domain_xml(VM, 256, dir.path(), &initrd, broker.socket()),
    );
    let console = Console(dir.path().join(format!("{VM}.console")));
    virsh_ok(&["start", VM]);
    console.wait("BOOT", |c| c.count("BOOT") == 1);
    let first = console.wait_tick(0);
    let lease = ram0(&broker);
    assert_eq!(
        (lease.size, lease.uid, lease.mode, lease.persistent),
        (256 * MIB, qemu_uid, 0o600, true),
        "{lease:?}"
    );
    let pid = qemu_pid(VM);
    assert_eq!(
        lease.holders.iter().map(|h| h.pid).collect::<Vec<_>>(),
        [pid]
    );
    assert_eq!(leases(&broker, "libvirt").len(), 1);
    let mapping = broker
        .client()
        .open(&lease.name, true)
        .unwrap()
        .map()
        .unwrap();
    let mut note = [0u8; 14];
    mapping.read_at(MAILBOX + 4096, &mut note).unwrap();
    assert_eq!(
        &note, b"GUEST-WAS-HERE",
        "the guest's note is not in the lease"
    );

    // Guest reboot, asked for through the lease: the same QEMU boots again on the same lease.
    mapping.write_at(MAILBOX, b"REBOOT-NOW").unwrap();
    console.wait("a second BOOT", |c| c.count("BOOT") == 2);
    assert_eq!(console.count("REBOOTING"), 1);
    console.wait_tick(first);
    assert_eq!(qemu_pid(VM), pid);
    assert_eq!(ram0(&broker).created, lease.created);
    drop(mapping);

    // A libvirtd restart reconnects to the running QEMU; the hook's `reconnect` keeps the lease.
    libvirt.stop_libvirtd();
    let tick = console.wait_tick(console.tick().unwrap());
    libvirt.start_libvirtd();
    assert_eq!(virsh_ok(&["domstate", VM]).trim(), "running");
    let tick = console.wait_tick(tick);
    let kept = ram0(&broker);
    assert_eq!(
        (kept.created, kept.state),
        (lease.created, LeaseState::Held)
    );
    assert!(kept.holders.iter().any(|h| h.pid == pid), "{kept:?}");

    // A broker upgrade while the domain runs: the guest keeps ticking, QEMU holds it again.
    let text = stdout_ok(&broker.run_cli(&["upgrade"]));
    assert!(text.starts_with("upgraded in "), "{text}");
    let tick = console.wait_tick(tick + 1);
    wait_until(
        Duration::from_secs(20),
        "QEMU to hold its lease again",
        || ram0(&broker).holders.iter().any(|h| h.pid == pid),
    );
    assert_eq!(ram0(&broker).created, lease.created);

    // managedsave: QEMU goes, the lease stays for the restore; `start` restores the guest
    // (it ticks on from where it was, no new BOOT) onto the same lease.
    virsh_ok(&["managedsave", VM]);
    let saved = ram0(&broker);
    assert_eq!(
        (saved.created, saved.state),
        (lease.created, LeaseState::Idle)
    );
    let before = console.tick().unwrap();
    assert!(before >= tick);
    virsh_ok(&["start", VM]);
    let restored_pid = qemu_pid(VM);
    assert_ne!(restored_pid, pid);
    console.wait_tick(before);
    assert_eq!(console.count("BOOT"), 2, "{}", console.text());
    let restored = ram0(&broker);
    assert_eq!(restored.created, lease.created);
    assert!(
        restored.holders.iter().any(|h| h.pid == restored_pid),
        "{restored:?}"
    );

    // destroy: QEMU goes, the hook's `release` removes the lease, the memory is back.
    virsh_ok(&["destroy", VM]);
    assert!(leases(&broker, "libvirt").is_empty());
    let err = broker
        .client()
        .stat(&format!("libvirt/{VM}/ram0"))
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    wait_until(Duration::from_secs(10), "the pool to be empty", || {
        used(&broker) == 0
    });

    // A domain with shared memfd RAM and a virtiofs share: its RAM is a lease under QEMU's own
    // memfd, libvirt's virtiofsd receives that fd and maps the lease, and the guest writes a
    // file through the share that the host reads.
    let vfs = dir.path().join("vfs");
    let share = vfs.join("share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::set_permissions(&vfs, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let body = "/bin/busybox mount -t virtiofs share /mnt || echo VFS-MOUNT-FAILED\n\
                echo written-by-the-guest > /mnt/from-guest && echo VFS-WROTE\n\
                /bin/busybox umount /mnt\n\
                echo VFS-DONE";
    let vfs_initrd = initramfs_with_modules(&vfs, body, &["virtio_pci", "virtiofs"]);
    let xml = shared_domain_xml(
        VFS,
        256,
        dir.path(),
        &vfs_initrd,
        broker.socket(),
        Some(&share),
    );
    define(dir.path(), VFS, &xml);
    let console = Console(dir.path().join(format!("{VFS}.console")));
    virsh_ok(&["start", VFS]);
    console.wait("the guest to use the share", |c| c.count("VFS-DONE") == 1);
    assert_eq!(console.count("VFS-WROTE"), 1, "{}", console.text());
    assert_eq!(
        std::fs::read_to_string(share.join("from-guest")).unwrap(),
        "written-by-the-guest\n"
    );
    let name = format!("libvirt/{VFS}/ram0");
    let lease = broker.client().stat(&name).unwrap();
    let pid = qemu_pid(VFS);
    assert_eq!(
        (
            lease.size,
            lease.holders.iter().map(|h| h.pid).collect::<Vec<_>>()
        ),
        (256 * MIB, vec![pid])
    );
    let memfd = format!("memfd:membroker:{name}");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(
        maps.lines()
            .any(|l| l.contains(&memfd) && l.contains(" rw-s ")),
        "QEMU does not map the lease shared:\n{maps}"
    );
    let virtiofsd = processes_running(VIRTIOFSD);
    assert!(
        virtiofsd.iter().any(|p| {
            std::fs::read_to_string(format!("/proc/{p}/maps")).is_ok_and(|m| m.contains(&memfd))
        }),
        "no virtiofsd ({virtiofsd:?}) maps the lease"
    );
    virsh_ok(&["destroy", VFS]);
    assert!(leases(&broker, "libvirt").is_empty());
}

/// The pids of processes running `exe`.
fn processes_running(exe: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == Path::new(exe))
        })
        .collect()
}
