//! The table of redirected RAM blocks.
//!
//! Hooks on any thread and the SIGBUS handler read it without locks or allocation; only the
//! slow path (under [`crate::broker`]'s mutex) writes it. Each slot is a seqlock: the
//! generation is odd while a writer changes the slot, and a reader retries (or gives up) when
//! the generation moved under it. Everything is an atomic, so the module needs no `unsafe`.

use std::sync::atomic::{AtomicI32, AtomicU8, AtomicU32, AtomicUsize, Ordering, fence};

/// How many RAM blocks can be redirected at once (QEMU has a handful: one per memory backend
/// or hotplugged DIMM).
pub const SLOTS: usize = 64;
/// Longest lease name a slot holds, for the SIGBUS handler's poison reports (the broker
/// takes names of at most 255 bytes).
pub const NAME_MAX: usize = 255;

/// What backs a redirected block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// A memfd: discard punches a hole.
    Memfd,
    /// A device-dax device: no fallocate, discard zeroes explicitly.
    DevDax,
}

/// A consistent copy of one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub slot: usize,
    pub start: usize,
    pub len: usize,
    pub fd: i32,
    pub backing: Backing,
    /// Page size of the lease, in bytes.
    pub page: usize,
    /// The slot's seqlock generation when this copy was taken.
    pub generation: u32,
}

impl Block {
    pub fn end(&self) -> usize {
        self.start + self.len
    }

    pub fn contains(&self, addr: usize) -> bool {
        self.start <= addr && addr < self.end()
    }

    /// Whether `[addr, addr + len)` lies wholly inside the block.
    pub fn contains_range(&self, addr: usize, len: usize) -> bool {
        addr >= self.start && addr.checked_add(len).is_some_and(|end| end <= self.end())
    }

    /// Whether `[addr, addr + len)` and the block share a byte.
    pub fn overlaps(&self, addr: usize, len: usize) -> bool {
        let end = addr.saturating_add(len);
        addr < self.end() && self.start < end
    }
}

struct Slot {
    generation: AtomicU32,
    start: AtomicUsize,
    /// 0 for a free slot.
    len: AtomicUsize,
    fd: AtomicI32,
    backing: AtomicU8,
    page: AtomicUsize,
    name_len: AtomicUsize,
    name: [AtomicU8; NAME_MAX],
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            generation: AtomicU32::new(0),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            fd: AtomicI32::new(-1),
            backing: AtomicU8::new(0),
            page: AtomicUsize::new(0),
            name_len: AtomicUsize::new(0),
            name: [const { AtomicU8::new(0) }; NAME_MAX],
        }
    }

    fn begin_write(&self) -> u32 {
        let g = self.generation.load(Ordering::Relaxed);
        self.generation.store(g.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        g
    }

    fn end_write(&self, g: u32) {
        self.generation.store(g.wrapping_add(2), Ordering::Release);
    }

    /// Reads the slot; `None` if it is free or being written.
    fn read(&self, slot: usize) -> Option<Block> {
        let g = self.generation.load(Ordering::Acquire);
        if g % 2 == 1 {
            return None;
        }
        let len = self.len.load(Ordering::Relaxed);
        let block = Block {
            slot,
            start: self.start.load(Ordering::Relaxed),
            len,
            fd: self.fd.load(Ordering::Relaxed),
            backing: if self.backing.load(Ordering::Relaxed) == 1 {
                Backing::DevDax
            } else {
                Backing::Memfd
            },
            page: self.page.load(Ordering::Relaxed),
            generation: g,
        };
        fence(Ordering::Acquire);
        if self.generation.load(Ordering::Relaxed) != g || len == 0 {
            return None;
        }
        Some(block)
    }
}

/// The table; one static instance, [`TABLE`].
pub struct Table {
    live: AtomicUsize,
    slots: [Slot; SLOTS],
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("live", &self.live())
            .finish_non_exhaustive()
    }
}

/// The process's redirected blocks.
pub static TABLE: Table = Table::new();

impl Table {
    pub const fn new() -> Table {
        Table {
            live: AtomicUsize::new(0),
            slots: [const { Slot::new() }; SLOTS],
        }
    }

