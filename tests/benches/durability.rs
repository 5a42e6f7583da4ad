//! Durability at speed: create + release throughput with the journal synced (group commit)
//! against `--no-sync`, with 1 and 16 concurrent clients, brokers alternating; and one
//! client's create latency with the journal synced.
//!
//! `cargo bench -p membroker-tests --bench durability` (or `scripts/bench durability`);
//! `BENCH_REPS` repetitions (default 5), medians. `MEMBROKER_BIN` runs another broker binary
//! (e.g. an older one, to compare).

use std::time::{Duration, Instant};

use membroker_client::{Client, CreateLease};
use membroker_tests::TestBroker;

fn median<T: PartialOrd + Copy>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).expect("comparable"));
    v[v.len() / 2]
}

/// `clients` threads, each doing `each` create + release pairs of a 4 KiB non-persistent
/// lease; returns pairs per second.
fn throughput(broker: &TestBroker, clients: usize, each: usize) -> f64 {
    let socket = broker.socket().to_path_buf();
    let started = Instant::now();
    std::thread::scope(|s| {
        for c in 0..clients {
            let socket = socket.clone();
            s.spawn(move || {
                let mut client = Client::connect(&socket).expect("connect");
                for i in 0..each {
                    let name = format!("bench/{c}/{i}");
                    let lease = client
                        .create(CreateLease::new(&name, 4096))
                        .expect("create");
                    client.release(&name).expect("release");
                    drop(lease);
                }
            });
        }
    });
    (clients * each) as f64 / started.elapsed().as_secs_f64()
}

/// One client's create latencies (each followed by a release, not timed).
fn create_latencies(broker: &TestBroker, n: usize) -> Vec<Duration> {
    let mut client = broker.client();
    (0..n)
        .map(|i| {
            let name = format!("lat/{i}");
            let t = Instant::now();
            let lease = client
                .create(CreateLease::new(&name, 4096))
                .expect("create");
            let d = t.elapsed();
            client.release(&name).expect("release");
            drop(lease);
            d
        })
        .collect()
}

fn main() {
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let synced = TestBroker::start(&["--pool", "memfd:t:1G"]);
    let unsynced = TestBroker::start(&["--pool", "memfd:t:1G", "--no-sync"]);
    println!("membroker durability benchmark ({reps} alternating repetitions, medians)");
    println!("create + release of a 4 KiB lease, pairs per second:");
    for (clients, each) in [(1, 400), (16, 100)] {
        let (mut with, mut without) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            with.push(throughput(&synced, clients, each));
            without.push(throughput(&unsynced, clients, each));
        }
        let (with, without) = (median(with), median(without));
        println!(
            "  {clients:>2} client{}   fdatasync {with:>8.0}/s   --no-sync {without:>8.0}/s   ratio {:.2}",
            if clients == 1 { " " } else { "s" },
            with / without
        );
    }
    let mut p50 = Vec::new();
    for _ in 0..reps {
        let mut lat = create_latencies(&synced, 200);
        lat.sort();
        p50.push(lat[lat.len() / 2]);
    }
    println!(
        "one client, create with fdatasync: p50 {:.1} µs",
        median(p50).as_secs_f64() * 1e6
    );
}
