//! `membroker exec`: a program that does not speak the protocol runs on leases it inherits as
//! fds, holds them while it runs and gives the non-persistent ones back when it exits; (feature
//! `qemu`) unmodified QEMU boots the Debian kernel on file-backed RAM that is a lease.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use membroker_client::{ErrorCode, LeaseState};
use membroker_tests::{Helper, TestBroker, stderr_err, stdout_ok, wait_until};

#[path = "../shim/support.rs"]
mod support;
use support::*;

/// `membroker exec ARGS` against `broker`.
fn exec(broker: &TestBroker, args: &[&str]) -> Command {
    let mut cmd = broker.cli();
    cmd.arg("exec").args(args);
    cmd
}

/// Waits until the broker no longer knows `name`.
fn wait_gone(broker: &TestBroker, name: &str) {
    wait_until(
        Duration::from_secs(5),
        &format!("{name} released"),
        || matches!(broker.client().stat(name), Err(e) if e.code() == Some(ErrorCode::NotFound)),
    );
}

/// The first `len` bytes of a lease, read through a read-only mapping of our own.
fn lease_bytes(broker: &TestBroker, name: &str, len: usize) -> Vec<u8> {
    let lease = broker.client().open(name, false).expect("open the lease");
    let mut bytes = vec![0; len];
    lease.map().unwrap().read_at(0, &mut bytes).unwrap();
    bytes
}

#[test]
fn the_program_holds_its_leases_until_it_exits() {
    let broker = TestBroker::start(&["--pool", "memfd:t:64M"]);
    // The shell writes through the inherited fd, says which fd it got, then waits for stdin.
    let mut cmd = exec(
        &broker,
        &[
            "--lease",
            "vm/a:2M",
            "--lease",
            "vm/b:4M",
            "--",
            "sh",
            "-c",
            "printf hello 1<>/proc/self/fd/{fd:vm/a}; echo {fd:vm/a} {fd:vm/b}; read line",
        ],
    );
    cmd.stderr(Stdio::piped());
    let mut shell = Helper::spawn(cmd);
    let line = shell.line();
    let fds: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fds.len(), 2, "{line}");
    let pid = shell.child.id();

    // Both leases are held by the program itself (exec keeps the pid), as the fds it was told.
    for (name, fd, size) in [("vm/a", fds[0], 2 << 20), ("vm/b", fds[1], 4 << 20)] {
        let info = broker.client().stat(name).unwrap();
        assert_eq!(info.size, size);
        assert!(!info.persistent, "{info:?}");
        assert_eq!(info.state, LeaseState::Held, "{info:?}");
        assert_eq!(
            info.holders.iter().map(|h| h.pid).collect::<Vec<_>>(),
            [pid]
        );
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
        assert_eq!(
            target.to_str().unwrap(),
            format!("/memfd:membroker:{name} (deleted)")
        );
    }
    assert_eq!(lease_bytes(&broker, "vm/a", 5), b"hello");

    // The program exits: its connection closes and the leases go back to the pool.
    writeln!(shell.child.stdin.as_mut().unwrap()).unwrap();
    assert!(shell.child.wait().unwrap().success());
    wait_gone(&broker, "vm/a");
    wait_gone(&broker, "vm/b");
    assert_eq!(stdout_ok(&broker.run_cli(&["ls"])), "");
}

#[test]
fn an_unknown_fd_reference_fails_before_anything_runs() {
    let broker = TestBroker::start(&["--pool", "memfd:t:64M"]);
    let dir = tempfile::tempdir().unwrap();
    let ran = dir.path().join("ran");
    let out = exec(
        &broker,
        &[
            "--lease",
            "vm/a:2M",
            "--",
            "touch",
            ran.to_str().unwrap(),
            "/proc/self/fd/{fd:vm/ram0}",
        ],
    )
    .output()
    .unwrap();
    let err = stderr_err(&out);
    assert!(
        err.contains(
            "argument \"/proc/self/fd/{fd:vm/ram0}\": {fd:vm/ram0} names no --lease \
             (known: {fd:vm/a})"
        ),
        "{err}"
    );
    assert!(!ran.exists(), "the program ran");
    assert_eq!(stdout_ok(&broker.run_cli(&["ls"])), "", "a lease was made");
}

#[test]
fn a_missing_command_is_named_and_its_leases_go_back() {
    let broker = TestBroker::start(&["--pool", "memfd:t:64M"]);
    let out = exec(
        &broker,
        &["--lease", "vm/a:2M", "--", "no-such-vmm", "-m", "1G"],
    )
    .output()
    .unwrap();
    let err = stderr_err(&out);
    assert_eq!(
        err.trim_end(),
        "membroker: no-such-vmm: command not found (give a path, or check PATH)"
    );
    wait_gone(&broker, "vm/a");
}

#[test]
fn an_existing_lease_is_reattached_when_its_size_matches() {
    let broker = TestBroker::start(&["--pool", "memfd:t:64M"]);
    stdout_ok(&broker.run_cli(&["create", "vm/p", "--size", "2M"]));
    let write = "printf again 1<>/proc/self/fd/{fd:vm/p}";
    stdout_ok(
        &exec(&broker, &["--lease", "vm/p:2M", "--", "sh", "-c", write])
            .output()
            .unwrap(),
    );
    assert_eq!(lease_bytes(&broker, "vm/p", 5), b"again");
    // Still there, nobody holds it: it was persistent before exec re-attached to it.
    wait_until(Duration::from_secs(5), "vm/p idle", || {
        broker.client().stat("vm/p").unwrap().state == LeaseState::Idle
    });

    let err = stderr_err(
        &exec(&broker, &["--lease", "vm/p:4M", "--", "true"])
            .output()
            .unwrap(),
    );
    assert_eq!(
        err.trim_end(),
        "membroker: lease vm/p exists with size 2 MiB, --lease asks 4 MiB: ask for 2 MiB, \
         or remove it (membroker rm vm/p) to make a new one"
    );
}

