//! The crate's only unsafe code: shared mappings and copies in and out of them.
//!
//! Lease memory is shared with other processes (the broker, a VMM, a guest), so no Rust
//! reference (`&[u8]`) is ever made into it: data moves with raw-pointer copies, bounds are
//! checked here, and the mapping is unmapped exactly once, on drop.
#![allow(unsafe_code)]

use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use rustix::io::Errno;
use rustix::mm::{MapFlags, ProtFlags};

/// A `MAP_SHARED` mapping of a file, owned: unmapped on drop.
#[derive(Debug)]
pub(crate) struct SharedMap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; access goes through raw-pointer
// copies that are valid from any thread (other processes may write it concurrently anyway).
unsafe impl Send for SharedMap {}
// SAFETY: as above; `&SharedMap` only permits raw copies, never references into the memory.
unsafe impl Sync for SharedMap {}

impl SharedMap {
    /// Maps `len` bytes of `fd` at `offset`, shared, anywhere the kernel chooses.
    pub(crate) fn new(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        writable: bool,
    ) -> Result<Self, Errno> {
        if len == 0 {
            return Err(Errno::INVAL);
        }
        let prot = if writable {
            ProtFlags::READ | ProtFlags::WRITE
        } else {
            ProtFlags::READ
        };
        // SAFETY: a null hint without MAP_FIXED cannot replace any existing mapping; the
        // kernel validates fd, offset and length, and we own the returned range.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                MapFlags::SHARED,
                fd,
                offset,
            )
        }?;
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(Errno::INVAL)?;
        Ok(SharedMap { ptr, len })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn check(&self, offset: usize, count: usize) -> Result<(), Errno> {
        match offset.checked_add(count) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Errno::FAULT),
        }
    }

    /// Copies `buf.len()` bytes at `offset` out of the mapping.
    pub(crate) fn copy_out(&self, offset: usize, buf: &mut [u8]) -> Result<(), Errno> {
        self.check(offset, buf.len())?;
        // SAFETY: `offset + buf.len() <= len` was checked, so the source range lies inside our
        // live mapping; `buf` is a distinct local buffer, so the ranges cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Ok(())
    }

    /// Copies `data` into the mapping at `offset`.
    pub(crate) fn copy_in(&self, offset: usize, data: &[u8]) -> Result<(), Errno> {
        self.check(offset, data.len())?;
        // SAFETY: bounds checked as in `copy_out`; a read-only mapping faults (SIGSEGV) rather
        // than corrupting memory, and `Mapping` refuses writes to read-only leases first.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        };
        Ok(())
    }

    /// Sets `count` bytes at `offset` to `byte`.
    pub(crate) fn fill(&self, offset: usize, count: usize, byte: u8) -> Result<(), Errno> {
        self.check(offset, count)?;
        // SAFETY: bounds checked; writes stay inside our mapping.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(offset), byte, count) };
        Ok(())
    }

    /// Reads one byte with a volatile load (the value may change under us).
    pub(crate) fn read_volatile(&self, offset: usize) -> Result<u8, Errno> {
        self.check(offset, 1)?;
        // SAFETY: bounds checked; a byte load has no alignment requirement.
        Ok(unsafe { self.ptr.as_ptr().add(offset).read_volatile() })
    }

    /// Writes one byte with a volatile store.
    pub(crate) fn write_volatile(&self, offset: usize, byte: u8) -> Result<(), Errno> {
        self.check(offset, 1)?;
        // SAFETY: bounds checked; a byte store has no alignment requirement.
        unsafe { self.ptr.as_ptr().add(offset).write_volatile(byte) };
        Ok(())
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned, and this is the only unmap.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
