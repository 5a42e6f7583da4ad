//! Unit and property tests of the extent allocator.

use proptest::prelude::*;

use super::*;

const K4: u64 = 4 << 10;
const M1: u64 = 1 << 20;
const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;

fn ext(start: u64, len: u64) -> Extent {
    Extent { start, len }
}

/// Checks every internal invariant against a recomputation from the map.
fn check_invariants(a: &ExtentAllocator) {
    let mut expect = a.base;
    let mut prev: Option<RangeState> = None;
    let mut bytes = [0u64; RangeState::ALL.len()];
    for (&start, span) in &a.map {
        assert_eq!(start, expect, "gap or overlap at {start:#x}");
        assert!(span.end > start, "empty range at {start:#x}");
        assert_ne!(prev, Some(span.state), "unmerged neighbours at {start:#x}");
        bytes[span.state.index()] += span.end - start;
        prev = Some(span.state);
        expect = span.end;
    }
    assert_eq!(expect, a.end, "the map does not reach the region end");
    assert_eq!(bytes, a.bytes);
    assert_eq!(bytes.iter().sum::<u64>(), a.end - a.base);
    assert_eq!(
        a.free_bytes() + a.leased_bytes() + a.quarantined_bytes(),
        a.end - a.base
    );
    for index in &a.indexes {
        let mut by_len = BTreeSet::new();
        let mut total = 0;
        for (s, e) in a.free_spans() {
            let len = usable(s, e, index.align);
            if len > 0 {
                by_len.insert((len, s));
                total += len;
            }
        }
        assert_eq!(by_len, index.by_len, "index {:#x}", index.align);
        assert_eq!(total, index.total, "index {:#x}", index.align);
    }
}

/// Ranges in `state`, lowest first.
fn ranges_in(a: &ExtentAllocator, state: RangeState) -> Vec<Extent> {
    a.ranges()
        .filter(|&(_, s)| s == state)
        .map(|(e, _)| e)
        .collect()
}

/// Number of (maximal) free ranges.
fn free_ranges(a: &ExtentAllocator) -> usize {
    ranges_in(a, RangeState::Free).len()
}

/// The largest aligned size that one extent could have now.
fn largest_free(a: &ExtentAllocator, align: u64) -> u64 {
    a.free_spans()
        .map(|(s, e)| usable(s, e, align))
        .max()
        .unwrap_or(0)
}

fn assert_aligned(extents: &[Extent], size: u64, align: u64) {
    assert!(!extents.is_empty());
    for e in extents {
        assert!(
            e.len > 0 && e.start % align == 0 && e.len % align == 0,
            "{e:?}"
        );
    }
    assert_eq!(extents.iter().map(|e| e.len).sum::<u64>(), size);
}

/// A region with free holes of the given sizes (in MiB, each 1 GiB-aligned), separated by
/// leased 2 MiB guards.
fn with_holes(holes_mib: &[u64]) -> (ExtentAllocator, Vec<Extent>) {
    let total: u64 = holes_mib
        .iter()
        .map(|h| h.next_multiple_of(1024) + 1024)
        .sum();
    let mut a = ExtentAllocator::new(0, total * M1);
    let mut at = 0;
    let mut holes = Vec::new();
    for &h in holes_mib {
        holes.push(ext(at, h * M1));
        let guard_end = (at + h * M1).next_multiple_of(G1) + G1;
        a.claim(&[ext(at + h * M1, guard_end - at - h * M1)])
            .unwrap();
        at = guard_end;
    }
    check_invariants(&a);
    (a, holes)
}

#[test]
fn new_region_is_all_free() {
    let a = ExtentAllocator::new(4 * G1, 8 * G1);
    check_invariants(&a);
    assert_eq!(a.free_bytes(), 8 * G1);
    assert_eq!(a.leased_bytes() + a.quarantined_bytes(), 0);
    assert_eq!(largest_free(&a, G1), 8 * G1);
    assert_eq!(free_ranges(&a), 1);
    assert_eq!((a.base, a.end), (4 * G1, 12 * G1));
    let empty = ExtentAllocator::new(G1, 0);
    check_invariants(&empty);
    assert_eq!(largest_free(&empty, M2), 0);
    assert_eq!(free_ranges(&empty), 0);
}

