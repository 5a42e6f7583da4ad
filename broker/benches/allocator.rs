//! The device-dax extent allocator on a simulated 64 TiB pool.
//!
//! 100 000 VM creates and about as many releases, sizes like VMs (1–64 GiB at 1 GiB alignment,
//! 512 MiB–16 GiB at 2 MiB alignment), the pool kept 60–90 % full (leased + dirty), then again
//! 90–99 % full to stress fragmentation; releases go
//! dirty and are scrubbed after a random delay. The same driver runs a naive first-fit allocator
//! (lowest address first, as many extents as it takes) to show what fewest-extents / best-fit buys.
//!
//! `cargo bench -p membroker --bench allocator`; `ALLOC_BENCH_SEED=N` replays another sequence.

use std::collections::{BTreeMap, VecDeque};
use std::hint::black_box;
use std::time::Instant;

use membroker::pool::extents::ExtentAllocator;
use membroker_client::proto::Extent;

const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;
const BASE: u64 = 0x40_0000_0000;
const POOL: u64 = 64 << 40;
const CREATES: usize = 100_000;
/// Fill ranges (leased + dirty): the asked-for one, and a stress run where holes run short.
const SCENARIOS: [(f64, f64); 2] = [(0.60, 0.90), (0.90, 0.99)];
/// Most steps between a release and its scrub.
const MAX_SCRUB_DELAY: u64 = 200;
/// Bytes one scrubber takes at a time.
const SCRUB_CHUNK: u64 = 64 * G1;

/// xorshift64*: small, fast, good enough for picking sizes.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// What the driver needs from an allocator.
trait Allocator {
    fn name(&self) -> &'static str;
    fn allocate(&mut self, size: u64, align: u64) -> Option<Vec<Extent>>;
    /// A lease comes back (it must be scrubbed before reuse).
    fn release(&mut self, extents: Vec<Extent>);
    /// The scrubbers finish `bytes` bytes (what was released that long ago).
    fn scrub(&mut self, bytes: u64, timings: &mut Vec<u64>);
    fn free_aligned(&self, align: u64) -> u64;
    fn free_extents(&self) -> usize;
    fn memory_bytes(&self) -> usize;
}

impl Allocator for ExtentAllocator {
    fn name(&self) -> &'static str {
        "fewest-extents"
    }

    fn allocate(&mut self, size: u64, align: u64) -> Option<Vec<Extent>> {
        ExtentAllocator::allocate(self, size, align)
    }

    fn release(&mut self, extents: Vec<Extent>) {
        ExtentAllocator::release(self, &extents).expect("releasing a live lease");
    }

    fn scrub(&mut self, mut bytes: u64, timings: &mut Vec<u64>) {
        while bytes > 0 {
            let t = Instant::now();
            let Some(range) = self.take_dirty(bytes.min(SCRUB_CHUNK)) else {
                break;
            };
            self.scrubbed(range).expect("scrubbing what was taken");
            timings.push(t.elapsed().as_nanos() as u64);
            bytes -= range.len;
        }
    }

    fn free_aligned(&self, align: u64) -> u64 {
        self.free_aligned_bytes(align)
    }

    fn free_extents(&self) -> usize {
        self.free_extent_count()
    }

    fn memory_bytes(&self) -> usize {
        self.approx_memory_bytes()
    }
}

/// Naive baseline: a free list by address, first fit, taking the aligned part of each free range
/// from the lowest address up until the size is covered. Released leases wait (dirty) in a FIFO.
struct FirstFit {
    /// start → end of free ranges, coalesced.
    free: BTreeMap<u64, u64>,
    dirty: VecDeque<Extent>,
}

impl FirstFit {
    fn new(base: u64, len: u64) -> FirstFit {
        FirstFit {
            free: BTreeMap::from([(base, base + len)]),
            dirty: VecDeque::new(),
        }
    }

    fn insert_free(&mut self, e: Extent) {
        let (mut start, mut end) = (e.start, e.start + e.len);
        let before = self.free.range(..start).next_back().map(|(&s, &e)| (s, e));
        if let Some((s, _)) = before.filter(|&(_, e)| e == start) {
            self.free.remove(&s);
            start = s;
        }
        if let Some(ne) = self.free.remove(&end) {
            end = ne;
        }
        self.free.insert(start, end);
    }
}

fn usable(start: u64, end: u64, align: u64) -> (u64, u64) {
    let s = start.next_multiple_of(align);
    (s, (end & !(align - 1)).saturating_sub(s))
}

