//! A crowded broker: what one create + release costs when the broker already keeps many
//! leases (each memfd lease is an open file of the broker's), against the same broker
//! empty. Every create checks the broker's open-file headroom; counting its files costs an
//! entry each, so a crowd used to slow every create down.
//!
//! `scripts/bench crowded` (release build, as root). `CROWD` sets the leases kept (default
//! 10 000, within the file limit the broker raises itself to), `BENCH_REPS` the repetitions
//! (default 5, medians). `MEMBROKER_BIN` runs another broker binary (an older one, to
//! compare).

use std::time::Instant;

use membroker_client::{Client, CreateLease};
use membroker_tests::{TestBroker, median};

/// Pairs of create + release of a 4 KiB lease per second, one client, `n` pairs.
fn pairs_per_second(client: &mut Client, n: usize) -> f64 {
    let started = Instant::now();
    for i in 0..n {
        let name = format!("bench/{i}");
        let lease = client
            .create(CreateLease::new(&name, 4096))
            .expect("create");
        client.release(&name).expect("release");
        drop(lease);
    }
    n as f64 / started.elapsed().as_secs_f64()
}

fn measure(client: &mut Client, reps: usize) -> f64 {
    median((0..reps).map(|_| pairs_per_second(client, 500)).collect())
}

fn main() {
    let env = |key: &str, default: usize| {
        std::env::var(key)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (crowd, reps) = (env("CROWD", 10_000), env("BENCH_REPS", 5));
    let broker = TestBroker::start(&["--pool", "memfd:t:1G", "--no-sync"]);
    let mut client = broker.client();
    println!(
        "membroker crowded-broker benchmark (--no-sync, one client, {reps} repetitions, medians)"
    );
    let empty = measure(&mut client, reps);
    let started = Instant::now();
    for i in 0..crowd {
        let name = format!("crowd/{i}");
        let lease = client
            .create(CreateLease::new(&name, 4096).persistent(true))
            .expect("create a lease of the crowd");
        client.release(&name).expect("release");
        drop(lease);
    }
    let filled = started.elapsed();
    let crowded = measure(&mut client, reps);
    println!("create + release of a 4 KiB lease, pairs per second:");
    println!("  empty broker                {empty:>8.0}/s");
    println!(
        "  {crowd} leases kept         {crowded:>8.0}/s   ratio {:.2}",
        crowded / empty
    );
    println!(
        "  making the {crowd} leases took {:.1} s",
        filled.as_secs_f64()
    );
}
