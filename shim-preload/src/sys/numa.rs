//! The `mbind` hook: QEMU binding a redirected RAM block to NUMA nodes (see [`crate::numa`]).
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;

use libc::{c_int, c_long, c_uint, c_ulong, c_void};

use super::{errno, real_mmap, set_errno};
use crate::broker;
use crate::classify::{self, Guard, MmapArgs};
use crate::numa::{self, Outcome};
use crate::table::TABLE;

/// Node-mask bits the shim reads (the kernel's own limit is far above any real machine).
const MAX_NODE_BITS: usize = 4096;

/// One mbind(2) call's arguments: address, length, mode, node mask, maxnode, flags.
type MbindArgs = (*mut c_void, c_ulong, c_int, *const c_ulong, c_ulong, c_uint);

/// # Safety
/// As for mbind(2).
unsafe fn real_mbind(args: &MbindArgs) -> c_long {
    let &(addr, len, mode, nodemask, maxnode, flags) = args;
    // SAFETY: the caller's contract; SYS_mbind takes exactly these six arguments.
    unsafe { libc::syscall(libc::SYS_mbind, addr, len, mode, nodemask, maxnode, flags) }
}

/// Interposed `mbind` (libnuma's, which QEMU calls): binding a redirected block puts it on a
/// lease from a pool on the asked node; everything else goes to the kernel untouched.
///
/// # Safety
/// As for mbind(2).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mbind(
    addr: *mut c_void,
    len: c_ulong,
    mode: c_int,
    nodemask: *const c_ulong,
    maxnode: c_ulong,
    flags: c_uint,
) -> c_long {
    let args: MbindArgs = (addr, len, mode, nodemask, maxnode, flags);
    let start = addr as usize;
    let Ok(size) = usize::try_from(len) else {
        // SAFETY: exactly our caller's request.
        return unsafe { real_mbind(&args) };
    };
    if TABLE.live() == 0 || classify::in_shim() || !TABLE.any_overlap(start, size) {
        // SAFETY: exactly our caller's request.
        return unsafe { real_mbind(&args) };
    }
    let _guard = Guard::enter();
    let saved = errno();
    // The kernel reads maxnode - 1 bits of the mask.
    let bits = usize::try_from(maxnode)
        .unwrap_or(usize::MAX)
        .saturating_sub(1)
        .min(MAX_NODE_BITS);
    let mut words: [c_ulong; MAX_NODE_BITS / 64] = [0; MAX_NODE_BITS / 64];
    let used = if nodemask.is_null() {
        0
    } else {
        bits.div_ceil(64)
    };
    for (i, word) in words.iter_mut().enumerate().take(used) {
        // SAFETY: mbind(2)'s contract: `nodemask` points to at least maxnode - 1 bits, which
        // `used` words do not exceed.
        *word = unsafe { nodemask.add(i).read() };
    }
    let nodes = numa::mask_nodes(&words[..used], bits);
    let result = match numa::follow(start, size, mode, &nodes) {
        Ok(Outcome::Kernel) => {
            // SAFETY: exactly our caller's request.
            return unsafe { real_mbind(&args) };
        }
        Ok(Outcome::Done) => Ok(()),
        Ok(Outcome::Map(block, acquired)) => {
            let shared = MmapArgs {
                addr: block.start,
                len: block.len,
                prot: libc::PROT_READ | libc::PROT_WRITE,
                flags: libc::MAP_SHARED | libc::MAP_FIXED,
                fd: acquired.fd.as_raw_fd(),
                offset: 0,
            };
            // SAFETY: replaces a block the shim redirected (QEMU's read-write guest RAM,
            // untouched so far: QEMU binds it before use) with another lease of the same size.
            let ptr = unsafe { real_mmap(&shared) };
            if ptr == libc::MAP_FAILED {
                let err = broker::ShimError::Map {
                    name: acquired.name.clone(),
                    errno: errno(),
                };
                broker::abandon(acquired);
                Err(err)
            } else {
                broker::replace(block.slot, acquired, block.start, block.len)
            }
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => {
            set_errno(saved);
            0
        }
        Err(err) => {
            broker::complain_mbind(&err);
            set_errno(err.errno());
            -1
        }
    }
}
