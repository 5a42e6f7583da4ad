//! The memory hooks: `mmap`/`mmap64` (RAM activation, reservations, poison remap), `munmap`
//! (lease release) and `madvise` (discard translation).
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use libc::{c_int, c_void, off_t, size_t};

use super::{errno, real_madvise, real_mmap, real_munmap, set_errno};
use crate::backend;
use crate::broker::{self, Instead, ShimError};
use crate::classify::{self, Guard, MmapAction, MmapArgs};
use crate::config::Fallback;
use crate::table::{Backing, Block, Overlaps, TABLE};

/// Interposed `mmap`.
///
/// # Safety
/// As for mmap(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: off_t,
) -> *mut c_void {
    let args = MmapArgs {
        addr: addr as usize,
        len,
        prot,
        flags,
        fd,
        offset,
    };
    if args.fd >= 0
        && backend::PENDING.load(Ordering::Relaxed) != 0
        && !classify::in_shim()
        && let Some(ptr) = super::memfd::map_backend(&args)
    {
        return ptr;
    }
    if !classify::maybe_ours(&args) || classify::in_shim() {
        // SAFETY: exactly our caller's request.
        return unsafe { real_mmap(&args) };
    }
    let min = classify::MIN_SIZE.load(Ordering::Relaxed);
    match classify::classify(&args, min, classify::last_reservation()) {
        // SAFETY: exactly our caller's request.
        MmapAction::Pass => unsafe { real_mmap(&args) },
        MmapAction::Reserve => reserve(&args),
        MmapAction::Activate => activate(&args),
        MmapAction::Remap(block) => remap(&args, &block),
    }
}

/// Interposed `mmap64` (the same function on 64-bit glibc; QEMU imports this one).
///
/// # Safety
/// As for mmap(3).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: off_t,
) -> *mut c_void {
    // SAFETY: same contract.
    unsafe { mmap(addr, len, prot, flags, fd, offset) }
}

/// A PROT_NONE reservation that may hold RAM: remember it, and give it the lease page
/// alignment when that is more than QEMU's 2 MiB (1 GiB pages).
fn reserve(args: &MmapArgs) -> *mut c_void {
    let align = classify::WIDEN_ALIGN.load(Ordering::Relaxed);
    let widened = MmapArgs {
        len: args.len.saturating_add(align),
        ..*args
    };
    if align != 0 && args.addr == 0 && widened.len > args.len {
        // SAFETY: a PROT_NONE reservation without MAP_FIXED replaces nothing.
        let big = unsafe { real_mmap(&widened) };
        if big != libc::MAP_FAILED {
            if let Some((start, head, tail, tail_len)) =
                classify::widened_window(big as usize, widened.len, args.len, align)
            {
                let saved = errno();
                if head != 0 {
                    // SAFETY: the head lies inside the reservation just made and never returned.
                    unsafe { real_munmap(big as usize, head) };
                }
                if tail_len != 0 {
                    // SAFETY: likewise for the tail.
                    unsafe { real_munmap(tail, tail_len) };
                }
                set_errno(saved);
                classify::set_reservation(start, args.len);
                return start as *mut c_void;
            }
            // SAFETY: unmapping the reservation just made.
            unsafe { real_munmap(big as usize, widened.len) };
        }
    }
    // SAFETY: exactly our caller's request.
    let r = unsafe { real_mmap(args) };
    if r != libc::MAP_FAILED {
        classify::set_reservation(r as usize, args.len);
    }
    r
}

/// QEMU's RAM activation: map a lease in place.
fn activate(args: &MmapArgs) -> *mut c_void {
    let _guard = Guard::enter();
    classify::set_reservation(0, 0);
    let saved = errno();
    match map_lease(args) {
        Ok(ptr) => {
            set_errno(saved);
            ptr
        }
        Err(err) => match broker::complain(&err, args.len, Instead::Anonymous) {
            Fallback::Fail => {
                set_errno(err.errno());
                libc::MAP_FAILED
            }
            Fallback::Anon => {
                set_errno(saved);
                // SAFETY: exactly our caller's request.
                unsafe { real_mmap(args) }
            }
        },
    }
}

fn map_lease(args: &MmapArgs) -> Result<*mut c_void, ShimError> {
    let acquired = broker::acquire(args.len as u64, None)?;
    let page = usize::try_from(acquired.page).unwrap_or(usize::MAX);
    if !args.addr.is_multiple_of(page) || !args.len.is_multiple_of(page) {
        let err = ShimError::Misaligned {
            name: acquired.name.clone(),
            addr: args.addr,
            len: args.len,
            page: acquired.page,
        };
        broker::abandon(acquired);
        return Err(err);
    }
    let shared = MmapArgs {
        flags: libc::MAP_SHARED | libc::MAP_FIXED | (args.flags & libc::MAP_NORESERVE),
        fd: acquired.fd.as_raw_fd(),
        ..*args
    };
    // SAFETY: replaces, in place, the anonymous mapping our caller asked for at this address
    // inside its own reservation: the same range, protection and MAP_FIXED it requested.
    let ptr = unsafe { real_mmap(&shared) };
    if ptr == libc::MAP_FAILED {
        let err = ShimError::Map {
            name: acquired.name.clone(),
            errno: errno(),
        };
        broker::abandon(acquired);
        return Err(err);
    }
    if let Err(err) = broker::commit(acquired, args.addr, args.len) {
        // Give the caller what it asked for rather than untracked lease memory.
        // SAFETY: exactly our caller's request, over the range we just mapped for it.
        let ptr = unsafe { real_mmap(args) };
        return if ptr == libc::MAP_FAILED {
            Err(err)
        } else {
            Ok(ptr)
        };
    }
    Ok(ptr)
}