#[test]
fn single_extent_is_the_smallest_hole_that_fits() {
    let (mut a, holes) = with_holes(&[512, 2048, 64, 128, 1024]);
    let got = a.allocate(96 * M1, M2).unwrap();
    assert_eq!(got, vec![ext(holes[3].start, 96 * M1)]);
    let got = a.allocate(700 * M1, M2).unwrap();
    assert_eq!(got, vec![ext(holes[4].start, 700 * M1)]);
    assert_eq!(largest_free(&a, M2), 2048 * M1);
    check_invariants(&a);
}

#[test]
fn fragmented_pool_gives_fewest_extents_largest_first() {
    let (mut a, holes) = with_holes(&[512, 1024, 256, 128, 64]);
    // 1536 MiB: the two largest holes exactly.
    let got = a.allocate(1536 * M1, M2).unwrap();
    assert_eq!(got, vec![holes[1], holes[0]]);
    assert_aligned(&got, 1536 * M1, M2);
    check_invariants(&a);
}

#[test]
fn remainder_goes_to_the_smallest_hole_that_fits_it() {
    let (mut a, holes) = with_holes(&[1024, 256, 64, 128]);
    // 1024 + 100: the 1 GiB hole whole, then 100 MiB from the 128 MiB hole, not the 256 MiB one.
    let got = a.allocate(1124 * M1, M2).unwrap();
    assert_eq!(got, vec![holes[0], ext(holes[3].start, 100 * M1)]);
    assert_eq!(largest_free(&a, M2), 256 * M1);
    check_invariants(&a);
}

#[test]
fn unaligned_base_uses_only_aligned_subranges() {
    // [1 GiB + 4 KiB, 4 GiB + 3 MiB): 1 GiB-aligned part is [2 GiB, 4 GiB).
    let mut a = ExtentAllocator::new(G1 + K4, 3 * G1 + 3 * M1 - K4);
    assert_eq!(largest_free(&a, G1), 2 * G1);
    assert_eq!(a.free_aligned_bytes(G1), 2 * G1);
    assert_eq!(largest_free(&a, M2), 3 * G1);
    assert!(a.allocate(3 * G1, G1).is_none());
    let got = a.allocate(2 * G1, G1).unwrap();
    assert_eq!(got, vec![ext(2 * G1, 2 * G1)]);
    // The 2 MiB-aligned rest: [1 GiB + 2 MiB, 2 GiB) and [4 GiB, 4 GiB + 2 MiB).
    assert_eq!(a.free_aligned_bytes(M2), G1 - M2 + M2);
    let got = a.allocate(G1, M2).unwrap();
    assert_eq!(got, vec![ext(G1 + M2, G1 - M2), ext(4 * G1, M2)]);
    assert_eq!(a.free_aligned_bytes(M2), 0);
    assert_eq!(a.free_bytes(), M2 - K4 + M1);
    // An alignment not indexed from the start is indexed on first use.
    assert_eq!(largest_free(&a, M1), M1);
    assert_eq!(a.allocate(M1, M1), Some(vec![ext(G1 + M1, M1)]));
    check_invariants(&a);
}

#[test]
fn refuses_when_aligned_space_is_short() {
    let mut a = ExtentAllocator::new(0, 4 * G1);
    a.claim(&[ext(G1, M2), ext(3 * G1, M2)]).unwrap();
    // 4 GiB - 4 MiB free, but only 2 GiB of it 1 GiB-aligned.
    assert_eq!(a.free_aligned_bytes(G1), 2 * G1);
    let err = a.try_allocate(3 * G1, G1).unwrap_err();
    assert_eq!(
        err,
        ExtentError::NoSpace {
            size: 3 * G1,
            align: G1,
            free: 2 * G1
        }
    );
    let msg = err.to_string();
    assert!(
        msg.contains("0xc0000000") && msg.contains("0x80000000"),
        "{msg}"
    );
    assert!(a.allocate(3 * G1, M2).is_some());
    check_invariants(&a);
}

