//! `serve --metrics` and `--metrics-textfile` against a live broker: the numbers match `df`
//! and what the clients did, garbage on the metrics port harms nothing, a tenant's flood of
//! idle connections to it costs the broker no thread and few fds, the text file is replaced
//! whole, and (feature `promtool`, Debian's `prometheus` package) promtool accepts the text.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use membroker_client::{CreateLease, ErrorCode};
use membroker_tests::systemd::Service;
use membroker_tests::{Helper, TestBroker, bin_path, wait_until};

const MIB: u64 = 1 << 20;

/// Starts a broker with two pools and metrics on a free loopback port; returns the port's
/// address (read from the log: the broker binds port 0).
fn broker_with_metrics(extra: &[&str]) -> (TestBroker, SocketAddr) {
    let mut args = vec![
        "--pool",
        "memfd:main:64M",
        "--pool",
        "memfd:small:8M",
        "--metrics",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let broker = TestBroker::start(&args);
    let addr = metrics_addr(|| broker.log(), 1);
    (broker, addr)
}

/// The address the `nth` start logged it serves metrics on (port 0 picks a new one each time).
fn metrics_addr(log: impl Fn() -> String, nth: usize) -> SocketAddr {
    let mut addr = None;
    wait_until(
        Duration::from_secs(10),
        "the metrics address in the log",
        || {
            let log = log();
            let found: Vec<SocketAddr> = log
                .lines()
                .filter_map(|line| {
                    let rest = line.split("bound=").nth(1)?;
                    rest.split_whitespace().next()?.parse().ok()
                })
                .collect();
            addr = found.get(nth - 1).copied();
            addr.is_some()
        },
    );
    addr.expect("found")
}

/// One HTTP/1.0 request; returns the status line, the headers and the body.
fn http(addr: SocketAddr, request: &[u8]) -> (String, String, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics port");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request).expect("send");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("read the reply");
    let (head, body) = reply.split_once("\r\n\r\n").expect("a header block");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_string(), body.to_string())
}

fn scrape(addr: SocketAddr) -> String {
    let (status, headers, body) = http(addr, b"GET /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(status, "HTTP/1.0 200 OK", "headers:\n{headers}");
    assert!(
        headers.contains("text/plain; version=0.0.4"),
        "content type: {headers}"
    );
    body
}

/// Samples by `name{labels}` as written (labels in the broker's order).
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').expect("name value");
            (key.to_string(), value.parse().expect("a number"))
        })
        .collect()
}

fn value(samples: &BTreeMap<String, f64>, key: &str) -> u64 {
    match samples.get(key) {
        Some(v) => *v as u64,
        None => panic!("no sample {key}; have:\n{samples:#?}"),
    }
}

