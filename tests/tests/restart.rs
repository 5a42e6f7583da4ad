//! Broker restarts against the real binary: the systemd fd store after `kill -9` (through a
//! harness that plays systemd's side of sd_notify / LISTEN_FDS), a seeded crash torture with
//! several client processes, `membroker upgrade` (and a failed one), and journal damage.
//! None of these needs root: upgrades are allowed through `--admin-group` with our own gid.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use membroker_client::proto::ErrorCode;
use membroker_client::{Client, CreateLease, LeaseInfo};
use membroker_tests::systemd::{Service, inode_of};
use membroker_tests::{Rng, TestBroker, bin_path, pattern, stderr_err, stdout_ok};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// FNV-1a 64, the checksum `mb-storm` records.
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `serve` arguments: one memfd pool, upgrades allowed to our own group.
fn serve_args(pool: &str) -> Vec<String> {
    vec![
        "--pool".into(),
        pool.into(),
        "--admin-group".into(),
        rustix::process::getgid().as_raw().to_string(),
    ]
}

fn start(pool: &str) -> Service {
    let args = serve_args(pool);
    Service::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// What an observer sees of the leases: `ls -l` and `ls --json`.
fn listing(svc: &Service) -> (String, String) {
    (
        stdout_ok(&svc.run_cli(&["ls", "-l"])),
        stdout_ok(&svc.run_cli(&["ls", "--json"])),
    )
}

/// Opens `name` read-only, returns the checksum of its bytes and its memfd's inode; releases.
fn read_back(client: &mut Client, name: &str) -> (u64, (u64, u64)) {
    let lease = client
        .open(name, false)
        .unwrap_or_else(|e| panic!("open {name}: {e}"));
    let map = lease.map().expect("map");
    let mut data = vec![0u8; map.len()];
    map.read_at(0, &mut data).expect("read");
    let inode = inode_of(lease.as_fd());
    drop(map);
    client.release(name).expect("release");
    (checksum(&data), inode)
}

/// The broker's accounting against its leases and the fd store: pool `used` is the sum of the
/// lease sizes, every lease has its own memfd (distinct inodes), the broker has no other
/// memfd open, and the fd store holds exactly those memfds. Returns a list of problems.
fn check_accounting(svc: &Service, client: &mut Client) -> Vec<String> {
    let leases = client.list("").expect("ls");
    let sizes: u64 = leases.iter().map(|l| l.size).sum();
    check_files(svc, client, leases.len() as u64, sizes)
}

/// How [`check_files`] starts the problem "fds in the store that no lease owns".
const STALE: &str = "the fd store keeps fds of no lease (memory nobody can free): ";

/// Names in the fd store whose fd is none of `broker_files`.
fn stale_store_names(svc: &Service, broker_files: &BTreeSet<(u64, u64)>) -> Vec<String> {
    let store = svc.store_inodes();
    let stale = store.iter().filter(|(_, i)| !broker_files.contains(i));
    stale.map(|(n, _)| n.clone()).collect()
}

/// [`check_accounting`] for `count` leases of `sizes` bytes in all (without listing them).
fn check_files(svc: &Service, client: &mut Client, leases: u64, sizes: u64) -> Vec<String> {
    let mut problems = Vec::new();
    let pools = client.df().expect("df");
    let used: u64 = pools.iter().map(|p| p.used).sum();
    let count: u64 = pools.iter().map(|p| p.leases).sum();
    if used != sizes {
        problems.push(format!("df used {used} != sum of lease sizes {sizes}"));
    }
    if count != leases {
        problems.push(format!("df counts {count} leases, ls shows {leases}"));
    }
    let memfds = svc.broker_memfds();
    let distinct: BTreeSet<(u64, u64)> = memfds.iter().copied().collect();
    if distinct.len() != memfds.len() {
        problems.push(format!(
            "the broker has {} memfds open but only {} distinct files",
            memfds.len(),
            distinct.len()
        ));
    }
    if memfds.len() as u64 != count {
        problems.push(format!(
            "the broker has {} memfds open for {count} leases (leak or loss)",
            memfds.len()
        ));
    }
    let store = svc.store_inodes();
    let stored: BTreeSet<(u64, u64)> = store.values().copied().collect();
    let unstored = distinct.difference(&stored).count();
    if unstored > 0 {
        problems.push(format!(
            "{unstored} of the broker's memfds are not in the fd store: a crash would lose them"
        ));
    }
    let stale = stale_store_names(svc, &distinct);
    if !stale.is_empty() {
        problems.push(format!("{STALE}{stale:?}"));
    }
    let errors = svc.notified().errors.clone();
    if !errors.is_empty() {
        problems.push(format!("notify protocol errors: {errors:?}"));
    }
    problems
}

fn assert_accounting(svc: &Service, client: &mut Client) {
    let problems = check_accounting(svc, client);
    assert!(
        problems.is_empty(),
        "{}\nlog:\n{}",
        problems.join("\n"),
        svc.log_tail(30)
    );
}

/// A lease made by a holder: name, mode, content checksum.
struct Made {
    name: String,
    size: u64,
    mode: u32,
    sum: u64,
    inode: (u64, u64),
}

/// Creates persistent leases with distinct sizes, modes and contents, then lets go of them
/// (they stay, idle), keeping their mappings.
fn make_leases(
    client: &mut Client,
    prefix: &str,
    n: usize,
) -> (Vec<Made>, Vec<membroker_client::Mapping>) {
    let (mut made, mut maps) = (Vec::new(), Vec::new());
    for i in 0..n {
        let name = format!("{prefix}/{i}");
        let size = (i as u64 + 1) * 64 * KIB;
        let mode = [0o600, 0o640, 0o644][i % 3];
        let lease = client
            .create(CreateLease::new(&name, size).persistent(true).mode(mode))
            .unwrap();
        let map = lease.map().unwrap();
        let data: Vec<u8> = (0..map.len()).map(|o| pattern(i as u8 + 1, o)).collect();
        map.write_at(0, &data).unwrap();
        made.push(Made {
            inode: inode_of(lease.as_fd()),
            name: name.clone(),
            size,
            mode,
            sum: checksum(&data),
        });
        client.release(&name).unwrap();
        maps.push(map);
    }
    (made, maps)
}

fn assert_leases_back(svc: &Service, made: &[Made]) {
    let mut client = svc.client();
    let uid = rustix::process::getuid().as_raw();
    for m in made {
        let info = client
            .stat(&m.name)
            .unwrap_or_else(|e| panic!("{} after the restart: {e}\n{}", m.name, svc.log_tail(30)));
        assert_eq!(
            (info.size, info.mode, info.uid, info.persistent),
            (m.size, m.mode, uid, true),
            "{}",
            m.name
        );
        let (sum, inode) = read_back(&mut client, &m.name);
        assert_eq!(sum, m.sum, "{}: content changed", m.name);
        assert_eq!(inode, m.inode, "{}: not the same memfd as before", m.name);
    }
}

#[test]
fn fd_store_keeps_memfd_leases_across_kill9() {
    let mut svc = start("memfd:t:64M");
    assert_eq!(svc.ready_count(), 1);
    assert!(
        svc.notified()
            .status
            .as_deref()
            .is_some_and(|s| s.contains("serving 0 leases")),
        "STATUS= after start: {:?}",
        svc.notified().status
    );
    let mut holder = svc.client();
    let (made, maps) = make_leases(&mut holder, "vm1", 4);
    assert_eq!(svc.store_names().len(), 4, "one FDSTORE=1 per lease");
    assert!(
        svc.store_names().iter().all(|n| n.starts_with("lease.")),
        "{:?}",
        svc.store_names()
    );
    let before = listing(&svc);

    svc.kill9();
    svc.restart();
    assert_eq!(svc.ready_count(), 2, "READY=1 again after the restart");
    assert_leases_back(&svc, &made);
    assert_eq!(listing(&svc), before, "ls -l / ls --json after kill -9");
    let mut client = svc.client();
    assert_accounting(&svc, &mut client);
    assert!(!svc.log().contains("lease lost"), "{}", svc.log_tail(30));

    // The holder's old mapping is the lease's memory still.
    maps[0].write_at(0, b"after the crash").unwrap();
    let lease = client.open("vm1/0", false).unwrap();
    let mut word = [0u8; 15];
    lease.map().unwrap().read_at(0, &mut word).unwrap();
    assert_eq!(&word, b"after the crash");
    client.release("vm1/0").unwrap();

    // rm drops the fd from the store (FDSTOREREMOVE=1); a second crash keeps the rest.
    let removed_before = svc.notified().removed;
    stdout_ok(&svc.run_cli(&["rm", "vm1/1"]));
    svc.sync();
    assert_eq!(svc.notified().removed, removed_before + 1);
    assert_eq!(svc.store_names().len(), 3);
    assert_accounting(&svc, &mut client);
    drop(client);
    svc.kill9();
    svc.restart();
    assert!(svc.run_cli(&["stat", "vm1/1"]).status.code() == Some(1));
    let mut made = made;
    made.remove(1);
    made[0].sum = {
        let mut data: Vec<u8> = (0..64 * KIB as usize).map(|o| pattern(1, o)).collect();
        data[..15].copy_from_slice(b"after the crash");
        checksum(&data)
    };
    assert_leases_back(&svc, &made);
    assert_accounting(&svc, &mut svc.client());

    // A clean stop says STOPPING=1.
    assert_eq!(svc.terminate(), Some(0));
    assert_eq!(svc.notified().stopping, 1);
}

#[test]
fn kill9_in_a_burst_of_creates_loses_nothing_acknowledged() {
    let seed = seed();
    println!("burst seed {seed} (replay with RESTART_SEED={seed})");
    let mut rng = Rng(seed);
    let mut svc = start("memfd:t:256M");
    let mut acknowledged: Vec<String> = Vec::new();
    for round in 0..5 {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let attempted = Arc::new(AtomicU64::new(0));
        let creator = {
            let (acked, attempted) = (acked.clone(), attempted.clone());
            let mut client = svc.client();
            client.set_reconnect_timeout(Duration::ZERO);
            std::thread::spawn(move || {
                for i in 0.. {
                    let name = format!("burst{round}/{i}");
                    attempted.store(i + 1, Ordering::SeqCst);
                    match client.create(CreateLease::new(&name, 4 * KIB).persistent(true)) {
                        Ok(_) => acked.lock().unwrap().push(name),
                        Err(e) if e.code().is_none() => return,
                        Err(e) => panic!("create {name}: {e}"),
                    }
                }
            })
        };
        std::thread::sleep(Duration::from_millis(20 + rng.below(120)));
        svc.kill9();
        creator.join().unwrap();
        svc.restart();
        let acked = acked.lock().unwrap().clone();
        assert!(!acked.is_empty(), "round {round}: no create got through");
        acknowledged.extend(acked);
        let mut client = svc.client();
        let missing: Vec<&String> = acknowledged
            .iter()
            .filter(|n| client.stat(n).is_err())
            .collect();
        assert!(
            missing.is_empty(),
            "round {round} (seed {seed}): acknowledged but gone: {missing:?}\n{}",
            svc.log_tail(30)
        );
        // At most the one create in flight may have happened unacknowledged.
        let count: u64 = client.df().unwrap().iter().map(|p| p.leases).sum();
        let in_flight = format!("burst{round}/{}", attempted.load(Ordering::SeqCst) - 1);
        match count - acknowledged.len() as u64 {
            0 => {}
            1 if client.stat(&in_flight).is_ok() => acknowledged.push(in_flight),
            extra => panic!("round {round}: {extra} leases nobody got an answer for"),
        }
        let problems = check_files(
            &svc,
            &mut client,
            acknowledged.len() as u64,
            acknowledged.len() as u64 * 4 * KIB,
        );
        assert!(problems.is_empty(), "round {round}: {problems:?}");
        let attempts = attempted.load(Ordering::SeqCst);
        println!(
            "round {round}: {attempts} creates attempted, {} leases",
            acknowledged.len()
        );
    }
}

#[test]
fn fd_store_is_cleared_of_fds_that_belong_to_no_lease() {
    // A crash between journaling `rm` and sending FDSTOREREMOVE=1 (or a lease whose journal
    // record was dropped as a torn last record) leaves an fd in the store that no lease owns.
    // The broker closes its copy at start; the store must not keep the memory forever.
    let args = serve_args("memfd:t:64M");
    let mut svc = Service::new(
        &bin_path("membroker"),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let stale = rustix::fs::memfd_create("stale", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&stale, 4096).unwrap();
    svc.store_insert("lease.4242", stale);
    svc.restart();
    svc.sync();
    assert!(
        svc.log().contains("belongs to no lease"),
        "{}",
        svc.log_tail(20)
    );
    assert_eq!(
        svc.store_names(),
        Vec::<String>::new(),
        "the broker closed the memfd of no lease but left it in the fd store (no \
         FDSTOREREMOVE=1): its memory stays allocated as long as the service exists"
    );
}

#[test]
fn without_fd_store_kill9_loses_memfd_leases_and_says_so() {
    let mut broker = TestBroker::start(&["--pool", "memfd:t:64M"]);
    stdout_ok(&broker.run_cli(&["create", "gone", "--size", "1M"]));
    broker.kill9();
    broker.restart();
    assert!(
        broker.log().contains("lease lost across the restart"),
        "{}",
        broker.log()
    );
    let ls = stdout_ok(&broker.run_cli(&["ls"]));
    assert_eq!(
        ls, "",
        "a memfd lease without an fd store cannot survive kill -9"
    );
    let used: u64 = broker.client().df().unwrap().iter().map(|p| p.used).sum();
    assert_eq!(used, 0);
    // Journaled as freed: the next start does not lose it a second time.
    broker.kill9();
    broker.restart();
    assert_eq!(
        broker
            .log()
            .matches("lease lost across the restart")
            .count(),
        1,
        "{}",
        broker.log()
    );
}

#[test]
fn removed_but_held_lease_stays_accounted_across_a_restart() {
    // `rm` of a held lease frees the name; the memory goes back when the last holder lets go
    // (like unlinking an open file). After a restart the holder cannot re-attach by name, and
    // the broker must not give the memory back while the holder still maps it: for a
    // device-dax lease that would scrub and re-lease memory a running guest uses.
    let mut args = serve_args("memfd:t:64M");
    args.extend(["--reattach-grace".to_string(), "1".to_string()]);
    let mut svc = Service::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut holder = svc.client();
    let lease = holder
        .create(CreateLease::new("vm/ram0", 4 * MIB).persistent(true))
        .unwrap();
    let map = lease.map().unwrap();
    map.write_at(0, b"guest memory").unwrap();
    stdout_ok(&svc.run_cli(&["rm", "vm/ram0"]));
    let used = |svc: &Service| -> u64 { svc.client().df().unwrap().iter().map(|p| p.used).sum() };
    assert_eq!(used(&svc), 4 * MIB, "held after rm: still in use");
    svc.kill9();
    svc.restart();
    assert_eq!(used(&svc), 4 * MIB, "restored as an unnamed lease");
    // The holder comes back (its next call reconnects) and goes on using the memory.
    holder.df().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    map.write_at(0, b"still in use").unwrap();
    assert_eq!(
        used(&svc),
        4 * MIB,
        "after the re-attach grace the broker gave back the memory of a removed lease its \
         holder still maps (it could not re-attach by name); log:\n{}",
        svc.log_tail(10)
    );
}

#[test]
fn ls_is_the_same_after_every_kind_of_restart() {
    let mut svc = start("memfd:t:64M");
    for (name, size, mode, owner) in [
        ("tenant/a/ram0", "2M", "0640", None),
        ("tenant/a/vars", "128K", "0600", None),
        ("tenant/b/ram0", "1M", "0644", Some("12345")),
    ] {
        let mut args = vec!["create", name, "--size", size, "--mode", mode];
        if let Some(owner) = owner {
            args.extend(["--owner", owner]);
        }
        stdout_ok(&svc.run_cli(&args));
    }
    let before = listing(&svc);
    assert!(before.0.contains("12345"), "{}", before.0);

    svc.kill9();
    svc.restart();
    assert_eq!(listing(&svc), before, "after kill -9 (fd store)");

    assert_eq!(svc.terminate(), Some(0));
    svc.restart();
    assert_eq!(listing(&svc), before, "after SIGTERM and a start");

    let out = svc.run_cli(&["upgrade"]);
    stdout_ok(&out);
    assert_eq!(listing(&svc), before, "after membroker upgrade");
    assert_accounting(&svc, &mut svc.client());
}

#[test]
fn upgrade_keeps_leases_mappings_and_listing_while_a_client_writes() {
    let mut svc = start("memfd:t:64M");
    let mut idle_maker = svc.client();
    let (made, _maps) = make_leases(&mut idle_maker, "idle", 3);
    drop(idle_maker);
    let mut holder = svc.client();
    let lease = holder
        .create(
            CreateLease::new("busy/ram0", 4 * MIB)
                .persistent(true)
                .mode(0o640),
        )
        .unwrap();
    let busy_inode = inode_of(lease.as_fd());
    let map = lease.map().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let offset = (n as usize * 4096) % (4 * MIB as usize);
                map.write_at(0, &n.to_le_bytes()).unwrap();
                map.write_at(offset + 8, &n.to_le_bytes()).unwrap();
                let mut back = [0u8; 8];
                map.read_at(0, &mut back).unwrap();
                assert_eq!(u64::from_le_bytes(back), n, "the mapping lost a write");
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    let before = listing(&svc);
    let pid = svc.pid();
    let instance = holder.server().to_string();
    let stored = svc.store_inodes();
    let memfds: BTreeSet<_> = svc.broker_memfds().into_iter().collect();
    let ready = svc.ready_count();

    let out = svc.run_cli(&["upgrade"]);
    let text = stdout_ok(&out);
    assert!(
        text.contains("upgraded in") && text.contains("leases kept: 4"),
        "{text}"
    );
    assert!(
        text.contains(&format!("pid {pid}")),
        "the new instance: {text}"
    );
    svc.wait_ready(ready);
    assert_eq!(svc.pid(), pid, "upgrade re-executes in place");
    // The holder's next call reconnects and re-attaches; it is a holder again.
    let info = holder.stat("busy/ram0").unwrap();
    assert_ne!(holder.server(), instance, "a new instance answers");
    assert!(text.contains(holder.server()), "{text}");
    assert_eq!(info.holders.len(), 1, "{info:?}");
    std::thread::sleep(Duration::from_millis(20));
    stop.store(true, Ordering::Relaxed);
    let last = writer.join().unwrap();
    assert!(last > 0);

    assert_eq!(listing(&svc), before, "ls -l / ls --json after the upgrade");
    assert_eq!(svc.store_inodes(), stored, "the fd store is untouched");
    let after: BTreeSet<_> = svc.broker_memfds().into_iter().collect();
    assert_eq!(after, memfds, "the same memfds, no leak");
    assert_leases_back(&svc, &made);
    let mut client = svc.client();
    let again = client.open("busy/ram0", false).unwrap();
    assert_eq!(inode_of(again.as_fd()), busy_inode);
    let mut word = [0u8; 8];
    again.map().unwrap().read_at(0, &mut word).unwrap();
    assert_eq!(
        u64::from_le_bytes(word),
        last,
        "the last write is in the lease"
    );
    client.release("busy/ram0").unwrap();
    assert_accounting(&svc, &mut client);
    // And new leases can be made afterwards.
    client
        .create(CreateLease::new("after/upgrade", MIB))
        .unwrap();
}

/// The broker binary copied where the test can break it.
fn private_binary() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("membroker");
    std::fs::copy(bin_path("membroker"), &exe).unwrap();
    (dir, exe)
}

fn assert_still_serving(svc: &Service, pid: u32, instance: &str, before: &(String, String)) {
    assert_eq!(svc.pid(), pid);
    let mut client = svc.client();
    assert_eq!(client.server(), instance, "the same instance serves");
    assert_eq!(
        &listing(svc),
        before,
        "leases untouched by the failed upgrade"
    );
    client
        .create(CreateLease::new("after/failure", MIB))
        .unwrap();
    client.remove("after/failure").unwrap();
    // CLOEXEC is back on every lease fd: nothing leaks into processes the broker starts.
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let link = std::fs::read_link(entry.path()).unwrap_or_default();
        if link.to_string_lossy().starts_with("/memfd:") {
            let fd = entry.file_name().to_string_lossy().into_owned();
            let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
                .unwrap();
            assert_ne!(flags & 0o2000000, 0, "fd {fd} lost O_CLOEXEC: {info}");
        }
    }
}

