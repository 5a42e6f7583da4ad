//! The device-dax extent allocator: which physical ranges of a dax region each lease gets.
//!
//! Pure bookkeeping, no I/O. One [`ExtentAllocator`] manages one region `[base, base + len)` as a
//! sorted map of maximal ranges, each in one [`RangeState`]; adjacent ranges of the same state are
//! always merged, so memory is O(ranges), never O(pages). Free ranges are also indexed by their
//! aligned usable length, one index per alignment in use (2 MiB and 1 GiB from the start), so an
//! allocation costs O(extents handed out × log ranges).
//!
//! Life of a byte: free → leased (`allocate`, or `claim` for a device found at start) → free
//! (`release`). The broker scrubs and destroys a released lease's device before it releases the
//! extents, so their bytes stay leased until then and are never handed out unzeroed.
//! `quarantine` moves any byte out of circulation for good; a leased byte is only marked, and
//! goes to quarantine instead of free when its lease is released.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Bound::Excluded;

use membroker_client::proto::Extent;
use membroker_client::size::format_size;

#[cfg(test)]
mod tests;

/// Alignments indexed from the start: the two device-dax page sizes the broker hands out.
const DEFAULT_ALIGNS: [u64; 2] = [2 << 20, 1 << 30];

/// What a range of the region is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RangeState {
    /// Allocatable.
    Free,
    /// Part of a lease.
    Leased,
    /// Part of a lease, with a reported memory error: goes to quarantine when released.
    LeasedPoisoned,
    /// Memory errors: never handed out again.
    Quarantined,
}

impl RangeState {
    /// Every state, in a fixed order.
    pub const ALL: [RangeState; 4] = [
        RangeState::Free,
        RangeState::Leased,
        RangeState::LeasedPoisoned,
        RangeState::Quarantined,
    ];

    fn index(self) -> usize {
        self as usize
    }

    fn is_leased(self) -> bool {
        matches!(self, RangeState::Leased | RangeState::LeasedPoisoned)
    }
}

impl fmt::Display for RangeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RangeState::Free => "free",
            RangeState::Leased => "leased",
            RangeState::LeasedPoisoned => "leased (poisoned)",
            RangeState::Quarantined => "quarantined",
        })
    }
}

/// `[start, end)` printed as hex, end exclusive: `[0x40000000, 0x80000000)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HexRange {
    pub start: u64,
    pub end: u64,
}

impl fmt::Display for HexRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end)
    }
}

fn hex(start: u64, end: u64) -> HexRange {
    HexRange { start, end }
}

/// Why the allocator refused a request. Nothing was changed when one of these is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtentError {
    #[error("alignment {align:#x} is not a power of two")]
    BadAlign { align: u64 },
    #[error("size {size:#x} is not a non-zero multiple of the alignment {align:#x}")]
    BadSize { size: u64, align: u64 },
    #[error(
        "{size:#x} bytes ({}) asked at {align:#x} alignment, but only {free:#x} ({}) aligned bytes \
         are free",
        format_size(*size),
        format_size(*free)
    )]
    NoSpace { size: u64, align: u64, free: u64 },
    #[error("empty range at {start:#x}")]
    Empty { start: u64 },
    #[error("range {range} is not inside the region {region}")]
    OutsideRegion { range: HexRange, region: HexRange },
    #[error("ranges {first} and {second} overlap")]
    Overlap { first: HexRange, second: HexRange },
    #[error("cannot {op} {range}: {part} is {state}, expected {expected}")]
    WrongState {
        op: &'static str,
        range: HexRange,
        part: HexRange,
        state: RangeState,
        expected: &'static str,
    },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, ExtentError>;

/// Free ranges by aligned usable length, for one alignment.
#[derive(Debug)]
struct AlignIndex {
    align: u64,
    /// `(usable length, range start)` of every free range with usable length > 0.
    by_len: BTreeSet<(u64, u64)>,
    /// Sum of the usable lengths.
    total: u64,
}

/// One range of the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    end: u64,
    state: RangeState,
}

/// The extent allocator of one device-dax region. See the module documentation.
pub struct ExtentAllocator {
    base: u64,
    end: u64,
    /// Range start → its end and state. Covers `[base, end)` exactly; neighbours differ in state.
    map: BTreeMap<u64, Span>,
    /// Bytes per state, indexed by `RangeState::index`.
    bytes: [u64; RangeState::ALL.len()],
    indexes: Vec<AlignIndex>,
}

