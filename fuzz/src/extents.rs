//! `extents_ops`: a sequence of operations on the device-dax extent allocator, checked against a
//! simple model.
//!
//! The input picks a region of `n` cells of `unit` bytes (a power of two from 1 B to 1 GiB, the
//! region low, or right under `u64::MAX`), then operations in the broker's order of use —
//! allocate (or claim, as a restart does), quarantine reported poison, release once the device is
//! scrubbed — and the free-space query, with valid and invalid arguments. Every range the
//! operations name starts and ends on a cell boundary, so the model is one `RangeState` per cell.
//! After every operation the allocator must agree with the model range for range (so no two
//! leases overlap), and free + leased + quarantined must be the region's length. Errors must leave
//! everything unchanged, and allocation must pick exactly the extents its documentation promises,
//! each aligned.

use membroker::pool::extents::{ExtentAllocator, ExtentError, RangeState};
use membroker_client::proto::Extent;

use crate::input::Bytes;

const MAX_CELLS: u64 = 512;
const MAX_OPS: usize = 512;
const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;

/// The kind of an allocator error, to compare with what the model expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    BadAlign,
    BadSize,
    NoSpace,
    Empty,
    Outside,
    Overlap,
    WrongState,
}

fn kind(e: &ExtentError) -> Kind {
    match e {
        ExtentError::BadAlign { .. } => Kind::BadAlign,
        ExtentError::BadSize { .. } => Kind::BadSize,
        ExtentError::NoSpace { .. } => Kind::NoSpace,
        ExtentError::Empty { .. } => Kind::Empty,
        ExtentError::OutsideRegion { .. } => Kind::Outside,
        ExtentError::Overlap { .. } => Kind::Overlap,
        ExtentError::WrongState { .. } => Kind::WrongState,
    }
}

fn align_up(x: u64, align: u64) -> Option<u64> {
    x.checked_add(align - 1).map(|v| v & !(align - 1))
}

/// The aligned part of `[start, end)`, as `(aligned start, usable length)`.
fn usable(start: u64, end: u64, align: u64) -> (u64, u64) {
    match align_up(start, align) {
        Some(s) => (s, (end & !(align - 1)).saturating_sub(s)),
        None => (start, 0),
    }
}

/// One state per cell of `unit` bytes from `base`.
#[derive(Debug)]
struct Model {
    base: u64,
    unit: u64,
    cells: Vec<RangeState>,
}

impl Model {
    fn end(&self) -> u64 {
        self.base + self.cells.len() as u64 * self.unit
    }

    fn addr(&self, cell: usize) -> u64 {
        self.base + cell as u64 * self.unit
    }

    /// Cells of an extent that `check` accepted (inside the region, on cell boundaries).
    fn cells_of(&self, e: Extent) -> std::ops::Range<usize> {
        assert_eq!(
            (e.start - self.base) % self.unit,
            0,
            "extent {e:?} off the cell grid"
        );
        assert_eq!(e.len % self.unit, 0, "extent {e:?} off the cell grid");
        let first = ((e.start - self.base) / self.unit) as usize;
        first..first + (e.len / self.unit) as usize
    }

    /// Maximal runs `(start, end, state)`, lowest first.
    fn runs(&self) -> Vec<(u64, u64, RangeState)> {
        let mut out: Vec<(u64, u64, RangeState)> = Vec::new();
        for (i, &state) in self.cells.iter().enumerate() {
            let (s, e) = (self.addr(i), self.addr(i + 1));
            match out.last_mut() {
                Some(last) if last.2 == state => last.1 = e,
                _ => out.push((s, e, state)),
            }
        }
        out
    }