#[test]
fn invalid_requests_change_nothing() {
    let mut a = ExtentAllocator::new(0, 4 * G1);
    assert_eq!(
        a.try_allocate(G1, 0),
        Err(ExtentError::BadAlign { align: 0 })
    );
    assert_eq!(
        a.try_allocate(3 * M2, 3 * M2),
        Err(ExtentError::BadAlign { align: 3 * M2 })
    );
    assert_eq!(
        a.try_allocate(0, M2),
        Err(ExtentError::BadSize { size: 0, align: M2 })
    );
    assert_eq!(
        a.try_allocate(M1, M2),
        Err(ExtentError::BadSize {
            size: M1,
            align: M2
        })
    );
    assert_eq!(a.allocate(M1, M2), None);
    assert!(matches!(
        a.claim(&[ext(0, 0)]),
        Err(ExtentError::Empty { start: 0 })
    ));
    assert!(matches!(
        a.claim(&[ext(u64::MAX, 2)]),
        Err(ExtentError::OutsideRegion { .. })
    ));
    assert!(a.quarantine(ext(4 * G1 - M2, M2 + K4)).is_err());
    assert!(a.release(&[ext(0, M2)]).is_err());
    assert_eq!(a.free_aligned_bytes(3), 0);
    assert_eq!(a.free_aligned_bytes(0), 0);
    assert_eq!(a.free_bytes(), 4 * G1);
    assert_eq!(free_ranges(&a), 1);
    check_invariants(&a);
}

#[test]
fn leased_memory_is_not_handed_out_until_released() {
    // A released lease's device is scrubbed while its extents stay leased; only then released.
    let mut a = ExtentAllocator::new(0, 2 * G1);
    let lease = a.allocate(2 * G1, G1).unwrap();
    assert_eq!(a.leased_bytes(), 2 * G1);
    assert_eq!(a.allocate(M2, M2), None, "being scrubbed is still leased");
    a.release(&lease).unwrap();
    assert_eq!(a.free_bytes(), 2 * G1);
    assert_eq!(a.allocate(G1, G1), Some(vec![ext(0, G1)]));
    assert_eq!(a.allocate(G1, M2), Some(vec![ext(G1, G1)]));
    assert_eq!(a.allocate(M2, M2), None);
    check_invariants(&a);
}

#[test]
fn release_frees_at_once_and_coalesces() {
    let mut a = ExtentAllocator::new(0, 4 * G1);
    let leases: Vec<_> = (0..4).map(|_| a.allocate(G1, G1).unwrap()).collect();
    assert_eq!(free_ranges(&a), 0);
    a.release(&leases[1]).unwrap();
    a.release(&leases[3]).unwrap();
    assert_eq!(free_ranges(&a), 2);
    a.release(&leases[2]).unwrap();
    assert_eq!(free_ranges(&a), 1);
    assert_eq!(largest_free(&a, G1), 3 * G1);
    assert_eq!(a.map.len(), 2);
    // A lease of several extents comes back in one call, as the holes it was cut from.
    let (mut b, holes) = with_holes(&[512, 1024, 256]);
    let lease = b.allocate(1536 * M1, M2).unwrap();
    assert_eq!(lease, vec![holes[1], holes[0]]);
    assert_eq!(free_ranges(&b), 1);
    b.release(&lease).unwrap();
    assert_eq!(free_ranges(&b), 3);
    assert_eq!(ranges_in(&b, RangeState::Free)[..2], holes[..2]);
    check_invariants(&a);
    check_invariants(&b);
}

#[test]
fn claim_takes_exact_ranges_or_nothing() {
    let mut a = ExtentAllocator::new(G1, 4 * G1);
    a.claim(&[ext(2 * G1, M2), ext(3 * G1 + 6 * M2, 4 * M2)])
        .unwrap();
    assert_eq!(a.leased_bytes(), 5 * M2);
    assert_eq!(free_ranges(&a), 3);
    let err = a
        .claim(&[ext(G1, M2), ext(2 * G1 - M2, 2 * M2)])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot claim [0x7fe00000, 0x80200000): [0x80000000, 0x80200000) is leased, expected free"
    );
    assert_eq!(a.leased_bytes(), 5 * M2, "nothing changed");
    let err = a.claim(&[ext(G1, 2 * M2), ext(G1 + M2, M2)]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "ranges [0x40000000, 0x40400000) and [0x40200000, 0x40400000) overlap"
    );
    let err = a.claim(&[ext(0, M2)]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "range [0x0, 0x200000) is not inside the region [0x40000000, 0x140000000)"
    );
    // Claimed ranges are released like any lease.
    a.release(&[ext(2 * G1, M2)]).unwrap();
    assert_eq!(a.leased_bytes(), 4 * M2);
    assert_eq!(a.free_bytes(), 4 * G1 - 4 * M2);
    check_invariants(&a);
}