impl fmt::Debug for ExtentAllocator {
    /// A summary: the map itself can hold thousands of ranges.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ExtentAllocator");
        d.field("region", &format_args!("{}", hex(self.base, self.end)));
        for state in RangeState::ALL {
            let bytes = self.bytes[state.index()];
            if bytes > 0 {
                d.field(&format!("{state:?}"), &format_args!("{bytes:#x}"));
            }
        }
        d.field("ranges", &self.map.len()).finish()
    }
}

fn align_up(x: u64, align: u64) -> Option<u64> {
    x.checked_add(align - 1).map(|v| v & !(align - 1))
}

/// Length of the `align`-aligned part of `[start, end)`.
fn usable(start: u64, end: u64, align: u64) -> u64 {
    match align_up(start, align) {
        Some(s) => (end & !(align - 1)).saturating_sub(s),
        None => 0,
    }
}

/// The first `len` aligned bytes of the free range starting at `start`.
fn aligned_piece(start: u64, len: u64, align: u64) -> Extent {
    Extent {
        start: align_up(start, align).unwrap_or(start),
        len,
    }
}

impl ExtentAllocator {
    /// An allocator for `[base, base + len)`, all free. A region running past `u64::MAX` is cut
    /// there.
    pub fn new(base: u64, len: u64) -> Self {
        let end = base.saturating_add(len);
        let mut this = ExtentAllocator {
            base,
            end,
            map: BTreeMap::new(),
            bytes: [0; RangeState::ALL.len()],
            indexes: Vec::new(),
        };
        for align in DEFAULT_ALIGNS {
            this.index_for(align);
        }
        if end > base {
            this.insert(base, end, RangeState::Free);
        }
        this
    }

    /// `size` bytes as extents whose start and len are multiples of `align`; `None` if the
    /// request is invalid or does not fit. See [`ExtentAllocator::try_allocate`].
    pub fn allocate(&mut self, size: u64, align: u64) -> Option<Vec<Extent>> {
        self.try_allocate(size, align).ok()
    }

    /// `size` bytes as extents whose start and len are multiples of `align` (a power of two;
    /// only aligned sub-ranges of free ranges are used). Fewest extents first: the smallest
    /// single free range that fits, if any; otherwise the largest free ranges whole, largest
    /// first, and for the remainder the smallest free range that fits it (the same number of
    /// extents as splitting the next largest, keeping big holes whole). Each extent is taken
    /// from the low end of its free range. Succeeds whenever the aligned free space is at least
    /// `size`. The extents become leased; they are returned largest first (a device's file
    /// offsets follow the order its `mapping`s are written in).
    pub fn try_allocate(&mut self, size: u64, align: u64) -> Result<Vec<Extent>> {
        if !align.is_power_of_two() {
            return Err(ExtentError::BadAlign { align });
        }
        if size == 0 || !size.is_multiple_of(align) {
            return Err(ExtentError::BadSize { size, align });
        }
        let pos = self.index_for(align);
        let index = &self.indexes[pos];
        if index.total < size {
            return Err(ExtentError::NoSpace {
                size,
                align,
                free: index.total,
            });
        }
        // Picks are computed first (the index is only read), then applied.
        let mut picks: Vec<Extent> = Vec::new();
        let mut rem = size;
        // Free ranges not picked yet are those below `upper` in the index.
        let mut upper: Option<(u64, u64)> = None;
        loop {
            let smallest_fit = match upper {
                None => index.by_len.range((rem, 0)..).next(),
                Some(up) if (rem, 0) < up => index.by_len.range((rem, 0)..up).next(),
                Some(_) => None,
            };
            if let Some(&(_, start)) = smallest_fit {
                picks.push(aligned_piece(start, rem, align));
                break;
            }
            let below = match upper {
                None => index.by_len.last(),
                Some(up) => index.by_len.range(..up).next_back(),
            };
            let Some(&(len, start)) = below else {
                // Unreachable while `total` is right; refuse rather than hand out a short lease.
                debug_assert!(false, "aligned free total out of step with the index");
                return Err(ExtentError::NoSpace {
                    size,
                    align,
                    free: size - rem,
                });
            };
            picks.push(aligned_piece(start, len, align));
            rem -= len;
            upper = Some((len, start));
        }
        for e in &picks {
            self.apply(e.start, e.start + e.len, |_| RangeState::Leased);
        }
        Ok(picks)
    }

    /// Marks exactly these ranges leased (reconciling devices that already exist at start).
    /// Err, changing nothing, if any part is not free.
    pub fn claim(&mut self, extents: &[Extent]) -> Result<()> {
        self.check(extents, "claim", "free", |s| s == RangeState::Free)?;
        for e in extents {
            self.apply(e.start, e.start + e.len, |_| RangeState::Leased);
        }
        Ok(())
    }

