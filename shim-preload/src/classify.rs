//! Which mmap calls are QEMU's RAM (`docs/qemu-guest-ram.md`, "Allocating guest RAM" and
//! "Telling RAM apart").
//!
//! Every anonymous RAMBlock is made by `qemu_ram_mmap`:
//!
//! ```text
//! R = mmap(NULL, S + 2M, PROT_NONE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0)          reservation
//! A = mmap(ALIGN_UP(R, 2M), S, RW, MAP_PRIVATE|MAP_FIXED|MAP_ANONYMOUS, -1, 0)  activation
//! ```
//!
//! The shim remembers, per thread, the last reservation big enough to matter and redirects an
//! activation that sits inside it. An anonymous `MAP_FIXED` mapping inside an already
//! redirected block is QEMU's poison remap (`qemu_ram_remap`) and gets lease memory back.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::table::{Block, TABLE};

/// QEMU's alignment of anonymous RAM (`QEMU_VMALLOC_ALIGN` on x86_64).
pub const QEMU_ALIGN: usize = 2 << 20;

/// Smallest block redirected; `usize::MAX` until the constructor has read the environment, so
/// nothing is redirected before the configuration is known.
pub static MIN_SIZE: AtomicUsize = AtomicUsize::new(usize::MAX);
/// Alignment the shim gives reservations (1 GiB for 1 GiB-page leases), or 0 to leave them.
pub static WIDEN_ALIGN: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The last candidate reservation this thread made: (start, len).
    static RESERVATION: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
    /// Set while the shim itself runs on this thread; hooks then go straight to the kernel.
    static IN_SHIM: Cell<bool> = const { Cell::new(false) };
}

/// What a hooked mmap should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmapAction {
    /// Not ours: call the real mmap with the same arguments.
    Pass,
    /// A PROT_NONE reservation that may precede a RAM activation: remember it.
    Reserve,
    /// QEMU's RAM activation: replace it with a lease mapping.
    Activate,
    /// Anonymous memory over (part of) a redirected block: map the lease there instead.
    Remap(Block),
}

/// The arguments of an mmap call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmapArgs {
    pub addr: usize,
    pub len: usize,
    pub prot: i32,
    pub flags: i32,
    pub fd: i32,
    pub offset: i64,
}

const PRIVATE_ANON: i32 = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

/// Cheap first test, with no TLS access: can this call be anything but a pass-through?
#[inline]
pub fn maybe_ours(args: &MmapArgs) -> bool {
    args.fd == -1
        && args.flags & libc::MAP_ANONYMOUS != 0
        && (args.len >= MIN_SIZE.load(Ordering::Relaxed)
            || args.flags & libc::MAP_FIXED != 0 && TABLE.live() != 0)
}

/// Decides what to do with an mmap, given this thread's last reservation.
pub fn classify(args: &MmapArgs, min_size: usize, reservation: (usize, usize)) -> MmapAction {
    if args.fd != -1 || args.flags & libc::MAP_ANONYMOUS == 0 {
        return MmapAction::Pass;
    }
    let fixed = args.flags & libc::MAP_FIXED != 0;
    if fixed && let Some(block) = TABLE.find(args.addr) {
        return if block.contains_range(args.addr, args.len) {
            MmapAction::Remap(block)
        } else {
            MmapAction::Pass
        };
    }
    let private_anon = args.flags & (PRIVATE_ANON | libc::MAP_SHARED) == PRIVATE_ANON;
    if !private_anon || args.offset != 0 {
        return MmapAction::Pass;
    }
    if !fixed
        && args.prot == libc::PROT_NONE
        && args.flags & libc::MAP_NORESERVE == 0
        && args.len >= min_size.saturating_add(QEMU_ALIGN)
    {
        return MmapAction::Reserve;
    }
    let (r_start, r_len) = reservation;
    if fixed
        && args.prot == RW
        && args.len >= min_size
        && args.addr.is_multiple_of(QEMU_ALIGN)
        && r_len == args.len.saturating_add(QEMU_ALIGN)
        && args.addr >= r_start
        && args.addr.saturating_add(args.len) <= r_start.saturating_add(r_len)
    {
        return MmapAction::Activate;
    }
    MmapAction::Pass
}

/// The reservation this thread made last.
pub fn last_reservation() -> (usize, usize) {
    RESERVATION.with(Cell::get)
}

/// Remembers a reservation (or forgets it, with `(0, 0)`).
pub fn set_reservation(start: usize, len: usize) {
    RESERVATION.with(|r| r.set((start, len)));
}

/// Whether the shim is already running on this thread.
pub fn in_shim() -> bool {
    IN_SHIM.with(Cell::get)
}

/// Marks this thread as inside the shim until the guard drops.
#[derive(Debug)]
pub struct Guard(());

impl Guard {
    pub fn enter() -> Guard {
        IN_SHIM.with(|g| g.set(true));
        Guard(())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        IN_SHIM.with(|g| g.set(false));
    }
}