#[test]
fn release_of_what_is_not_leased_is_refused() {
    let mut a = ExtentAllocator::new(0, 4 * G1);
    let lease = a.allocate(G1, G1).unwrap();
    assert!(matches!(
        a.release(&[ext(G1, M2)]),
        Err(ExtentError::WrongState {
            state: RangeState::Free,
            ..
        })
    ));
    // Partly leased: refused whole.
    assert!(a.release(&[ext(G1 - M2, 2 * M2)]).is_err());
    // One bad extent refuses the whole lease.
    assert!(a.release(&[lease[0], ext(G1, M2)]).is_err());
    assert_eq!(a.leased_bytes(), G1);
    a.release(&lease).unwrap();
    assert!(a.release(&lease).is_err(), "double release");
    assert_eq!(a.free_bytes(), 4 * G1);
    check_invariants(&a);
}

#[test]
fn quarantine_splits_free_ranges_and_marks_leased_ones() {
    let mut a = ExtentAllocator::new(0, 4 * G1);
    let lease = a.allocate(G1, G1).unwrap();
    // One 4 KiB page in the lease, two in free memory.
    for at in [G1 / 2, G1 + G1 / 2, 3 * G1] {
        a.quarantine(ext(at, K4)).unwrap();
    }
    a.quarantine(ext(3 * G1, K4)).unwrap(); // twice: no change
    assert_eq!(a.quarantined_bytes(), 2 * K4);
    assert_eq!(a.poisoned_leased_bytes(), K4);
    assert_eq!(
        ranges_in(&a, RangeState::Quarantined),
        vec![ext(G1 + G1 / 2, K4), ext(3 * G1, K4)]
    );
    a.release(&lease).unwrap();
    assert_eq!(a.quarantined_bytes(), 3 * K4);
    assert_eq!(a.free_bytes(), 4 * G1 - 3 * K4);
    assert_eq!(free_ranges(&a), 4);
    // No aligned allocation may cover a quarantined page: only [2 GiB, 3 GiB) is a whole
    // free 1 GiB page, and each page costs a 2 MiB page.
    assert_eq!(a.free_aligned_bytes(G1), G1);
    assert_eq!(a.free_aligned_bytes(M2), 4 * G1 - 3 * M2);
    let all = a.allocate(4 * G1 - 3 * M2, M2).unwrap();
    for e in &all {
        for q in ranges_in(&a, RangeState::Quarantined) {
            assert!(e.start + e.len <= q.start || q.start + q.len <= e.start);
        }
    }
    check_invariants(&a);
}

#[test]
fn quarantined_lease_parts_wait_for_release() {
    let mut a = ExtentAllocator::new(0, 4 * G1);
    let x = a.allocate(G1, G1).unwrap();
    let y = a.allocate(G1, G1).unwrap();
    a.quarantine(ext(M2, M2)).unwrap();
    a.quarantine(ext(G1 + 4 * M2, M2)).unwrap();
    assert_eq!(a.quarantined_bytes(), 0);
    assert_eq!(a.leased_bytes(), 2 * G1);
    assert_eq!(
        ranges_in(&a, RangeState::LeasedPoisoned),
        vec![ext(M2, M2), ext(G1 + 4 * M2, M2)]
    );
    assert_eq!(a.poisoned_leased_bytes(), 2 * M2);
    a.release(&x).unwrap();
    assert_eq!(ranges_in(&a, RangeState::Quarantined), vec![ext(M2, M2)]);
    assert_eq!(a.free_bytes(), 2 * G1 + G1 - M2);
    assert_eq!(a.poisoned_leased_bytes(), M2);
    a.release(&y).unwrap();
    assert_eq!(
        ranges_in(&a, RangeState::Quarantined),
        vec![ext(M2, M2), ext(G1 + 4 * M2, M2)]
    );
    assert_eq!(a.free_bytes(), 4 * G1 - 2 * M2);
    assert_eq!(ranges_in(&a, RangeState::LeasedPoisoned), vec![]);
    check_invariants(&a);
}

