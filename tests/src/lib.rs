//! Test harness: start the real `membroker` binary on a private socket, run the real CLI and
//! helper programs, and look at the broker from outside (/proc).
//!
//! Binaries come from the same target directory as the test executable, so run
//! `cargo build --workspace --bins` first (`scripts/test` does) or set `MEMBROKER_BIN`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use membroker_client::Client;

pub mod meminfo;
pub mod sys;
pub mod systemd;
pub mod tenant;

/// The median of benchmark samples (the mean of the middle two of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Path of a binary built by this workspace (`membroker`, `mb-holder`, …).
pub fn bin_path(name: &str) -> PathBuf {
    if name == "membroker"
        && let Some(path) = std::env::var_os("MEMBROKER_BIN")
    {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/test-HASH or target/<profile>/bench-HASH
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "binary {name} not found next to {}; run `cargo build --workspace --bins` first (scripts/test does)",
        exe.display()
    );
}

/// A library that a workspace package builds (`libmembroker_preload.so`,
/// `libmembroker_ffi.a`), in the target directory of the test executable. Built (again) with
/// cargo when it is missing or older than the files under `sources` (directories relative to
/// the workspace root), so that `cargo test -p membroker-tests` alone never tests a stale one.
pub fn workspace_library(package: &str, file: &str, sources: &[&str]) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/test-HASH
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf();
    let lib = profile_dir.join(file);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let sources: Vec<PathBuf> = sources.iter().map(|s| root.join(s)).collect();
    if !lib.is_file() || newest_file(&sources) > mtime(&lib) {
        let profile = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("profile name");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(root).args(["build", "-p", package]);
        if profile != "debug" {
            cmd.args(["--profile", profile]);
        }
        if let Some(target_dir) = profile_dir.parent() {
            cmd.arg("--target-dir").arg(target_dir);
        }
        let status = cmd
            .status()
            .unwrap_or_else(|e| panic!("run cargo build -p {package}: {e}"));
        assert!(status.success(), "cargo build -p {package} failed");
        // cargo leaves an up-to-date library alone even when a file it does not build from
        // (a README) is newer: mark it checked, or every later call (in a VM, without cargo)
        // would try again.
        if let Ok(file) = std::fs::File::options().append(true).open(&lib) {
            let _ = file.set_modified(std::time::SystemTime::now());
        }
    }
    assert!(lib.is_file(), "{} missing after build", lib.display());
    lib
}

fn mtime(path: &Path) -> std::time::SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(std::time::SystemTime::UNIX_EPOCH)
}

/// The newest modification time of the files under `dirs`.
fn newest_file(dirs: &[PathBuf]) -> std::time::SystemTime {
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    let mut dirs = dirs.to_vec();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                newest = newest.max(mtime(&path));
            }
        }
    }
    newest
}

/// A broker process serving a socket in its own temporary directory; killed on drop.
#[derive(Debug)]
pub struct TestBroker {
    child: Option<Child>,
    dir: tempfile::TempDir,
    socket: PathBuf,
    /// The `membroker` binary it runs, and its CLI.
    binary: PathBuf,
    args: Vec<String>,
}

impl TestBroker {
    /// Starts `membroker serve` with these extra arguments (e.g. `--pool memfd:t:64M`).
    pub fn start(args: &[&str]) -> TestBroker {
        TestBroker::start_binary(bin_path("membroker"), args)
    }

    /// Starts `binary serve` (e.g. the installed `/usr/bin/membroker`) with these arguments.
    pub fn start_binary(binary: PathBuf, args: &[&str]) -> TestBroker {
        let dir = tempfile::Builder::new()
            .prefix("membroker-test")
            .tempdir()
            .expect("tempdir");
        // Reachable by other uids (the socket itself is 0660 and group-controlled).
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod tempdir");
        let socket = dir.path().join("broker.sock");
        let mut broker = TestBroker {
            child: None,
            dir,
            socket,
            binary,
            args: args.iter().map(|s| s.to_string()).collect(),
        };
        broker.spawn();
        broker
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("broker.log")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let mut cmd = Command::new(&self.binary);
        cmd.arg("serve")
            .arg("--socket")
            .arg(&self.socket)
            .args(&self.args);
        if !self.args.iter().any(|a| a == "--state-dir") {
            cmd.arg("--state-dir").arg(self.state_dir());
        }
        let child = cmd
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn membroker serve");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("try_wait"))
            {
                panic!(
                    "broker exited during start ({status}); log:\n{}",
                    self.log()
                );
            }
            if Client::connect(&self.socket).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "broker not ready after 10 s; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The broker's state directory (journal), unless the arguments named another.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("broker running").id()
    }

    /// A new connection.
    pub fn client(&self) -> Client {
        Client::connect(&self.socket)
            .unwrap_or_else(|e| panic!("connect: {e}; log:\n{}", self.log()))
    }