#[test]
fn failed_upgrade_leaves_the_old_broker_serving() {
    let (_bin_dir, exe) = private_binary();
    let args = serve_args("memfd:t:64M");
    let mut svc = Service::start_with(&exe, &args.iter().map(String::as_str).collect::<Vec<_>>());
    stdout_ok(&svc.run_cli(&["create", "keep/me", "--size", "1M", "--mode", "0640"]));
    let before = listing(&svc);
    let pid = svc.pid();
    let instance = svc.client().server().to_string();

    // Not executable (even root needs an x bit): exec fails with EACCES.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = stderr_err(&svc.run_cli(&["upgrade"]));
    assert_eq!(svc.run_cli(&["upgrade"]).status.code(), Some(1));
    assert!(
        err.contains("upgrade failed") && err.contains("goes on serving"),
        "{err}"
    );
    assert!(svc.is_running());
    assert_still_serving(&svc, pid, &instance, &before);

    // Gone from disk.
    std::fs::remove_file(&exe).unwrap();
    let out = svc.run_cli(&["upgrade"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_err(&out);
    assert!(err.contains("is gone"), "{err}");
    assert_still_serving(&svc, pid, &instance, &before);
    svc.sync();
    assert!(
        svc.notified().errors.is_empty(),
        "{:?}",
        svc.notified().errors
    );
}

#[test]
fn upgrade_to_a_broken_binary_leaves_the_old_broker_serving() {
    // A half-written install: the new file is there, executable, but not a program.
    let (_bin_dir, exe) = private_binary();
    let args = serve_args("memfd:t:64M");
    let mut svc = Service::start_with(&exe, &args.iter().map(String::as_str).collect::<Vec<_>>());
    stdout_ok(&svc.run_cli(&["create", "keep/me", "--size", "1M"]));
    let before = listing(&svc);
    let pid = svc.pid();
    let instance = svc.client().server().to_string();
    let good = std::fs::read(&exe).unwrap();
    std::fs::remove_file(&exe).unwrap();
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o755)
            .open(&exe)
            .unwrap();
        // Truncated: not even the ELF header is whole.
        f.write_all(&good[..40]).unwrap();
    }
    // The CLI would wait 30 s for a broker that never comes back: watch the broker instead.
    let mut cli = svc
        .cli()
        .arg("upgrade")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while cli.try_wait().unwrap().is_none() {
        if !svc.is_running() || Instant::now() > deadline {
            let _ = cli.kill();
            let _ = cli.wait();
            panic!(
                "upgrade to a truncated binary: the broker process did not survive the failed \
                 exec (running: {}); log:\n{}",
                svc.is_running(),
                svc.log_tail(10)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = cli.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_still_serving(&svc, pid, &instance, &before);
}

/// A broker (no fd store, no fsync) with `n` idle persistent 4 KiB leases `many/I`.
fn broker_with_many_leases(n: usize) -> TestBroker {
    membroker_tests::systemd::raise_fd_limit(n as u64 + 4096);
    let gid = rustix::process::getgid().as_raw().to_string();
    let broker = TestBroker::start(&["--pool", "memfd:t:1G", "--no-sync", "--admin-group", &gid]);
    let mut client = broker.client();
    for i in 0..n {
        let name = format!("many/{i}");
        client
            .create(CreateLease::new(&name, 4 * KIB).persistent(true))
            .unwrap();
        client.release(&name).unwrap();
    }
    broker
}

fn lease_count(broker: &TestBroker) -> u64 {
    broker.client().df().unwrap().iter().map(|p| p.leases).sum()
}

#[test]
fn ls_lists_a_thousand_leases_before_and_after_an_upgrade() {
    let broker = broker_with_many_leases(1000);
    let out = broker.run_cli(&["ls"]);
    let before = stdout_ok(&out);
    assert_eq!(before.lines().count(), 1000);
    let long = stdout_ok(&broker.run_cli(&["ls", "-l"]));
    stdout_ok(&broker.run_cli(&["upgrade"]));
    assert_eq!(stdout_ok(&broker.run_cli(&["ls"])), before);
    assert_eq!(stdout_ok(&broker.run_cli(&["ls", "-l"])), long);
}

#[test]
fn upgrade_with_fifteen_thousand_memfd_leases_keeps_them() {
    // The hand-over names every lease fd in one environment variable, and the kernel limits
    // one variable to 128 KiB (MAX_ARG_STRLEN): about 12 000 leases with short ids.
    let mut broker = broker_with_many_leases(15_000);
    let pid = broker.pid();
    let before = broker.client().server().to_string();
    let out = broker.run_cli(&["upgrade"]);
    let problems: Vec<String> = broker
        .log()
        .lines()
        .filter(|l| l.contains("upgrade") || l.contains("ERROR"))
        .map(String::from)
        .collect();
    assert_eq!(broker.pid(), pid);
    let after = broker.client().server().to_string();
    assert_ne!(
        after,
        before,
        "no new instance after the upgrade: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        problems.join("\n")
    );
    assert_eq!(lease_count(&broker), 15_000);
    assert!(
        out.status.success(),
        "the upgrade worked but the CLI failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = broker.terminate();
}

/// Flips one bit inside the JSON of line `index` (0-based) of the journal.
fn flip_in_line(journal: &Path, index: usize) {
    let mut data = std::fs::read(journal).unwrap();
    let start: usize = data
        .split_inclusive(|&b| b == b'\n')
        .take(index)
        .map(|l| l.len())
        .sum();
    data[start + 20] ^= 0x01;
    std::fs::write(journal, data).unwrap();
}

fn journal_lines(journal: &Path) -> usize {
    std::fs::read(journal)
        .unwrap()
        .split_inclusive(|&b| b == b'\n')
        .count()
}

/// A broker with three idle persistent leases, stopped cleanly (the fd store keeps them).
fn stopped_with_three_leases() -> Service {
    let mut svc = start("memfd:t:64M");
    for name in ["j0", "j1", "j2"] {
        stdout_ok(&svc.run_cli(&["create", name, "--size", "256K"]));
    }
    assert_eq!(svc.terminate(), Some(0));
    let journal = svc.state_dir().join("journal");
    assert_eq!(journal_lines(&journal), 3, "one record per lease");
    svc
}

#[test]
fn bit_flip_in_the_last_record_drops_it_with_a_warning() {
    let mut svc = stopped_with_three_leases();
    let journal = svc.state_dir().join("journal");
    flip_in_line(&journal, 2);
    svc.restart();
    let log = svc.log();
    assert!(
        log.contains("dropping a torn or corrupt last record"),
        "{}",
        svc.log_tail(20)
    );
    let ls = stdout_ok(&svc.run_cli(&["ls"]));
    assert_eq!(ls, "j0\nj1\n");

    // A torn last record (a crash mid-write) too.
    stdout_ok(&svc.run_cli(&["create", "j3", "--size", "4K"]));
    assert_eq!(svc.terminate(), Some(0));
    let data = std::fs::read(&journal).unwrap();
    std::fs::write(&journal, &data[..data.len() - 7]).unwrap();
    svc.restart();
    assert_eq!(
        svc.log()
            .matches("dropping a torn or corrupt last record")
            .count(),
        2
    );
    let ls = stdout_ok(&svc.run_cli(&["ls"]));
    assert_eq!(ls, "j0\nj1\n");
    // The dropped leases' memfds are closed by the broker. (That they stay in the fd store is
    // checked by fd_store_is_cleared_of_fds_that_belong_to_no_lease.)
    let problems: Vec<String> = check_accounting(&svc, &mut svc.client())
        .into_iter()
        .filter(|p| !p.starts_with(STALE))
        .collect();
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn damage_in_the_middle_of_the_journal_stops_the_start() {
    let mut svc = stopped_with_three_leases();
    let journal = svc.state_dir().join("journal");
    flip_in_line(&journal, 1);
    let (status, log) = svc.run_to_exit();
    assert!(!status.success(), "{status}: {log}");
    assert!(
        log.contains("is damaged at line 2")
            && log.contains("restore the journal from a backup, or move it aside"),
        "{log}"
    );
    // Doing what the message says: moved aside, the broker starts with no leases.
    std::fs::rename(&journal, svc.state_dir().join("journal.damaged")).unwrap();
    svc.restart();
    assert_eq!(stdout_ok(&svc.run_cli(&["ls"])), "");
}

#[test]
fn journal_of_a_pool_no_longer_configured_is_refused() {
    let mut svc = stopped_with_three_leases();
    let args = serve_args("memfd:other:64M");
    svc.set_args(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let (status, log) = svc.run_to_exit();
    assert!(!status.success(), "{status}: {log}");
    assert!(log.contains("in pool t, which is not configured"), "{log}");
    // With the pool back, everything is there.
    let args = serve_args("memfd:t:64M");
    svc.set_args(&args.iter().map(String::as_str).collect::<Vec<_>>());
    svc.restart();
    assert_eq!(stdout_ok(&svc.run_cli(&["ls"])), "j0\nj1\nj2\n");
}

// ---- crash torture ------------------------------------------------------------------------

/// `RESTART_SEED`, else a fresh one.
fn seed() -> u64 {
    match std::env::var("RESTART_SEED") {
        Ok(s) => s.parse().expect("RESTART_SEED must be a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// Create sent, no answer yet.
    Uncertain,
    /// Acknowledged and not released (non-persistent) or removed since.
    Present,
    /// A release (non-persistent) or rm was sent: it may still be there.
    MaybeGone,
    /// Acknowledged gone.
    Gone,
}

#[derive(Debug, Clone)]
struct Entry {
    known: Known,
    size: u64,
    persistent: bool,
    mode: u32,
    sum: Option<u64>,
}

#[derive(Debug, Default)]
struct Model {
    leases: BTreeMap<String, Entry>,
    paused: usize,
    exited: usize,
    reattached: u64,
    errors: Vec<String>,
}

type SharedModel = Arc<(Mutex<Model>, Condvar)>;

fn apply(model: &mut Model, line: &str) {
    let words: Vec<&str> = line.split(' ').collect();
    fn entry<'a>(model: &'a mut Model, name: &str) -> Option<&'a mut Entry> {
        model.leases.get_mut(name)
    }
    match words[..] {
        ["send-create", name, size, p, mode] => {
            model.leases.insert(
                name.to_string(),
                Entry {
                    known: Known::Uncertain,
                    size: size.parse().unwrap(),
                    persistent: p == "1",
                    mode: u32::from_str_radix(mode, 8).unwrap(),
                    sum: None,
                },
            );
        }
        ["created", name, _, _, _, sum] => {
            if let Some(e) = entry(model, name) {
                e.known = Known::Present;
                e.sum = Some(sum.parse().unwrap());
            }
        }
        ["absent", name] => {
            if let Some(e) = entry(model, name) {
                e.known = Known::Gone;
            }
        }
        ["wrote", name, sum] => {
            if let Some(e) = entry(model, name) {
                e.sum = Some(sum.parse().unwrap());
            }
        }
        ["send-release", name] => {
            if let Some(e) = entry(model, name).filter(|e| !e.persistent) {
                e.known = Known::MaybeGone;
            }
        }
        ["released", name] => {
            if let Some(e) = entry(model, name).filter(|e| !e.persistent) {
                e.known = Known::Gone;
            }
        }
        ["send-rm", name] => {
            if let Some(e) = entry(model, name) {
                e.known = Known::MaybeGone;
            }
        }
        ["removed", name] => {
            if let Some(e) = entry(model, name) {
                e.known = Known::Gone;
            }
        }
        ["reattached", _] => model.reattached += 1,
        ["paused"] => model.paused += 1,
        _ => model.errors.push(format!("storm worker: {line}")),
    }
}

/// One `mb-storm` process and the thread that feeds its events into the model.
struct Worker {
    child: std::process::Child,
    stdin: ChildStdin,
}

impl Worker {
    fn spawn(socket: &Path, prefix: &str, seed: u64, page: u64, model: SharedModel) -> Worker {
        let mut child = Command::new(bin_path("mb-storm"))
            .arg(socket)
            .arg(prefix)
            .arg(seed.to_string())
            .arg(page.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn mb-storm");
        let stdout = child.stdout.take().unwrap();
        let stdin = child.stdin.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let (lock, cond) = &*model;
                apply(&mut lock.lock().unwrap_or_else(|e| e.into_inner()), &line);
                cond.notify_all();
            }
            let (lock, cond) = &*model;
            lock.lock().unwrap_or_else(|e| e.into_inner()).exited += 1;
            cond.notify_all();
        });
        Worker { child, stdin }
    }

    fn tell(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").expect("mb-storm stdin");
        self.stdin.flush().unwrap();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Checks the broker against the model; every worker is paused. Returns the problems.
/// What kind of memory the torture runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Memory {
    /// memfd leases, kept across kill -9 by the fd store.
    Memfd,
    /// device-dax leases (inside the dax VM), kept by the kernel.
    Devices,
}

fn verify(svc: &Service, model: &Model, memory: Memory) -> Vec<String> {
    let mut client = svc.client();
    let mut problems = match memory {
        Memory::Memfd => check_accounting(svc, &mut client),
        Memory::Devices => check_devices(&mut client),
    };
    let leases: BTreeMap<String, LeaseInfo> = client
        .list("")
        .expect("ls")
        .into_iter()
        .map(|l| (l.name.clone(), l))
        .collect();
    let uid = rustix::process::getuid().as_raw();
    for (name, info) in &leases {
        match model.leases.get(name) {
            None => problems.push(format!("{name}: a lease nobody created")),
            Some(e) if e.known == Known::Gone => {
                problems.push(format!("{name}: acknowledged gone, but listed"))
            }
            Some(e) => {
                if (info.size, info.persistent, info.mode, info.uid)
                    != (e.size, e.persistent, e.mode, uid)
                {
                    problems.push(format!("{name}: listed as {info:?}, created as {e:?}"));
                }
            }
        }
    }
    let broker_files: BTreeSet<(u64, u64)> = match memory {
        Memory::Memfd => svc.broker_memfds().into_iter().collect(),
        Memory::Devices => BTreeSet::new(),
    };
    let mut seen = BTreeMap::new();
    for (name, e) in &model.leases {
        if e.known != Known::Present {
            continue;
        }
        if !leases.contains_key(name) {
            problems.push(format!("{name}: acknowledged ({e:?}) but missing"));
            continue;
        }
        let (sum, inode) = read_back(&mut client, name);
        if Some(sum) != e.sum {
            problems.push(format!(
                "{name}: checksum {sum:#x}, its writer recorded {:?}",
                e.sum
            ));
        }
        if memory == Memory::Devices {
            continue; // devices: checked by check_devices
        }
        if !broker_files.contains(&inode) {
            problems.push(format!("{name}: its memfd is not one the broker holds"));
        }
        if let Some(other) = seen.insert(inode, name.clone()) {
            problems.push(format!("{name} and {other} share one memfd"));
        }
    }
    problems
}

#[test]
fn crash_torture_kill9_and_restart_under_a_client_storm() {
    torture(
        "memfd:t:256M",
        4096,
        Memory::Memfd,
        100,
        Duration::from_secs(60),
    );
}

/// The same torture on device-dax leases, inside the dax VM: after every kill -9 and restart
/// the broker reconciles the devices with its journal; no range is leased twice, every lease's
/// device has exactly the lease's ranges, and no device is left over.
#[test]
#[cfg_attr(
    not(feature = "devdax"),
    ignore = "boots the dax VM: run with --features devdax (scripts/test does)"
)]
fn crash_torture_on_device_dax_leases() {
    if !membroker_tests::in_dax_vm(
        "crash_torture_on_device_dax_leases",
        &["--dax-size", "2G", "--ram", "2G"],
    ) {
        return;
    }
    torture(
        "devdax:dax:region0:2M",
        2 << 20,
        Memory::Devices,
        20,
        Duration::from_secs(400),
    );
}

/// Device checks after a restart: waits for scrubs to finish, then compares the leases with
/// sysfs: one device per lease with exactly its ranges, no range in two leases, no other
/// device, and pool accounting equal to the leases.
fn check_devices(client: &mut Client) -> Vec<String> {
    let mut problems = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while client
        .df()
        .expect("df")
        .iter()
        .map(|p| p.scrubbing)
        .sum::<u64>()
        > 0
    {
        if Instant::now() > deadline {
            return vec!["scrubbing did not finish within 120 s".into()];
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let leases = client.list("").expect("ls");
    let used: u64 = client.df().expect("df").iter().map(|p| p.used).sum();
    let sizes: u64 = leases.iter().map(|l| l.size).sum();
    if used != sizes {
        problems.push(format!("df used {used} != sum of lease sizes {sizes}"));
    }
    let sysfs = |p: String| {
        std::fs::read_to_string(&p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let hex = |s: String| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap_or(u64::MAX);
    let mut ranges: Vec<(u64, u64, String)> = Vec::new();
    let mut devices = BTreeSet::new();
    for l in &leases {
        let Some(device) = &l.device else {
            problems.push(format!("{}: no device", l.name));
            continue;
        };
        devices.insert(device.clone());
        let dir = format!("/sys/bus/dax/devices/{device}");
        let mut actual = Vec::new();
        for i in 0.. {
            let m = format!("{dir}/mapping{i}");
            if !Path::new(&m).exists() {
                break;
            }
            let (start, end) = (
                hex(sysfs(format!("{m}/start"))),
                hex(sysfs(format!("{m}/end"))),
            );
            actual.push((start, end + 1 - start));
        }
        let journal: Vec<(u64, u64)> = l.extents.iter().map(|e| (e.start, e.len)).collect();
        if actual != journal {
            problems.push(format!(
                "{}: device {device} has {actual:x?}, the broker says {journal:x?}",
                l.name
            ));
        }
        ranges.extend(
            l.extents
                .iter()
                .map(|e| (e.start, e.start + e.len, l.name.clone())),
        );
    }
    ranges.sort();
    for w in ranges.windows(2) {
        if w[0].1 > w[1].0 {
            problems.push(format!(
                "{} and {} share physical memory at {:#x}",
                w[0].2, w[1].2, w[1].0
            ));
        }
    }
    for entry in std::fs::read_dir("/sys/bus/dax/devices")
        .expect("/sys/bus/dax/devices")
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if sysfs(format!("/sys/bus/dax/devices/{name}/size")) != "0" && !devices.contains(&name) {
            problems.push(format!("device {name} belongs to no lease (leaked)"));
        }
    }
    problems
}

fn torture(pool: &str, page: u64, memory: Memory, default_cycles: usize, limit: Duration) {
    let seed = seed();
    let cycles: usize = std::env::var("RESTART_CYCLES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default_cycles);
    println!(
        "crash torture on {pool}: seed {seed}, {cycles} cycles (replay with RESTART_SEED={seed})"
    );
    let started = Instant::now();
    let mut rng = Rng(seed);
    let mut svc = start(pool);
    let model: SharedModel = Arc::new((Mutex::new(Model::default()), Condvar::new()));
    let mut workers: Vec<Worker> = (0..3)
        .map(|w| {
            Worker::spawn(
                svc.socket(),
                &format!("w{w}"),
                seed ^ (w + 1),
                page,
                model.clone(),
            )
        })
        .collect();
    let fail = |svc: &Service, cycle: usize, problems: &[String]| -> ! {
        panic!(
            "crash torture seed {seed} (replay with RESTART_SEED={seed}), cycle {cycle}:\n{}\n\
             broker log:\n{}",
            problems.join("\n"),
            svc.log_tail(40)
        );
    };
    let mut stale: BTreeMap<String, usize> = BTreeMap::new();
    for cycle in 0..cycles {
        std::thread::sleep(Duration::from_millis(5 + rng.below(40)));
        svc.kill9();
        svc.restart();
        {
            let (lock, _) = &*model;
            lock.lock().unwrap().paused = 0;
        }
        for w in &mut workers {
            w.tell("pause");
        }
        let (lock, cond) = &*model;
        let guard = lock.lock().unwrap();
        let (guard, timeout) = cond
            .wait_timeout_while(guard, Duration::from_secs(60), |m| {
                m.paused < workers.len() && m.exited == 0
            })
            .unwrap();
        if timeout.timed_out() || guard.exited > 0 {
            fail(&svc, cycle, &["a storm worker stopped answering".into()]);
        }
        let mut problems = guard.errors.clone();
        problems.extend(verify(&svc, &guard, memory));
        // A stale fd-store entry stays for good once there; note each one and go on, so that
        // every other invariant is still checked for every cycle. The test fails at the end.
        problems.retain(|p| !p.starts_with(STALE));
        if memory == Memory::Memfd {
            let files: BTreeSet<_> = svc.broker_memfds().into_iter().collect();
            for name in stale_store_names(&svc, &files) {
                stale.entry(name).or_insert(cycle);
            }
        }
        if !problems.is_empty() {
            fail(&svc, cycle, &problems);
        }
        drop(guard);
        for w in &mut workers {
            w.tell("resume");
        }
    }
    let model = model.0.lock().unwrap();
    let present = model
        .leases
        .values()
        .filter(|e| e.known == Known::Present)
        .count();
    println!(
        "{cycles} kill -9 / restart cycles in {:.1} s: {} leases named, {present} present at \
         the end, {} re-attachments",
        started.elapsed().as_secs_f64(),
        model.leases.len(),
        model.reattached
    );
    assert!(
        stale.is_empty(),
        "seed {seed}: after kill -9, the fd store kept memfds that no lease owns (first seen at \
         cycle): {stale:?}"
    );
    assert!(
        started.elapsed() < limit,
        "the torture took {:?}, more than {limit:?}",
        started.elapsed()
    );
}

/// systemd hands the fd store's names back in one environment string, which the kernel caps
/// at 128 KiB: a store whose names outgrew it would leave systemd unable to start the broker.
/// The broker refuses the create that would outgrow it, and everything it kept comes back.
#[test]
fn the_fd_store_is_never_filled_past_what_systemd_can_hand_back() {
    let mut svc = start("memfd:t:256M");
    let mut client = svc.client();
    let mut made = 0usize;
    let refusal = loop {
        let name = format!("crowd/{made}");
        match client.create(CreateLease::new(&name, 4 * KIB).persistent(true)) {
            Ok(lease) => {
                if made == 0 {
                    lease.map().unwrap().write_at(0, b"first").unwrap();
                }
                client.release(&name).unwrap();
                made += 1;
            }
            Err(e) => break e,
        }
        assert!(
            made < 20_000,
            "no create refused; the store would outgrow 128 KiB"
        );
    };
    assert_eq!(refusal.code(), Some(ErrorCode::NoSpace), "{refusal}");
    assert!(refusal.to_string().contains("LISTEN_FDNAMES"), "{refusal}");
    let names: usize = svc.store_names().iter().map(|n| n.len() + 1).sum();
    println!("{made} memfd leases kept; their fd-store names take {names} bytes");
    assert!(
        made > 10_000 && names < 128 << 10,
        "{made} leases, {names} bytes"
    );
    drop(client);

    svc.kill9();
    svc.restart();
    let mut client = svc.client();
    assert_eq!(
        client.list("crowd").unwrap().len(),
        made,
        "{}",
        svc.log_tail(20)
    );
    let lease = client.open("crowd/0", false).unwrap();
    let mut word = [0u8; 5];
    lease.map().unwrap().read_at(0, &mut word).unwrap();
    assert_eq!(&word, b"first");
    client.release("crowd/0").unwrap();
    assert!(!svc.log().contains("lease lost"), "{}", svc.log_tail(30));

    // Room again once a lease goes.
    client.remove("crowd/1").unwrap();
    svc.sync();
    client
        .create(CreateLease::new("crowd/again", 4 * KIB).persistent(true))
        .expect("a create once a lease went");
}