    /// A lease's extents come back once its device is destroyed (scrubbed first, unless it was
    /// never delivered): they become free, their poisoned parts quarantined. Err, changing
    /// nothing, if any part is not leased.
    pub fn release(&mut self, extents: &[Extent]) -> Result<()> {
        self.check(extents, "release", "leased", RangeState::is_leased)?;
        for e in extents {
            self.apply(e.start, e.start + e.len, |s| match s {
                RangeState::LeasedPoisoned => RangeState::Quarantined,
                _ => RangeState::Free,
            });
        }
        Ok(())
    }

    /// Memory errors in `range`, whatever its state: exactly these bytes are quarantined for good
    /// (the caller picks the granularity, e.g. the 2 MiB page the kernel reported). Leased parts
    /// stay leased, marked, until their lease is released. Err, changing nothing, if `range` is
    /// empty or not inside the region.
    pub fn quarantine(&mut self, range: Extent) -> Result<()> {
        self.check(&[range], "quarantine", "anything", |_| true)?;
        self.apply(range.start, range.start + range.len, |s| match s {
            RangeState::Leased | RangeState::LeasedPoisoned => RangeState::LeasedPoisoned,
            _ => RangeState::Quarantined,
        });
        Ok(())
    }

    /// An operator's verdict that a quarantined range was a false report: it becomes free again.
    /// Only quarantined bytes qualify; a poisoned part of a live lease is refused (clear it once
    /// the lease is released and its memory went to quarantine). Quarantined memory was zeroed
    /// before it got there (a released lease is scrubbed first) or was never handed out. Err,
    /// changing nothing, if any part is not quarantined.
    pub fn unquarantine(&mut self, range: Extent) -> Result<()> {
        self.check_unquarantine(range)?;
        self.apply(range.start, range.start + range.len, |_| RangeState::Free);
        Ok(())
    }

    /// What [`ExtentAllocator::unquarantine`] would refuse, changing nothing.
    pub fn check_unquarantine(&self, range: Extent) -> Result<()> {
        self.check(&[range], "unquarantine", "quarantined", |s| {
            s == RangeState::Quarantined
        })
    }