impl Allocator for FirstFit {
    fn name(&self) -> &'static str {
        "naive first-fit"
    }

    fn allocate(&mut self, size: u64, align: u64) -> Option<Vec<Extent>> {
        let mut picks = Vec::new();
        let mut rem = size;
        for (&start, &end) in &self.free {
            let (s, len) = usable(start, end, align);
            if len > 0 {
                let take = len.min(rem);
                picks.push((
                    start,
                    Extent {
                        start: s,
                        len: take,
                    },
                ));
                rem -= take;
                if rem == 0 {
                    break;
                }
            }
        }
        if rem > 0 {
            return None;
        }
        for &(range_start, e) in &picks {
            let range_end = self.free.remove(&range_start).expect("picked a free range");
            if range_start < e.start {
                self.free.insert(range_start, e.start);
            }
            if e.start + e.len < range_end {
                self.free.insert(e.start + e.len, range_end);
            }
        }
        Some(picks.into_iter().map(|(_, e)| e).collect())
    }

    fn release(&mut self, extents: Vec<Extent>) {
        self.dirty.extend(extents);
    }

    fn scrub(&mut self, mut bytes: u64, timings: &mut Vec<u64>) {
        while bytes > 0 {
            let Some(e) = self.dirty.pop_front() else {
                break;
            };
            let t = Instant::now();
            self.insert_free(e);
            timings.push(t.elapsed().as_nanos() as u64);
            bytes = bytes.saturating_sub(e.len);
        }
    }

    fn free_aligned(&self, align: u64) -> u64 {
        self.free.iter().map(|(&s, &e)| usable(s, e, align).1).sum()
    }

    fn free_extents(&self) -> usize {
        self.free.len()
    }

    fn memory_bytes(&self) -> usize {
        self.free.len() * size_of::<(u64, u64)>()
    }
}

#[derive(Default)]
struct Report {
    creates: usize,
    /// Creates for which the aligned free space sufficed, and of those, the ones that worked.
    eligible: usize,
    succeeded: usize,
    /// Creates refused for lack of aligned space (correctly).
    refused: usize,
    releases: usize,
    extents_per_lease: Vec<u64>,
    allocate_ns: Vec<u64>,
    release_ns: Vec<u64>,
    scrub_ns: Vec<u64>,
    free_extents_sum: u64,
    free_extents_max: usize,
    memory_max: usize,
    memory_end: usize,
    samples: u64,
    fill_min: f64,
    fill_max: f64,
}

/// The VM-like request mix: half 1–64 GiB at 1 GiB, half 512 MiB–16 GiB at 2 MiB.
fn vm_size(rng: &mut Rng) -> (u64, u64) {
    if rng.next().is_multiple_of(2) {
        (rng.range(1, 64) * G1, G1)
    } else {
        (rng.range(256, 8192) * M2, M2)
    }
}

