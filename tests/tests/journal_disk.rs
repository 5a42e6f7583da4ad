//! The state journal on a disk that fills up or fails under a running broker: a create that
//! cannot be journaled fails and is never acknowledged, reads go on being served, the broker
//! recovers by itself once the disk is back, and a `kill -9` and restart find exactly the
//! acknowledged leases (no "damaged journal" refusal, nothing acknowledged dropped).
//!
//! - a full disk (feature `privileged`): a small tmpfs as the state directory, filled with a
//!   file, then emptied again;
//! - a failing disk (feature `devdax`, in the VM): ext4 (without its own journal, which would
//!   turn the file system read-only for good at the first failed write) on a ramdisk under a
//!   device-mapper table switched to dm-flakey's `error_writes` and back, so appends and
//!   `fdatasync` fail with `EIO`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use membroker_tests::systemd::Service;
use membroker_tests::{in_dax_vm, stdout_ok};

/// A broker (as a systemd service, so its memfd leases survive `kill -9`) whose state
/// directory is `state`, and the leases it acknowledged.
struct Subject {
    svc: Service,
    acknowledged: BTreeSet<String>,
    next: u32,
    /// Drop the page cache between the kill and the restart, so the restart reads the disk.
    drop_caches: bool,
}

impl Subject {
    fn start(state: &Path) -> Subject {
        let state = state.to_str().unwrap();
        let svc = Service::start(&["--pool", "memfd:t:1G", "--state-dir", state]);
        Subject {
            svc,
            acknowledged: BTreeSet::new(),
            next: 0,
            drop_caches: false,
        }
    }