    /// Quarantined ranges (not counting poisoned parts of live leases), lowest first.
    pub fn quarantined(&self) -> impl Iterator<Item = Extent> + '_ {
        self.ranges()
            .filter(|(_, s)| *s == RangeState::Quarantined)
            .map(|(e, _)| e)
    }

    /// Bytes that can be allocated (at any alignment).
    pub fn free_bytes(&self) -> u64 {
        self.bytes[RangeState::Free.index()]
    }

    /// Bytes in leases, including their poisoned parts.
    pub fn leased_bytes(&self) -> u64 {
        self.bytes[RangeState::Leased.index()] + self.bytes[RangeState::LeasedPoisoned.index()]
    }

    /// Bytes in quarantine (not counting poisoned parts of live leases).
    pub fn quarantined_bytes(&self) -> u64 {
        self.bytes[RangeState::Quarantined.index()]
    }

    /// Bytes of live leases with a reported memory error: quarantined when released (part of
    /// the leased bytes).
    pub fn poisoned_leased_bytes(&self) -> u64 {
        self.bytes[RangeState::LeasedPoisoned.index()]
    }

    /// Aligned free bytes: the most that `allocate(_, align)` can hand out now.
    pub fn free_aligned_bytes(&self, align: u64) -> u64 {
        if !align.is_power_of_two() {
            return 0;
        }
        match self.indexes.iter().find(|i| i.align == align) {
            Some(i) => i.total,
            None => self.free_spans().map(|(s, e)| usable(s, e, align)).sum(),
        }
    }

    /// Approximate heap bytes the allocator uses: its map and index entries, without B-tree node
    /// overhead (roughly another half on top).
    pub fn approx_memory_bytes(&self) -> usize {
        let entry = size_of::<u64>() + size_of::<Span>();
        let indexed: usize = self.indexes.iter().map(|i| i.by_len.len()).sum();
        self.map.len() * entry + indexed * size_of::<(u64, u64)>()
    }

    /// Every range with its state, lowest first; they cover the region exactly.
    pub fn ranges(&self) -> impl Iterator<Item = (Extent, RangeState)> + '_ {
        self.map.iter().map(|(&start, span)| {
            let e = Extent {
                start,
                len: span.end - start,
            };
            (e, span.state)
        })
    }

    fn free_spans(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map
            .iter()
            .filter(|(_, span)| span.state == RangeState::Free)
            .map(|(&s, span)| (s, span.end))
    }

    /// Validates `extents` for `op`: non-empty, inside the region, not overlapping each other,
    /// and every byte in a state `ok` accepts.
    fn check(
        &self,
        extents: &[Extent],
        op: &'static str,
        expected: &'static str,
        ok: impl Fn(RangeState) -> bool,
    ) -> Result<()> {
        let mut sorted: Vec<(u64, u64)> = Vec::with_capacity(extents.len());
        for e in extents {
            if e.len == 0 {
                return Err(ExtentError::Empty { start: e.start });
            }
            let end = match e.start.checked_add(e.len) {
                Some(end) if e.start >= self.base && end <= self.end => end,
                _ => {
                    return Err(ExtentError::OutsideRegion {
                        range: hex(e.start, e.start.saturating_add(e.len)),
                        region: hex(self.base, self.end),
                    });
                }
            };
            sorted.push((e.start, end));
        }
        sorted.sort_unstable();
        for w in sorted.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(ExtentError::Overlap {
                    first: hex(w[0].0, w[0].1),
                    second: hex(w[1].0, w[1].1),
                });
            }
        }
        for &(start, end) in &sorted {
            let first = self.map.range(..=start).next_back();
            let rest = self.map.range((Excluded(start), Excluded(end)));
            for (&s, span) in first.into_iter().chain(rest) {
                if !ok(span.state) {
                    return Err(ExtentError::WrongState {
                        op,
                        range: hex(start, end),
                        part: hex(s.max(start), span.end.min(end)),
                        state: span.state,
                        expected,
                    });
                }
            }
        }
        Ok(())
    }

    /// Position of the free index for `align`, built from the free ranges if new.
    fn index_for(&mut self, align: u64) -> usize {
        if let Some(pos) = self.indexes.iter().position(|i| i.align == align) {
            return pos;
        }
        let mut index = AlignIndex {
            align,
            by_len: BTreeSet::new(),
            total: 0,
        };
        for (s, e) in self.free_spans() {
            let len = usable(s, e, align);
            if len > 0 {
                index.by_len.insert((len, s));
                index.total += len;
            }
        }
        self.indexes.push(index);
        self.indexes.len() - 1
    }

    /// Gives `[start, end)` (inside the region) the state `f(old)` byte by byte, splitting the
    /// ranges it cuts, then merges neighbours of equal state.
    fn apply(&mut self, start: u64, end: u64, f: impl Fn(RangeState) -> RangeState) {
        if start >= end {
            return;
        }
        let Some((&first, _)) = self.map.range(..=start).next_back() else {
            return;
        };
        let mut cur = first;
        while cur < end {
            let Some(&span) = self.map.get(&cur) else {
                debug_assert!(false, "no range at {cur:#x}");
                return;
            };
            let state = f(span.state);
            if state != span.state {
                self.remove(cur);
                if cur < start {
                    self.insert(cur, start, span.state);
                }
                self.insert(cur.max(start), span.end.min(end), state);
                if span.end > end {
                    self.insert(end, span.end, span.state);
                }
            }
            cur = span.end;
        }
        self.merge_around(start, end);
    }

    /// Merges equal neighbours from the range holding or preceding `start` to the one starting at
    /// `end`.
    fn merge_around(&mut self, start: u64, end: u64) {
        let before = self.map.range(..start).next_back();
        let Some((&from, _)) = before.or_else(|| self.map.first_key_value()) else {
            return;
        };
        let mut cur = from;
        while let Some(&span) = self.map.get(&cur) {
            let Some(&next) = self.map.get(&span.end) else {
                break;
            };
            if next.state == span.state {
                self.remove(cur);
                self.remove(span.end);
                self.insert(cur, next.end, span.state);
            } else if span.end >= end {
                break;
            } else {
                cur = span.end;
            }
        }
    }

    fn insert(&mut self, start: u64, end: u64, state: RangeState) {
        debug_assert!(start < end);
        self.map.insert(start, Span { end, state });
        self.bytes[state.index()] += end - start;
        if state == RangeState::Free {
            for index in &mut self.indexes {
                let len = usable(start, end, index.align);
                if len > 0 {
                    index.by_len.insert((len, start));
                    index.total += len;
                }
            }
        }
    }

    fn remove(&mut self, start: u64) {
        let Some(Span { end, state }) = self.map.remove(&start) else {
            debug_assert!(false, "no range at {start:#x}");
            return;
        };
        self.bytes[state.index()] -= end - start;
        if state == RangeState::Free {
            for index in &mut self.indexes {
                let len = usable(start, end, index.align);
                if len > 0 {
                    index.by_len.remove(&(len, start));
                    index.total -= len;
                }
            }
        }
    }
}
