//! Shared by the shim tests (tests/tests/shim.rs) and the shim benchmark (tests/shim/bench.rs):
//! finding the shim library, building a busybox initramfs, running QEMU and talking QMP.
#![allow(dead_code)]

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

use membroker_tests::{wait_until, workspace_library};

pub const MIB: u64 = 1 << 20;

/// The shim library, built (again) when it is missing or older than its sources, so that
/// `cargo test -p membroker-tests` alone never tests a stale shim.
pub fn shim_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        workspace_library(
            "membroker-preload",
            "libmembroker_preload.so",
            &["shim-preload", "client/src"],
        )
    })
    .clone()
}

/// 16 bytes, so that each 4 KiB page of the guest's file holds exactly 256 copies.
pub const PATTERN: &[u8; 16] = b"MEMBROKER_PTRN1\n";
/// What the guest's /init prints when its work is done.
pub const MARKER: &str = "MEMBROKER-MARKER-OK";

/// The newest installed Debian kernel.
pub fn kernel() -> PathBuf {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .expect("/boot (install linux-image-amd64)")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    kernels
        .pop()
        .expect("no /boot/vmlinuz-* (install linux-image-amd64)")
}

/// The static busybox.
pub fn busybox() -> PathBuf {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        if Path::new(p).is_file() {
            return PathBuf::from(p);
        }
    }
    panic!("busybox not found (install busybox-static)");
}

/// One entry of a `newc` cpio archive.
pub fn cpio_entry(
    out: &mut Vec<u8>,
    ino: u32,
    name: &str,
    mode: u32,
    rdev: (u32, u32),
    data: &[u8],
) {
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// The /init body that writes `mib` MiB of [`PATTERN`] into a file in the guest's
/// RAM-backed root (page cache, so guest RAM) and prints [`MARKER`].
pub fn pattern_init(mib: u64) -> String {
    format!(
        "/bin/busybox yes {} | /bin/busybox head -c {} > /pattern\n\
         echo {MARKER}\n",
        std::str::from_utf8(&PATTERN[..15]).unwrap(),
        mib * MIB
    )
}

/// An initramfs with a static busybox whose /init mounts /proc, runs `body`, then idles.
pub fn initramfs(dir: &Path, body: &str) -> PathBuf {
    initramfs_with_modules(dir, body, &[])
}

/// The installed kernel's `.ko` files that `modules` need, dependencies first.
fn module_files(modules: &[&str]) -> Vec<PathBuf> {
    let kernel = kernel();
    let version = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .expect("vmlinuz-VERSION")
        .to_string();
    let mut files: Vec<PathBuf> = Vec::new();
    for module in modules {
        let out = Command::new("modprobe")
            .args(["-S", &version, "--ignore-install", "--show-depends", module])
            .output()
            .expect("run modprobe (install kmod)");
        assert!(
            out.status.success(),
            "module {module} not found for {version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in String::from_utf8(out.stdout).unwrap().lines() {
            let mut words = line.split_whitespace();
            if words.next() == Some("insmod")
                && let Some(path) = words.next().map(PathBuf::from)
                && !files.contains(&path)
            {
                assert!(
                    path.extension().is_some_and(|e| e == "ko"),
                    "{} is compressed; the test initramfs takes plain .ko files",
                    path.display()
                );
                files.push(path);
            }
        }
    }
    files
}

/// [`initramfs`] whose /init first loads the installed kernel's `modules` (with their
/// dependencies) and has an empty /mnt.
pub fn initramfs_with_modules(dir: &Path, body: &str, modules: &[&str]) -> PathBuf {
    let bb = std::fs::read(busybox()).unwrap();
    let modules = module_files(modules);
    let insmod: String = modules
        .iter()
        .map(|m| {
            let name = m.file_name().unwrap().to_str().unwrap();
            format!("/bin/busybox insmod /lib/modules/{name} || echo insmod {name} failed\n")
        })
        .collect();
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox mount -t proc proc /proc\n\
         {insmod}\
         {body}\n\
         while true; do /bin/busybox sleep 3600; done\n"
    );
    let mut out = Vec::new();
    let (dir_mode, file_mode, chr) = (0o040755, 0o100755, 0o020600);
    cpio_entry(&mut out, 1, "bin", dir_mode, (0, 0), b"");
    cpio_entry(&mut out, 2, "dev", dir_mode, (0, 0), b"");
    cpio_entry(&mut out, 3, "proc", dir_mode, (0, 0), b"");
    cpio_entry(&mut out, 4, "dev/console", chr, (5, 1), b"");
    cpio_entry(&mut out, 5, "dev/mem", chr, (1, 1), b"");
    cpio_entry(&mut out, 6, "bin/busybox", file_mode, (0, 0), &bb);
    cpio_entry(&mut out, 7, "init", file_mode, (0, 0), init.as_bytes());
    let mut ino = 8;
    if !modules.is_empty() {
        cpio_entry(&mut out, ino, "mnt", dir_mode, (0, 0), b"");
        cpio_entry(&mut out, ino + 1, "lib", dir_mode, (0, 0), b"");
        cpio_entry(&mut out, ino + 2, "lib/modules", dir_mode, (0, 0), b"");
        ino += 3;
        for m in &modules {
            let name = format!("lib/modules/{}", m.file_name().unwrap().to_str().unwrap());
            let data = std::fs::read(m).unwrap();
            cpio_entry(&mut out, ino, &name, 0o100644, (0, 0), &data);
            ino += 1;
        }
    }
    cpio_entry(&mut out, ino, "TRAILER!!!", 0, (0, 0), b"");
    let path = dir.join("initramfs.cpio");
    std::fs::write(&path, out).unwrap();
    path
}