    /// The `membroker` CLI against this broker.
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--socket").arg(&self.socket);
        cmd
    }

    /// Runs the CLI with `args` and returns its output.
    pub fn run_cli(&self, args: &[&str]) -> Output {
        self.cli().args(args).output().expect("run membroker CLI")
    }

    /// Open fds of the broker process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("read /proc/PID/fd")
            .count()
    }

    /// Threads of the broker process.
    pub fn thread_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid()))
            .expect("read /proc/PID/task")
            .count()
    }

    /// The broker's resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits for a clean exit; returns its status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        signal(child.id(), rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("broker ignored SIGTERM for 10 s; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the broker again on the same socket and arguments.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the broker first");
        self.spawn();
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sends `sig` to process `pid`.
pub fn signal(pid: u32, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("pid > 0");
    rustix::process::kill_process(pid, sig).expect("kill");
}

/// Waits until `cond` holds, polling every 10 ms for at most `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running helper program (`mb-holder`) that talks line by line on stdout.
#[derive(Debug)]
pub struct Helper {
    pub child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Helper {
    /// Starts `cmd` with a piped stdout.
    pub fn spawn(mut cmd: Command) -> Helper {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn helper");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Helper { child, stdout }
    }

    /// The next line the helper prints (panics at EOF, with its stderr).
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read helper stdout");
        if line.is_empty() {
            let mut err = String::new();
            if let Some(stderr) = self.child.stderr.as_mut() {
                let _ = stderr.read_to_string(&mut err);
            }
            panic!("helper exited without output; stderr: {err}");
        }
        line.trim_end().to_string()
    }

    /// Writes one line to the helper's stdin and returns the line it answers.
    pub fn send(&mut self, line: &str) -> String {
        let stdin = self.child.stdin.as_mut().expect("helper stdin");
        writeln!(stdin, "{line}").expect("write helper stdin");
        stdin.flush().expect("flush helper stdin");
        self.line()
    }

    /// Says `exit`, waits for the helper to end and returns what it said on stderr (if piped).
    pub fn finish(mut self) -> String {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = writeln!(stdin, "exit");
        }
        let mut err = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            let _ = stderr.read_to_string(&mut err);
        }
        let _ = self.child.wait();
        err
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `nr_hugepages` of one huge page size, restored on drop.
#[derive(Debug)]
pub struct HugePages {
    path: PathBuf,
    before: u64,
}

impl HugePages {
    /// Makes at least `extra` more free pages of `size_kib` available (needs root); fails the
    /// test, with the reason, if the kernel cannot provide them.
    pub fn reserve(size_kib: u64, extra: u64) -> HugePages {
        let dir = PathBuf::from(format!("/sys/kernel/mm/hugepages/hugepages-{size_kib}kB"));
        let read = |file: &str| -> u64 {
            std::fs::read_to_string(dir.join(file))
                .unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display()))
                .trim()
                .parse()
                .expect("number")
        };
        let before = read("nr_hugepages");
        if read("free_hugepages") >= extra {
            // Already there (reserved by whoever runs the tests): nothing to take or give back.
            return HugePages {
                path: dir.join("nr_hugepages"),
                before,
            };
        }
        let want = before + extra;
        std::fs::write(dir.join("nr_hugepages"), want.to_string()).unwrap_or_else(|e| {
            panic!(
                "cannot set {}/nr_hugepages (needs root): {e}",
                dir.display()
            )
        });
        let guard = HugePages {
            path: dir.join("nr_hugepages"),
            before,
        };
        let mut got = read("free_hugepages");
        if got < extra {
            // A busy machine's memory may be too fragmented for a gigantic page: give the
            // kernel back its caches, compact, and ask once more.
            let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
            let _ = std::fs::write("/proc/sys/vm/compact_memory", "1");
            std::fs::write(dir.join("nr_hugepages"), want.to_string())
                .unwrap_or_else(|e| panic!("cannot set {}/nr_hugepages: {e}", dir.display()));
            got = read("free_hugepages");
        }
        assert!(
            got >= extra,
            "asked the kernel for {extra} more {size_kib} KiB huge pages, {got} free (even after \
             dropping caches and compacting memory)"
        );
        guard
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, self.before.to_string());
    }
}

/// Asserts that a CLI run succeeded and returns its stdout.
pub fn stdout_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "command failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

/// Asserts that a CLI run failed and returns its stderr.
pub fn stderr_err(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "command unexpectedly succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr.clone()).expect("utf-8 stderr")
}

/// Deterministic test pattern: byte at `offset` of a buffer seeded with `seed`.
pub fn pattern(seed: u8, offset: usize) -> u8 {
    (offset as u64)
        .wrapping_mul(2654435761)
        .wrapping_add(u64::from(seed))
        .to_le_bytes()[3]
}

