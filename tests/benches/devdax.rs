//! device-dax benchmarks, run inside the project's dax VM (tests/vm/run-in-vm; TCG, so only
//! ratios mean anything): lease create latency against the number of extents, and scrub
//! throughput against a plain memset of the same memory, with 1, 2 and 4 scrub workers.
//!
//! `scripts/bench` runs it; on the host it boots the VM and runs itself inside.

use std::time::{Duration, Instant};

use membroker_client::CreateLease;
use membroker_tests::{TestBroker, in_dax_vm};

const MIB: u64 = 1 << 20;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn wait_scrubbed(broker: &TestBroker) -> Duration {
    let start = Instant::now();
    let mut client = broker.client();
    while client.df().unwrap()[0].scrubbing != 0 {
        std::thread::sleep(Duration::from_micros(500));
    }
    start.elapsed()
}

/// Create latency of a lease that must span k 64 MiB holes.
fn create_latency() {
    membroker_tests::reset_dax_region();
    let broker = TestBroker::start(&["--pool", "devdax:dax:region0:2M"]);
    let mut client = broker.client();
    for i in 0..32 {
        let name = format!("f/{i:02}");
        client
            .create(CreateLease::new(&name, 64 * MIB).persistent(true))
            .unwrap();
        client.release(&name).unwrap();
    }
    for i in (0..32).step_by(2) {
        client.remove(&format!("f/{i:02}")).unwrap();
    }
    wait_scrubbed(&broker);
    println!("lease create latency against extents (16 free 64 MiB holes, medians of 5):");
    let mut base = None;
    for k in [1u64, 2, 4, 8] {
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let lease = client.create(CreateLease::new("k", k * 64 * MIB)).unwrap();
            times.push(t.elapsed());
            assert_eq!(lease.info().extents.len() as u64, k);
            drop(lease);
            client.release("k").unwrap();
            wait_scrubbed(&broker);
        }
        let m = median(times);
        let b = *base.get_or_insert(m);
        println!(
            "  {k:>2} extents  {:>8.2} ms   ratio to 1 extent {:.2}",
            m.as_secs_f64() * 1e3,
            m.as_secs_f64() / b.as_secs_f64()
        );
    }
}

/// Scrub throughput with `workers` threads against memset of the same bytes.
fn scrub(workers: usize, leases: usize, size: u64) -> (f64, f64) {
    membroker_tests::reset_dax_region();
    let broker = TestBroker::start(&[
        "--pool",
        "devdax:dax:region0:2M",
        "--scrub-workers",
        &workers.to_string(),
    ]);
    let mut client = broker.client();
    let mut memset = Duration::ZERO;
    for i in 0..leases {
        let name = format!("s/{i}");
        let lease = client.create(CreateLease::new(&name, size)).unwrap();
        let map = lease.map().unwrap();
        map.fill(0, map.len(), 0xee).unwrap(); // fault it in, dirty it
        let t = Instant::now();
        map.fill(0, map.len(), 0).unwrap();
        memset += t.elapsed();
    }
    let total = (leases as u64 * size) as f64 / (1u64 << 30) as f64;
    let start = Instant::now();
    for i in 0..leases {
        client.release(&format!("s/{i}")).unwrap();
    }
    let released = start.elapsed();
    let scrubbed = wait_scrubbed(&broker) + released;
    (total / scrubbed.as_secs_f64(), total / memset.as_secs_f64())
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !in_dax_vm("", &["--dax-size", "2G", "--ram", "2G"]) {
        return;
    }
    println!("device-dax benchmarks inside the dax VM (TCG, 2 vCPUs): ratios only");
    create_latency();
    println!("scrub throughput against memset of the same memory (4 leases of 256 MiB):");
    for workers in [1, 2, 4] {
        let mut ratios = Vec::new();
        let mut last = (0.0, 0.0);
        for _ in 0..3 {
            last = scrub(workers, 4, 256 * MIB);
            ratios.push(last.0 / last.1);
        }
        ratios.sort_by(f64::total_cmp);
        println!(
            "  {workers} worker(s)  scrub {:>6.2} GiB/s  memset {:>6.2} GiB/s  ratio {:.2} (median of 3)",
            last.0, last.1, ratios[1]
        );
    }
}
