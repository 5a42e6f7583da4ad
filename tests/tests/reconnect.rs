//! Clients and the shim across broker restarts (README.md, "Restarts, upgrades and systemd"):
//! the same `Client` reconnects by itself, re-attaches to its leases, waits a bounded time for
//! a broker that is away and then fails clearly; mappings are never touched.
//!
//! The tests marked "journal" need the broker to bring its leases back after a kill -9 (the
//! journal-backed restart); the others only need a broker that comes back on the same socket.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use membroker_client::codec::{self, MAX_MSG_SIZE};
use membroker_client::proto::{PROTOCOL_MIN, Request, Response};
use membroker_client::{
    Client, CreateLease, Error, ErrorCode, Lease, LeaseInfo, LeaseState, PageSize, transport,
};
use membroker_tests::{Helper, TestBroker, bin_path, pattern, wait_until};

#[path = "../shim/support.rs"]
mod support;

const MIB: u64 = 1 << 20;

fn memfd_broker() -> TestBroker {
    TestBroker::start(&["--pool", "memfd:t:128M"])
}

fn my_pid() -> u32 {
    std::process::id()
}

// ---------------------------------------------------------------------------------------------
// Reconnect mechanics (any broker that comes back on the same socket)

#[test]
fn next_call_after_kill9_and_restart_reconnects_by_itself() {
    let mut broker = memfd_broker();
    let mut client = broker.client();
    client.df().unwrap();
    let fd_before = client.as_fd().as_raw_fd();

    broker.kill9();
    broker.restart();
    let pools = client
        .df()
        .unwrap_or_else(|e| panic!("df after restart: {e}; log:\n{}", broker.log()));
    assert_eq!(pools.len(), 1);
    assert_eq!(client.reconnects(), 1);
    assert!(client.lost_leases().is_empty());
    assert_eq!(
        client.as_fd().as_raw_fd(),
        fd_before,
        "the socket keeps its fd number across a reconnect"
    );
    // And again: every restart is survived, not just the first.
    broker.kill9();
    broker.restart();
    client.list("").unwrap();
    assert_eq!(client.reconnects(), 2);
}

#[test]
fn call_while_broker_is_down_waits_for_it() {
    let mut broker = memfd_broker();
    let mut client = broker.client();
    broker.kill9();
    let start = Instant::now();
    let restarter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        broker.restart();
        broker
    });
    let result = client.df();
    let waited = start.elapsed();
    let broker = restarter.join().unwrap();
    result.unwrap_or_else(|e| panic!("df across a 2 s outage: {e}; log:\n{}", broker.log()));
    assert!(
        waited >= Duration::from_millis(1900),
        "returned after {waited:?}, before the broker was back"
    );
    assert!(
        waited < Duration::from_secs(8),
        "took {waited:?} to notice the broker was back"
    );
    assert_eq!(client.reconnects(), 1);
}

#[test]
fn call_fails_with_unavailable_after_the_timeout() {
    let mut broker = memfd_broker();
    let mut client = broker.client();
    client.set_reconnect_timeout(Duration::from_secs(1));
    broker.kill9();

    let start = Instant::now();
    let err = client.stat("anything").unwrap_err();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_millis(2500),
        "gave up after {took:?}"
    );
    match &err {
        Error::Unavailable { path, waited, last } => {
            assert_eq!(path, broker.socket());
            assert!(*waited >= Duration::from_secs(1), "waited {waited:?}");
            let last = last.as_ref().expect("the last attempt's error");
            assert!(
                matches!(**last, Error::Connect { .. }),
                "last error: {last:?}"
            );
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains(&broker.socket().display().to_string())
            && text.contains("unreachable for 1."),
        "{text}"
    );

    // The client is still usable once a broker is back.
    broker.restart();
    client.df().unwrap();
}

#[test]
fn zero_timeout_turns_reconnection_off() {
    let mut broker = memfd_broker();
    let mut client = broker.client();
    client.set_reconnect_timeout(Duration::ZERO);
    broker.kill9();
    broker.restart();
    let err = client.df().unwrap_err();
    assert!(err.is_connection_lost(), "{err:?}");
    assert_eq!(client.reconnects(), 0);
    // An explicit reconnect is one attempt.
    client.reconnect().unwrap();
    client.df().unwrap();
    assert_eq!(client.reconnects(), 1);
}

