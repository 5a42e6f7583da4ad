//! The preload shim (`libmembroker_preload.so`) from outside: `mb-shim-helper` makes QEMU's
//! guest-RAM system calls under `LD_PRELOAD`, and (feature `qemu`) real Debian QEMU boots a
//! real kernel with a busybox initramfs on broker memory.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use membroker_client::{LeaseInfo, LeaseState};
use membroker_tests::{Helper, TestBroker, bin_path, wait_until};

#[path = "../shim/support.rs"]
mod support;
use support::*;

/// `mb-shim-helper` under the shim, talking to `socket`, with extra environment.
fn shim_helper(socket: &Path, env: &[(&str, &str)]) -> ShimHelper {
    let mut cmd = Command::new(bin_path("mb-shim-helper"));
    cmd.env("LD_PRELOAD", shim_path())
        .env("MEMBROKER_SOCKET", socket)
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut helper = Helper::spawn(cmd);
    let ready = helper.line();
    let pid = ready
        .strip_prefix("ready ")
        .unwrap_or_else(|| panic!("helper said {ready:?}"))
        .parse()
        .unwrap();
    ShimHelper { helper, pid }
}

struct ShimHelper {
    helper: Helper,
    pid: u32,
}

impl ShimHelper {
    /// Sends one command and returns the words after `ok` (panics on `err`).
    fn ok(&mut self, command: &str) -> Vec<String> {
        let reply = self.send(command);
        match reply.strip_prefix("ok") {
            Some(rest) => rest.split_whitespace().map(String::from).collect(),
            None => panic!("helper: {command:?} -> {reply:?}"),
        }
    }

    fn send(&mut self, command: &str) -> String {
        let stdin = self.helper.child.stdin.as_mut().expect("helper stdin");
        writeln!(stdin, "{command}").expect("write helper stdin");
        stdin.flush().unwrap();
        self.helper.line()
    }

    /// `alloc SIZE` → (index, address).
    fn alloc(&mut self, size: u64) -> (usize, usize) {
        let words = self.ok(&format!("alloc {size}"));
        (
            words[0].parse().unwrap(),
            usize::from_str_radix(words[1].trim_start_matches("0x"), 16).unwrap(),
        )
    }

    /// Closes stdin, waits for the exit and returns stderr.
    fn finish(mut self) -> String {
        if let Some(mut stdin) = self.helper.child.stdin.take() {
            let _ = writeln!(stdin, "exit");
        }
        let mut err = String::new();
        if let Some(mut stderr) = self.helper.child.stderr.take() {
            std::io::Read::read_to_string(&mut stderr, &mut err).unwrap();
        }
        let status = self.helper.child.wait().unwrap();
        assert!(
            status.success(),
            "helper exited with {status}; stderr: {err}"
        );
        err
    }
}

/// The line of /proc/PID/maps that starts at `addr`.
fn maps_line(pid: u32, addr: usize) -> Option<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let start = format!("{addr:x}-");
    maps.lines()
        .find(|l| l.starts_with(&start))
        .map(String::from)
}

/// `(start, end, perms, path)` of every mapping of PID overlapping `[addr, addr + len)`.
fn maps_in(pid: u32, addr: usize, len: usize) -> Vec<(usize, usize, String, String)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    maps.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let (s, e) = words.next()?.split_once('-')?;
            let (s, e) = (
                usize::from_str_radix(s, 16).ok()?,
                usize::from_str_radix(e, 16).ok()?,
            );
            let perms = words.next()?.to_string();
            let path = words.nth(3).unwrap_or("").to_string();
            (s < addr + len && addr < e).then_some((s, e, perms, path))
        })
        .collect()
}

fn lease(broker: &TestBroker, name: &str) -> LeaseInfo {
    broker
        .client()
        .stat(name)
        .unwrap_or_else(|e| panic!("stat {name}: {e}; log:\n{}", broker.log()))
}

fn leases(broker: &TestBroker, prefix: &str) -> Vec<LeaseInfo> {
    broker.client().list(prefix).unwrap()
}

/// Bytes of memory the lease's memfd really holds (shmem counts allocated pages in st_blocks).
fn allocated(broker: &TestBroker, name: &str) -> u64 {
    let lease = broker.client().open(name, false).unwrap();
    rustix::fs::fstat(lease.as_fd()).unwrap().st_blocks as u64 * 512
}

fn sum_through_broker(broker: &TestBroker, name: &str, offset: usize, len: usize) -> u64 {
    let lease = broker.client().open(name, false).unwrap();
    let map = lease.map().unwrap();
    let mut buf = vec![0u8; len];
    map.read_at(offset, &mut buf).unwrap();
    buf.iter().map(|&b| u64::from(b)).sum()
}

// ---------------------------------------------------------------------------------------------
// The helper: QEMU's system calls without QEMU

#[test]
fn ram_activation_is_redirected_to_a_lease_in_place() {
    let broker = TestBroker::start(&["--pool", "memfd:t:512M"]);
    let mut h = shim_helper(
        broker.socket(),
        &[
            ("MEMBROKER_LEASE_PREFIX", "tenant/vm1"),
            ("MEMBROKER_PERSIST", "1"),
        ],
    );
    let (i, addr) = h.alloc(128 * MIB);
    let info = lease(&broker, "tenant/vm1/ram0");
    assert_eq!(info.size, 128 * MIB);
    assert!(info.persistent);
    assert_eq!(
        info.holders.iter().map(|h| h.pid).collect::<Vec<_>>(),
        vec![h.pid]
    );

    // The block is the lease's memfd, shared, exactly where QEMU put it, with the guard page
    // (PROT_NONE, private) still after it.
    let line = maps_line(h.pid, addr).expect("mapping at the activation address");
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (s, e) = fields[0].split_once('-').unwrap();
    let (s, e) = (
        usize::from_str_radix(s, 16).unwrap(),
        usize::from_str_radix(e, 16).unwrap(),
    );
    assert_eq!((s, e - s), (addr, 128 * MIB as usize), "{line}");
    assert_eq!(fields[1], "rw-s", "{line}");
    assert!(line.contains("memfd:"), "{line}");
    let guard = maps_line(h.pid, addr + 128 * MIB as usize).expect("guard page");
    assert!(guard.split_whitespace().nth(1) == Some("---p"), "{guard}");

    // What the "guest" writes is in the lease, seen through a second mapping.
    h.ok(&format!("fill {i} {} 4096 7", 3 * MIB));
    assert_eq!(
        sum_through_broker(&broker, "tenant/vm1/ram0", 3 * MIB as usize, 4096),
        7 * 4096
    );

    // Small blocks (vram, ROMs) and plain anonymous memory are not redirected.
    let (_, small) = h.alloc(16 * MIB);
    assert!(
        maps_line(h.pid, small).is_some_and(|l| l.contains("rw-p")),
        "16 MiB block redirected"
    );
    let words = h.ok(&format!("anon {}", 256 * MIB));
    let anon = usize::from_str_radix(words[1].trim_start_matches("0x"), 16).unwrap();
    assert!(
        maps_in(h.pid, anon, 4096).iter().all(|m| m.2 == "rw-p"),
        "plain anonymous mmap redirected"
    );
    assert_eq!(leases(&broker, "tenant/vm1").len(), 1);

    // A second block is ram1; unmapping it releases it (idle, since persistent).
    let (j, _) = h.alloc(64 * MIB);
    assert_eq!(lease(&broker, "tenant/vm1/ram1").size, 64 * MIB);
    assert_eq!(h.ok(&format!("free {j}")), vec!["0"]);
    wait_until(Duration::from_secs(5), "ram1 released", || {
        lease(&broker, "tenant/vm1/ram1").holders.is_empty()
    });
    assert_eq!(lease(&broker, "tenant/vm1/ram1").state, LeaseState::Idle);
    h.finish();
    wait_until(Duration::from_secs(5), "ram0 idle", || {
        lease(&broker, "tenant/vm1/ram0").state == LeaseState::Idle
    });
}

