//! Restart benchmarks: how fast a broker serves again after a restart, what the journal's
//! fdatasync costs a request, and how long `membroker upgrade` keeps a client waiting.
//!
//! `scripts/bench restart` (release build). Medians over repetitions (`BENCH_REPS`, default
//! 5); the sync / no-sync comparison alternates its two brokers.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use membroker_client::{Client, CreateLease};
use membroker_tests::TestBroker;
use membroker_tests::systemd::{Service, raise_fd_limit};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn gid() -> String {
    rustix::process::getgid().as_raw().to_string()
}

/// CRC-32 (IEEE), as the journal uses.
fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// Writes a journal of `n` persistent 4 KiB memfd leases of pool `t`, in the documented
/// format (`CRC32HEX JSON\n`).
fn write_journal(dir: &std::path::Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let uid = rustix::process::getuid().as_raw();
    let gid = rustix::process::getgid().as_raw();
    let mut out = Vec::with_capacity(n * 240);
    for id in 1..=n {
        let json = serde_json::json!({
            "op": "lease", "id": id, "name": format!("bench/{id}"), "pool": "t", "size": 4096,
            "page_size": "4K", "uid": uid, "gid": gid, "mode": 0o600, "persistent": true,
            "created": 1_795_700_000u64, "extents": [{"start": 0, "len": 4096}], "device": null,
        })
        .to_string();
        writeln!(out, "{:08x} {json}", crc32(json.as_bytes())).unwrap();
    }
    std::fs::write(dir.join("journal"), out).unwrap();
}

