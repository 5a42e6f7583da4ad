//! Lease benchmarks: the broker path against doing the same locally, in one run.
//!
//! `scripts/bench` (root: it reserves huge pages and restores them). Reports medians over
//! alternating repetitions and the ratio broker / local (lower is better, 1.00 = no cost).

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use membroker_client::{CreateLease, LEASE_SEALS, PageSize};
use membroker_tests::{HugePages, TestBroker};
use rustix::fs::{FallocateFlags, MemfdFlags};
use rustix::mm::{MapFlags, ProtFlags};

const GIB: u64 = 1 << 30;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn memfd_flags(page: PageSize) -> MemfdFlags {
    let base = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    match page {
        PageSize::Base4K => base,
        PageSize::Huge2M => base | MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB,
        PageSize::Huge1G => base | MemfdFlags::HUGETLB | MemfdFlags::HUGE_1GB,
    }
}

/// A raw shared mapping for the local baseline, unmapped on drop.
struct RawMap(*mut u8, usize);

impl RawMap {
    #[allow(unsafe_code)]
    fn new(fd: Option<&OwnedFd>, len: usize) -> RawMap {
        let prot = ProtFlags::READ | ProtFlags::WRITE;
        // SAFETY: a fresh mapping at a kernel-chosen address; unmapped exactly once on drop.
        let ptr = unsafe {
            match fd {
                Some(fd) => {
                    rustix::mm::mmap(std::ptr::null_mut(), len, prot, MapFlags::SHARED, fd, 0)
                }
                None => {
                    rustix::mm::mmap_anonymous(std::ptr::null_mut(), len, prot, MapFlags::PRIVATE)
                }
            }
        }
        .expect("mmap");
        RawMap(ptr.cast(), len)
    }

    #[allow(unsafe_code)]
    fn touch(&self, stride: usize) {
        for off in (0..self.1).step_by(stride) {
            // SAFETY: off < len, inside our own mapping.
            unsafe { self.0.add(off).write_volatile(1) };
        }
    }
}

impl Drop for RawMap {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: exactly the range mmap returned.
        unsafe { rustix::mm::munmap(self.0.cast(), self.1) }.expect("munmap");
    }
}

/// memfd_create, ftruncate, fallocate, seal, mmap, touch the first page, unmap, close.
fn local_round_trip(size: u64, page: PageSize) -> Duration {
    let start = Instant::now();
    let fd = rustix::fs::memfd_create("local", memfd_flags(page)).expect("memfd_create");
    rustix::fs::ftruncate(&fd, size).expect("ftruncate");
    rustix::fs::fallocate(&fd, FallocateFlags::empty(), 0, size).expect("fallocate");
    rustix::fs::fcntl_add_seals(&fd, LEASE_SEALS).expect("seal");
    let map = RawMap::new(Some(&fd), size as usize);
    map.touch(size as usize);
    drop(map);
    drop(fd);
    start.elapsed()
}

/// create over the socket, receive fd, map, touch the first page, unmap, close, release.
fn broker_round_trip(client: &mut membroker_client::Client, size: u64, page: PageSize) -> Duration {
    let start = Instant::now();
    let lease = client
        .create(CreateLease::new("bench/rt", size).page_size(page))
        .expect("create");
    let map = lease.map().expect("map");
    map.store(0, 1).expect("touch");
    drop(map);
    drop(lease);
    client.release("bench/rt").expect("release");
    start.elapsed()
}

fn round_trips(broker: &TestBroker, page: PageSize, reps: usize) {
    let mut client = broker.client();
    let (mut local, mut remote) = (Vec::new(), Vec::new());
    local_round_trip(GIB, page); // warm-up
    broker_round_trip(&mut client, GIB, page);
    for _ in 0..reps {
        local.push(local_round_trip(GIB, page));
        remote.push(broker_round_trip(&mut client, GIB, page));
    }
    let (l, r) = (median(local), median(remote));
    println!(
        "round trip 1 GiB, {} pages    local {:>10}   broker {:>10}   ratio {:.3}",
        page,
        ms(l),
        ms(r),
        r.as_secs_f64() / l.as_secs_f64()
    );
}