/// Anonymous memory asked for over a redirected block (QEMU's poison remap on reset): punch
/// the old pages out of the lease and map the lease at that offset again.
fn remap(args: &MmapArgs, block: &Block) -> *mut c_void {
    let _guard = Guard::enter();
    let saved = errno();
    let page = block.page.max(4096);
    let start = args.addr & !(page - 1);
    let end = (args.addr + args.len)
        .next_multiple_of(page)
        .min(block.end());
    let offset = start - block.start;
    if block.backing == Backing::Memfd {
        // Fresh pages: a poisoned page is dropped from the memfd, and the range reads zero
        // like the anonymous memory QEMU asked for.
        let _ = punch(block.fd, offset, end - start);
    }
    let shared = MmapArgs {
        addr: start,
        len: end - start,
        prot: args.prot,
        flags: libc::MAP_SHARED | libc::MAP_FIXED,
        fd: block.fd,
        offset: offset as i64,
    };
    // SAFETY: the range lies inside a block QEMU mapped and the shim redirected; QEMU asked
    // to replace (part of) it with MAP_FIXED, and this replaces it with the same lease memory.
    let ptr = unsafe { real_mmap(&shared) };
    if ptr == libc::MAP_FAILED {
        set_errno(saved);
        // SAFETY: exactly our caller's request.
        return unsafe { real_mmap(args) };
    }
    set_errno(saved);
    args.addr as *mut c_void
}

fn punch(fd: i32, offset: usize, len: usize) -> Result<(), c_int> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on an fd the table owns; no memory is passed.
    let r = unsafe { libc::fallocate(fd, mode, offset as off_t, len as off_t) };
    if r == 0 { Ok(()) } else { Err(errno()) }
}

/// Interposed `munmap`: unmapping a whole redirected block releases its lease.
///
/// # Safety
/// As for munmap(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: size_t) -> c_int {
    let start = addr as usize;
    if TABLE.live() == 0 || classify::in_shim() || !TABLE.any_overlap(start, len) {
        // SAFETY: exactly our caller's request.
        return unsafe { real_munmap(start, len) };
    }
    let covered = Overlaps::of(&TABLE, start, len);
    // SAFETY: exactly our caller's request.
    let r = unsafe { real_munmap(start, len) };
    if r == 0 {
        let saved = errno();
        let _guard = Guard::enter();
        let end = start.saturating_add(len);
        for block in covered
            .iter()
            .filter(|b| b.start >= start && b.end() <= end)
        {
            broker::forget(block.slot);
        }
        set_errno(saved);
    }
    r
}

/// Interposed `madvise`: discards inside a redirected block free the lease memory and read
/// back as zero; everything else goes to the kernel untouched.
///
/// # Safety
/// As for madvise(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn madvise(addr: *mut c_void, len: size_t, advice: c_int) -> c_int {
    let start = addr as usize;
    let discard = matches!(
        advice,
        libc::MADV_DONTNEED | libc::MADV_REMOVE | libc::MADV_FREE
    );
    if !discard || TABLE.live() == 0 || classify::in_shim() || !start.is_multiple_of(4096) {
        // SAFETY: exactly our caller's request.
        return unsafe { real_madvise(start, len, advice) };
    }
    let len = len.next_multiple_of(4096);
    let overlaps = Overlaps::of(&TABLE, start, len);
    if overlaps.is_empty() {
        // SAFETY: exactly our caller's request.
        return unsafe { real_madvise(start, len, advice) };
    }
    let saved = errno();
    let mut failed = None;
    for (piece, piece_len, block) in overlaps.pieces(start, len) {
        let r = match block {
            Some(block) => discard_in(&block, piece, piece_len),
            // SAFETY: part of our caller's own request.
            None => match unsafe { real_madvise(piece, piece_len, advice) } {
                0 => Ok(()),
                _ => Err(errno()),
            },
        };
        if let Err(e) = r {
            failed.get_or_insert(e);
        }
    }
    match failed {
        None => {
            set_errno(saved);
            0
        }
        Some(e) => {
            set_errno(e);
            -1
        }
    }
}

fn discard_in(block: &Block, addr: usize, len: usize) -> Result<(), c_int> {
    match block.backing {
        Backing::Memfd => punch(block.fd, addr - block.start, len),
        Backing::DevDax => {
            // SAFETY: [addr, addr + len) lies inside a block the shim mapped read-write over
            // QEMU's RAM, and QEMU asked for its contents to be discarded.
            unsafe { std::ptr::write_bytes(addr as *mut u8, 0, len) };
            Ok(())
        }
    }
}