#[test]
fn closed_connection_is_seen_without_a_call() {
    let mut broker = memfd_broker();
    let mut client = broker.client();
    assert!(!client.is_closed());
    assert!(!client.reconnect_if_closed().unwrap());
    broker.kill9();
    wait_until(Duration::from_secs(5), "connection seen closed", || {
        client.is_closed()
    });
    broker.restart();
    assert!(client.reconnect_if_closed().unwrap());
    assert!(!client.is_closed());
    assert_eq!(client.reconnects(), 1);
}

#[test]
fn lease_removed_while_away_is_reported_lost_and_its_mapping_stays() {
    let mut broker = memfd_broker();
    let mut client = broker.client();
    let lease = client.create(CreateLease::new("gone", 4 * MIB)).unwrap();
    let map = lease.map().unwrap();
    let data: Vec<u8> = (0..map.len()).map(|i| pattern(7, i)).collect();
    map.write_at(0, &data).unwrap();
    assert_eq!(client.held_leases().collect::<Vec<_>>(), [("gone", true)]);

    broker.kill9();
    broker.restart();
    // With the journal the lease is back, unheld, in its grace period: remove it before the
    // holder reconnects. Without, it is gone already.
    match broker.client().remove("gone") {
        Ok(()) => {}
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}"),
    }

    client.df().unwrap();
    let lost = client.lost_leases();
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(lost[0].name, "gone");
    assert!(lost[0].writable);
    assert_eq!(lost[0].code, ErrorCode::NotFound, "{lost:?}");
    assert_eq!(client.held_leases().count(), 0);
    assert_eq!(client.take_lost_leases().len(), 1);
    assert!(client.lost_leases().is_empty());

    // The client's own fd and mapping were never touched.
    let mut back = vec![0u8; map.len()];
    map.read_at(0, &mut back).unwrap();
    assert!(back == data, "mapping changed across the reconnect");
    map.write_at(0, b"still writable").unwrap();
}

#[test]
fn release_while_broker_was_away_succeeds() {
    let mut broker = memfd_broker();
    let mut client = broker.client();
    let _lease = client
        .create(CreateLease::new("r", 2 * MIB).persistent(true))
        .unwrap();
    broker.kill9();
    broker.restart();
    // The old connection took the holder with it; releasing is done, not an error.
    client.release("r").unwrap();
    assert_eq!(client.held_leases().count(), 0);
    assert!(client.lost_leases().is_empty());
    assert_eq!(client.reconnects(), 1);
}

// ---------------------------------------------------------------------------------------------
// A scripted broker, for what a real one cannot be made to do on cue

/// A fake broker on `path` that serves each connection with the next script, in a thread.
/// One accepted connection's part in a fake broker's script, after the Hello.
type Script = Box<dyn FnOnce(OwnedFd, &mut [u8]) + Send>;

fn fake_broker(path: &Path, scripts: Vec<fn(OwnedFd, &mut [u8])>) -> std::thread::JoinHandle<()> {
    let scripts = scripts.into_iter().map(|s| Box::new(s) as Script).collect();
    fake_broker_with(path, scripts)
}

fn fake_broker_with(path: &Path, scripts: Vec<Script>) -> std::thread::JoinHandle<()> {
    fake_broker_at(path, PROTOCOL_MIN, scripts)
}

/// A fake broker like [`fake_broker_with`] that agrees on protocol `version`.
fn fake_broker_at(path: &Path, version: u16, scripts: Vec<Script>) -> std::thread::JoinHandle<()> {
    let listener = rustix::net::socket_with(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .unwrap();
    rustix::net::bind(&listener, &rustix::net::SocketAddrUnix::new(path).unwrap()).unwrap();
    rustix::net::listen(&listener, 8).unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; MAX_MSG_SIZE + 1];
        for script in scripts {
            let conn = rustix::net::accept(&listener).unwrap();
            let req = recv_request(&conn, &mut buf);
            assert!(matches!(req, Request::Hello { .. }), "{req:?}");
            reply(
                &conn,
                &Response::Hello {
                    version,
                    server: "fake".into(),
                },
                None,
            );
            script(conn, &mut buf);
        }
    })
}