    /// How many blocks are redirected; 0 lets hooks skip every lookup.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Adds a block and the name of its lease; returns the slot, or `None` when full or the
    /// name is longer than [`NAME_MAX`]. Callers serialise writers (the broker mutex).
    pub fn insert(
        &self,
        start: usize,
        len: usize,
        fd: i32,
        backing: Backing,
        page: usize,
        name: &str,
    ) -> Option<usize> {
        if len == 0 || name.len() > NAME_MAX {
            return None;
        }
        let index = self
            .slots
            .iter()
            .position(|s| s.len.load(Ordering::Relaxed) == 0)?;
        let slot = &self.slots[index];
        let g = slot.begin_write();
        slot.start.store(start, Ordering::Relaxed);
        slot.fd.store(fd, Ordering::Relaxed);
        slot.backing
            .store(u8::from(backing == Backing::DevDax), Ordering::Relaxed);
        slot.page.store(page, Ordering::Relaxed);
        for (dst, &b) in slot.name.iter().zip(name.as_bytes()) {
            dst.store(b, Ordering::Relaxed);
        }
        slot.name_len.store(name.len(), Ordering::Relaxed);
        slot.len.store(len, Ordering::Relaxed);
        slot.end_write(g);
        self.live.fetch_add(1, Ordering::Relaxed);
        Some(index)
    }

    /// Frees a slot; returns what it held. Callers serialise writers.
    pub fn remove(&self, index: usize) -> Option<Block> {
        let slot = self.slots.get(index)?;
        let block = slot.read(index)?;
        let g = slot.begin_write();
        slot.len.store(0, Ordering::Relaxed);
        slot.fd.store(-1, Ordering::Relaxed);
        slot.name_len.store(0, Ordering::Relaxed);
        slot.end_write(g);
        self.live.fetch_sub(1, Ordering::Relaxed);
        Some(block)
    }

    /// The block containing `addr`.
    pub fn find(&self, addr: usize) -> Option<Block> {
        if self.live() == 0 {
            return None;
        }
        self.blocks().find(|b| b.contains(addr))
    }

    /// Every live block, in slot order.
    pub fn blocks(&self) -> impl Iterator<Item = Block> + '_ {
        self.slots.iter().enumerate().filter_map(|(i, s)| s.read(i))
    }

    /// Whether any block overlaps `[addr, addr + len)`.
    pub fn any_overlap(&self, addr: usize, len: usize) -> bool {
        self.live() != 0 && self.blocks().any(|b| b.overlaps(addr, len))
    }

    /// Copies the lease name of `block` into `out`; returns its length, or `None` if the slot
    /// changed meanwhile (the block went away) or `out` is too small.
    /// Async-signal-safe: atomics only.
    pub fn copy_name(&self, block: &Block, out: &mut [u8]) -> Option<usize> {
        let slot = self.slots.get(block.slot)?;
        let g = slot.generation.load(Ordering::Acquire);
        if g != block.generation {
            return None;
        }
        let n = slot.name_len.load(Ordering::Relaxed);
        if n > out.len() || n > NAME_MAX {
            return None;
        }
        for (dst, src) in out.iter_mut().zip(&slot.name[..n]) {
            *dst = src.load(Ordering::Relaxed);
        }
        fence(Ordering::Acquire);
        (slot.generation.load(Ordering::Relaxed) == g).then_some(n)
    }
}

impl Default for Table {
    fn default() -> Self {
        Table::new()
    }
}

/// Up to `SLOTS` blocks overlapping a range, sorted by address, without allocating.
#[derive(Debug)]
pub struct Overlaps {
    blocks: [Option<Block>; SLOTS],
    n: usize,
}

impl Overlaps {
    /// The blocks of `table` overlapping `[addr, addr + len)`.
    pub fn of(table: &Table, addr: usize, len: usize) -> Overlaps {
        Overlaps::from_iter(table.blocks().filter(|b| b.overlaps(addr, len)))
    }

    fn from_iter(iter: impl Iterator<Item = Block>) -> Overlaps {
        let mut blocks = [None; SLOTS];
        let mut n = 0;
        for b in iter.take(SLOTS) {
            blocks[n] = Some(b);
            n += 1;
        }
        blocks[..n].sort_unstable_by_key(|b| b.map(|b| b.start));
        Overlaps { blocks, n }
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = Block> + '_ {
        self.blocks[..self.n].iter().flatten().copied()
    }