    /// The allocator's argument checks, in its order.
    fn check(&self, extents: &[Extent], ok: impl Fn(RangeState) -> bool) -> Result<(), Kind> {
        let mut sorted = Vec::new();
        for e in extents {
            if e.len == 0 {
                return Err(Kind::Empty);
            }
            match e.start.checked_add(e.len) {
                Some(end) if e.start >= self.base && end <= self.end() => {
                    sorted.push((e.start, end))
                }
                _ => return Err(Kind::Outside),
            }
        }
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[1].0 < w[0].1) {
            return Err(Kind::Overlap);
        }
        for &(start, end) in &sorted {
            let cells = self.cells_of(Extent {
                start,
                len: end - start,
            });
            if !self.cells[cells].iter().all(|&s| ok(s)) {
                return Err(Kind::WrongState);
            }
        }
        Ok(())
    }

    fn apply(&mut self, extents: &[Extent], f: impl Fn(RangeState) -> RangeState) {
        for &e in extents {
            for i in self.cells_of(e) {
                self.cells[i] = f(self.cells[i]);
            }
        }
    }

    /// Free runs as `(usable length, start, aligned start)` for `align`, usable length > 0.
    fn free_index(&self, align: u64) -> Vec<(u64, u64, u64)> {
        let mut out: Vec<_> = self
            .runs()
            .into_iter()
            .filter(|r| r.2 == RangeState::Free)
            .filter_map(|(s, e, _)| {
                let (aligned, len) = usable(s, e, align);
                (len > 0).then_some((len, s, aligned))
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// What `try_allocate(size, align)` must return, per its documentation.
    fn allocate(&self, size: u64, align: u64) -> Result<Vec<Extent>, Kind> {
        if !align.is_power_of_two() {
            return Err(Kind::BadAlign);
        }
        if size == 0 || !size.is_multiple_of(align) {
            return Err(Kind::BadSize);
        }
        let index = self.free_index(align);
        if index.iter().map(|r| r.0).sum::<u64>() < size {
            return Err(Kind::NoSpace);
        }
        // Smallest single range that fits; else the largest whole, and again for the rest among
        // the ranges below it in (length, start) order.
        let mut picks = Vec::new();
        let mut rem = size;
        let mut below = index.len();
        loop {
            if let Some(&(_, _, aligned)) = index[..below].iter().find(|r| r.0 >= rem) {
                picks.push(Extent {
                    start: aligned,
                    len: rem,
                });
                return Ok(picks);
            }
            below -= 1;
            let (len, _, aligned) = index[below];
            picks.push(Extent {
                start: aligned,
                len,
            });
            rem -= len;
        }
    }

    fn count(&self, state: RangeState) -> u64 {
        self.cells.iter().filter(|&&s| s == state).count() as u64 * self.unit
    }
}

/// Everything the allocator reports must match the model.
fn compare(a: &ExtentAllocator, m: &Model, aligns: &[u64]) {
    let len = m.end() - m.base;
    let got: Vec<(u64, u64, RangeState)> = a
        .ranges()
        .map(|(e, s)| (e.start, e.start + e.len, s))
        .collect();
    assert_eq!(got, m.runs(), "ranges differ from the model");
    assert_eq!(
        a.free_bytes() + a.leased_bytes() + a.quarantined_bytes(),
        len,
        "accounting: free + leased + quarantined != region length"
    );
    assert_eq!(a.free_bytes(), m.count(RangeState::Free));
    assert_eq!(
        a.leased_bytes(),
        m.count(RangeState::Leased) + m.count(RangeState::LeasedPoisoned)
    );
    assert_eq!(a.quarantined_bytes(), m.count(RangeState::Quarantined));
    assert_eq!(
        a.poisoned_leased_bytes(),
        m.count(RangeState::LeasedPoisoned)
    );
    for &align in aligns.iter().chain(&[M2, G1]) {
        let total: u64 = m.free_index(align).iter().map(|r| r.0).sum();
        assert_eq!(a.free_aligned_bytes(align), total, "free at {align:#x}");
    }
}

/// Fuzz input → operations.
struct Gen<'a> {
    bytes: Bytes<'a>,
    base: u64,
    unit: u64,
    cells: u64,
}

impl Gen<'_> {
    /// An extent on the cell grid, sometimes empty, past the end, or overflowing.
    fn extent(&mut self) -> Extent {
        let n = self.cells;
        let cell = self.bytes.below(n + 4);
        let len = self.bytes.below(n + 2);
        if self.bytes.u8() == 0xff {
            // Runs past u64::MAX.
            let back = self.bytes.below(4);
            return Extent {
                start: u64::MAX - back,
                len: back + 1 + len,
            };
        }
        let start = self.base.checked_add(cell * self.unit);
        match start {
            Some(start) => Extent {
                start,
                len: len * self.unit,
            },
            None => Extent {
                start: u64::MAX,
                len: 1,
            },
        }
    }

    fn extents(&mut self) -> Vec<Extent> {
        let k = 1 + self.bytes.below(3);
        (0..k).map(|_| self.extent()).collect()
    }

    /// A power of two no smaller than a cell, a device page size, or an invalid one.
    fn align(&mut self) -> u64 {
        let max_shift = 63 - self.unit.trailing_zeros() as u64;
        match self.bytes.below(8) {
            0 => M2.max(self.unit),
            1 => G1.max(self.unit),
            2 => 0,
            3 => self.unit * 3,
            _ => self.unit << self.bytes.below(max_shift.min(12) + 1),
        }
    }
}