fn recv_request(conn: &OwnedFd, buf: &mut [u8]) -> Request {
    let got = transport::recv(conn, buf).unwrap();
    codec::decode_request(&buf[..got.len]).unwrap().1
}

fn reply(conn: &OwnedFd, resp: &Response, fd: Option<&OwnedFd>) {
    let msg = codec::encode_response(PROTOCOL_MIN, resp).unwrap();
    let fds: Vec<_> = fd.iter().map(|f| f.as_fd()).collect();
    transport::send(conn.as_fd(), &msg, &fds).unwrap();
}

fn sealed_memfd(size: u64) -> OwnedFd {
    use rustix::fs::{MemfdFlags, SealFlags};
    let fd =
        rustix::fs::memfd_create("fake", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
    rustix::fs::ftruncate(&fd, size).unwrap();
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
        .unwrap();
    fd
}

fn fake_info(name: &str, size: u64) -> LeaseInfo {
    LeaseInfo {
        name: name.into(),
        size,
        page_size: PageSize::Base4K,
        pool: "t".into(),
        uid: 0,
        gid: 0,
        mode: 0o600,
        persistent: false,
        state: LeaseState::Held,
        created: 0,
        extents: Vec::new(),
        holders: Vec::new(),
        poison: Vec::new(),
        writable: true,
        device: None,
        label: None,
    }
}

#[test]
fn create_whose_reply_was_lost_is_adopted_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let server = fake_broker(
        &path,
        vec![
            // The broker applies the create, then dies before it replies.
            |conn, buf| {
                let req = recv_request(&conn, buf);
                assert!(matches!(req, Request::Create(_)), "{req:?}");
            },
            // The new broker has the lease: the retried create meets Exists, then the client
            // opens it by name, writable.
            |conn, buf| {
                let req = recv_request(&conn, buf);
                assert!(matches!(req, Request::Create(_)), "{req:?}");
                reply(
                    &conn,
                    &Response::Error {
                        code: ErrorCode::Exists,
                        message: "lease vm/ram0 exists".into(),
                    },
                    None,
                );
                let req = recv_request(&conn, buf);
                assert_eq!(
                    req,
                    Request::Open {
                        name: "vm/ram0".into(),
                        writable: true
                    }
                );
                let fd = sealed_memfd(2 * MIB);
                reply(
                    &conn,
                    &Response::Lease(fake_info("vm/ram0", 2 * MIB)),
                    Some(&fd),
                );
                // Keep the connection until the client is done.
                let _ = transport::recv(&conn, buf);
            },
        ],
    );
    let mut client = Client::connect(&path).unwrap();
    let lease: Lease = client.create(CreateLease::new("vm/ram0", 2 * MIB)).unwrap();
    assert_eq!(lease.size(), 2 * MIB);
    assert_eq!(client.reconnects(), 1);
    assert_eq!(
        client.held_leases().collect::<Vec<_>>(),
        [("vm/ram0", true)]
    );
    drop(client);
    server.join().unwrap();
}

/// A client's create whose reply was lost meets, on its retry, a lease `other` under the same
/// name: the client must not adopt it, and says the name exists.
fn create_retry_meeting(other: LeaseInfo) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let server = fake_broker_with(
        &path,
        vec![
            Box::new(|conn, buf| {
                recv_request(&conn, buf);
            }),
            Box::new(move |conn, buf| {
                recv_request(&conn, buf);
                reply(
                    &conn,
                    &Response::Error {
                        code: ErrorCode::Exists,
                        message: "lease vm/ram0 exists".into(),
                    },
                    None,
                );
                assert!(matches!(recv_request(&conn, buf), Request::Open { .. }));
                let fd = sealed_memfd(other.size);
                reply(&conn, &Response::Lease(other), Some(&fd));
                assert_eq!(
                    recv_request(&conn, buf),
                    Request::Release {
                        name: "vm/ram0".into()
                    }
                );
                reply(&conn, &Response::Ok, None);
                let _ = transport::recv(&conn, buf);
            }),
        ],
    );
    let mut client = Client::connect(&path).unwrap();
    let err = client
        .create(CreateLease::new("vm/ram0", 2 * MIB))
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Exists), "{err:?}");
    assert_eq!(client.held_leases().count(), 0);
    drop(client);
    server.join().unwrap();
}

