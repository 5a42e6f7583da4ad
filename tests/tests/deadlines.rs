//! Deadlines wherever a client waits for the broker: a stopped broker (SIGSTOP) fails the CLI,
//! the client library and the shim within `MEMBROKER_TIMEOUT`, and after SIGCONT everything
//! works again by itself.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use membroker_client::{Client, CreateLease, Error, Options};
use membroker_tests::{Helper, TestBroker, bin_path, signal};
use rustix::process::Signal;

#[path = "../shim/support.rs"]
mod support;

const MIB: u64 = 1 << 20;
/// The deadline the tests give (`MEMBROKER_TIMEOUT`, seconds).
const DEADLINE: Duration = Duration::from_secs(1);
/// How much later than the deadline a failure may come (a send and a receive each have the
/// deadline; a loaded 2-core host adds the rest).
const SLACK: Duration = Duration::from_secs(3);

/// Stops the broker with SIGSTOP until dropped (then SIGCONT), so a failing assertion never
/// leaves it stopped.
struct Stopped(u32);

impl Stopped {
    fn new(broker: &TestBroker) -> Stopped {
        signal(broker.pid(), Signal::STOP);
        Stopped(broker.pid())
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(self.0, Signal::CONT);
    }
}

fn expected_message(broker: &TestBroker) -> String {
    format!(
        "broker at {} did not answer within 1 s",
        broker.socket().display()
    )
}

/// Asserts that a failure after `started` came within the deadline (and not before it).
fn within_deadline(started: Instant, what: &str) {
    let took = started.elapsed();
    assert!(
        took >= DEADLINE - Duration::from_millis(50) && took < DEADLINE + SLACK,
        "{what} took {took:?} with a deadline of {DEADLINE:?}"
    );
}

#[test]
fn cli_gives_up_on_a_stopped_broker_within_the_deadline() {
    let broker = TestBroker::start(&["--pool", "memfd:t:64M"]);
    let df = |timeout: &str| {
        let out = broker
            .cli()
            .env("MEMBROKER_TIMEOUT", timeout)
            .arg("df")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), err)
    };
    let stopped = Stopped::new(&broker);
    let started = Instant::now();
    let (ok, err) = df("1");
    within_deadline(started, "membroker df");
    assert!(!ok, "{err}");
    assert!(err.contains(&expected_message(&broker)), "{err}");
    assert!(err.contains("MEMBROKER_TIMEOUT"), "{err}");
    drop(stopped);

    let (ok, err) = df("1");
    assert!(ok, "{err}");
    let (ok, err) = df("soon");
    assert!(!ok && err.contains("MEMBROKER_TIMEOUT=\"soon\""), "{err}");
}

#[test]
fn client_calls_and_connects_time_out_then_recover() {
    let broker = TestBroker::start(&["--pool", "memfd:t:64M"]);
    let options = Options::default().timeout(Some(DEADLINE));
    let mut client = Client::connect_with(broker.socket(), options).unwrap();
    assert_eq!(client.timeout(), Some(DEADLINE));
    let lease = client.create(CreateLease::new("held", 2 * MIB)).unwrap();

    let stopped = Stopped::new(&broker);
    let started = Instant::now();
    let err = client.df().unwrap_err();
    within_deadline(started, "a call");
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert_eq!(err.to_string(), expected_message(&broker));
    // A create the broker carries out only after its deadline.
    let err = client
        .create(CreateLease::new("late", 2 * MIB))
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");

    let started = Instant::now();
    let err = Client::connect_with(broker.socket(), options).unwrap_err();
    within_deadline(started, "a connect");
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    drop(stopped);

    // The connection was kept (it holds "held"); the late replies are read and dropped, and
    // the late lease, which the caller was told had failed, is released (and so freed).
    let pools = client.df().unwrap();
    assert_eq!(pools[0].leases, 1, "{pools:?}");
    assert_eq!(client.reconnects(), 0);
    assert_eq!(client.stat("held").unwrap().holders.len(), 1);
    assert!(client.stat("late").is_err());
    assert_eq!(client.held_leases().count(), 1);
    drop(lease);
}