#[test]
fn non_persistent_lease_goes_back_to_the_pool_on_munmap() {
    let broker = TestBroker::start(&["--pool", "memfd:t:256M"]);
    let mut h = shim_helper(broker.socket(), &[]);
    let (i, _) = h.alloc(128 * MIB);
    let uid = rustix::process::geteuid().as_raw();
    let name = format!("uid-{uid}/qemu-{}/ram0", h.pid);
    assert!(!lease(&broker, &name).persistent);
    assert_eq!(h.ok(&format!("free {i}")), vec!["0"]);
    wait_until(Duration::from_secs(5), "lease gone", || {
        leases(&broker, &format!("uid-{uid}/qemu-{}", h.pid)).is_empty()
    });
    // The capacity is back: a second 128 MiB + 128 MiB fits again.
    h.alloc(128 * MIB);
    h.alloc(128 * MIB);
    h.finish();
    wait_until(Duration::from_secs(5), "holder gone", || {
        leases(&broker, "").is_empty()
    });
}

#[test]
fn reattach_by_prefix_finds_the_same_memory() {
    let broker = TestBroker::start(&["--pool", "memfd:t:256M"]);
    let env = [
        ("MEMBROKER_LEASE_PREFIX", "live/vm7"),
        ("MEMBROKER_PERSIST", "1"),
    ];
    let mut first = shim_helper(broker.socket(), &env);
    let (i, _) = first.alloc(64 * MIB);
    first.ok(&format!("fill {i} 0 {} 9", MIB));
    first.finish();
    let mut second = shim_helper(broker.socket(), &env);
    let (j, _) = second.alloc(64 * MIB);
    assert_eq!(
        second.ok(&format!("sum {j} 0 {}", MIB)),
        vec![(9 * MIB).to_string()]
    );
    assert_eq!(leases(&broker, "live/vm7").len(), 1);
    // A different size under the same name is refused, not silently re-created.
    let mut third = shim_helper(
        broker.socket(),
        &[
            ("MEMBROKER_LEASE_PREFIX", "live/vm7"),
            ("MEMBROKER_PERSIST", "1"),
        ],
    );
    let reply = third.send(&format!("alloc {}", 128 * MIB));
    assert!(reply.starts_with("err"), "{reply}");
    second.finish();
    let err = third.finish();
    assert!(err.contains("live/vm7/ram0 is 67108864 bytes"), "{err}");
}

/// On a device-dax lease there is no hole to punch: the shim zeroes discarded ranges itself.
/// Runs inside the dax VM.
#[test]
#[cfg_attr(
    not(feature = "devdax"),
    ignore = "boots the dax VM: run with --features devdax (scripts/test does)"
)]
fn discard_on_a_device_lease_reads_zero() {
    if !membroker_tests::in_dax_vm(
        "discard_on_a_device_lease_reads_zero",
        &["--dax-size", "512M"],
    ) {
        return;
    }
    let broker = TestBroker::start(&["--pool", "devdax:dax:region0:2M"]);
    let mut h = shim_helper(
        broker.socket(),
        &[
            ("MEMBROKER_LEASE_PREFIX", "dd/vm"),
            ("MEMBROKER_PERSIST", "1"),
        ],
    );
    let (i, _) = h.alloc(64 * MIB);
    assert!(
        lease(&broker, "dd/vm/ram0").device.is_some(),
        "the RAM is a device lease"
    );
    h.ok(&format!("fill {i} 0 {} 171", 64 * MIB));
    for (n, advice) in ["dontneed", "remove", "free"].iter().enumerate() {
        let off = (4 + 8 * n as u64) * MIB;
        assert_eq!(
            h.ok(&format!("madvise {i} {off} {} {advice}", 8 * MIB)),
            vec!["0", "0"],
            "{advice}"
        );
    }
    for n in 0..3u64 {
        let off = (4 + 8 * n) * MIB;
        assert_eq!(
            h.ok(&format!("sum {i} {off} {}", 8 * MIB)),
            vec!["0"],
            "piece {n}"
        );
        assert_eq!(
            sum_through_broker(&broker, "dd/vm/ram0", off as usize, 8 * MIB as usize),
            0,
            "piece {n}"
        );
    }
    assert_eq!(
        h.ok(&format!("sum {i} 0 {}", 4 * MIB)),
        vec![(171 * 4 * MIB).to_string()]
    );
    assert_eq!(
        sum_through_broker(&broker, "dd/vm/ram0", 28 * MIB as usize, MIB as usize),
        171 * MIB
    );
    // QEMU refuses device-dax memory under a memfd backend: the shim says why first, and
    // gives the lease back.
    let reply = h.send(&format!("memfd memory-backend-memfd {}", 64 * MIB));
    assert_eq!(reply, format!("err ftruncate errno {}", libc::EINVAL));
    wait_until(Duration::from_secs(5), "ram1 released", || {
        lease(&broker, "dd/vm/ram1").holders.is_empty()
    });
    let err = h.finish();
    assert!(err.contains("dd/vm/ram1 is device-dax memory"), "{err}");
}

#[test]
fn discard_punches_the_lease_and_reads_zero() {
    let broker = TestBroker::start(&["--pool", "memfd:t:256M"]);
    let mut h = shim_helper(
        broker.socket(),
        &[
            ("MEMBROKER_LEASE_PREFIX", "d/vm"),
            ("MEMBROKER_PERSIST", "1"),
        ],
    );
    let (i, _) = h.alloc(64 * MIB);
    h.ok(&format!("fill {i} 0 {} 171", 64 * MIB));
    let before = allocated(&broker, "d/vm/ram0");
    assert!(before >= 64 * MIB, "lease holds {before} bytes");

    // Reading a hole in a memfd allocates a page again, so measure before looking.
    for (n, advice) in ["dontneed", "remove", "free"].iter().enumerate() {
        let off = (4 + 8 * n as u64) * MIB;
        let reply = h.ok(&format!("madvise {i} {off} {} {advice}", 8 * MIB));
        assert_eq!(reply, vec!["0", "0"], "{advice}");
    }
    let after = allocated(&broker, "d/vm/ram0");
    assert!(
        before - after >= 24 * MIB,
        "discarding 24 MiB freed only {} bytes",
        before - after
    );
    for n in 0..3u64 {
        let off = (4 + 8 * n) * MIB;
        // Zero through the helper's own mapping and through a second one.
        assert_eq!(
            h.ok(&format!("sum {i} {off} {}", 8 * MIB)),
            vec!["0"],
            "piece {n}"
        );
        assert_eq!(
            sum_through_broker(&broker, "d/vm/ram0", off as usize, 8 * MIB as usize),
            0,
            "piece {n}"
        );
    }
    // The rest is untouched.
    assert_eq!(
        h.ok(&format!("sum {i} 0 {}", 4 * MIB)),
        vec![(171 * 4 * MIB).to_string()]
    );
    assert_eq!(
        sum_through_broker(&broker, "d/vm/ram0", 28 * MIB as usize, MIB as usize),
        171 * MIB
    );

    // Other advice passes through untouched and succeeds on the shared mapping, as QEMU expects.
    for advice in ["hugepage", "mergeable", "dontfork"] {
        assert_eq!(
            h.ok(&format!("madvise {i} 0 {} {advice}", 64 * MIB))[0],
            "0",
            "{advice}"
        );
    }
    // A discard on ordinary anonymous memory still works (the shim leaves it to the kernel).
    let words = h.ok(&format!("anon {}", 4 * MIB));
    let j = &words[0];
    h.ok(&format!("fill {j} 0 {} 5", 4 * MIB));
    assert_eq!(
        h.ok(&format!("madvise {j} 0 {} dontneed", 4 * MIB)),
        vec!["0", "0"]
    );
    assert_eq!(h.ok(&format!("sum {j} 0 {}", 4 * MIB)), vec!["0"]);
    h.finish();
}