#[test]
fn create_meeting_a_different_lease_on_retry_reports_exists() {
    // Somebody else's lease of another size: not ours.
    create_retry_meeting(fake_info("vm/ram0", 4 * MIB));
}

#[test]
fn broker_that_accepts_late_is_waited_for() {
    // Like `membroker upgrade`: the listening socket stays, connections queue until the new
    // broker accepts them, and the first attempt's Hello waits for it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let server = fake_broker(
        &path,
        vec![
            |conn, buf| {
                recv_request(&conn, buf);
                // Dies without a reply; the next accept comes 1.5 s later.
                drop(conn);
                std::thread::sleep(Duration::from_millis(1500));
            },
            |conn, buf| {
                assert_eq!(recv_request(&conn, buf), Request::Df);
                reply(&conn, &Response::Df(Vec::new()), None);
                let _ = transport::recv(&conn, buf);
            },
        ],
    );
    let mut client = Client::connect(&path).unwrap();
    let start = Instant::now();
    assert_eq!(client.df().unwrap(), Vec::new());
    assert!(start.elapsed() >= Duration::from_millis(1400));
    assert_eq!(client.reconnects(), 1);
    drop(client);
    server.join().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Leases come back after a restart (the broker's journal and hand-over)
//
// For memfd pools a lease survives `membroker upgrade` (the fds are handed across exec) and,
// under systemd, a kill -9 (the fds wait in the service's fd store). Without a fd store a
// kill -9 loses memfd leases by design, so the kill -9 variants run the broker under the
// harness that plays systemd's side (tests/src/systemd.rs).

/// How a test restarts the broker.
#[derive(Debug, Clone, Copy)]
enum Restart {
    /// `membroker upgrade`: re-exec in place, the socket stays open.
    Upgrade,
    /// kill -9, then start again on the same socket.
    Kill9,
}

/// A broker for a restart test: plain for upgrades, under the systemd harness (its fd store
/// keeps the memfds) for kill -9.
enum AnyBroker {
    Plain(TestBroker),
    Systemd(membroker_tests::systemd::Service),
}

impl AnyBroker {
    fn new(how: Restart) -> AnyBroker {
        let args = ["--pool", "memfd:t:128M"];
        match how {
            Restart::Upgrade => AnyBroker::Plain(TestBroker::start(&args)),
            Restart::Kill9 => AnyBroker::Systemd(membroker_tests::systemd::Service::start(&args)),
        }
    }

    fn client(&self) -> membroker_client::Client {
        match self {
            AnyBroker::Plain(b) => b.client(),
            AnyBroker::Systemd(s) => s.client(),
        }
    }

    fn socket(&self) -> &std::path::Path {
        match self {
            AnyBroker::Plain(b) => b.socket(),
            AnyBroker::Systemd(s) => s.socket(),
        }
    }

    fn log(&self) -> String {
        match self {
            AnyBroker::Plain(b) => b.log(),
            AnyBroker::Systemd(s) => s.log(),
        }
    }
}

fn restart(broker: &mut AnyBroker, how: Restart) {
    match (how, broker) {
        (Restart::Upgrade, AnyBroker::Plain(broker)) => {
            let out = broker.run_cli(&["upgrade"]);
            assert!(
                out.status.success(),
                "membroker upgrade failed: {}; log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                broker.log()
            );
        }
        (Restart::Kill9, AnyBroker::Systemd(service)) => {
            service.kill9();
            std::thread::sleep(Duration::from_millis(300));
            service.restart();
        }
        _ => unreachable!("AnyBroker::new picks the broker for the restart"),
    }
}

/// A client keeps writing through its mapping of a persistent lease while the broker
/// restarts; afterwards the same `Client` works without the caller reconnecting, is a holder
/// again, and the broker's lease holds exactly what was written.
fn holder_keeps_writing_through(how: Restart) {
    let mut broker = AnyBroker::new(how);
    let mut client = broker.client();
    let name = "tenant/vm1/ram0";
    let lease = client
        .create(CreateLease::new(name, 8 * MIB).persistent(true))
        .unwrap();

    // A writer rewrites the whole lease with pattern(round) until told to stop, and says
    // which round it completed last.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, rounds) = (stop.clone(), rounds.clone());
        std::thread::spawn(move || {
            let map = lease.map().unwrap();
            let mut round = 0u8;
            while !stop.load(Ordering::Relaxed) {
                round = round.wrapping_add(1);
                let data: Vec<u8> = (0..map.len()).map(|i| pattern(round, i)).collect();
                map.write_at(0, &data).unwrap();
                rounds.fetch_add(1, Ordering::Relaxed);
            }
            round
        })
    };
    wait_until(Duration::from_secs(10), "writer started", || {
        rounds.load(Ordering::Relaxed) >= 2
    });
    restart(&mut broker, how);
    let after = rounds.load(Ordering::Relaxed);
    wait_until(Duration::from_secs(10), "writer kept writing", || {
        rounds.load(Ordering::Relaxed) >= after + 2
    });

    // The same Client object, no reconnect by the caller.
    let info = client
        .stat(name)
        .unwrap_or_else(|e| panic!("stat after restart: {e}; log:\n{}", broker.log()));
    assert_eq!(client.reconnects(), 1);
    assert!(
        client.lost_leases().is_empty(),
        "{:?}",
        client.lost_leases()
    );
    assert!(
        info.holders.iter().any(|h| h.pid == my_pid()),
        "not a holder again: {info:?}"
    );
    assert_eq!(info.state, LeaseState::Held);
    assert_eq!(info.size, 8 * MIB);

    stop.store(true, Ordering::Relaxed);
    let last = writer.join().unwrap();
    // What the broker hands out is the memory the writer wrote through its mapping.
    let again = broker.client().open(name, false).unwrap();
    let map = again.map().unwrap();
    let mut back = vec![0u8; map.len()];
    map.read_at(0, &mut back).unwrap();
    let want: Vec<u8> = (0..map.len()).map(|i| pattern(last, i)).collect();
    assert!(
        back == want,
        "lease bytes differ from the last round written"
    );
}