/// Fuzz target `extents_ops`. Returns whether some allocation succeeded.
pub fn ops(data: &[u8]) -> bool {
    let mut bytes = Bytes::new(data);
    let unit = 1u64 << bytes.below(31);
    let cells = bytes.below(MAX_CELLS + 1);
    let base = match bytes.below(4) {
        0 => 0,
        // Right under u64::MAX: aligning up overflows there.
        1 => (u64::MAX / unit - cells - bytes.below(4)) * unit,
        _ => unit * bytes.below(64),
    };
    let mut a = ExtentAllocator::new(base, cells * unit);
    let mut m = Model {
        base,
        unit,
        cells: vec![RangeState::Free; cells as usize],
    };
    let mut g = Gen {
        bytes,
        base,
        unit,
        cells,
    };
    let mut leases: Vec<Vec<Extent>> = Vec::new();
    let mut aligns: Vec<u64> = Vec::new();
    let mut allocated = false;
    compare(&a, &m, &aligns);

    /// An index into a list of `len` items, if any.
    fn pick(bytes: &mut Bytes, len: usize) -> Option<usize> {
        (len > 0).then(|| bytes.below(len as u64) as usize)
    }

    for _ in 0..MAX_OPS {
        if g.bytes.is_empty() {
            break;
        }
        match g.bytes.below(8) {
            0 | 1 => {
                let align = g.align();
                let k = g.bytes.below(cells + 2);
                let size = match g.bytes.below(8) {
                    0 => k * align + unit, // unaligned unless align == unit
                    _ => k.saturating_mul(align),
                };
                let expect = m.allocate(size, align);
                let got = a.try_allocate(size, align);
                if align.is_power_of_two() && !aligns.contains(&align) {
                    aligns.push(align);
                }
                match (expect, got) {
                    (Ok(want), Ok(got)) => {
                        assert_eq!(got, want, "allocate({size:#x}, {align:#x})");
                        assert_eq!(got.iter().map(|e| e.len).sum::<u64>(), size);
                        assert!(
                            got.iter()
                                .all(|e| e.len > 0 && e.start % align == 0 && e.len % align == 0),
                            "allocate({size:#x}, {align:#x}) gave unaligned {got:?}"
                        );
                        assert!(got.windows(2).all(|w| w[0].len >= w[1].len));
                        assert_eq!(m.check(&got, |s| s == RangeState::Free), Ok(()));
                        m.apply(&got, |_| RangeState::Leased);
                        leases.push(got);
                        allocated = true;
                    }
                    (Err(want), Err(e)) => assert_eq!(kind(&e), want, "allocate: {e}"),
                    (want, got) => {
                        panic!("allocate({size:#x}, {align:#x}): model {want:?}, allocator {got:?}")
                    }
                }
            }
            2 => {
                let extents = g.extents();
                let want = m.check(&extents, |s| s == RangeState::Free);
                let got = a.claim(&extents);
                assert_eq!(
                    got.clone().map_err(|e| kind(&e)),
                    want,
                    "claim {extents:?}: {got:?}"
                );
                if got.is_ok() {
                    m.apply(&extents, |_| RangeState::Leased);
                    leases.push(extents);
                }
            }
            3 | 4 => {
                let from_list = g.bytes.below(4) != 0;
                let (extents, i) = match pick(&mut g.bytes, leases.len()) {
                    Some(i) if from_list => (leases[i].clone(), Some(i)),
                    _ => (g.extents(), None),
                };
                let leased =
                    |s: RangeState| matches!(s, RangeState::Leased | RangeState::LeasedPoisoned);
                let want = m.check(&extents, leased);
                let got = a.release(&extents);
                assert_eq!(
                    got.clone().map_err(|e| kind(&e)),
                    want,
                    "release {extents:?}: {got:?}"
                );
                if got.is_ok() {
                    m.apply(&extents, |s| match s {
                        RangeState::LeasedPoisoned => RangeState::Quarantined,
                        _ => RangeState::Free,
                    });
                    if let Some(i) = i {
                        leases.swap_remove(i);
                    }
                }
            }
            5 | 6 => {
                let range = g.extent();
                let want = m.check(&[range], |_| true);
                let got = a.quarantine(range);
                assert_eq!(
                    got.clone().map_err(|e| kind(&e)),
                    want,
                    "quarantine {range:?}: {got:?}"
                );
                if got.is_ok() {
                    m.apply(&[range], |s| match s {
                        RangeState::Leased | RangeState::LeasedPoisoned => {
                            RangeState::LeasedPoisoned
                        }
                        _ => RangeState::Quarantined,
                    });
                }
            }
            _ => {
                // The query at an alignment that may have no index yet (computed from the map).
                let align = g.align();
                let want = if align.is_power_of_two() {
                    m.free_index(align).iter().map(|r| r.0).sum::<u64>()
                } else {
                    0
                };
                assert_eq!(a.free_aligned_bytes(align), want, "free at {align:#x}");
            }
        }
        compare(&a, &m, &aligns);
    }
    allocated
}
