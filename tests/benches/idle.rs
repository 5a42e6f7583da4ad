//! Idle connections: what 10 000 connected clients that said Hello and wait cost the broker
//! (resident memory per connection, threads, files), and whether a request is still answered
//! promptly among them.
//!
//! `scripts/bench idle` (release build, as root: root is not limited per uid). `IDLE_CLIENTS`
//! changes the count (default 10 000).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use membroker_tests::{TestBroker, bin_path};

fn status(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{key} of {pid}"))
}

fn main() {
    let clients: usize = std::env::var("IDLE_CLIENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    let broker = TestBroker::start(&["--pool", "memfd:t:64M", "--no-sync"]);
    let pid = broker.pid();
    let mut warm = broker.client();
    warm.df().unwrap();
    drop(warm);
    std::thread::sleep(Duration::from_millis(300));
    let (rss0, threads0, fds0) = (
        status(pid, "VmRSS:"),
        broker.thread_count(),
        broker.fd_count(),
    );
    let started = Instant::now();
    let mut flood = Command::new(bin_path("mb-flood"))
        .arg(broker.socket())
        .args(["hello", &clients.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("mb-flood");
    let mut out = BufReader::new(flood.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let connect_time = started.elapsed();
    assert_eq!(
        line.trim(),
        format!("connected {clients} refused 0"),
        "{}",
        broker.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    let (rss1, threads1, fds1) = (
        status(pid, "VmRSS:"),
        broker.thread_count(),
        broker.fd_count(),
    );
    let mut client = broker.client();
    let mut worst = Duration::ZERO;
    for _ in 0..100 {
        let t = Instant::now();
        client.df().unwrap();
        worst = worst.max(t.elapsed());
    }
    drop(client);
    writeln!(flood.stdin.as_mut().unwrap()).ok();
    drop(flood.stdin.take());
    flood.wait().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (rss2, threads2, fds2) = (
        status(pid, "VmRSS:"),
        broker.thread_count(),
        broker.fd_count(),
    );
    println!("membroker idle connections ({clients} clients, each said Hello, then waits)");
    println!(
        "  connect + Hello, all of them      {:.2} s",
        connect_time.as_secs_f64()
    );
    println!("  broker RSS  before {rss0} KiB   with them {rss1} KiB   after they left {rss2} KiB");
    println!(
        "  RSS per idle connection           {:.2} KiB",
        (rss1.saturating_sub(rss0)) as f64 / clients as f64
    );
    println!("  threads     before {threads0}   with them {threads1}   after {threads2}");
    println!("  open files  before {fds0}   with them {fds1}   after {fds2}");
    println!(
        "  df among them, worst of 100       {:.2} ms",
        worst.as_secs_f64() * 1e3
    );
}