#[test]
fn unquarantine_frees_only_quarantined_bytes() {
    let mut a = ExtentAllocator::new(0, 4 * G1);
    let lease = a.allocate(G1, G1).unwrap();
    a.quarantine(ext(M2, M2)).unwrap(); // inside the lease: marked
    a.quarantine(ext(2 * G1, 2 * M2)).unwrap();
    let err = a.unquarantine(ext(M2, M2)).unwrap_err();
    assert!(matches!(err, ExtentError::WrongState { .. }), "{err}");
    assert!(a.unquarantine(ext(2 * G1, 4 * M2)).is_err(), "partly free");
    assert_eq!(a.quarantined_bytes(), 2 * M2, "refusals change nothing");
    a.unquarantine(ext(2 * G1, M2)).unwrap();
    assert_eq!(
        a.quarantined().collect::<Vec<_>>(),
        vec![ext(2 * G1 + M2, M2)]
    );
    a.unquarantine(ext(2 * G1 + M2, M2)).unwrap();
    assert_eq!(a.quarantined_bytes(), 0);
    assert_eq!(free_ranges(&a), 1, "merged back into one free range");
    a.release(&lease).unwrap();
    a.unquarantine(ext(M2, M2)).unwrap();
    assert_eq!(a.free_bytes(), 4 * G1);
    check_invariants(&a);
}

#[test]
fn memory_grows_with_ranges_not_size() {
    let mut a = ExtentAllocator::new(0, 64 << 40);
    let small = a.approx_memory_bytes();
    let leases: Vec<_> = (0..1000)
        .map(|_| a.allocate(64 * G1, G1).unwrap())
        .collect();
    for lease in leases.iter().step_by(2) {
        a.release(lease).unwrap();
    }
    assert_eq!(free_ranges(&a), 501);
    assert!(a.map.len() <= 1001);
    assert!(small < 200);
    assert!(a.approx_memory_bytes() < 1001 * 24 + 501 * 3 * 16);
    check_invariants(&a);
}

#[test]
fn debug_is_a_summary() {
    let mut a = ExtentAllocator::new(G1, 4 * G1);
    a.allocate(G1, G1).unwrap();
    assert_eq!(
        format!("{a:?}"),
        "ExtentAllocator { region: [0x40000000, 0x140000000), Free: 0xc0000000, \
         Leased: 0x40000000, ranges: 2 }"
    );
}

// ---- Property tests: random operation sequences against a per-MiB reference model. ----
// The production lifecycle: allocate (or claim, on restore), quarantine reported poison,
// release once the device is scrubbed; plus releases of what is not a lease, refused.

/// The model's unit: every boundary in these tests is a multiple of 1 MiB.
const UNIT: u64 = M1;
/// An odd number of MiB above 64 GiB: neither 2 MiB- nor 1 GiB-aligned.
const BASE: u64 = 64 * G1 + 3 * M1;
const UNITS: u64 = 4 * 1024 + 5;

#[derive(Debug, Clone)]
enum Op {
    Allocate { units: u64, huge: bool },
    Release { pick: usize },
    Quarantine { at: u64, units: u64 },
    Claim { at: u64, units: u64 },
    ReleaseAny { at: u64, units: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u64..=600, any::<bool>()).prop_map(|(units, huge)| Op::Allocate {
            units: if huge { units % 3 + 1 } else { units },
            huge
        }),
        4 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        2 => (0..UNITS, 1u64..=8).prop_map(|(at, units)| Op::Quarantine { at, units }),
        1 => (0..UNITS, 1u64..=300).prop_map(|(at, units)| Op::Claim { at, units }),
        1 => (0..UNITS, 1u64..=300).prop_map(|(at, units)| Op::ReleaseAny { at, units }),
    ]
}

struct Model {
    units: Vec<RangeState>,
}

impl Model {
    fn unit(addr: u64) -> usize {
        ((addr - BASE) / UNIT) as usize
    }

    fn units_of(e: Extent) -> std::ops::Range<usize> {
        Self::unit(e.start)..Self::unit(e.start + e.len)
    }

    fn all(&self, e: Extent, ok: impl Fn(RangeState) -> bool) -> bool {
        self.units[Self::units_of(e)].iter().all(|&s| ok(s))
    }

    fn set(&mut self, e: Extent, f: impl Fn(RangeState) -> RangeState) {
        for s in &mut self.units[Self::units_of(e)] {
            *s = f(*s);
        }
    }

    /// Maximal runs of one state, as extents.
    fn runs(&self, state: RangeState) -> Vec<Extent> {
        let mut runs = Vec::new();
        let mut i = 0;
        while i < self.units.len() {
            let j = (i..self.units.len())
                .find(|&j| self.units[j] != self.units[i])
                .unwrap_or(self.units.len());
            if self.units[i] == state {
                runs.push(ext(BASE + i as u64 * UNIT, (j - i) as u64 * UNIT));
            }
            i = j;
        }
        runs
    }