#[test]
fn persistent_leases_stay_after_the_program() {
    let broker = TestBroker::start(&["--pool", "memfd:t:64M"]);
    let write = "printf kept 1<>/proc/self/fd/{fd:vm/p}";
    stdout_ok(
        &exec(
            &broker,
            &[
                "--persistent",
                "--lease",
                "vm/p:2M",
                "--",
                "sh",
                "-c",
                write,
            ],
        )
        .output()
        .unwrap(),
    );
    wait_until(Duration::from_secs(5), "vm/p idle", || {
        broker.client().stat("vm/p").unwrap().state == LeaseState::Idle
    });
    assert_eq!(lease_bytes(&broker, "vm/p", 4), b"kept");
}

// ---------------------------------------------------------------------------------------------
// Real QEMU (feature `qemu`): Debian's qemu-system-x86_64, TCG, the installed kernel.

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// The offset of the first `needle` in a lease, read through a read-only mapping.
fn find_in_lease(broker: &TestBroker, name: &str, needle: &[u8]) -> Option<u64> {
    let lease = broker.client().open(name, false).expect("open the lease");
    let map = lease.map().unwrap();
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0; CHUNK + needle.len()];
    let mut at = 0;
    while at < map.len() {
        let len = (CHUNK + needle.len()).min(map.len() - at);
        map.read_at(at, &mut buf[..len]).unwrap();
        if let Some(i) = buf[..len].windows(needle.len()).position(|w| w == needle) {
            return Some((at + i) as u64);
        }
        at += CHUNK;
    }
    None
}

#[test]
#[cfg_attr(
    not(feature = "qemu"),
    ignore = "boots QEMU: run with --features qemu (scripts/test does)"
)]
fn unmodified_qemu_boots_on_a_lease_and_its_kernel_is_in_the_lease() {
    let broker = TestBroker::start(&["--pool", "memfd:t:1G"]);
    let dir = tempfile::tempdir().unwrap();
    let initrd = initramfs(dir.path(), &format!("echo {MARKER}"));
    let mut cmd = exec(
        &broker,
        &["--lease", "vm/ram0:256M", "--", "qemu-system-x86_64"],
    );
    cmd.args(boot_args(&initrd, "256M", ""))
        .args([
            "-object",
            "memory-backend-file,id=m0,size=256M,mem-path=/proc/self/fd/{fd:vm/ram0},share=on",
            "-machine",
            "memory-backend=m0",
        ])
        .env_remove("LD_PRELOAD");
    let mut qemu = Qemu::spawn(cmd);
    let took = qemu.wait_for(MARKER, BOOT_TIMEOUT);
    println!("boot to marker on a lease passed by membroker exec: {took:?}");

    // QEMU (the pid exec became) holds the lease and maps it shared as its guest RAM.
    let info = broker.client().stat("vm/ram0").unwrap();
    assert_eq!(info.size, 256 * MIB);
    assert_eq!(
        info.holders.iter().map(|h| h.pid).collect::<Vec<_>>(),
        [qemu.pid()]
    );
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", qemu.pid())).unwrap();
    let ram: Vec<&str> = maps
        .lines()
        .filter(|l| l.contains("memfd:membroker:vm/ram0"))
        .collect();
    assert_eq!(ram.len(), 1, "{maps}");
    assert!(ram[0].contains(" rw-s "), "{}", ram[0]);

    // The running kernel's banner, with the release of the kernel QEMU booted, is in the lease.
    let release = kernel()
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap()
        .to_string();
    let banner = format!("Linux version {release} ");
    let at = find_in_lease(&broker, "vm/ram0", banner.as_bytes());
    assert!(at.is_some(), "no {banner:?} in the lease");
    println!("{banner:?} at guest-physical {:#x}", at.unwrap());

    // QEMU goes: its connection closes and the non-persistent lease goes back to the pool.
    qemu.kill();
    wait_gone(&broker, "vm/ram0");
    assert_eq!(stdout_ok(&broker.run_cli(&["ls"])), "");
}

#[test]
#[cfg_attr(
    not(feature = "devdax"),
    ignore = "boots the dax VM: run with --features devdax (scripts/test does)"
)]
fn device_leases_must_be_persistent() {
    if !membroker_tests::in_dax_vm("device_leases_must_be_persistent", &[]) {
        return;
    }
    let broker = TestBroker::start(&["--pool", "devdax:dax:region0:2M"]);
    // A device can only be mapped, not read: opening it again is what a VMM does first.
    let reopen = "exec 3<>/proc/self/fd/{fd:vm/d} && readlink /proc/self/fd/3";
    let err = stderr_err(
        &exec(&broker, &["--lease", "vm/d:2M", "--", "sh", "-c", reopen])
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("lease vm/d is a device-dax lease and not persistent"),
        "{err}"
    );
    assert!(err.contains("use --persistent"), "{err}");
    wait_gone(&broker, "vm/d");

    // Persistent, as root: the program reopens the device through /proc/self/fd.
    let out = stdout_ok(
        &exec(
            &broker,
            &[
                "--persistent",
                "--lease",
                "vm/d:2M",
                "--",
                "sh",
                "-c",
                reopen,
            ],
        )
        .output()
        .unwrap(),
    );
    let info = broker.client().stat("vm/d").unwrap();
    assert!(info.persistent, "{info:?}");
    assert_eq!(
        out.trim(),
        format!("/dev/{}", info.device.as_deref().unwrap())
    );
}