#[test]
fn holder_keeps_writing_through_an_upgrade() {
    holder_keeps_writing_through(Restart::Upgrade);
}

#[test]
fn holder_keeps_writing_through_kill9_and_restart() {
    holder_keeps_writing_through(Restart::Kill9);
}

/// A non-persistent lease is kept for the re-attach grace period after a restart, and the
/// holder's next call re-attaches it.
fn non_persistent_lease_is_reattached(how: Restart) {
    let mut broker = AnyBroker::new(how);
    let mut client = broker.client();
    let lease = client.create(CreateLease::new("np", 4 * MIB)).unwrap();
    let map = lease.map().unwrap();
    map.fill(0, map.len(), 0x5a).unwrap();

    restart(&mut broker, how);
    let info = client
        .stat("np")
        .unwrap_or_else(|e| panic!("stat after restart: {e}; log:\n{}", broker.log()));
    assert!(
        client.lost_leases().is_empty(),
        "{:?}",
        client.lost_leases()
    );
    assert!(
        info.holders.iter().any(|h| h.pid == my_pid()),
        "not a holder again: {info:?}"
    );
    let again = broker.client().open("np", false).unwrap();
    assert_eq!(again.map().unwrap().load(4096).unwrap(), 0x5a);
}

#[test]
fn non_persistent_lease_is_reattached_after_an_upgrade() {
    non_persistent_lease_is_reattached(Restart::Upgrade);
}

#[test]
fn non_persistent_lease_is_reattached_after_kill9_and_restart() {
    non_persistent_lease_is_reattached(Restart::Kill9);
}