/// Like [`in_dax_vm`], in a guest without a dax region but with 3 GiB of RAM, room for a 1 GiB
/// huge page: a freshly booted kernel always has one contiguous, where a busy host's memory may
/// be too fragmented to give one (the test would then fail for the host, not for membroker).
pub fn in_vm_with_ram_for_1g_pages(test: &str) -> bool {
    in_dax_vm(test, &["--no-dax", "--ram", "3G"])
}

/// Runs the calling test inside the device-dax VM (`tests/vm/run-in-vm`, which boots the
/// installed Debian kernel with an emulated dynamic dax region) unless it already runs there.
/// Returns true where the test body should run: inside the VM. On the host it boots the VM,
/// runs this very test binary there with `test` as an exact filter, and fails if it fails.
pub fn in_dax_vm(test: &str, vm_args: &[&str]) -> bool {
    if std::env::var_os("MEMBROKER_IN_VM").is_some() {
        return true;
    }
    let runner = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm/run-in-vm");
    let exe = std::env::current_exe().expect("current_exe");
    // The VM shares the host root read-only but has its own /tmp, and shares the current
    // directory at the same path: run from the workspace so that target/ (wherever the
    // workspace is, /tmp included) is visible inside.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    assert!(
        exe.starts_with(workspace) || !exe.starts_with("/tmp"),
        "the test binary {} is under /tmp but outside the workspace {}: the dax VM cannot see it \
         (use a CARGO_TARGET_DIR inside the workspace)",
        exe.display(),
        workspace.display()
    );
    let status = Command::new(&runner)
        .current_dir(workspace)
        .args(vm_args)
        .args([
            "--env",
            "MEMBROKER_IN_VM=1",
            "--env",
            "RUST_BACKTRACE=1",
            "--env",
            "RUST_LOG",
        ])
        .arg("--")
        .arg(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .status()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", runner.display()));
    assert!(
        status.success(),
        "{test} failed inside the dax VM ({status}); its output is above"
    );
    false
}

/// Physical address behind a virtual address of this process, from /proc/self/pagemap (root).
pub fn physical_address(addr: usize) -> u64 {
    use std::os::unix::fs::FileExt;
    let pagemap = std::fs::File::open("/proc/self/pagemap").expect("open /proc/self/pagemap");
    let mut entry = [0u8; 8];
    pagemap
        .read_exact_at(&mut entry, (addr / 4096 * 8) as u64)
        .expect("read pagemap");
    let entry = u64::from_le_bytes(entry);
    assert!(entry >> 63 == 1, "page at {addr:#x} is not present");
    let pfn = entry & ((1 << 55) - 1);
    assert!(pfn != 0, "pagemap hides PFNs: not root?");
    pfn * 4096 + (addr % 4096) as u64
}

/// Empties dax region 0 (inside the dax VM): unbinds and deletes every device a previous
/// broker left behind, so the next broker can take the region whole.
pub fn reset_dax_region() {
    let devices = Path::new("/sys/bus/dax/devices");
    let region = std::fs::canonicalize(devices.join("dax0.0"))
        .expect("dax0.0")
        .parent()
        .unwrap()
        .join("dax_region");
    let seed = std::fs::read_to_string(region.join("seed"))
        .unwrap_or_default()
        .trim()
        .to_string();
    for entry in std::fs::read_dir(devices)
        .expect("/sys/bus/dax/devices")
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("dax0.") {
            continue;
        }
        if entry.path().join("driver").exists() {
            std::fs::write("/sys/bus/dax/drivers/device_dax/unbind", &name).expect("unbind");
        }
        std::fs::write(entry.path().join("size"), "0").expect("size 0");
        if name != seed && name != "dax0.0" {
            std::fs::write(region.join("delete"), &name).expect("delete");
        }
    }
}

/// Turns namespace0.0 of the dax VM's pmem (`run-in-vm --pmem`) into a devdax namespace with
/// 2 MiB alignment: a static region, `region0`.
pub fn make_pmem_devdax() {
    let out = Command::new("ndctl")
        .args([
            "create-namespace",
            "-f",
            "-e",
            "namespace0.0",
            "-m",
            "devdax",
            "-a",
            "2M",
        ])
        .output()
        .expect("run ndctl");
    assert!(
        out.status.success(),
        "ndctl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// splitmix64: a small seedable generator for seeded test storms (print the seed, replay it).
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-enough in `0..n` (0 when n is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// The bytes the soak test's clients (`mb-soak`) write into a lease named `name`: `len` bytes
/// that differ from lease to lease.
pub fn soak_pattern(name: &str, len: usize) -> Vec<u8> {
    let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut rng = Rng(seed);
    (0..len.div_ceil(8))
        .flat_map(|_| rng.next_u64().to_le_bytes())
        .take(len)
        .collect()
}