/// Where to place a reservation of `len` bytes inside a bigger one at `big` of `big_len`
/// bytes so that its start is `align`-aligned: (start, head to trim, tail start, tail len).
pub fn widened_window(
    big: usize,
    big_len: usize,
    len: usize,
    align: usize,
) -> Option<(usize, usize, usize, usize)> {
    let start = big.checked_add(align - 1)? & !(align - 1);
    let head = start - big;
    let tail = start.checked_add(len)?;
    let big_end = big.checked_add(big_len)?;
    if tail > big_end {
        return None;
    }
    Some((start, head, tail, big_end - tail))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::Backing;

    const M: usize = 1 << 20;
    const G: usize = 1 << 30;

    fn args(addr: usize, len: usize, prot: i32, flags: i32) -> MmapArgs {
        MmapArgs {
            addr,
            len,
            prot,
            flags,
            fd: -1,
            offset: 0,
        }
    }

    #[test]
    fn qemu_sequence_is_recognised() {
        let min = 64 * M;
        let s = 2 * G;
        let reserve = args(0, s + 2 * M, libc::PROT_NONE, PRIVATE_ANON);
        assert_eq!(classify(&reserve, min, (0, 0)), MmapAction::Reserve);
        let r = 0x7f00_0010_0000;
        let a = (r + QEMU_ALIGN - 1) & !(QEMU_ALIGN - 1);
        let activate = args(a, s, RW, PRIVATE_ANON | libc::MAP_FIXED);
        assert_eq!(
            classify(&activate, min, (r, s + 2 * M)),
            MmapAction::Activate
        );
        // Without the reservation, or with a different one, it is not RAM.
        assert_eq!(classify(&activate, min, (0, 0)), MmapAction::Pass);
        assert_eq!(classify(&activate, min, (r, s + 4 * M)), MmapAction::Pass);
        // Too small (vga.vram), not 2 MiB aligned, shared, read-only, fd-backed: not ours.
        let vram = 16 * M;
        assert_eq!(
            classify(
                &args(0, vram + 2 * M, libc::PROT_NONE, PRIVATE_ANON),
                min,
                (0, 0)
            ),
            MmapAction::Pass
        );
        assert_eq!(
            classify(
                &args(a, vram, RW, PRIVATE_ANON | libc::MAP_FIXED),
                min,
                (a, vram + 2 * M)
            ),
            MmapAction::Pass
        );
        assert_eq!(
            classify(
                &args(a + 4096, s, RW, PRIVATE_ANON | libc::MAP_FIXED),
                min,
                (r, s + 2 * M)
            ),
            MmapAction::Pass
        );
        let shared = args(
            a,
            s,
            RW,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
        );
        assert_eq!(classify(&shared, min, (r, s + 2 * M)), MmapAction::Pass);
        assert_eq!(
            classify(
                &args(a, s, libc::PROT_READ, PRIVATE_ANON | libc::MAP_FIXED),
                min,
                (r, s + 2 * M)
            ),
            MmapAction::Pass
        );
        let file = MmapArgs {
            fd: 5,
            flags: libc::MAP_SHARED | libc::MAP_FIXED,
            ..activate
        };
        assert_eq!(classify(&file, min, (r, s + 2 * M)), MmapAction::Pass);
        // glibc arenas (MAP_NORESERVE) and the TCG buffer are at most reservations.
        let arena = args(
            0,
            128 * M,
            libc::PROT_NONE,
            PRIVATE_ANON | libc::MAP_NORESERVE,
        );
        assert_eq!(classify(&arena, min, (0, 0)), MmapAction::Pass);
        // reserve=off adds MAP_NORESERVE to the activation only: still RAM.
        let noreserve = args(
            a,
            s,
            RW,
            PRIVATE_ANON | libc::MAP_FIXED | libc::MAP_NORESERVE,
        );
        assert_eq!(
            classify(&noreserve, min, (r, s + 2 * M)),
            MmapAction::Activate
        );
    }

    #[test]
    fn anonymous_fixed_over_a_block_is_a_remap() {
        // Uses the global table; addresses far from anything else the tests insert.
        let start = 0x5a5a_0000_0000;
        let slot = TABLE.insert(start, G, 9, Backing::Memfd, 4096, "").unwrap();
        let remap = args(start + 0x20000, 4096, RW, PRIVATE_ANON | libc::MAP_FIXED);
        assert!(
            matches!(classify(&remap, 64 * M, (0, 0)), MmapAction::Remap(b) if b.start == start)
        );
        assert!(maybe_ours(&remap));
        let straddle = args(start + G - 4096, 8192, RW, PRIVATE_ANON | libc::MAP_FIXED);
        assert_eq!(classify(&straddle, 64 * M, (0, 0)), MmapAction::Pass);
        TABLE.remove(slot).unwrap();
    }

    #[test]
    fn windows() {
        let big = 0x7f00_0010_0000;
        let (start, head, tail, tail_len) =
            widened_window(big, 2 * G + 2 * M + G, 2 * G + 2 * M, G).unwrap();
        assert_eq!(start % G, 0);
        assert_eq!(start - head, big);
        assert_eq!(tail, start + 2 * G + 2 * M);
        assert_eq!(tail + tail_len, big + 3 * G + 2 * M);
        assert_eq!(
            widened_window(G, G + 2 * M, G + 2 * M, G),
            Some((G, 0, 2 * G + 2 * M, 0))
        );
        assert_eq!(widened_window(1, G, G, G), None);
    }

    #[test]
    fn guard_nests_per_thread() {
        assert!(!in_shim());
        {
            let _g = Guard::enter();
            assert!(in_shim());
            std::thread::spawn(|| assert!(!in_shim())).join().unwrap();
        }
        assert!(!in_shim());
    }
}
