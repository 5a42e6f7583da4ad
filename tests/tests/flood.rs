//! Hostile load: a tenant (uid 65534) flooding the broker with connections or leases, as an
//! unprivileged user would. Root is always served, the flooder gets clear errors, and what it
//! took comes back when it goes. Switching uid needs root (the `privileged` feature).

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use membroker_client::CreateLease;
use membroker_tests::{Helper, TestBroker, bin_path, wait_until};

const NOBODY: u32 = 65534;

/// `mb-flood SOCKET MODE N` as uid 65534 (as root with `uid` 0).
fn flood(broker: &TestBroker, uid: u32, mode: &str, n: usize) -> Helper {
    let mut cmd = Command::new(bin_path("mb-flood"));
    cmd.arg(broker.socket())
        .arg(mode)
        .arg(n.to_string())
        .stderr(Stdio::piped());
    if uid != 0 {
        cmd.uid(uid).gid(uid);
    }
    Helper::spawn(cmd)
}

fn say(helper: &mut Helper, line: &str) {
    let stdin = helper.child.stdin.as_mut().expect("helper stdin");
    writeln!(stdin, "{line}").expect("write helper stdin");
}

/// Closes the helper's stdin and waits for it to exit.
fn finish(mut helper: Helper) {
    drop(helper.child.stdin.take());
    helper.child.wait().expect("wait helper");
}