    fn usable_free(&self, align: u64) -> Vec<u64> {
        let mut lens: Vec<u64> = self
            .runs(RangeState::Free)
            .iter()
            .map(|r| usable(r.start, r.start + r.len, align))
            .filter(|&l| l > 0)
            .collect();
        lens.sort_unstable_by(|a, b| b.cmp(a));
        lens
    }
}

fn run(ops: Vec<Op>) {
    let mut a = ExtentAllocator::new(BASE, UNITS * UNIT);
    let mut m = Model {
        units: vec![RangeState::Free; UNITS as usize],
    };
    let mut leases: Vec<Vec<Extent>> = Vec::new();
    let mut quarantined = 0;
    let in_region = |at: u64, units: u64| ext(BASE + at * UNIT, units.min(UNITS - at) * UNIT);
    for op in ops {
        match op {
            Op::Allocate { units, huge } => {
                let align = if huge { G1 } else { M2 };
                let size = units * align;
                let lens = m.usable_free(align);
                let free: u64 = lens.iter().sum();
                let got = a.allocate(size, align);
                let Some(got) = got else {
                    assert!(
                        free < size,
                        "{size:#x} at {align:#x} refused, {free:#x} free"
                    );
                    continue;
                };
                assert!(free >= size);
                assert_aligned(&got, size, align);
                // Fewest extents: as many as the largest holes need.
                let mut sum = 0;
                let fewest = lens.iter().take_while(|&&l| {
                    let more = sum < size;
                    sum += l;
                    more
                });
                assert_eq!(got.len(), fewest.count(), "{got:?} from {lens:?}");
                if got.len() == 1 {
                    let best = lens.iter().filter(|&&l| l >= size).min().copied();
                    let hole = m
                        .runs(RangeState::Free)
                        .into_iter()
                        .find(|r| r.start <= got[0].start && got[0].start < r.start + r.len)
                        .unwrap();
                    assert_eq!(Some(usable(hole.start, hole.start + hole.len, align)), best);
                }
                for &e in &got {
                    assert!(m.all(e, |s| s == RangeState::Free), "{e:?} not free");
                    m.set(e, |_| RangeState::Leased);
                }
                leases.push(got);
            }
            Op::Release { pick } => {
                if leases.is_empty() {
                    continue;
                }
                let lease = leases.swap_remove(pick % leases.len());
                a.release(&lease).unwrap();
                for &e in &lease {
                    m.set(e, |s| match s {
                        RangeState::LeasedPoisoned => RangeState::Quarantined,
                        _ => RangeState::Free,
                    });
                }
            }
            Op::Quarantine { at, units } => {
                let e = in_region(at, units);
                a.quarantine(e).unwrap();
                m.set(e, |s| match s {
                    RangeState::Leased | RangeState::LeasedPoisoned => RangeState::LeasedPoisoned,
                    _ => RangeState::Quarantined,
                });
            }
            Op::Claim { at, units } => {
                let e = in_region(at, units);
                let ok = m.all(e, |s| s == RangeState::Free);
                assert_eq!(a.claim(&[e]).is_ok(), ok, "claim {e:?}");
                if ok {
                    m.set(e, |_| RangeState::Leased);
                    leases.push(vec![e]);
                }
            }
            Op::ReleaseAny { at, units } => {
                let e = in_region(at, units);
                let ok = m.all(e, RangeState::is_leased);
                // Only the refusals are exercised: releasing part of a tracked lease would leave
                // the rest of that lease to be released twice.
                if ok {
                    continue;
                }
                assert!(a.release(&[e]).is_err());
            }
        }
        check_invariants(&a);
        let mut expect = [0u64; RangeState::ALL.len()];
        for &s in &m.units {
            expect[s.index()] += UNIT;
        }
        assert_eq!(a.bytes, expect);
        let got: Vec<_> = a.ranges().collect();
        let want: Vec<_> = RangeState::ALL
            .iter()
            .flat_map(|&s| m.runs(s).into_iter().map(move |r| (r, s)))
            .collect();
        assert_eq!(got.len(), want.len());
        for g in &got {
            assert!(want.contains(g), "{g:?}");
        }
        assert!(a.quarantined_bytes() >= quarantined);
        quarantined = a.quarantined_bytes();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn random_sequences_keep_every_invariant(ops in prop::collection::vec(op(), 1..120)) {
        run(ops);
    }
}