#[test]
fn sigbus_memory_error_is_reported_then_chained_to_the_app_handler() {
    let broker = TestBroker::start(&["--pool", "memfd:t:256M"]);
    let mut h = shim_helper(
        broker.socket(),
        &[
            ("MEMBROKER_LEASE_PREFIX", "p/vm"),
            ("MEMBROKER_PERSIST", "1"),
        ],
    );
    h.ok("handler");
    // The application gets its own handler back, never the shim's.
    assert_eq!(h.ok("query"), vec!["yes"]);
    let (i, addr) = h.alloc(64 * MIB);

    // BUS_MCEERR_AR (4) at +0x20000, lsb 12: the broker records [0x20000, +4096) and the
    // helper's handler runs with the very same siginfo.
    let seen = h.ok(&format!("sigbus {i} {} 4 12", 0x20123));
    assert_eq!(
        seen,
        vec![
            "1".to_string(),
            "7".into(),
            "4".into(),
            format!("{:#x}", addr + 0x20123)
        ]
    );
    wait_until(Duration::from_secs(5), "poison recorded", || {
        !lease(&broker, "p/vm/ram0").poison.is_empty()
    });
    let poison = lease(&broker, "p/vm/ram0").poison;
    assert_eq!(poison.len(), 1, "{poison:?}");
    assert_eq!((poison[0].offset, poison[0].len), (0x20000, 4096));

    // BUS_MCEERR_AO (5) with a 2 MiB lsb.
    let seen = h.ok(&format!("sigbus {i} {} 5 21", 0x40_0000 + 77));
    assert_eq!(seen[2], "5");
    wait_until(Duration::from_secs(5), "second poison recorded", || {
        lease(&broker, "p/vm/ram0").poison.len() == 2
    });
    let poison = lease(&broker, "p/vm/ram0").poison;
    assert!(
        poison
            .iter()
            .any(|p| (p.offset, p.len) == (0x40_0000, 2 * MIB)),
        "{poison:?}"
    );

    // A non-MCE SIGBUS (BUS_ADRERR, 2) reaches the handler untouched and reports nothing.
    let seen = h.ok(&format!("sigbus {i} {} 2 0", 0x1000));
    assert_eq!(
        seen,
        vec![
            "1".to_string(),
            "7".into(),
            "2".into(),
            format!("{:#x}", addr + 0x1000)
        ]
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(lease(&broker, "p/vm/ram0").poison.len(), 2);
    assert_eq!(h.ok("query"), vec!["yes"]);

    // signal(3) gets the previous handler back too, and a plain handler is called with the
    // signal number alone, after the report.
    assert_eq!(h.ok("handler-signal"), vec!["old-was-ours"]);
    let seen = h.ok(&format!("sigbus {i} {} 4 12", 0x60_0000));
    assert_eq!(seen, vec!["1", "7", "-1", "0x0"]);
    // Recorded, and merged with the 2 MiB range it touches.
    wait_until(Duration::from_secs(5), "third poison recorded", || {
        lease(&broker, "p/vm/ram0")
            .poison
            .iter()
            .any(|p| p.offset <= 0x60_0000 && 0x60_0000 < p.offset + p.len)
    });
    h.finish();
}

/// QEMU's `sigbus_reraise`: `SIG_DFL` then the signal again must really kill, even though the
/// shim's handler was installed before.
#[test]
fn sig_dfl_reaches_the_kernel() {
    use std::os::unix::process::ExitStatusExt;
    let broker = TestBroker::start(&["--pool", "memfd:t:256M"]);
    let mut h = shim_helper(broker.socket(), &[]);
    h.ok("handler");
    let (i, _) = h.alloc(64 * MIB);
    h.ok("default");
    assert!(h.ok("query")[0] == "no");
    let stdin = h.helper.child.stdin.as_mut().unwrap();
    writeln!(stdin, "sigbus {i} 4096 4 12").unwrap();
    stdin.flush().unwrap();
    let status = h.helper.child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status}");
}

#[test]
fn poison_remap_gets_lease_memory_back() {
    let broker = TestBroker::start(&["--pool", "memfd:t:256M"]);
    let mut h = shim_helper(
        broker.socket(),
        &[
            ("MEMBROKER_LEASE_PREFIX", "r/vm"),
            ("MEMBROKER_PERSIST", "1"),
        ],
    );
    let (i, addr) = h.alloc(64 * MIB);
    let size = 64 * MIB as usize;
    h.ok(&format!("fill {i} 0 {} 3", 2 * MIB));
    // QEMU's qemu_ram_remap after a reset: MAP_FIXED|MAP_PRIVATE|MAP_ANONYMOUS over one page.
    h.ok(&format!("remap {i} {}", 0x20000));
    let maps = maps_in(h.pid, addr, size);
    assert!(
        maps.iter().all(|m| m.2 == "rw-s" && m.3.contains("memfd:")),
        "private hole in lease memory: {maps:?}"
    );
    // The page is fresh (zero) and it is the lease's: writes show through a second mapping.
    assert_eq!(h.ok(&format!("sum {i} {} 4096", 0x20000)), vec!["0"]);
    h.ok(&format!("fill {i} {} 4096 1", 0x20000));
    assert_eq!(
        sum_through_broker(&broker, "r/vm/ram0", 0x20000, 4096),
        4096
    );
    assert_eq!(
        sum_through_broker(&broker, "r/vm/ram0", 0x21000, 4096),
        3 * 4096
    );
    h.finish();
}

#[test]
fn unreachable_broker_fails_the_mapping_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("absent.sock");
    let mut h = shim_helper(&socket, &[]);
    let reply = h.send(&format!("alloc {}", 128 * MIB));
    assert!(reply.starts_with("err activate"), "{reply}");
    // Memory the shim does not redirect is unaffected.
    h.ok(&format!("anon {}", 128 * MIB));
    assert_one_clear_line(&h.finish(), &socket);
}

/// The helper's stderr says in exactly one line that the broker at `socket` is absent, and how
/// to fall back.
fn assert_one_clear_line(err: &str, socket: &Path) {
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("membroker-preload"))
        .collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains(&socket.display().to_string()), "{err}");
    assert!(lines[0].contains("No such file or directory"), "{err}");
    assert!(lines[0].contains("MEMBROKER_FALLBACK=anon"), "{err}");
}

#[test]
fn unreachable_broker_with_anon_fallback_uses_anonymous_memory() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("absent.sock");
    let mut h = shim_helper(&socket, &[("MEMBROKER_FALLBACK", "anon")]);
    let (i, addr) = h.alloc(128 * MIB);
    assert!(maps_line(h.pid, addr).is_some_and(|l| l.contains("rw-p")));
    h.ok(&format!("fill {i} 0 4096 2"));
    assert_eq!(h.ok(&format!("sum {i} 0 4096")), vec!["8192"]);
    let err = h.finish();
    assert!(err.contains("using anonymous memory"), "{err}");
}

/// `memfd NAME SIZE` → (index, address, what /proc/self/fd says the fd is).
fn memfd_backend(h: &mut ShimHelper, name: &str, size: u64) -> (usize, usize, String) {
    let words = h.ok(&format!("memfd {name} {size}"));
    (
        words[0].parse().unwrap(),
        usize::from_str_radix(words[1].trim_start_matches("0x"), 16).unwrap(),
        words[2].clone(),
    )
}