/// Waits until the socket accepts and `df` answers; returns when.
fn wait_serving(socket: &std::path::Path, deadline: Duration) -> Instant {
    let start = Instant::now();
    loop {
        if let Ok(mut c) = Client::connect(socket)
            && c.df().is_ok()
        {
            return Instant::now();
        }
        assert!(start.elapsed() < deadline, "broker not serving");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The broker's own "state restored … ms=N" of its last start.
fn restored_ms(log: &str) -> String {
    log.lines()
        .rev()
        .find(|l| l.contains("state restored"))
        .and_then(|l| l.split("ms=").nth(1))
        .map(|m| format!("{} ms", m.trim()))
        .unwrap_or_else(|| "?".into())
}

/// (a) with real memfds through the fd store: `n` leases made by the broker, kill -9, restart.
fn start_with_fd_store(n: usize, reps: usize) -> (Duration, String) {
    raise_fd_limit(4 * n as u64 + 4096);
    let mut svc = Service::start(&["--pool", "memfd:t:2G"]);
    let mut client = svc.client();
    for i in 0..n {
        let name = format!("bench/{i}");
        client
            .create(CreateLease::new(&name, 4096).persistent(true))
            .unwrap();
        client.release(&name).unwrap();
    }
    drop(client);
    let mut times = Vec::new();
    let mut inner = String::new();
    for _ in 0..reps {
        svc.kill9();
        assert_eq!(svc.store_names().len(), n);
        let ready = svc.ready_count();
        svc.spawn();
        let started = svc.spawned_at().unwrap();
        let serving = wait_serving(svc.socket(), Duration::from_secs(60));
        times.push(serving - started);
        svc.wait_ready(ready);
        inner = restored_ms(&svc.log());
    }
    let leases: u64 = svc.client().df().unwrap().iter().map(|p| p.leases).sum();
    assert_eq!(leases as usize, n, "every lease restored");
    // The harness's own share: bash moving the n fds to 3.. and exec'ing (here /bin/true).
    svc.kill9();
    svc.set_exe(std::path::Path::new("/bin/true"));
    let mut launch = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let (status, _) = svc.run_to_exit();
        assert!(status.success());
        launch.push(t.elapsed());
    }
    (
        median(times),
        format!("{inner}; harness launch {}", ms(median(launch))),
    )
}

/// (a) from a journal written directly whose memfds nobody kept: every lease is lost at start
/// (and journaled freed), so each start gets a fresh copy of the journal.
fn start_with_lost_leases(n: usize, reps: usize, sync: bool) -> (Duration, String) {
    let mut args = vec!["--pool", "memfd:t:2G"];
    if !sync {
        args.push("--no-sync");
    }
    let mut svc = Service::new(&membroker_tests::bin_path("membroker"), &args);
    let mut times = Vec::new();
    let mut inner = String::new();
    for _ in 0..reps {
        svc.kill9();
        write_journal(&svc.state_dir(), n);
        svc.spawn();
        let started = svc.spawned_at().unwrap();
        let serving = wait_serving(svc.socket(), Duration::from_secs(120));
        times.push(serving - started);
        inner = restored_ms(&svc.log());
    }
    (median(times), inner)
}

/// (b) `rounds` create + release round trips of a non-persistent 4 KiB lease; per-op times.
fn round_trips(broker: &TestBroker, rounds: usize) -> Vec<Duration> {
    let mut client = broker.client();
    (0..rounds)
        .map(|i| {
            let name = format!("rt/{i}");
            let t = Instant::now();
            let lease = client.create(CreateLease::new(&name, 4096)).unwrap();
            client.release(&name).unwrap();
            let d = t.elapsed();
            drop(lease);
            d
        })
        .collect()
}

/// (c) one upgrade while a client `stat`s every 100 µs: the longest gap between two answers.
fn upgrade_blackout(broker: &TestBroker) -> (Duration, Option<String>) {
    let stop = Arc::new(AtomicBool::new(false));
    let socket = broker.socket().to_path_buf();
    let poller = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let connect = || loop {
                if let Ok(mut c) = Client::connect(&socket) {
                    c.set_reconnect_timeout(Duration::ZERO);
                    return c;
                }
                std::thread::sleep(Duration::from_micros(50));
            };
            let mut client = connect();
            let mut last = Instant::now();
            let mut longest = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                match client.stat("bench/0") {
                    Ok(_) => {
                        let now = Instant::now();
                        longest = longest.max(now - last);
                        last = now;
                    }
                    Err(e) if e.code().is_some() => panic!("stat: {e}"),
                    Err(_) => client = connect(),
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            longest
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    let out = broker.run_cli(&["upgrade"]);
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    let failed = (!out.status.success()).then(|| {
        let err = String::from_utf8_lossy(&out.stderr);
        err.trim().to_string()
    });
    (poller.join().unwrap(), failed)
}

fn main() {
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    println!("membroker restart benchmarks ({reps} repetitions, medians)");

    // (a) start to serving.
    println!("start → serving (spawn until connect + df answer; broker's own restore time):");
    let (t, inner) = start_with_fd_store(10_000, reps);
    println!(
        "  10 000 leases, memfds from the fd store   {:>10}   (broker {inner}, last run; target < 200 ms)",
        ms(t)
    );
    let lost: Vec<(usize, bool, Duration, String)> =
        [(10_000, false), (100_000, false), (1_000, true)]
            .into_iter()
            .map(|(n, sync)| {
                let (t, inner) = start_with_lost_leases(n, reps.min(3), sync);
                (n, sync, t, inner)
            })
            .collect();
    for (n, sync, t, inner) in &lost {
        println!(
            "  {:>7} leases lost at start ({})   {:>10}   (broker {inner}, last run)",
            n,
            if *sync { "fdatasync" } else { "--no-sync" },
            ms(*t)
        );
    }
    let ratio = lost[1].2.as_secs_f64() / lost[0].2.as_secs_f64();
    println!("  growth 10 000 → 100 000 leases (lost, --no-sync): ×{ratio:.1}");

    // (b) create + release with and without fdatasync, alternating.
    let synced = TestBroker::start(&["--pool", "memfd:t:1G"]);
    let unsynced = TestBroker::start(&["--pool", "memfd:t:1G", "--no-sync"]);
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        with.push(median(round_trips(&synced, 200)));
        without.push(median(round_trips(&unsynced, 200)));
    }
    let (with, without) = (median(with), median(without));
    println!("create + release round trip, 4 KiB non-persistent lease, 200 per repetition:");
    println!(
        "  fdatasync {:>10}   --no-sync {:>10}   ratio {:.2}",
        us(with),
        us(without),
        with.as_secs_f64() / without.as_secs_f64()
    );
    drop((synced, unsynced));

    // (c) upgrade blackout with 1 000 leases.
    let broker = TestBroker::start(&["--pool", "memfd:t:1G", "--admin-group", &gid()]);
    let mut client = broker.client();
    for i in 0..1000 {
        let name = format!("bench/{i}");
        client
            .create(CreateLease::new(&name, 4096).persistent(true))
            .unwrap();
        client.release(&name).unwrap();
    }
    drop(client);
    let mut gaps = Vec::new();
    let mut cli_failures = Vec::new();
    for _ in 0..reps {
        let (gap, failed) = upgrade_blackout(&broker);
        gaps.push(gap);
        cli_failures.extend(failed);
    }
    let instance = broker.client().server().to_string();
    let worst = *gaps.iter().max().unwrap();
    println!("membroker upgrade with 1 000 leases, a client stat every 100 µs:");
    println!(
        "  longest wait  median {:>10}   worst {:>10}   (normal gap ≈ 0.1 ms + a stat)",
        ms(median(gaps)),
        ms(worst)
    );
    if let Some(first) = cli_failures.first() {
        println!(
            "  note: `membroker upgrade` exited non-zero {} of {reps} times although the broker \
             was re-executed (now {instance}): {first}",
            cli_failures.len()
        );
    }
}