#[test]
fn scrape_matches_df_and_counts_requests() {
    let (broker, addr) = broker_with_metrics(&[]);
    let mut client = broker.client();
    let held = client
        .create(CreateLease::new("vm1/ram", 16 * MIB))
        .unwrap();
    client
        .create(CreateLease::new("vm1/idle", 4 * MIB).persistent(true))
        .unwrap();
    client.release("vm1/idle").unwrap();
    client
        .create(CreateLease::new("vm2/ram", 2 * MIB).pool("small"))
        .unwrap();
    client.release("vm2/ram").unwrap();
    let err = client
        .create(CreateLease::new("vm3/huge", 32 * MIB).pool("small"))
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NoSpace));
    let mut other = broker.client();
    let gone = other
        .create(CreateLease::new("vm4/ram", 2 * MIB).persistent(true))
        .unwrap();
    other.remove("vm4/ram").unwrap(); // still held: removed, memory kept
    let df = client.df().unwrap();

    let s = samples(&scrape(addr));
    for pool in &df {
        let labels = format!(
            "{{pool=\"{}\",kind=\"memfd\",page_size=\"{}\"}}",
            pool.name, pool.page_size
        );
        let metric = |name: &str| value(&s, &format!("membroker_pool_{name}_bytes{labels}"));
        assert_eq!(metric("size"), pool.size, "{}", pool.name);
        assert_eq!(metric("used"), pool.used, "{}", pool.name);
        assert_eq!(metric("free"), pool.free, "{}", pool.name);
        assert_eq!(metric("scrubbing"), pool.scrubbing, "{}", pool.name);
        assert_eq!(metric("quarantined"), pool.quarantined, "{}", pool.name);
        let by_state: u64 = ["held", "idle", "removed", "orphaned"]
            .iter()
            .map(|state| {
                value(
                    &s,
                    &format!(
                        "membroker_leases{{pool=\"{}\",state=\"{state}\"}}",
                        pool.name
                    ),
                )
            })
            .sum();
        assert_eq!(by_state, pool.leases, "{}", pool.name);
    }
    let leases = |pool: &str, state: &str| {
        value(
            &s,
            &format!("membroker_leases{{pool=\"{pool}\",state=\"{state}\"}}"),
        )
    };
    assert_eq!(
        (leases("main", "held"), leases("main", "idle")),
        (1, 1),
        "vm1/ram held, vm1/idle idle"
    );
    assert_eq!(leases("main", "removed"), 1, "vm4/ram removed while held");
    assert_eq!(leases("small", "held") + leases("small", "idle"), 0);
    assert_eq!(
        value(
            &s,
            "membroker_pool_used_bytes{pool=\"main\",kind=\"memfd\",page_size=\"4K\"}"
        ),
        22 * MIB
    );

    let requests = |op: &str, result: &str| {
        value(
            &s,
            &format!("membroker_requests_total{{op=\"{op}\",result=\"{result}\"}}"),
        )
    };
    assert_eq!(requests("create", "ok"), 4);
    assert_eq!(requests("create", "no_space"), 1);
    assert_eq!(requests("release", "ok"), 2);
    assert_eq!(requests("remove", "ok"), 1);
    assert_eq!(requests("df", "ok"), 1);
    assert_eq!(
        value(
            &s,
            "membroker_request_duration_seconds_count{op=\"create\"}"
        ),
        5
    );
    assert_eq!(value(&s, "membroker_connections"), 2);
    assert!(
        value(&s, "membroker_journal_sync_duration_seconds_count") >= 1,
        "creates wait for a journal sync"
    );
    assert_eq!(
        value(
            &s,
            &format!(
                "membroker_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1
    );
    assert!(
        !s.keys().any(|k| k.contains("vm1") || k.contains("vm4")),
        "no per-lease labels"
    );

    drop((gone, other));
    wait_until(
        Duration::from_secs(5),
        "the closed connection counted",
        || {
            let s = samples(&scrape(addr));
            value(&s, "membroker_connections") == 1 && leases_of(&s, "main", "removed") == 0
        },
    );
    drop(held);
}

fn leases_of(s: &BTreeMap<String, f64>, pool: &str, state: &str) -> u64 {
    value(
        s,
        &format!("membroker_leases{{pool=\"{pool}\",state=\"{state}\"}}"),
    )
}

#[test]
fn a_restored_lease_counts_as_orphaned_until_its_holder_is_back() {
    let args = ["--pool", "memfd:main:64M", "--metrics", "127.0.0.1:0"];
    let mut svc = Service::start(&args);
    let mut client = svc.client();
    let _lease = client.create(CreateLease::new("vm/ram", MIB)).unwrap();
    svc.kill9();
    svc.restart();
    let addr = metrics_addr(|| svc.log(), 2);
    let s = samples(&scrape(addr));
    assert_eq!(
        (
            leases_of(&s, "main", "orphaned"),
            leases_of(&s, "main", "held")
        ),
        (1, 0),
        "restored from the fd store, its holder not back"
    );
    let mut again = svc.client();
    let _back = again.open("vm/ram", true).unwrap();
    let s = samples(&scrape(addr));
    assert_eq!(
        (
            leases_of(&s, "main", "orphaned"),
            leases_of(&s, "main", "held")
        ),
        (0, 1)
    );
    assert_eq!(
        value(&s, "membroker_requests_total{op=\"open\",result=\"ok\"}"),
        1,
        "counters start again with the process"
    );
}

#[test]
fn garbage_on_the_metrics_port_harms_nothing() {
    let (broker, addr) = broker_with_metrics(&[]);
    let (status, _, _) = http(addr, b"GET /other HTTP/1.0\r\n\r\n");
    assert_eq!(status, "HTTP/1.0 404 Not Found");
    let (status, _, _) = http(addr, b"POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status, "HTTP/1.0 405 Method Not Allowed");
    // Not HTTP at all (a TLS hello, binary noise), a header too long, clients that say
    // nothing and stay: answered (400, or leniently) or dropped, whatever the server prefers.
    let long = format!(
        "GET /metrics HTTP/1.0\r\nX: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let junk: [&[u8]; 4] = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        &[0xff; 4096],
        b"GET /metrics HTTP/9.9 extra\r\n\r\n",
        long.as_bytes(),
    ];
    for bytes in junk {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let _ = stream.write_all(bytes);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
        assert!(
            reply.is_empty() || reply.starts_with(b"HTTP/1."),
            "{}",
            String::from_utf8_lossy(&reply)
        );
    }
    let silent: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // The broker and the metrics both go on.
    let mut client = broker.client();
    client.create(CreateLease::new("after", MIB)).unwrap();
    let s = samples(&scrape(addr));
    assert_eq!(leases_of(&s, "main", "held"), 1);
    drop(silent);
}

/// The broker's threads, fds and resident KiB at their highest over `period`.
fn peak_usage(broker: &TestBroker, period: Duration) -> (usize, usize, u64) {
    let mut peak = (0, 0, 0);
    let end = Instant::now() + period;
    while Instant::now() < end {
        peak.0 = peak.0.max(broker.thread_count());
        peak.1 = peak.1.max(broker.fd_count());
        peak.2 = peak.2.max(broker.rss_kib());
        std::thread::sleep(Duration::from_millis(10));
    }
    peak
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "needs root: run with --features privileged (scripts/test does)"
)]
fn a_flood_of_idle_connections_to_the_metrics_port_costs_no_thread_and_few_fds() {
    const FLOOD: usize = 2000;
    let (broker, addr) = broker_with_metrics(&[]);
    // What serving a client and a scrape starts (threads the broker keeps) is there before.
    let serve = |name: &str| {
        let mut client = broker.client();
        let lease = client.create(CreateLease::new(name, MIB)).unwrap();
        client.df().unwrap();
        let start = Instant::now();
        let s = samples(&scrape(addr));
        (client, lease, s, start.elapsed())
    };
    drop(serve("before"));
    let before = (broker.thread_count(), broker.fd_count(), broker.rss_kib());
    // Any local uid reaches a loopback port: uid 65534 opens FLOOD connections, half of them
    // silent, half sending a request they never finish, and keeps them open.
    let mut cmd = Command::new(bin_path("mb-flood"));
    cmd.arg(addr.to_string())
        .args(["tcp", &FLOOD.to_string()])
        .uid(65534)
        .gid(65534)
        .stderr(Stdio::inherit());
    let mut flood = Helper::spawn(cmd);
    assert_eq!(flood.line(), format!("connected {FLOOD}"));
    let (threads, fds, rss) = peak_usage(&broker, Duration::from_secs(1));
    let numbers = format!(
        "threads {} -> {threads}, fds {} -> {fds}, RSS {} -> {rss} KiB",
        before.0, before.1, before.2
    );
    eprintln!("under the flood: {numbers}");
    // The metrics server keeps at most 64 connections open, on the thread it has.
    assert!(threads <= before.0 + 2, "{numbers}");
    assert!(fds <= before.1 + 64 + 4, "{numbers}");
    assert!(rss <= before.2 + 16 * 1024, "{numbers}");

    // While the flood is held open, clients and scrapes are served.
    let (client, lease, s, took) = serve("during");
    eprintln!("a scrape under the flood took {took:?}");
    assert!(took < Duration::from_secs(2), "a scrape took {took:?}");
    assert_eq!(
        value(&s, "membroker_requests_total{op=\"create\",result=\"ok\"}"),
        2
    );
    let closed: usize = flood
        .send("check")
        .strip_prefix("closed ")
        .and_then(|n| n.parse().ok())
        .expect("closed K");
    assert!(
        closed >= FLOOD - 64,
        "the broker closed {closed} of {FLOOD}"
    );

    drop((lease, client));
    drop(flood);
    wait_until(
        Duration::from_secs(10),
        "threads and fds back to where they were",
        || broker.thread_count() <= before.0 && broker.fd_count() <= before.1,
    );
}

#[test]
fn textfile_is_replaced_whole_and_readable_by_others() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("membroker.prom");
    let path_arg = path.to_str().unwrap();
    let (broker, _) =
        broker_with_metrics(&["--metrics-textfile", path_arg, "--metrics-interval", "0.05"]);
    let mut client = broker.client();
    let _lease = client.create(CreateLease::new("tf", 3 * MIB)).unwrap();
    wait_until(Duration::from_secs(5), "the lease in the text file", || {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        // Never half a file: whatever is there ends with the last family.
        assert!(
            text.is_empty() || text.contains("membroker_build_info{"),
            "a torn file:\n{text}"
        );
        text.contains(&format!(
            "membroker_pool_used_bytes{{pool=\"main\",kind=\"memfd\",page_size=\"4K\"}} {}\n",
            3 * MIB
        ))
    });
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "node_exporter runs as another user");
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".prom"))
        .collect();
    assert_eq!(
        names,
        ["membroker.prom"],
        "only the file itself ends in .prom"
    );
}

/// `promtool check metrics` on `text`: its complaints, empty if none.
fn promtool_check(text: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() && complaints.is_empty() {
        return format!("promtool failed: {}", out.status);
    }
    complaints
}

#[test]
#[cfg_attr(
    not(feature = "promtool"),
    ignore = "needs promtool (Debian package prometheus): --features membroker-tests/promtool"
)]
fn promtool_accepts_the_exposition() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("membroker.prom");
    let (broker, addr) = broker_with_metrics(&["--metrics-textfile", path.to_str().unwrap()]);
    // Before any request: empty families.
    assert_eq!(promtool_check(&scrape(addr)), "");
    let mut client = broker.client();
    let _a = client.create(CreateLease::new("a", MIB)).unwrap();
    let _ = client.create(CreateLease::new("a", MIB)).unwrap_err();
    client.stat("a").unwrap();
    let text = scrape(addr);
    assert!(text.contains("result=\"exists\""), "{text}");
    assert_eq!(promtool_check(&text), "", "{text}");
    let file = std::fs::read_to_string(&path).unwrap();
    assert_eq!(promtool_check(&file), "", "{file}");
}