#[test]
fn memfd_backend_is_a_lease_under_qemus_own_fd() {
    let broker = TestBroker::start(&["--pool", "memfd:t:512M"]);
    let mut h = shim_helper(broker.socket(), &[("MEMBROKER_LEASE_PREFIX", "tenant/vm1")]);
    // QEMU's sequence, seals included, succeeds, and the fd QEMU holds is the lease.
    let (i, addr, link) = memfd_backend(&mut h, "memory-backend-memfd", 128 * MIB);
    assert_eq!(link, "/memfd:membroker:tenant/vm1/ram0");
    let info = lease(&broker, "tenant/vm1/ram0");
    assert_eq!(info.size, 128 * MIB);
    assert_eq!(
        info.holders.iter().map(|h| h.pid).collect::<Vec<_>>(),
        vec![h.pid]
    );
    let line = maps_line(h.pid, addr).expect("mapping at QEMU's address");
    assert!(
        line.contains(" rw-s ") && line.contains("memfd:membroker:tenant/vm1/ram0"),
        "{line}"
    );
    h.ok(&format!("fill {i} {} 4096 9", 5 * MIB));
    assert_eq!(
        sum_through_broker(&broker, "tenant/vm1/ram0", 5 * MIB as usize, 4096),
        9 * 4096
    );
    // The block is the shim's like anonymous RAM: a discard punches the lease.
    assert_eq!(
        h.ok(&format!("madvise {i} {} 4096 dontneed", 5 * MIB)),
        vec!["0", "0"]
    );
    assert_eq!(
        sum_through_broker(&broker, "tenant/vm1/ram0", 5 * MIB as usize, 4096),
        0
    );
    // Anonymous RAM after it takes the next name.
    h.alloc(64 * MIB);
    assert_eq!(lease(&broker, "tenant/vm1/ram1").size, 64 * MIB);

    // Unmapping the block releases the lease (not persistent: it goes).
    assert_eq!(h.ok(&format!("free {i}")), vec!["0"]);
    wait_until(Duration::from_secs(5), "ram0 gone", || {
        broker.client().stat("tenant/vm1/ram0").is_err()
    });
    h.finish();
}

#[test]
fn memfd_backend_bound_to_another_node_is_refused_not_moved() {
    // QEMU holds a memfd backend's fd and hands it to vhost-user back-ends: the shim cannot
    // swap the block to a lease on the node asked for, so a strict binding fails clearly and
    // the lease stays; a preferred one is left as it is.
    let broker = TestBroker::start(&[
        "--pool",
        "memfd:t:512M",
        "--pool",
        "memfd:n0:512M:4K:node=0",
    ]);
    let mut h = shim_helper(broker.socket(), &[("MEMBROKER_LEASE_PREFIX", "tenant/vm1")]);
    let (i, _, _) = memfd_backend(&mut h, "memory-backend-memfd", 128 * MIB);
    assert_eq!(
        h.send(&format!("mbind {i} bind 0")),
        format!("ok -1 {}", libc::EINVAL)
    );
    assert_eq!(h.send(&format!("mbind {i} preferred 0")), "ok 0 0");
    assert_eq!(lease(&broker, "tenant/vm1/ram0").pool, "t");
    let stderr = h.finish();
    assert!(
        stderr.contains("backs a memory-backend-memfd whose fd QEMU holds"),
        "{stderr}"
    );
}

#[test]
fn other_memfds_stay_ordinary_memfds() {
    let broker = TestBroker::start(&["--pool", "memfd:t:512M"]);
    let mut h = shim_helper(broker.socket(), &[]);
    // Another name (QEMU's own "test" probes, vhost logs, a library's buffers).
    let (i, addr, link) = memfd_backend(&mut h, "test", 128 * MIB);
    assert_eq!(link, "/memfd:test");
    assert!(maps_line(h.pid, addr).is_some_and(|l| l.contains("memfd:test")));
    h.ok(&format!("fill {i} 0 4096 3"));
    assert_eq!(h.ok(&format!("sum {i} 0 4096")), vec!["12288"]);
    // A backend smaller than MEMBROKER_MIN_SIZE (64M).
    let (_, _, link) = memfd_backend(&mut h, "memory-backend-memfd", 16 * MIB);
    assert_eq!(link, "/memfd:memory-backend-memfd");
    assert!(leases(&broker, "").is_empty());
    h.finish();
}

#[test]
fn memfd_backend_without_broker_fails_or_keeps_its_memfd() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("absent.sock");
    let mut h = shim_helper(&socket, &[]);
    let reply = h.send(&format!("memfd memory-backend-memfd {}", 128 * MIB));
    assert_eq!(reply, format!("err ftruncate errno {}", libc::ENOENT));
    assert_one_clear_line(&h.finish(), &socket);

    let mut h = shim_helper(&socket, &[("MEMBROKER_FALLBACK", "anon")]);
    let (i, _, link) = memfd_backend(&mut h, "memory-backend-memfd", 128 * MIB);
    assert_eq!(link, "/memfd:memory-backend-memfd");
    h.ok(&format!("fill {i} 0 4096 2"));
    assert_eq!(h.ok(&format!("sum {i} 0 4096")), vec!["8192"]);
    let err = h.finish();
    assert!(err.contains("keeping QEMU's own memfd"), "{err}");
}

#[test]
fn bad_configuration_is_reported_at_the_first_ram_block() {
    let broker = TestBroker::start(&["--pool", "memfd:t:256M"]);
    let mut h = shim_helper(broker.socket(), &[("MEMBROKER_FALLBACK", "sometimes")]);
    let reply = h.send(&format!("alloc {}", 128 * MIB));
    assert!(reply.starts_with("err"), "{reply}");
    let err = h.finish();
    assert!(err.contains("MEMBROKER_FALLBACK=\"sometimes\""), "{err}");
}

#[test]
fn min_size_and_pool_come_from_the_environment() {
    let broker = TestBroker::start(&["--pool", "memfd:a:256M", "--pool", "memfd:b:256M"]);
    let mut h = shim_helper(
        broker.socket(),
        &[
            ("MEMBROKER_MIN_SIZE", "8M"),
            ("MEMBROKER_POOL", "b"),
            ("MEMBROKER_LEASE_PREFIX", "e/vm"),
        ],
    );
    h.alloc(16 * MIB);
    let info = lease(&broker, "e/vm/ram0");
    assert_eq!((info.size, info.pool.as_str()), (16 * MIB, "b"));
    h.finish();
}

#[test]
fn only_the_hooks_are_exported() {
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(shim_path())
        .output()
        .expect("run nm (binutils)");
    assert!(out.status.success());
    let mut names: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).map(String::from))
        .collect();
    names.sort();
    let want = [
        "bsd_signal",
        "fcntl",
        "fcntl64",
        "ftruncate",
        "ftruncate64",
        "madvise",
        "mbind",
        "memfd_create",
        "mmap",
        "mmap64",
        "munmap",
        "sigaction",
        "signal",
        "sysv_signal",
    ];
    assert_eq!(names, want);
}

/// Huge-page leases: with `MEMBROKER_PAGE_SIZE=1G` the shim widens QEMU's reservation so the
/// activation lands 1 GiB-aligned (QEMU itself aligns to 2 MiB only).
fn huge_page_ram(page_kib: u64, page: &str, size: u64) {
    let _pages = membroker_tests::HugePages::reserve(page_kib, size / (page_kib << 10));
    let broker = TestBroker::start(&["--pool", &format!("memfd:h:{size}:{page}")]);
    let env = [
        ("MEMBROKER_PAGE_SIZE", page),
        ("MEMBROKER_LEASE_PREFIX", "huge/vm"),
        ("MEMBROKER_PERSIST", "1"),
    ];
    let mut h = shim_helper(broker.socket(), &env);
    let (i, addr) = h.alloc(size);
    let align = (page_kib << 10) as usize;
    assert_eq!(addr % align, 0, "RAM at {addr:#x} is not {page}-aligned");
    let info = lease(&broker, "huge/vm/ram0");
    assert_eq!((info.size, info.page_size.bytes()), (size, page_kib << 10));
    let line = maps_line(h.pid, addr).expect("mapping at the activation address");
    assert!(line.contains("rw-s"), "{line}");
    h.ok(&format!("fill {i} {} 4096 6", size - 4096));
    assert_eq!(
        sum_through_broker(&broker, "huge/vm/ram0", (size - 4096) as usize, 4096),
        6 * 4096
    );
    h.finish();
    broker.client().remove("huge/vm/ram0").unwrap();
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root: run with --features privileged (scripts/test does)"
)]
fn huge_2m_lease_backs_ram() {
    huge_page_ram(2048, "2M", 64 * MIB);
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root: run with --features privileged (scripts/test does)"
)]
fn huge_1g_lease_backs_ram_at_a_1g_aligned_address() {
    // In a fresh guest kernel: a busy host's memory may be too fragmented for a 1 GiB page.
    if !membroker_tests::in_vm_with_ram_for_1g_pages(
        "huge_1g_lease_backs_ram_at_a_1g_aligned_address",
    ) {
        return;
    }
    huge_page_ram(1 << 20, "1G", 1 << 30);
}