fn simulate(alloc: &mut dyn Allocator, seed: u64, (low, high): (f64, f64)) -> Report {
    let mut rng = Rng::new(seed);
    let mut report = Report {
        fill_min: 1.0,
        ..Report::default()
    };
    let mut live: Vec<(u64, Vec<Extent>)> = Vec::new();
    let mut used = 0u64; // leased + dirty
    let mut scrubs: BTreeMap<(u64, u64), u64> = BTreeMap::new(); // (due, seq) → bytes
    let mut step = 0u64;
    while report.creates < CREATES {
        step += 1;
        while let Some(entry) = scrubs.first_entry() {
            if entry.key().0 > step {
                break;
            }
            let bytes = entry.remove();
            alloc.scrub(bytes, &mut report.scrub_ns);
            used -= bytes;
        }
        let fill = used as f64 / POOL as f64;
        if report.fill_max >= low {
            report.fill_min = report.fill_min.min(fill);
        }
        report.fill_max = report.fill_max.max(fill);
        let create = fill < low || (fill <= high && rng.next().is_multiple_of(2));
        if create || live.is_empty() {
            let (size, align) = vm_size(&mut rng);
            if used + size > (POOL as f64 * high) as u64 {
                continue;
            }
            report.creates += 1;
            let enough = alloc.free_aligned(align) >= size;
            let t = Instant::now();
            let got = black_box(alloc.allocate(size, align));
            report.allocate_ns.push(t.elapsed().as_nanos() as u64);
            match got {
                Some(extents) => {
                    report.eligible += usize::from(enough);
                    report.succeeded += usize::from(enough);
                    assert!(enough, "{} allocated more than it had", alloc.name());
                    report.extents_per_lease.push(extents.len() as u64);
                    used += size;
                    live.push((size, extents));
                }
                None if enough => report.eligible += 1,
                None => report.refused += 1,
            }
        } else {
            let (size, extents) = live.swap_remove((rng.next() % live.len() as u64) as usize);
            let t = Instant::now();
            alloc.release(black_box(extents));
            report.release_ns.push(t.elapsed().as_nanos() as u64);
            report.releases += 1;
            let due = step + rng.range(1, MAX_SCRUB_DELAY);
            scrubs.insert((due, step), size);
        }
        if step.is_multiple_of(64) {
            let n = alloc.free_extents();
            report.free_extents_sum += n as u64;
            report.samples += 1;
            report.free_extents_max = report.free_extents_max.max(n);
            report.memory_max = report.memory_max.max(alloc.memory_bytes());
        }
    }
    report.memory_end = alloc.memory_bytes();
    report
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summary(mut v: Vec<u64>) -> (f64, u64, u64, u64) {
    v.sort_unstable();
    let mean = v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    (
        mean,
        percentile(&v, 0.5),
        percentile(&v, 0.99),
        v.last().copied().unwrap_or(0),
    )
}

fn main() {
    let seed = std::env::var("ALLOC_BENCH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6d65_6d62_726f_6b72);
    println!(
        "allocator bench: pool {} TiB at {BASE:#x}, {CREATES} creates per run, scrub delay \
         1-{MAX_SCRUB_DELAY} steps, seed {seed} (ALLOC_BENCH_SEED)",
        POOL >> 40,
    );
    let started = Instant::now();
    let mut rows = Vec::new();
    for fill in SCENARIOS {
        let label = format!("{:.0}-{:.0}%", fill.0 * 100.0, fill.1 * 100.0);
        let mut ours = ExtentAllocator::new(BASE, POOL);
        rows.push((
            label.clone(),
            simulate(&mut ours, seed, fill),
            "fewest-extents",
        ));
        let mut naive = FirstFit::new(BASE, POOL);
        rows.push((label, simulate(&mut naive, seed, fill), "naive first-fit"));
    }
    println!();
    println!(
        "{:<7} {:<15} {:>9} {:>7} {:>9} {:>6} {:>4} {:>4} {:>8} {:>6} {:>8}",
        "fill",
        "allocator",
        "success",
        "refused",
        "fill seen",
        "ext/l",
        "p99",
        "max",
        "free ext",
        "max",
        "mem max",
    );
    for (fill, r, name) in &rows {
        let (mean, _, p99, max) = summary(r.extents_per_lease.clone());
        println!(
            "{:<7} {:<15} {:>8.3}% {:>7} {:>4.0}-{:<3.0}% {:>6.2} {:>4} {:>4} {:>8.0} {:>6} {:>7}K",
            fill,
            name,
            100.0 * r.succeeded as f64 / r.eligible.max(1) as f64,
            r.refused,
            100.0 * r.fill_min,
            100.0 * r.fill_max,
            mean,
            p99,
            max,
            r.free_extents_sum as f64 / r.samples.max(1) as f64,
            r.free_extents_max,
            r.memory_max.div_ceil(1024),
        );
    }
    println!();
    println!(
        "{:<7} {:<15} {:>15} {:>15} {:>15}",
        "fill", "ns: median/p99", "allocate", "release", "scrubbed"
    );
    for (fill, r, name) in &rows {
        let a = summary(r.allocate_ns.clone());
        let rel = summary(r.release_ns.clone());
        let s = summary(r.scrub_ns.clone());
        println!(
            "{:<7} {:<15} {:>7}/{:<7} {:>7}/{:<7} {:>7}/{:<7}",
            fill, name, a.1, a.2, rel.1, rel.2, s.1, s.2
        );
    }
    println!();
    for pair in rows.chunks(2) {
        let ours = summary(pair[0].1.extents_per_lease.clone()).0;
        let naive = summary(pair[1].1.extents_per_lease.clone()).0;
        println!(
            "fill {}: first-fit needs {:.2}x the extents per lease",
            pair[0].0,
            naive / ours
        );
    }
    println!(
        "success = leases granted / creates for which aligned free space sufficed (target 100 %); \
         refused = creates correctly refused for lack of aligned space"
    );
    println!(
        "mem = map + index entries (fewest-extents: every range of every state, 2 alignment \
         indexes) or free-list entries (first-fit, 16 B each), no B-tree node overhead"
    );
    println!(
        "first-fit 'release' is its free-list insert when the scrub ends; fewest-extents times \
         release() (leased to dirty) and take_dirty + scrubbed per {} GiB chunk",
        SCRUB_CHUNK >> 30
    );
    println!("ran in {:.1} s", started.elapsed().as_secs_f64());
}