/// QEMU's arguments that boot the newest installed Debian kernel with `initrd` under TCG,
/// with `ram` of guest RAM, its serial console on stdio and `append` on the command line.
pub fn boot_args(initrd: &Path, ram: &str, append: &str) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "-accel",
        "tcg",
        "-m",
        ram,
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    args.push("-kernel".into());
    args.push(kernel().into());
    args.push("-initrd".into());
    args.push(initrd.into());
    args.push("-append".into());
    args.push(format!("console=ttyS0 quiet panic=-1 {append}").into());
    args
}

/// A running QEMU whose serial console lines arrive on a channel.
pub struct Qemu {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    /// Console lines so far.
    pub seen: Vec<String>,
    /// Everything QEMU wrote on stderr (complete once it exited and `kill`/`wait_exit` returned).
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

impl Qemu {
    pub fn start(
        initrd: &Path,
        ram: &str,
        extra: &[&str],
        env: &[(&str, &str)],
        shim: bool,
    ) -> Qemu {
        Qemu::start_with(initrd, ram, "", extra, env, shim)
    }

    /// Starts QEMU with `append` added to the kernel command line.
    pub fn start_with(
        initrd: &Path,
        ram: &str,
        append: &str,
        extra: &[&str],
        env: &[(&str, &str)],
        shim: bool,
    ) -> Qemu {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(boot_args(initrd, ram, append))
            .args(extra)
            .env_remove("LD_PRELOAD");
        if shim {
            cmd.env("LD_PRELOAD", shim_path());
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        Qemu::spawn(cmd)
    }

    /// Runs `cmd` (QEMU, or a program that becomes QEMU) with its console on a channel.
    pub fn spawn(mut cmd: Command) -> Qemu {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .expect("spawn qemu-system-x86_64 (install qemu-system-x86)");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        let stderr_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut err_pipe, &mut s);
            sink.lock().unwrap().push_str(&s);
        });
        Qemu {
            child,
            lines,
            seen: Vec::new(),
            stderr,
            stderr_reader: Some(stderr_reader),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a console line containing `marker`; returns the boot time.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let left = timeout.checked_sub(start.elapsed()).unwrap_or_default();
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(marker);
                    self.seen.push(line);
                    if hit {
                        return start.elapsed();
                    }
                }
                Err(_) => {
                    let status = self.child.try_wait().unwrap();
                    std::thread::sleep(Duration::from_millis(100));
                    panic!(
                        "no {marker:?} on the console after {:?} (qemu status {status:?});\nconsole:\n{}\nstderr:\n{}",
                        start.elapsed(),
                        self.seen.join("\n"),
                        self.stderr.lock().unwrap()
                    );
                }
            }
        }
    }

    /// Waits for QEMU to exit by itself; returns (success, stderr).
    pub fn wait_exit(mut self, timeout: Duration) -> (bool, String) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.join_stderr();
                return (status.success(), self.stderr.lock().unwrap().clone());
            }
            assert!(
                start.elapsed() < timeout,
                "qemu still running after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.join_stderr();
    }

    /// Waits until everything QEMU wrote on stderr is in `self.stderr` (QEMU has exited, so the
    /// pipe is at end of file).
    fn join_stderr(&mut self) {
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A QMP connection.
pub struct Qmp {
    reader: BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        let mut stream = None;
        wait_until(Duration::from_secs(30), "QMP socket", || {
            stream = std::os::unix::net::UnixStream::connect(path).ok();
            stream.is_some()
        });
        let writer = stream.unwrap();
        writer
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let reader = BufReader::new(writer.try_clone().unwrap());
        let mut qmp = Qmp { reader, writer };
        let greeting = qmp.read();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        qmp.execute("qmp_capabilities", serde_json::json!({}));
        qmp
    }

    pub fn read(&mut self) -> serde_json::Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read QMP");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP said {line:?}: {e}"))
    }

    /// Runs a command; returns its `return` value (panics on `error`).
    pub fn execute(&mut self, command: &str, arguments: serde_json::Value) -> serde_json::Value {
        let msg = serde_json::json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{msg}").unwrap();
        loop {
            let reply = self.read();
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return ret.clone();
            }
            panic!("QMP {command}: {reply}");
        }
    }
}