/// A memfd backend with `hugetlb=on` (`MFD_HUGETLB`) gets a lease of huge pages without
/// `MEMBROKER_PAGE_SIZE`, and QEMU aligns its mapping to the lease's page size itself.
#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root: run with --features privileged (scripts/test does)"
)]
fn memfd_backend_with_hugetlb_gets_a_huge_page_lease() {
    let _pages = membroker_tests::HugePages::reserve(2048, 32);
    // The default pool has 4 KiB pages: the backend's flags pick the other one.
    let broker = TestBroker::start(&["--pool", "memfd:small:64M", "--pool", "memfd:h:64M:2M"]);
    let mut h = shim_helper(broker.socket(), &[("MEMBROKER_LEASE_PREFIX", "huge/vfs")]);
    let words = h.ok(&format!("memfd memory-backend-memfd {} hugetlb", 64 * MIB));
    assert_eq!(words[2], "/memfd:membroker:huge/vfs/ram0");
    let info = lease(&broker, "huge/vfs/ram0");
    assert_eq!(
        (info.size, info.page_size.bytes(), info.pool.as_str()),
        (64 * MIB, 2 * MIB, "h")
    );
    let addr = usize::from_str_radix(words[1].trim_start_matches("0x"), 16).unwrap();
    assert_eq!(addr % (2 << 20), 0, "{addr:#x}");
    h.ok(&format!("fill {} {} 4096 4", words[0], 63 * MIB));
    assert_eq!(
        sum_through_broker(&broker, "huge/vfs/ram0", 63 * MIB as usize, 4096),
        4 * 4096
    );
    h.finish();
}

/// Cost of the hook on an mmap it does not redirect: the same helper loop with and without
/// the shim, best of a few rounds. Prints the numbers; fails only on a gross regression.
#[test]
fn hook_overhead_on_unredirected_mmap_is_small() {
    let run = |preload: bool| -> f64 {
        let mut cmd = Command::new(bin_path("mb-shim-helper"));
        cmd.env_remove("LD_PRELOAD")
            .env("MEMBROKER_SOCKET", "/nonexistent");
        if preload {
            cmd.env("LD_PRELOAD", shim_path());
        }
        let mut h = Helper::spawn(cmd);
        let _ = h.line();
        let stdin = h.child.stdin.as_mut().unwrap();
        writeln!(stdin, "bench 20000").unwrap();
        stdin.flush().unwrap();
        let reply = h.line();
        reply.strip_prefix("ok ").unwrap().parse().unwrap()
    };
    let (mut plain, mut hooked) = (f64::MAX, f64::MAX);
    for _ in 0..5 {
        plain = plain.min(run(false));
        hooked = hooked.min(run(true));
    }
    println!(
        "mmap+munmap of 64 KiB: {plain:.0} ns plain, {hooked:.0} ns under the shim ({:+.0} ns)",
        hooked - plain
    );
    // Only a gross regression fails here (a hook that makes a system call of its own, talks to
    // the broker or sleeps costs far more); the number itself comes from the shim benchmark
    // (`tests/shim/bench.rs`), since this test shares the machine with VMs the suite boots.
    assert!(
        hooked - plain < 5000.0,
        "hook adds {:.0} ns",
        hooked - plain
    );
}

// ---------------------------------------------------------------------------------------------
// Real QEMU (feature `qemu`): Debian's qemu-system-x86_64, TCG, the installed kernel and a
// busybox initramfs built here.

mod qemu {
    use super::*;

    /// Pages of the lease that hold nothing but the guest's pattern.
    fn pattern_pages(broker: &TestBroker, name: &str) -> u64 {
        let lease = broker.client().open(name, false).unwrap();
        let map = lease.map().unwrap();
        let mut page = vec![0u8; 4096];
        let mut count = 0;
        for off in (0..map.len()).step_by(4096) {
            map.read_at(off, &mut page).unwrap();
            if page.chunks(16).all(|c| c == PATTERN) {
                count += 1;
            }
        }
        count
    }

    const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