    /// Splits `[addr, addr + len)` into pieces inside a block (`Some(block)`, with the piece
    /// clipped to it) and pieces outside every block (`None`), in address order.
    pub fn pieces(
        &self,
        addr: usize,
        len: usize,
    ) -> impl Iterator<Item = (usize, usize, Option<Block>)> + '_ {
        let end = addr.saturating_add(len);
        let mut cursor = addr;
        let mut blocks = self.iter().peekable();
        std::iter::from_fn(move || {
            if cursor >= end {
                return None;
            }
            match blocks.peek().copied() {
                Some(b) if b.start > cursor => {
                    let piece_end = b.start.min(end);
                    let piece = (cursor, piece_end - cursor, None);
                    cursor = piece_end;
                    Some(piece)
                }
                Some(b) => {
                    blocks.next();
                    let piece_end = b.end().min(end);
                    let piece = (cursor, piece_end - cursor, Some(b));
                    cursor = piece_end;
                    Some(piece)
                }
                None => {
                    let piece = (cursor, end - cursor, None);
                    cursor = end;
                    Some(piece)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_find_remove() {
        let t = Table::new();
        assert_eq!(t.live(), 0);
        assert_eq!(t.find(0x1000), None);
        let s = t
            .insert(0x10_0000, 0x20_0000, 7, Backing::Memfd, 4096, "hello")
            .unwrap();
        let b = t.find(0x10_0000).unwrap();
        assert_eq!(
            (b.slot, b.start, b.len, b.fd, b.backing, b.page),
            (s, 0x10_0000, 0x20_0000, 7, Backing::Memfd, 4096)
        );
        assert!(t.find(0x30_0000).is_none());
        assert!(t.find(0xf_ffff).is_none());
        assert!(t.find(0x2f_ffff).is_some());
        let mut buf = [0u8; 16];
        assert_eq!(t.copy_name(&b, &mut buf), Some(5));
        assert_eq!(&buf[..5], b"hello");
        assert!(t.copy_name(&b, &mut [0u8; 2]).is_none());
        assert_eq!(t.remove(s), Some(b));
        assert_eq!(t.live(), 0);
        assert!(t.find(0x10_0000).is_none());
        assert!(t.copy_name(&b, &mut buf).is_none());
        assert!(t.remove(s).is_none());
    }

    #[test]
    fn full_table_and_long_name() {
        let t = Table::new();
        let long = "n".repeat(NAME_MAX + 1);
        assert!(t.insert(0, 4096, 1, Backing::Memfd, 4096, &long).is_none());
        for i in 0..SLOTS {
            assert!(
                t.insert(i << 20, 4096, 1, Backing::DevDax, 4096, "")
                    .is_some()
            );
        }
        assert!(
            t.insert(1 << 40, 4096, 1, Backing::Memfd, 4096, "")
                .is_none()
        );
        assert_eq!(t.live(), SLOTS);
        assert_eq!(t.find(5 << 20).unwrap().backing, Backing::DevDax);
    }

    #[test]
    fn pieces_split_a_range() {
        let t = Table::new();
        t.insert(0x3000, 0x1000, 1, Backing::Memfd, 4096, "")
            .unwrap();
        t.insert(0x1000, 0x1000, 2, Backing::Memfd, 4096, "")
            .unwrap();
        let o = Overlaps::of(&t, 0x0, 0x5000);
        let pieces: Vec<_> = o
            .pieces(0, 0x5000)
            .map(|(a, l, b)| (a, l, b.map(|b| b.fd)))
            .collect();
        assert_eq!(
            pieces,
            vec![
                (0, 0x1000, None),
                (0x1000, 0x1000, Some(2)),
                (0x2000, 0x1000, None),
                (0x3000, 0x1000, Some(1)),
                (0x4000, 0x1000, None)
            ]
        );
        let o = Overlaps::of(&t, 0x1800, 0x1000);
        let pieces: Vec<_> = o
            .pieces(0x1800, 0x1000)
            .map(|(a, l, b)| (a, l, b.is_some()))
            .collect();
        assert_eq!(pieces, vec![(0x1800, 0x800, true), (0x2000, 0x800, false)]);
        let o = Overlaps::of(&t, 0x3000, 0x1000);
        assert_eq!(o.pieces(0x3000, 0x1000).count(), 1);
        assert!(Overlaps::of(&t, 0x5000, 0x1000).is_empty());
        assert!(t.any_overlap(0x0, 0x1001));
        assert!(!t.any_overlap(0x0, 0x1000));
    }
}