#[test]
fn calls_during_an_upgrade_all_succeed() {
    let broker = memfd_broker();
    let mut client = broker.client();
    let _lease = client
        .create(CreateLease::new("w", 2 * MIB).persistent(true))
        .unwrap();
    let cli = broker.cli();
    let upgrader = std::thread::spawn(move || {
        let mut cli = cli;
        cli.arg("upgrade").output().expect("membroker upgrade")
    });
    let mut calls = 0;
    let mut slowest = Duration::ZERO;
    while !upgrader.is_finished() || calls < 10 {
        let start = Instant::now();
        let info = client
            .stat("w")
            .unwrap_or_else(|e| panic!("stat during upgrade: {e}; log:\n{}", broker.log()));
        slowest = slowest.max(start.elapsed());
        assert_eq!(info.name, "w");
        calls += 1;
    }
    let out = upgrader.join().unwrap();
    assert!(
        out.status.success(),
        "upgrade: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = client.stat("w").unwrap();
    assert!(info.holders.iter().any(|h| h.pid == my_pid()), "{info:?}");
    assert!(
        client.lost_leases().is_empty(),
        "{:?}",
        client.lost_leases()
    );
    assert_eq!(client.reconnects(), 1);
    eprintln!("{calls} calls during the upgrade, slowest {slowest:?}");
}

/// The shim's watcher thread re-attaches QEMU's leases and re-arms the poison-report socket
/// after a broker restart, without any hook call from the application.
fn shim_reattaches_and_rearms_poison_reports(how: Restart) {
    let mut broker = AnyBroker::new(how);
    let mut cmd = Command::new(bin_path("mb-shim-helper"));
    cmd.env("LD_PRELOAD", support::shim_path())
        .env("MEMBROKER_SOCKET", broker.socket())
        .env("MEMBROKER_LEASE_PREFIX", "p/vm")
        .env("MEMBROKER_PERSIST", "1")
        .stderr(Stdio::piped());
    let mut helper = Helper::spawn(cmd);
    let ready = helper.line();
    let pid: u32 = ready
        .strip_prefix("ready ")
        .unwrap_or_else(|| panic!("helper said {ready:?}"))
        .parse()
        .unwrap();
    let mut ok = |command: &str| -> Vec<String> {
        let stdin = helper.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
        let reply = helper.line();
        match reply.strip_prefix("ok") {
            Some(rest) => rest.split_whitespace().map(String::from).collect(),
            None => panic!("helper: {command:?} -> {reply:?}"),
        }
    };
    ok("handler");
    ok(&format!("alloc {}", 64 * MIB));
    ok(&format!("fill 0 0 {} 7", 64 * MIB));

    restart(&mut broker, how);
    wait_until(
        Duration::from_secs(10),
        "the shim holds its lease again",
        || {
            broker
                .client()
                .stat("p/vm/ram0")
                .is_ok_and(|l| l.holders.iter().any(|h| h.pid == pid))
        },
    );
    // The poison-report socket was re-armed too: a memory error reaches the new broker.
    ok(&format!("sigbus 0 {} 4 12", 0x20123));
    wait_until(Duration::from_secs(5), "poison recorded", || {
        broker
            .client()
            .stat("p/vm/ram0")
            .is_ok_and(|l| !l.poison.is_empty())
    });
    assert_eq!(
        ok(&format!("sum 0 0 {}", MIB)),
        vec![(7 * MIB).to_string()],
        "guest RAM changed across the restart"
    );
}

#[test]
fn shim_reattaches_and_rearms_poison_reports_after_an_upgrade() {
    shim_reattaches_and_rearms_poison_reports(Restart::Upgrade);
}

#[test]
fn shim_reattaches_and_rearms_poison_reports_after_kill9_and_restart() {
    shim_reattaches_and_rearms_poison_reports(Restart::Kill9);
}

/// `fake_info` of a lease another uid owns.
fn squatted_info(name: &str, size: u64) -> LeaseInfo {
    LeaseInfo {
        uid: 65534,
        gid: 65534,
        mode: 0o666,
        ..fake_info(name, size)
    }
}

#[test]
fn create_meeting_another_uids_lease_on_retry_reports_exists() {
    // The right size and open to all, but somebody else's: never adopted.
    create_retry_meeting(squatted_info("vm/ram0", 2 * MIB));
}

#[test]
fn reconnect_does_not_reattach_to_a_lease_another_uid_made_under_the_same_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let server = fake_broker(
        &path,
        vec![
            // The client opens its lease; then the broker goes away.
            |conn, buf| {
                assert!(matches!(recv_request(&conn, buf), Request::Open { .. }));
                let fd = sealed_memfd(2 * MIB);
                reply(
                    &conn,
                    &Response::Lease(fake_info("vm/ram0", 2 * MIB)),
                    Some(&fd),
                );
            },
            // Meanwhile another uid took the name: the re-open finds its lease.
            |conn, buf| {
                assert!(matches!(recv_request(&conn, buf), Request::Open { .. }));
                let fd = sealed_memfd(2 * MIB);
                reply(
                    &conn,
                    &Response::Lease(squatted_info("vm/ram0", 2 * MIB)),
                    Some(&fd),
                );
                let req = recv_request(&conn, buf);
                assert!(matches!(req, Request::Release { .. }), "{req:?}");
                reply(&conn, &Response::Ok, None);
                assert_eq!(recv_request(&conn, buf), Request::Df);
                reply(&conn, &Response::Df(Vec::new()), None);
                let _ = transport::recv(&conn, buf);
            },
        ],
    );
    let mut client = Client::connect(&path).unwrap();
    let _lease = client.open("vm/ram0", true).unwrap();
    client.df().unwrap();
    let lost = client.take_lost_leases();
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(lost[0].code, ErrorCode::PermissionDenied);
    assert!(
        lost[0].reason.contains("now belongs to uid 65534"),
        "{lost:?}"
    );
    assert_eq!(client.held_leases().count(), 0);
    drop(client);
    server.join().unwrap();
}