    /// `membroker create` of the next name: Ok (acknowledged) or the error text.
    fn create(&mut self) -> Result<(), String> {
        let name = format!("vm{}/ram", self.next);
        self.next += 1;
        let out = self
            .svc
            .run_cli(&["create", &name, "--size", "64K", "--mode", "0640"]);
        if out.status.success() {
            self.acknowledged.insert(name);
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Creates until one fails; returns its error.
    fn create_until_refused(&mut self) -> String {
        for _ in 0..1000 {
            if let Err(e) = self.create() {
                return e;
            }
        }
        panic!("1000 creates acknowledged on a broken state directory")
    }

    /// Retries creates until one is acknowledged again (the broker recovers by itself).
    fn create_until_acknowledged(&mut self, within: Duration) {
        let started = Instant::now();
        loop {
            match self.create() {
                Ok(()) => return,
                Err(e) => assert!(
                    started.elapsed() < within,
                    "no create acknowledged {within:?} after the disk came back: {e}\nlog:\n{}",
                    self.svc.log_tail(30)
                ),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Reads are served while the journal fails.
    fn reads_served(&self) {
        let listed = stdout_ok(&self.svc.run_cli(&["ls"]));
        let names: BTreeSet<String> = listed.lines().map(String::from).collect();
        assert!(names.is_superset(&self.acknowledged), "{listed}");
        if let Some(name) = self.acknowledged.iter().next() {
            stdout_ok(&self.svc.run_cli(&["stat", name]));
        }
        stdout_ok(&self.svc.run_cli(&["df"]));
    }

    /// `kill -9` and restart: exactly the acknowledged leases are there.
    fn crash_and_check(&mut self) {
        self.svc.kill9();
        if self.drop_caches {
            std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
        }
        self.svc.restart();
        let listed = stdout_ok(&self.svc.run_cli(&["ls"]));
        let names: BTreeSet<String> = listed.lines().map(String::from).collect();
        assert_eq!(
            names,
            self.acknowledged,
            "after kill -9 and restart; log:\n{}",
            self.svc.log_tail(30)
        );
    }
}

/// A refused create's message names the journal and says what to do.
fn assert_explains(err: &str, state: &Path) {
    assert!(
        err.contains(&state.join("journal").display().to_string()),
        "{err}"
    );
    assert!(err.contains("free space in the state directory"), "{err}");
}

/// A tmpfs of `size` mounted on a temporary directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        run(Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path()));
        Tmpfs { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fill_path(dir: &Path) -> PathBuf {
    dir.join("filler")
}

/// Fills the file system with the file `path`, up to the last byte.
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 4096];
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // The last partial page too.
    while let Ok(n) = file.write(&chunk[..1]) {
        if n == 0 {
            break;
        }
    }
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root (mount): run with --features privileged (scripts/test does)"
)]
fn a_full_state_directory_refuses_creates_and_recovers_by_itself() {
    let tmpfs = Tmpfs::mount("256k");
    let state = tmpfs.path().join("state");
    let filler = fill_path(tmpfs.dir.path());
    survives(
        Subject::start(&state),
        &state,
        || fill(&filler),
        || std::fs::remove_file(&filler).unwrap(),
    );
}

/// The scenario, twice: the disk `breaks`; creates are refused (with a message that says
/// what to do) while reads are served, also after a recovery attempt; the disk is `fixed`;
/// creates are acknowledged again by themselves (one after the first outage, two after the
/// second), and `kill -9` plus a restart find exactly the acknowledged leases.
fn survives(mut subject: Subject, state: &Path, mut breaks: impl FnMut(), mut fixed: impl FnMut()) {
    for _ in 0..3 {
        subject.create().unwrap();
    }
    for round in 1..=2 {
        breaks();
        let err = subject.create_until_refused();
        assert_explains(&err, state);
        subject.reads_served();
        // Still refused while the disk is broken (a recovery rewrites the whole state).
        std::thread::sleep(Duration::from_millis(1100));
        let err = subject.create().unwrap_err();
        assert_explains(&err, state);
        subject.reads_served();
        // Other changes are refused too, and change nothing: an acknowledged lease cannot be
        // removed while its removal could not be recorded.
        let victim = subject
            .acknowledged
            .iter()
            .next()
            .cloned()
            .expect("a lease");
        let rm = subject.svc.run_cli(&["rm", &victim]);
        assert!(!rm.status.success(), "rm acknowledged on a failing journal");
        assert_explains(&String::from_utf8_lossy(&rm.stderr), state);
        subject.reads_served();

        fixed();
        subject.create_until_acknowledged(Duration::from_secs(5));
        for _ in 1..round {
            subject.create().unwrap();
        }
        subject.crash_and_check();
    }
    // And it goes on as usual.
    subject.create().unwrap();
    subject.crash_and_check();
}

/// An ext4 file system (no ext4 journal) on a 64 MiB ramdisk (`brd`) behind a device-mapper
/// device whose table can be switched between `linear` and dm-flakey's `error_writes`.
struct FlakeyDisk {
    mount: tempfile::TempDir,
    sectors: u64,
}

const DM_NAME: &str = "mb-journal-disk";

impl FlakeyDisk {
    fn new() -> FlakeyDisk {
        run(Command::new("modprobe").args(["brd", "rd_nr=1", "rd_size=65536"]));
        run(Command::new("modprobe").arg("dm-flakey"));
        run(Command::new("modprobe").arg("ext4"));
        let out = Command::new("blockdev")
            .args(["--getsz", "/dev/ram0"])
            .output()
            .unwrap();
        let sectors: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let disk = FlakeyDisk {
            mount: tempfile::tempdir().unwrap(),
            sectors,
        };
        run(Command::new("dmsetup").args(["create", DM_NAME, "--table", &disk.table(false)]));
        // No udev in the VM: make /dev/mapper/NAME by hand.
        run(Command::new("dmsetup").args(["mknodes", DM_NAME]));
        let dev = format!("/dev/mapper/{DM_NAME}");
        run(Command::new("mkfs.ext4").args(["-q", "-O", "^has_journal", &dev]));
        run(Command::new("mount").arg(&dev).arg(disk.mount.path()));
        disk
    }

    fn table(&self, failing: bool) -> String {
        let sectors = self.sectors;
        if failing {
            format!("0 {sectors} flakey /dev/ram0 0 0 1 1 error_writes")
        } else {
            format!("0 {sectors} linear /dev/ram0 0")
        }
    }

    /// Switches the table: every write fails with `EIO` (reads still work), or none.
    fn fail_writes(&self, failing: bool) {
        // Without --nolockfs the suspend would freeze the file system, whose flush fails.
        run(Command::new("dmsetup").args(["suspend", "--nolockfs", DM_NAME]));
        run(Command::new("dmsetup").args(["reload", DM_NAME, "--table", &self.table(failing)]));
        run(Command::new("dmsetup").args(["resume", DM_NAME]));
    }
}

impl Drop for FlakeyDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.mount.path())
            .status();
        let _ = Command::new("dmsetup")
            .args(["remove", "--force", DM_NAME])
            .status();
    }
}

#[test]
#[cfg_attr(
    not(feature = "devdax"),
    ignore = "boots the test VM: run with --features devdax (scripts/test does)"
)]
fn a_failing_disk_refuses_creates_and_recovers_by_itself() {
    if !in_dax_vm(
        "a_failing_disk_refuses_creates_and_recovers_by_itself",
        &["--no-dax"],
    ) {
        return;
    }
    let disk = FlakeyDisk::new();
    let state = disk.mount.path().join("state");
    let mut subject = Subject::start(&state);
    subject.drop_caches = true;
    survives(
        subject,
        &state,
        || disk.fail_writes(true),
        || disk.fail_writes(false),
    );
}