fn small_lease_latency(broker: &TestBroker, n: usize) {
    let mut client = broker.client();
    let size = 2 << 20;
    let (mut create, mut release, mut local) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        let t = Instant::now();
        let lease = client
            .create(CreateLease::new("bench/small", size))
            .expect("create");
        create.push(t.elapsed());
        drop(lease);
        let t = Instant::now();
        client.release("bench/small").expect("release");
        release.push(t.elapsed());
        let t = Instant::now();
        let fd = rustix::fs::memfd_create("local", memfd_flags(PageSize::Base4K)).unwrap();
        rustix::fs::ftruncate(&fd, size).unwrap();
        rustix::fs::fallocate(&fd, FallocateFlags::empty(), 0, size).unwrap();
        rustix::fs::fcntl_add_seals(&fd, LEASE_SEALS).unwrap();
        drop(fd);
        local.push(t.elapsed());
    }
    let (c50, c99) = (percentile(&mut create, 0.5), percentile(&mut create, 0.99));
    let (r50, r99) = (
        percentile(&mut release, 0.5),
        percentile(&mut release, 0.99),
    );
    let (l50, l99) = (percentile(&mut local, 0.5), percentile(&mut local, 0.99));
    println!("2 MiB lease, {n} requests:");
    println!(
        "  create (socket + memfd + fd passing)  p50 {:>9}  p99 {:>9}",
        us(c50),
        us(c99)
    );
    println!(
        "  release                               p50 {:>9}  p99 {:>9}",
        us(r50),
        us(r99)
    );
    println!(
        "  local memfd+fallocate+seal+close      p50 {:>9}  p99 {:>9}",
        us(l50),
        us(l99)
    );
    println!(
        "  protocol cost per lease (create+release - local) p50 {}",
        us((c50 + r50).saturating_sub(l50))
    );
}

/// The cheapest request, `stat` (no journal, no fd): the broker's own per-request cost (the
/// dispatcher, its metrics, the socket round trip).
fn stat_latency(broker: &TestBroker, n: usize) {
    let mut client = broker.client();
    client
        .create(CreateLease::new("bench/stat", 4096).persistent(true))
        .expect("create");
    let mut took: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            client.stat("bench/stat").expect("stat");
            t.elapsed()
        })
        .collect();
    client.remove("bench/stat").expect("remove");
    let (p50, p99) = (percentile(&mut took, 0.5), percentile(&mut took, 0.99));
    println!(
        "stat, {n} requests                       p50 {:>9}  p99 {:>9}",
        us(p50),
        us(p99)
    );
}

/// Writes one byte per 4 KiB page of a fresh 1 GiB mapping; returns GiB/s.
fn populate(map: &RawMap) -> f64 {
    let t = Instant::now();
    map.touch(4096);
    GIB as f64 / (1u64 << 30) as f64 / t.elapsed().as_secs_f64()
}

fn populate_all(broker: &TestBroker, reps: usize, with_1g: bool) {
    let mut client = broker.client();
    let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
    for _ in 0..reps {
        let mut results = vec![(
            "anonymous memory, 4K".to_string(),
            populate(&RawMap::new(None, GIB as usize)),
        )];
        let pages = [PageSize::Base4K, PageSize::Huge2M, PageSize::Huge1G];
        for page in pages
            .into_iter()
            .filter(|p| with_1g || *p != PageSize::Huge1G)
        {
            let lease = client
                .create(CreateLease::new("bench/pop", GIB).page_size(page))
                .expect("create");
            let fd: OwnedFd = lease.as_fd().try_clone_to_owned().unwrap();
            let rate = populate(&RawMap::new(Some(&fd), GIB as usize));
            drop(fd);
            drop(lease);
            client.release("bench/pop").unwrap();
            results.push((format!("lease, {page}"), rate));
        }
        for (i, (name, rate)) in results.into_iter().enumerate() {
            if rows.len() <= i {
                rows.push((name, Vec::new()));
            }
            rows[i].1.push(rate);
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let base = med(&mut rows[0].1.clone());
    println!("populate 1 GiB (first write to every 4 KiB), medians of {reps}:");
    for (name, rates) in &mut rows {
        let m = med(rates);
        println!(
            "  {name:<22} {m:>7.2} GiB/s   ratio to anonymous {:.2}",
            m / base
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo bench --list
    }
    assert!(
        rustix::process::getuid().is_root(),
        "the lease benchmark needs root (huge pages)"
    );
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(7);
    // BENCH_SKIP_1G=1: no 1 GiB page row, for a host whose memory is too fragmented to give
    // one (the other rows do not need it).
    let with_1g = std::env::var_os("BENCH_SKIP_1G").is_none();
    let _two = HugePages::reserve(2048, 1024);
    let _one = with_1g.then(|| HugePages::reserve(1048576, 1));
    let mut pools = vec!["--pool", "memfd:small:4G", "--pool", "memfd:huge2m:2G:2M"];
    if with_1g {
        pools.extend(["--pool", "memfd:huge1g:1G:1G"]);
    }
    let broker = TestBroker::start(&pools);
    println!("membroker lease benchmarks ({reps} alternating repetitions, medians)");
    round_trips(&broker, PageSize::Base4K, reps);
    round_trips(&broker, PageSize::Huge2M, reps);
    small_lease_latency(&broker, 2000);
    stat_latency(&broker, 20000);
    populate_all(&broker, reps, with_1g);
}