/// What an older broker answers the admin's listings with: all in one reply.
fn one_reply_listings(conn: OwnedFd, buf: &mut [u8]) {
    assert_eq!(recv_request(&conn, buf), Request::Quota);
    reply(&conn, &Response::Quota(Vec::new()), None);
    assert_eq!(recv_request(&conn, buf), Request::Quarantine);
    reply(&conn, &Response::Quarantine(Vec::new()), None);
}

#[test]
fn a_version_1_broker_is_asked_for_the_admin_listings_in_one_reply() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let server = fake_broker(&path, vec![one_reply_listings]);
    let mut client = Client::connect(&path).unwrap();
    assert_eq!(client.version(), 1);
    assert_eq!(client.quota().unwrap(), Vec::new());
    assert_eq!(client.quarantine().unwrap(), Vec::new());
    server.join().unwrap();
}

#[test]
fn a_broker_from_before_the_paged_listings_is_asked_in_one_reply_on_a_new_connection() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    // It does not know the paged request: a protocol error, and the connection closed.
    let refuses = |paged: fn(&Request) -> bool| -> Script {
        Box::new(move |conn: OwnedFd, buf: &mut [u8]| {
            let req = recv_request(&conn, buf);
            assert!(paged(&req), "{req:?}");
            let refusal = Response::Error {
                code: ErrorCode::Protocol,
                message: "payload does not decode".into(),
            };
            reply(&conn, &refusal, None);
        })
    };
    let server = fake_broker_at(
        &path,
        2,
        vec![
            refuses(|r| matches!(r, Request::QuotaPage { after: None })),
            Box::new(|conn: OwnedFd, buf: &mut [u8]| {
                assert_eq!(recv_request(&conn, buf), Request::Quota);
                reply(&conn, &Response::Quota(Vec::new()), None);
            }),
            refuses(|r| matches!(r, Request::QuarantinePage { after: None })),
            Box::new(|conn: OwnedFd, buf: &mut [u8]| {
                assert_eq!(recv_request(&conn, buf), Request::Quarantine);
                reply(&conn, &Response::Quarantine(Vec::new()), None);
            }),
        ],
    );
    let mut client = Client::connect(&path).unwrap();
    assert_eq!(client.version(), 2);
    assert_eq!(client.quota().unwrap(), Vec::new());
    assert_eq!(client.quarantine().unwrap(), Vec::new());
    server.join().unwrap();
}
