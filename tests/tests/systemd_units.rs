//! The broker under systemd's socket unit and watchdog, with the fd-store harness playing
//! systemd (`tests/src/systemd.rs`): clients that connect while the broker is down are served
//! once it is back, the socket survives stops and upgrades, the watchdog hears from the
//! event loop, and start-up steps extend the start timeout. The unit files themselves are
//! checked with `systemd-analyze verify` (feature `systemd`).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use membroker_client::{Client, CreateLease, LeaseState};
use membroker_tests::systemd::Service;
use membroker_tests::{bin_path, stdout_ok, wait_until};

const MIB: u64 = 1 << 20;

fn activated() -> Service {
    let mut svc =
        Service::new(&bin_path("membroker"), &["--pool", "memfd:main:64M"]).with_socket_unit();
    svc.restart();
    svc
}

/// Connects and asks for `name` from another thread; returns when the broker answered.
fn stat_in_background(
    socket: &Path,
    name: &'static str,
) -> std::thread::JoinHandle<Result<LeaseState, String>> {
    let socket = socket.to_path_buf();
    std::thread::spawn(move || {
        let mut client = Client::connect(&socket).map_err(|e| e.to_string())?;
        client
            .stat(name)
            .map(|info| info.state)
            .map_err(|e| e.to_string())
    })
}

#[test]
fn clients_queue_on_the_socket_unit_while_the_broker_restarts() {
    let mut svc = activated();
    assert!(
        svc.log().contains("from=\"systemd\"") || svc.log().contains("from=systemd"),
        "{}",
        svc.log_tail(20)
    );
    let mut client = svc.client();
    client
        .create(CreateLease::new("vm/ram", 4 * MIB).persistent(true))
        .unwrap();
    drop(client);

    // A clean stop: the socket is systemd's, so its file stays and connections queue.
    assert_eq!(svc.terminate(), Some(0));
    assert!(svc.socket().exists(), "the broker removed systemd's socket");
    let waiting = stat_in_background(svc.socket(), "vm/ram");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiting.is_finished(), "answered while no broker runs?");
    svc.restart();
    assert_eq!(waiting.join().unwrap(), Ok(LeaseState::Idle));

    // A crash: the same.
    svc.kill9();
    let waiting = stat_in_background(svc.socket(), "vm/ram");
    std::thread::sleep(Duration::from_millis(300));
    svc.restart();
    assert_eq!(waiting.join().unwrap(), Ok(LeaseState::Idle));
    assert!(
        svc.notified().errors.is_empty(),
        "{:?}",
        svc.notified().errors
    );
}

#[test]
fn upgrade_keeps_serving_systemds_socket_and_leaves_it_in_place() {
    let mut svc = activated();
    let pid = svc.pid();
    let ready = svc.ready_count();
    let out = svc.run_cli(&["upgrade"]);
    stdout_ok(&out);
    svc.wait_ready(ready);
    assert_eq!(svc.pid(), pid, "upgrade re-executes in place");
    let mut client = svc.client();
    client.create(CreateLease::new("after", MIB)).unwrap();
    drop(client);
    // The new image knows the socket is systemd's: a stop leaves it.
    assert_eq!(svc.terminate(), Some(0));
    assert!(
        svc.socket().exists(),
        "the upgraded broker removed systemd's socket"
    );
    svc.restart();
    svc.client();
}

#[test]
fn a_socket_unit_on_another_path_is_refused_with_the_fix() {
    let mut svc = Service::new(&bin_path("membroker"), &[]).with_socket_unit();
    let other = svc.dir().join("other.sock");
    svc.set_socket(&other);
    let (status, log) = svc.run_to_exit();
    assert!(!status.success());
    assert!(
        log.contains("ListenSequentialPacket= and --socket the same path"),
        "{log}"
    );
}

#[test]
fn watchdog_hears_from_the_event_loop_and_start_up_extends_the_timeout() {
    let timeout = Duration::from_millis(600);
    let mut svc =
        Service::new(&bin_path("membroker"), &["--pool", "memfd:main:64M"]).with_watchdog(timeout);
    svc.restart();
    let since = Instant::now();
    let pings = || svc.notified().watchdog.len();
    let at_ready = pings();
    std::thread::sleep(Duration::from_millis(1500));
    svc.sync();
    let n = svc.notified();
    let after: Vec<Duration> = n
        .watchdog
        .windows(2)
        .skip(at_ready)
        .map(|w| w[1] - w[0])
        .collect();
    assert!(
        after.len() >= 3,
        "{} pings in {:?}",
        after.len(),
        since.elapsed()
    );
    assert!(
        after.iter().all(|gap| *gap < timeout),
        "gaps {after:?} exceed the watchdog timeout {timeout:?}"
    );
    assert_eq!(
        n.watchdog_usec,
        Some(timeout.as_micros() as u64),
        "the configured timeout is back once serving"
    );
    let steps: Vec<&str> = n.extended.iter().map(|(_, s)| s.as_str()).collect();
    assert!(
        steps.contains(&"replaying the journal") && steps.contains(&"restoring pool main"),
        "{steps:?}"
    );
    assert!(n.extended.iter().all(|(usec, _)| *usec >= 60_000_000));
    drop(n);

    // A broker that stops running (SIGSTOP: as hung as it gets) stops pinging.
    let pid = svc.pid();
    membroker_tests::signal(pid, rustix::process::Signal::STOP);
    svc.sync();
    let before = svc.notified().watchdog.len();
    std::thread::sleep(timeout * 2);
    svc.sync();
    let silent = svc.notified().watchdog.len() - before;
    membroker_tests::signal(pid, rustix::process::Signal::CONT);
    assert!(silent <= 1, "{silent} pings from a stopped broker");
    wait_until(Duration::from_secs(5), "pings again after SIGCONT", || {
        svc.sync();
        svc.notified().watchdog.len() > before + silent
    });
}

/// `systemd-analyze verify` on the unit files in contrib/, installed as the package would
/// install them (the binary at /usr/bin/membroker).
#[test]
#[cfg_attr(
    not(feature = "systemd"),
    ignore = "needs systemd-analyze (Debian package systemd): --features membroker-tests/systemd"
)]
fn unit_files_verify_clean() {
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib");
    let dir = tempfile::tempdir().unwrap();
    for unit in ["membroker.service", "membroker.socket"] {
        let text = std::fs::read_to_string(contrib.join(unit)).unwrap();
        // The unit names /usr/bin/membroker; verify checks that the binary exists.
        let text = text.replace(
            "/usr/bin/membroker",
            bin_path("membroker").to_str().unwrap(),
        );
        std::fs::write(dir.path().join(unit), text).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .arg(dir.path().join("membroker.socket"))
        .arg(dir.path().join("membroker.service"))
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .expect("systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert_eq!(said.trim(), "", "systemd-analyze verify complained");
}
