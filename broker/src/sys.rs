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
