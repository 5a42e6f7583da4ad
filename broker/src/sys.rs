//! The broker's only unsafe code: mapping a device to zero it.
#![allow(unsafe_code)]

use std::os::fd::BorrowedFd;

use rustix::io::Errno;
use rustix::mm::{MapFlags, ProtFlags};

/// Bytes zeroed per step (keeps a huge device from needing one giant mapping).
const CHUNK: u64 = 1 << 30;

/// Writes zeros over `[0, len)` of a shared-mappable fd (a device-dax device), in 1 GiB
/// windows; `len` must be a multiple of the device's align.
pub fn zero_shared(fd: BorrowedFd<'_>, len: u64) -> Result<(), Errno> {
    let mut offset = 0;
    while offset < len {
        let window = usize::try_from(CHUNK.min(len - offset)).map_err(|_| Errno::INVAL)?;
        // SAFETY: a fresh shared mapping at a kernel-chosen address, unmapped below; nothing
        // else in this process refers to it.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                window,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                offset,
            )
        }?;
        // SAFETY: `ptr` is a writable mapping of exactly `window` bytes.
        unsafe { std::ptr::write_bytes(ptr.cast::<u8>(), 0, window) };
        // SAFETY: exactly the range mmap returned above.
        unsafe { rustix::mm::munmap(ptr, window) }?;
        offset += window as u64;
    }
    Ok(())
}

/// Takes ownership of a file descriptor this process inherited across exec (the upgrade
/// hand-over) or from systemd (`LISTEN_FDS`). Returns None if `raw` is not open.
///
/// Only call this at start, once per fd number named by the hand-over environment, before
/// anything else in the process could own that number.
pub fn take_inherited_fd(raw: i32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::{BorrowedFd, FromRawFd};
    if raw < 0 {
        return None;
    }
    // SAFETY: only used for the validity probe below; `raw` is non-negative.
    let probe = unsafe { BorrowedFd::borrow_raw(raw) };
    rustix::io::fcntl_getfd(probe).ok()?;
    // SAFETY: `raw` is open (probed above) and, by this function's contract, inherited and
    // owned by nothing else in this process, so the OwnedFd is its only owner.
    Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) })
}

/// Removes an environment variable. Only call this at start, before any thread is spawned.
pub fn remove_env(var: &str) {
    // SAFETY: by this function's contract no other thread exists that could read or write the
    // environment concurrently.
    unsafe { std::env::remove_var(var) };
}
