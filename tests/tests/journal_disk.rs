//! The state journal on a disk that fills up or fails under a running broker: a create that
//! cannot be journaled fails and is never acknowledged, reads go on being served, the broker
//! recovers by itself once the disk is back, and a `kill -9` and restart find exactly the
//! acknowledged leases (no "damaged journal" refusal, nothing acknowledged dropped).
//!
//! `tmpfs` (feature `privileged`): a small tmpfs as the state directory, filled with a file.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use membroker_tests::stdout_ok;
use membroker_tests::systemd::Service;

/// A broker (as a systemd service, so its memfd leases survive `kill -9`) whose state
/// directory is `state`, and the leases it acknowledged.
struct Subject {
    svc: Service,
    acknowledged: BTreeSet<String>,
    next: u32,
}

impl Subject {
    fn start(state: &Path) -> Subject {
        let state = state.to_str().unwrap();
        let svc = Service::start(&["--pool", "memfd:t:1G", "--state-dir", state]);
        Subject {
            svc,
            acknowledged: BTreeSet::new(),
            next: 0,
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

/// Fills the file system under `dir` with `dir/filler`, up to the last byte.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
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
    path
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root (mount): run with --features privileged (scripts/test does)"
)]
fn a_full_state_directory_refuses_creates_and_recovers_by_itself() {
    let tmpfs = Tmpfs::mount("256k");
    let state = tmpfs.path().join("state");
    let mut subject = Subject::start(&state);
    for _ in 0..3 {
        subject.create().unwrap();
    }
    // Two rounds: after the first recovery one create, then the crash; after the second two.
    for round in 1..=2 {
        let filler = fill(tmpfs.dir.path());
        let err = subject.create_until_refused();
        assert_explains(&err, &state);
        subject.reads_served();
        // Still refused while the disk is full (recovery needs room for the whole state).
        std::thread::sleep(Duration::from_millis(1100));
        let err = subject.create().unwrap_err();
        assert_explains(&err, &state);
        subject.reads_served();

        std::fs::remove_file(filler).unwrap();
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