/// `mb-shim-helper` under the shim with `MEMBROKER_TIMEOUT=1`.
fn shim_helper(socket: &Path, env: &[(&str, &str)]) -> Helper {
    let mut cmd = Command::new(bin_path("mb-shim-helper"));
    cmd.env("LD_PRELOAD", support::shim_path())
        .env("MEMBROKER_SOCKET", socket)
        .env("MEMBROKER_TIMEOUT", "1")
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut helper = Helper::spawn(cmd);
    let ready = helper.line();
    assert!(ready.starts_with("ready "), "{ready}");
    helper
}

/// Sends `alloc 128M` while the broker is stopped; the answer comes within the deadline.
fn alloc_while_stopped(broker: &TestBroker, h: &mut Helper, what: &str) -> String {
    send_while_stopped(broker, h, &format!("alloc {}", 128 * MIB), what)
}

/// Sends `command` while the broker is stopped; the answer comes within the deadline.
fn send_while_stopped(broker: &TestBroker, h: &mut Helper, command: &str, what: &str) -> String {
    let _stopped = Stopped::new(broker);
    let started = Instant::now();
    let reply = h.send(command);
    within_deadline(started, what);
    reply
}

#[test]
fn shim_fails_a_ram_block_within_the_deadline_and_recovers() {
    let broker = TestBroker::start(&["--pool", "memfd:t:512M"]);
    // Not yet connected: the handshake times out.
    let mut h = shim_helper(broker.socket(), &[]);
    let reply = alloc_while_stopped(&broker, &mut h, "the first RAM block");
    assert!(reply.starts_with("err") && reply.contains("110"), "{reply}");
    assert!(h.send(&format!("alloc {}", 128 * MIB)).starts_with("ok"));

    // Connected: the create times out (inside the hook, holding the shim's lock).
    let reply = alloc_while_stopped(&broker, &mut h, "a RAM block on a connected shim");
    assert!(reply.starts_with("err"), "{reply}");
    let reply = h.send(&format!("alloc {}", 128 * MIB));
    assert!(reply.starts_with("ok"), "{reply}");
    let err = h.finish();
    assert_eq!(err.matches(&expected_message(&broker)).count(), 2, "{err}");
    assert!(err.contains("failing the allocation"), "{err}");
    assert!(!err.contains("using anonymous memory"), "{err}");
}

#[test]
fn shim_falls_back_to_anonymous_memory_within_the_deadline() {
    let broker = TestBroker::start(&["--pool", "memfd:t:512M"]);
    let mut h = shim_helper(broker.socket(), &[("MEMBROKER_FALLBACK", "anon")]);
    assert!(h.send(&format!("alloc {}", 128 * MIB)).starts_with("ok"));
    let reply = alloc_while_stopped(&broker, &mut h, "a RAM block");
    assert!(reply.starts_with("ok"), "{reply}");
    assert!(h.send("fill 1 0 4096 3").starts_with("ok"));
    let err = h.finish();
    assert!(err.contains(&expected_message(&broker)), "{err}");
    assert!(err.contains("using anonymous memory"), "{err}");
}

#[test]
fn shim_fails_a_memfd_backend_within_the_deadline_and_recovers() {
    let broker = TestBroker::start(&["--pool", "memfd:t:512M"]);
    let mut h = shim_helper(broker.socket(), &[]);
    let backend = format!("memfd memory-backend-memfd {}", 128 * MIB);
    let reply = send_while_stopped(&broker, &mut h, &backend, "a memfd backend");
    assert_eq!(reply, format!("err ftruncate errno {}", libc::ETIMEDOUT));
    let reply = h.send(&backend);
    assert!(
        reply.starts_with("ok") && reply.contains("memfd:membroker:"),
        "{reply}"
    );
    let err = h.finish();
    assert_eq!(err.matches(&expected_message(&broker)).count(), 1, "{err}");
    assert!(err.contains("failing the allocation"), "{err}");
}