    #[test]
    #[cfg_attr(
        not(feature = "qemu"),
        ignore = "boots QEMU: run with --features qemu (scripts/test does)"
    )]
    fn qemu_guest_ram_comes_from_the_broker() {
        let broker = TestBroker::start(&["--pool", "memfd:t:1G"]);
        let dir = tempfile::tempdir().unwrap();
        let initrd = initramfs(dir.path(), &pattern_init(64));
        let socket = broker.socket().to_str().unwrap();
        let env = [
            ("MEMBROKER_SOCKET", socket),
            ("MEMBROKER_LEASE_PREFIX", "qemu/vm1"),
            ("MEMBROKER_PERSIST", "1"),
        ];
        let mut qemu = Qemu::start(&initrd, "256M", &[], &env, true);
        let took = qemu.wait_for(MARKER, BOOT_TIMEOUT);
        println!("boot to marker under the shim: {took:?}");

        // Exactly one lease, of exactly the guest RAM size, held by QEMU.
        let all = leases(&broker, "qemu/vm1");
        assert_eq!(all.len(), 1, "{all:?}");
        assert_eq!(all[0].name, "qemu/vm1/ram0");
        assert_eq!(all[0].size, 256 * MIB);
        assert!(
            all[0].holders.iter().any(|h| h.pid == qemu.pid()),
            "{:?}",
            all[0].holders
        );

        // QEMU's guest RAM is the lease's memfd, shared.
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", qemu.pid())).unwrap();
        let ram: Vec<&str> = maps
            .lines()
            .filter(|l| l.contains("memfd:membroker:qemu/vm1/ram"))
            .collect();
        assert_eq!(ram.len(), 1, "{maps}");
        let (s, e) = ram[0]
            .split_whitespace()
            .next()
            .unwrap()
            .split_once('-')
            .unwrap();
        let len = u64::from_str_radix(e, 16).unwrap() - u64::from_str_radix(s, 16).unwrap();
        assert_eq!(len, 256 * MIB, "{}", ram[0]);
        assert!(ram[0].contains(" rw-s "), "{}", ram[0]);

        // The guest's pattern is visible through a second mapping taken by the test.
        let pages = pattern_pages(&broker, "qemu/vm1/ram0");
        assert!(
            pages >= 64 * 256 * 9 / 10,
            "only {pages} pattern pages of {} written",
            64 * 256
        );

        // QEMU goes: the persistent lease stays, idle, with the guest's data.
        qemu.kill();
        wait_until(Duration::from_secs(5), "lease idle", || {
            lease(&broker, "qemu/vm1/ram0").state == LeaseState::Idle
        });
        assert!(pattern_pages(&broker, "qemu/vm1/ram0") >= pages);
        broker.client().remove("qemu/vm1/ram0").unwrap();
    }

    #[test]
    #[cfg_attr(
        not(feature = "qemu"),
        ignore = "boots QEMU: run with --features qemu (scripts/test does)"
    )]
    fn qemu_numa_backends_and_hotplugged_dimm_are_each_redirected() {
        let broker = TestBroker::start(&["--pool", "memfd:t:1G"]);
        let dir = tempfile::tempdir().unwrap();
        let initrd = initramfs(dir.path(), &pattern_init(1));
        let qmp_path = dir.path().join("qmp.sock");
        let qmp_arg = format!("unix:{},server=on,wait=off", qmp_path.display());
        let socket = broker.socket().to_str().unwrap();
        let env = [
            ("MEMBROKER_SOCKET", socket),
            ("MEMBROKER_LEASE_PREFIX", "numa/vm"),
        ];
        #[rustfmt::skip]
        let extra = [
            "-object", "memory-backend-ram,id=m0,size=128M",
            "-object", "memory-backend-ram,id=m1,size=128M",
            "-numa", "node,nodeid=0,memdev=m0",
            "-numa", "node,nodeid=1,memdev=m1",
            "-qmp", &qmp_arg,
        ];
        let mut qemu = Qemu::start(&initrd, "256M,slots=2,maxmem=1G", &extra, &env, true);
        qemu.wait_for(MARKER, BOOT_TIMEOUT);
        let sizes = |broker: &TestBroker| -> Vec<(String, u64)> {
            leases(broker, "numa/vm")
                .into_iter()
                .map(|l| (l.name, l.size))
                .collect()
        };
        assert_eq!(
            sizes(&broker),
            vec![
                ("numa/vm/ram0".into(), 128 * MIB),
                ("numa/vm/ram1".into(), 128 * MIB)
            ]
        );

        // Hotplug over QMP: a backend and a pc-dimm on it, at run time.
        let mut qmp = Qmp::connect(&qmp_path);
        let size = 128 * MIB;
        qmp.execute(
            "object-add",
            serde_json::json!({"qom-type": "memory-backend-ram", "id": "hp0", "size": size}),
        );
        qmp.execute(
            "device_add",
            serde_json::json!({"driver": "pc-dimm", "id": "dimm0", "memdev": "hp0"}),
        );
        let hp = lease(&broker, "numa/vm/ram2");
        assert_eq!(hp.size, 128 * MIB);
        assert!(
            hp.holders.iter().any(|h| h.pid == qemu.pid()),
            "{:?}",
            hp.holders
        );
        // A backend deleted again (never plugged) is unmapped by QEMU's RCU thread: released.
        qmp.execute(
            "object-add",
            serde_json::json!({"qom-type": "memory-backend-ram", "id": "hp1", "size": size}),
        );
        assert_eq!(lease(&broker, "numa/vm/ram3").size, 128 * MIB);
        qmp.execute("object-del", serde_json::json!({"id": "hp1"}));
        wait_until(Duration::from_secs(10), "ram3 released", || {
            leases(&broker, "numa/vm")
                .iter()
                .all(|l| l.name != "numa/vm/ram3")
        });
        assert_eq!(sizes(&broker).len(), 3);
        qemu.kill();
        wait_until(Duration::from_secs(5), "leases released", || {
            leases(&broker, "numa/vm").is_empty()
        });
    }

    /// VMM live update: a second QEMU with the same prefix re-attaches to the persistent
    /// lease, and its guest reads what the first guest left in a `memmap=`-reserved range
    /// (guest-physical 200 MiB, reachable through /dev/mem).
    #[test]
    #[cfg_attr(
        not(feature = "qemu"),
        ignore = "boots QEMU: run with --features qemu (scripts/test does)"
    )]
    fn qemu_restart_reattaches_and_the_guest_finds_the_old_memory() {
        const NOTE: &str = "MEMBROKER-FIRST-GUEST-WAS-HERE";
        let broker = TestBroker::start(&["--pool", "memfd:t:1G"]);
        let dir = tempfile::tempdir().unwrap();
        let socket = broker.socket().to_str().unwrap();
        let env = [
            ("MEMBROKER_SOCKET", socket),
            ("MEMBROKER_LEASE_PREFIX", "live/vm"),
            ("MEMBROKER_PERSIST", "1"),
        ];
        let reserve = "memmap=4M$200M";
        let first_dir = dir.path().join("first");
        std::fs::create_dir(&first_dir).unwrap();
        let first = initramfs(
            &first_dir,
            &format!(
                "echo {NOTE} | /bin/busybox dd of=/dev/mem bs=4096 seek=51200 conv=notrunc\n\
                 echo {MARKER}"
            ),
        );
        let mut qemu = Qemu::start_with(&first, "256M", reserve, &[], &env, true);
        qemu.wait_for(MARKER, BOOT_TIMEOUT);
        let created = lease(&broker, "live/vm/ram0").created;
        qemu.kill();
        wait_until(Duration::from_secs(5), "lease idle", || {
            lease(&broker, "live/vm/ram0").state == LeaseState::Idle
        });

        let second_dir = dir.path().join("second");
        std::fs::create_dir(&second_dir).unwrap();
        let second = initramfs(
            &second_dir,
            &format!(
                "echo FOUND:$(/bin/busybox dd if=/dev/mem bs=4096 skip=51200 count=1 2>/dev/null | /bin/busybox head -c {})\n\
                 echo {MARKER}",
                NOTE.len()
            ),
        );
        let mut qemu = Qemu::start_with(&second, "256M", reserve, &[], &env, true);
        qemu.wait_for(MARKER, BOOT_TIMEOUT);
        assert!(
            qemu.seen
                .iter()
                .any(|l| l.contains(&format!("FOUND:{NOTE}"))),
            "second guest did not find the first guest's data:\n{}",
            qemu.seen.join("\n")
        );
        let info = lease(&broker, "live/vm/ram0");
        assert_eq!(
            info.created, created,
            "lease re-created instead of re-attached"
        );
        assert!(info.holders.iter().any(|h| h.pid == qemu.pid()));
        assert_eq!(leases(&broker, "live/vm").len(), 1);
        qemu.kill();
        broker.client().remove("live/vm/ram0").unwrap();
    }

    /// `membroker upgrade` while a guest keeps writing and checking memory: the guest sees no
    /// error, QEMU's lease stays (and QEMU holds it again), new leases can be made after.
    #[test]
    #[cfg_attr(
        not(feature = "qemu"),
        ignore = "boots QEMU: run with --features qemu (scripts/test does)"
    )]
    fn qemu_runs_through_broker_upgrades() {
        let broker = TestBroker::start(&["--pool", "memfd:t:1G"]);
        let dir = tempfile::tempdir().unwrap();
        let socket = broker.socket().to_str().unwrap();
        let env = [
            ("MEMBROKER_SOCKET", socket),
            ("MEMBROKER_LEASE_PREFIX", "up/vm"),
            ("MEMBROKER_PERSIST", "1"),
        ];
        // The guest writes a counter into reserved RAM at 200 MiB, reads it back, and says so.
        let body = "i=0\n\
             while [ $i -lt 100000 ]; do\n\
               echo \"C$i\" | /bin/busybox dd of=/dev/mem bs=4096 seek=51200 conv=notrunc 2>/dev/null\n\
               got=$(/bin/busybox dd if=/dev/mem bs=4096 skip=51200 count=1 2>/dev/null | /bin/busybox head -n 1)\n\
               [ \"$got\" = \"C$i\" ] || echo \"GUEST-MEMORY-ERROR $i $got\"\n\
               [ $((i % 10)) = 0 ] && echo \"TICK $i\"\n\
               i=$((i + 1))\n\
             done";
        let initrd = initramfs(dir.path(), body);
        let mut qemu = Qemu::start_with(&initrd, "256M", "memmap=4M$200M", &[], &env, true);
        qemu.wait_for("TICK 10", BOOT_TIMEOUT);
        let before = lease(&broker, "up/vm/ram0");
        for round in 0..2 {
            let out = broker.run_cli(&["upgrade"]);
            let text = membroker_tests::stdout_ok(&out);
            assert!(text.starts_with("upgraded in "), "round {round}: {text}");
            let seen = qemu.seen.len();
            qemu.wait_for(&format!("TICK {}", 30 + 20 * round), BOOT_TIMEOUT);
            assert!(qemu.seen.len() > seen, "the guest kept running");
        }
        assert!(
            !qemu.seen.iter().any(|l| l.contains("GUEST-MEMORY-ERROR")),
            "the guest saw its memory change:\n{}",
            qemu.seen.join("\n")
        );
        let pid = qemu.pid();
        wait_until(
            Duration::from_secs(20),
            "QEMU to hold its lease again",
            || {
                lease(&broker, "up/vm/ram0")
                    .holders
                    .iter()
                    .any(|h| h.pid == pid)
            },
        );
        let after = lease(&broker, "up/vm/ram0");
        assert_eq!(
            (after.created, after.size, after.extents.clone()),
            (before.created, before.size, before.extents.clone())
        );
        // The counter the guest writes is in the lease the broker still describes.
        let lease_now = broker.client().open("up/vm/ram0", false).unwrap();
        let mut line = [0u8; 16];
        lease_now
            .map()
            .unwrap()
            .read_at(200 << 20, &mut line)
            .unwrap();
        assert_eq!(
            line[0], b'C',
            "guest counter not found in the lease: {line:?}"
        );
        broker
            .client()
            .create(membroker_client::CreateLease::new("up/after", 4 << 20))
            .unwrap();
        qemu.kill();
        broker.client().remove("up/vm/ram0").unwrap();
    }

    /// QEMU discards virtio-mem memory with MADV_DONTNEED (at realize and on every reset),
    /// believing it private anonymous memory: the shim must turn that into freed, zeroed
    /// lease memory (`docs/qemu-guest-ram.md`, "Discard").
    #[test]
    #[cfg_attr(
        not(feature = "qemu"),
        ignore = "boots QEMU: run with --features qemu (scripts/test does)"
    )]
    fn qemu_virtio_mem_discard_frees_and_zeroes_the_lease() {
        let broker = TestBroker::start(&["--pool", "memfd:t:1G"]);
        let dir = tempfile::tempdir().unwrap();
        let initrd = initramfs(dir.path(), &pattern_init(1));
        let qmp_path = dir.path().join("qmp.sock");
        let qmp_arg = format!("unix:{},server=on,wait=off", qmp_path.display());
        let socket = broker.socket().to_str().unwrap();
        let env = [
            ("MEMBROKER_SOCKET", socket),
            ("MEMBROKER_LEASE_PREFIX", "vmem/vm"),
            ("MEMBROKER_PERSIST", "1"),
        ];
        #[rustfmt::skip]
        let extra = [
            "-object", "memory-backend-ram,id=vmem0,size=128M",
            "-device", "virtio-mem-pci,id=vm0,memdev=vmem0,requested-size=0",
            "-qmp", &qmp_arg,
            // Undo -no-reboot: system_reset must reset, not quit.
            "-action", "reboot=reset",
        ];
        let mut qemu = Qemu::start(&initrd, "256M,maxmem=1G", &extra, &env, true);
        qemu.wait_for(MARKER, BOOT_TIMEOUT);
        let vmem = leases(&broker, "vmem/vm")
            .into_iter()
            .find(|l| l.size == 128 * MIB)
            .unwrap_or_else(|| panic!("no 128 MiB lease: {:?}", leases(&broker, "vmem/vm")));
        // Realize discarded the whole block: the lease holds (almost) nothing.
        assert!(
            allocated(&broker, &vmem.name) < 8 * MIB,
            "virtio-mem realize did not free"
        );

        // Stale data written from outside is discarded by QEMU's reset.
        {
            let lease = broker.client().open(&vmem.name, true).unwrap();
            lease
                .map()
                .unwrap()
                .fill(MIB as usize, 4 * MIB as usize, 0x5a)
                .unwrap();
        }
        assert!(allocated(&broker, &vmem.name) >= 4 * MIB);
        let mut qmp = Qmp::connect(&qmp_path);
        qmp.execute("system_reset", serde_json::json!({}));
        wait_until(Duration::from_secs(30), "reset discard", || {
            allocated(&broker, &vmem.name) < 4 * MIB
        });
        assert_eq!(
            sum_through_broker(&broker, &vmem.name, MIB as usize, 4 * MIB as usize),
            0
        );
        qemu.kill();
    }

    /// Kills a daemonized QEMU (not our child) on drop.
    struct Daemon(Option<u32>);

    impl Drop for Daemon {
        fn drop(&mut self) {
            if let Some(pid) = self.0 {
                let _ = rustix::process::kill_process(
                    rustix::process::Pid::from_raw(pid as i32).unwrap(),
                    rustix::process::Signal::KILL,
                );
            }
        }
    }

    /// `-daemonize` forks before any RAM exists; the shim connects lazily, so the lease is
    /// held by the daemon, not by the parent that exited.
    #[test]
    #[cfg_attr(
        not(feature = "qemu"),
        ignore = "boots QEMU: run with --features qemu (scripts/test does)"
    )]
    fn qemu_daemonize_connects_in_the_daemon() {
        let broker = TestBroker::start(&["--pool", "memfd:t:1G"]);
        let dir = tempfile::tempdir().unwrap();
        let initrd = initramfs(dir.path(), &pattern_init(1));
        let (pidfile, console) = (dir.path().join("qemu.pid"), dir.path().join("console.log"));
        let status = Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-m",
                "256M",
                "-nodefaults",
                "-display",
                "none",
                "-daemonize",
            ])
            .arg("-pidfile")
            .arg(&pidfile)
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(kernel())
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", "console=ttyS0 quiet panic=-1"])
            .env("LD_PRELOAD", shim_path())
            .env("MEMBROKER_SOCKET", broker.socket())
            .env("MEMBROKER_LEASE_PREFIX", "daemon/vm")
            .stdin(Stdio::null())
            .status()
            .expect("run qemu-system-x86_64 -daemonize");
        assert!(status.success(), "qemu -daemonize: {status}");
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let _daemon = Daemon(Some(pid));
        wait_until(BOOT_TIMEOUT, "marker in the daemon's console file", || {
            std::fs::read_to_string(&console).is_ok_and(|c| c.contains(MARKER))
        });
        let info = lease(&broker, "daemon/vm/ram0");
        assert_eq!(info.size, 256 * MIB);
        assert_eq!(
            info.holders.iter().map(|h| h.pid).collect::<Vec<_>>(),
            vec![pid]
        );
    }

    /// 1 GiB pages under real QEMU: the shim aligns QEMU's reservation to 1 GiB and the guest's
    /// RAM is the 1 GiB-page lease.
    ///
    /// In a freshly booted guest (a busy host's memory may be too fragmented for a 1 GiB page),
    /// where QEMU runs too, stopped before the guest's first instruction (`-S`): nested TCG
    /// cannot boot Linux in time, and what is checked here happens before the guest runs. At
    /// reset QEMU's `loader` device copies a blob into guest RAM; finding it in the lease shows
    /// the guest's RAM is the lease.
    #[test]
    #[cfg_attr(
        not(all(feature = "qemu", feature = "privileged")),
        ignore = "runs QEMU on 1 GiB huge pages: run as root with --features qemu,privileged"
    )]
    fn qemu_guest_ram_on_1g_pages() {
        if !membroker_tests::in_vm_with_ram_for_1g_pages("qemu::qemu_guest_ram_on_1g_pages") {
            return;
        }
        let _pages = membroker_tests::HugePages::reserve(1 << 20, 1);
        let broker = TestBroker::start(&["--pool", "memfd:h:1G:1G"]);
        let dir = tempfile::tempdir().unwrap();
        let blob: Vec<u8> = (0..64 * 1024)
            .map(|i| membroker_tests::pattern(9, i))
            .collect();
        let path = dir.path().join("blob");
        std::fs::write(&path, &blob).unwrap();
        const AT: u64 = 0x200_0000;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            "tcg",
            "-m",
            "1G",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-serial", "none", "-S", "-device"])
        .arg(format!("loader,file={},addr={AT:#x}", path.display()))
        .env("LD_PRELOAD", shim_path())
        .env("MEMBROKER_SOCKET", broker.socket())
        .env("MEMBROKER_LEASE_PREFIX", "huge/qemu")
        .env("MEMBROKER_PAGE_SIZE", "1G");
        let mut qemu = Qemu::spawn(cmd);
        let mut found = vec![0u8; blob.len()];
        wait_until(
            Duration::from_secs(120),
            "the loader's blob in the lease",
            || {
                let Ok(lease) = broker.client().open("huge/qemu/ram0", false) else {
                    return false;
                };
                let map = lease.map().unwrap();
                map.read_at(AT as usize, &mut found).unwrap();
                found == blob
            },
        );
        let info = lease(&broker, "huge/qemu/ram0");
        assert_eq!((info.size, info.page_size.bytes()), (1 << 30, 1 << 30));
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", qemu.pid())).unwrap();
        let ram = maps
            .lines()
            .find(|l| l.contains("memfd:membroker:huge/qemu/ram"))
            .unwrap_or_else(|| panic!("{maps}"));
        let start = u64::from_str_radix(ram.split('-').next().unwrap(), 16).unwrap();
        assert_eq!(start % (1 << 30), 0, "{ram}");
        qemu.kill();
    }

    #[test]
    #[cfg_attr(
        not(feature = "qemu"),
        ignore = "boots QEMU: run with --features qemu (scripts/test does)"
    )]
    fn qemu_fails_with_a_clear_message_when_the_broker_is_absent() {
        let dir = tempfile::tempdir().unwrap();
        let initrd = initramfs(dir.path(), &pattern_init(1));
        let socket = dir.path().join("absent.sock");
        let env = [("MEMBROKER_SOCKET", socket.to_str().unwrap())];
        let qemu = Qemu::start(&initrd, "256M", &[], &env, true);
        let (ok, stderr) = qemu.wait_exit(Duration::from_secs(60));
        assert!(!ok, "QEMU started without guest RAM; stderr: {stderr}");
        let line = stderr
            .lines()
            .find(|l| l.contains("membroker-preload"))
            .unwrap_or_else(|| panic!("{stderr}"));
        assert!(line.contains(socket.to_str().unwrap()), "{line}");
        assert!(line.contains("No such file or directory"), "{line}");
    }

    #[test]
    #[cfg_attr(
        not(feature = "qemu"),
        ignore = "boots QEMU: run with --features qemu (scripts/test does)"
    )]
    fn qemu_boots_on_anonymous_memory_with_fallback_anon() {
        let dir = tempfile::tempdir().unwrap();
        let initrd = initramfs(dir.path(), &pattern_init(1));
        let socket = dir.path().join("absent.sock");
        let env = [
            ("MEMBROKER_SOCKET", socket.to_str().unwrap()),
            ("MEMBROKER_FALLBACK", "anon"),
        ];
        let mut qemu = Qemu::start(&initrd, "256M", &[], &env, true);
        qemu.wait_for(MARKER, BOOT_TIMEOUT);
        qemu.kill();
        assert!(
            qemu.stderr
                .lock()
                .unwrap()
                .contains("using anonymous memory")
        );
    }

    #[test]
    #[cfg_attr(
        not(feature = "qemu"),
        ignore = "boots QEMU: run with --features qemu (scripts/test does)"
    )]
    fn qemu_mem_path_ram_is_left_alone() {
        let broker = TestBroker::start(&["--pool", "memfd:t:1G"]);
        let dir = tempfile::tempdir().unwrap();
        let initrd = initramfs(dir.path(), &pattern_init(1));
        let socket = broker.socket().to_str().unwrap();
        let env = [("MEMBROKER_SOCKET", socket)];
        let mem_path = format!("{}", dir.path().display());
        let mut qemu = Qemu::start(&initrd, "256M", &["-mem-path", &mem_path], &env, true);
        qemu.wait_for(MARKER, BOOT_TIMEOUT);
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", qemu.pid())).unwrap();
        assert!(!maps.contains("memfd:membroker"), "{maps}");
        qemu.kill();
        assert!(leases(&broker, "").is_empty());
    }

    /// A running virtiofsd, killed on drop.
    struct Virtiofsd(std::process::Child);

    impl Drop for Virtiofsd {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A shared-memory VM as libvirt makes it for virtiofs (`<memoryBacking><source
    /// type='memfd'/><access mode='shared'/>`): its memfd backend is a lease, and the
    /// vhost-user back-end (Debian's QEMU 7.2 virtiofsd) receives and maps that lease.
    #[test]
    #[cfg_attr(
        not(feature = "qemu"),
        ignore = "boots QEMU: run with --features qemu (scripts/test does)"
    )]
    fn qemu_memfd_shared_ram_is_a_lease_that_virtiofsd_maps() {
        const VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";
        let broker = TestBroker::start(&["--pool", "memfd:t:1G"]);
        let dir = tempfile::tempdir().unwrap();
        let share = dir.path().join("share");
        std::fs::create_dir(&share).unwrap();
        let vhost = dir.path().join("vhost-fs.sock");
        let body = format!(
            "/bin/busybox mount -t virtiofs share /mnt || echo mount failed\n\
             echo written-by-the-guest > /mnt/from-guest\n\
             /bin/busybox umount /mnt\n\
             {}",
            pattern_init(16)
        );
        let initrd = initramfs_with_modules(dir.path(), &body, &["virtio_pci", "virtiofs"]);
        let virtiofsd = Virtiofsd(
            Command::new(VIRTIOFSD)
                .arg(format!("--socket-path={}", vhost.display()))
                .args(["-o", &format!("source={}", share.display())])
                .args(["-o", "cache=none", "-o", "sandbox=chroot"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("{VIRTIOFSD}: {e} (install qemu-system-x86)")),
        );
        wait_until(Duration::from_secs(10), "virtiofsd's socket", || {
            vhost.exists()
        });

        let socket = broker.socket().to_str().unwrap();
        let env = [
            ("MEMBROKER_SOCKET", socket),
            ("MEMBROKER_LEASE_PREFIX", "vfs/vm1"),
        ];
        let chardev = format!("socket,id=vfs,path={}", vhost.display());
        let extra = [
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-machine",
            "memory-backend=mem",
            "-chardev",
            &chardev,
            "-device",
            "vhost-user-fs-pci,chardev=vfs,tag=share",
        ];
        let mut qemu = Qemu::start(&initrd, "256M", &extra, &env, true);
        qemu.wait_for(MARKER, BOOT_TIMEOUT);
        assert!(
            !qemu.seen.iter().any(|l| l.contains("failed")),
            "{}",
            qemu.seen.join("\n")
        );

        // The guest wrote through virtiofs: the host reads its file.
        assert_eq!(
            std::fs::read_to_string(share.join("from-guest")).unwrap(),
            "written-by-the-guest\n"
        );

        // Guest RAM is the lease, held by QEMU, mapped shared.
        let info = lease(&broker, "vfs/vm1/ram0");
        assert_eq!(info.size, 256 * MIB);
        assert!(info.holders.iter().any(|h| h.pid == qemu.pid()), "{info:?}");
        assert_eq!(leases(&broker, "vfs/vm1").len(), 1);
        let memfd = "memfd:membroker:vfs/vm1/ram0";
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", qemu.pid())).unwrap();
        let ram = maps
            .lines()
            .find(|l| l.contains(memfd))
            .unwrap_or_else(|| panic!("{maps}"));
        assert!(ram.contains(" rw-s "), "{ram}");
        // The guest's pattern is in the lease, read through the test's own mapping.
        let pages = pattern_pages(&broker, "vfs/vm1/ram0");
        assert!(
            pages >= 16 * 256 * 9 / 10,
            "only {pages} pattern pages of {} written",
            16 * 256
        );

        // The vhost-user back-end received the lease's fd and maps the lease.
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", virtiofsd.0.id())).unwrap();
        assert!(
            maps.contains(memfd),
            "virtiofsd does not map the lease:\n{maps}"
        );
        qemu.kill();
    }
}
