//! The device-dax extent allocator on a simulated 64 TiB pool, driven as the broker drives it.
//!
//! 100 000 VM creates and about as many releases, sizes like VMs (1–64 GiB at 1 GiB alignment,
//! 512 MiB–16 GiB at 2 MiB alignment), the pool kept 60–90 % full (leased, counting leases being
//! scrubbed), then again 90–99 % full to stress fragmentation. A released lease's device is
//! scrubbed for a random delay while its extents stay leased; then its extents are released, as
//! the broker does once the device is destroyed. One lease in [`POISON_EVERY`] gets a memory error
//! on a 2 MiB page while live: that page is quarantined, for good once the lease is released. The
//! same driver runs a naive first-fit allocator (lowest address first, as many extents as it
//! takes) to show what fewest-extents / best-fit buys.
//!
//! `cargo bench -p membroker --bench allocator`; `ALLOC_BENCH_SEED=N` replays another sequence.

use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;
use std::time::Instant;

use membroker::pool::extents::{ExtentAllocator, RangeState};
use membroker_client::proto::Extent;

const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;
const BASE: u64 = 0x40_0000_0000;
const POOL: u64 = 64 << 40;
const CREATES: usize = 100_000;
/// Fill ranges (leased, counting leases being scrubbed): the asked-for one, and a stress run
/// where holes run short.
const SCENARIOS: [(f64, f64); 2] = [(0.60, 0.90), (0.90, 0.99)];
/// Most steps between a lease's release request and the end of its scrub.
const MAX_SCRUB_DELAY: u64 = 200;
/// One lease in this many gets a memory error on one 2 MiB page.
const POISON_EVERY: u64 = 1000;

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
    /// A memory error in a live lease: `page` never comes back.
    fn quarantine(&mut self, page: Extent);
    /// A lease's extents come back, its device scrubbed and destroyed.
    fn release(&mut self, extents: Vec<Extent>);
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

    fn quarantine(&mut self, page: Extent) {
        ExtentAllocator::quarantine(self, page).expect("quarantining a leased page");
    }

    fn release(&mut self, extents: Vec<Extent>) {
        ExtentAllocator::release(self, &extents).expect("releasing a live lease");
    }

    fn free_aligned(&self, align: u64) -> u64 {
        self.free_aligned_bytes(align)
    }

    fn free_extents(&self) -> usize {
        self.ranges()
            .filter(|&(_, state)| state == RangeState::Free)
            .count()
    }

    fn memory_bytes(&self) -> usize {
        self.approx_memory_bytes()
    }
}

/// Naive baseline: a free list by address, first fit, taking the aligned part of each free range
/// from the lowest address up until the size is covered. Poisoned 2 MiB pages of live leases are
/// left out of the free list when their lease comes back.
struct FirstFit {
    /// start → end of free ranges, coalesced.
    free: BTreeMap<u64, u64>,
    /// Starts of poisoned 2 MiB pages in live leases.
    poisoned: BTreeSet<u64>,
}

impl FirstFit {
    fn new(base: u64, len: u64) -> FirstFit {
        FirstFit {
            free: BTreeMap::from([(base, base + len)]),
            poisoned: BTreeSet::new(),
        }
    }

    fn insert_free(&mut self, mut start: u64, mut end: u64) {
        if start == end {
            return;
        }
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

    fn quarantine(&mut self, page: Extent) {
        self.poisoned.insert(page.start);
    }

    fn release(&mut self, extents: Vec<Extent>) {
        for e in extents {
            let (mut at, end) = (e.start, e.start + e.len);
            let pages: Vec<u64> = self.poisoned.range(at..end).copied().collect();
            for page in pages {
                self.poisoned.remove(&page);
                self.insert_free(at, page);
                at = page + M2;
            }
            self.insert_free(at, end);
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
    /// 2 MiB pages quarantined.
    poisoned: usize,
    extents_per_lease: Vec<u64>,
    allocate_ns: Vec<u64>,
    release_ns: Vec<u64>,
    quarantine_ns: Vec<u64>,
    free_extents_sum: u64,
    free_extents_max: usize,
    memory_max: usize,
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

/// The physical 2 MiB page at `offset` of a lease (its file offsets follow its extents).
fn page_at(extents: &[Extent], mut offset: u64) -> Extent {
    for e in extents {
        if offset < e.len {
            return Extent {
                start: e.start + offset,
                len: M2,
            };
        }
        offset -= e.len;
    }
    unreachable!("offset past the lease")
}

fn simulate(alloc: &mut dyn Allocator, seed: u64, (low, high): (f64, f64)) -> Report {
    let mut rng = Rng::new(seed);
    // Its own stream, so the creates and releases are the same with or without poison.
    let mut poison_rng = Rng::new(seed ^ 0x706f_6973_6f6e);
    let mut report = Report {
        fill_min: 1.0,
        ..Report::default()
    };
    let mut live: Vec<(u64, Vec<Extent>)> = Vec::new();
    let mut used = 0u64; // leased, counting leases being scrubbed
    // (due, seq) → a lease being scrubbed: its size and extents, still leased.
    let mut scrubs: BTreeMap<(u64, u64), (u64, Vec<Extent>)> = BTreeMap::new();
    let mut step = 0u64;
    while report.creates < CREATES {
        step += 1;
        while let Some(entry) = scrubs.first_entry() {
            if entry.key().0 > step {
                break;
            }
            let (size, extents) = entry.remove();
            let t = Instant::now();
            alloc.release(black_box(extents));
            report.release_ns.push(t.elapsed().as_nanos() as u64);
            report.releases += 1;
            used -= size;
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
                    if poison_rng.next().is_multiple_of(POISON_EVERY) {
                        let offset = poison_rng.range(0, size / M2 - 1) * M2;
                        let page = page_at(&extents, offset);
                        let t = Instant::now();
                        alloc.quarantine(black_box(page));
                        report.quarantine_ns.push(t.elapsed().as_nanos() as u64);
                        report.poisoned += 1;
                    }
                    used += size;
                    live.push((size, extents));
                }
                None if enough => report.eligible += 1,
                None => report.refused += 1,
            }
        } else {
            // The release request: the device is scrubbed, its extents still leased.
            let lease = live.swap_remove((rng.next() % live.len() as u64) as usize);
            let due = step + rng.range(1, MAX_SCRUB_DELAY);
            scrubs.insert((due, step), lease);
        }
        if step.is_multiple_of(64) {
            let n = alloc.free_extents();
            report.free_extents_sum += n as u64;
            report.samples += 1;
            report.free_extents_max = report.free_extents_max.max(n);
            report.memory_max = report.memory_max.max(alloc.memory_bytes());
        }
    }
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
         1-{MAX_SCRUB_DELAY} steps, 1 lease in {POISON_EVERY} poisoned, seed {seed} \
         (ALLOC_BENCH_SEED)",
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
        "fill", "ns: median/p99", "allocate", "release", "quarantine"
    );
    for (fill, r, name) in &rows {
        let a = summary(r.allocate_ns.clone());
        let rel = summary(r.release_ns.clone());
        let s = summary(r.quarantine_ns.clone());
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
            "fill {}: first-fit needs {:.2}x the extents per lease ({} releases, {} pages \
             quarantined)",
            pair[0].0,
            naive / ours,
            pair[0].1.releases,
            pair[0].1.poisoned,
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
        "release = a scrubbed lease's extents back to free, its poisoned pages quarantined \
         (fewest-extents: release(); first-fit: free-list inserts); quarantine = marking a \
         poisoned page of a live lease"
    );
    println!("ran in {:.1} s", started.elapsed().as_secs_f64());
}