/// The broker's CPU time so far (user + system), in clock ticks.
fn cpu_ticks(broker: &TestBroker) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", broker.pid())).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line; 12 and 13 after the comm.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn root_creates(broker: &TestBroker, name: &str) {
    let mut root = broker.client();
    root.create(CreateLease::new(name, 1 << 20))
        .unwrap_or_else(|e| panic!("root create {name}: {e}; log:\n{}", broker.log()));
    root.remove(name).unwrap();
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root: run with --features privileged (scripts/test does)"
)]
fn idle_flood_is_refused_past_its_limit_and_leaves_nothing_behind() {
    const LIMIT: usize = 4096;
    const FLOOD: usize = LIMIT + 200;
    let broker = TestBroker::start(&[
        "--pool",
        "memfd:t:64M",
        "--socket-group",
        "65534",
        "--max-connections-per-uid",
        "4096",
        "--hello-timeout",
        "600",
    ]);
    root_creates(&broker, "warm-up");
    std::thread::sleep(Duration::from_millis(300)); // the broker sees the warm-up client go
    let (fds, threads, rss) = (broker.fd_count(), broker.thread_count(), broker.rss_kib());
    for round in 1..=2 {
        let mut flooder = flood(&broker, NOBODY, "idle", FLOOD);
        assert_eq!(flooder.line(), format!("connected {FLOOD}"));
        wait_until(Duration::from_secs(20), "the flood accepted", || {
            broker.fd_count() >= fds + LIMIT
        });
        say(&mut flooder, &format!("check {}", FLOOD - LIMIT));
        assert_eq!(
            flooder.line(),
            format!("refused {}", FLOOD - LIMIT),
            "round {round}"
        );
        let message = flooder.line();
        assert!(
            message.contains("uid 65534 has 4096 connections open")
                && message.contains("--max-connections-per-uid"),
            "round {round}: {message}"
        );
        // The flooder's own uid is refused, with the reason, even when it says Hello.
        let mut late = flood(&broker, NOBODY, "hello", 1);
        assert_eq!(late.line(), "connected 0 refused 1");
        let message = late.line();
        assert!(message.contains("NoSpace: uid 65534 has 4096"), "{message}");
        finish(late);
        // Root is served all along.
        root_creates(&broker, &format!("during-{round}"));
        assert_eq!(broker.thread_count(), threads, "no thread per connection");
        finish(flooder);
        wait_until(Duration::from_secs(20), "the flood's fds closed", || {
            broker.fd_count() <= fds
        });
        assert_eq!(broker.thread_count(), threads);
        let after = broker.rss_kib();
        assert!(
            after < rss + 16 * 1024,
            "round {round}: RSS {after} KiB after the flood, {rss} KiB before"
        );
    }
    // Every slot is free again: the flooder's whole allowance comes back.
    let mut again = flood(&broker, NOBODY, "hello", LIMIT);
    assert_eq!(again.line(), format!("connected {LIMIT} refused 0"));
    finish(again);
    let log = broker.log();
    assert!(!log.contains("panicked"), "a panic in the log:\n{log}");
    // Refusals are logged, but not one line each.
    let refusals = log.matches("connection refused").count();
    assert!(refusals <= 10, "{refusals} refusal lines");
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root: run with --features privileged (scripts/test does)"
)]
fn silent_connection_is_closed_at_the_hello_deadline() {
    let broker = TestBroker::start(&[
        "--pool",
        "memfd:t:64M",
        "--socket-group",
        "65534",
        "--hello-timeout",
        "0.5",
    ]);
    let fds = broker.fd_count();
    let started = Instant::now();
    let mut silent = flood(&broker, NOBODY, "idle", 3);
    assert_eq!(silent.line(), "connected 3");
    say(&mut silent, "check 3");
    assert_eq!(silent.line(), "refused 3");
    let message = silent.line();
    assert!(message.contains("no Hello within 0.5 s"), "{message}");
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(5), "closed after {waited:?}");
    wait_until(
        Duration::from_secs(5),
        "the silent connections gone",
        || broker.fd_count() <= fds,
    );
    // A client that says Hello in time stays.
    let mut talker = broker.client();
    std::thread::sleep(Duration::from_secs(1));
    talker
        .df()
        .expect("a client past the Hello deadline is served");
    finish(silent);
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root: run with --features privileged (scripts/test does)"
)]
fn tenant_is_refused_before_the_file_table_fills_and_accept_never_spins() {
    const FILES: usize = 1024;
    let broker = TestBroker::start(&[
        "--pool",
        "memfd:t:256M",
        "--socket-group",
        "65534",
        "--open-file-limit",
        "1024",
    ]);
    // A tenant creates leases (each holds a broker fd) until refused.
    let mut tenant = flood(&broker, NOBODY, "create", FILES);
    let created: usize = tenant
        .line()
        .strip_prefix("created ")
        .and_then(|n| n.parse().ok())
        .expect("created N");
    let message = tenant.line();
    assert!(
        message.starts_with("message NoSpace: lease flood-65534-")
            && message.contains("near its open-file limit")
            && message.contains("of 1024"),
        "{message}"
    );
    assert!(
        created > FILES / 2,
        "only {created} leases before the refusal"
    );
    assert!(broker.fd_count() < FILES - 128, "the reserve is kept");
    // Root still creates, and so does a new connection of root.
    root_creates(&broker, "root-after-tenant");
    // Root (not limited per uid) fills the rest of the table with connections: accept runs
    // out of files, the broker rests instead of spinning, and logs it once.
    let (lines, cpu) = (broker.log().lines().count(), cpu_ticks(&broker));
    let mut rooted = flood(&broker, 0, "idle", FILES);
    let connected = rooted.line();
    assert!(connected.starts_with("connected "), "{connected}");
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_ticks(&broker) - cpu;
    let logged = broker.log().lines().count() - lines;
    assert!(
        spent < 50,
        "{spent} ticks of CPU in 2 s with a full file table"
    );
    assert!(
        logged < 50,
        "{logged} log lines in 2 s with a full file table; the last ones:\n{}",
        broker
            .log()
            .lines()
            .rev()
            .take(10)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        broker
            .log()
            .contains("accept failed; not accepting for 100 ms"),
        "{}",
        broker.log()
    );
    finish(rooted);
    // The backlog drains and the table empties: root is served again.
    wait_until(Duration::from_secs(10), "root served again", || {
        membroker_client::Client::connect(broker.socket()).is_ok()
    });
    root_creates(&broker, "root-after-flood");
    finish(tenant);
    assert!(!broker.log().contains("panicked"));
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root: run with --features privileged (scripts/test does)"
)]
fn clients_that_never_read_their_replies_hold_no_worker_and_are_closed() {
    let broker = TestBroker::start(&["--pool", "memfd:t:64M", "--socket-group", "65534"]);
    std::thread::sleep(Duration::from_millis(300));
    let fds = broker.fd_count();
    // More such clients than the broker has workers.
    let mut stuffer = flood(&broker, NOBODY, "unread", 64);
    assert_eq!(stuffer.line(), "stuffed 64");
    let started = Instant::now();
    root_creates(&broker, "among-unread");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "root waited {took:?}");
    // A reply unread for 5 s ends its connection, though the client keeps its end open.
    wait_until(
        Duration::from_secs(15),
        "the unread connections closed",
        || broker.fd_count() <= fds,
    );
    let log = broker.log();
    assert!(log.contains("the client read nothing for 5 s"), "{log}");
    finish(stuffer);
}
