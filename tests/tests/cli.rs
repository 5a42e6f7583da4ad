//! The CLI and the daemon as an operator uses them.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use membroker_tests::{TestBroker, stderr_err, stdout_ok, wait_until};

#[test]
fn create_ls_stat_df_rm() {
    let broker = TestBroker::start(&["--pool", "memfd:main:1G", "--pool", "memfd:side:64M"]);
    let out = stdout_ok(&broker.run_cli(&[
        "create",
        "tenant/vm1/ram0",
        "--size",
        "1.5M",
        "--mode",
        "0640",
    ]));
    assert!(out.contains("size:       1.5 MiB (1572864 bytes)"), "{out}");
    stdout_ok(&broker.run_cli(&[
        "create",
        "tenant/vm2/ram0",
        "--size",
        "2M",
        "--pool",
        "side",
    ]));

    assert_eq!(
        stdout_ok(&broker.run_cli(&["ls"])),
        "tenant/vm1/ram0\ntenant/vm2/ram0\n"
    );
    assert_eq!(
        stdout_ok(&broker.run_cli(&["ls", "tenant/vm2"])),
        "tenant/vm2/ram0\n"
    );
    let long = stdout_ok(&broker.run_cli(&["ls", "-l"]));
    let lines: Vec<&str> = long.lines().collect();
    assert!(
        lines[0].starts_with("MODE") && lines[0].ends_with("NAME"),
        "{long}"
    );
    assert!(
        lines[1].starts_with("-rw-r-----")
            && lines[1].contains("1.5 MiB")
            && lines[1].contains("idle"),
        "{long}"
    );

    let ls: serde_json::Value =
        serde_json::from_str(&stdout_ok(&broker.run_cli(&["ls", "--json"]))).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 2);
    let stat: serde_json::Value = serde_json::from_str(&stdout_ok(&broker.run_cli(&[
        "stat",
        "tenant/vm1/ram0",
        "--json",
    ])))
    .unwrap();
    assert_eq!(stat["size"], 1572864);
    assert_eq!(stat["page_size"], "4K");
    assert_eq!(stat["pool"], "main");
    assert_eq!(stat["mode"], 0o640);
    assert_eq!(stat["persistent"], true);
    assert_eq!(stat["state"], "idle");
    assert_eq!(stat["extents"][0]["len"], 1572864);

    let df: serde_json::Value =
        serde_json::from_str(&stdout_ok(&broker.run_cli(&["df", "--json"]))).unwrap();
    assert_eq!(df[0]["name"], "main");
    assert_eq!(df[0]["default"], true);
    assert_eq!(df[0]["used"], 1572864);
    assert_eq!(df[1]["free"], (62u64 << 20));
    let table = stdout_ok(&broker.run_cli(&["df"]));
    assert!(
        table
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("main (default)  memfd"),
        "{table}"
    );

    stdout_ok(&broker.run_cli(&["rm", "tenant/vm1/ram0"]));
    let err = stderr_err(&broker.run_cli(&["stat", "tenant/vm1/ram0"]));
    assert_eq!(err, "membroker: lease tenant/vm1/ram0: no such lease\n");
}

#[test]
fn errors_say_what_failed_and_what_to_do() {
    let broker = TestBroker::start(&["--pool", "memfd:small:64M"]);
    let err = stderr_err(&broker.run_cli(&["create", "big", "--size", "1G"]));
    assert_eq!(
        err,
        "membroker: lease big: pool small has 64 MiB free, 1 GiB asked\n"
    );
    let err = stderr_err(&broker.run_cli(&["create", "x", "--size", "12Q"]));
    assert!(
        err.contains("use bytes or a number with K, M, G or T"),
        "{err}"
    );
    let err = stderr_err(&broker.run_cli(&["create", "bad name", "--size", "4K"]));
    assert!(err.contains("character ' ' is not allowed"), "{err}");
    let err = stderr_err(&broker.run_cli(&["create", "x", "--size", "4K", "--pool", "nope"]));
    assert!(
        err.contains("no pool named \"nope\"; pools: small (4K pages)"),
        "{err}"
    );
    let err = stderr_err(&broker.run_cli(&["create", "x", "--size", "4K", "--mode", "999"]));
    assert!(err.contains("use octal permission bits"), "{err}");

    let missing = broker.dir().join("nobody-here.sock");
    let cli = membroker_tests::bin_path("membroker");
    let err = stderr_err(
        &std::process::Command::new(cli)
            .arg("--socket")
            .arg(&missing)
            .arg("df")
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("cannot connect to the broker at")
            && err.contains("is `membroker serve` running?"),
        "{err}"
    );

    let err = stderr_err(&broker.run_cli(&["serve", "--pool", "memfd:x:1G:3M"]));
    assert!(err.contains("use 4K, 2M or 1G"), "{err}");
}

#[test]
fn daemon_socket_lock_and_signals() {
    let mut broker = TestBroker::start(&["--pool", "memfd:t:64M"]);
    let socket = broker.socket().to_path_buf();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode");

    // A second broker on the same socket is refused and leaves the first one alone.
    let err = stderr_err(&broker.run_cli(&["serve", "--pool", "memfd:t:64M"]));
    assert!(err.contains("another broker is already serving"), "{err}");
    stdout_ok(&broker.run_cli(&["df"]));

    // SIGTERM: clean exit, socket removed, leases' holders see the connection end.
    let mut holder = broker.client();
    let lease = holder
        .create(membroker_client::CreateLease::new("x", 4096))
        .unwrap();
    assert_eq!(broker.terminate(), Some(0));
    assert!(!socket.exists(), "socket removed on shutdown");
    assert!(holder.df().is_err(), "connection closed");
    lease
        .map()
        .unwrap()
        .write_at(0, b"mapping outlives the broker")
        .unwrap();
    assert!(broker.log().contains("shutting down"));

    // kill -9 leaves a stale socket file; the next broker replaces it.
    broker.restart();
    broker.kill9();
    assert!(socket.exists(), "stale socket left by kill -9");
    broker.restart();
    stdout_ok(&broker.run_cli(&["df"]));
    assert!(broker.log().contains("removed stale socket"));
}

#[test]
fn sigint_also_stops_the_broker() {
    let mut broker = TestBroker::start(&["--pool", "memfd:t:64M"]);
    let _idle = broker.client();
    membroker_tests::signal(broker.pid(), rustix::process::Signal::INT);
    wait_until(
        Duration::from_secs(5),
        "socket removed after SIGINT",
        || !broker.socket().exists(),
    );
    assert_eq!(broker.terminate(), Some(0));
}

#[test]
fn default_pool_needs_no_configuration() {
    let broker = TestBroker::start(&[]);
    let df: serde_json::Value =
        serde_json::from_str(&stdout_ok(&broker.run_cli(&["df", "--json"]))).unwrap();
    assert_eq!(df[0]["name"], "default");
    assert_eq!(df[0]["page_size"], "4K");
    let size = df[0]["size"].as_u64().unwrap();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let total_kib: u64 = meminfo
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        size > total_kib * 1024 / 4 && size <= total_kib * 1024 / 2,
        "default pool {size} of {total_kib} KiB RAM"
    );
    stdout_ok(&broker.run_cli(&["create", "vm/ram0", "--size", "64M"]));
}
